"""How a dependency that is down comes back: the :class:`Probe` recovery policy.

One frozen value, validated when it is made: how often the background check
runs while the dependency is down, how long each run may take, how many
passes in a row close it, and how a dependency that flaps is held down longer
before its first probe. :mod:`degrade.policies` re-exports it beside the trip
rules, so it is imported from there as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import _validate
from .exceptions import ConfigurationError

__all__ = ["Probe"]


@dataclass(frozen=True)
class Probe:
    """How a dependency that is down comes back: a jittered, bounded background check, damped when it flaps.

    While down, one probe per dependency starts its check every ``interval``
    seconds (times ``1 +/- jitter``, start to start: a run that took longer is
    followed by the next at once), each run bounded by ``timeout``; after
    ``successes`` successful probes in a row it moves back to ``ok``, so a
    single outage recovers at most about ``max(interval, timeout)`` plus one
    check after the service is back (0.8 s + a check by default). A
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
