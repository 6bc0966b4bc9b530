"""How a dependency trips and how it recovers: small frozen policy objects.

Modelled on tenacity's stop and wait objects: a policy is a value, validated
when it is made, that you pass to :meth:`degrade.Registry.dependency` (or
:class:`~degrade.Dependency`) as ``trip=`` and ``recovery=``, and that the
runbook can describe. A trip rule keeps its per-dependency state in a
:class:`TripTracker` it makes, so one policy value can serve many dependencies,
and a new rule (a failure-rate window, a slow-call rule) is a new class, not a
new parameter of every constructor.

* :class:`Consecutive` (the default, ``Consecutive(3)``): down after that many
  failures in a row; any success resets the count.
* :class:`Probe` (the default, ``Probe(interval=0.5, timeout=0.8)``): while
  down, one background check every ``interval`` seconds (jittered), each
  bounded by ``timeout``; the first success closes it. Without a check, one
  real call per ``interval`` is let through as a trial.

The trip rules live here; :class:`Probe`, the recovery policy, lives in
``_recovery`` and is re-exported here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _validate
from ._recovery import Probe
from .exceptions import ConfigurationError

__all__ = ["AnyOf", "Consecutive", "FailureRate", "Probe", "SlowCalls", "Trip", "TripTracker"]

Clock = Callable[[], float]


class TripTracker(abc.ABC):
    """One dependency's running state of a trip rule (made by :meth:`Trip.tracker`)."""

    #: True when the rule needs every success (a rate), not only the first after a failure.
    counts_calls = False
    #: True when the rule needs how long each successful call took (a slow-call rule).
    times_calls = False

    @abc.abstractmethod
    def failure(self) -> bool:
        """Record one failure; True when the rule now says the dependency is down."""

    @abc.abstractmethod
    def success(self, duration: float | None = None) -> bool:
        """Record one success (``duration``: how long the call took, when known); True to trip."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget what was recorded (the dependency changed state)."""

    def figures(self) -> dict[str, Any]:
        """What the rule currently sees, for ``/health/deep`` details."""
        return {}


class Trip(abc.ABC):
    """A rule that moves a dependency from ``ok`` to ``down`` on the evidence of its calls.

    Failure mode: none of its own; a rule only counts.
    """

    @abc.abstractmethod
    def tracker(self, clock: Clock) -> TripTracker:
        """A fresh tracker for one dependency."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The rule in words, for the runbook (``"3 consecutive failures"``)."""

    def __or__(self, other: Trip) -> AnyOf:
        """Trip when either rule trips: ``FailureRate() | SlowCalls()``."""
        if not isinstance(other, Trip):
            return NotImplemented
        mine = self.rules if isinstance(self, AnyOf) else (self,)
        theirs = other.rules if isinstance(other, AnyOf) else (other,)
        return AnyOf((*mine, *theirs))


class _ConsecutiveTracker(TripTracker):
    __slots__ = ("failures", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failures = 0

    def failure(self) -> bool:
        self.failures += 1
        return self.failures >= self.limit

    def success(self, duration: float | None = None) -> bool:
        self.failures = 0
        return False

    def reset(self) -> None:
        self.failures = 0

    def figures(self) -> dict[str, Any]:
        return {"consecutive_failures": self.failures}


@dataclass(frozen=True)
class Consecutive(Trip):
    """Down after ``failures`` failures in a row; a success resets the count.

    The simplest rule, and the default (``Consecutive(3)``). It never trips
    on a service that fails every other call, nor on one that answers slowly
    but without error.

    Args:
        failures: Consecutive failures that open the dependency (>= 1).
    """

    failures: int = 3

    def __post_init__(self) -> None:
        _validate.count("failures", self.failures)

    def tracker(self, clock: Clock) -> TripTracker:
        """A counter of consecutive failures."""
        return _ConsecutiveTracker(self.failures)

    def describe(self) -> str:
        """``"N consecutive failures"``."""
        return f"{self.failures} consecutive failure{'s' if self.failures != 1 else ''}"


class _Window:
    """Calls, failures and slow calls over the last ``window`` seconds, in ``buckets`` slices.

    O(1) per call and no allocation: the counts live in three preallocated
    lists used as rings, and the running totals are kept as calls come and
    slices expire. A slice is ``window / buckets`` seconds, so the window
    slides in steps of that size. A call compares the clock with the end of
    the current slice and bumps two integers; the division and the expiry of
    old slices run only when a slice ends (measured: the per-call division
    and modulo were half of the rule's cost over ``Consecutive``).
    """

    __slots__ = (
        "calls",
        "clock",
        "failed",
        "i",
        "n",
        "ring_calls",
        "ring_failed",
        "ring_slow",
        "roll_at",
        "slice",
        "slot",
        "slow",
    )

    def __init__(self, window: float, buckets: int, clock: Clock) -> None:
        self.clock = clock
        self.n = buckets
        self.slice = window / buckets
        self.ring_calls = [0] * buckets
        self.ring_failed = [0] * buckets
        self.ring_slow = [0] * buckets
        self.calls = self.failed = self.slow = 0
        self.slot = int(clock() / self.slice)
        self.i = self.slot % buckets
        self.roll_at = (self.slot + 1) * self.slice

    def _roll(self, now: float) -> None:
        """Move to the slice ``now`` falls in, expiring the slices that slid out."""
        slot = int(now / self.slice)
        gap = slot - self.slot
        if gap > 0:
            n = self.n
            if gap >= n:
                self.reset()
            else:
                for step in range(1, gap + 1):
                    i = (self.slot + step) % n
                    self.calls -= self.ring_calls[i]
                    self.failed -= self.ring_failed[i]
                    self.slow -= self.ring_slow[i]
                    self.ring_calls[i] = self.ring_failed[i] = self.ring_slow[i] = 0
            self.slot = slot
            self.i = slot % n
        self.roll_at = (slot + 1) * self.slice

    def ok(self) -> None:
        """One call that succeeded in time (the hot path)."""
        if self.clock() >= self.roll_at:
            self._roll(self.clock())
        self.ring_calls[self.i] += 1
        self.calls += 1

    def add(self, failed: bool, slow: bool) -> None:
        """One call that failed, or succeeded slowly (or not)."""
        if self.clock() >= self.roll_at:
            self._roll(self.clock())
        i = self.i
        self.ring_calls[i] += 1
        self.calls += 1
        if failed:
            self.ring_failed[i] += 1
            self.failed += 1
        elif slow:
            self.ring_slow[i] += 1
            self.slow += 1

    def reset(self) -> None:
        for ring in (self.ring_calls, self.ring_failed, self.ring_slow):
            for i in range(self.n):
                ring[i] = 0
        self.calls = self.failed = self.slow = 0

    def figures(self) -> dict[str, Any]:
        now = self.clock()
        if now >= self.roll_at:
            self._roll(now)
        calls = self.calls
        return {
            "calls": calls,
            "failure_pct": round(100.0 * self.failed / calls, 1) if calls else 0.0,
            "slow_pct": round(100.0 * self.slow / calls, 1) if calls else 0.0,
        }


class _RateTracker(TripTracker):
    counts_calls = True

    def __init__(self, rule: FailureRate | SlowCalls, clock: Clock) -> None:
        self.rule = rule
        self.window = _Window(rule.window, rule.buckets, clock)
        self.slower_than = rule.slower_than if isinstance(rule, SlowCalls) else None
        self.times_calls = self.slower_than is not None

    def _tripped(self) -> bool:
        w = self.window
        if w.calls < self.rule.min_calls:
            return False
        bad = w.failed if self.slower_than is None else w.slow
        return bad >= self.rule.threshold * w.calls

    def failure(self) -> bool:
        self.window.add(True, False)
        return self._tripped()

    def success(self, duration: float | None = None) -> bool:
        slower_than = self.slower_than
        if slower_than is None:  # a failure rule: a success only lowers the rate (inlined ok())
            w = self.window
            if w.clock() >= w.roll_at:
                w._roll(w.clock())
            w.ring_calls[w.i] += 1
            w.calls += 1
            return False
        slow = duration is not None and duration > slower_than
        self.window.add(False, slow)
        return slow and self._tripped()

    def reset(self) -> None:
        self.window.reset()

    def figures(self) -> dict[str, Any]:
        return self.window.figures()


@dataclass(frozen=True)
class FailureRate(Trip):
    """Down when at least ``threshold`` of the calls of the last ``window`` seconds failed.

    Counted only once ``min_calls`` calls ended within the window, so the first
    failures of a quiet service do not trip it. Catches the service that fails
    every other call, which :class:`Consecutive` never does (resilience4j's and
    Polly's failure-rate breaker). Every call's outcome is recorded: O(1),
    no allocation per call.

    Args:
        threshold: Failed fraction that trips it, in (0, 1].
        window: Seconds the rate is measured over.
        min_calls: Calls needed in the window before the rate counts.
        buckets: Slices of the window (it slides by ``window / buckets``).
    """

    threshold: float = 0.5
    window: float = 10.0
    min_calls: int = 20
    buckets: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "threshold", _validate.fraction("threshold", self.threshold))
        object.__setattr__(self, "window", _validate.seconds("window", self.window))
        _validate.count("min_calls", self.min_calls)
        _validate.count("buckets", self.buckets)

    def tracker(self, clock: Clock) -> TripTracker:
        """A sliding window of outcomes."""
        return _RateTracker(self, clock)

    def describe(self) -> str:
        """``"50% of calls failing over 10 s (at least 20 calls)"``."""
        return (
            f"{self.threshold * 100:g}% of calls failing over {self.window:g} s "
            f"(at least {self.min_calls} calls)"
        )


@dataclass(frozen=True)
class SlowCalls(Trip):
    """Down when at least ``threshold`` of the calls of the last ``window`` seconds were slow.

    A call that succeeded but took longer than ``slower_than`` seconds is slow:
    a service answering every call in 900 ms instead of 5 ms eats every
    caller's budget without a single error. Counted once ``min_calls`` calls
    ended within the window. Combine with a failure rule:
    ``FailureRate() | SlowCalls()``.

    Args:
        slower_than: Seconds above which a successful call counts as slow.
        threshold: Slow fraction that trips it, in (0, 1].
        window: Seconds the rate is measured over.
        min_calls: Calls needed in the window before the rate counts.
        buckets: Slices of the window (it slides by ``window / buckets``).
    """

    slower_than: float = 0.5
    threshold: float = 0.8
    window: float = 10.0
    min_calls: int = 20
    buckets: int = 10

    def __post_init__(self) -> None:
        object.__setattr__(self, "slower_than", _validate.seconds("slower_than", self.slower_than))
        object.__setattr__(self, "threshold", _validate.fraction("threshold", self.threshold))
        object.__setattr__(self, "window", _validate.seconds("window", self.window))
        _validate.count("min_calls", self.min_calls)
        _validate.count("buckets", self.buckets)

    def tracker(self, clock: Clock) -> TripTracker:
        """A sliding window of outcomes and their durations."""
        return _RateTracker(self, clock)

    def describe(self) -> str:
        """``"80% of calls slower than 0.5 s over 10 s (at least 20 calls)"``."""
        return (
            f"{self.threshold * 100:g}% of calls slower than {self.slower_than:g} s over "
            f"{self.window:g} s (at least {self.min_calls} calls)"
        )


class _AnyTracker(TripTracker):
    def __init__(self, trackers: tuple[TripTracker, ...]) -> None:
        self.trackers = trackers
        self.counts_calls = any(t.counts_calls for t in trackers)
        self.times_calls = any(t.times_calls for t in trackers)

    def failure(self) -> bool:
        tripped = False
        for tracker in self.trackers:
            tripped = tracker.failure() or tripped
        return tripped

    def success(self, duration: float | None = None) -> bool:
        tripped = False
        for tracker in self.trackers:
            tripped = tracker.success(duration) or tripped
        return tripped

    def reset(self) -> None:
        for tracker in self.trackers:
            tracker.reset()

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for tracker in self.trackers:
            out.update(tracker.figures())
        return out


@dataclass(frozen=True)
class AnyOf(Trip):
    """Down when any of ``rules`` says so (made by ``rule | rule``)."""

    rules: tuple[Trip, ...]

    def __post_init__(self) -> None:
        if not self.rules or not all(isinstance(rule, Trip) for rule in self.rules):
            raise ConfigurationError(f"AnyOf needs trip rules; got {self.rules!r}")

    def tracker(self, clock: Clock) -> TripTracker:
        """Each rule's tracker, fed the same outcomes."""
        return _AnyTracker(tuple(rule.tracker(clock) for rule in self.rules))

    def describe(self) -> str:
        """Each rule's words, joined by "or"."""
        return " or ".join(rule.describe() for rule in self.rules)
