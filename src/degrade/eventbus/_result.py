"""What ``publish()`` returns and what ``EventPublisher.stats`` shows: small immutable values.

``stats`` stays a property that builds a frozen :class:`PublisherStats` on
each read, as :attr:`degrade.testing.FaultProxy.stats` does: a snapshot that
later publishes do not change, so a test can keep one and compare. (The
cache's and the limiter's ``stats`` are live counters instead; turning this
one into a method would break every ``bus.stats.dropped`` in users' code.)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PublishResult", "PublisherStats"]


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
