"""ReadReplicaRouter: reads on the replica when it can serve them, on the primary otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from .. import _validate, checks, observe
from ..dependency import Dependency
from ..exceptions import ConfigurationError, DependencyUnavailable, scrubbed
from ..observe import logger
from ._conn import _driver, _killing_after, acquire, discard, pool_capacity, release
from ._context import ACTIVE_WRITE, LEASE, REQUEST, Lease, request_context
from ._errors import is_database_failure
from ._lag import LagMonitor, position_check
from ._routing import ReadPolicy
from ._settings import warn_problems
from ._slots import Slots

__all__ = ["ReadReplicaRouter"]

SessionFactory = Callable[..., AsyncSession]


class ReadReplicaRouter(LagMonitor, ReadPolicy):
    """Route ``AsyncSession``s: writes to the primary, reads to a replica that can serve them.

    ``async with router.for_write() as session`` runs on the primary;
    ``async with router.for_read() as session`` runs on the replica, except:

    * no replica configured (``replica=None``, no ``READ_DATABASE_URL``): the primary;
    * read-your-writes: inside a ``for_write()`` block the read gets that same
      session (it sees the uncommitted writes); within ``sticky_after_write``
      seconds after a commit on the primary in the same request (the same
      task, or the request gated by :class:`~degrade.db.DBHealthMiddleware`),
      the primary;
    * read-your-writes across requests (``read_your_writes=True`` with
      :class:`~degrade.db.ReadYourWritesMiddleware`): the primary while the
      replica has not replayed the client's last write (its position at the
      lag monitor's last measurement; counted in ``fresh_on_primary``); with
      the primary known down, the replica anyway (FAIL-SOFT: it may lack the
      write; counted in ``fresh_waived``);
    * the replica is known down: the primary at once, no connect attempt,
      within the primary guard: at most ``primary_read_cap`` such reads at
      once, the excess shed (:class:`~degrade.Overloaded`, 503);
    * the replica gives no connection within ``connect_timeout`` (refused,
      silent, reset, auth failure): the primary, and one failure counted on
      ``dependency``.

    On the primary, sessions use the connection the middleware checked out
    for the request when it is free (one checkout per request), else the
    engine's pool.

    Health: unless ``dependency`` has a check of its own, the router installs
    one (connect; with ``max_lag``, replication lag too, see
    :func:`degrade.db.replica_lag`), so its background probe restores the
    replica about one ``recovery_interval`` after it is back. With ``max_lag``
    a monitor measures lag every ``lag_interval`` while the replica is up and
    takes it down when over the limit; it runs with the registry's lifespan
    (the router is managed by the dependency's registry), or between
    ``await router.start()`` and ``await router.aclose()``.

    FAIL-SOFT: a replica outage only moves reads to the primary; one
    ``db.replica.fallback`` warning per transition (``db.replica.restored``
    when reads are back on the replica), never one per request. A
    database failure inside a block leaves it as
    :class:`~degrade.DependencyUnavailable` (the driver's error as
    ``__cause__``) once counted on the right dependency; with the primary
    known down (``primary_dependency``), ``for_write()`` raises it at once.

    Args:
        primary: The primary ``AsyncEngine``.
        replica: The replica ``AsyncEngine``, or None.
        dependency: The replica's :class:`~degrade.Dependency` (required with a
            replica; SEV-3 in the runbook).
        primary_dependency: The primary's Dependency; set it (or let
            ``DBHealthMiddleware(router=...)`` set it) so a primary known down
            is not tried.
        connect_timeout: Hard bound, in seconds, on getting a replica connection
            that answers.
        max_lag: Seconds of replication lag above which the replica counts as
            down (None: not measured).
        sticky_after_write: Seconds after a commit during which reads of the
            same request stay on the primary (0 turns it off).
        close_timeout: Hard bound on returning a session's connection.
        lag_interval: Seconds between lag measurements while the replica is up.
        read_your_writes: Record the primary's WAL position after each commit
            (one round trip) and measure the replica's every ``lag_interval``,
            so reads of clients that wrote wait for the replica to replay it.
        primary_read_share: Share of the primary's pool (``pool_size +
            max_overflow``) that reads falling back to it may use at once while
            the replica is unavailable, in (0, 1] (default 0.5).
        session_factory: Called as ``session_factory(bind=connection_or_engine)``;
            defaults to ``async_sessionmaker(expire_on_commit=False)``.
    """

    def __init__(
        self,
        *,
        primary: AsyncEngine,
        replica: AsyncEngine | None = None,
        dependency: Dependency | None = None,
        primary_dependency: Dependency | None = None,
        connect_timeout: float = 0.5,
        max_lag: float | None = None,
        sticky_after_write: float = 2.0,
        close_timeout: float = 1.0,
        lag_interval: float = 1.0,
        session_factory: SessionFactory | None = None,
        read_your_writes: bool = False,
        primary_read_share: float = 0.5,
    ) -> None:
        if not isinstance(primary, AsyncEngine):
            raise ConfigurationError(
                f"primary must be a SQLAlchemy AsyncEngine; got {type(primary).__name__}"
            )
        if replica is not None and not isinstance(replica, AsyncEngine):
            raise ConfigurationError(
                f"replica must be a SQLAlchemy AsyncEngine or None; got {type(replica).__name__}"
            )
        if replica is not None and replica.sync_engine is primary.sync_engine:
            raise ConfigurationError(
                "replica is the primary engine; pass replica=None to read from the primary"
            )
        if replica is not None and dependency is None:
            raise ConfigurationError(
                "a replica needs its dependency: dependency=registry.dependency('db-replica', severity=...)"
            )
        for label, dep in (("dependency", dependency), ("primary_dependency", primary_dependency)):
            if dep is not None and not isinstance(dep, Dependency):
                raise ConfigurationError(f"{label} must be a degrade Dependency; got {dep!r}")
        if dependency is not None and dependency is primary_dependency:
            raise ConfigurationError("dependency (the replica's) and primary_dependency must differ")
        self.primary = primary
        self.replica = replica
        self.dependency = dependency
        self.primary_dependency = primary_dependency
        self.connect_timeout = _validate.seconds("connect_timeout", connect_timeout)
        self.max_lag = _validate.optional_seconds("max_lag", max_lag)
        self.sticky_after_write = _validate.seconds("sticky_after_write", sticky_after_write, allow_zero=True)
        self.close_timeout = _validate.seconds("close_timeout", close_timeout)
        self.lag_interval = _validate.seconds("lag_interval", lag_interval)
        self._init_read_policy(read_your_writes, primary_read_share)
        if primary_dependency is not None:
            self._declare_primary(primary_dependency)
        self._factory: SessionFactory = session_factory or async_sessionmaker(expire_on_commit=False)
        self._primary_sync = primary.sync_engine
        self._on_primary = False  # reads fall back to the primary because of the replica
        self._monitor: asyncio.Task[None] | None = None
        self._site = None
        #: Replica connections of reads in flight, and when each one's slot was handed over.
        self._replica_active: dict[AsyncConnection, float] = {}
        # The replica's own fair line (SQLAlchemy's pool queue lets newcomers pass waiters).
        self._replica_slots = Slots(pool_capacity(replica.sync_engine)) if replica is not None else None
        #: Replica connections of reads in flight terminated because the replica went down.
        self.terminated = 0
        if dependency is not None:
            dependency.subscribe(self._on_replica_transition)
        if replica is not None and dependency is not None:
            if dependency.check is None:
                dependency.check = checks.replica(
                    replica, max_lag=self.max_lag, timeout=dependency.check_timeout
                )
            self._lag_check = position_check(replica, max_lag=self.max_lag, timeout=dependency.check_timeout)
            self._site = dependency.add_site(
                "degrade.db.ReadReplicaRouter.for_read",
                "fail_soft",
                "reads run on the primary instead (slower primary, no user-visible error)",
                fallback="the primary",
            )
            if self.max_lag is not None or self.read_your_writes:
                dependency.manage(self)  # the owning registry's lifespan runs the lag monitor
            warn_problems(replica, acquire_timeout=self.connect_timeout, component="ReadReplicaRouter")
        # Read-your-writes: remember commits on the primary in the request's context.
        event.listen(self._primary_sync, "commit", self._on_commit)

    # -- routing ---------------------------------------------------------------

    @staticmethod
    def _declare_primary(dependency: Dependency) -> None:
        dependency.add_site(
            "degrade.db.ReadReplicaRouter.for_write",
            "fail_loud",
            "writes (and reads inside a write) answer 503 while the primary is down",
        )

    def _attach_primary_dependency(self, dependency: Dependency) -> None:
        """Called by DBHealthMiddleware(router=...): the gate's dependency is the primary's."""
        if self.primary_dependency is None:
            if dependency is self.dependency:
                raise ConfigurationError("the middleware's dependency is the router's replica dependency")
            self.primary_dependency = dependency
            self._declare_primary(dependency)
        elif self.primary_dependency is not dependency:
            raise ConfigurationError(
                "the router's primary_dependency differs from the middleware's dependency; use the same one"
            )

    def _on_commit(self, conn: Connection) -> None:
        ctx = REQUEST.get()
        if ctx is not None:
            ctx.last_write = time.monotonic()
        self._note_commit()

    @contextlib.asynccontextmanager
    async def for_write(self) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` on the primary; commit it yourself.

        In a gated request it runs on the connection the middleware checked
        out; elsewhere it checks out from the primary's pool on first use,
        bounded by the engine's settings (:func:`degrade.db.engine_options`).

        Failure mode: with the primary known down (``primary_dependency``),
        raises :class:`~degrade.DependencyUnavailable` at once. A database
        failure inside the block leaves it as ``DependencyUnavailable`` too
        (counted on ``primary_dependency``; without one, the driver's error
        propagates). Other exceptions propagate unchanged.
        """
        active = ACTIVE_WRITE.get()
        if active is not None:
            yield active  # nested: one transaction
            return
        request_context()  # so the commit listener has somewhere to record
        primary = self.primary_dependency
        started = primary.since if primary is not None else None
        session, lease = await self._primary_session()
        token = ACTIVE_WRITE.set(session)
        try:
            yield session
        except Exception as exc:
            self._raise_unavailable(exc, primary, "the primary database failed", started)
            raise
        finally:
            ACTIVE_WRITE.reset(token)
            try:
                await self._record_position(lease)
            finally:
                await self._finish(session, None, lease, primary, started)

    @contextlib.asynccontextmanager
    async def for_read(self) -> AsyncIterator[AsyncSession]:
        """An ``AsyncSession`` for reads: the replica when it can serve them, else the primary.

        Failure mode: FAIL-SOFT on the replica (see the class); with both the
        replica and the primary unavailable, raises
        :class:`~degrade.DependencyUnavailable` for the primary; with the
        primary down and the replica's line too long for the request's budget,
        :class:`~degrade.Overloaded` (a 503 with ``Retry-After: 1``, shed, not
        an outage); with the replica unavailable and the primary guard's share
        in use for longer than ``connect_timeout``, ``Overloaded`` too
        (reason ``"primary-guard"``).
        """
        active = ACTIVE_WRITE.get()
        if active is not None:
            yield active  # a read inside a write transaction sees its writes
            return
        conn = None
        guard: float | None = None  # a place among the fallback reads on the primary
        # Each dependency's last transition when this read began: a failure of a read that was
        # in flight through an outage and its recovery is stale (Dependency.record_failure).
        replica_dep, primary_dep = self.dependency, self.primary_dependency
        replica_started = replica_dep.since if replica_dep is not None else None
        primary_started = primary_dep.since if primary_dep is not None else None
        if self.replica is not None:
            ctx = REQUEST.get()
            if ctx is None or not ctx.wrote_within(self.sticky_after_write):
                if not self._needs_primary():
                    conn = await self._replica_connection(replica_started)
                if conn is None and self._replica_unavailable():
                    guard = await self._guard_enter()
        lease: Lease | None = None
        if conn is None:
            try:
                session, lease = await self._primary_session()
            except BaseException:
                self._guard_exit(guard)
                raise
            dep, started = primary_dep, primary_started
            detail = "the primary database failed"
        else:
            session = self._factory(bind=conn)
            dep, started = replica_dep, replica_started
            detail = "the read replica failed mid-read"
        try:
            yield session
        except Exception as exc:
            self._raise_unavailable(exc, dep, detail, started)
            raise
        finally:
            try:
                await self._finish(session, conn, lease, dep, started)
            finally:
                self._guard_exit(guard)

    async def _replica_connection(self, started: float | None = None) -> AsyncConnection | None:
        """A proven replica connection, or None when this read must go to the primary."""
        dep = self.dependency
        replica = self.replica
        if dep is None or replica is None:  # pragma: no cover - checked by the caller
            return None
        if dep.is_down and not dep.admit():
            self._fell_back(dep.last_error or "down")
            return None
        if not observe.may_abandon("db.replica"):  # too many abandoned clean-ups unwinding
            self._fell_back("abandoned-cap")
            return None
        slots = self._replica_slots
        started = time.monotonic()
        answered = dep.answered  # the replica's successes so far: did it answer others meanwhile?
        budget = self._replica_budget()
        slot_at = await self._replica_slot(budget, started)
        if slots is None or slot_at is None:
            return None
        try:
            conn = await acquire(replica, budget - (time.monotonic() - started))
        except BaseException as exc:
            slots.release(None)
            if not isinstance(exc, Exception):
                raise
            self._replica_refused(exc, replica, started, answered)
            return None
        dep.record_success()
        if self._on_primary:
            self._on_primary = False
            logger.info("db.replica.restored", replica=dep.name)
        self._replica_active[conn] = slot_at
        return conn

    def _fell_back(self, error: str) -> None:
        if self._site is not None:
            self._site.count()
        if not self._on_primary:
            self._on_primary = True
            dep = self.dependency
            logger.warning(
                "db.replica.fallback",
                replica=dep.name if dep is not None else None,
                error=error,
                detail="reads run on the primary until the replica is back",
            )

    async def _primary_session(self) -> tuple[AsyncSession, Lease | None]:
        """A session on the request's lease (checked out now if need be) when free, else on the pool."""
        lease = LEASE.get()
        if lease is not None and lease.available_for(self._primary_sync):
            lease.busy = True
            try:
                conn = await lease.connection()  # the gate's fair line and bound; 503 errors propagate
            except BaseException:
                lease.busy = False
                raise
            return self._factory(bind=conn), lease
        dep = self.primary_dependency
        if dep is not None and dep.is_down and not dep.admit():
            raise DependencyUnavailable(dep.name, "the primary database is down", retry_after=dep.retry_after)
        return self._factory(bind=self.primary), None

    @staticmethod
    def _raise_unavailable(
        exc: Exception, dep: Dependency | None, detail: str, started: float | None
    ) -> None:
        if dep is None or isinstance(exc, DependencyUnavailable) or not is_database_failure(exc):
            return
        dep.record_failure(exc, started=started)
        raise DependencyUnavailable(dep.name, detail, retry_after=dep.retry_after) from scrubbed(exc)

    async def _finish(
        self,
        session: AsyncSession,
        conn: AsyncConnection | None,
        lease: Lease | None,
        dep: Dependency | None,
        started: float | None = None,
    ) -> None:
        """Close the session (and the replica connection ``conn``), bounded; failures only count.

        A leased connection goes back to the pool once the block's transaction
        is over (unless :func:`degrade.db.connection` pinned it for the whole
        request); the session's uncommitted work is rolled back here, like any
        session's.
        """
        closed = False  # a close that failed (hung on a silent replica) served no one: not a hold
        try:
            if conn is not None:  # the replica's
                await _bounded_close(session, self.close_timeout, conn)
                await release(conn, self.close_timeout)
            elif lease is not None and lease.conn is not None:
                await _bounded_close(session, self.close_timeout, lease.conn)
            else:  # the primary's pool, outside a gated request: bounded by the engine's settings
                await session.close()
            closed = True
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) or is_database_failure(exc)):
                raise
            if dep is not None:
                dep.record_failure(exc, started=started)
        finally:
            if conn is not None:
                slot_at = self._replica_active.pop(conn, None)
                try:
                    if not conn.closed:
                        await discard(conn)
                finally:
                    if slot_at is not None and self._replica_slots is not None:
                        self._replica_slots.release(time.monotonic() - slot_at if closed else None)
            if lease is not None:
                lease.busy = False
                await lease.give_back()

    def __repr__(self) -> str:
        replica = "none" if self.dependency is None else f"{self.dependency.name}={self.dependency.state}"
        return f"<ReadReplicaRouter replica={replica} max_lag={self.max_lag}>"


async def _bounded_close(session: AsyncSession, bound: float, conn: AsyncConnection) -> None:
    """Close a session on ``conn``; a ROLLBACK it sends is bounded by terminating ``conn``."""
    driver = _driver(conn)
    if driver is None or not session.in_transaction():
        await session.close()  # nothing to send, or nothing left to bound
        return
    await _killing_after(driver, bound, session.close(), "closing the session")
