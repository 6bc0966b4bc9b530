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
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _validate
from .exceptions import ConfigurationError

__all__ = ["Consecutive", "Probe", "Trip", "TripTracker"]

Clock = Callable[[], float]


class TripTracker(abc.ABC):
    """One dependency's running state of a trip rule (made by :meth:`Trip.tracker`)."""

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


@dataclass(frozen=True)
class Probe:
    """How a dependency that is down comes back: a jittered, bounded background check, damped when it flaps.

    While down, one probe per dependency runs its check every ``interval``
    seconds (times ``1 +/- jitter``), each run bounded by ``timeout``; after
    ``successes`` successful probes in a row it moves back to ``ok``, so a
    single outage recovers about one interval after the service is back. A
    dependency without a check (or used where no event loop runs a probe)
    lets one real call through per interval instead (recovery by trial).

    Flapping is damped, as Envoy's outlier detection ejects a host for
    ``base time x consecutive ejections``: a dependency that goes down again
    within ``flap_window`` seconds of recovering is held down longer before
    its first probe, ``interval x backoff ** flaps`` (``flaps`` counts such
    quick relapses in a row), at most ``max_hold`` seconds. A stable period of
    ``flap_window`` without a relapse resets the count. The first outage is
    never damped.

    Failure mode: none of its own; a check that raises or outlives
    ``timeout`` means "still down".

    Args:
        interval: Seconds between probes while down (> 0).
        timeout: Bound of one check run, in seconds (> 0; under a Kubernetes
            probe's 1 s by default).
        jitter: Relative jitter of the interval, in [0, 1).
        successes: Successful probes in a row that close it (>= 1).
        backoff: Factor of the hold per flap (>= 1; 1 turns damping off).
        max_hold: Longest hold before the first probe, in seconds.
        flap_window: A relapse within this many seconds of a recovery is a flap.
    """

    interval: float = 0.5
    timeout: float = 0.8
    jitter: float = 0.1
    successes: int = 1
    backoff: float = 2.0
    max_hold: float = 30.0
    flap_window: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "interval", _validate.seconds("interval", self.interval))
        object.__setattr__(self, "timeout", _validate.seconds("timeout", self.timeout))
        jitter = _validate.seconds("jitter", self.jitter, allow_zero=True)
        if jitter >= 1:
            raise ConfigurationError(f"jitter must be in [0, 1); got {self.jitter!r}")
        object.__setattr__(self, "jitter", jitter)
        _validate.count("successes", self.successes)
        backoff = _validate.seconds("backoff", self.backoff)
        if backoff < 1:
            raise ConfigurationError(f"backoff must be >= 1 (1 turns damping off); got {self.backoff!r}")
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_hold", _validate.seconds("max_hold", self.max_hold))
        object.__setattr__(self, "flap_window", _validate.seconds("flap_window", self.flap_window))

    def next_wait(self, rng: Callable[[], float]) -> float:
        """The next wait: ``interval`` jittered by ``+/- jitter`` (``rng`` gives floats in [0, 1))."""
        return self.interval * (1.0 + self.jitter * (2.0 * rng() - 1.0))

    def hold(self, flaps: int) -> float:
        """Seconds to stay down before the first probe after ``flaps`` quick relapses in a row."""
        if flaps <= 0:
            return 0.0
        return float(min(self.interval * self.backoff**flaps, self.max_hold))

    def describe(self, has_check: bool) -> str:
        """The recovery in words, for the runbook."""
        if has_check:
            text = f"a background check every {self.interval:g} s (each bounded by {self.timeout:g} s)"
            if self.successes > 1:
                text += f", {self.successes} successes in a row"
        else:
            text = f"one trial call every {self.interval:g} s (no check configured)"
        if self.backoff > 1:
            text += (
                f"; a relapse within {self.flap_window:g} s of recovering holds it down "
                f"{self.backoff:g}x longer each time (at most {self.max_hold:g} s)"
            )
        return text
