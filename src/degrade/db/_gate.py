"""DBHealthMiddleware: answer 503 fast when Postgres cannot serve, never pile up."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import _compat as compat
from .. import _validate, observe
from .._compat import sqlalchemy as compat_sqlalchemy
from ..dependency import Dependency
from ..exceptions import ConfigurationError, DependencyUnavailable, Overloaded, scrubbed
from ..responses import send_json, unavailable_body
from ._conn import _driver, acquire, pool_capacity, pool_full, release
from ._context import LEASE, REQUEST, Lease, RequestContext
from ._errors import is_database_failure
from ._match import matcher as _matcher
from ._settings import warn_problems
from ._slots import GRANTED, Slots

if TYPE_CHECKING:
    from ._router import ReadReplicaRouter

__all__ = ["DBHealthMiddleware", "GateCore"]

_READ_METHODS = frozenset({"GET", "HEAD"})
_OVERLOADED_DETAIL = "the database is busy: no pooled connection free in time, retry shortly"


def _validate_core(
    engine: AsyncEngine,
    dependency: Dependency,
    acquire_timeout: float,
    retry_after: int | None,
    component: str,
) -> int:
    """Check a gate's arguments; returns ``retry_after`` (the dependency's when None)."""
    if not isinstance(engine, AsyncEngine):
        raise ConfigurationError(
            f"engine must be a SQLAlchemy AsyncEngine (create_async_engine(...)); got {type(engine).__name__}"
        )
    if engine.dialect.driver != "asyncpg":
        raise ConfigurationError(
            f"{component} supports the asyncpg driver (postgresql+asyncpg://...); "
            f"got {engine.dialect.driver!r}"
        )
    if not isinstance(dependency, Dependency):
        raise ConfigurationError(
            f"dependency must be a degrade Dependency (registry.dependency(...)); got {dependency!r}"
        )
    _validate.seconds("acquire_timeout", acquire_timeout)
    if retry_after is None:
        retry_after = dependency.retry_after
    _validate.whole_seconds("retry_after", retry_after)
    return retry_after


class GateCore:
    """What every DB gate shares: the fair line, the bounded checkout, the end of work on an outage.

    :class:`DBHealthMiddleware` gates by path; ``degrade.db.db_gate`` gates one
    route as a FastAPI dependency. Both are a :class:`~degrade.db._context.LeaseSource`:
    the request's :class:`Lease` checks out through :meth:`checkout`.

    Failure mode: see :meth:`checkout`; a gate never raises on its own account.
    """

    read_only_fallback = False

    def _init_core(
        self,
        engine: AsyncEngine,
        dependency: Dependency,
        acquire_timeout: float,
        retry_after: int,
        *,
        replica_dep: Dependency | None,
        site_name: str,
        site_reason: str,
        component: str,
    ) -> None:
        self.engine = engine
        self.dependency = dependency
        self.acquire_timeout = acquire_timeout
        #: No slot given back for this long while all are held: the gate asks the server directly.
        self._stall_window = self.acquire_timeout / 2
        self.retry_after = retry_after
        self._replica_dep = replica_dep
        self._names = frozenset(
            {dependency.name} | ({replica_dep.name} if replica_dep is not None else set())
        )
        self._body = unavailable_body(dependency.name, f"{dependency.name} is unavailable")
        self._headers = {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
        self._site = dependency.add_site(site_name, "fail_loud", site_reason)
        self.engine_problems = warn_problems(
            engine, acquire_timeout=self.acquire_timeout, component=component
        )
        self._sync_engine = engine.sync_engine
        compat.report("sqlalchemy", compat_sqlalchemy.problems())
        self._clock = time.monotonic
        self._slots = Slots(pool_capacity(self._sync_engine))
        self._overloaded_body = unavailable_body(dependency.name, _OVERLOADED_DETAIL)
        self._active: set[Lease] = set()
        self._stall_check: asyncio.Task[None] | None = None
        self._stall_cleared_at = -math.inf  # when a stall check last found the server answering
        #: Connections of requests in flight terminated because the database went down.
        self.terminated = 0
        dependency.subscribe(self._on_transition)

    # -- the lease's source: fair checkout, check-in ----------------------------

    async def checkout(self, lease: Lease) -> AsyncConnection:
        """A proven primary connection for ``lease``, in arrival order, within its remaining budget.

        Failure mode: ``DependencyUnavailable`` when the database is down or
        failed (counted as a failure), ``Overloaded`` when local capacity ran
        out (counted as shed, never a failure).
        """
        dep = self.dependency
        if lease.primary_refused or (dep.is_down and not dep.admit()):
            raise self._unavailable()
        clock = self._clock
        started = clock()
        began = dep.since  # the last transition before this call: stale if a recovery follows
        if lease.began is None:
            lease.began = began
        budget = self.acquire_timeout - lease.waited
        slots = self._slots
        if budget <= 0:
            raise self._shed("budget")
        if not observe.may_abandon("db.gate"):
            raise self._shed("abandoned-cap")  # too many abandoned clean-ups unwind: add none
        if slots.try_take():
            lease.slot_at = started
        else:
            await self._wait_in_line(lease, budget, started)
        remaining = budget - (clock() - started)
        # Opening a connection is a one-off cost of a cold (or recycled) pool; counted in the
        # hold it made the first holds of a burst look slow and the line shed healthy work.
        opens = not compat_sqlalchemy.idle_checkout_is_free(self._sync_engine)
        try:
            conn = await acquire(self.engine, remaining)
        except Exception as exc:
            lease.waited += clock() - started
            slots.release(None)
            if isinstance(exc, TimeoutError):
                if pool_full(self._sync_engine):
                    # Every pooled connection is out (to users outside the gate too): saturation.
                    raise self._shed("pool-saturated") from scrubbed(exc)
                if remaining < self.acquire_timeout / 2:
                    # Most of the budget went waiting in line: a connect or BEGIN that could
                    # not finish in what was left says nothing about the server.
                    raise self._shed("budget") from scrubbed(exc)
            dep.record_failure(exc, started=began)
            raise self._unavailable() from scrubbed(exc)
        except BaseException:
            lease.waited += clock() - started
            slots.release(None)
            raise
        now = clock()
        lease.waited += now - started
        if opens:
            lease.slot_at = now
        dep.record_success()
        self._active.add(lease)
        return conn

    async def _wait_in_line(self, lease: Lease, budget: float, started: float) -> None:
        """Wait for a slot (sets ``lease.slot_at``); raises the refusal when none comes."""
        slots = self._slots
        if slots.stalled(self._stall_window):
            self._suspect_stall()  # a line that has not moved for half the bound: at once, not at its end
        outcome, lease.slot_at = await slots.take_at(budget)
        if outcome == GRANTED:
            return
        lease.waited += self._clock() - started
        if outcome == "down":
            raise self._unavailable()
        raise self._shed(outcome)

    async def checkin(self, lease: Lease) -> None:
        """Return ``lease``'s connection to the pool (bounded) and its slot to the line."""
        conn, lease.conn = lease.conn, None
        if conn is None:
            return
        self._active.discard(lease)
        returned = False
        try:
            await release(conn, self.acquire_timeout)
            returned = True
        except Exception as exc:
            # The work is done; a failed return to the pool only counts as a failure.
            if not (isinstance(exc, TimeoutError) or is_database_failure(exc)):
                raise
            self.dependency.record_failure(exc, started=lease.began)
        finally:
            # The hold runs from the hand-over to the return (waking the request, BEGIN and
            # ROLLBACK occupy the slot too). A failed return (a ROLLBACK that hung on a silent
            # server) is no progress and no hold: it hid a stall from the waiters shed just
            # after it (down 0.5-1 s later) and stretched the hold estimate to the bound.
            self._slots.release(self._clock() - lease.slot_at if returned else None)

    def _unavailable(self) -> DependencyUnavailable:
        dep = self.dependency
        return DependencyUnavailable(dep.name, f"{dep.name} is unavailable", retry_after=self.retry_after)

    def _shed(self, reason: str) -> Overloaded:
        self._site.shed(reason)
        if self._slots.stalled(self._stall_window):
            self._suspect_stall()
        return Overloaded(self.dependency.name, reason, _OVERLOADED_DETAIL, retry_after=1)

    # -- outages: end the work in flight, confirm a stall ------------------------

    def _on_transition(self, dep: Dependency) -> None:
        """The database went down: end what waits on it now instead of at its own timeout."""
        if not dep.is_down:
            return
        self._slots.refuse_all("down")
        for lease in list(self._active):
            conn = lease.conn
            driver = _driver(conn) if conn is not None else None
            if driver is not None:
                driver.terminate()  # its pending query fails at once; the handler answers 503
                self.terminated += 1

    def _suspect_stall(self) -> None:
        """Every slot is held and none came back for half the bound: ask the server directly, once.

        Checked wherever the line refuses someone, at admission too: with every
        slot held by queries on a silent server, the line's rate falls and
        newcomers are shed at once, so none waited long enough to notice
        (``make chaos``: ``db`` went down only at +4.96 s, by the health check,
        and the requests in flight waited for ``command_timeout``). And when
        someone joins the line: waiting for the first refusal put the check a
        whole bound after the last release (``make chaos --smoke`` on a slower
        VM: down at +1.78 s). Half the bound: a legitimately slow pool costs at
        most one check per half bound.
        """
        task = self._stall_check
        if task is not None and not task.done():
            return
        if self._clock() - self._stall_cleared_at < self._stall_window:
            return  # the server answered a check just now: a slow pool costs a check per window
        self._stall_check = asyncio.get_running_loop().create_task(
            self._confirm_stall(), name=f"degrade.db.stall-check[{self.dependency.name}]"
        )

    async def _confirm_stall(self) -> None:
        dep = self.dependency
        answered = dep.answered
        result = await dep.run_check(reason="stalled")
        if result.ok:
            self._stall_cleared_at = self._clock()
        if result.ok or dep.is_down:
            return
        quiet = dep.clock() - dep.answered_at >= self._stall_window / 2
        if self._slots.stalled(self._stall_window) or dep.answered == answered or quiet:
            # The held connections make no progress and a fresh one fails too: the server is gone.
            # Any proof will do: a slot given back while the check ran (a request that failed
            # on something else, or a gated read served by the replica) does not make a silent
            # server any less silent, as long as no checkout succeeded meanwhile (``make chaos``:
            # one such release put the next check 0.8 s later, and the primary went down at
            # +2.4 s instead of +1.3 s); nor does a checkout answered early in the check's run
            # when nothing was answered in its last quarter bound (a reply read just after the
            # fault began: the primary went down at +2.19 s, by traffic).
            dep.mark_down(reason="stalled")


class DBHealthMiddleware(GateCore):
    """Gate HTTP requests on Postgres: 503 at once while it is down, within a hard bound otherwise.

    For each gated request (HTTP, path under ``include`` and not under
    ``exclude``; everything else passes through untouched):

    * while ``dependency`` is down: 503 at once, without touching the pool or
      the handler (``read_only_fallback`` lets GET/HEAD through to a healthy
      replica, see below);
    * when the line of requests waiting for a connection is already longer
      than the pool can serve within ``acquire_timeout`` (at the hold time it
      measures): 503 at once, counted as *shed* (saturation is not an outage);
    * otherwise the handler runs, and the request's first database use
      (:func:`degrade.db.connection`, or a session of a
      :class:`~degrade.db.ReadReplicaRouter` on the same engine) checks out a
      pooled connection: in arrival order, at most ``pool_size +
      max_overflow`` at once, bounded *hard* by what is left of
      ``acquire_timeout`` (the wait stops at the bound even while SQLAlchemy
      or asyncpg is still unwinding; that clean-up finishes in the background,
      counted and capped), proven by the ``BEGIN`` its first statement sends
      anyway. A failed or silent checkout is a 503 and one failure counted on
      ``dependency``; no free slot in time is a 503 counted as shed, never a
      failure. A router block gives the connection back when it ends; one
      from ``connection()`` goes back when the request ends;
    * a database failure raised by the handler becomes a 503 while the
      response has not started (and counts a failure); after
      ``http.response.start`` it propagates. Other exceptions always propagate;
    * when ``dependency`` goes down, the connections of requests in flight
      are terminated (their pending query fails at once, so they answer 503)
      and the requests waiting in line get their 503 at once.

    Every 503 has the shared JSON body and ``Retry-After`` (1 s when shed), and
    is counted on the site ``degrade.db.DBHealthMiddleware`` (runbook,
    Prometheus: degraded calls for outages, ``degrade_shed_total`` for
    shedding). Nothing is logged per request. At construction it warns once
    (``db.engine.unbounded``) when the engine's settings leave a wait
    unbounded; see :func:`degrade.db.engine_options`.

    FAIL-LOUD: the database is the source of truth; without it the API answers
    503 quickly instead of piling requests up.

    Args:
        app: The ASGI app to wrap.
        engine: The primary ``AsyncEngine``.
        dependency: The Postgres :class:`~degrade.Dependency` (give it
            ``check=checks.sqlalchemy(engine)`` so a probe closes it).
        acquire_timeout: Hard bound, in seconds, on getting a connection.
        include: Path prefixes to gate (``"/api"`` matches ``/api`` and
            ``/api/...``, not ``/apix``); an entry may name methods first
            (``"GET /users"``, ``"POST|PUT /api"``; ``GET`` covers ``HEAD``).
        exclude: Path prefixes never gated (health routes, static files),
            with methods too (``"GET /users"`` leaves a cached read ungated
            while writes to ``/users`` stay gated); exclude wins.
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
        retry_after = _validate_core(engine, dependency, acquire_timeout, retry_after, "DBHealthMiddleware")
        replica_dep: Dependency | None = None
        if router is not None:
            router._attach_primary_dependency(dependency)
            replica_dep = router.dependency
        if read_only_fallback and (router is None or router.replica is None or replica_dep is None):
            raise ConfigurationError(
                "read_only_fallback=True needs router=ReadReplicaRouter(..., replica=..., dependency=...)"
            )
        self.app = app
        self.read_only_fallback = bool(read_only_fallback)
        self._gated = _matcher(include, exclude)
        self._init_core(
            engine,
            dependency,
            float(acquire_timeout),
            retry_after,
            replica_dep=replica_dep,
            site_name="degrade.db.DBHealthMiddleware",
            site_reason=f"requests under the gated paths answer 503 (Retry-After: {retry_after}) while the "
            f"database is down or gives no connection within {acquire_timeout:g}s",
            component="DBHealthMiddleware",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._gated(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        dep = self.dependency
        lease = Lease(self, self._sync_engine)
        if dep.is_down:
            if (
                self.read_only_fallback
                and scope["method"] in _READ_METHODS
                and self._replica_dep is not None
                and not self._replica_dep.is_down
            ):
                lease.primary_refused = True  # reads go to the replica; the primary is not tried
                await self._serve(scope, receive, send, lease)
                return
            if not dep.admit():
                await self._refuse(send)
                return
        elif self._slots.would_shed(self.acquire_timeout) and not (
            self.read_only_fallback and scope["method"] in _READ_METHODS
        ):
            # The line is longer than the pool can serve within the bound: say so now.
            self._site.shed("queue")
            if self._slots.stalled(self._stall_window):
                self._suspect_stall()  # shed at admission, nobody waits long enough to notice
            await self._refuse(send, self._overloaded_body, 1, count=False)
            return
        await self._serve(scope, receive, send, lease)

    # -- serving -----------------------------------------------------------------

    async def _serve(self, scope: Scope, receive: Receive, send: Send, lease: Lease) -> None:
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
            answer = self._answer_for(exc, lease.began)
            if answer is None or started:
                raise
            body, retry_after, outage = answer
            await self._refuse(send, body, retry_after, count=outage)
        finally:
            REQUEST.reset(request_token)
            LEASE.reset(lease_token)
            lease.closed = True
            if lease.conn is not None:
                await self.checkin(lease)

    def _answer_for(self, exc: Exception, began: float | None = None) -> tuple[bytes, int, bool] | None:
        """The 503 for a handler's exception (body, Retry-After, is it an outage), or None."""
        while isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # a task group's wrapping (Starlette's streaming, anyio)
        if isinstance(exc, DependencyUnavailable):
            # Raised by the lease or the router, which counted it on the right dependency.
            if exc.dependency_name not in self._names:
                return None
            if isinstance(exc, Overloaded):
                if exc.dependency_name == self.dependency.name:
                    return self._overloaded_body, exc.retry_after, False
                return unavailable_body(exc.dependency_name, exc.detail), exc.retry_after, False
            return unavailable_body(exc.dependency_name, exc.detail), exc.retry_after, True
        if not is_database_failure(exc):
            return None
        self.dependency.record_failure(exc, started=began)
        return self._body, self.retry_after, True

    async def _refuse(
        self, send: Send, body: bytes | None = None, retry_after: int | None = None, *, count: bool = True
    ) -> None:
        if count:
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
