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

from collections import OrderedDict
from typing import Any, Literal, NamedTuple

from . import _metrics, _validate
from ._rates import ACCEPTED_FORMS, MAX_CAPACITY_US, MAX_LIMITS, Rate, Rates, parse_rate, parse_rates

__all__ = [
    "ACCEPTED_FORMS",
    "MAX_CAPACITY_US",
    "MAX_LIMITS",
    "Decision",
    "MemoryStore",
    "Rate",
    "Rates",
    "Source",
    "parse_rate",
    "parse_rates",
]

Source = Literal["redis", "memory", "deny", "allow"]


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
        per_limit: For several limits (``"5/minute;100/hour"``): the decision of
            each, in the order written (each limit's own answer; none is
            consumed unless all allow). The fields above are then those of the
            most restrictive limit: the one that denied with the longest
            ``retry_after``, else the one with the fewest ``remaining``.
            Empty for a single limit.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    source: Source
    per_limit: tuple[Decision, ...] = ()


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

    def hit_all(
        self, keys: list[str], now: int, limits: list[tuple[int, int]], cost: int = 1
    ) -> list[tuple[bool, int, int, int]]:
        """One GCRA step of several limits at once: all consume, or none does.

        ``limits`` holds ``(emission, capacity)`` for each key. Returns one
        ``(allowed, remaining, reset_after_us, retry_after_us)`` per key, each
        limit's own answer, exactly what the Lua script returns for a group.
        """
        tats = self._tats
        steps = []
        ok = True
        for key, (emission, capacity) in zip(keys, limits, strict=True):
            tat = tats.get(key)
            held = now if tat is None or tat < now else tat
            new_tat = held + emission * cost
            ok = ok and new_tat - capacity <= now
            steps.append((held, new_tat))
        out = []
        for key, (emission, capacity), (held, new_tat) in zip(keys, limits, steps, strict=True):
            if ok:
                if tats.pop(key, None) is None:  # pop and set again: LRU order
                    self._make_room(now)
                tats[key] = new_tat
                out.append((True, (capacity - (new_tat - now)) // emission, new_tat - now, 0))
                continue
            remaining = max(0, (capacity - (held - now)) // emission)
            allow_at = new_tat - capacity
            if allow_at <= now:
                out.append((True, remaining, held - now, 0))
            else:
                out.append((False, remaining, held - now, allow_at - now))
        return out

    def delete(self, key: str) -> bool:
        """Forget ``key``; True when it was kept."""
        return self._tats.pop(key, None) is not None

    def kept(self) -> list[str]:
        """The keys kept now (a copy, least recently updated first)."""
        return list(self._tats)

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
