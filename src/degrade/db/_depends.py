"""The DB gate for one route: ``Depends(db_gate(engine=..., dependency=db))`` in FastAPI.

:class:`~degrade.db.DBHealthMiddleware` gates by path (and method); this gates
the routes that ask for it, so a cached ``GET /users/{id}`` can keep answering
through a Postgres outage while ``POST /users`` answers 503 at once. It is the
middleware's machinery (:class:`~degrade.db._gate.GateCore`: the fair line, the
hard-bounded checkout, the end of in-flight work when the database goes down),
driven from a FastAPI dependency with ``yield`` instead of an ASGI wrapper.

One gate per engine, dependency and bounds: ``db_gate(...)`` called again with
the same arguments returns the same gate (one line for the pool, one runbook
site), so writing ``Depends(db_gate(...))`` inline on every route is fine.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncEngine

from ..dependency import Dependency
from ..exceptions import DependencyUnavailable, Overloaded, scrubbed
from ._context import LEASE, REQUEST, Lease, RequestContext
from ._errors import is_database_failure
from ._gate import _OVERLOADED_DETAIL, GateCore, _validate_core

__all__ = ["DBGate", "db_gate"]

SITE_NAME = "degrade.db.db_gate"

_gates: weakref.WeakValueDictionary[tuple[int, int, float, int], DBGate] = weakref.WeakValueDictionary()


class DBGate(GateCore):
    """A FastAPI dependency that gates one route on Postgres; made by :func:`db_gate`.

    Failure mode: FAIL-LOUD, as :func:`db_gate` describes.
    """

    def __init__(
        self, *, engine: AsyncEngine, dependency: Dependency, acquire_timeout: float, retry_after: int
    ) -> None:
        self._init_core(
            engine,
            dependency,
            acquire_timeout,
            retry_after,
            replica_dep=None,
            site_name=SITE_NAME,
            site_reason=f"routes that depend on db_gate(...) answer 503 (Retry-After: {retry_after}) while "
            f"the database is down or gives no connection within {acquire_timeout:g}s; other routes run",
            component="db_gate",
        )

    async def __call__(self) -> AsyncIterator[None]:
        """Admit the request (or raise the 503), serve its connection, give it back at the end."""
        outer = LEASE.get()
        if outer is not None and not outer.closed and outer.sync_engine is self._sync_engine:
            yield  # the path is gated already (DBHealthMiddleware): one gate, one line per request
            return
        dep = self.dependency
        if dep.is_down:
            if not dep.admit():
                self._site.count()
                raise self._unavailable()
        elif self._slots.would_shed(self.acquire_timeout):
            # The line is longer than the pool can serve within the bound: say so now.
            self._site.shed("queue")
            if self._slots.stalled(self._stall_window):
                self._suspect_stall()
            raise Overloaded(dep.name, "queue", _OVERLOADED_DETAIL, retry_after=1)
        lease = Lease(self, self._sync_engine)
        lease_token = LEASE.set(lease)
        request_token = REQUEST.set(RequestContext())
        try:
            yield
        except Exception as exc:
            answer = self._answer(exc, lease.began)
            if answer is None:
                raise
            raise answer[0] from scrubbed(answer[1])
        finally:
            try:
                REQUEST.reset(request_token)
                LEASE.reset(lease_token)
            except ValueError:  # closed from another context (a finaliser): nothing of ours to undo
                pass
            lease.closed = True
            if lease.conn is not None:
                await self.checkin(lease)

    def _answer(
        self, exc: Exception, began: float | None = None
    ) -> tuple[DependencyUnavailable, BaseException] | None:
        """The 503 for the handler's database failure (and its cause), or None: ``exc`` goes on as is."""
        inner: BaseException = exc
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]  # a task group's wrapping (anyio)
        if isinstance(inner, DependencyUnavailable):
            # Raised by the lease's checkout, which counted the failure or the shed already.
            if inner.dependency_name == self.dependency.name and not isinstance(inner, Overloaded):
                self._site.count()
            return None
        if not isinstance(inner, Exception) or not is_database_failure(inner):
            return None
        self.dependency.record_failure(inner, started=began)
        self._site.count()
        return self._unavailable(), inner

    def __repr__(self) -> str:
        return f"<DBGate dependency={self.dependency.name!r} acquire_timeout={self.acquire_timeout:g}s>"


def db_gate(
    *,
    engine: AsyncEngine,
    dependency: Dependency,
    acquire_timeout: float = 1.0,
    retry_after: int | None = None,
) -> DBGate:
    """A FastAPI dependency that gates one route on Postgres, as ``DBHealthMiddleware`` gates a path.

    ``@app.post("/users", dependencies=[Depends(db_gate(engine=engine, dependency=db))])``:

    * while ``dependency`` is down: :class:`~degrade.DependencyUnavailable` at
      once (503 + ``Retry-After`` through :func:`degrade.exception_handlers`),
      before the handler runs or the pool is touched;
    * when the line waiting for a connection is longer than the pool can serve
      within ``acquire_timeout``: :class:`~degrade.Overloaded` at once (503,
      ``Retry-After: 1``, counted as shed, never a failure);
    * otherwise the handler runs, and its first :func:`degrade.db.connection`
      (``Depends(degrade.db.require_connection)``, declared after the gate)
      checks out a pooled connection in the gate's fair line, bounded hard by
      ``acquire_timeout``; :func:`degrade.db.current_connection` returns it
      afterwards; it goes back to the pool when the dependency's scope ends;
    * a database failure raised by the handler becomes
      ``DependencyUnavailable`` (one failure counted on ``dependency``);
      other exceptions pass unchanged;
    * when ``dependency`` goes down, connections of gated requests in flight
      are terminated and requests waiting in line are refused at once.

    Routes without the dependency are not gated: they keep answering (from a
    cache, say) while Postgres is down. A route under a
    :class:`~degrade.db.DBHealthMiddleware` on the same engine is gated once,
    by the middleware. Calls with the same engine, dependency and bounds return
    the same gate (one fair line, one runbook site ``degrade.db.db_gate``);
    a gate and a middleware on one engine keep separate lines, so prefer one
    of the two per engine.

    Needs ``FastAPI(exception_handlers=degrade.exception_handlers())`` for the
    503 body and ``Retry-After``.

    Failure mode: FAIL-LOUD: the route answers 503 quickly instead of waiting
    on a database that cannot serve it. Bad arguments raise
    :class:`~degrade.ConfigurationError` when called.

    Args:
        engine: The primary ``AsyncEngine`` (asyncpg).
        dependency: The Postgres :class:`~degrade.Dependency`.
        acquire_timeout: Hard bound, in seconds, on getting a connection.
        retry_after: ``Retry-After`` seconds; defaults to the dependency's.
    """
    retry_after = _validate_core(engine, dependency, acquire_timeout, retry_after, "db_gate")
    key = (id(engine), id(dependency), float(acquire_timeout), retry_after)
    gate = _gates.get(key)
    # A live gate holds its engine and dependency, so their ids cannot have been reused.
    if gate is None or gate.engine is not engine or gate.dependency is not dependency:
        gate = DBGate(
            engine=engine,
            dependency=dependency,
            acquire_timeout=float(acquire_timeout),
            retry_after=retry_after,
        )
        _gates[key] = gate
    return gate
