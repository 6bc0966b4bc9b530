"""Replication lag of a streaming standby, measured so that an idle primary is not lag."""

from __future__ import annotations

import warnings
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from .. import checks

__all__ = ["LAG_SQL", "replica_check", "replica_lag"]

#: One round trip. ``caught_up``: everything the standby received is replayed
#: (then it is as fresh as the primary lets it be, however long the primary
#: has been idle). ``since_replay``: seconds since the commit of the last
#: transaction replayed; NULL before the first one and on a primary.
LAG_SQL = text(
    "SELECT pg_is_in_recovery() AS standby, "
    "coalesce(pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn(), false) AS caught_up, "
    "extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8 AS since_replay"
)


async def replica_lag(conn: AsyncConnection) -> float | None:
    """Seconds the standby behind ``conn`` lags its primary, or None when unknown.

    * Everything received is replayed: 0.0, even if the last transaction is
      hours old (an idle primary is not lag).
    * WAL is waiting to be replayed: seconds since the last replayed commit
      (an upper bound of the staleness of what the standby serves).
    * ``conn`` is not a standby (a primary, a promoted replica), or the standby
      has WAL to replay but has replayed no transaction yet: None, which
      means *unknown* and is never taken for zero.

    Failure mode: raises whatever the query raises (the caller bounds it).
    """
    row = (await conn.execute(LAG_SQL)).one()
    if not row.standby:
        return None
    if row.caught_up:
        return 0.0
    if row.since_replay is None:
        return None
    return max(0.0, float(row.since_replay))


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
