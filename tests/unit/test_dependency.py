"""The dependency state machine: threshold, probe, jitter bound, recovery (no real sleeping)."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from degrade import CheckResult, ConfigurationError, Dependency, Registry, Severity
from degrade.dependency import JITTER

from ..support import FakeClock, eventually

DSN = "postgresql://app:hunter2@db.internal:5432/app"


class FakeSleep:
    """An injectable sleep that returns only when the test releases it."""

    def __init__(self) -> None:
        self.requested: list[float] = []
        self._waiters: list[asyncio.Future[None]] = []

    async def __call__(self, seconds: float) -> None:
        self.requested.append(seconds)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    @property
    def sleeping(self) -> int:
        return len(self._waiters)

    def release(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)


class ScriptedCheck:
    """A check that fails (with a DSN in its message) until it is made healthy."""

    def __init__(self, *, healthy: bool = False) -> None:
        self.healthy = healthy
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.healthy:
            raise ConnectionRefusedError(f"could not connect to {DSN}")


async def until(condition: Callable[[], object], *, limit: int = 500) -> None:
    """Let the loop run until ``condition()`` holds (bounded by a number of steps, not time)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def constant(value: float) -> Callable[[], float]:
    """An rng that always returns ``value``."""
    return lambda: value


def asleep_after(check: ScriptedCheck, sleep: FakeSleep, calls: int) -> Callable[[], bool]:
    """True once the probe ran ``calls`` checks and sleeps again."""
    return lambda: check.calls == calls and sleep.sleeping == 1


def probes(name: str) -> list[asyncio.Task[object]]:
    """The running probe tasks of dependency ``name``."""
    return [t for t in asyncio.all_tasks() if t.get_name() == f"degrade.probe[{name}]" and not t.done()]


def make(
    check: ScriptedCheck | None = None,
    *,
    clock: FakeClock | None = None,
    sleep: FakeSleep | None = None,
    rng: Callable[[], float] = lambda: 0.5,
    **options: object,
) -> tuple[Registry, Dependency]:
    """A registry with one dependency ``svc`` wired to fakes."""
    registry = Registry(
        version="t", clock=clock or FakeClock(), sleep=sleep or FakeSleep(), rng=rng, shutdown_timeout=1.0
    )
    dep = registry.dependency("svc", severity=Severity.SEV2, check=check, **options)  # type: ignore[arg-type]
    return registry, dep


class TestSeverity:
    def test_labels_use_runbook_spelling(self) -> None:
        """SEV1..SEV3 are labelled SEV-1..SEV-3 and SEV1 is the worst."""
        assert [s.label for s in Severity] == ["SEV-1", "SEV-2", "SEV-3"]
        assert Severity.SEV1 < Severity.SEV2 < Severity.SEV3


class TestThreshold:
    def test_starts_ok(self) -> None:
        """A new dependency is ok with no failures."""
        _, dep = make()
        assert (dep.state, dep.is_down, dep.failures) == ("ok", False, 0)

    def test_opens_at_threshold(self) -> None:
        """failure_threshold - 1 failures keep it ok; the next one opens it."""
        _, dep = make(failure_threshold=3)
        dep.record_failure(OSError())
        dep.record_failure(OSError())
        assert dep.state == "ok"
        dep.record_failure(OSError())
        assert (dep.state, dep.is_down) == ("down", True)

    def test_threshold_of_one(self) -> None:
        """With failure_threshold=1 the first failure opens it."""
        _, dep = make(failure_threshold=1)
        dep.record_failure()
        assert dep.is_down

    def test_success_resets_the_count(self) -> None:
        """Failures must be consecutive: a success in between starts the count again."""
        _, dep = make(failure_threshold=3)
        dep.record_failure()
        dep.record_failure()
        dep.record_success()
        assert dep.failures == 0
        dep.record_failure()
        dep.record_failure()
        assert dep.state == "ok"

    def test_failures_while_down_keep_it_down(self) -> None:
        """Further failures while down count but do not change the state."""
        _, dep = make(failure_threshold=1)
        dep.record_failure()
        since = dep.since
        dep.record_failure()
        assert dep.is_down
        assert dep.failures == 2
        assert dep.since == since

    def test_last_error_is_the_class_name_only(self) -> None:
        """The last error is kept as a class name, never its text (which may hold a DSN)."""
        _, dep = make()
        dep.record_failure(ConnectionRefusedError(DSN))
        assert dep.last_error == "ConnectionRefusedError"

    def test_mark_down_opens_at_once(self) -> None:
        """mark_down opens it whatever the count, and a later success closes it."""
        _, dep = make(failure_threshold=5)
        dep.mark_down(TimeoutError())
        assert dep.is_down
        assert dep.last_error == "TimeoutError"
        dep.record_success()
        assert dep.state == "ok"

    def test_since_follows_the_clock(self) -> None:
        """since is the injected clock's reading at the last transition."""
        clock = FakeClock(50.0)
        _, dep = make(clock=clock, failure_threshold=1)
        clock.advance(7.0)
        dep.record_failure()
        assert dep.since == 57.0
        clock.advance(3.0)
        dep.record_success()
        assert dep.since == 60.0


class TestStaleFailures:
    def test_a_call_started_before_the_recovery_is_not_counted(self) -> None:
        """A failure of a call that was in flight during the outage does not knock it down again."""
        clock = FakeClock()
        _registry, dep = make(ScriptedCheck(), clock=clock, failure_threshold=1)
        started_during_outage = dep.clock()
        dep.record_failure(OSError())
        assert dep.is_down
        clock.advance(1.0)
        dep.record_success()
        assert not dep.is_down
        dep.record_failure(ConnectionResetError(), started=started_during_outage)
        assert (dep.state, dep.failures, dep.stale_failures) == ("ok", 0, 1)
        dep.record_failure(ConnectionResetError(), started=dep.clock())  # started after: counts
        assert dep.is_down
        assert dep.stale_failures == 1

    def test_while_down_and_before_any_recovery_every_failure_counts(self) -> None:
        """``started`` only matters after a recovery: the first outage counts as ever."""
        clock = FakeClock()
        _registry, dep = make(ScriptedCheck(), clock=clock, failure_threshold=2)
        early = dep.clock()
        clock.advance(5.0)
        dep.record_failure(OSError(), started=early)
        dep.record_failure(OSError(), started=early)
        assert dep.is_down
        assert dep.stale_failures == 0


class TestJitter:
    @given(
        r=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
        interval=st.floats(min_value=0.001, max_value=3600.0),
    )
    def test_interval_stays_within_bound(self, r: float, interval: float) -> None:
        """Every probe wait lies within recovery_interval * (1 +/- JITTER)."""
        _, dep = make(rng=lambda: r, recovery_interval=interval)
        wait = dep.next_interval()
        assert interval * (1 - JITTER) - 1e-9 <= wait <= interval * (1 + JITTER) + 1e-9

    def test_jitter_is_ten_percent(self) -> None:
        """The bound is +/-10%: rng 0 gives 0.9x, 0.5 gives 1x, just under 1 gives ~1.1x."""
        assert JITTER == 0.1
        waits = [make(rng=constant(r), recovery_interval=2.0)[1].next_interval() for r in (0.0, 0.5, 0.9999)]
        assert waits == pytest.approx([1.8, 2.0, 2.19996])

    def test_default_rng_spreads_waits(self) -> None:
        """With the real random source, waits vary and all stay in bound."""
        registry = Registry(rng=random.Random(7).random)
        dep = registry.dependency("svc", severity=Severity.SEV3, recovery_interval=1.0)
        waits = [dep.next_interval() for _ in range(1000)]
        assert all(0.9 <= w <= 1.1 for w in waits)
        assert min(waits) < 0.92
        assert max(waits) > 1.08


class TestProbe:
    async def test_down_starts_one_probe_that_waits_before_checking(self) -> None:
        """Going down starts a probe that sleeps one jittered interval before its first check."""
        check, sleep = ScriptedCheck(), FakeSleep()
        registry, dep = make(check, sleep=sleep, rng=lambda: 0.0, recovery_interval=2.0, failure_threshold=1)
        try:
            dep.record_failure(OSError())
            await until(lambda: sleep.sleeping == 1)
            assert len(probes("svc")) == 1
            assert sleep.requested == [pytest.approx(1.8)]
            assert check.calls == 0
        finally:
            await registry.aclose()

    async def test_exactly_one_probe_however_often_it_fails(self) -> None:
        """More failures, mark_down and probe rounds never start a second probe."""
        check, sleep = ScriptedCheck(), FakeSleep()
        registry, dep = make(check, sleep=sleep, failure_threshold=1)
        try:
            dep.record_failure()
            dep.record_failure()
            dep.mark_down()
            await until(lambda: sleep.sleeping == 1)
            for round_ in range(1, 4):
                sleep.release()
                await until(asleep_after(check, sleep, round_))
                assert len(probes("svc")) == 1
            assert dep.is_down
        finally:
            await registry.aclose()

    async def test_first_successful_check_recovers_and_ends_the_probe(self) -> None:
        """The first passing check closes it and its probe finishes."""
        check, sleep = ScriptedCheck(), FakeSleep()
        registry, dep = make(check, sleep=sleep, failure_threshold=1)
        try:
            dep.record_failure()
            await until(lambda: sleep.sleeping == 1)
            sleep.release()
            await until(lambda: check.calls == 1 and sleep.sleeping == 1)
            assert dep.is_down
            check.healthy = True
            sleep.release()
            await until(lambda: not probes("svc"))
            assert (dep.state, dep.failures, check.calls) == ("ok", 0, 2)
        finally:
            await registry.aclose()

    async def test_goes_down_again_after_recovery(self) -> None:
        """After a recovery, the next outage starts a new probe."""
        check, sleep = ScriptedCheck(healthy=True), FakeSleep()
        registry, dep = make(check, sleep=sleep, failure_threshold=1)
        try:
            for _ in range(2):
                dep.record_failure()
                await until(lambda: sleep.sleeping == 1)
                sleep.release()
                await until(lambda: not probes("svc"))
                assert dep.state == "ok"
            assert check.calls == 2
        finally:
            await registry.aclose()

    async def test_probes_start_one_interval_apart_start_to_start(self) -> None:
        """A check that ran into its timeout is followed by the next one at once, not an interval later."""
        clock, sleep = FakeClock(), FakeSleep()
        slow = ScriptedCheck()

        async def hung_check() -> None:
            clock.advance(0.8)  # the check ran for its whole timeout (a blackholed service)
            await slow()

        registry, dep = make(None, clock=clock, sleep=sleep, rng=lambda: 0.5, failure_threshold=1)
        dep.check = hung_check
        try:
            dep.record_failure(OSError())
            await until(lambda: sleep.sleeping == 1)
            sleep.release()
            await until(asleep_after(slow, sleep, 1))
            sleep.release()
            await until(asleep_after(slow, sleep, 2))
            # First wait: one interval (0.5 s); after each 0.8 s check: no wait left.
            assert sleep.requested == [pytest.approx(0.5), 0.0, 0.0]
        finally:
            await registry.aclose()

    async def test_a_quick_check_leaves_the_rest_of_the_interval(self) -> None:
        """A check that took 0.2 s of a 0.5 s interval is followed by a 0.3 s wait."""
        clock, sleep = FakeClock(), FakeSleep()
        quick = ScriptedCheck()

        async def check() -> None:
            clock.advance(0.2)
            await quick()

        registry, dep = make(None, clock=clock, sleep=sleep, rng=lambda: 0.5, failure_threshold=1)
        dep.check = check
        try:
            dep.record_failure(OSError())
            await until(lambda: sleep.sleeping == 1)
            sleep.release()
            await until(asleep_after(quick, sleep, 1))
            assert sleep.requested == [pytest.approx(0.5), pytest.approx(0.3)]
        finally:
            await registry.aclose()

    async def test_probe_recovers_within_about_one_interval(self) -> None:
        """With the real sleep, recovery after the service returns takes about one interval."""
        check = ScriptedCheck()
        registry = Registry()
        dep = registry.dependency(
            "svc", severity=Severity.SEV3, check=check, failure_threshold=1, recovery_interval=0.02
        )
        try:
            dep.record_failure()
            await asyncio.sleep(0.05)
            assert dep.is_down
            assert check.calls >= 1
            check.healthy = True
            start = time.perf_counter()
            await eventually(lambda: not dep.is_down)
            assert time.perf_counter() - start < 0.5
        finally:
            await registry.aclose()

    async def test_no_probe_without_a_check(self) -> None:
        """A dependency without a check starts no probe."""
        registry, dep = make(None, failure_threshold=1)
        try:
            dep.record_failure()
            await asyncio.sleep(0)
            assert not probes("svc")
        finally:
            await registry.aclose()

    async def test_probe_skips_checks_while_forced_down(self) -> None:
        """While forced down, probe rounds do not run the check and cannot close it."""
        check, sleep = ScriptedCheck(healthy=True), FakeSleep()
        registry, dep = make(check, sleep=sleep, failure_threshold=1)
        try:
            dep.record_failure()
            await until(lambda: sleep.sleeping == 1)
            with dep.forced_down():
                sleep.release()
                await until(lambda: sleep.requested == [pytest.approx(0.5)] * 2)
                assert check.calls == 0
                assert dep.is_down
        finally:
            await registry.aclose()

    async def test_stop_probe_cancels_it(self) -> None:
        """stop_probe cancels the probe, waits for it, and may be called again."""
        sleep = FakeSleep()
        registry, dep = make(ScriptedCheck(), sleep=sleep, failure_threshold=1)
        dep.record_failure()
        await until(lambda: sleep.sleeping == 1)
        (probe,) = probes("svc")
        await dep.stop_probe()
        assert probe.cancelled()
        await dep.stop_probe()
        assert dep.is_down
        await registry.aclose()

    async def test_stop_probe_keeps_its_own_cancellation(self) -> None:
        """A caller cancelled while waiting for a slow-to-stop probe still sees its CancelledError."""
        release = asyncio.Event()
        sleeping = asyncio.Event()

        async def stubborn_sleep(_: float) -> None:
            sleeping.set()
            try:
                await asyncio.Event().wait()
            finally:
                await release.wait()  # clean-up that outlives the cancel

        registry = Registry(sleep=stubborn_sleep)
        dep = registry.dependency("svc", severity=Severity.SEV3, check=ScriptedCheck(), failure_threshold=1)
        dep.record_failure()
        await sleeping.wait()
        (probe,) = probes("svc")
        stopper = asyncio.create_task(dep.stop_probe())
        await until(probe.cancelling)
        stopper.cancel()
        release.set()  # the probe can now finish; without the re-raise, stopper would return normally
        with pytest.raises(asyncio.CancelledError):
            await stopper
        assert probe.done()
        await registry.aclose()


class TestTrialRecovery:
    def test_without_a_check_one_call_per_interval_is_admitted(self) -> None:
        """A check-less dependency admits one trial call per recovery_interval while down."""
        clock = FakeClock()
        _, dep = make(None, clock=clock, failure_threshold=1, recovery_interval=2.0)
        assert dep.admit()
        dep.record_failure()
        assert not dep.admit()
        clock.advance(1.9)
        assert not dep.admit()
        clock.advance(0.2)
        assert dep.admit()
        assert not dep.admit()
        dep.record_failure()  # the trial failed
        clock.advance(2.0)
        assert dep.admit()

    def test_one_trial_at_a_time(self) -> None:
        """Half-open lets exactly one trial through: none other until its outcome is recorded."""
        clock = FakeClock()
        _, dep = make(None, clock=clock, failure_threshold=1, recovery_interval=1.0)
        dep.record_failure()
        clock.advance(1.0)
        assert dep.admit()  # the trial goes out and is slow
        clock.advance(1.5)
        assert not dep.admit()  # an interval later, still no second trial
        dep.record_failure()  # the slow trial failed
        clock.advance(1.0)
        assert dep.admit()
        clock.advance(10.0)  # a trial whose outcome never comes back does not block forever
        assert dep.admit()

    def test_trial_success_closes_it(self) -> None:
        """A trial call's success closes it."""
        clock = FakeClock()
        _, dep = make(None, clock=clock, failure_threshold=1, recovery_interval=1.0)
        dep.record_failure()
        clock.advance(1.0)
        assert dep.admit()
        dep.record_success()
        assert dep.state == "ok"

    async def test_nothing_is_admitted_while_a_probe_runs(self) -> None:
        """With a running probe, no traffic is let through however long it has been down."""
        clock, sleep = FakeClock(), FakeSleep()
        registry, dep = make(ScriptedCheck(), clock=clock, sleep=sleep, failure_threshold=1)
        try:
            dep.record_failure()
            clock.advance(3600)
            assert not dep.admit()
        finally:
            await registry.aclose()

    def test_nothing_is_admitted_while_forced_down(self) -> None:
        """forced_down admits no trial call."""
        clock = FakeClock()
        _, dep = make(None, clock=clock)
        with dep.forced_down():
            clock.advance(3600)
            assert not dep.admit()


class TestForcedDown:
    def test_holds_it_down_and_restores(self) -> None:
        """forced_down holds it down against successes and closes it on exit."""
        _, dep = make(None)
        with dep.forced_down() as forced:
            assert forced is dep
            assert dep.is_down
            dep.record_success()
            assert dep.is_down
        assert dep.state == "ok"
        assert dep.failures == 0

    def test_nests(self) -> None:
        """Nested forced_down blocks release only when the outermost exits."""
        _, dep = make(None)
        with dep.forced_down():
            with dep.forced_down():
                pass
            assert dep.is_down
        assert dep.state == "ok"


class TestRunCheck:
    async def test_passing_check_reports_latency_from_the_clock(self) -> None:
        """A passing check returns ok with its latency measured by the injected clock."""
        clock = FakeClock()

        async def check() -> None:
            clock.advance(0.25)

        registry = Registry(clock=clock)
        dep = registry.dependency("svc", severity=Severity.SEV3, check=check)
        assert await dep.run_check() == CheckResult(ok=True, latency=0.25)

    async def test_failing_check_reports_the_class_name_only(self) -> None:
        """A failing check counts as a failure and reports the class name, not the text."""
        registry, dep = make(ScriptedCheck(), failure_threshold=2)
        result = await dep.run_check()
        assert (result.ok, result.error) == (False, "ConnectionRefusedError")
        assert dep.failures == 1
        assert DSN not in repr(result)
        await registry.aclose()

    async def test_check_is_bounded_by_check_timeout(self) -> None:
        """A check that hangs is abandoned at check_timeout and reported as TimeoutError."""

        async def blackholed() -> None:
            await asyncio.Event().wait()

        registry = Registry()
        dep = registry.dependency("svc", severity=Severity.SEV3, check=blackholed, check_timeout=0.05)
        start = time.perf_counter()
        result = await dep.run_check()
        assert time.perf_counter() - start < 0.5
        assert (result.ok, result.error) == (False, "TimeoutError")
        await registry.aclose()

    async def test_passing_check_closes_it(self) -> None:
        """run_check's success closes a dependency that is down."""
        registry, dep = make(ScriptedCheck(healthy=True), failure_threshold=1)
        dep.record_failure()
        result = await dep.run_check()
        assert result.ok
        assert dep.state == "ok"
        await registry.aclose()

    async def test_without_a_check_reports_the_state(self) -> None:
        """A dependency without a check reports its current state and last error."""
        registry, dep = make(None, failure_threshold=1)
        assert (await dep.run_check()).ok
        dep.record_failure(OSError())
        assert await dep.run_check() == CheckResult(ok=False, latency=0.0, error="OSError")
        await registry.aclose()

    async def test_cancellation_propagates_and_is_not_a_failure(self) -> None:
        """Cancelling run_check raises CancelledError and counts nothing."""
        started = asyncio.Event()

        async def slow() -> None:
            started.set()
            await asyncio.Event().wait()

        registry = Registry()
        dep = registry.dependency("svc", severity=Severity.SEV3, check=slow, check_timeout=60)
        task = asyncio.create_task(dep.run_check())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dep.failures == 0
        await registry.aclose()

    def test_repr_names_state_and_severity(self) -> None:
        """repr shows name, severity and state."""
        _, dep = make(None)
        assert repr(dep) == "<Dependency 'svc' SEV-2 ok>"


class TestForcedDownRestoresTheRealState:
    def test_a_dependency_down_before_the_simulation_stays_down(self) -> None:
        """Ending a simulated outage does not close a dependency that real traffic had opened."""
        dep = Registry().dependency("real", severity=Severity.SEV2, failure_threshold=1)
        dep.record_failure(ConnectionError())
        assert dep.is_down
        with dep.forced_down():
            assert dep.is_down
        assert dep.is_down

    def test_a_dependency_ok_before_the_simulation_comes_back(self) -> None:
        """A simulated outage of a healthy dependency ends with it ok again."""
        dep = Registry().dependency("fine", severity=Severity.SEV2)
        with dep.forced_down():
            assert dep.is_down
        assert dep.state == "ok"


class TestFollowingTransitions:
    def test_subscribers_hear_every_transition(self) -> None:
        """subscribe() calls the listener after each transition, until unsubscribed."""
        dep = Dependency("svc", severity=Severity.SEV2, failure_threshold=1)
        seen: list[str] = []
        unsubscribe = dep.subscribe(lambda d: seen.append(d.state))
        dep.record_failure(OSError())
        dep.record_success()
        unsubscribe()
        dep.record_failure(OSError())
        assert seen == ["down", "ok"]

    def test_a_failing_listener_does_not_stop_the_transition(self) -> None:
        """A listener that raises is logged by class name; the state still changes; others still run."""
        from structlog.testing import capture_logs

        dep = Dependency("svc", severity=Severity.SEV2, failure_threshold=1)
        seen: list[str] = []

        def broken(d: Dependency) -> None:
            raise RuntimeError("secret://user:pw@host")

        dep.subscribe(broken)
        dep.subscribe(lambda d: seen.append(d.state))
        with capture_logs() as logs:
            dep.record_failure(OSError())
        assert dep.is_down
        assert seen == ["down"]
        errors = [entry for entry in logs if entry["event"] == "dependency.listener_error"]
        assert errors == [
            {
                "event": "dependency.listener_error",
                "dependency": "svc",
                "error": "RuntimeError",
                "log_level": "error",
            }
        ]

    def test_bound_methods_are_held_weakly(self) -> None:
        """A subscribed object can be garbage-collected; its listener is then dropped."""
        import gc

        dep = Dependency("svc", severity=Severity.SEV2, failure_threshold=1)

        class Watcher:
            calls = 0

            def on(self, d: Dependency) -> None:
                Watcher.calls += 1

        watcher = Watcher()
        dep.subscribe(watcher.on)
        del watcher
        gc.collect()
        dep.record_failure(OSError())
        assert Watcher.calls == 0
        assert dep._listeners == []

    def test_listener_must_be_callable(self) -> None:
        """A non-callable listener is refused at once."""
        dep = Dependency("svc", severity=Severity.SEV2)
        with pytest.raises(ValueError, match="listener must be callable"):
            dep.subscribe("nope")  # type: ignore[arg-type]

    async def test_went_down_completes_at_the_transition(self) -> None:
        """went_down() is one shared future per loop, resolved when the dependency goes down."""
        dep = Dependency("svc", severity=Severity.SEV2, failure_threshold=1)
        fut = dep.went_down()
        assert dep.went_down() is fut
        assert not fut.done()
        dep.record_failure(OSError())
        assert fut.done()
        assert dep.went_down() is not fut  # the next outage gets a fresh one


class TestShed:
    def test_shed_counts_by_reason_and_never_moves_the_state(self) -> None:
        """Site.shed counts per reason, logs at most once per interval, and is not a failure."""
        from structlog.testing import capture_logs

        dep = Dependency("svc", severity=Severity.SEV1, failure_threshold=1)
        site = dep.add_site("svc.site", "fail_loud", "503")
        with capture_logs() as logs:
            for _ in range(5):
                site.shed("queue")
            site.shed("pool-saturated")
        assert site.shed_calls == {"queue": 5, "pool-saturated": 1}
        assert site.shed_total == 6
        assert site.degraded_calls == 0
        assert dep.state == "ok"
        assert dep.failures == 0
        shed_lines = [entry for entry in logs if entry["event"] == "degrade.shed"]
        assert len(shed_lines) == 1
        assert shed_lines[0]["site"] == "svc.site"
        assert shed_lines[0]["reason"] == "queue"

    def test_shed_in_prometheus(self, request: pytest.FixtureRequest) -> None:
        """degrade_shed_total{dependency, site, reason} reads each site's count."""
        prometheus_client = pytest.importorskip("prometheus_client")
        name = f"svc-{request.node.name}"
        dep = Dependency(name, severity=Severity.SEV2)
        site = dep.add_site(f"{name}.site", "fail_soft", "fallback")
        site.shed("max-pending")
        site.shed("max-pending")
        labels = {"dependency": name, "site": f"{name}.site", "reason": "max-pending"}
        assert prometheus_client.REGISTRY.get_sample_value("degrade_shed_total", labels) == 2.0


class TestArguments:
    @pytest.mark.parametrize("name", ["recovery_interval", "check_timeout", "watch_interval"])
    @pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, True, 0])
    def test_seconds_must_be_finite_and_positive(self, name: str, value: float) -> None:
        """Infinity, NaN, booleans and zero are refused for every interval or bound, naming it."""

        async def check() -> None: ...

        with pytest.raises(ConfigurationError, match=f"{name} must be a finite number of seconds > 0"):
            Dependency("svc", severity=Severity.SEV2, check=check, **{name: value})  # type: ignore[arg-type]

    @pytest.mark.parametrize("value", [True, 0, 1.5, math.inf])
    def test_failure_threshold_is_an_int(self, value: object) -> None:
        """failure_threshold takes an int >= 1, never a bool, a float or infinity."""
        with pytest.raises(ConfigurationError, match="failure_threshold must be an int >= 1"):
            Dependency("svc", severity=Severity.SEV2, failure_threshold=value)  # type: ignore[arg-type]

    @pytest.mark.parametrize("value", [True, -1, 1.5, math.inf, math.nan])
    def test_retry_after_is_whole_seconds(self, value: object) -> None:
        """retry_after takes a whole number of seconds >= 0."""
        with pytest.raises(ConfigurationError, match="retry_after must be a whole number of seconds"):
            Dependency("svc", severity=Severity.SEV2, retry_after=value)  # type: ignore[arg-type]


class TestModuleLayout:
    def test_moved_names_stay_importable_from_degrade_dependency(self) -> None:
        """The split kept every name where it was: the same objects, re-exported."""
        from degrade import _options, _probe, _records, dependency

        assert dependency.Site is _records.Site
        assert dependency.Severity is _records.Severity
        assert dependency.CheckResult is _records.CheckResult
        assert dependency.DependencyOptions is _options.DependencyOptions
        for alias in ("Check", "Clock", "Sleep", "Spawn"):
            assert getattr(dependency, alias) is getattr(_probe, alias)

    def test_the_probe_methods_are_the_dependencys(self) -> None:
        """run_check, watch and the probe's life cycle are inherited, with their docstrings."""
        for name in ("resume_probe", "next_interval", "watch", "stop_probe", "run_check"):
            method = getattr(Dependency, name)
            assert method.__doc__, name
