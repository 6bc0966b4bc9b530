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
from ..exceptions import CheckFailed
from ..observe import logger

if TYPE_CHECKING:
    from ..dependency import Dependency

__all__ = [
    "LAG_SQL",
    "NOT_A_STANDBY",
    "LagMonitor",
    "NotAStandby",
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
LAG_SQL = text(
    "SELECT pg_is_in_recovery() AS standby, "
    "coalesce(pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), false) AS caught_up, "
    "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 AS since_replay"
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
    row = (await conn.execute(LAG_SQL)).one()
    if not row.standby:
        raise NotAStandby(NOT_A_STANDBY)
    if row.caught_up:
        return 0.0
    if row.since_replay is None:
        return None
    return max(0.0, float(row.since_replay))


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


class LagMonitor:
    """The replica router's lag monitor: a degrade Component its registry's lifespan runs.

    While the replica is up, every ``lag_interval`` it runs the lag check: lag
    over ``max_lag`` (or unknown) marks the replica down (``reason=lag``), a
    server that is not a standby marks it down with ``reason=not-a-standby``
    and one ``db.replica.not_a_standby`` warning (reads run on the primary:
    the only server known to hold the data the app writes), an unreachable
    replica counts an ordinary failure. (A base class of
    :class:`~degrade.db.ReadReplicaRouter`, kept here beside the lag query.)

    Failure mode: none of its own; a failing check feeds the dependency.
    """

    dependency: Dependency | None
    replica: AsyncEngine | None
    max_lag: float | None
    lag_interval: float
    _lag_check: Callable[[], Awaitable[object]]
    _monitor: asyncio.Task[None] | None

    async def start(self) -> None:
        """Start the lag monitor (only with a replica and ``max_lag``); idempotent."""
        if self.max_lag is None or self.replica is None:
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
                await self._lag_check()
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
