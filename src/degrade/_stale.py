"""The stale-if-error tier of :class:`~degrade.cache.FailSoftCache`: recent values kept in memory.

Without it a Redis outage turns every cache read into a loader call, so the
database takes the whole read load at the worst moment. With
``FailSoftCache(..., stale=StaleTier(max_bytes=..., stale_for=...))`` the cache
remembers, in process, the serialized value of every key it saw in Redis (a
hit, or a write Redis confirmed), and while Redis is down or a read fails it
answers from that copy, if the copy is at most ``stale_for`` seconds old,
marked ``source="stale"`` in :meth:`~degrade.cache.FailSoftCache.get_entry`.

Design decisions:

* **The serialized bytes are kept, not the decoded value.** The bound is then
  a real bound: an entry is charged the length of its serialized value and of
  its key plus :data:`ENTRY_BYTES` (300), the rest of what it holds in memory
  (measured with ``tracemalloc``: 293 bytes per entry for the object headers
  of the bytes and the key, the ordered-dict node, the tuple, the timestamp
  and the size). A ``str`` value (a client with ``decode_responses=True``) is
  charged ``sys.getsizeof``, its true size. And every stale answer is a fresh
  object, as a Redis hit is: no caller can mutate what another caller is
  served. Decoding is paid only on a stale answer, i.e. during an outage.
  Rejected: keeping decoded objects (no honest size, shared mutable values);
  ``sys.getsizeof`` for every value (about 300 ns more per read, measured).
* **Only what Redis holds is remembered.** A hit refreshes the entry (its
  ``stale_for`` window restarts: Redis vouched for it just now); a write Redis
  confirmed stores it; a loaded value whose write was skipped (Redis failing)
  drops the older local copy instead (it is superseded and Redis does not have
  the new one). Rejected: remembering values loaded during an outage, which
  would make the tier a second cache with its own, unbounded-in-time staleness.
* **LRU under one byte budget.** A hit and a stale answer move the entry to the
  most recent end; storing beyond ``max_bytes`` evicts from the least recent
  end. A value larger than the whole budget is not kept. Each eviction is
  counted (``stats().stale_evicted``).
* **Expiry is checked on use, not by a timer.** An entry older than
  ``stale_for`` when an outage asks for it is dropped (``stale_expired``) and
  the loader answers; old entries that nobody asks for wait for the LRU. No
  background task, no per-read scan.
* **Healthy-path cost**: one clock read, a tuple and an ordered-dict update
  per hit or write, about 0.4 µs of CPU on the project's 2-core machine
  (``bench/bench_cache.py`` measures it; the goal is at most 1 µs per read).

Only this process's :meth:`~degrade.cache.FailSoftCache.invalidate` evicts the
local copy: another process's invalidation is not seen, so during an outage
this process may serve a value up to ``stale_for`` seconds older than the last
time it saw it in Redis. That window is the price of the tier, chosen per cache.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from . import _validate
from .exceptions import ConfigurationError

__all__ = ["ENTRY_BYTES", "Answer", "CacheEntry", "Source", "StaleStore", "StaleTier"]

T = TypeVar("T")

#: Bytes charged per entry on top of the lengths of the serialized value and the key (measured: 293).
ENTRY_BYTES = 300

_sizeof = sys.getsizeof  # bound once (str values only)

#: Where an answer of :meth:`~degrade.cache.FailSoftCache.get_entry` came from.
Source = Literal["hit", "miss", "unavailable", "stale"]

#: What a cache read produces inside the cache (and shares with coalesced callers):
#: ``(value, source, age)``; a tuple, so the healthy path builds no object.
Answer = tuple[T, Source, float | None]


@dataclass(frozen=True, slots=True)
class CacheEntry(Generic[T]):
    """One answer of :meth:`~degrade.cache.FailSoftCache.get_entry`: the value and where it came from.

    ``source`` is ``"hit"`` (Redis had it), ``"miss"`` (Redis answered without
    it: the loader ran and the value was written), ``"unavailable"`` (Redis down,
    failing or slow: the loader ran, nothing was written) or ``"stale"`` (Redis
    down, failing or slow: answered from the stale tier's copy, ``age`` seconds
    old). Callers that shared another caller's load get that load's answer.

    Failure mode: a plain value; it cannot fail.
    """

    value: T
    source: Source
    #: Seconds since the stale tier stored the value (``source="stale"`` only, else None).
    age: float | None = None

    @property
    def stale(self) -> bool:
        """True when the value came from the stale tier while Redis could not answer."""
        return self.source == "stale"


@dataclass(frozen=True, kw_only=True)
class StaleTier:
    """Settings of a cache's stale-if-error tier: how much memory, and how stale an answer may be.

    Pass one to ``FailSoftCache(..., stale=StaleTier(max_bytes=64 * 2**20, stale_for=300))``.
    Each cache builds its own store from it, so one ``StaleTier`` may configure
    several caches (each gets its own ``max_bytes``).

    Failure mode: FAIL-SOFT, and local only. While Redis is down or a read
    fails, a key this process saw in Redis within the last ``stale_for``
    seconds is answered from memory (marked stale, counted in
    ``stats().stale``); any other key goes to the loader as without the tier.
    The tier never calls Redis and never fails a read: beyond ``max_bytes`` the
    least recently used entries are evicted and counted.

    Args:
        max_bytes: Memory budget of the tier, in bytes: each entry costs the
            length of its serialized value and of its key plus 300 bytes.
        stale_for: Longest time, in seconds, a value is served after this
            process last saw it in Redis.
        clock: Monotonic clock (tests inject a fake one).
    """

    max_bytes: int
    stale_for: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def runbook_note(self) -> str:
        """What the tier adds to the cache's read site in the runbook."""
        return f", except keys seen in Redis in the last {self.stale_for:g}s: served stale from memory"

    def __post_init__(self) -> None:
        _validate.count("max_bytes", self.max_bytes)
        object.__setattr__(self, "stale_for", _validate.seconds("stale_for", self.stale_for))
        if not callable(self.clock):
            raise ConfigurationError(f"clock must be a callable returning seconds; got {self.clock!r}")


class StaleStore:
    """The live tier of one cache: an LRU of ``key -> (data, stored_at, size)`` under a byte budget."""

    __slots__ = (
        "_clock",
        "_entries",
        "bytes",
        "evicted",
        "expired",
        "invalidated",
        "max_bytes",
        "served",
        "stale_for",
    )

    @classmethod
    def of(cls, tier: StaleTier | None) -> StaleStore | None:
        """The store of ``FailSoftCache(..., stale=tier)``: None for None; anything else is refused."""
        if tier is None:
            return None
        if not isinstance(tier, StaleTier):
            raise ConfigurationError(
                f"stale must be a StaleTier(max_bytes=..., stale_for=...) or None; got {tier!r}"
            )
        return cls(tier)

    def __init__(self, tier: StaleTier) -> None:
        self.max_bytes = tier.max_bytes
        self.stale_for = tier.stale_for
        self._clock = tier.clock
        self._entries: OrderedDict[str, tuple[bytes | str, float, int]] = OrderedDict()
        self.bytes = 0
        self.served = 0
        self.evicted = 0
        self.expired = 0
        self.invalidated = 0

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """The tier's fields of :class:`~degrade.cache.CacheStats`."""
        return {
            "stale": self.served,
            "stale_expired": self.expired,
            "stale_evicted": self.evicted,
            "stale_invalidated": self.invalidated,
            "stale_entries": len(self._entries),
            "stale_bytes": self.bytes,
        }

    def remember(self, key: str, data: bytes | str) -> None:
        """Keep ``data`` (just seen in Redis) as the most recent entry; evict beyond the budget."""
        size = (len(data) if data.__class__ is bytes else _sizeof(data)) + len(key) + ENTRY_BYTES
        entries = self._entries
        if size > self.max_bytes:  # could never fit: not kept, counted; an older copy is superseded
            old = entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            self.evicted += 1
            return
        old = entries.get(key)
        if old is None:
            entries[key] = (data, self._clock(), size)
            self.bytes += size
        else:  # the common hit: replace in place, then make it the most recent
            entries[key] = (data, self._clock(), size)
            entries.move_to_end(key)
            self.bytes += size - old[2]
        while self.bytes > self.max_bytes:
            self.bytes -= entries.popitem(last=False)[1][2]
            self.evicted += 1

    def lookup(self, key: str) -> tuple[bytes | str, float] | None:
        """``(data, age)`` of a copy at most ``stale_for`` old, else None (an expired copy is dropped)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self._clock() - entry[1]
        if age > self.stale_for:
            del self._entries[key]
            self.bytes -= entry[2]
            self.expired += 1
            return None
        self._entries.move_to_end(key)
        return entry[0], age

    def serve(
        self, key: str, loads: Callable[[bytes | str], Any], on_error: Callable[[Exception], None]
    ) -> tuple[Any, float] | None:
        """``(value, age)`` decoded from a copy within ``stale_for``, counted as served; else None.

        A copy ``loads`` cannot read (only a serializer that cannot read its own
        output) is dropped and reported to ``on_error``; the loader answers then.
        """
        found = self.lookup(key)
        if found is None:
            return None
        try:
            value = loads(found[0])
        except Exception as exc:
            on_error(exc)
            self.forget(key)
            return None
        self.served += 1
        return value, found[1]

    def forget(self, key: str) -> None:
        """Drop the copy of ``key`` (invalidated, or superseded by a value Redis did not take)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[2]
            self.invalidated += 1
