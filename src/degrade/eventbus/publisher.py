"""EventPublisher: publish to RabbitMQ without ever making a request wait for it.

FAIL-SOFT: when RabbitMQ is down the API call succeeds and its side effect (the
event) is dropped, counted and reported, or spooled to disk when a
:class:`~degrade.eventbus.DiskSpool` is configured.

How it works:

* ``publish()`` validates and serialises the event, appends it to a bounded
  in-process buffer and returns ``QUEUED`` (microseconds, whatever the broker
  does). It never awaits anything.
* A background sender owns one connection (plain ``aio_pika.connect``, not
  ``connect_robust``) and ``max_in_flight`` worker coroutines on one channel with
  publisher confirms. Each event goes out persistent, ``mandatory``, with a
  message id, timestamp and content type; a returned (unroutable) or nacked
  event is reported, not silently lost.
* Every wait of the sender is bounded: the connect attempt (TCP, handshake,
  channel, exchange declare) by ``connect_timeout``; each confirm by
  ``confirm_timeout``, enforced by one watchdog that cuts the connection when
  the oldest unconfirmed publish passes it (a stalled broker is noticed then,
  not after aiormq's three heartbeats); closing a connection by
  ``DISCONNECT_TIMEOUT``, and at once when the broker stalled (the socket is
  reset, no wait for a ``Close-Ok`` that will not come).
* Losing the broker: the sender reconnects with exponential backoff and jitter
  (tenacity, only on connection errors). Unconfirmed events go back to the
  front of the buffer, in order, and are sent again (duplicates are possible;
  consumers dedupe on the message id).
* ``degrade_after`` seconds without a broker: degraded mode. The dependency
  goes down, buffered and new events are dropped (or spooled) at once. The
  sender keeps trying at the longest backoff; the first connection ends
  degraded mode (``eventbus.recovered``).

aio-pika traps this design avoids (measured with ``bench/bench_eventbus.py
--traps``; numbers in ``docs/eventbus.md``): ``connect()`` without a timeout
hangs for as long as a blackholed broker stays silent; ``connect_robust()``
cancelled from outside leaves its reconnect task and a half-open socket behind;
a robust channel waits for reconnection without bound; a confirm from a stalled
broker never arrives; aiormq notices a dead peer only after ``(heartbeat + 1) *
3`` seconds (183 s at the default 60 s heartbeat), and then fails the pending
confirms with ``CancelledError`` although nobody cancelled the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import enum
import itertools
import random
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import aio_pika
import tenacity
from aiormq.exceptions import AMQPError, DeliveryError
from pamqp import commands as spec
from yarl import URL

from ..dependency import Dependency, Site
from ..exceptions import ConfigurationError
from ..observe import logger, report_to_sentry
from ._event import Batch, Event, check_headers, check_routing_key, encode_payload
from ._report import Counts, Reporter, metrics
from ._retry import CONNECTION_ERRORS, wait_jittered
from ._transport import AbortableConnection
from .spool import DiskSpool

__all__ = ["EventPublisher", "PublishResult", "PublisherStats"]

#: Seconds closing one connection may take (a stalled broker never answers
#: Close; aiormq gives up on it after 2 s by itself).
DISCONNECT_TIMEOUT = 2.5
#: Relative jitter of each backoff wait: a wait is base * (1 - JITTER * U[0, 1)).
JITTER = 0.2
#: ``Site.shed`` reasons: the in-memory buffer, or the spool, had no room (saturation, not an outage).
SHED_BUFFER_FULL = "buffer-full"
SHED_SPOOL_FULL = "spool-full"

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

_UTC = datetime.UTC
_now = time.time

#: What ends a connection's publishing loop (then: reconnect). DeliveryError
#: (a nack) is settled per message and never gets here.
_CONNECTION_ENDERS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, AMQPError)


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


class _ConnectionLost(ConnectionError):
    """The connection or channel closed under the sender."""


def _positive(label: str, value: object, *, allow_zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not value >= 0  # refuses NaN too
        or not (value or allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"{label} must be a number of seconds {bound}; got {value!r}")
    return float(value)


def _count(label: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{label} must be an int >= {minimum}; got {value!r}")
    return value


def _properties(event: Event) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=event.content_type,
        delivery_mode=2,  # persistent
        message_id=event.message_id,
        timestamp=datetime.datetime.fromtimestamp(event.timestamp, _UTC),
        headers=event.headers,
    )


class EventPublisher:
    """Publishes events to a RabbitMQ exchange from a bounded buffer; never blocks the caller.

    FAIL-SOFT. ``publish()`` returns in microseconds whatever the broker does.
    While the broker is unreachable the sender retries with exponential backoff
    and jitter; events wait in the buffer. After ``degrade_after`` seconds the
    publisher degrades: ``dependency`` goes down, and buffered and new events
    are dropped at once (``DROPPED``), or written to ``spool`` (``SPOOLED``).
    Each drop is counted (``stats``, Prometheus ``degrade_eventbus_dropped_total``),
    summarised in a log line every ``log_interval`` seconds and sent to Sentry
    (tags ``eventbus.status=degraded``, ``eventbus.routing_key``; the message id
    as extra), at most ``sentry_rate`` events a second plus one summary of the
    rest. A full buffer drops (or spools) the same way before degraded mode.
    The first successful connection ends degraded mode (``eventbus.recovered``).

    Saturation is not an outage: a full buffer (or a full spool) is local
    capacity, so besides the drop accounting above it is counted as shed on
    the publish site (``site.shed_calls["buffer-full"]`` / ``["spool-full"]``,
    Prometheus ``degrade_shed_total``) and never feeds ``dependency`` a
    failure. Only the broker's own behaviour (connect attempts failing or
    timing out for ``degrade_after``) marks it down.

    Start and stop it with the app: ``registry.manage(bus)`` (the registry's
    lifespan calls ``start()`` / ``aclose()``) or ``async with bus:``.

    Args:
        url: ``amqp://`` or ``amqps://`` URL of the broker. Never logged.
        exchange: Exchange to publish to; declared (durable) on each connect
            unless ``declare_exchange=False``.
        dependency: The broker's :class:`~degrade.Dependency`: marked down in
            degraded mode and up on reconnect. Held down by
            ``simulate_outage(dep)``, it makes ``publish()`` drop (or spool)
            without touching the network.
        degrade_after: Seconds of unreachable broker before degraded mode.
        buffer_size: Most events held in memory (waiting plus in flight).
        spool: A :class:`DiskSpool` that takes what would be dropped.
        exchange_type: Type used to declare the exchange.
        declare_exchange: Declare the exchange on connect.
        heartbeat: AMQP heartbeat in seconds (sets the URL's ``heartbeat``);
            aiormq drops a silent connection after ``(heartbeat + 1) * 3`` s.
        connect_timeout: Bound of one connect attempt (TCP, handshake, channel, declare).
        confirm_timeout: Bound of one publish's confirm; past it the
            connection is taken as stalled and replaced.
        backoff_initial: First reconnect wait; doubles up to ``backoff_max``.
        backoff_max: Longest reconnect wait (also the pace in degraded mode).
        max_in_flight: Most unconfirmed publishes at once.
        replay_batch: Spooled events read (and committed) at a time.
        close_timeout: Default bound of ``close()``'s flush.
        log_interval: Seconds between drop summaries in the log.
        sentry_rate: Most drop events sent to Sentry per second.
        clock, sleep, rng: Injected for tests (monotonic clock, asyncio.sleep, random.random).
    """

    def __init__(
        self,
        url: str,
        exchange: str = "app.events",
        *,
        dependency: Dependency | None = None,
        degrade_after: float = 30.0,
        buffer_size: int = 10_000,
        spool: DiskSpool | None = None,
        exchange_type: str = "topic",
        declare_exchange: bool = True,
        heartbeat: int = 2,
        connect_timeout: float = 5.0,
        confirm_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        max_in_flight: int = 64,
        replay_batch: int = 256,
        close_timeout: float = 2.0,
        log_interval: float = 5.0,
        sentry_rate: int = 10,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(url, str | URL):
            raise ConfigurationError(f"url must be an amqp:// URL string; got {type(url).__name__}")
        parsed = URL(url)
        if parsed.scheme not in {"amqp", "amqps"} or not parsed.host:
            raise ConfigurationError("url must look like amqp://user:password@host:5672/vhost (or amqps://)")
        if not isinstance(exchange, str):
            raise ConfigurationError(f"exchange must be a str; got {type(exchange).__name__}")
        if dependency is not None and not isinstance(dependency, Dependency):
            raise ConfigurationError(
                f"dependency must be a Dependency (from registry.dependency()) or None; got {dependency!r}"
            )
        if spool is not None and not isinstance(spool, DiskSpool):
            raise ConfigurationError(f"spool must be a DiskSpool or None; got {spool!r}")
        heartbeat = _count("heartbeat", heartbeat, minimum=1)
        self.exchange = exchange
        self.dependency = dependency
        self.spool = spool
        self._url = parsed.update_query(heartbeat=str(heartbeat))
        #: ``host:port/vhost`` of the broker, for logs (never the credentials).
        self.broker = f"{parsed.host}:{parsed.explicit_port or 5672}{parsed.path or '/'}"
        self._degrade_after = _positive("degrade_after", degrade_after, allow_zero=True)
        self._buffer_size = _count("buffer_size", buffer_size)
        #: The publish site on ``dependency`` (None without one): where shed events are counted.
        self.site: Site | None = None
        if dependency is not None:
            where = "spooled to disk and replayed" if spool is not None else "dropped, counted and reported"
            self.site = dependency.add_site(
                f"degrade.eventbus.EventPublisher[{exchange}].publish",
                "fail_soft",
                f"publish never waits: events are buffered (up to {self._buffer_size}) while the broker "
                f"is unreachable, then {where} after {self._degrade_after:g}s "
                "(Sentry: tag:eventbus.status=degraded); the request succeeds",
                fallback="buffer, then " + ("spool" if spool is not None else "drop"),
            )
        self._exchange_type = exchange_type
        self._declare = bool(declare_exchange)
        self._connect_timeout = _positive("connect_timeout", connect_timeout)
        self._confirm_timeout = _positive("confirm_timeout", confirm_timeout)
        self._backoff_initial = _positive("backoff_initial", backoff_initial)
        self._backoff_max = _positive("backoff_max", backoff_max)
        if self._backoff_max < self._backoff_initial:
            raise ConfigurationError("backoff_max must be >= backoff_initial")
        self._max_in_flight = _count("max_in_flight", max_in_flight)
        self._replay_batch = _count("replay_batch", replay_batch)
        self._close_timeout = _positive("close_timeout", close_timeout, allow_zero=True)
        _positive("log_interval", log_interval)
        _count("sentry_rate", sentry_rate, minimum=0)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._wait = wait_jittered(
            tenacity.wait_exponential(multiplier=self._backoff_initial, max=self._backoff_max), JITTER, rng
        )

        self._counts = Counts(exchange)
        metrics.track(self._counts)
        self._reporter = Reporter(
            self._counts, log_interval=log_interval, sentry_rate=sentry_rate, clock=clock
        )
        self._seq = itertools.count(1).__next__
        self._buffer: deque[Event] = deque()
        self._replay: deque[Event] = deque()
        self._in_flight: dict[int, Event] = {}
        self._idle: deque[asyncio.Future[None]] = deque()
        self._batch: Batch | None = None
        self._spool_ok = False  # the spool is open and writable
        self._replay_ok = False  # replay allowed on this connection (a read error stops it)

        self._task: asyncio.Task[None] | None = None
        #: What the sender does now: idle, backoff, connecting, pumping, disconnecting.
        self._phase = "idle"
        self._workers: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()
        self._connected = False
        self._connecting = False
        self._closing = False
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None
        self._degraded = False
        self._degraded_at = 0.0
        self._episode_mark = (0, 0)  # (lost, spooled) when degraded mode began
        self._unreachable_since: float | None = None
        self._last_error: BaseException | None = None
        self._degrade_timer: asyncio.TimerHandle | None = None
        self._attempts = 0
        self._churn = 0  # connections in a row that ended before their first confirm
        self._confirmed_here = False
        self._drained: asyncio.Event | None = None  # set by close(): the flush waits on it
        self._abort_on_close = False  # close() gave up on unconfirmed events: cut, do not wait

    # -- reading the state -------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True in degraded mode: every ``publish()`` drops (or spools) at once."""
        return self._degraded

    @property
    def connected(self) -> bool:
        """True while the sender holds a working connection."""
        return self._connected

    @property
    def stats(self) -> PublisherStats:
        """A snapshot of the counters."""
        c = self._counts
        return PublisherStats(
            queued=c.queued,
            confirmed=c.confirmed,
            spooled=c.spooled,
            replayed=c.replayed,
            resent=c.resent,
            dropped=sum(c.lost.values()),
            dropped_by_reason=dict(c.lost),
            buffered=len(self._buffer),
            in_flight=len(self._in_flight),
            connected=self._connected,
            degraded=self._degraded,
        )

    # -- the request path --------------------------------------------------------

    async def publish(
        self,
        routing_key: str,
        payload: Mapping[str, Any] | bytes,
        *,
        message_id: str | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> PublishResult:
        """Queue one event for the broker and return at once; never waits on RabbitMQ.

        FAIL-SOFT: in degraded mode, with a full buffer or after ``close()``
        the event is dropped (``DROPPED``, counted and reported) or, with a
        spool, written to disk (``SPOOLED``).

        Args:
            routing_key: The AMQP routing key (at most 255 UTF-8 bytes).
            payload: A JSON-able mapping (sent as ``application/json``, serialised
                here, once) or bytes (sent as ``application/octet-stream``).
            message_id: Id for idempotent consumers; a UUID4 hex when omitted.
            headers: AMQP headers: str keys, JSON-able values.

        Raises:
            TypeError: a payload that is neither a JSON-able mapping nor bytes,
                or a wrong type of routing key, message id or headers.
            ValueError: a routing key or message id longer than 255 bytes, or an empty message id.
        """
        check_routing_key(routing_key)
        body, content_type = encode_payload(payload)
        if message_id is None:
            pass  # made by the sender when first needed (Event.message_id)
        elif type(message_id) is not str:
            raise TypeError(f"message_id must be a str or None; got {type(message_id).__name__}")
        elif not message_id or (len(message_id) > 63 and len(message_id.encode()) > 255):
            raise ValueError("message_id must be a non-empty string of at most 255 UTF-8 bytes")
        return self._submit(
            Event(
                routing_key,
                body,
                message_id,
                None if headers is None else check_headers(headers),
                content_type,
                _now(),
                0,  # numbered by the sender when it takes the event (one int less held per buffered event)
            )
        )

    def _submit(self, event: Event) -> PublishResult:
        if self._degraded:
            return self._divert(event, "degraded")
        if self._closing:
            return self._divert(event, "shutdown")
        dep = self.dependency
        # Held down in-process (simulate_outage, a drill): behave as degraded.
        if dep is not None and dep.forced:
            return self._divert(event, "dependency_down")
        if len(self._buffer) + len(self._in_flight) >= self._buffer_size:
            # Local capacity, not an outage: shed (counted on the site, no failure fed
            # to the dependency), then spooled or dropped and reported like any drop.
            if self.site is not None:
                self.site.shed(SHED_BUFFER_FULL)
            return self._divert(event, "buffer_full")
        self._buffer.append(event)
        self._counts.queued += 1
        if self._idle:
            self._wake_one()
        return PublishResult.QUEUED

    def _divert(self, event: Event, reason: str) -> PublishResult:
        """Spool the event if a spool can take it; otherwise drop it, counted and reported."""
        if self._spool_ok and self.spool is not None:
            try:
                if self.spool.append(event):
                    self._reporter.spooled_one(event)
                    return PublishResult.SPOOLED
                if reason != "buffer_full" and self.site is not None:
                    self.site.shed(SHED_SPOOL_FULL)  # local capacity (one shed per event)
                reason = "spool_full"
            except OSError as exc:
                reason = "spool_error"
                self._spool_failed(exc)
        self._reporter.dropped(event, reason)
        return PublishResult.DROPPED

    def _spool_failed(self, exc: BaseException) -> None:
        self._spool_ok = False
        logger.error("eventbus.spool_failed", exchange=self.exchange, error=type(exc).__name__)
        report_to_sentry(
            "eventbus: the spool failed; events are dropped instead",
            level="error",
            tags={"eventbus.status": "degraded", "eventbus.exchange": self.exchange},
            fingerprint=["degrade", "eventbus", "spool_failed", self.exchange],
            extras={"error_class": type(exc).__name__},
        )

    # -- the workers' queue ------------------------------------------------------

    def _wake_one(self) -> None:
        idle = self._idle
        while idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _take(self) -> Event | None:
        """The next event to send: the spool's backlog first (older), then the buffer."""
        if self._replay:
            event = self._replay.popleft()
        elif self._batch is None and self._replay_ok and self.spool is not None and self.spool.has_unread():
            try:
                batch = self.spool.read(self._replay_batch, self._seq)
            except (OSError, ValueError, struct.error) as exc:  # unreadable: replay stops until reconnect
                self._replay_ok = False
                logger.error("eventbus.spool_read_failed", exchange=self.exchange, error=type(exc).__name__)
                batch = []
            if batch:
                self._batch = batch[0].batch
                self._replay.extend(batch)
                event = self._replay.popleft()
            elif self._buffer:
                event = self._buffer.popleft()
            else:
                return None
        elif self._buffer:
            event = self._buffer.popleft()
        else:
            return None
        if self._idle and (self._replay or self._buffer):
            self._wake_one()  # more to send: let another worker take it
        return event

    async def _wait_for_work(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    def _settle(self, event: Event, lost: str | None) -> None:
        """One event is done: confirmed (``lost`` None) or lost for the given reason."""
        self._in_flight.pop(event.seq, None)
        if lost is None:
            self._counts.confirmed += 1
            self._confirmed_here = True
            if event.batch is not None:
                self._counts.replayed += 1
        else:
            self._reporter.dropped(event, lost)
        batch = event.batch
        if batch is not None:
            batch.left -= 1
            if batch.left <= 0 and batch is self._batch:
                self._batch = None
                self._commit(batch.end)
        if self._drained is not None and not self._own_pending():
            self._drained.set()

    def _commit(self, position: tuple[int, int]) -> None:
        if self.spool is None:
            return
        try:
            self.spool.commit(position)
        except OSError as exc:
            # The batch will be replayed again after a restart: duplicates, not loss.
            logger.error("eventbus.spool_commit_failed", exchange=self.exchange, error=type(exc).__name__)

    def _requeue_in_flight(self) -> None:
        """Put unconfirmed events back at the front of the buffer, in order.

        Events replayed from the spool are let go instead: the spool still has
        them (its cursor did not move) and reads them again.
        """
        events = sorted(self._in_flight.values(), key=lambda e: e.seq)
        self._in_flight.clear()
        own = [e for e in events if e.batch is None]
        for event in own:
            event.resend = True
        self._buffer.extendleft(reversed(own))
        self._replay.clear()
        self._batch = None
        if self.spool is not None and self.spool.is_open:
            self.spool.rewind()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool and start the sender; returns at once, never waits on the broker.

        Failure mode: a spool that cannot be opened (permissions, another
        process owns it) is logged and reported, and the publisher runs
        without it (events it would have spooled are dropped and reported).
        """
        if self._task is not None or self._closing:
            return
        self._open_spool()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"degrade.eventbus[{self.exchange}]"
        )
        logger.info(
            "eventbus.started",
            exchange=self.exchange,
            broker=self.broker,
            degrade_after_s=self._degrade_after,
            spool=None if self.spool is None else str(self.spool.path),
            spool_backlog_bytes=self.spool.backlog_bytes if self._spool_ok and self.spool else None,
        )

    def _open_spool(self) -> None:
        if self.spool is None or self._spool_ok:
            return
        try:
            self.spool.open()
        except (OSError, ConfigurationError) as exc:
            self._spool_failed(exc)
            return
        self._spool_ok = True

    async def aclose(self) -> None:
        """Stop within ``close_timeout`` plus the disconnect bound (the registry calls this)."""
        await self.close()

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the documented API
        """Flush what the broker takes within ``timeout`` seconds, then stop; no task stays behind.

        Events still buffered or unconfirmed at the bound are spooled when a
        spool is configured, otherwise dropped and reported (reason
        ``shutdown``). ``publish()`` after ``close()`` does the same at once.
        The connection is then closed within ``DISCONNECT_TIMEOUT``.

        Args:
            timeout: Seconds for the flush; ``close_timeout`` by default.
        """
        if self._close_done is not None:  # closed, or closing in another task: wait for that one
            await asyncio.shield(self._close_done)
            return
        budget = self._close_timeout if timeout is None else _positive("timeout", timeout, allow_zero=True)
        loop = asyncio.get_running_loop()
        self._close_done = loop.create_future()
        self._closing = True
        deadline = loop.time() + budget
        leftovers: list[Event] = []
        try:
            if self._own_pending() and (self._connected or self._connecting):
                self._drained = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await self._drained.wait()
            self._abort_on_close = self._own_pending()
            await self._stop_workers()
            leftovers = list(self._buffer)
            self._buffer.clear()
            if leftovers and not self._spool_ok:
                self._open_spool()  # never started: the spool may still take them
            for event in leftovers:
                self._divert(event, "shutdown")
            await self._stop_sender()
            late = list(self._buffer)  # requeued by a connection that ended meanwhile
            self._buffer.clear()
            for event in late:
                self._divert(event, "shutdown")
            leftovers += late
            if self._closers:
                await asyncio.wait(set(self._closers), timeout=DISCONNECT_TIMEOUT + 0.5)
        finally:
            self._closed = True
            self._cancel_degrade_timer()
            self._reporter.close()
            if self.spool is not None:
                self.spool.close()
            self._spool_ok = False
            self._close_done.set_result(None)
        logger.info(
            "eventbus.closed",
            exchange=self.exchange,
            confirmed=self._counts.confirmed,
            dropped=self._reporter.total_lost,
            spooled=self._counts.spooled,
            shutdown_leftovers=len(leftovers),
        )

    def _own_pending(self) -> bool:
        return bool(self._buffer) or any(e.batch is None for e in self._in_flight.values())

    async def _stop_workers(self) -> None:
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.wait(workers, timeout=DISCONNECT_TIMEOUT)
        self._requeue_in_flight()

    async def _stop_sender(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        bound = DISCONNECT_TIMEOUT + 0.5
        done: set[asyncio.Task[None]] = set()
        if self._phase in {"pumping", "disconnecting"}:
            # It is closing its connection (the workers are stopped): let it
            # finish, as cancelling aiormq mid-close leaves its tasks behind.
            done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=bound)
        if not done:
            logger.warning("eventbus.close_timeout", exchange=self.exchange, bound_s=bound)
            return
        error = None if task.cancelled() else task.exception()
        if error is not None:
            logger.error("eventbus.sender_failed", exchange=self.exchange, error=type(error).__name__)

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- the sender --------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            try:
                await self._cycle()
            except Exception as exc:  # not an outage: a set-up error (exchange type clash) or a bug
                self._connected = False
                self._unreachable(exc)
                logger.error(
                    "eventbus.sender_error",
                    exchange=self.exchange,
                    broker=self.broker,
                    error=type(exc).__name__,
                    retry_in_s=self._backoff_max,
                )
                report_to_sentry(
                    f"eventbus: sender error {type(exc).__name__}",
                    level="error",
                    tags={"eventbus.status": "error", "eventbus.exchange": self.exchange},
                    fingerprint=["degrade", "eventbus", "sender_error", type(exc).__name__],
                    extras={"error_class": type(exc).__name__},
                )
                self._phase = "backoff"
                await self._backoff_sleep(self._backoff_max)
        self._phase = "idle"

    async def _cycle(self) -> None:
        if self._churn:
            self._phase = "backoff"
            await self._backoff_sleep(self._delay(self._churn))
        self._phase = "connecting"
        connection, channel = await self._connect_until_up()
        if self._closing:  # connected just as close() began: nothing to do with it
            self._phase = "disconnecting"
            await self._disconnect(connection)
            return
        try:
            self._phase = "pumping"
            self._on_connected()
            error = await self._pump(connection, channel)
        except BaseException:  # cancelled, or a bug: close the connection before leaving
            self._connected = False
            self._phase = "disconnecting"
            await self._disconnect(connection, abort=self._abort_on_close)
            raise
        self._connected = False
        if self._closing:
            self._phase = "disconnecting"
            await self._disconnect(connection, abort=self._abort_on_close)
            return
        self._unreachable(error, log=False)
        logger.warning(
            "eventbus.connection_lost",
            exchange=self.exchange,
            broker=self.broker,
            error=type(error).__name__,
            buffered=len(self._buffer),
        )
        # A broken connection may take aiormq seconds to close: do it aside, so
        # reconnecting starts now. close() waits for these (bounded).
        closer = asyncio.get_running_loop().create_task(self._disconnect(connection, abort=True))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        self._churn = 0 if self._confirmed_here else self._churn + 1

    def _delay(self, attempt: int) -> float:
        state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
        state.attempt_number = attempt
        return self._wait(state)

    async def _connect_until_up(self) -> tuple[Any, Any]:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(CONNECTION_ERRORS),
            wait=self._wait,
            sleep=self._backoff_sleep,
            before_sleep=self._attempt_failed,
            reraise=True,
        )
        result: tuple[Any, Any] = await retrying(self._connect_once)
        return result

    async def _connect_once(self) -> tuple[Any, Any]:
        """One bounded attempt: TCP, AMQP handshake, channel with confirms, exchange declare."""
        self._attempts += 1
        self._connecting = True
        connection: Any = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                connection = await aio_pika.connect(
                    self._url,
                    timeout=self._connect_timeout,
                    client_properties={"connection_name": f"degrade.eventbus {self.exchange}"},
                    connection_class=AbortableConnection,
                )
                channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
                if self._declare:
                    await channel.declare_exchange(self.exchange, self._exchange_type, durable=True)
                underlay = await channel.get_underlay_channel()
        except BaseException as exc:
            if connection is not None:  # a timed-out or cancelled attempt is cut, not closed politely
                cut = isinstance(exc, TimeoutError | asyncio.CancelledError)
                await self._disconnect(connection, abort=cut)
            raise
        finally:
            self._connecting = False
        return connection, underlay

    async def _attempt_failed(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        self._unreachable(error or TimeoutError())
        logger.debug(
            "eventbus.retry",
            exchange=self.exchange,
            attempt=retry_state.attempt_number,
            error=type(error).__name__,
        )

    async def _backoff_sleep(self, delay: float) -> None:
        since = self._unreachable_since
        if not self._degraded and since is not None:
            # Wake at the degrade deadline itself, not at the end of a long wait.
            remaining = since + self._degrade_after - self._clock()
            if 0 < remaining < delay:
                await self._sleep(remaining)
                delay -= remaining
            self._maybe_degrade()
        await self._sleep(delay)

    async def _disconnect(self, connection: Any, *, abort: bool = False) -> None:
        if abort:
            connection.abort()  # the broker stalled or the link broke: do not wait for its Close-Ok
        try:
            async with asyncio.timeout(DISCONNECT_TIMEOUT):
                await connection.close()
        except Exception as exc:  # closing a broken connection fails in many ways; it is gone either way
            logger.debug("eventbus.disconnect_error", exchange=self.exchange, error=type(exc).__name__)

    async def _pump(self, connection: Any, channel: Any) -> BaseException:
        """Publish until the connection fails; return what ended it."""
        transport = connection.transport
        if transport is None:  # closed between the connect and now
            return _ConnectionLost("the connection closed before publishing began")
        loop = asyncio.get_running_loop()
        lost: asyncio.Future[None] = loop.create_future()

        def on_closed(_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        watchers = [channel.closing, transport.connection.closing]
        for watcher in watchers:
            watcher.add_done_callback(on_closed)
        self._workers = [
            loop.create_task(self._worker(channel), name=f"degrade.eventbus[{self.exchange}].worker")
            for _ in range(self._max_in_flight)
        ]
        self._workers.append(
            loop.create_task(self._watchdog(), name=f"degrade.eventbus[{self.exchange}].watchdog")
        )
        workers = self._workers
        try:
            await asyncio.wait([lost, *workers], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in workers:
                task.cancel()
            for watcher in watchers:
                watcher.cancel()
            lost.cancel()
            try:
                await asyncio.gather(*workers, return_exceptions=True)
            finally:
                self._workers = []
                self._idle.clear()
                self._requeue_in_flight()
        for task in workers:
            if task.cancelled():
                continue
            error = task.exception()
            if error is None:
                continue
            if isinstance(error, _CONNECTION_ENDERS):
                return error
            raise error
        return _ConnectionLost("the broker closed the connection")

    async def _watchdog(self) -> None:
        """Bound every publish: the oldest one unconfirmed past ``confirm_timeout`` ends the connection.

        One check every quarter of the bound replaces a timer per publish
        (aiormq's ``timeout=`` arms and cancels one for each message).
        """
        loop = asyncio.get_running_loop()
        bound = self._confirm_timeout
        while True:
            await asyncio.sleep(bound / 4)
            for event in self._in_flight.values():  # insertion order: the first is the oldest
                if loop.time() - event.sent_at > bound:
                    raise TimeoutError(f"no confirm within {bound:g}s: the broker stalled")
                break

    async def _worker(self, channel: Any) -> None:
        publish = channel.basic_publish
        exchange = self.exchange
        now = asyncio.get_running_loop().time
        next_seq = self._seq
        while True:
            event = self._take()
            if event is None:
                await self._wait_for_work()
                continue
            if not event.seq:  # first send of a buffered event: taken in FIFO order, numbered so
                event.seq = next_seq()
            event.sent_at = now()
            self._in_flight[event.seq] = event
            if event.resend:
                self._counts.resent += 1
            try:
                result = await publish(
                    event.body,
                    exchange=exchange,
                    routing_key=event.routing_key,
                    properties=_properties(event),
                    mandatory=True,
                    wait=False,
                )
            except DeliveryError:
                self._settle(event, "nacked")
                continue
            except (TypeError, ValueError, struct.error):
                self._settle(event, "unencodable")  # a header AMQP cannot carry (an int over 64 bits)
                continue
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # aiormq fails pending confirms with CancelledError when it drops a
                # stuck connection: that is a connection loss, not a cancellation.
                raise _ConnectionLost("the connection was dropped while a confirm was pending") from None
            self._settle(event, None if isinstance(result, spec.Basic.Ack) else "unroutable")

    # -- reachability and degraded mode -----------------------------------------

    def _unreachable(self, error: BaseException, *, log: bool = True) -> None:
        self._last_error = error
        if self._unreachable_since is not None:
            return
        self._unreachable_since = self._clock()
        self._arm_degrade_timer(self._degrade_after)
        if log:
            logger.warning(
                "eventbus.unreachable",
                exchange=self.exchange,
                broker=self.broker,
                error=type(error).__name__,
                degrade_after_s=self._degrade_after,
                buffered=len(self._buffer),
            )

    def _arm_degrade_timer(self, delay: float) -> None:
        self._cancel_degrade_timer()
        with contextlib.suppress(RuntimeError):  # no running loop: the sender's checks still degrade
            self._degrade_timer = asyncio.get_running_loop().call_later(max(delay, 0.001), self._degrade_due)

    def _cancel_degrade_timer(self) -> None:
        if self._degrade_timer is not None:
            self._degrade_timer.cancel()
            self._degrade_timer = None

    def _degrade_due(self) -> None:
        self._degrade_timer = None
        since = self._unreachable_since
        if self._degraded or since is None or self._closed:
            return
        remaining = since + self._degrade_after - self._clock()
        if remaining > 0:
            self._arm_degrade_timer(remaining)
            return
        self._enter_degraded()

    def _maybe_degrade(self) -> None:
        since = self._unreachable_since
        if not self._degraded and since is not None and self._clock() - since >= self._degrade_after:
            self._enter_degraded()

    def _enter_degraded(self) -> None:
        now = self._clock()
        self._degraded = True
        self._counts.degraded = True
        self._degraded_at = now
        self._episode_mark = (self._reporter.total_lost, self._counts.spooled)
        self._cancel_degrade_timer()
        error = self._last_error
        since = self._unreachable_since if self._unreachable_since is not None else now
        moved = list(self._buffer)
        self._buffer.clear()
        spooling = self._spool_ok
        logger.warning(
            "eventbus.degraded",
            exchange=self.exchange,
            broker=self.broker,
            unreachable_s=round(now - since, 3),
            error=type(error).__name__ if error is not None else None,
            buffered=len(moved),
            events="spooled" if spooling else "dropped",
        )
        report_to_sentry(
            f"eventbus: degraded mode, events are {'spooled' if spooling else 'dropped'}",
            level="warning",
            tags={
                "eventbus.status": "degraded",
                "eventbus.exchange": self.exchange,
                "eventbus.transition": "degraded",
            },
            fingerprint=["degrade", "eventbus", "degraded", self.exchange],
            extras={"unreachable_s": round(now - since, 3), "buffered": len(moved)},
        )
        if self.dependency is not None:
            self.dependency.mark_down(error, reason="eventbus: broker unreachable")
        for event in moved:
            self._divert(event, "degraded")

    def _on_connected(self) -> None:
        self._connected = True
        self._confirmed_here = False
        self._replay_ok = self._spool_ok
        self._cancel_degrade_timer()
        now = self._clock()
        since = self._unreachable_since
        if self._degraded:
            lost_mark, spooled_mark = self._episode_mark
            dropped = self._reporter.total_lost - lost_mark
            spooled = self._counts.spooled - spooled_mark
            degraded_s = round(now - self._degraded_at, 3)
            self._degraded = False
            self._counts.degraded = False
            logger.info(
                "eventbus.recovered",
                exchange=self.exchange,
                broker=self.broker,
                dropped=dropped,
                spooled=spooled,
                degraded_s=degraded_s,
                attempts=self._attempts,
            )
            report_to_sentry(
                "eventbus: recovered from degraded mode",
                level="info",
                tags={"eventbus.status": "recovered", "eventbus.exchange": self.exchange},
                fingerprint=["degrade", "eventbus", "recovered", self.exchange],
                extras={"dropped": dropped, "spooled": spooled, "degraded_s": degraded_s},
            )
            self._reporter.flush()
        elif since is not None:
            logger.info(
                "eventbus.reconnected",
                exchange=self.exchange,
                broker=self.broker,
                unreachable_s=round(now - since, 3),
                attempts=self._attempts,
            )
        else:
            logger.info("eventbus.connected", exchange=self.exchange, broker=self.broker)
        self._unreachable_since = None
        self._attempts = 0
        if self.dependency is not None:
            self.dependency.record_success()

    def __repr__(self) -> str:
        state = "degraded" if self._degraded else "connected" if self._connected else "connecting"
        return (
            f"<EventPublisher exchange={self.exchange!r} broker={self.broker!r} {state} "
            f"buffered={len(self._buffer)} in_flight={len(self._in_flight)}>"
        )
