"""Per-request state that the gate and the router share, kept in context variables.

A context variable, not the middleware instance: each request runs in its own
task (its own context), so state set here is private to that request and is
seen by everything the request awaits or spawns.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = ["Lease", "RequestContext", "current_connection", "request_context"]


class Lease:
    """The pooled connection the gate checked out for one request.

    The router binds sessions to it (one checkout per request); ``busy`` is set
    while a session uses it, so a concurrent second session checks out its own.
    """

    __slots__ = ("busy", "closed", "conn", "sync_engine")

    def __init__(self, conn: AsyncConnection) -> None:
        self.conn = conn
        self.sync_engine: Engine = conn.sync_engine
        self.busy = False
        self.closed = False

    def available_for(self, sync_engine: Engine) -> bool:
        """May a session of ``sync_engine`` use this connection now?"""
        return not self.busy and not self.closed and self.sync_engine is sync_engine


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
    """The connection :class:`~degrade.db.DBHealthMiddleware` checked out for this request.

    Run the request's queries on it and the request pays one pool checkout in
    total. It is returned to the pool (rolled back if you did not commit) when
    the request ends. Returns None outside a gated request (an excluded path,
    a background task that outlives its request, a read-only request served
    while the primary is down).

    Failure mode: none of its own; a query on it fails like any query (the
    middleware turns a database failure into a 503 if the response has not
    started). Do not share it between concurrent tasks: an asyncpg
    connection runs one operation at a time.
    """
    lease = LEASE.get()
    if lease is None or lease.closed:
        return None
    return lease.conn
