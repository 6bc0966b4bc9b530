"""Trip and recovery policies: values validated when made, shared by Registry.dependency and Dependency."""

from __future__ import annotations

import math
from typing import Any

import pytest

from degrade import ConfigurationError, Dependency, Registry, Severity
from degrade.policies import Consecutive, FailureRate, Probe, SlowCalls


class TestConsecutive:
    def test_trips_after_n_in_a_row(self) -> None:
        """trip=Consecutive(2): two failures in a row open it; a success in between resets the count."""
        dep = Registry().dependency("svc", severity=Severity.SEV2, trip=Consecutive(2))
        dep.record_failure(OSError())
        dep.record_success()
        dep.record_failure(OSError())
        assert dep.state == "ok"
        dep.record_failure(OSError())
        assert dep.state == "down"
        assert dep.failure_threshold == 2

    @pytest.mark.parametrize("value", [0, -1, 1.5, True, "3"])
    def test_validated(self, value: object) -> None:
        """A bad count is refused when the policy is made."""
        with pytest.raises(ConfigurationError, match="failures must be an int >= 1"):
            Consecutive(value)  # type: ignore[arg-type]

    def test_described_for_the_runbook(self) -> None:
        """The runbook's words."""
        assert Consecutive(3).describe() == "3 consecutive failures"
        assert Consecutive(1).describe() == "1 consecutive failure"

    def test_one_value_serves_many_dependencies(self) -> None:
        """The policy holds no state: each dependency counts its own failures."""
        rule = Consecutive(2)
        a = Dependency("a", severity=Severity.SEV3, trip=rule)
        b = Dependency("b", severity=Severity.SEV3, trip=rule)
        a.record_failure(OSError())
        a.record_failure(OSError())
        b.record_failure(OSError())
        assert (a.state, b.state) == ("down", "ok")


class TestProbe:
    def test_recovery_values(self) -> None:
        """recovery=Probe(...) sets the probe interval and the check bound."""
        dep = Dependency("svc", severity=Severity.SEV3, recovery=Probe(interval=0.2, timeout=0.3))
        assert (dep.recovery_interval, dep.check_timeout) == (0.2, 0.3)

    @pytest.mark.parametrize(
        "kwargs", [{"interval": 0}, {"timeout": math.inf}, {"interval": math.nan}, {"jitter": 1.0}]
    )
    def test_validated(self, kwargs: dict[str, float]) -> None:
        """Zero, infinite or NaN seconds and a jitter of 1 or more are refused."""
        with pytest.raises(ConfigurationError):
            Probe(**kwargs)

    def test_jitter(self) -> None:
        """next_wait stays within interval x (1 +/- jitter)."""
        probe = Probe(interval=1.0, jitter=0.1)
        assert probe.next_wait(lambda: 0.0) == pytest.approx(0.9)
        assert probe.next_wait(lambda: 0.5) == pytest.approx(1.0)
        assert probe.next_wait(lambda: 0.999999) == pytest.approx(1.1, abs=1e-5)


class TestShorthands:
    def test_old_keywords_build_the_same_policies(self) -> None:
        """failure_threshold / recovery_interval / check_timeout still work and build the policies."""
        dep = Dependency(
            "svc", severity=Severity.SEV3, failure_threshold=4, recovery_interval=0.3, check_timeout=0.2
        )
        assert dep.trip == Consecutive(4)
        assert dep.recovery == Probe(interval=0.3, timeout=0.2)

    def test_both_spellings_at_once_is_an_error(self) -> None:
        """Giving a policy and its shorthand together is ambiguous: refused."""
        with pytest.raises(ConfigurationError, match="not both"):
            Dependency("svc", severity=Severity.SEV3, trip=Consecutive(2), failure_threshold=3)
        with pytest.raises(ConfigurationError, match="not both"):
            Dependency("svc", severity=Severity.SEV3, recovery=Probe(), check_timeout=0.5)

    def test_wrong_policy_type(self) -> None:
        """A number where a policy goes is refused with the class to use."""
        with pytest.raises(ConfigurationError, match="Consecutive"):
            Dependency("svc", severity=Severity.SEV3, trip=3)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="Probe"):
            Dependency("svc", severity=Severity.SEV3, recovery=0.5)  # type: ignore[arg-type]


class TestDampedRecovery:
    def test_hold_grows_with_quick_relapses_and_is_capped(self) -> None:
        """Relapses within the flap window hold it down interval x backoff^flaps, at most max_hold."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = Dependency(
            "svc",
            severity=Severity.SEV3,
            failure_threshold=1,
            recovery=Probe(interval=0.5, backoff=2.0, max_hold=3.0, flap_window=10.0),
            clock=clock,
        )
        holds = []
        for _ in range(5):
            dep.record_failure(OSError())
            holds.append(dep.recovery_delay)
            clock.advance(1.0)
            dep.record_success()
            clock.advance(1.0)
        assert holds == [0.0, 1.0, 2.0, 3.0, 3.0]
        assert dep.flapping
        clock.advance(10.0)  # a stable period resets the count
        dep.record_failure(OSError())
        assert dep.flaps == 0
        assert not dep.flapping

    def test_an_outage_closed_by_a_call_in_flight_is_not_a_flap(self) -> None:
        """Down, then answered before any probe could run (ms later): no flap, no window for the next."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = Dependency(
            "svc",
            severity=Severity.SEV3,
            failure_threshold=1,
            recovery=Probe(interval=0.5, jitter=0.1, backoff=2.0, max_hold=30.0, flap_window=60.0),
            clock=clock,
        )
        for _ in range(5):  # bursts of timeouts on a saturated host, each contradicted at once
            dep.record_failure(TimeoutError())
            clock.advance(0.005)
            dep.record_success()
            clock.advance(2.0)
        dep.record_failure(OSError())  # the real outage
        assert dep.flaps == 0
        assert dep.recovery_delay == 0.0
        clock.advance(1.0)
        dep.record_success()  # closed by a probe's success, a real recovery
        clock.advance(1.0)
        dep.record_failure(OSError())  # a relapse within the window: damped
        assert dep.flaps == 1
        assert dep.recovery_delay == 1.0
        clock.advance(0.005)
        dep.record_success()  # that relapse was itself contradicted at once: not counted
        assert dep.flaps == 0
        clock.advance(1.0)
        dep.record_failure(OSError())  # a relapse of the real recovery again
        assert dep.flaps == 1

    async def test_probe_waits_out_the_hold(self) -> None:
        """A flapping dependency's first probe comes after the hold, not after one interval."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        checks: list[float] = []

        async def check() -> None:
            checks.append(clock())

        dep = Dependency(
            "svc",
            severity=Severity.SEV3,
            check=check,
            failure_threshold=1,
            recovery=Probe(interval=0.5, jitter=0.0, backoff=4.0, max_hold=30.0),
            clock=clock,
            sleep=clock.sleep,
        )
        dep.record_failure(OSError())
        start = clock()
        await dep._probe  # type: ignore[misc]
        assert checks == [start + 0.5]  # the first outage: one interval
        dep.record_failure(OSError())  # relapse right away: held 0.5 x 4 = 2 s
        start = clock()
        await dep._probe  # type: ignore[misc]
        assert checks[-1] == pytest.approx(start + 2.0)

    async def test_several_successes_in_a_row_close_it(self) -> None:
        """Probe(successes=3): two passing probes are not enough; a failure restarts the count."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        outcomes = iter([True, True, False, True, True, True])
        ran = 0

        async def check() -> None:
            nonlocal ran
            ran += 1
            if not next(outcomes):
                raise OSError("still down")

        dep = Dependency(
            "svc",
            severity=Severity.SEV3,
            check=check,
            failure_threshold=1,
            recovery=Probe(interval=0.5, successes=3),
            clock=clock,
            sleep=clock.sleep,
        )
        dep.record_failure(OSError())
        await dep._probe  # type: ignore[misc]
        assert ran == 6
        assert dep.state == "ok"

    @pytest.mark.parametrize(
        "kwargs", [{"successes": 0}, {"backoff": 0.5}, {"max_hold": 0}, {"flap_window": -1}]
    )
    def test_validated(self, kwargs: dict[str, float]) -> None:
        """Bad damping values are refused when the policy is made."""
        with pytest.raises(ConfigurationError):
            Probe(**kwargs)  # type: ignore[arg-type]


class TestFailureRate:
    def make(self, rule: object, clock: object) -> Dependency:
        return Dependency("svc", severity=Severity.SEV2, trip=rule, clock=clock)  # type: ignore[arg-type]

    def test_interleaved_failures_trip_it_and_not_consecutive(self) -> None:
        """Every other call failing: FailureRate(0.5) trips, Consecutive(3) never does."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        rate = self.make(FailureRate(threshold=0.5, window=10.0, min_calls=20), clock)
        consecutive = Dependency("other", severity=Severity.SEV2, trip=Consecutive(3), clock=clock)
        downs: list[str] = []
        for dep in (rate, consecutive):
            dep.subscribe(lambda d: downs.append(d.name) if d.is_down else None)
        for i in range(20):
            for dep in (rate, consecutive):
                if i % 2:
                    dep.record_failure(OSError())
                else:
                    dep.record_success()
            clock.advance(0.1)
        assert rate.state == "down"  # at the 20th call: 10 of 20 failed
        assert consecutive.state == "ok"
        assert downs == ["svc"]

    def test_min_calls_protects_a_quiet_service(self) -> None:
        """Two failures out of two calls are 100 % but below min_calls: still ok."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = self.make(FailureRate(min_calls=20), clock)
        dep.record_failure(OSError())
        dep.record_failure(OSError())
        assert dep.state == "ok"
        assert dep.trip_figures() == {"calls": 2, "failure_pct": 100.0, "slow_pct": 0.0}

    def test_window_expires(self) -> None:
        """Outcomes older than the window no longer count."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = self.make(FailureRate(threshold=0.5, window=2.0, min_calls=4, buckets=4), clock)
        for _ in range(3):
            dep.record_failure(OSError())
        clock.advance(2.5)  # those three slid out
        dep.record_failure(OSError())
        assert dep.state == "ok"
        assert dep.trip_figures()["calls"] == 1
        for _ in range(3):
            dep.record_failure(OSError())
        assert dep.state == "down"

    def test_described(self) -> None:
        """The runbook's words."""
        assert FailureRate().describe() == "50% of calls failing over 10 s (at least 20 calls)"
        assert SlowCalls().describe() == "80% of calls slower than 0.5 s over 10 s (at least 20 calls)"
        assert (
            FailureRate() | SlowCalls()
        ).describe() == f"{FailureRate().describe()} or {SlowCalls().describe()}"


class TestSlowCalls:
    async def test_slow_successes_trip_it_through_a_decorator(self) -> None:
        """A service answering every call in 0.9 s without an error trips SlowCalls(0.5)."""
        from degrade import fail_soft
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = Dependency(
            "svc",
            severity=Severity.SEV2,
            trip=FailureRate() | SlowCalls(slower_than=0.5, threshold=0.8, min_calls=5),
            clock=clock,
        )
        assert dep.counts_calls
        assert dep.times_calls

        @fail_soft(dep, fallback="fallback", reason="slow service")
        async def call() -> str:
            clock.advance(0.9)  # the service takes 0.9 s
            return "answer"

        answers = [await call() for _ in range(6)]
        assert dep.state == "down"
        assert answers[:5] == ["answer"] * 5
        assert answers[5] == "fallback"
        assert dep.trip_figures()["slow_pct"] == 0.0  # reset when it went down

    def test_fast_successes_do_not(self) -> None:
        """Successes under slower_than never trip it."""
        from degrade.testing import FakeClock

        clock = FakeClock()
        dep = Dependency("svc", severity=Severity.SEV2, trip=SlowCalls(min_calls=5), clock=clock)
        for _ in range(50):
            dep.record_success(0.01)
        assert dep.state == "ok"

    @pytest.mark.parametrize(
        "make",
        [
            lambda: FailureRate(threshold=0),
            lambda: SlowCalls(slower_than=0),
            lambda: FailureRate(min_calls=0),
        ],
    )
    def test_validated(self, make: Any) -> None:
        """Bad values are refused when the rule is made."""
        with pytest.raises(ConfigurationError):
            make()


class TestNonFiniteValues:
    @pytest.mark.parametrize(
        "make",
        [
            lambda: FailureRate(threshold=math.nan),
            lambda: FailureRate(threshold=True),
            lambda: FailureRate(window=math.inf),
            lambda: FailureRate(window=math.nan),
            lambda: FailureRate(min_calls=True),
            lambda: SlowCalls(slower_than=math.inf),
            lambda: SlowCalls(slower_than=True),
            lambda: SlowCalls(window=math.nan),
            lambda: Probe(interval=True),
            lambda: Probe(timeout=-math.inf),
            lambda: Probe(jitter=math.nan),
            lambda: Probe(backoff=math.inf),
            lambda: Probe(max_hold=math.inf),
            lambda: Probe(flap_window=math.nan),
            lambda: Probe(successes=True),
        ],
    )
    def test_refused(self, make: Any) -> None:
        """Infinity, NaN and booleans are refused by every policy when it is made."""
        with pytest.raises(ConfigurationError):
            make()


def test_probe_stays_importable_from_degrade_policies() -> None:
    """Probe lives in degrade._recovery and is the same object in degrade.policies."""
    from degrade import _recovery, policies

    assert policies.Probe is _recovery.Probe
    assert "Probe" in policies.__all__
