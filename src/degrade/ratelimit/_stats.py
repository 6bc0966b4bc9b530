"""What a limiter counts, and where the counts go: ``stats()``, Prometheus, OpenTelemetry.

The limiter counts on a private live :class:`Counts` (plain ints, incremented
in place on the request path: nothing else per decision).
``limiter.stats()`` copies them into a frozen :class:`LimiterStats`, the
library's one stats shape (as :class:`~degrade.eventbus.PublisherStats` and
:class:`~degrade.testing.ProxyStats`): a snapshot later decisions do not
change, so a test can keep one and compare.

Before 0.2.0 ``limiter.stats`` was the live counters themselves.
:class:`StatsView` keeps that spelling working for one minor version:
``limiter.stats.redis`` reads (and ``limiter.stats.batches = 0`` sets) the
live counter with a ``DeprecationWarning`` naming ``limiter.stats().redis``.

Prometheus gets two counters of the metric registry (:mod:`degrade._metrics`):
decisions shed for ``max_pending``, unexpected errors by class; OpenTelemetry reads the live counts of every
limiter at collection (``degrade.ratelimit.decisions``), never per decision.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .. import _metrics
from ..observe import otel_observable

__all__ = ["ERRORS", "OVERFLOW", "Counts", "LimiterStats", "StatsView", "track"]


# Defined in the metric registry (degrade._metrics); None without prometheus_client.
OVERFLOW = _metrics.prometheus_metric("degrade_ratelimit_overflow_total")
ERRORS = _metrics.prometheus_metric("degrade_ratelimit_errors_total")


@dataclass(frozen=True)
class LimiterStats:
    """A snapshot of a :class:`~degrade.ratelimit.RateLimiter`'s counters (since it was created).

    ``limiter.stats()`` makes one on each call; later decisions do not change it.

    Attributes:
        redis: Decisions answered by Redis.
        batches: ``EVALSHA`` round trips (each carries one or more decisions).
        fallback: Decisions answered by the outage policy (Redis down, failing or too slow).
        overflow: Decisions that did not wait for Redis because too many were already waiting.
        shed: Decisions answered without Redis for lack of *local* capacity
            (``max_pending`` overflow, the client's pool exhausted, an event loop
            too late to read a reply that had arrived): saturation, never counted
            as a failure of Redis.
        cut_short: Decisions in flight answered by the outage policy the moment Redis went down.
        errors: Unexpected errors (not outages) on the Redis path.
        noscript: Scripts reloaded after NOSCRIPT (a Redis restart, failover or SCRIPT FLUSH).
        discarded_idle: Kept connections found reset while idle (an outage or a
            Redis restart cut them) and dropped before use: not failures.
    """

    redis: int = 0
    batches: int = 0
    fallback: int = 0
    overflow: int = 0
    shed: int = 0
    cut_short: int = 0
    errors: int = 0
    noscript: int = 0
    discarded_idle: int = 0


class Counts:
    """The live counters of one limiter (the fields of :class:`LimiterStats`, counted in place)."""

    __slots__ = (
        "batches",
        "cut_short",
        "discarded_idle",
        "errors",
        "fallback",
        "noscript",
        "overflow",
        "redis",
        "shed",
    )

    def __init__(self) -> None:
        self.redis = 0
        self.batches = 0
        self.fallback = 0
        self.overflow = 0
        self.shed = 0
        self.cut_short = 0
        self.errors = 0
        self.noscript = 0
        self.discarded_idle = 0

    def snapshot(self) -> LimiterStats:
        """The counters now, frozen."""
        return LimiterStats(
            redis=self.redis,
            batches=self.batches,
            fallback=self.fallback,
            overflow=self.overflow,
            shed=self.shed,
            cut_short=self.cut_short,
            errors=self.errors,
            noscript=self.noscript,
            discarded_idle=self.discarded_idle,
        )


_COUNTERS = frozenset(Counts.__slots__)


def _deprecated(message: str) -> None:
    warnings.warn(message, DeprecationWarning, stacklevel=3)


class StatsView:
    """What ``limiter.stats`` is: call it for a :class:`LimiterStats` snapshot.

    Reading a counter off it (``limiter.stats.redis``, the spelling before
    0.2.0) still returns the live value, and setting one still sets it, for one
    minor version, with a ``DeprecationWarning`` naming ``limiter.stats().redis``.
    """

    __slots__ = ("_counts",)

    def __init__(self, counts: Counts) -> None:
        self._counts = counts

    def __call__(self) -> LimiterStats:
        return self._counts.snapshot()

    def __getattr__(self, name: str) -> int:
        if name not in _COUNTERS:
            raise AttributeError(f"limiter.stats has no attribute {name!r}; call it: limiter.stats()")
        _deprecated(
            f"limiter.stats.{name} is deprecated; use limiter.stats().{name} "
            "(limiter.stats() returns a frozen LimiterStats snapshot)"
        )
        value: int = getattr(self._counts, name)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _COUNTERS:
            object.__setattr__(self, name, value)
            return
        _deprecated(
            f"setting limiter.stats.{name} is deprecated; compare two limiter.stats() snapshots "
            f"instead (limiter.stats().{name} is read-only)"
        )
        setattr(self._counts, name, value)

    def __repr__(self) -> str:
        return repr(self())


class _Counted(Protocol):
    prefix: str
    _counts: Counts


#: Live limiters, read by the OpenTelemetry instrument at collection (never per decision).
_LIVE: weakref.WeakSet[_Counted] = weakref.WeakSet()
_OTEL_REGISTERED = False


def _otel_decisions() -> Iterable[tuple[float, Mapping[str, str]]]:
    totals: dict[tuple[str, str], float] = {}
    for limiter in list(_LIVE):
        stats = limiter._counts
        for source, value in (("redis", stats.redis), ("fallback", stats.fallback), ("shed", stats.shed)):
            key = (limiter.prefix, source)
            totals[key] = totals.get(key, 0.0) + value
    prefix_, source_ = "degrade.ratelimit.prefix", "degrade.ratelimit.source"
    return [(v, {prefix_: p, source_: src}) for (p, src), v in totals.items()]


def track(limiter: _Counted) -> None:
    """Count ``limiter`` in ``degrade.ratelimit.decisions`` (held weakly)."""
    global _OTEL_REGISTERED  # noqa: PLW0603 - registered once per process, at the first limiter
    _LIVE.add(limiter)
    if not _OTEL_REGISTERED:
        _OTEL_REGISTERED = True
        spec = _metrics.instrument("degrade.ratelimit.decisions")
        otel_observable(spec.name, spec.description, _otel_decisions, unit=spec.unit)
