"""The router's read-your-writes across requests and its primary guard (a base class of the router).

Read-your-writes: see :mod:`degrade.db._freshness` for the positions and the
middleware that carries them. Here the router records the primary's position
after a block that committed, and decides per read, with no I/O, whether the
replica has replayed what the client wrote.

The replica's line (moved here from the router, unchanged): a read waits
for a replica slot in a fair line of its own, longer when the primary is down.

The primary guard: while the replica is down every read falls back to the
primary, which was sized for the writes (and the reads the replica could not
take). Left alone, the reads take every primary connection and the writes
wait behind them until the gate's bound answers them 503: the replica's
outage, a SEV-3, becomes an outage of the writes. The fallback reads get a
share of the primary's pool (``primary_read_share`` of ``pool_size +
max_overflow``, half by default) in a fair line of their own (:class:`Slots`);
a read that finds it full waits up to ``connect_timeout`` and is then shed:
:class:`~degrade.Overloaded` (503, ``Retry-After: 1``), counted as shed on the
replica's site, never as a failure of either database.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import _validate
from ..exceptions import ConfigurationError, Overloaded
from ._conn import _driver, pool_capacity, pool_full
from ._context import LEASE
from ._errors import is_database_failure
from ._freshness import POSITION, parse_lsn
from ._slots import GRANTED, Slots

if TYPE_CHECKING:
    from .._records import Site
    from ..dependency import Dependency
    from ._context import Lease

__all__ = ["POSITION_SQL", "ReadPolicy"]

#: The primary's WAL position after a commit. The *insert* position: see _freshness.
POSITION_SQL = "SELECT pg_current_wal_insert_lsn()::text"


class ReadPolicy:
    """What the router adds to "replica unless down": client positions and the primary guard.

    Failure mode: none of its own: a position the primary does not give is
    counted (``positions_failed``, and on ``primary_dependency`` when the
    primary failed) and that response carries none; a fallback read over the
    guard's share raises :class:`~degrade.Overloaded`.
    """

    primary: AsyncEngine
    replica: AsyncEngine | None
    dependency: Dependency | None
    primary_dependency: Dependency | None
    connect_timeout: float
    close_timeout: float
    read_your_writes: bool
    replay_lsn: int | None
    _site: Site | None
    _on_primary: bool
    _replica_slots: Slots | None
    _replica_active: dict[AsyncConnection, float]
    terminated: int

    if TYPE_CHECKING:

        def _fell_back(self, error: str) -> None:
            """Reads run on the primary from now on (the router's)."""

    def _init_read_policy(self, read_your_writes: object, primary_read_share: object) -> None:
        if not isinstance(read_your_writes, bool):
            raise ConfigurationError(f"read_your_writes must be True or False; got {read_your_writes!r}")
        self.read_your_writes = read_your_writes
        self.replay_lsn = None
        #: Share of the primary's pool that reads falling back to it may hold at once.
        self.primary_read_share = _validate.fraction("primary_read_share", primary_read_share)
        #: How many fallback reads may run on the primary at once (at least 1).
        self.primary_read_cap = max(1, int(pool_capacity(self.primary.sync_engine) * self.primary_read_share))
        self._primary_reads = Slots(self.primary_read_cap)
        #: Reads sent to the primary because the replica had not replayed their client's last write.
        self.fresh_on_primary = 0
        #: Such reads served by the replica anyway because the primary was down (maybe stale).
        self.fresh_waived = 0
        #: Positions the primary did not give after a commit (that response carried none).
        self.positions_failed = 0
        #: Fallback reads shed by the primary guard.
        self.guard_shed = 0

    # -- read-your-writes --------------------------------------------------------

    def _needs_primary(self) -> bool:
        """True (and counted) when this request's client wrote what the replica has not replayed yet."""
        position = POSITION.get()
        if position is None or not self.read_your_writes:
            return False
        need = position.need()
        if need is None:
            return False
        replayed = self.replay_lsn
        if replayed is not None and replayed >= need:
            return False
        primary = self.primary_dependency
        if primary is not None and primary.is_down:
            # The primary cannot serve it: the replica's answer (maybe without the
            # client's write) beats a 503. Availability first, counted.
            self.fresh_waived += 1
            return False
        self.fresh_on_primary += 1
        return True

    def _note_commit(self) -> None:
        """A commit on the primary (the engine's listener, before COMMIT): ask for the position after it."""
        if self.read_your_writes and self.replica is not None:
            position = POSITION.get()
            if position is not None:
                position.pending = True

    async def _record_position(self, lease: Lease | None) -> None:
        """After a block that committed: the primary's WAL position, for the response to carry.

        One round trip on the connection that committed (the request's lease)
        before it goes back to the pool; outside a gated request the block's
        connection is back in the pool already, so this checks one out.
        """
        position = POSITION.get()
        if position is None or not position.pending:
            return
        position.pending = False
        try:
            conn = lease.conn if lease is not None else None
            if conn is not None and (conn.closed or conn.invalidated or conn.in_transaction()):
                # The block failed (its connection cut, or its transaction left to roll
                # back): whether it committed is unknown here; the response carries none.
                self.positions_failed += 1
                return
            if conn is not None:
                lsn = await primary_position(conn, self.close_timeout)
            else:
                async with self.primary.connect() as conn:
                    lsn = await primary_position(conn, self.close_timeout)
        except Exception as exc:
            # Auxiliary to a write that is already over: never fails the request. Counted;
            # only a failure of the database itself feeds its dependency below.
            if not (isinstance(exc, TimeoutError | SQLAlchemyError) or is_database_failure(exc)):
                raise
            self.positions_failed += 1
            dep = self.primary_dependency
            if dep is not None and is_database_failure(exc) and not isinstance(exc, TimeoutError):
                dep.record_failure(exc)
            return
        position.wrote(lsn)

    # -- the replica's line ------------------------------------------------------

    async def _replica_slot(self, budget: float, started: float) -> float | None:
        """A slot in the replica's fair line (when it was handed over), or None: shed, read elsewhere.

        Raises :class:`~degrade.Overloaded` instead of None when the primary is
        known down: there is nowhere else to read.
        """
        slots = self._replica_slots
        if slots is None:  # pragma: no cover - set with the replica
            return None
        if slots.try_take():
            return started
        outcome, slot_at = await slots.take_at(budget)
        if outcome == GRANTED:
            return slot_at
        if self._site is not None:  # the line is too long for the budget: saturation, not a down replica
            self._site.shed(outcome)
        primary = self.primary_dependency
        if primary is not None and primary.is_down and self.dependency is not None:
            # Nowhere else to read: say it is saturation (503, Retry-After: 1), not the
            # primary's outage (under make chaos these read "db is unavailable").
            raise Overloaded(
                self.dependency.name,
                outcome,
                "the read replica is busy and the primary is down: retry shortly",
                retry_after=1,
            )
        return None

    def _replica_refused(
        self, exc: Exception, replica: AsyncEngine, started: float | None = None, answered: int | None = None
    ) -> None:
        """A replica checkout failed: shed when it is saturation, else a failure of the replica.

        Saturation: a timeout with every replica connection out (to users
        outside the router too), or the timeout of a checkout during which
        the replica answered something else (``"slow"``: its dependency's
        successes moved past ``answered``, their count when the checkout
        began, ``started`` on the monotonic clock): a busy server
        answering late, not a gone one. Under ``make chaos`` (200 clients and
        Postgres on 2 CPUs) such timeouts came three in a row while the
        replica answered other reads; it was marked down, came back within a
        second, and flap damping then held it down longer each time (21 s in
        one run), sending every read to the primary. A silent replica answers
        nothing after a checkout begins, so its timeouts count as before.
        """
        if isinstance(exc, TimeoutError):
            reason = None
            if pool_full(replica.sync_engine):
                reason = "pool-saturated"
            elif answered is not None and self.dependency is not None and self.dependency.answered > answered:
                reason = "slow"
            if reason is not None:
                if self._site is not None:
                    self._site.shed(reason)
                return
        if self.dependency is not None:
            self.dependency.record_failure(exc, started=started)
        self._fell_back(type(exc).__name__)

    def _replica_budget(self) -> float:
        """How long a read may wait for the replica: ``connect_timeout``, or more when it is the only way.

        With the primary known down, falling back is a 503; such a read waits
        in the replica's line for what is left of the request's budget (the
        gate's ``acquire_timeout``), so a replica saturated by the reads the
        primary can no longer take still serves them.
        """
        primary = self.primary_dependency
        lease = LEASE.get()
        if primary is None or not primary.is_down or lease is None:
            return self.connect_timeout
        return max(self.connect_timeout, lease.source.acquire_timeout - lease.waited)

    # -- the replica's reads in flight when it goes down ----------------------------

    #: Seconds a replica that went down has to be back before the reads in flight on it are ended.
    END_READS_AFTER = 0.25

    def _on_replica_transition(self, dep: Dependency) -> None:
        """The replica went down: its line reads elsewhere now, its reads in flight end shortly after.

        Unless it is back within :attr:`END_READS_AFTER`: under ``make chaos``
        three connect timeouts of a saturated replica took it down while other
        reads were still being answered, their successes closed it again 3 ms
        later, and the reads in flight had been cut for nothing (503s). A
        replica that is really gone stays down, and its reads end 0.25 s later.
        """
        if not dep.is_down:
            return
        if self._replica_slots is not None:
            self._replica_slots.refuse_all("down")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._end_reads(dep, dep.since)
            return
        loop.call_later(self.END_READS_AFTER, self._end_reads, dep, dep.since)

    def _end_reads(self, dep: Dependency, since: float) -> None:
        """End the reads in flight on the replica, if it is still down since ``since``."""
        if not dep.is_down or dep.since != since:
            return
        for conn in list(self._replica_active):
            driver = _driver(conn)
            if driver is not None:
                driver.terminate()
                self.terminated += 1

    # -- the primary guard -------------------------------------------------------

    def _replica_unavailable(self) -> bool:
        """True while reads fall back to the primary because of the replica (down, refused, cap)."""
        dep = self.dependency
        return self._on_primary or (dep is not None and dep.is_down)

    async def _guard_enter(self) -> float:
        """A place among the fallback reads on the primary (when it was handed over).

        Raises :class:`~degrade.Overloaded` when the share is in use for
        longer than ``connect_timeout``: shed, not a failure.
        """
        slots = self._primary_reads
        if slots.try_take():
            return time.monotonic()
        outcome, slot_at = await slots.take_at(self.connect_timeout)
        if outcome == GRANTED:
            return slot_at
        self.guard_shed += 1
        if self._site is not None:
            self._site.shed("primary-guard")
        name = self.dependency.name if self.dependency is not None else "db-replica"
        raise Overloaded(
            name,
            "primary-guard",
            "the read replica is down and the primary's share for reads is busy: retry shortly",
            retry_after=1,
        )

    def _guard_exit(self, slot_at: float | None) -> None:
        if slot_at is not None:
            self._primary_reads.release(time.monotonic() - slot_at)


async def primary_position(conn: AsyncConnection, bound: float) -> int:
    """The primary's WAL insert position, asked on ``conn`` (bounded by ``bound`` seconds).

    On asyncpg the query goes to the driver directly: one round trip, and the
    connection's transaction state is left as it was.

    Failure mode: raises what the query raises, ``TimeoutError`` after ``bound``.
    """
    driver: Any = _driver(conn)
    if driver is not None and hasattr(driver, "fetchval"):
        text = await driver.fetchval(POSITION_SQL, timeout=bound)
    else:  # another driver: through SQLAlchemy (its transaction ends with the connection's)
        async with asyncio.timeout(bound):
            text = (await conn.exec_driver_sql(POSITION_SQL)).scalar()
    return parse_lsn(str(text))
