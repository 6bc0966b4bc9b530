"""DBHealthMiddleware: answer 503 fast when Postgres cannot serve, never pile up."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import observe
from ..dependency import Dependency
from ..exceptions import ConfigurationError, DependencyUnavailable
from ..responses import send_json, unavailable_body
from ._conn import acquire, release
from ._context import LEASE, REQUEST, Lease, RequestContext
from ._errors import is_database_failure
from ._settings import warn_if_unbounded

if TYPE_CHECKING:
    from ._router import ReadReplicaRouter

__all__ = ["DBHealthMiddleware"]

_READ_METHODS = frozenset({"GET", "HEAD"})


def _prefixes(label: str, value: str | Iterable[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """Prefix-match data: ``/api`` matches ``/api`` and ``/api/...`` but not ``/apix``."""
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            raise ConfigurationError(f"{label} takes path prefixes starting with '/'; got {item!r}")
    starts = tuple(p if p.endswith("/") else p + "/" for p in items)
    exact = frozenset(p.rstrip("/") or "/" for p in items)
    return starts, exact


def _matcher(include: str | Iterable[str], exclude: str | Iterable[str]) -> Callable[[str], bool]:
    inc_starts, inc_exact = _prefixes("include", include)
    exc_starts, exc_exact = _prefixes("exclude", exclude)
    if not inc_starts:
        raise ConfigurationError("include needs at least one path prefix, e.g. ('/api/',)")

    def gated(path: str) -> bool:
        return (path.startswith(inc_starts) or path in inc_exact) and not (
            path.startswith(exc_starts) or path in exc_exact
        )

    return gated


class DBHealthMiddleware:
    """Gate HTTP requests on Postgres: 503 at once while it is down, within a hard bound otherwise.

    For each gated request (HTTP, path under ``include`` and not under
    ``exclude``; everything else passes through untouched):

    * while ``dependency`` is down: 503 at once, without touching the pool or
      the handler (``read_only_fallback`` lets GET/HEAD through to a healthy
      replica, see below);
    * otherwise it checks out a pooled connection, bounded *hard* by
      ``acquire_timeout`` (the wait stops at the bound even while SQLAlchemy or
      asyncpg is still unwinding; that clean-up finishes in the background,
      counted and capped). No connection in time: 503 and one failure counted
      on ``dependency``. The connection is handed to the request
      (:func:`degrade.db.current_connection`, and the sessions of a
      :class:`~degrade.db.ReadReplicaRouter` on the same engine), so a request
      pays one pool checkout in total; it is returned when the request ends;
    * a database failure raised by the handler becomes a 503 while the
      response has not started (and counts a failure); after
      ``http.response.start`` it propagates. Other exceptions always propagate.

    Every 503 has the shared JSON body and ``Retry-After``, and is counted on
    the site ``degrade.db.DBHealthMiddleware`` (runbook, Prometheus). Nothing is
    logged per request. At construction it warns once (``db.engine.unbounded``)
    when the engine's settings leave a wait unbounded; see
    :func:`degrade.db.engine_options`.

    FAIL-LOUD: the database is the source of truth; without it the API answers
    503 quickly instead of piling requests up.

    Args:
        app: The ASGI app to wrap.
        engine: The primary ``AsyncEngine``.
        dependency: The Postgres :class:`~degrade.Dependency` (give it
            ``check=checks.sqlalchemy(engine)`` so a probe closes it).
        acquire_timeout: Hard bound, in seconds, on getting a connection.
        include: Path prefixes to gate (``"/api"`` matches ``/api`` and
            ``/api/...``, not ``/apix``).
        exclude: Path prefixes never gated (health routes, static files).
        retry_after: ``Retry-After`` seconds; defaults to the dependency's.
        read_only_fallback: While the primary is down, let GET/HEAD requests
            through when ``router`` has a healthy replica; their
            ``router.for_read()`` sessions use the replica and writes answer 503.
        router: The :class:`~degrade.db.ReadReplicaRouter` (needed by
            ``read_only_fallback``); its failures are answered as 503 too.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        engine: AsyncEngine,
        dependency: Dependency,
        acquire_timeout: float = 1.0,
        include: str | Iterable[str] = ("/",),
        exclude: str | Iterable[str] = (),
        retry_after: int | None = None,
        read_only_fallback: bool = False,
        router: ReadReplicaRouter | None = None,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigurationError(
                "engine must be a SQLAlchemy AsyncEngine (create_async_engine(...)); "
                f"got {type(engine).__name__}"
            )
        if engine.dialect.driver != "asyncpg":
            raise ConfigurationError(
                f"DBHealthMiddleware supports the asyncpg driver (postgresql+asyncpg://...); "
                f"got {engine.dialect.driver!r}"
            )
        if not isinstance(dependency, Dependency):
            raise ConfigurationError(
                f"dependency must be a degrade Dependency (registry.dependency(...)); got {dependency!r}"
            )
        if isinstance(acquire_timeout, bool) or not isinstance(acquire_timeout, int | float):
            raise ConfigurationError(f"acquire_timeout must be a number of seconds; got {acquire_timeout!r}")
        if not acquire_timeout > 0:
            raise ConfigurationError(f"acquire_timeout must be > 0 seconds; got {acquire_timeout!r}")
        if retry_after is None:
            retry_after = dependency.retry_after
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigurationError(
                f"retry_after must be a whole number of seconds >= 0; got {retry_after!r}"
            )
        self._replica_dep: Dependency | None = None
        if router is not None:
            router._attach_primary_dependency(dependency)
            self._replica_dep = router.dependency
        if read_only_fallback and (router is None or router.replica is None or self._replica_dep is None):
            raise ConfigurationError(
                "read_only_fallback=True needs router=ReadReplicaRouter(..., replica=..., dependency=...)"
            )
        self.app = app
        self.engine = engine
        self.dependency = dependency
        self.acquire_timeout = float(acquire_timeout)
        self.retry_after = retry_after
        self.read_only_fallback = bool(read_only_fallback)
        self._gated = _matcher(include, exclude)
        self._names = frozenset(
            {dependency.name} | ({self._replica_dep.name} if self._replica_dep is not None else set())
        )
        self._body = unavailable_body(dependency.name, f"{dependency.name} is unavailable")
        self._headers = {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
        self._site = dependency.add_site(
            "degrade.db.DBHealthMiddleware",
            "fail_loud",
            f"requests under the gated paths answer 503 (Retry-After: {retry_after}) while the "
            f"database is down or gives no connection within {acquire_timeout:g}s",
        )
        self.engine_problems = warn_if_unbounded(
            engine, acquire_timeout=self.acquire_timeout, component="DBHealthMiddleware"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._gated(scope["path"]):
            await self.app(scope, receive, send)
            return
        dep = self.dependency
        if dep.is_down:
            if (
                self.read_only_fallback
                and scope["method"] in _READ_METHODS
                and self._replica_dep is not None
                and not self._replica_dep.is_down
            ):
                await self._serve(scope, receive, send, None)
                return
            if not dep.admit():
                await self._refuse(send)
                return
        if not observe.may_abandon("db.gate"):
            # Too many abandoned clean-ups are still unwinding: do not add one.
            await self._refuse(send)
            return
        try:
            conn = await acquire(self.engine, self.acquire_timeout)
        except Exception as exc:  # no connection, whatever the reason (timeout, refused, auth): 503
            dep.record_failure(exc)
            await self._refuse(send)
            return
        dep.record_success()
        await self._serve(scope, receive, send, conn)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, conn: AsyncConnection | None) -> None:
        lease = Lease(conn) if conn is not None else None
        lease_token = LEASE.set(lease)
        request_token = REQUEST.set(RequestContext())
        started = False

        async def send_tracking_start(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking_start)
        except Exception as exc:
            answer = self._answer_for(exc)
            if answer is None or started:
                raise
            body, retry_after = answer
            await self._refuse(send, body, retry_after)
        finally:
            REQUEST.reset(request_token)
            LEASE.reset(lease_token)
            if lease is not None:
                await self._release(lease)

    def _answer_for(self, exc: Exception) -> tuple[bytes, int] | None:
        """The 503 for a handler's exception, or None if it is not a database failure."""
        if isinstance(exc, DependencyUnavailable):
            # Raised by the router, which counted the failure on the right dependency.
            if exc.dependency not in self._names:
                return None
            return unavailable_body(exc.dependency, exc.detail), exc.retry_after
        if not is_database_failure(exc):
            return None
        self.dependency.record_failure(exc)
        return self._body, self.retry_after

    async def _release(self, lease: Lease) -> None:
        lease.closed = True
        try:
            await release(lease.conn, self.acquire_timeout)
        except Exception as exc:
            # The response is out; a failed return to the pool only counts as a failure.
            if not (isinstance(exc, TimeoutError) or is_database_failure(exc)):
                raise
            self.dependency.record_failure(exc)

    async def _refuse(self, send: Send, body: bytes | None = None, retry_after: int | None = None) -> None:
        self._site.count()
        headers = (
            self._headers
            if retry_after is None
            else {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
        )
        await send_json(send, 503, self._body if body is None else body, headers)

    def __repr__(self) -> str:
        return (
            f"<DBHealthMiddleware dependency={self.dependency.name!r} "
            f"acquire_timeout={self.acquire_timeout:g}s read_only_fallback={self.read_only_fallback}>"
        )
