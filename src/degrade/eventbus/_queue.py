"""The events between ``publish()`` and the broker's confirm: buffer, spool replay, in flight.

Pure Python and asyncio, no aio-pika: the sender takes events from here and
settles them here, and the unit tests drive it without a broker.

* **buffer**: events ``publish()`` accepted, oldest first. Bounded by the
  publisher (``buffer_size`` counts the buffer plus what is in flight).
* **replay**: a batch read from the :class:`~degrade.eventbus.DiskSpool`. The
  spool's backlog is older than anything in the buffer, so it goes first.
* **in flight**: sent, waiting for the confirm, keyed by ``seq`` (insertion
  order is send order, so the first is the oldest: the confirm watchdog reads
  only that one).

Workers that find nothing to send wait on a future each; ``put()`` wakes one,
and a worker that takes an event while more wait wakes the next.
"""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections import deque
from collections.abc import Callable

from ..observe import logger
from ._event import Batch, Event
from ._report import Counts, Reporter
from .spool import DiskSpool

__all__ = ["SendQueue"]


class SendQueue:
    """Buffered, replayed and in-flight events of one publisher, in the order they must leave.

    Failure mode: a spool that cannot be read stops the replay until the next
    connection (``eventbus.spool_read_failed``, error); a failed commit means
    the batch is replayed again after a restart (duplicates, never loss).
    Nothing here waits on I/O except :meth:`wait_for_work`, which a worker's
    cancellation ends.
    """

    def __init__(
        self,
        *,
        size: int,
        counts: Counts,
        reporter: Reporter,
        spool: DiskSpool | None = None,
        replay_batch: int = 256,
    ) -> None:
        #: Most events held: waiting plus in flight.
        self.size = size
        self.counts = counts
        self.reporter = reporter
        self.spool = spool
        self.replay_batch = replay_batch
        self.buffer: deque[Event] = deque()
        self.replay: deque[Event] = deque()
        self.in_flight: dict[int, Event] = {}
        self.idle: deque[asyncio.Future[None]] = deque()
        self.next_seq: Callable[[], int] = itertools.count(1).__next__
        #: The spool is open and takes writes (the publisher opens it at start).
        self.spool_open = False
        #: Replay allowed now (the spool is open; a read error stops it until the next connection).
        self.replay_ok = False
        #: A confirm arrived on the current connection.
        self.confirmed_here = False
        #: Set by ``close()``: resolved once nothing of ours is pending.
        self.drained: asyncio.Event | None = None
        self._batch: Batch | None = None

    # -- the request path ------------------------------------------------------

    def full(self) -> bool:
        """No room for another event (the buffer plus what is in flight reached ``size``)."""
        return len(self.buffer) + len(self.in_flight) >= self.size

    def put(self, event: Event) -> None:
        """Append one event and wake an idle worker."""
        self.buffer.append(event)
        if self.idle:
            self.wake_one()

    def wake_one(self) -> None:
        """Wake one idle worker, if any waits."""
        idle = self.idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def take_buffered(self) -> list[Event]:
        """Empty the buffer and return what it held (degraded mode, shutdown)."""
        events = list(self.buffer)
        self.buffer.clear()
        return events

    # -- the sender's side -------------------------------------------------------

    def take(self) -> Event | None:
        """The next event to send: the spool's backlog first (older), then the buffer."""
        if self.replay:
            event = self.replay.popleft()
        elif self._batch is None and self.replay_ok and self.spool is not None and self.spool.has_unread():
            try:
                batch = self.spool.read(self.replay_batch, self.next_seq)
            except (OSError, ValueError, struct.error) as exc:  # unreadable: replay stops until reconnect
                self.replay_ok = False
                logger.error(
                    "eventbus.spool_read_failed", exchange=self.counts.exchange, error=type(exc).__name__
                )
                batch = []
            if batch:
                self._batch = batch[0].batch
                self.replay.extend(batch)
                event = self.replay.popleft()
            elif self.buffer:
                event = self.buffer.popleft()
            else:
                return None
        elif self.buffer:
            event = self.buffer.popleft()
        else:
            return None
        if self.idle and (self.replay or self.buffer):
            self.wake_one()  # more to send: let another worker take it
        return event

    async def wait_for_work(self) -> None:
        """Wait until :meth:`put` (or :meth:`take` finding more) wakes this worker."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.idle.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    def begin(self, event: Event, now: float) -> None:
        """``event`` is being sent now: number it on its first send and count it in flight."""
        if not event.seq:  # first send of a buffered event: taken in FIFO order, numbered so
            event.seq = self.next_seq()
        event.sent_at = now
        self.in_flight[event.seq] = event
        if event.resend:
            self.counts.resent += 1

    def oldest_sent_at(self) -> float | None:
        """When the oldest unconfirmed event was sent (None: nothing in flight)."""
        for event in self.in_flight.values():  # insertion order: the first is the oldest
            return event.sent_at
        return None

    def settle(self, event: Event, lost: str | None) -> None:
        """One event is done: confirmed (``lost`` None) or lost for the given reason."""
        self.in_flight.pop(event.seq, None)
        if lost is None:
            self.counts.confirmed += 1
            self.confirmed_here = True
            if event.batch is not None:
                self.counts.replayed += 1
        else:
            self.reporter.dropped(event, lost)
        batch = event.batch
        if batch is not None:
            batch.left -= 1
            if batch.left <= 0 and batch is self._batch:
                self._batch = None
                self._commit(batch.end)
        if self.drained is not None and not self.own_pending():
            self.drained.set()

    def _commit(self, position: tuple[int, int]) -> None:
        if self.spool is None:
            return
        try:
            self.spool.commit(position)
        except OSError as exc:
            # The batch will be replayed again after a restart: duplicates, not loss.
            logger.error(
                "eventbus.spool_commit_failed", exchange=self.counts.exchange, error=type(exc).__name__
            )

    def requeue_in_flight(self) -> None:
        """Put unconfirmed events back at the front of the buffer, in order.

        Events replayed from the spool are let go instead: the spool still has
        them (its cursor did not move) and reads them again.
        """
        events = sorted(self.in_flight.values(), key=lambda e: e.seq)
        self.in_flight.clear()
        own = [e for e in events if e.batch is None]
        for event in own:
            event.resend = True
        self.buffer.extendleft(reversed(own))
        self.replay.clear()
        self._batch = None
        if self.spool is not None and self.spool.is_open:
            self.spool.rewind()

    def own_pending(self) -> bool:
        """Events of this process not yet confirmed (the spool's backlog is not ours to flush)."""
        return bool(self.buffer) or any(e.batch is None for e in self.in_flight.values())
