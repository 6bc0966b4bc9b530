"""degrade._looplag: how late the event loop runs, and which timeouts that excuses."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
from structlog.testing import capture_logs

from degrade import Registry, Severity, _looplag
from degrade._looplag import LoopLag, excuses, is_timeout
from degrade.testing import FakeClock


class TestIsTimeout:
    def test_timeouts_of_every_driver_by_class_name(self) -> None:
        """The builtin (asyncio's on 3.11+), and any driver class named TimeoutError."""

        driver_timeout = type("TimeoutError", (Exception,), {})  # redis-py's and SQLAlchemy's are named so

        assert is_timeout(TimeoutError())
        assert is_timeout(driver_timeout())
        assert not is_timeout(ConnectionRefusedError())
        assert not is_timeout(None)

    def test_a_timeout_among_the_causes_counts(self) -> None:
        """A connection error raised from a timeout (a connect that timed out) is one; other chains not."""

        def raised(outer: BaseException, inner: BaseException, *, suppress: bool = False) -> BaseException:
            try:
                try:
                    raise inner
                except BaseException:
                    if suppress:
                        raise outer from None
                    raise outer  # noqa: B904 - the implicit context is the point
            except BaseException as final:
                return final

        assert is_timeout(raised(ConnectionError("connecting"), TimeoutError()))
        cause = ConnectionError("connecting")
        cause.__cause__ = TimeoutError()
        assert is_timeout(cause)
        assert not is_timeout(raised(ConnectionError("connecting"), TimeoutError(), suppress=True))
        assert not is_timeout(raised(ConnectionError("reset"), ConnectionRefusedError()))
        deep: BaseException = TimeoutError()
        for _ in range(6):  # deeper than the chain looked at
            outer = ConnectionError()
            outer.__cause__ = deep
            deep = outer
        assert not is_timeout(deep)


class TestLoopLag:
    async def test_an_idle_loop_runs_on_time(self) -> None:
        lag = LoopLag(asyncio.get_running_loop())
        lag.start()
        try:
            await asyncio.sleep(0.3)
            assert len(lag.samples) >= 3
            assert lag.worst(1.0) < 0.04  # generous: the host is shared
        finally:
            lag.stop()

    async def test_a_blocked_loop_is_measured_late(self) -> None:
        """A callback that holds the loop 150 ms makes the next tick run about that late."""
        lag = LoopLag(asyncio.get_running_loop())
        lag.start()
        try:
            await asyncio.sleep(0.06)
            time.sleep(0.15)  # noqa: ASYNC251 - blocks the loop, as a CPU-bound worker does
            assert lag.worst(1.0) >= 0.1  # overdue right now counts
            await asyncio.sleep(0.06)
            assert lag.worst(1.0) >= 0.1  # and so does the late sample
            assert lag.worst(0.01) < 0.1  # but not outside the window
        finally:
            lag.stop()

    async def test_stop_is_idempotent_and_keeps_samples(self) -> None:
        lag = LoopLag(asyncio.get_running_loop())
        lag.start()
        lag.start()
        await asyncio.sleep(0.12)
        lag.stop()
        lag.stop()
        assert not lag.running
        assert lag.samples

    def test_does_not_keep_its_loop_alive(self) -> None:
        loop = asyncio.new_event_loop()
        lag = _looplag.monitor(loop)
        assert lag is not None
        assert lag.running
        ref = weakref.ref(loop)
        loop.close()
        del loop
        gc.collect()
        assert ref() is None


class TestExcuses:
    async def test_only_timeouts_on_a_late_loop_and_only_with_history(self) -> None:
        loop = asyncio.get_running_loop()
        lag = _looplag.monitor(loop, start=False)
        assert lag is not None
        lag.stop()
        assert not excuses(TimeoutError(), threshold=0.1, window=1.0)  # first ask: starts, no history
        assert lag.running
        try:
            await asyncio.sleep(0.06)
            assert not excuses(TimeoutError(), threshold=0.1, window=1.0)  # on time
            time.sleep(0.15)  # noqa: ASYNC251 - a busy loop
            assert excuses(TimeoutError(), threshold=0.1, window=1.0)
            assert not excuses(ConnectionRefusedError(), threshold=0.1, window=1.0)  # not a timeout
        finally:
            lag.stop()

    def test_outside_a_loop_nothing_is_excused(self) -> None:
        assert not excuses(TimeoutError(), threshold=0.0, window=1.0)

    @pytest.mark.parametrize("error", [None, ValueError("bug")])
    def test_non_timeouts_never(self, error: BaseException | None) -> None:
        assert not excuses(error, threshold=0.0, window=1.0)


class TestDependencyExcusesTimeoutsOnALateLoop:
    """Dependency.record_failure: a timeout while the worker's loop ran late is saturation, not an outage."""

    @staticmethod
    async def late_loop() -> None:
        lag = _looplag.monitor()
        assert lag is not None
        await asyncio.sleep(0.06)  # some history
        time.sleep(0.15)  # noqa: ASYNC251 - the worker is busy: every callback runs late

    async def test_a_timeout_on_a_late_loop_is_not_a_failure(self) -> None:
        dep = Registry().dependency("redis", severity=Severity.SEV1, failure_threshold=1)
        dep.record_success()
        await self.late_loop()
        dep.record_failure(TimeoutError())
        assert dep.state == "ok"
        assert dep.failures == 0
        assert dep.timeouts_excused == 1

    async def test_a_service_that_never_answered_gets_no_excuse(self) -> None:
        dep = Registry().dependency("redis", severity=Severity.SEV1, failure_threshold=1)
        await self.late_loop()
        dep.record_failure(TimeoutError())
        assert dep.state == "down"
        assert dep.timeouts_excused == 0

    async def test_the_excuse_runs_out_once_the_service_stops_answering(self) -> None:
        """Vouched by an answer 1 s ago at most: a real outage on a busy worker still trips."""
        clock = FakeClock()
        dep = Registry(clock=clock).dependency("redis", severity=Severity.SEV1, failure_threshold=1)
        dep.record_success()
        await self.late_loop()
        dep.record_failure(TimeoutError())
        assert dep.state == "ok"  # vouched by the answer just now
        clock.advance(1.5)
        await self.late_loop()
        dep.record_failure(TimeoutError())
        assert dep.state == "down"
        assert dep.timeouts_excused == 1

    async def test_the_excuse_dates_from_the_answer_not_from_the_timeout_that_noticed_it(self) -> None:
        """An answer 1.5 s ago, never looked at since, vouches for nothing now (VOUCH is 1 s).

        Dating it from the first timeout to see the count move kept a silent
        primary excused ~2.4 s after its last answer under ``make chaos``.
        """
        clock = FakeClock()
        dep = Registry(clock=clock).dependency("redis", severity=Severity.SEV1, failure_threshold=1)
        dep.record_success()
        clock.advance(1.5)
        await self.late_loop()
        dep.record_failure(TimeoutError())
        assert dep.state == "down"
        assert dep.timeouts_excused == 0

    async def test_only_traffic_timeouts(self) -> None:
        """A refused connection, or a failed probe, counts whatever the loop did."""
        registry = Registry()
        refused = registry.dependency("a", severity=Severity.SEV1, failure_threshold=1)
        probed = registry.dependency("b", severity=Severity.SEV1, failure_threshold=1)
        for dep in (refused, probed):
            dep.record_success()
        await self.late_loop()
        refused.record_failure(ConnectionRefusedError())
        probed.record_failure(TimeoutError(), reason="probe")
        assert (refused.state, probed.state) == ("down", "down")

    async def test_on_time_loop_counts_every_timeout(self) -> None:
        dep = Registry().dependency("redis", severity=Severity.SEV1, failure_threshold=1)
        dep.record_success()
        lag = _looplag.monitor()
        assert lag is not None
        await asyncio.sleep(1.1)  # any earlier lateness slides out of the window
        dep.record_failure(TimeoutError())
        assert dep.state == "down"

    async def test_logged_once_per_interval(self) -> None:
        dep = Registry().dependency("redis", severity=Severity.SEV1)
        dep.record_success()
        await self.late_loop()
        with capture_logs() as logs:
            dep.record_failure(TimeoutError())
            dep.record_failure(TimeoutError())
        excused = [e for e in logs if e["event"] == "dependency.timeout_excused"]
        assert len(excused) == 1
        assert excused[0]["dependency"] == "redis"
        assert dep.timeouts_excused == 2
