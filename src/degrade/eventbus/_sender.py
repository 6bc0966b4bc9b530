"""The background sender: one connection at a time, reconnect with backoff, every wait bounded.

It takes a ``connect()`` callable that returns a :class:`Link` (the AMQP one
is :func:`degrade.eventbus._transport.amqp_connector`), so the reconnect,
backoff, confirm-bound and churn logic is unit-tested with a fake broker. What
the connection attempts mean for the broker's health is not decided here:
every attempt, success and loss is reported to :class:`Hooks` (the
publisher's :class:`~degrade.eventbus._outage.Outage`, which feeds the
Dependency), and the hooks may hold the sender back while the dependency's own
probe owns the broker.

* Reconnect with tenacity: exponential backoff from ``backoff_initial``
  doubling up to ``backoff_max``, each wait shortened by up to 20 % at random,
  retried only on a positive list of connection errors (``_retry``). A wait
  that would cross the hooks' deadline (degraded mode) is cut there.
* Each attempt is bounded by ``connect_timeout``. Each publish's confirm is
  bounded by ``confirm_timeout``, enforced by one watchdog that ends the
  connection when the oldest unconfirmed publish passes it (a stalled broker
  is noticed then, not after aiormq's three heartbeats). Closing is bounded by
  ``DISCONNECT_TIMEOUT``, at once when the broker stalled (socket reset).
* Every failure is reported with ``since``, when the broker stopped answering:
  the attempt's start (a timed-out one is seen ``connect_timeout`` later) or
  the send of the oldest unconfirmed publish (a stall is seen
  ``confirm_timeout`` plus up to a watchdog tick later), so ``degrade_after``
  is not lengthened by the bound that noticed it.
* ``max_in_flight`` worker coroutines publish on one channel (no task per
  message); unconfirmed events go back to the front of the buffer, in order,
  when a connection ends. Connections that end before their first confirm
  ("churn": a broker that accepts and then drops us) are spaced by the backoff
  too, so such a broker is not hammered.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import tenacity
from aiormq.exceptions import AMQPError

from ..observe import logger, report_to_sentry
from ._event import Event
from ._queue import SendQueue
from ._retry import CONNECTION_ERRORS, wait_jittered
from ._transport import DISCONNECT_TIMEOUT, disconnect

__all__ = ["JITTER", "ConnectionLost", "Hooks", "Link", "Sender"]

#: Relative jitter of each backoff wait: a wait is base * (1 - JITTER * U[0, 1)).
JITTER = 0.2

#: What ends a connection's publishing loop (then: reconnect). A nack is
#: settled per message and never gets here.
_CONNECTION_ENDERS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, AMQPError)


class ConnectionLost(ConnectionError):
    """The connection or channel closed under the sender."""


class Link(Protocol):
    """One working connection, as ``connect()`` returns it."""

    def watch(self) -> asyncio.Future[None]:
        """A future resolved when the connection closes."""

    def unwatch(self) -> None:
        """Stop watching."""

    async def send(self, event: Event) -> str | None:
        """Publish and wait for the confirm: None when confirmed, else the reason it is lost."""

    def abort(self) -> None:
        """Cut the connection now."""

    async def close(self) -> None:
        """Close it (the sender bounds the wait)."""


class Hooks(Protocol):
    """What the sender reports, and what may hold it back (the publisher's outage policy).

    ``since`` is the clock time the broker stopped answering, as far as the
    sender can tell: the start of the failed attempt, or the send of the
    oldest publish still unconfirmed when the connection ended (the moment of
    the loss when nothing was in flight). It comes before the report by up to
    ``connect_timeout`` or ``confirm_timeout`` plus a watchdog tick.
    """

    def attempt_failed(self, error: BaseException, *, since: float) -> None:
        """A connect attempt failed with a connection error or timed out."""

    def connection_lost(self, error: BaseException, *, since: float) -> None:
        """A working connection ended (reset, closed, stalled past ``confirm_timeout``)."""

    def setup_failed(self, error: BaseException) -> None:
        """An error that is not an outage (a channel error at set-up, a bug)."""

    def connected(self, attempts: int) -> None:
        """A connection is up, after ``attempts`` attempts."""

    def deadline(self) -> float | None:
        """Clock time a backoff wait must wake at (None: none)."""

    def check(self) -> None:
        """Called after each backoff wait: the deadline may have passed."""

    async def hold(self) -> None:
        """Return when the sender may try to connect (at once unless something else probes)."""


class Sender:
    """Publishes what the :class:`SendQueue` holds on one connection at a time, reconnecting as needed.

    Failure mode: connection errors and timeouts are retried with backoff for
    as long as it runs; any other error (a channel error at set-up, a bug) is
    logged as ``eventbus.sender_error`` (error, Sentry) and retried after
    ``backoff_max``. ``CancelledError`` is never retried; ``CancelledError``
    raised by aiormq into a worker that nobody cancelled is a connection loss.
    """

    def __init__(
        self,
        queue: SendQueue,
        connect: Callable[[], Awaitable[Link]],
        hooks: Hooks,
        *,
        exchange: str,
        broker: str = "",
        connect_timeout: float = 5.0,
        confirm_timeout: float = 5.0,
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        max_in_flight: int = 64,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.queue = queue
        self.connect = connect
        self.hooks = hooks
        self.exchange = exchange
        self.broker = broker
        self.connect_timeout = connect_timeout
        self.confirm_timeout = confirm_timeout
        self.backoff_max = backoff_max
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._sleep = sleep
        self._wait = wait_jittered(
            tenacity.wait_exponential(multiplier=backoff_initial, max=backoff_max), JITTER, rng
        )
        #: What it does now: idle, held, connecting, backoff, pumping, disconnecting.
        self.phase = "idle"
        #: Set by ``close()``: finish the current connection, start no other.
        self.closing = False
        #: Set by ``close()`` when it gave up on unconfirmed events: cut, do not wait.
        self.abort_on_close = False
        #: Connect attempts since the last connection (for logs).
        self.attempts = 0
        #: Clock time the current (or last) connect attempt began.
        self.attempt_at = 0.0
        self.task: asyncio.Task[None] | None = None
        self._churn = 0  # connections in a row that ended before their first confirm
        self._workers: list[asyncio.Task[None]] = []
        self._closers: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """True while it holds a working connection."""
        return self.phase == "pumping"

    @property
    def connecting(self) -> bool:
        """True while a connect attempt runs."""
        return self.phase == "connecting"

    # -- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Start the sender task (idempotent)."""
        if self.task is None and not self.closing:
            self.task = asyncio.get_running_loop().create_task(
                self._run(), name=f"degrade.eventbus[{self.exchange}]"
            )

    async def stop_workers(self) -> None:
        """Cancel the workers (bounded) and put what they had in flight back in the buffer."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        if workers:
            await asyncio.wait(workers, timeout=DISCONNECT_TIMEOUT)
        self.queue.requeue_in_flight()

    async def stop(self) -> None:
        """Stop the sender task within ``DISCONNECT_TIMEOUT`` + 0.5 s (twice at most)."""
        task, self.task = self.task, None
        if task is None:
            return
        bound = DISCONNECT_TIMEOUT + 0.5
        done: set[asyncio.Task[None]] = set()
        if self.phase in {"pumping", "disconnecting"}:
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

    async def wait_closers(self) -> None:
        """Wait (bounded) for the connections being closed aside."""
        if self._closers:
            await asyncio.wait(set(self._closers), timeout=DISCONNECT_TIMEOUT + 0.5)

    # -- the loop ----------------------------------------------------------------

    async def _run(self) -> None:
        while not self.closing:
            try:
                await self._cycle()
            except Exception as exc:  # not an outage: a set-up error (exchange type clash) or a bug
                self.phase = "backoff"
                self.hooks.setup_failed(exc)
                logger.error(
                    "eventbus.sender_error",
                    exchange=self.exchange,
                    broker=self.broker,
                    error=type(exc).__name__,
                    retry_in_s=self.backoff_max,
                )
                report_to_sentry(
                    f"eventbus: sender error {type(exc).__name__}",
                    level="error",
                    tags={"eventbus.status": "error", "eventbus.exchange": self.exchange},
                    fingerprint=["degrade", "eventbus", "sender_error", type(exc).__name__],
                    extras={"error_class": type(exc).__name__},
                )
                await self._backoff_sleep(self.backoff_max)
        self.phase = "idle"

    async def _cycle(self) -> None:
        if self._churn:
            self.phase = "backoff"
            await self._backoff_sleep(self._delay(self._churn))
        link = await self._connect_until_up()
        if self.closing:  # connected just as close() began: nothing to do with it
            self.phase = "disconnecting"
            await disconnect(link, exchange=self.exchange)
            return
        try:
            self.phase = "pumping"
            self.queue.confirmed_here = False
            self.queue.replay_ok = self.queue.spool_open
            attempts, self.attempts = self.attempts, 0
            self.hooks.connected(attempts)
            error, silent_since = await self._pump(link)
        except BaseException:  # cancelled, or a bug: close the connection before leaving
            self.phase = "disconnecting"
            await disconnect(link, abort=self.abort_on_close, exchange=self.exchange)
            raise
        if self.closing:
            self.phase = "disconnecting"
            await disconnect(link, abort=self.abort_on_close, exchange=self.exchange)
            return
        self.phase = "backoff"
        self.hooks.connection_lost(error, since=silent_since)
        logger.warning(
            "eventbus.connection_lost",
            exchange=self.exchange,
            broker=self.broker,
            error=type(error).__name__,
            silent_s=round(self._clock() - silent_since, 3),
            buffered=len(self.queue.buffer),
        )
        # A broken connection may take aiormq seconds to close: do it aside, so
        # reconnecting starts now. close() waits for these (bounded).
        closer = asyncio.get_running_loop().create_task(disconnect(link, abort=True, exchange=self.exchange))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        self._churn = 0 if self.queue.confirmed_here else self._churn + 1

    def _delay(self, attempt: int) -> float:
        state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
        state.attempt_number = attempt
        return self._wait(state)

    async def _connect_until_up(self) -> Link:
        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(CONNECTION_ERRORS),
            wait=self._wait,
            sleep=self._backoff_sleep,
            before_sleep=self._attempt_failed,
            reraise=True,
        )
        link: Link = await retrying(self._connect_once)
        return link

    async def _connect_once(self) -> Link:
        """One attempt, bounded by ``connect_timeout``, once the hooks let it try."""
        self.phase = "held"
        await self.hooks.hold()
        self.attempts += 1
        self.attempt_at = self._clock()
        self.phase = "connecting"
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self.connect()
        finally:
            self.phase = "backoff"

    async def _attempt_failed(self, retry_state: tenacity.RetryCallState) -> None:
        outcome = retry_state.outcome
        error = outcome.exception() if outcome is not None else None
        # The broker stopped answering when this attempt began (a timed-out
        # attempt is noticed connect_timeout later; a refused one at once).
        self.hooks.attempt_failed(error or TimeoutError(), since=self.attempt_at)
        logger.debug(
            "eventbus.retry",
            exchange=self.exchange,
            attempt=retry_state.attempt_number,
            error=type(error).__name__,
        )

    async def _backoff_sleep(self, delay: float) -> None:
        due = self.hooks.deadline()
        if due is not None:
            # Wake at the deadline itself, not at the end of a long wait.
            remaining = due - self._clock()
            if 0 < remaining < delay:
                await self._sleep(remaining)
                delay -= remaining
            self.hooks.check()
        await self._sleep(delay)

    # -- one connection ------------------------------------------------------------

    async def _pump(self, link: Link) -> tuple[BaseException, float]:
        """Publish until the connection fails; return what ended it and since when the broker was silent.

        The second value is the clock time the oldest publish still
        unconfirmed was sent (its age is read on the loop's clock, which the
        confirm watchdog uses, and taken back from ``clock()``), or the moment
        of the loss when nothing was in flight.
        """
        lost = link.watch()
        loop = asyncio.get_running_loop()
        if lost.done():
            link.unwatch()
            return ConnectionLost("the connection closed before publishing began"), self._clock()
        name = f"degrade.eventbus[{self.exchange}]"
        self._workers = [
            loop.create_task(self._worker(link), name=f"{name}.worker") for _ in range(self.max_in_flight)
        ]
        self._workers.append(loop.create_task(self._watchdog(), name=f"{name}.watchdog"))
        workers = self._workers
        try:
            await asyncio.wait([lost, *workers], return_when=asyncio.FIRST_COMPLETED)
            sent_at = self.queue.oldest_sent_at()  # before the requeue below empties in_flight
            now = self._clock()
            silent_since = now if sent_at is None else now - max(loop.time() - sent_at, 0.0)
        finally:
            for task in workers:
                task.cancel()
            link.unwatch()
            try:
                await asyncio.gather(*workers, return_exceptions=True)
            finally:
                self._workers = []
                self.queue.idle.clear()
                self.queue.requeue_in_flight()
        for task in workers:
            if task.cancelled():
                continue
            error = task.exception()
            if error is None:
                continue
            if isinstance(error, _CONNECTION_ENDERS):
                return error, silent_since
            raise error
        return ConnectionLost("the broker closed the connection"), silent_since

    async def _watchdog(self) -> None:
        """Bound every publish: the oldest one unconfirmed past ``confirm_timeout`` ends the connection.

        One check every quarter of the bound replaces a timer per publish
        (aiormq's ``timeout=`` arms and cancels one for each message).
        """
        loop = asyncio.get_running_loop()
        bound = self.confirm_timeout
        while True:
            await asyncio.sleep(bound / 4)
            sent_at = self.queue.oldest_sent_at()
            if sent_at is not None and loop.time() - sent_at > bound:
                raise TimeoutError(f"no confirm within {bound:g}s: the broker stalled")

    async def _worker(self, link: Link) -> None:
        send = link.send
        queue = self.queue
        now = asyncio.get_running_loop().time
        while True:
            event = queue.take()
            if event is None:
                await queue.wait_for_work()
                continue
            queue.begin(event, now())
            try:
                lost = await send(event)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # aiormq fails pending confirms with CancelledError when it drops a
                # stuck connection: that is a connection loss, not a cancellation.
                raise ConnectionLost("the connection was dropped while a confirm was pending") from None
            queue.settle(event, lost)

    def __repr__(self) -> str:
        return f"<Sender exchange={self.exchange!r} {self.phase} attempts={self.attempts}>"
