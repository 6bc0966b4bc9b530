"""What ``publish()`` returns and what ``EventPublisher.stats()`` shows: small immutable values.

``bus.stats()`` returns a frozen :class:`PublisherStats` made on each call: a
snapshot that later publishes do not change, so a test can keep one and
compare. That is the library's one stats shape: ``limiter.stats()`` returns a
frozen ``LimiterStats``, ``cache.stats()`` a frozen ``CacheStats`` (both were
live counters before 0.2.0) and ``proxy.stats()`` a frozen ``ProxyStats``.

Before 0.2.0 ``bus.stats`` was a property returning the snapshot itself, so
``bus.stats.dropped`` was the spelling. :class:`StatsView` keeps it working
for one minor version, with a ``DeprecationWarning`` naming
``EventPublisher.stats().dropped``: the property returns a view that is called
for a fresh snapshot, and that also holds the snapshot made when the property
was read, which is what a field read off it returns.

Rejected: one long-lived view reading the live counters, as the limiter's and
the cache's do (their old spelling *was* the live counters). The publisher's
old spelling was a snapshot (as the proxy's, whose view works the same way),
kept and compared (``before = bus.stats`` ... ``bus.stats.confirmed -
before.confirmed``); a live view would have made that difference silently
always 0. A view made on each read costs one more snapshot per
``bus.stats()``: 5.9 us a call against 2.3 us for one snapshot (measured here
with ``timeit``); never on the request path.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PublishResult", "PublisherStats", "StatsView"]


class PublishResult(enum.Enum):
    """What ``publish()`` did with the event."""

    #: In the in-process buffer; the sender publishes it with a confirm.
    QUEUED = "queued"
    #: Lost: degraded mode or a full buffer without a spool. Counted, logged and reported.
    DROPPED = "dropped"
    #: Written to the DiskSpool; replayed once the broker is back.
    SPOOLED = "spooled"


@dataclass(frozen=True)
class PublisherStats:
    """A snapshot of an :class:`EventPublisher`'s counters (since it was created).

    ``bus.stats()`` makes one on each call; later publishes do not change it.

    Attributes:
        queued: ``publish()`` calls that returned ``QUEUED``.
        confirmed: Events the broker confirmed (including replayed ones).
        spooled: Events written to the spool.
        replayed: Events from the spool the broker confirmed.
        resent: Events sent again after a connection loss (the broker may
            have had them already: duplicates are possible).
        dropped: Events lost, all reasons.
        dropped_by_reason: Lost events by reason (``degraded``, ``buffer_full``,
            ``shutdown``, ``spool_full``, ``spool_error``, ``dependency_down``,
            ``unroutable``, ``nacked``, ``unencodable``).
        buffered: Events waiting in the buffer now.
        in_flight: Events sent and waiting for their confirm now.
        connected: The sender has a connection now.
        degraded: Degraded mode now.
        unsent: ``publish()`` calls queued while the publisher was not started
            (its lifespan never ran): nothing sends them unless ``start()``
            runs later. Also in ``queued``; a counter, not lowered by a late
            ``start()``.
    """

    queued: int
    confirmed: int
    spooled: int
    replayed: int
    resent: int
    dropped: int
    dropped_by_reason: Mapping[str, int]
    buffered: int
    in_flight: int
    connected: bool
    degraded: bool
    unsent: int = 0


_FIELDS = frozenset(f.name for f in dataclasses.fields(PublisherStats))


def _deprecated(name: str) -> None:
    warnings.warn(
        f"EventPublisher.stats.{name} is deprecated; use EventPublisher.stats().{name} "
        "(EventPublisher.stats() returns a frozen PublisherStats snapshot)",
        DeprecationWarning,
        stacklevel=3,
    )


class StatsView:
    """What ``bus.stats`` is: call it for a :class:`PublisherStats` snapshot.

    A field read off it (``bus.stats.dropped``, the spelling before 0.2.0)
    still works for one minor version with a ``DeprecationWarning`` naming
    ``EventPublisher.stats().dropped``; it returns the field of the snapshot
    made when ``bus.stats`` was read, as before (a view kept in a variable
    does not change). Setting a field raises ``FrozenInstanceError``, as it did.

    Failure mode: none; an unknown attribute raises ``AttributeError``.
    """

    __slots__ = ("_kept", "_read")
    _read: Callable[[], PublisherStats]
    _kept: PublisherStats

    def __init__(self, read: Callable[[], PublisherStats]) -> None:
        object.__setattr__(self, "_read", read)
        object.__setattr__(self, "_kept", read())

    def __call__(self) -> PublisherStats:
        return self._read()

    def __getattr__(self, name: str) -> Any:
        if name not in _FIELDS:
            raise AttributeError(
                f"EventPublisher.stats has no attribute {name!r}; call it: EventPublisher.stats()"
            )
        _deprecated(name)
        return getattr(self._kept, name)

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FIELDS:
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: EventPublisher.stats() is a frozen snapshot"
            )
        raise AttributeError(f"EventPublisher.stats has no attribute {name!r}")

    def __repr__(self) -> str:
        return repr(self._kept)
