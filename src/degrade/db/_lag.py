"""Replication lag of a streaming standby, measured so that an idle primary is not lag."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import warnings
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import checks
from .._bounded import hard_timeout
from ..exceptions import CheckFailed
from ..observe import logger
from ._freshness import parse_lsn

if TYPE_CHECKING:
    from ..dependency import Dependency

__all__ = [
    "LAG_SQL",
    "NOT_A_STANDBY",
    "LagMonitor",
    "NotAStandby",
    "position_check",
    "replica_check",
    "replica_lag",
    "standby_lag",
]

#: The message of :class:`NotAStandby` (credential-free: it names no URL).
NOT_A_STANDBY = "not a standby: the replica URL points at a primary (pg_is_in_recovery() is false)"

#: One round trip. ``caught_up``: everything the standby received is replayed
#: (then it is as fresh as the primary lets it be, however long the primary
#: has been idle). ``since_replay``: seconds since the commit of the last
#: transaction replayed; NULL before the first one and on a primary.
#: ``replay_lsn``: the WAL position replayed so far (``"16/B374D848"``; NULL on
#: a primary), what read-your-writes compares a client's last write with.
LAG_SQL = text(
    "SELECT pg_is_in_recovery() AS standby, "
    "coalesce(pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), false) AS caught_up, "
    "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 AS since_replay, "
    "pg_last_wal_replay_lsn()::text AS replay_lsn"
)


class NotAStandby(CheckFailed):
    """The server behind the replica URL is not in recovery: a primary (or a promoted replica).

    Its own failure, not lag: the lag monitor marks the replica down with
    ``reason="not-a-standby"`` (reads run on the primary), and health details
    show ``"error": "NotAStandby"`` instead of ``"CheckFailed"``.
    """


async def standby_lag(conn: AsyncConnection) -> float | None:
    """Like :func:`replica_lag`, but a server that is not a standby raises instead of returning None.

    Failure mode: raises :class:`NotAStandby` when ``pg_is_in_recovery()`` is
    false, and whatever the query raises (the caller bounds it). None means
    a standby that has WAL to replay but has replayed no transaction yet.
    """
    lag, _ = await standby_position(conn)
    return lag


async def standby_position(conn: AsyncConnection) -> tuple[float | None, int | None]:
    """:func:`standby_lag` and the replayed WAL position (None when unknown), in the same round trip.

    Failure mode: as :func:`standby_lag`.
    """
    row = (await conn.execute(LAG_SQL)).one()
    if not row.standby:
        raise NotAStandby(NOT_A_STANDBY)
    position = _position(row.replay_lsn)
    if row.caught_up:
        return 0.0, position
    if row.since_replay is None:
        return None, position
    return max(0.0, float(row.since_replay)), position


def _position(text: object) -> int | None:
    try:
        return parse_lsn(text) if isinstance(text, str) else None
    except ValueError:  # pragma: no cover - the server's own format
        return None


async def replica_lag(conn: AsyncConnection) -> float | None:
    """Seconds the standby behind ``conn`` lags its primary, or None when unknown.

    * Everything received is replayed: 0.0, even if the last transaction is
      hours old (an idle primary is not lag).
    * WAL is waiting to be replayed: seconds since the last replayed commit
      (an upper bound of the staleness of what the standby serves).
    * ``conn`` is not a standby (a primary, a promoted replica), or the standby
      has WAL to replay but has replayed no transaction yet: None, which
      means *unknown* and is never taken for zero.

    :func:`standby_lag` tells the first case apart (it raises :class:`NotAStandby`).

    Failure mode: raises whatever the query raises (the caller bounds it).
    """
    try:
        return await standby_lag(conn)
    except NotAStandby:
        return None


def replica_check(
    engine: AsyncEngine, *, max_lag: float | None = None, timeout: float = 0.8
) -> Callable[[], Awaitable[None]]:
    """Deprecated: :func:`degrade.checks.replica` (every health check lives in ``degrade.checks``)."""
    warnings.warn(
        "degrade.db.replica_check() is deprecated; use degrade.checks.replica()",
        DeprecationWarning,
        stacklevel=2,
    )
    return checks.replica(engine, max_lag=max_lag, timeout=timeout)


def position_check(
    engine: AsyncEngine, *, max_lag: float | None, timeout: float
) -> Callable[[], Awaitable[int | None]]:
    """The lag monitor's check: :func:`degrade.checks.replica`, returning the replayed WAL position.

    One round trip on a connection of the check's own (a private copy of the
    engine's pool, as the health check): lag over ``max_lag`` raises
    :class:`~degrade.CheckFailed`, a server not in recovery
    :class:`NotAStandby` (both only with ``max_lag``). Returns the position
    the standby has replayed (None when unknown: a primary behind the URL).

    Failure mode: raises on a connection failure, ``TimeoutError`` after ``timeout``.
    """
    private = checks._private_engine(engine)

    async def run() -> int | None:
        async with checks._own_connection(engine, private, timeout) as conn:
            try:
                lag, position = await standby_position(conn)
            except NotAStandby:
                if max_lag is not None:
                    raise
                return None  # without max_lag a primary passes, as in checks.replica
        if max_lag is not None:
            if lag is None:
                raise CheckFailed("replication lag is unknown (the standby has replayed nothing yet)")
            if lag > max_lag:
                raise CheckFailed(f"replication lag {lag:.1f}s is over max_lag={max_lag:g}s")
        return position

    async def check() -> int | None:
        return await hard_timeout(run(), timeout)

    return check


class LagMonitor:
    """The replica router's lag monitor: a degrade Component its registry's lifespan runs.

    While the replica is up, every ``lag_interval`` it runs the lag check: lag
    over ``max_lag`` (or unknown) marks the replica down (``reason=lag``), a
    server that is not a standby marks it down with ``reason=not-a-standby``
    and one ``db.replica.not_a_standby`` warning (reads run on the primary:
    the only server known to hold the data the app writes), an unreachable
    replica counts an ordinary failure. (A base class of
    :class:`~degrade.db.ReadReplicaRouter`, kept here beside the lag query.)

    With ``read_your_writes`` it runs without ``max_lag`` too, and keeps
    ``replay_lsn``: the WAL position the replica had replayed at the last
    measurement (the same round trip), which reads compare with a client's
    last write, so a request costs no query of its own.

    Failure mode: none of its own; a failing check feeds the dependency.
    """

    dependency: Dependency | None
    replica: AsyncEngine | None
    max_lag: float | None
    lag_interval: float
    read_your_writes: bool
    #: The replica's replayed WAL position at the last measurement (None: unknown).
    replay_lsn: int | None
    _lag_check: Callable[[], Awaitable[int | None]]
    _monitor: asyncio.Task[None] | None

    async def start(self) -> None:
        """Start the lag monitor (with a replica, and ``max_lag`` or ``read_your_writes``); idempotent."""
        if (self.max_lag is None and not self.read_your_writes) or self.replica is None:
            return
        if self._monitor is not None and not self._monitor.done():
            return
        loop = asyncio.get_running_loop()
        # A fresh context: the monitor must not inherit a request's connection.
        self._monitor = loop.create_task(
            self._watch_lag(), name="degrade.db.replica-lag", context=contextvars.Context()
        )

    async def aclose(self) -> None:
        """Stop the lag monitor and wait for it (idempotent)."""
        monitor, self._monitor = self._monitor, None
        if monitor is None or monitor.done():
            return
        monitor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await monitor
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError  # we were cancelled too: do not swallow it

    async def _watch_lag(self) -> None:
        dep = self.dependency
        if dep is None:  # pragma: no cover - start() requires a replica, which requires a dependency
            return
        while True:
            await asyncio.sleep(self.lag_interval)
            if dep.is_down:
                continue  # the dependency's probe runs the check meanwhile
            try:
                self.replay_lsn = await self._lag_check()
            except NotAStandby as exc:
                logger.warning(
                    "db.replica.not_a_standby",
                    replica=dep.name,
                    detail=NOT_A_STANDBY,
                    hint="point the replica URL at a standby, or leave max_lag unset "
                    "(or the replica out) when it is the primary's server",
                )
                dep.mark_down(exc, reason="not-a-standby")
            except CheckFailed as exc:
                dep.mark_down(exc, reason="lag")
            except Exception as exc:  # unreachable replica: an ordinary failure
                dep.record_failure(exc, reason="lag-monitor")
