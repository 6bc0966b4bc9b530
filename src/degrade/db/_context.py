"""Per-request state that the gate and the router share, kept in context variables.

A context variable, not the middleware instance: each request runs in its own
task (its own context), so state set here is private to that request and is
seen by everything the request awaits or spawns.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from ..exceptions import ConfigurationError

__all__ = [
    "Lease",
    "LeaseSource",
    "RequestContext",
    "connection",
    "current_connection",
    "request_context",
    "require_connection",
]


class LeaseSource(Protocol):
    """What hands a :class:`Lease` its connection: the gate (its fair line, its bound)."""

    #: The request's whole budget for waiting on connections, seconds.
    acquire_timeout: float

    async def checkout(self, lease: Lease) -> AsyncConnection: ...

    async def checkin(self, lease: Lease) -> None: ...


class Lease:
    """One gated request's claim on a primary connection, checked out at its first use.

    Admission takes no connection: :meth:`connection` checks one out when the
    request first uses the database (in the gate's line, within what is left
    of the request's ``acquire_timeout``), so a request that waits on Redis,
    an HTTP call or its client holds no pool slot. The router binds its
    sessions to it and gives it back at the end of each block (the
    transaction is over), unless ``pinned`` by
    :func:`degrade.db.connection`, which keeps it until the request ends.
    ``busy`` is set while a session uses it, so a concurrent second session
    checks out its own.
    """

    __slots__ = (
        "began",
        "busy",
        "closed",
        "conn",
        "pinned",
        "primary_refused",
        "slot_at",
        "source",
        "sync_engine",
        "waited",
    )

    def __init__(self, source: LeaseSource, sync_engine: Engine) -> None:
        self.source = source
        self.sync_engine = sync_engine
        self.conn: AsyncConnection | None = None
        self.busy = False
        self.closed = False
        self.pinned = False
        #: True when the primary is down and the request was let through for the replica.
        self.primary_refused = False
        #: Seconds this request has waited for connections (its ``acquire_timeout`` budget).
        self.waited = 0.0
        #: When the gate's line handed this request its slot (the start of the slot's hold).
        self.slot_at = 0.0
        #: When its first checkout began, on the dependency's clock: a failure of work that
        #: was in flight through an outage and its recovery is stale (``record_failure(started=)``).
        self.began: float | None = None

    def available_for(self, sync_engine: Engine) -> bool:
        """May a session of ``sync_engine`` use this lease now?"""
        return not self.busy and not self.closed and self.sync_engine is sync_engine

    async def connection(self) -> AsyncConnection:
        """The connection, checked out now if the request has none yet."""
        conn = self.conn
        if conn is None:
            conn = self.conn = await self.source.checkout(self)
        return conn

    async def give_back(self) -> None:
        """Return the connection to the pool now, unless pinned (it is returned when the request ends)."""
        if self.conn is not None and not self.pinned:
            await self.source.checkin(self)


class RequestContext:
    """What one request (or one task, outside a request) did to the primary."""

    __slots__ = ("last_write",)

    def __init__(self) -> None:
        #: ``time.monotonic()`` of the last commit on a routed primary, or None.
        self.last_write: float | None = None

    def wrote_within(self, seconds: float) -> bool:
        """True if a commit happened less than ``seconds`` ago."""
        last = self.last_write
        return last is not None and time.monotonic() - last < seconds


LEASE: ContextVar[Lease | None] = ContextVar("degrade.db.lease", default=None)
REQUEST: ContextVar[RequestContext | None] = ContextVar("degrade.db.request", default=None)
ACTIVE_WRITE: ContextVar[AsyncSession | None] = ContextVar("degrade.db.active_write", default=None)


def request_context() -> RequestContext:
    """This request's context; created (for the current task) when there is none yet."""
    ctx = REQUEST.get()
    if ctx is None:
        ctx = RequestContext()
        REQUEST.set(ctx)
    return ctx


def current_connection() -> AsyncConnection | None:
    """The connection this gated request has checked out, if it has one yet.

    The gate checks out at the first database use (see :func:`connection`):
    inside a gated request that has not used the database yet this raises
    ``ConfigurationError`` saying to ``await degrade.db.connection()``
    instead. Returns None outside a gated request (an excluded path, a
    background task that outlives its request, a read-only request served
    while the primary is down).

    As a FastAPI dependency use ``Depends(degrade.db.require_connection)``
    instead: it checks the connection out, and on a path the gate does not
    cover it raises a ``ConfigurationError`` that says so, where this
    returns None (and the handler fails later on ``None.execute``).

    Failure mode: none of its own; see :func:`connection`.
    """
    lease = LEASE.get()
    if lease is None or lease.closed:
        return None
    if lease.conn is None:
        raise ConfigurationError(
            "DBHealthMiddleware checks out at first use: `conn = await degrade.db.connection()` "
            "(FastAPI: `Depends(degrade.db.connection)`) instead of current_connection()"
        )
    return lease.conn


async def connection() -> AsyncConnection:
    """This gated request's primary connection: checked out on the first call, kept until the request ends.

    The checkout waits in the gate's fair line (first come, first served)
    within what is left of the request's ``acquire_timeout`` and proves the
    connection with the ``BEGIN`` its first statement would send anyway; later
    calls return the same connection, so the request pays one checkout. It
    is returned to the pool (rolled back if you did not commit) when the
    request ends. Prefer the router's ``for_read()`` / ``for_write()`` blocks
    when the request does other slow work after its queries: they give the
    connection back at the end of each block.

    Failure mode: raises :class:`~degrade.DependencyUnavailable` (a 503 from
    the gate) when the database is down or gives no connection in time,
    :class:`~degrade.Overloaded` (a 503 too, not counted as a failure) when
    the line is longer than the pool can serve in time, and
    ``ConfigurationError`` outside a request gated by
    :class:`~degrade.db.DBHealthMiddleware` (it says the path is not gated and
    how to gate it). Do not share the connection between concurrent tasks: an
    asyncpg connection runs one operation at a time.

    :func:`require_connection` is this same function, under the name to use
    as a FastAPI dependency: ``Depends(degrade.db.require_connection)``.
    """
    lease = LEASE.get()
    if lease is None or lease.closed:
        raise ConfigurationError(
            "degrade.db.connection() needs a request gated by DBHealthMiddleware, and this one is "
            "not: its path is not under the gate's include= prefixes, or is under exclude= "
            "(or the call runs after its request ended, in a background task). Gate the path "
            '(include=("/api",), exclude=... without it; entries may name methods: "GET /users"), '
            "or use the engine directly outside the gate"
        )
    lease.pinned = True
    return await lease.connection()


#: :func:`connection` under the name to use as a FastAPI dependency:
#: ``conn: AsyncConnection = Depends(degrade.db.require_connection)``. It returns
#: this gated request's connection (checked out on first use), and on a path
#: the gate does not cover raises ``ConfigurationError`` saying so, where
#: ``Depends(current_connection)`` gives None.
require_connection = connection
