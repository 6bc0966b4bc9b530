"""SQLAlchemy's internals that the DB gate reads. Checked against SQLAlchemy 2.0.30 and 2.1.9.

* The pool's idle queue (``AsyncAdaptedQueuePool._pool._queue._queue``,
  ``use_lifo``, ``_pre_ping``, ``_recycle``, ``_invalidate_time`` and each
  record's ``starttime`` / ``_soft_invalidate_time`` / ``dbapi_connection``):
  whether a checkout would hand out an idle connection without any I/O.
  Fallback: "not instant", so the checkout runs under a hard timeout (a task).
* The asyncpg adapter's lazy ``BEGIN`` (``_start_transaction`` and
  ``_transaction``): sent at checkout to prove the connection. Fallback: a
  plain ``;`` ping, one extra round trip.
* ``QueuePool._max_overflow``: the pool's capacity for the gate's fair line.
  Fallback: unlimited (the line never forms; the pool's own queue decides).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

__all__ = ["idle_checkout_is_free", "lazy_begin", "max_overflow", "problems"]


def idle_checkout_is_free(sync_engine: Engine) -> bool:
    """True when a checkout now takes an idle connection without touching any socket.

    Mirrors SQLAlchemy's own fast path (``_ConnectionFairy._checkout`` and
    ``_ConnectionRecord.get_connection``): an idle connection is queued, no
    pre-ping, no checkout or engine_connect listener, and the connection the
    queue hands out next is neither recycled nor invalidated. Anything
    unexpected answers False, which is always safe.
    """
    pool = sync_engine.pool
    if type(pool) is not AsyncAdaptedQueuePool:
        return False
    try:
        if pool._pre_ping or pool.dispatch.checkout or sync_engine.dispatch.engine_connect:
            return False
        queue: Any = pool._pool  # sqlalchemy.util.queue.AsyncAdaptedQueue
        items = queue._queue._queue  # the asyncio.Queue's deque
        if not items:
            return False
        record = items[-1] if queue.use_lifo else items[0]
        started = record.starttime
        recycle = pool._recycle
        return bool(
            record.dbapi_connection is not None
            and pool._invalidate_time <= started
            and record._soft_invalidate_time <= started
            and (recycle < 0 or time.time() - started <= recycle)
        )
    except AttributeError:
        return False


def lazy_begin(adapted: Any) -> Awaitable[Any] | None:
    """The ``BEGIN`` SQLAlchemy's asyncpg adapter would send with the first statement, started now.

    None when there is nothing to begin (autocommit, a transaction already
    open) or the adapter is not the one this was checked against: the caller
    then pings instead.
    """
    start = getattr(adapted, "_start_transaction", None)
    if (
        start is not None
        and getattr(adapted, "_transaction", False) is None
        and getattr(adapted, "isolation_level", None) != "autocommit"
    ):
        result: Awaitable[Any] = start()
        return result
    return None


def max_overflow(pool: Any) -> int | None:
    """A queue pool's ``max_overflow`` (-1: unlimited), or None when it cannot be read."""
    if not isinstance(pool, QueuePool):
        return None
    value = getattr(pool, "_max_overflow", None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def problems() -> list[str]:
    """Which of the fast paths above the installed SQLAlchemy cannot take (empty: all of them)."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_connection

    found: list[str] = []
    if not hasattr(AsyncAdapt_asyncpg_connection, "_start_transaction"):
        found.append("asyncpg adapter has no _start_transaction: the gate pings (one more round trip)")
    never_called: Any = lambda: None  # noqa: E731 - a creator the probe pool never calls
    pool = AsyncAdaptedQueuePool(never_called, pool_size=1, max_overflow=2)
    try:
        queue: Any = pool._pool
        queue._queue._queue  # noqa: B018 - the attribute chain the instant checkout reads
        queue.use_lifo  # noqa: B018
        pool._pre_ping, pool._recycle, pool._invalidate_time  # noqa: B018
    except AttributeError:
        found.append("the pool's idle queue moved: every checkout runs under a hard timeout (a task)")
    if max_overflow(pool) != 2:
        found.append("QueuePool._max_overflow moved: the gate's fair line is off")
    return found
