"""degrade.testing.FakeClock: a clock that moves only when told, and a sleep that moves it."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from degrade import ConfigurationError, Registry, Severity
from degrade.testing import FakeClock
from degrade.testing._clock import MAX_RECORDED

from .. import support

NOT_FINITE = [math.inf, -math.inf, math.nan]


class TestReading:
    def test_starts_at_1000_by_default(self) -> None:
        """A fresh clock reads 1000.0 (never 0, which code may read as "never")."""
        clock = FakeClock()
        assert clock() == 1000.0
        assert clock.now == 1000.0

    def test_starts_where_told(self) -> None:
        """FakeClock(start) reads start, as a float."""
        clock = FakeClock(1_700_000_000)
        assert clock() == 1_700_000_000.0
        assert isinstance(clock(), float)

    @pytest.mark.parametrize("start", [*NOT_FINITE, "1000", None, True])
    def test_refuses_a_start_that_is_not_a_finite_number(self, start: object) -> None:
        """A non-finite or non-numeric start raises ConfigurationError (a ValueError)."""
        with pytest.raises(ConfigurationError, match="start"):
            FakeClock(start)  # type: ignore[arg-type]

    def test_time_stands_still(self) -> None:
        """Reading it does not move it, however much real time passes."""
        clock = FakeClock()
        time.sleep(0.01)
        assert clock() == clock() == 1000.0

    def test_now_is_settable_also_backwards(self) -> None:
        """now can be set to any finite time, as a wall clock that steps back."""
        clock = FakeClock()
        clock.now += 2.5
        assert clock() == 1002.5
        clock.now = 11
        assert clock() == 11.0
        with pytest.raises(ConfigurationError, match="now"):
            clock.now = math.nan

    def test_repr_shows_the_time(self) -> None:
        """repr() names the current time."""
        assert repr(FakeClock(5.0)) == "<FakeClock now=5.0>"

    def test_is_the_clock_the_tests_import(self) -> None:
        """tests.support.FakeClock is the shipped one."""
        assert support.FakeClock is FakeClock


class TestAdvance:
    def test_advance_moves_forward(self) -> None:
        """advance(s) adds s; advance(0) is allowed."""
        clock = FakeClock(0.0)
        clock.advance(1.5)
        clock.advance(0)
        clock.advance(3)
        assert clock() == 4.5

    @pytest.mark.parametrize("seconds", [-0.1, *NOT_FINITE, True, "1"])
    def test_refuses_going_back_or_forever(self, seconds: object) -> None:
        """A negative, non-finite or non-numeric advance raises ConfigurationError; the time stays."""
        clock = FakeClock()
        with pytest.raises(ConfigurationError, match="advance"):
            clock.advance(seconds)  # type: ignore[arg-type]
        assert clock() == 1000.0


class TestSleep:
    async def test_sleep_advances_and_records(self) -> None:
        """sleep(s) moves the clock by s and records s."""
        clock = FakeClock(0.0)
        await clock.sleep(2.0)
        await clock.sleep(0.25)
        assert clock() == 2.25
        assert clock.sleeps == [2.0, 0.25]

    async def test_zero_or_negative_sleep_only_yields(self) -> None:
        """As with asyncio.sleep, a duration <= 0 moves nothing (it is still recorded)."""
        clock = FakeClock(0.0)
        await clock.sleep(0)
        await clock.sleep(-3.0)
        assert clock() == 0.0
        assert clock.sleeps == [0.0, -3.0]

    @pytest.mark.parametrize("seconds", [*NOT_FINITE, None, "1"])
    async def test_refuses_a_sleep_that_is_not_a_finite_number(self, seconds: object) -> None:
        """A fake sleep cannot last forever: non-finite durations raise ConfigurationError."""
        clock = FakeClock()
        with pytest.raises(ConfigurationError, match="sleep"):
            await clock.sleep(seconds)  # type: ignore[arg-type]
        assert clock() == 1000.0
        assert clock.sleeps == []

    async def test_sleep_lets_other_tasks_run_at_the_new_time(self) -> None:
        """While one task sleeps, the others run once, and already see the advanced time."""
        clock = FakeClock(0.0)
        seen: list[float] = []

        async def reader() -> None:
            seen.append(clock())

        task = asyncio.create_task(reader())
        await clock.sleep(5.0)
        assert seen == [5.0]
        await task

    async def test_concurrent_sleeps_add_up(self) -> None:
        """Two tasks sleeping 5 s together move the clock 10 s (the documented limit)."""
        clock = FakeClock(0.0)
        await asyncio.gather(clock.sleep(5.0), clock.sleep(5.0))
        assert clock() == 10.0

    async def test_sleep_takes_no_real_time(self) -> None:
        """An hour of fake sleep passes in (far) less than a real second."""
        clock = FakeClock(0.0)
        start = time.perf_counter()
        for _ in range(60):
            await clock.sleep(60.0)
        assert clock() == 3600.0
        assert time.perf_counter() - start < 1.0

    async def test_the_record_is_bounded(self) -> None:
        """Only the last MAX_RECORDED durations are kept, oldest first."""
        clock = FakeClock(0.0)
        for i in range(MAX_RECORDED + 5):
            await clock.sleep(float(i))
        assert len(clock.sleeps) == MAX_RECORDED
        assert clock.sleeps[0] == 5.0
        assert clock.sleeps[-1] == float(MAX_RECORDED + 4)


class TestAsDependencyClockAndSleep:
    async def test_probe_recovers_after_fake_time_only(self) -> None:
        """A dependency on clock=fake, sleep=fake.sleep: its probe waits out a minute of fake time at once."""
        clock = FakeClock()
        registry = Registry(version="t", clock=clock, sleep=clock.sleep, rng=lambda: 0.5)
        back_at = math.inf

        async def check() -> None:
            if clock() < back_at:
                raise ConnectionRefusedError("still down")

        dep = registry.dependency("svc", severity=Severity.SEV2, check=check)
        try:
            for _ in range(100):
                if dep.is_down:
                    break
                await dep.run_check()
            assert dep.is_down
            down_at = clock()
            back_at = down_at + 60.0
            start = time.perf_counter()
            for _ in range(10_000):
                if not dep.is_down:
                    break
                await asyncio.sleep(0)
            assert not dep.is_down
            assert time.perf_counter() - start < 2.0
            interval = dep.next_interval()  # rng 0.5: no jitter
            assert set(clock.sleeps) == {interval}
            assert back_at <= clock() < back_at + interval
            assert clock() == pytest.approx(down_at + len(clock.sleeps) * interval)
        finally:
            await registry.aclose()
