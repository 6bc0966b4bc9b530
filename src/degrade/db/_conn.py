"""Connections with hard bounds that cost nothing on the healthy path.

Two measured facts shape this module (numbers in ``docs/postgres.md``):

* Cancelling SQLAlchemy while it waits on a silent connection overruns: it
  invalidates the connection and awaits a *shielded* graceful close (asyncpg
  ``close(timeout=2)``). A hard bound therefore has to stop waiting instead of
  cancelling, which :func:`degrade._bounded.hard_timeout` does by running the
  work in its own task; that costs a task and a scheduling round trip.
* A pooled connection is not proof that the server answers: checking it out
  touches no socket (unless ``pool_pre_ping``, which costs a round trip).

So :func:`acquire` takes an idle pooled connection directly when the pool
would hand it over without any I/O (checked first, see
:func:`_instant_checkout`), and otherwise checks out under
:func:`~degrade._bounded.hard_timeout` (a task, but then the pool connects or
pings anyway). It then proves the connection with the ``BEGIN`` its first
statement would send anyway: no extra round trip. That ``BEGIN``, and the
``ROLLBACK`` of :func:`release`, are bounded by *terminating* the asyncpg
connection at the deadline: the pending operation fails at once, and the
graceful close that follows finds the socket already gone. No task, no shield.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

from .._bounded import hard_timeout
from .._compat.sqlalchemy import idle_checkout_is_free, lazy_begin, max_overflow

__all__ = ["acquire", "close_own", "discard", "pool_capacity", "pool_full", "release"]


#: Slots of a pool without a limit (overflow -1, NullPool): the line never forms.
_UNLIMITED = 1 << 30


def pool_capacity(sync_engine: Engine) -> int:
    """How many connections the engine's pool gives out at once (pool_size + max_overflow)."""
    pool = sync_engine.pool
    if not isinstance(pool, QueuePool):
        return _UNLIMITED
    overflow = max_overflow(pool)
    if overflow is None or overflow < 0:
        return _UNLIMITED
    return pool.size() + overflow


def pool_full(sync_engine: Engine) -> bool:
    """True when every connection the pool may give out is checked out."""
    pool = sync_engine.pool
    if not isinstance(pool, QueuePool):
        return False
    return pool.checkedout() >= pool_capacity(sync_engine)


def _driver(conn: AsyncConnection) -> Any:
    """The asyncpg connection under ``conn``, or None (closed or invalidated: nothing to bound)."""
    sync = conn.sync_connection
    if sync is None or sync.closed or sync.invalidated:
        return None
    return sync.connection.driver_connection


class _Deadlines:
    """One event loop's bounded driver operations, and the timer that enforces them.

    A per-operation ``call_later`` costs a timer-heap push and a cancelled
    handle left behind on every request; here an operation costs a set
    insert and delete, and one timer ticks every ``TICK`` seconds only while
    some operation is in flight. A deadline is enforced at most ``TICK`` late.

    The kill itself is deferred by one ``call_soon``: an operation whose answer
    arrived in the same loop iteration as the tick has already scheduled its
    task's wake-up, which then runs first and takes the operation out of
    :attr:`ops`. Killing straight from the tick terminated such connections
    *after* the server had answered (the awaiting task saw success and the next
    query found the connection closed): under ``wrk -c200`` on a CPU-bound
    worker, where answers routinely wait in the ready queue, that made three
    "connection is closed" failures and a false outage of a healthy database.
    """

    TICK = 0.01

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ops: set[_Op] = set()
        self.handle: asyncio.TimerHandle | None = None

    def add(self, op: _Op) -> None:
        self.ops.add(op)
        if self.handle is None:
            self.handle = self.loop.call_later(self.TICK, self.tick)

    def tick(self) -> None:
        self.handle = None
        now = self.loop.time()
        due = [op for op in self.ops if op.deadline <= now]
        if due:
            self.loop.call_soon(self._kill, due)
        if self.ops:
            self.handle = self.loop.call_later(self.TICK, self.tick)

    def _kill(self, due: list[_Op]) -> None:
        ops = self.ops
        for op in due:
            if op in ops:  # still awaited: no answer came in time
                ops.discard(op)
                op.fired = True
                op.driver.terminate()  # the pending operation fails at once


class _Op:
    __slots__ = ("deadline", "driver", "fired")

    def __init__(self, driver: Any, deadline: float) -> None:
        self.driver = driver
        self.deadline = deadline
        self.fired = False


_by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = weakref.WeakKeyDictionary()
_last: _Deadlines | None = None  # the common case: one loop; skips the weak-dict lookup


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    global _last  # noqa: PLW0603 - a one-entry cache
    last = _last
    if last is not None and last.loop is loop:
        return last
    found = _by_loop.get(loop)
    if found is None:
        found = _by_loop[loop] = _Deadlines(loop)
    _last = found
    return found


async def _killing_after(driver: Any, timeout: float, op: Any, what: str) -> None:  # noqa: ASYNC109 - the bound
    """Await ``op``; about ``timeout`` seconds in, terminate ``driver`` so that ``op`` fails at once."""
    loop = asyncio.get_running_loop()
    deadlines = _deadlines_of(loop)
    entry = _Op(driver, loop.time() + timeout)
    deadlines.add(entry)
    try:
        await op
    except Exception as exc:
        if entry.fired:
            raise TimeoutError(f"{what}: no answer within {timeout:g}s") from exc
        raise
    finally:
        deadlines.ops.discard(entry)
    if entry.fired:  # pragma: no cover - _kill skips answered operations; never hand on a killed connection
        raise TimeoutError(f"{what}: answered after the {timeout:g}s bound; the connection was terminated")


async def _verify(conn: AsyncConnection, budget: float) -> None:
    if budget <= 0:
        raise TimeoutError("no time left to verify the connection")
    sync = conn.sync_connection
    if sync is None:  # pragma: no cover - start() sets it
        raise RuntimeError("connection not started")
    fairy = sync.connection
    adapted = fairy.dbapi_connection
    driver: Any = fairy.driver_connection
    # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with the first statement
    # of a transaction. Sending it now proves the server answers and spares the
    # handler that round trip: SQLAlchemy sees a transaction already started.
    op = lazy_begin(adapted)
    if op is None:  # autocommit (no BEGIN to send) or an unknown adapter: a plain ping
        op = driver.execute(";")
    await _killing_after(driver, budget, op, "verifying the connection")


def _instant_checkout(sync_engine: Engine) -> bool:
    """True when checking out now takes an idle connection without touching any socket."""
    return idle_checkout_is_free(sync_engine)


async def acquire(engine: AsyncEngine, timeout: float) -> AsyncConnection:  # noqa: ASYNC109 - the bound
    """Check out a connection of ``engine`` and prove it answers, within ``timeout`` (hard).

    An idle pooled connection that turns out dead (the server restarted, a
    failover or a load balancer reset it) is discarded and the next one is
    tried, within the same bound, so one reset costs no request.

    Failure mode: raises ``TimeoutError`` at the bound, or the driver's error;
    a connection that failed its proof is terminated and returned to the pool
    invalidated. Cancellation propagates the same way.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    sync = engine.sync_engine
    retries = sync.pool.size() if isinstance(sync.pool, AsyncAdaptedQueuePool) else 0
    while True:
        instant = _instant_checkout(sync)
        if instant:
            conn = await engine.connect().start()  # no I/O happens here: nothing to bound
        else:
            conn = await hard_timeout(engine.connect().start(), max(deadline - loop.time(), 0.0))
        try:
            await _verify(conn, deadline - loop.time())
        except Exception as exc:
            await discard(conn)
            if instant and retries > 0 and not isinstance(exc, TimeoutError):
                retries -= 1
                continue  # it died while idle; the pool may hold a live one, or make one
            raise
        except BaseException:  # cancelled: give the connection back before propagating
            await discard(conn)
            raise
        return conn


async def discard(conn: AsyncConnection) -> None:
    """Terminate ``conn`` (no graceful close to wait for) and return it to the pool invalidated."""
    try:
        driver = _driver(conn)
        if driver is not None:
            driver.terminate()
        if not conn.invalidated:
            await conn.invalidate()
    finally:
        await conn.close()


async def release(conn: AsyncConnection, timeout: float) -> None:  # noqa: ASYNC109 - the bound
    """Return ``conn`` to its pool (rolling back what was not committed), within ``timeout``.

    Failure mode: raises ``TimeoutError`` (the connection was terminated at the
    bound) or the driver's error; the connection is back in the pool either way.
    """
    driver = _driver(conn)
    try:
        if driver is None:
            await conn.close()
        else:
            await _killing_after(driver, timeout, conn.close(), "returning the connection")
    finally:
        if not conn.closed:
            await discard(conn)


async def close_own(conn: AsyncConnection, timeout: float) -> None:  # noqa: ASYNC109 - the bound
    """Close ``conn`` for good (not back to its pool): gracefully within ``timeout``, else aborted.

    For the connections of a check's private pool, in ``AUTOCOMMIT`` (no
    transaction is left for SQLAlchemy to roll back on a closed connection
    when the block exits). asyncpg's own
    ``close(timeout=...)`` aborts the connection at its bound (the asyncpg
    maintainers' advice, sqlalchemy/sqlalchemy#10717), and a cancellation
    landing in it aborts it too. The pool's graceful close, bounded from
    outside instead (``hard_timeout`` around ``engine.dispose()``), logged
    an ERROR with a traceback ("Exception closing connection ...
    CancelledError") whenever the server went silent in between, though
    nothing leaked (``make chaos``'s log check found them). Then the pool
    forgets the connection (invalidated: nothing is left for it to close).

    Failure mode: never raises on the server's account; cancellation propagates.
    """
    driver = _driver(conn)
    if driver is not None:
        with contextlib.suppress(Exception):
            await driver.close(timeout=timeout)
    await conn.invalidate()
