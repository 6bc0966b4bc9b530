"""GCRA, the rate limiter's algorithm, in process: rates, decisions, a bounded store.

This module needs neither Redis nor Starlette, so the in-memory limiter works
(and is tested) without the ``redis`` extra. :mod:`degrade.ratelimit` runs the
same arithmetic in Redis (a Lua script); both work on integer microseconds so
that, fed the same hits and clock, they give the same decisions.

GCRA (the generic cell rate algorithm) keeps one number per key, the
*theoretical arrival time* ``tat``. With an emission interval ``T = period /
limit`` and a bucket of ``burst`` requests, a hit at ``now`` is allowed when
``max(tat, now) + T * cost - T * burst <= now``; an allowed hit stores the new
``tat``. In any window of one period a key gets fewer than ``limit + burst``
requests, however it times them.
"""

from __future__ import annotations

import functools
import re
from collections import OrderedDict
from typing import Any, Literal, NamedTuple

from . import _metrics, _validate
from .exceptions import ConfigurationError

__all__ = ["Decision", "MemoryStore", "Rate", "Source", "parse_rate"]

Source = Literal["redis", "memory", "deny", "allow"]

#: Accepted rate forms, quoted by every parse error.
ACCEPTED_FORMS = (
    "'N/second', 'N/minute', 'N/hour' or 'N/day', optionally followed by ';burst=B' "
    "(N and B whole numbers >= 1), e.g. '100/minute' or '100/minute;burst=20'"
)

_PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE_RE = re.compile(
    r"\s*(\d{1,10})\s*/\s*(second|minute|hour|day)\s*(?:;\s*burst\s*=\s*(\d{1,10})\s*)?",
    re.IGNORECASE,
)
_US = 1_000_000
#: Largest bucket, in microseconds: keeps ``now + T * burst`` exact in a Lua double (< 2**53).
MAX_CAPACITY_US = 10**15


class Rate(NamedTuple):
    """A parsed rate: ``limit`` requests per ``period`` seconds, bucket of ``burst``.

    Build one with :func:`parse_rate` or :meth:`Rate.of` (or pass the string
    wherever a rate is taken). ``burst`` defaults to ``limit``: a fresh client
    may send ``limit`` requests at once, then one every ``period / limit`` seconds.

    Failure mode: out-of-range numbers raise ``ValueError`` when the rate is
    built, never when it is used.
    """

    limit: int
    period: int
    burst: int
    #: Emission interval ``T`` in microseconds (rounded up, so never faster than the rate).
    emission_us: int
    #: ``T * burst``: how far ahead of now the theoretical arrival time may run.
    capacity_us: int
    #: The canonical text, e.g. ``"100/minute;burst=20"``.
    text: str

    @classmethod
    def of(cls, limit: int, period: int, burst: int | None = None) -> Rate:
        """Build a rate from numbers; raises ``ValueError`` when out of range."""
        for label, value in (("limit", limit), ("period", period), ("burst", burst)):
            if value is None:
                continue
            _validate.count(f"rate {label}", value)
        burst = limit if burst is None else burst
        emission = -(-period * _US // limit)  # ceil
        capacity = emission * burst
        if capacity > MAX_CAPACITY_US:
            raise ConfigurationError(
                f"rate {limit}/{period}s with burst {burst} holds a client back for more than "
                f"{MAX_CAPACITY_US // _US // 86400} days; use a smaller burst or a shorter period"
            )
        unit = {v: k for k, v in _PERIODS.items()}.get(period)
        base = f"{limit}/{unit}" if unit else f"{limit}/{period}s"
        text = base if burst == limit else f"{base};burst={burst}"
        return cls(limit, period, burst, emission, capacity, text)

    def per_pod(self, pods: int) -> Rate:
        """This rate split across ``pods`` processes (each gets ``limit // pods``, at least 1)."""
        if pods == 1:
            return self
        return Rate.of(max(1, self.limit // pods), self.period, max(1, self.burst // pods))

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=512)
def _parse(text: str) -> Rate:
    match = _RATE_RE.fullmatch(text)
    if match is None:
        raise ConfigurationError(f"invalid rate {text[:80]!r}: expected {ACCEPTED_FORMS}")
    limit, unit, burst = match.groups()
    try:
        return Rate.of(int(limit), _PERIODS[unit.lower()], None if burst is None else int(burst))
    except ConfigurationError as exc:
        raise ConfigurationError(f"invalid rate {text[:80]!r} ({exc}): expected {ACCEPTED_FORMS}") from None


def parse_rate(rate: str | Rate) -> Rate:
    """Parse ``"N/second|minute|hour|day[;burst=B]"`` (cached); a :class:`Rate` passes through.

    Raises:
        ValueError: (a :class:`~degrade.ConfigurationError`) naming the accepted forms.
    """
    if isinstance(rate, Rate):
        return rate
    if not isinstance(rate, str):
        raise ConfigurationError(f"a rate is a string ({ACCEPTED_FORMS}); got {type(rate).__name__}")
    return _parse(rate)


class Decision(NamedTuple):
    """The answer to one hit.

    Attributes:
        allowed: True when the request may proceed.
        limit: Requests per period of the rate applied (the per-pod share when
            ``source`` is ``"memory"`` on a limiter with ``pods > 1``).
        remaining: Requests the key may still send right now.
        reset_after: Seconds until the key's bucket is full again.
        retry_after: Seconds until the next request would be allowed (0 when allowed).
        source: ``"redis"``, ``"memory"``, or the outage policy that answered
            (``"deny"`` or ``"allow"``).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    source: Source


class _Inc:
    def inc(self, amount: float = 1) -> None:
        """Count nothing (prometheus_client is not installed)."""


#: From the metric registry (degrade._metrics); a no-op without prometheus_client.
_EVICTIONS: Any = _metrics.prometheus_metric("degrade_ratelimit_evictions_total") or _Inc()


class MemoryStore:
    """The in-process GCRA state: one theoretical arrival time per key, bounded.

    At most ``max_keys`` keys are kept, least recently updated first out. A key
    whose time has passed is expired (forgetting it changes no decision); one
    still active is *evicted*, which hands that client a fresh bucket, so
    evictions are counted (``evictions`` and the Prometheus counter
    ``degrade_ratelimit_evictions_total``). Each new key also drops up to two
    expired keys, so idle keys do not linger.

    Failure mode: none; it never raises on a hit and never grows past ``max_keys``.
    """

    __slots__ = ("_tats", "evictions", "expired", "max_keys")

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = _validate.count("max_keys", max_keys)
        #: Active keys evicted because the store was full.
        self.evictions = 0
        #: Expired keys dropped.
        self.expired = 0
        self._tats: OrderedDict[str, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tats)

    def hit(
        self, key: str, now: int, emission: int, capacity: int, cost: int = 1
    ) -> tuple[bool, int, int, int]:
        """One GCRA step at ``now`` (microseconds).

        Returns ``(allowed, remaining, reset_after_us, retry_after_us)``, exactly
        what the Lua script in :mod:`degrade.ratelimit` returns.
        """
        tats = self._tats
        tat = tats.pop(key, None)  # pop and set again: moves the key to the end (LRU order)
        if tat is None:
            tat = now
            self._make_room(now)
        elif tat < now:
            tat = now
        new_tat = tat + emission * cost
        allow_at = new_tat - capacity
        if allow_at <= now:
            tats[key] = new_tat
            return True, (capacity - (new_tat - now)) // emission, new_tat - now, 0
        if tat > now:
            tats[key] = tat  # unchanged (an expired key denied by cost > burst is simply dropped)
        remaining = (capacity - (tat - now)) // emission
        return False, remaining if remaining > 0 else 0, tat - now, allow_at - now

    def warm(self, key: str, now: int, ahead: int) -> None:
        """Set a key's time to ``now + ahead`` (keeps the store close to Redis while it is up)."""
        tats = self._tats
        if key in tats:
            tats.move_to_end(key)
        elif ahead <= 0:
            return
        else:
            self._make_room(now)
        tats[key] = now + ahead

    def _make_room(self, now: int) -> None:
        tats = self._tats
        for _ in range(2):  # a new key sweeps up to two expired ones
            if not tats:
                return
            oldest = next(iter(tats.values()))
            if oldest > now:
                break
            tats.popitem(last=False)
            self.expired += 1
        if len(tats) >= self.max_keys:
            _, tat = tats.popitem(last=False)
            if tat > now:
                self.evictions += 1
                _EVICTIONS.inc()
            else:
                self.expired += 1

    def clear(self) -> None:
        """Forget every key."""
        self._tats.clear()
