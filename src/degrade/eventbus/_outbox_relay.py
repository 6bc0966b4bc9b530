"""The outbox relay: publishes committed outbox rows with publisher confirms, then deletes them.

One loop per relay; each batch is one Postgres transaction on the relay's own
connection (a private copy of the app engine's pool, so the relay never takes
a request's pool slot): claim routing keys, claim their oldest rows, publish,
delete what the broker confirmed, commit. The claim, the order it keeps per
routing key (and its bound) and the publishing are in
:mod:`degrade.eventbus._outbox_batch`.

Delivery is at-least-once: a relay killed (or cut off from Postgres) after a
publish and before its commit leaves the rows in the table, unlocked when
Postgres ends its session; they are published again with the same message
id. Two relays never hold the same row (row locks and key locks), so in
normal operation no row is delivered twice.

Waking: ``LISTEN`` on the table's channel on one more connection of the
private pool (the table's trigger sends ``NOTIFY`` at commit), and a poll
every ``poll_interval`` as the fallback (a lost listener, a key released by
another relay). Dependencies: Postgres and RabbitMQ are both followed. While
either is down the relay does not touch it and waits for its recovery
(woken by the dependency's transition, each wait bounded by
``HOLD_RECHECK``); its own connects, queries and publishes feed both with
evidence (connection errors and timeouts are failures, answers successes;
other errors are bugs, logged, retried after ``backoff_max``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from typing import Any

from .. import _validate
from .._bounded import hard_timeout
from .._classify import is_dependency_error
from ..checks import _private_engine
from ..dependency import Clock, Dependency, Sleep
from ..exceptions import ConfigurationError
from ..observe import logger
from ._outage import HOLD_RECHECK
from ._outbox import Outbox
from ._outbox_batch import FINAL, event_for, publish, statements
from ._outbox_listen import Listener
from ._outbox_stats import RelayCounts, RelayStats, declare_sites, relay_metrics
from ._sender import JITTER, ConnectionLost, Link
from ._transport import disconnect
from .publisher import EventPublisher

__all__ = ["OutboxRelay"]


class OutboxRelay:
    """Publishes an :class:`Outbox`'s committed rows to RabbitMQ; start it with ``registry.manage(relay)``.

    FAIL-SOFT for the app: while RabbitMQ (or Postgres) is down, rows wait in
    the table (``stats().backlog``, Prometheus ``degrade_outbox_backlog`` and
    ``degrade_outbox_oldest_seconds``) and are published on recovery, oldest
    first. Any number of relays (pods) may run on one table: see the module
    docstring for the claim, the order it keeps per routing key, and its bound.

    Failure mode: never raises on a service's account. Connection errors and
    timeouts feed ``db`` (Postgres) and the publisher's dependency (RabbitMQ)
    and are retried with backoff (``backoff_initial`` doubling to
    ``backoff_max``, jittered); while either dependency is down the relay
    waits for its recovery without calling it. Any other error (the table
    missing, a bug) is logged as ``outbox.relay_error`` (class name only) and
    retried after ``backoff_max``. Rows the broker refuses for good
    (unroutable: no queue bound; unencodable) are deleted and counted as
    dropped (``outbox.dropped``, warning); nacked rows stay for the next batch.

    Args:
        outbox: The :class:`Outbox` whose table it relays.
        engine: The app's SQLAlchemy ``AsyncEngine``; the relay uses a private
            copy of its pool (same connect arguments): one connection for the
            batches, one for ``LISTEN``.
        publisher: The :class:`EventPublisher` whose broker, exchange, bounds
            and dependency it uses (it opens a connection of its own).
        db: Postgres's :class:`~degrade.Dependency`, followed and fed.
        batch_size: Most rows claimed, published and deleted per transaction.
        max_in_flight: Most unconfirmed publishes at once.
        scan: Oldest rows whose routing keys are considered per batch (``4 * batch_size``).
        poll_interval: Longest idle wait without a ``NOTIFY``.
        listen: ``LISTEN`` for the table's ``NOTIFY`` (False: poll only).
        db_timeout: Bound of each statement, connect and commit.
        backlog_interval: Seconds between two counts of the backlog.
        backlog_cap: Most rows counted (the count is ``min(rows, cap)``).
        message_id_prefix: Prepended to the row id in the message id (two
            outbox tables feeding one consumer need different prefixes).
        backoff_initial, backoff_max: Reconnect waits after a failure.
        clock, sleep, rng: Injected for tests.
    """

    def __init__(
        self,
        outbox: Outbox,
        engine: Any,
        publisher: EventPublisher,
        *,
        db: Dependency | None = None,
        batch_size: int = 500,
        max_in_flight: int = 100,
        scan: int | None = None,
        poll_interval: float = 1.0,
        listen: bool = True,
        db_timeout: float = 5.0,
        backlog_interval: float = 5.0,
        backlog_cap: int = 100_000,
        message_id_prefix: str = "",
        backoff_initial: float = 0.2,
        backoff_max: float = 5.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(outbox, Outbox):
            raise ConfigurationError(f"outbox must be a degrade.eventbus.Outbox; got {type(outbox).__name__}")
        if not isinstance(publisher, EventPublisher):
            raise ConfigurationError(
                f"publisher must be the EventPublisher whose broker the relay publishes to; got {publisher!r}"
            )
        from sqlalchemy.ext.asyncio import AsyncEngine

        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                "engine must be the app's SQLAlchemy AsyncEngine (create_async_engine(...)); "
                f"got {type(engine).__name__}"
            )
        if db is not None and not isinstance(db, Dependency):
            raise ConfigurationError(
                f"db must be a Dependency (from registry.dependency()) or None; got {db!r}"
            )
        if not isinstance(message_id_prefix, str):
            raise ConfigurationError(f"message_id_prefix must be a str; got {message_id_prefix!r}")
        self.outbox = outbox
        self.table = outbox.table
        #: ``outbox:<table>``: the relay's key under ``components`` in ``/health/deep``.
        self.name = f"outbox:{self.table}"
        self.publisher = publisher
        self.db = db
        self.broker = publisher.dependency
        self.batch_size = _validate.count("batch_size", batch_size)
        self.max_in_flight = _validate.count("max_in_flight", max_in_flight)
        self.scan = _validate.count("scan", 4 * self.batch_size if scan is None else scan)
        self.poll_interval = _validate.seconds("poll_interval", poll_interval)
        self.listen = bool(listen)
        self.db_timeout = _validate.seconds("db_timeout", db_timeout)
        self.backlog_interval = _validate.seconds("backlog_interval", backlog_interval)
        self.backlog_cap = _validate.count("backlog_cap", backlog_cap)
        self.backoff_initial = _validate.seconds("backoff_initial", backoff_initial)
        self.backoff_max = _validate.seconds("backoff_max", backoff_max)
        if self.backoff_max < self.backoff_initial:
            raise ConfigurationError("backoff_max must be >= backoff_initial")
        self.prefix = message_id_prefix
        sender = publisher._sender  # the publisher's transport and bounds, not its buffer
        self._connect = sender.connect
        self.connect_timeout = sender.connect_timeout
        self.confirm_timeout = sender.confirm_timeout
        self._app_engine = engine
        self._engine = _private_engine(engine)
        self._sql = statements(outbox.table, self.scan)
        self._clock, self._sleep, self._rng = clock, sleep, rng
        self.counts = RelayCounts(self.table)
        relay_metrics.track(self.counts)
        #: What it does now: idle, held, connecting, claiming, publishing, backoff, closed.
        self.phase = "idle"
        self._link: Link | None = None
        self._lost: asyncio.Future[None] | None = None
        self._wake = asyncio.Event()
        self._listener = Listener(outbox.channel, self._wake, timeout=self.db_timeout)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failures = 0
        self._next_count = 0.0
        self._closers: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        declare_sites(self.table, self.broker, db)

    # -- reading the state -------------------------------------------------------

    def stats(self) -> RelayStats:
        """A frozen snapshot of the counters and the last backlog count. Failure mode: none."""
        return self.counts.snapshot(
            connected=self._link is not None, listening=self._listener.listening, phase=self.phase
        )

    def health_details(self) -> dict[str, Any]:
        """The backlog and counters ``/health/deep`` shows with details (no I/O). Failure mode: none."""
        return self.stats().health_details()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the relay task; returns at once, never waits on Postgres or RabbitMQ. Failure mode: none."""
        if self._task is not None or self._closing:
            return
        for dep in (self.db, self.broker):
            if dep is not None:
                self._unsubscribe.append(dep.subscribe(self._on_transition))
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"degrade.outbox[{self.table}]")
        logger.info("outbox.relay_started", table=self.table, exchange=self.publisher.exchange)

    async def aclose(self) -> None:
        """Stop within about twice ``db_timeout`` plus the disconnect bound; no task stays behind.

        A batch under way gets ``db_timeout`` to commit (cancelling it between
        its statements would publish its rows again); then the task is
        cancelled. Rows published but not yet deleted stay in the table and are
        published again (same message id) by the next relay. Failure mode:
        never raises on a service's account; errors while closing are dropped.
        """
        self._closing = True
        self._wake.set()
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        task, self._task = self._task, None
        if task is not None:
            if self.phase in {"claiming", "publishing"}:
                await asyncio.wait({task}, timeout=self.db_timeout)
            task.cancel()
            await asyncio.wait({task}, timeout=self.db_timeout + 1.0)
        await self._drop_link(abort=False)
        await self._listener.drop()
        if self._closers:
            await asyncio.wait(set(self._closers), timeout=self.db_timeout + 1.0)
        engine = self._engine()
        if engine is not self._app_engine:  # its private pool; never the app's own
            with contextlib.suppress(Exception):
                await hard_timeout(engine.dispose(), self.db_timeout)
        self.phase = "closed"
        logger.info("outbox.relay_closed", table=self.table, published=self.counts.published)

    async def __aenter__(self) -> OutboxRelay:  # for scripts and tests; an app uses registry.manage()
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the loop ------------------------------------------------------------------

    def _on_transition(self, _dep: Dependency) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            try:
                busy = await self._step()
            except Exception as exc:  # not an outage: the table is missing, a bug
                self.phase = "backoff"
                self.counts.errors += 1
                logger.error("outbox.relay_error", table=self.table, error=type(exc).__name__)
                await self._sleep(self.backoff_max)
                continue
            if not busy:
                await self._idle(self.poll_interval)

    async def _step(self) -> bool:
        """One batch when both services may be called; True when there may be more to do at once."""
        if not await self._admitted(self.db):
            return False
        # Admitted while down: a trial, and the backlog count is that call.
        await self._count_backlog(trial=self.db is not None and self.db.is_down)
        if not await self._admitted(self.broker):
            return False
        if self.listen and not self._listener.started and not self._listener.unavailable:
            await self._listener.start(self._engine())
        elif self._listener.started and not self._listener.listening:
            await self._listener.drop()  # its connection closed: polling until the next start
        if self._link is None and not await self._open_link():
            return True  # the backoff was slept; try again
        self._wake.clear()  # a NOTIFY from now on wakes the next idle wait
        try:
            relayed = await self._batch()
        except ConnectionLost as exc:
            await self._broker_failed(exc)
            return True
        except Exception as exc:
            if not is_dependency_error(exc):
                raise
            await self._db_failed(exc)
            return True
        self._failures = 0
        return relayed >= self.batch_size

    async def _admitted(self, dep: Dependency | None) -> bool:
        """False (after a bounded wait) while ``dep`` is down and its probe owns it."""
        if dep is None or not dep.is_down or dep.admit():
            return True
        self.phase = "held"
        if dep is self.broker:
            await self._count_backlog()  # the backlog grows while the broker is down: keep measuring it
        await self._idle(HOLD_RECHECK)
        return False

    async def _idle(self, bound: float) -> None:
        if self._closing:
            return
        if self.phase != "held":
            self.phase = "idle"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound):
                await self._wake.wait()
        self._wake.clear()

    async def _backoff(self) -> None:
        self.phase = "backoff"
        self._failures += 1
        base = min(self.backoff_max, self.backoff_initial * 2 ** min(self._failures - 1, 30))
        await self._sleep(base * (1.0 - JITTER * self._rng()))

    # -- Postgres ------------------------------------------------------------------

    async def _db(self, coro: Any) -> Any:
        return await hard_timeout(coro, self.db_timeout)

    async def _db_failed(self, exc: BaseException) -> None:
        self.counts.db_failures += 1
        if self.db is not None:
            self.db.record_failure(exc)
        logger.warning("outbox.db_unreachable", table=self.table, error=type(exc).__name__)
        await self._listener.drop()
        await self._backoff()

    def _db_ok(self) -> None:
        if self.db is not None:
            self.db.record_success()

    async def _count_backlog(self, *, trial: bool = False) -> None:
        now = self._clock()
        if not trial and (now < self._next_count or (self.db is not None and self.db.is_down)):
            return
        self._next_count = now + self.backlog_interval
        conn = self._engine().connect()
        try:
            try:
                await self._db(conn.start())
                row = (await self._db(conn.execute(self._sql["backlog"], {"cap": self.backlog_cap}))).one()
            finally:
                with contextlib.suppress(Exception):
                    await hard_timeout(conn.close(), 1.0)
        except Exception as exc:
            if not is_dependency_error(exc):
                raise
            self.counts.db_failures += 1
            if self.db is not None:
                self.db.record_failure(exc)
            return
        self._db_ok()
        self.counts.backlog = int(row[0])
        self.counts.oldest_s = float(row[1] or 0.0)
        self.counts.counted_at = time.time()

    # -- RabbitMQ ------------------------------------------------------------------

    async def _attempt(self) -> Link:
        return await self._connect()

    async def _open_link(self) -> bool:
        self.phase = "connecting"
        try:
            link = await hard_timeout(self._attempt(), self.connect_timeout)
        except Exception as exc:
            if not is_dependency_error(exc):
                raise
            self.counts.broker_failures += 1
            if self.broker is not None:
                self.broker.record_failure(exc)
            logger.debug("outbox.connect_failed", table=self.table, error=type(exc).__name__)
            await self._backoff()
            return False
        if self.broker is not None:
            self.broker.record_success()
        self._link, self._lost = link, link.watch()
        return True

    async def _broker_failed(self, exc: BaseException) -> None:
        self.counts.broker_failures += 1
        if self.broker is not None:
            self.broker.record_failure(exc.__cause__ or exc)
        logger.warning("outbox.connection_lost", table=self.table, error=type(exc.__cause__ or exc).__name__)
        await self._drop_link(abort=True)
        await self._backoff()

    async def _drop_link(self, *, abort: bool) -> None:
        link, self._link, self._lost = self._link, None, None
        if link is None:
            return
        link.unwatch()
        closer = asyncio.get_running_loop().create_task(disconnect(link, abort=abort, exchange=self.table))
        self._closers.add(closer)
        closer.add_done_callback(self._closers.discard)
        if self._closing:
            await asyncio.wait({closer}, timeout=self.db_timeout)

    # -- one batch -----------------------------------------------------------------

    async def _batch(self) -> int:
        """Claim, publish, delete, commit; returns the rows settled. A loss is raised after the commit."""
        self.phase = "claiming"
        conn = self._engine().connect()
        lost: ConnectionLost | None = None
        settled = 0
        try:
            await self._db(conn.start())
            await self._db(conn.begin())
            keys = (await self._db(conn.execute(self._sql["keys"], {"table": self.table}))).scalars().all()
            rows = []
            if keys:
                result = await self._db(
                    conn.execute(self._sql["rows"], {"keys": keys, "limit": self.batch_size})
                )
                rows = result.all()
            self._db_ok()
            if rows:
                self.phase = "publishing"
                outcomes, lost = await self._publish(rows)
                done = [row_id for row_id, why in outcomes.items() if why is None or why in FINAL]
                if done:
                    await self._db(conn.execute(self._sql["delete"], {"ids": done}))
                settled = len(done)
                dropped = self.counts.settle(outcomes)
                if dropped:  # at most one line a batch
                    logger.warning("outbox.dropped", table=self.table, **dropped)
            await self._db(conn.commit())
        finally:
            with contextlib.suppress(Exception):
                await hard_timeout(conn.close(), 1.0)
        if lost is not None:
            raise lost
        self.counts.batches += 1 if rows else 0
        return settled

    async def _publish(self, rows: list[Any]) -> tuple[dict[int, str | None], ConnectionLost | None]:
        """Publish ``rows`` on the current link; each row's outcome, and a loss if any."""
        link, lost = self._link, self._lost
        if link is None or lost is None or lost.done():
            return {}, ConnectionLost("the connection closed before publishing began")
        events = [(row.id, event_for(row, self.prefix)) for row in rows]
        outcomes, error = await publish(link, lost, events, self.max_in_flight, self.confirm_timeout)
        if error is None and self.broker is not None:
            self.broker.record_success()
        return outcomes, error

    def __repr__(self) -> str:
        return f"<OutboxRelay table={self.table!r} {self.phase} published={self.counts.published}>"
