"""EventPublisher: publish to RabbitMQ without ever making a request wait for it.

FAIL-SOFT: when RabbitMQ is down the API call succeeds and its side effect (the
event) is dropped, counted and reported, or spooled to disk when a
:class:`~degrade.eventbus.DiskSpool` is configured.

How it works:

* ``publish()`` validates and serialises the event, appends it to a bounded
  in-process buffer and returns ``QUEUED`` (microseconds, whatever the broker
  does). It never awaits anything.
* A background sender (``_sender``) publishes from the buffer with publisher
  confirms on one connection at a time (plain ``aio_pika.connect``, see
  ``_transport``), reconnects with backoff, bounds every wait, and sends
  unconfirmed events again after a connection loss (consumers dedupe on the
  message id).
* One state machine (``_outage``): every failed connect and lost connection
  is a failure of the ``dependency``, every connect a success. Degraded mode
  (events dropped or spooled at once) is that dependency being down plus
  ``degrade_after`` seconds without a broker.

The pieces: ``_queue`` (buffer, spool replay, in flight; no aio-pika),
``_sender`` (the connection loop, over a ``connect()`` callable),
``_transport`` (everything that knows aio-pika), ``_outage`` (degraded mode,
spool or drop), ``_report`` (counting and reporting drops), ``_result`` and
this facade (arguments, ``publish()``, start and close).

The outage policy is ``spool=``: ``None`` drops (counted and reported), a
:class:`~degrade.eventbus.DiskSpool` spools. There is no ``on_outage=`` here:
the spooling choice carries its configuration (a directory, a size bound), and
a string argument beside it could only repeat it or contradict it.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

from yarl import URL

from .. import _validate
from ..dependency import Clock, Dependency, Site, Sleep
from ..exceptions import ConfigurationError
from ..observe import logger
from ._event import Event, check_headers, check_message_id, check_routing_key, encode_payload
from ._outage import SHED_NOT_STARTED, SHED_SPOOL_FULL, Outage, publish_site  # noqa: F401 - SHED_*: importable here
from ._queue import SendQueue
from ._report import Counts, Reporter, metrics
from ._result import PublisherStats, PublishResult, StatsView
from ._sender import Sender
from ._transport import DISCONNECT_TIMEOUT, amqp_connector  # noqa: F401 - DISCONNECT_TIMEOUT: importable here as before
from .spool import DiskSpool

__all__ = ["EventPublisher", "PublishResult", "PublisherStats"]

#: ``Site.shed`` reason: the in-memory buffer had no room (saturation, not an outage).
SHED_BUFFER_FULL = "buffer-full"

_now = time.time


class EventPublisher:
    """Publishes events to a RabbitMQ exchange from a bounded buffer; never blocks the caller.

    FAIL-SOFT. ``publish()`` returns in microseconds whatever the broker does.
    While the broker is unreachable the sender retries with exponential backoff
    and jitter; events wait in the buffer. Each failed attempt is a failure of
    ``dependency`` (down after its trip rule, 3 in a row by default) and each
    connection a success. ``degrade_after`` seconds after the broker stopped
    answering (when the oldest unconfirmed publish was sent or the failed
    connect attempt began; not when a bound noticed it) the publisher degrades
    (``dependency`` is then down: marked so if its trip rule has not done it):
    buffered and new events are dropped at once (``DROPPED``), or written to
    ``spool`` (``SPOOLED``). Each drop is counted (``stats()``, Prometheus
    ``degrade_eventbus_dropped_total``), summarised in a log line every
    ``log_interval`` seconds and sent to Sentry (tags
    ``eventbus.status=degraded``, ``eventbus.routing_key``; the message id as
    extra), at most ``sentry_rate`` events a second plus one summary of the
    rest. A full buffer drops (or spools) the same way before degraded mode.
    The dependency's recovery, or the next connection, ends degraded mode
    (``eventbus.recovered``). The outage itself is reported once, as the
    dependency's transitions (``dependency.down`` / ``dependency.recovered``).

    Saturation is not an outage: a full buffer (or spool) is also counted as
    shed on ``site`` (``"buffer-full"`` / ``"spool-full"``) and never feeds
    ``dependency`` a failure.

    Recovery: without a ``check`` on ``dependency`` the sender's reconnect loop
    is its probe. With one (``checks.amqp(url)``, same broker), the
    dependency's probe alone touches the broker while it is down and the
    sender connects once it recovers.

    Start and stop it with ``registry.manage(bus)`` or ``async with bus:``.
    Never started, it queues what nothing sends: see :meth:`publish`.

    Failure mode: FAIL-SOFT as above; ``publish()`` raises only for bad
    arguments (:class:`~degrade.ConfigurationError`). A spool that cannot be
    opened is reported and the publisher runs without it.

    Args:
        url: ``amqp://`` or ``amqps://`` URL of the broker. Never logged.
        exchange: Exchange to publish to; declared (durable) on each connect
            unless ``declare_exchange=False``.
        dependency: The broker's :class:`~degrade.Dependency`, fed with every
            connect attempt; down in degraded mode. Held down by
            ``simulate_outage(dep)``, it makes ``publish()`` drop (or spool)
            without touching the network.
        degrade_after: Seconds of unreachable broker before degraded mode,
            counted from when it stopped answering (see above).
        buffer_size: Most events held in memory (waiting plus in flight).
        spool: The outage policy: a :class:`DiskSpool` that takes what would
            be dropped; ``None`` drops.
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
        heartbeat = _validate.count("heartbeat", heartbeat)
        degrade_after = _validate.seconds("degrade_after", degrade_after, allow_zero=True)
        buffer_size = _validate.count("buffer_size", buffer_size)
        connect_timeout = _validate.seconds("connect_timeout", connect_timeout)
        confirm_timeout = _validate.seconds("confirm_timeout", confirm_timeout)
        backoff_initial = _validate.seconds("backoff_initial", backoff_initial)
        backoff_max = _validate.seconds("backoff_max", backoff_max)
        if backoff_max < backoff_initial:
            raise ConfigurationError("backoff_max must be >= backoff_initial")
        max_in_flight = _validate.count("max_in_flight", max_in_flight)
        replay_batch = _validate.count("replay_batch", replay_batch)
        self._close_timeout = _validate.seconds("close_timeout", close_timeout, allow_zero=True)
        log_interval = _validate.seconds("log_interval", log_interval)
        sentry_rate = _validate.count("sentry_rate", sentry_rate, minimum=0)
        self.exchange = exchange
        self.dependency = dependency
        self.spool = spool
        #: ``host:port/vhost`` of the broker, for logs (never the credentials).
        self.broker = f"{parsed.host}:{parsed.explicit_port or 5672}{parsed.path or '/'}"
        self._degrade_after = degrade_after
        #: The publish site on ``dependency`` (None without one): where shed events are counted.
        self.site: Site | None = publish_site(
            dependency, exchange, buffer_size, spool is not None, degrade_after
        )
        self._counts = Counts(exchange)
        metrics.track(self._counts)
        self._reporter = Reporter(
            self._counts, log_interval=log_interval, sentry_rate=sentry_rate, clock=clock
        )
        self._queue = SendQueue(
            size=buffer_size,
            counts=self._counts,
            reporter=self._reporter,
            spool=spool,
            replay_batch=replay_batch,
        )
        # The queue's own containers, read directly on the request path.
        self._buffer = self._queue.buffer
        self._in_flight = self._queue.in_flight
        self._buffer_size = buffer_size
        self._outage = Outage(
            queue=self._queue,
            reporter=self._reporter,
            dependency=dependency,
            site=self.site,
            degrade_after=degrade_after,
            broker=self.broker,
            clock=clock,
        )
        # Spool the event if the spool can take it, else drop it (counted, reported).
        self._divert = self._outage.divert
        connect = amqp_connector(
            parsed.update_query(heartbeat=str(heartbeat)),
            exchange,
            exchange_type=exchange_type,
            declare=bool(declare_exchange),
            timeout=connect_timeout,
        )
        self._sender = Sender(
            self._queue,
            connect,
            self._outage,
            exchange=exchange,
            broker=self.broker,
            connect_timeout=connect_timeout,
            confirm_timeout=confirm_timeout,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_in_flight=max_in_flight,
            clock=clock,
            sleep=sleep,
            rng=rng,
        )
        self._close_done: asyncio.Future[None] | None = None
        self._started = False

    # -- reading the state -------------------------------------------------------

    @property
    def degraded(self) -> bool:
        """True in degraded mode: every ``publish()`` drops (or spools) at once."""
        return self._counts.degraded

    @property
    def connected(self) -> bool:
        """True while the sender holds a working connection."""
        return self._sender.connected

    @property
    def stats(self) -> StatsView:
        """The counters: ``bus.stats()`` is a frozen :class:`PublisherStats` snapshot, made on each call.

        Failure mode: none (counters in memory). ``bus.stats.dropped``, the
        spelling before 0.2.0, works for one minor version with a ``DeprecationWarning``.
        """
        return StatsView(self._snapshot)

    def _snapshot(self) -> PublisherStats:
        return self._counts.snapshot(len(self._buffer), len(self._in_flight), self._sender.connected)

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

        Failure mode: FAIL-SOFT. In degraded mode, with a full buffer or after
        ``close()`` the event is dropped (``DROPPED``, counted and reported)
        or, with a spool, written to disk (``SPOOLED``). Never started, the
        publisher queues it with nothing to send it: ``eventbus.not_started``
        (warning, once), ``stats().unsent``, shed ``"not-started"`` on ``site``
        (``/health/deep`` details). Only bad arguments raise.

        Args:
            routing_key: The AMQP routing key (at most 255 UTF-8 bytes).
            payload: A JSON-able mapping (sent as ``application/json``, serialised
                here, once) or bytes (sent as ``application/octet-stream``).
            message_id: Id for idempotent consumers; a UUID4 hex when omitted.
            headers: AMQP headers: str keys, JSON-able values.

        Raises:
            ConfigurationError: a bad argument (also a ``TypeError`` when of the
                wrong kind: a payload neither a JSON-able mapping nor bytes, a
                key, id or headers of the wrong type), or a key or id too long.
        """
        check_routing_key(routing_key)
        body, content_type = encode_payload(payload)
        if message_id is not None:  # None: made by the sender when first needed (Event.message_id)
            check_message_id(message_id)
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
        if self._counts.degraded:
            return self._divert(event, "degraded")
        if self._sender.closing:
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
        self._queue.put(event)
        self._counts.queued += 1
        if not self._started:
            self._outage.not_started()
        return PublishResult.QUEUED

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool and start the sender; returns at once, never waits on the broker.

        Failure mode: a spool that cannot be opened (permissions, another
        process owns it) is logged and reported, and the publisher runs
        without it (events it would have spooled are dropped and reported).
        """
        if self._sender.task is not None or self._sender.closing:
            return
        self._outage.open_spool()
        self._sender.start()
        self._started = True
        logger.info(
            "eventbus.started",
            exchange=self.exchange,
            broker=self.broker,
            degrade_after_s=self._degrade_after,
            spool=None if self.spool is None else str(self.spool.path),
            spool_backlog_bytes=self.spool.backlog_bytes if self._queue.spool_open and self.spool else None,
        )

    async def aclose(self) -> None:
        """Stop within ``close_timeout`` plus the disconnect bound (the registry calls this).

        Failure mode: as :meth:`close`.
        """
        await self.close()

    async def close(self, timeout: float | None = None) -> None:  # noqa: ASYNC109 - the documented API
        """Flush what the broker takes within ``timeout`` seconds, then stop; no task stays behind.

        Events still buffered or unconfirmed at the bound are spooled when a
        spool is configured, otherwise dropped and reported (reason
        ``shutdown``). ``publish()`` after ``close()`` does the same at once.
        The connection is then closed within ``DISCONNECT_TIMEOUT``.

        Failure mode: never raises on the broker's account; a sender that does
        not stop within its bound is logged (``eventbus.close_timeout``).

        Args:
            timeout: Seconds for the flush; ``close_timeout`` by default.
        """
        if self._close_done is not None:  # closed, or closing in another task: wait for that one
            await asyncio.shield(self._close_done)
            return
        budget = (
            self._close_timeout if timeout is None else _validate.seconds("timeout", timeout, allow_zero=True)
        )
        loop = asyncio.get_running_loop()
        self._close_done = loop.create_future()
        queue, sender = self._queue, self._sender
        sender.closing = True
        deadline = loop.time() + budget
        leftovers: list[Event] = []
        try:
            if queue.own_pending() and (sender.connected or sender.connecting):
                queue.drained = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout_at(deadline):
                        await queue.drained.wait()
            sender.abort_on_close = queue.own_pending()
            await sender.stop_workers()
            leftovers = queue.take_buffered()
            if leftovers and not queue.spool_open:
                self._outage.open_spool()  # never started: the spool may still take them
            for event in leftovers:
                self._divert(event, "shutdown")
            await sender.stop()
            late = queue.take_buffered()  # requeued by a connection that ended meanwhile
            for event in late:
                self._divert(event, "shutdown")
            leftovers += late
            await sender.wait_closers()
        finally:
            self._outage.close()
            self._reporter.close()
            if self.spool is not None:
                self.spool.close()
            queue.spool_open = False
            self._close_done.set_result(None)
        logger.info(
            "eventbus.closed",
            exchange=self.exchange,
            confirmed=self._counts.confirmed,
            dropped=self._reporter.total_lost,
            spooled=self._counts.spooled,
            shutdown_leftovers=len(leftovers),
        )

    async def __aenter__(self) -> EventPublisher:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "degraded" if self.degraded else "connected" if self.connected else "connecting"
        state = state if self._started else "not started"
        return (
            f"<EventPublisher exchange={self.exchange!r} broker={self.broker!r} {state} "
            f"buffered={len(self._buffer)} in_flight={len(self._in_flight)}>"
        )
