"""degrade.db against the real Postgres: outages from the fault proxy, lag from a real standby."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from degrade import CheckFailed, Dependency, DependencyUnavailable, Registry, Severity, _bounded, checks
from degrade.db import (
    DBHealthMiddleware,
    NotAStandby,
    ReadReplicaRouter,
    ReadYourWritesMiddleware,
    _conn,
    connection,
    current_connection,
    engine_options,
    replica_lag,
    require_connection,
)
from degrade.testing import FaultProxy

from ..conftest import IN_CI
from .pg_cluster import ClusterUnavailable, PgCluster, start_cluster

pytestmark = pytest.mark.integration

#: The gate's bound in these tests (shorter than the default 1 s to keep them fast).
ACQUIRE = 0.5
#: Margin on top of a bound: the tests share 2 CPUs with other work. The bench
#: measures the precise numbers (docs/postgres.md, bench/RESULTS.md).
MARGIN = 0.35


# -- fixtures -----------------------------------------------------------------


@pytest.fixture
async def engine(pg_proxy: FaultProxy, postgres_dsn: str) -> AsyncIterator[AsyncEngine]:
    """The app's engine, through the proxy, with degrade's bounded settings."""
    eng = create_async_engine(
        pg_proxy.url_for(postgres_dsn), **engine_options(acquire_timeout=ACQUIRE, command_timeout=2.0)
    )
    try:
        yield eng
    finally:
        await _bounded.settle_abandoned(5.0)
        await eng.dispose()


@pytest.fixture
def db(registry: Registry, engine: AsyncEngine) -> Dependency:
    """The Postgres dependency; its probe checks through the proxy every ~0.2 s."""
    return registry.dependency(
        "db",
        severity=Severity.SEV1,
        check=checks.sqlalchemy(engine, timeout=0.4),
        recovery_interval=0.2,
        check_timeout=0.4,
    )


@pytest.fixture
async def table(postgres_dsn: str, unique: str) -> AsyncIterator[str]:
    """A fresh table in the test's own schema; the schema is dropped at teardown."""
    direct = create_async_engine(postgres_dsn)
    try:
        async with direct.begin() as conn:
            await conn.execute(text(f"CREATE SCHEMA {unique}"))
            await conn.execute(text(f"CREATE TABLE {unique}.items (id int PRIMARY KEY, name text NOT NULL)"))
        yield f"{unique}.items"
    finally:
        async with direct.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {unique} CASCADE"))
        await direct.dispose()


class Checkouts:
    """Counts an engine's pool checkouts, by their check-ins.

    A ``checkout`` listener would do too, but it takes the pool off its
    no-I/O fast path (a listener may send queries), which is the path to test.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self.count = 0
        event.listen(engine.sync_engine, "checkin", self._on_checkin)

    def _on_checkin(self, *args: Any) -> None:
        self.count += 1


def build_app(
    engine: AsyncEngine,
    db: Dependency,
    table: str = "",
    *,
    router: ReadReplicaRouter | None = None,
    **gate: Any,
) -> Starlette:
    """A small API: raw reads on the gate's connection, routed reads and writes, a health route."""
    router = router or ReadReplicaRouter(primary=engine)

    async def ping(request: Request) -> Response:
        conn = await connection()
        return JSONResponse({"one": (await conn.execute(text("SELECT 1"))).scalar()})

    async def write(request: Request) -> Response:
        item = int(request.path_params["item"])
        async with router.for_write() as session:
            insert = text(f"INSERT INTO {table} VALUES (:id, :n)")  # noqa: S608 - the test's own table
            await session.execute(insert, {"id": item, "n": f"n{item}"})
            await session.commit()
            async with router.for_read() as again:  # read-your-writes in the same request
                where = (await again.execute(text("SELECT pg_is_in_recovery()"))).scalar()
        return JSONResponse({"id": item, "read_on_standby": where})

    async def read(request: Request) -> Response:
        item = int(request.path_params["item"])
        async with router.for_read() as session:
            select = text(f"SELECT name FROM {table} WHERE id = :id")  # noqa: S608 - the test's own table
            name = (await session.execute(select, {"id": item})).scalar()
            standby = (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar()
        return JSONResponse({"name": name, "standby": standby})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        Route("/api/ping", ping),
        Route("/api/items/{item}", write, methods=["POST"]),
        Route("/api/items/{item}", read, methods=["GET"]),
        Route("/api/health", health),
    ]
    middleware = [
        Middleware(
            DBHealthMiddleware,
            engine=engine,
            dependency=db,
            acquire_timeout=ACQUIRE,
            include=("/api",),
            exclude=("/api/health",),
            router=router,
            **gate,
        )
    ]
    return Starlette(routes=routes, middleware=middleware)


def client(app: Any) -> httpx.AsyncClient:
    """An in-process HTTP client (the app's exceptions propagate to the test)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


async def timed_get(c: httpx.AsyncClient, path: str) -> tuple[int, float]:
    """Status and seconds of one GET."""
    start = time.monotonic()
    response = await c.get(path)
    return response.status_code, time.monotonic() - start


async def wait_for(predicate: Any, timeout: float = 5.0) -> float:  # noqa: ASYNC109 - test helper bound
    """Poll ``predicate`` until true; returns the seconds it took (fails the test at ``timeout``)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def warm(c: httpx.AsyncClient, n: int) -> None:
    """Fill the pool with ``n`` idle connections (n concurrent requests)."""
    results = await asyncio.gather(*(c.get("/api/ping") for _ in range(n)))
    assert {r.status_code for r in results} == {200}


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def settle(engine: AsyncEngine) -> None:
    """Wait for abandoned clean-ups, then check nothing is left checked out."""
    assert await _bounded.settle_abandoned(5.0) == 0
    await wait_for(lambda: engine.pool.checkedout() == 0)
    gc.collect()  # a connection dropped without check-in would warn here (warnings are errors)


# -- the gate -------------------------------------------------------------------


class TestHealthyPath:
    async def test_one_checkout_per_request(self, engine: AsyncEngine, db: Dependency, table: str) -> None:
        """A request that reads on the gate's connection and writes through the router checks out once."""
        checkouts = Checkouts(engine)
        async with client(build_app(engine, db, table)) as c:
            assert (await c.get("/api/ping")).json() == {"one": 1}
            assert checkouts.count == 1
            assert _conn._instant_checkout(engine.sync_engine)  # the idle connection is taken without I/O
            response = await c.post("/api/items/1")
            assert response.json() == {"id": 1, "read_on_standby": False}
            assert checkouts.count == 2
            assert (await c.get("/api/items/1")).json() == {"name": "n1", "standby": False}
            assert checkouts.count == 3
        assert engine.pool.checkedout() == 0
        assert db.state == "ok"

    async def test_uncommitted_work_is_rolled_back(
        self, engine: AsyncEngine, db: Dependency, table: str
    ) -> None:
        """What a handler does not commit on the gate's connection is rolled back at the end."""

        async def sloppy(request: Request) -> Response:
            conn = await connection()
            await conn.execute(text(f"INSERT INTO {table} VALUES (7, 'x')"))  # noqa: S608
            return JSONResponse({})

        app = build_app(engine, db, table)
        app.router.routes.append(Route("/api/sloppy", sloppy))
        async with client(app) as c:
            assert (await c.get("/api/sloppy")).status_code == 200
            assert (await c.get("/api/items/7")).json()["name"] is None
        assert current_connection() is None

    async def test_excluded_route_never_touches_the_database(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """The health route answers 200 without a checkout, even with Postgres refused."""
        checkouts = Checkouts(engine)
        async with client(build_app(engine, db)) as c:
            pg_proxy.refuse()
            assert (await c.get("/api/health")).status_code == 200
        assert checkouts.count == 0
        assert db.state == "ok"


class TestHardBound:
    @pytest.mark.parametrize("pool", ["idle-connection", "empty", "pre-ping"])
    async def test_first_503_within_the_bound(
        self, pg_proxy: FaultProxy, postgres_dsn: str, registry: Registry, pool: str
    ) -> None:
        """Blackholed: the first 503 comes at acquire_timeout, whatever the pool holds or pings.

        "empty" uses SQLAlchemy's defaults (asyncpg connect timeout 60 s, pool_timeout 30 s).
        """
        url = pg_proxy.url_for(postgres_dsn)
        if pool == "empty":
            eng = create_async_engine(url)
        else:
            eng = create_async_engine(url, **engine_options(pool_pre_ping=pool == "pre-ping"))
        dep = registry.dependency("db", severity=Severity.SEV1)
        try:
            async with client(build_app(eng, dep)) as c:
                if pool != "empty":
                    await warm(c, 2)
                pg_proxy.blackhole()
                status, seconds = await timed_get(c, "/api/ping")
                assert status == 503
                assert ACQUIRE - 0.01 <= seconds <= ACQUIRE + MARGIN
                assert dep.failures == 1
                pg_proxy.up()
            await settle(eng)
        finally:
            await eng.dispose()


class TestCancellation:
    @pytest.mark.parametrize("pool", ["idle-connection", "empty"])
    async def test_cancelled_while_waiting(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy, pool: str
    ) -> None:
        """A request cancelled (client gone, shutdown) while the gate waits: CancelledError, nothing leaks."""
        app = build_app(engine, db)
        if pool == "idle-connection":
            async with client(app) as c:
                await warm(c, 1)
        pg_proxy.blackhole()
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/api/ping",
            "raw_path": b"/api/ping",
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "headers": [],
            "server": ("t", 80),
            "client": ("c", 1),
            "http_version": "1.1",
            "asgi": {"version": "3.0"},
        }
        task = asyncio.get_running_loop().create_task(app(scope, receive, send))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent == []
        assert db.failures == 0  # a cancellation is not the database's failure
        pg_proxy.up()
        await settle(engine)


class TestPileUp:
    async def test_200_concurrent_requests_against_a_blackhole(
        self, pg_proxy: FaultProxy, postgres_dsn: str, registry: Registry
    ) -> None:
        """Each answered within the bound; attempts capped by the pool; RSS flat; nothing leaks."""
        in_flight = peak = 0
        parts = urlsplit(pg_proxy.url_for(postgres_dsn))
        import asyncpg

        async def counted_connect() -> Any:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await asyncpg.connect(
                    host=parts.hostname, port=parts.port, user="postgres", database="test", timeout=5.0
                )
            finally:
                in_flight -= 1

        eng = create_async_engine(
            "postgresql+asyncpg://",
            async_creator=counted_connect,
            pool_size=5,
            max_overflow=5,
            pool_timeout=ACQUIRE,
        )
        dep = registry.dependency("db", severity=Severity.SEV1, failure_threshold=1000)  # stay "ok"
        try:
            async with client(build_app(eng, dep)) as c:
                await warm(c, 5)
                pg_proxy.blackhole()
                rss_before = rss_bytes()
                results = await asyncio.gather(*(timed_get(c, "/api/ping") for _ in range(200)))
                rss_after = rss_bytes()
                abandoned = _bounded.abandoned_in_flight()
                assert {status for status, _ in results} == {503}
                assert max(seconds for _, seconds in results) <= ACQUIRE + 0.2 + MARGIN
                assert peak <= 10
                assert abandoned <= _bounded.MAX_ABANDONED
                assert rss_after - rss_before < 20 * 1024 * 1024
                pg_proxy.up()
                await settle(eng)
                assert (await c.get("/api/ping")).status_code == 200
            await settle(eng)
        finally:
            await eng.dispose()
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert leftovers == []  # no abandoned checkout, asyncpg cancel request or timer task pending


class TestOutages:
    async def test_refused(self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy) -> None:
        """Refused: 503 at once; down after 3; then no checkout at all; back within ~1 s of up()."""
        checkouts = Checkouts(engine)
        async with client(build_app(engine, db)) as c:
            await warm(c, 2)
            pg_proxy.refuse()
            for _ in range(3):
                status, seconds = await timed_get(c, "/api/ping")
                assert status == 503
                assert seconds < 0.3
            assert db.is_down
            before = checkouts.count
            for _ in range(10):
                assert (await c.get("/api/ping")).status_code == 503
            assert checkouts.count == before
            pg_proxy.up()
            assert await wait_for(lambda: not db.is_down) < 1.0 + MARGIN
            assert (await c.get("/api/ping")).status_code == 200
        await settle(engine)

    async def test_blackholed_then_back(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """Blackholed: down after the threshold, 503 in microseconds while down, back after up()."""
        async with client(build_app(engine, db)) as c:
            await warm(c, 2)
            pg_proxy.blackhole()
            results = await asyncio.gather(*(timed_get(c, "/api/ping") for _ in range(3)))
            assert {s for s, _ in results} == {503}
            assert db.is_down
            status, seconds = await timed_get(c, "/api/ping")
            assert status == 503
            assert seconds < 0.05
            accepted = pg_proxy.stats().accepted
            await asyncio.sleep(0.05)
            for _ in range(20):
                await c.get("/api/ping")
            assert pg_proxy.stats().accepted - accepted <= 1  # at most the probe, never the requests
            pg_proxy.up()
            assert await wait_for(lambda: not db.is_down) < 1.0 + MARGIN
            assert (await c.get("/api/ping")).status_code == 200
        await settle(engine)

    async def test_reset_costs_no_request(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """After a reset every pooled connection is dead; requests still succeed (fresh connections)."""
        async with client(build_app(engine, db)) as c:
            await warm(c, 4)
            pg_proxy.reset()
            for _ in range(6):
                assert (await c.get("/api/ping")).status_code == 200
        assert db.failures == 0
        assert db.state == "ok"
        await settle(engine)

    async def test_latency(self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy) -> None:
        """Slower than the bound is an outage (503 at the bound); a little latency is not."""
        async with client(build_app(engine, db)) as c:
            await warm(c, 1)
            pg_proxy.latency(0.05)
            assert (await c.get("/api/ping")).status_code == 200
            pg_proxy.latency(0.4)  # BEGIN alone takes 0.8 s now
            status, seconds = await timed_get(c, "/api/ping")
            assert status == 503
            assert seconds <= ACQUIRE + MARGIN
            pg_proxy.up()
            assert (await c.get("/api/ping")).status_code == 200
        await settle(engine)


class TestMidRequest:
    async def test_failure_before_the_response_is_a_503(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """The connection dies under the handler's query: 503 (shared body) and one failure."""

        async def dies(request: Request) -> Response:
            conn = await connection()
            pg_proxy.reset()
            await conn.execute(text("SELECT 1"))
            return JSONResponse({})

        app = build_app(engine, db)
        app.router.routes.append(Route("/api/dies", dies))
        async with client(app) as c:
            response = await c.get("/api/dies")
        assert response.status_code == 503
        assert response.json()["dependency"] == "db"
        assert response.headers["retry-after"] == "5"
        assert db.failures == 1
        await settle(engine)

    async def test_failure_after_the_response_started_propagates(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """Once http.response.start is out, the database error propagates (and still counts)."""

        async def stream(request: Request) -> Response:
            conn = await connection()

            async def body() -> AsyncIterator[bytes]:
                yield b"first chunk\n"
                pg_proxy.reset()
                await conn.execute(text("SELECT 1"))
                yield b"never\n"

            return StreamingResponse(body())

        app = build_app(engine, db)
        app.router.routes.append(Route("/api/stream", stream))
        async with client(app) as c:
            with pytest.raises(Exception) as info:
                await c.get("/api/stream")
        error = info.value
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # Starlette < 0.44 wraps a streaming body's error in a group
        assert "connection" in str(error).lower()
        assert db.failures == 1
        await settle(engine)

    async def test_work_cut_by_an_ended_outage_is_stale(self, engine: AsyncEngine, db: Dependency) -> None:
        """A query cut when the database went down fails after it recovered: 503, but no new failure."""

        async def cut(request: Request) -> Response:
            conn = await connection()
            await conn.execute(text("SELECT 1"))
            db.mark_down()  # the gate ends the work in flight (terminates its connections)...
            db.record_success()  # ...and the database is back before this request notices
            await conn.execute(text("SELECT 1"))
            return JSONResponse({})

        app = build_app(engine, db)
        app.router.routes.append(Route("/api/cut", cut))
        async with client(app) as c:
            response = await c.get("/api/cut")
            assert response.status_code == 503
            assert (db.state, db.failures, db.stale_failures) == ("ok", 0, 1)
            assert (await c.get("/api/ping")).status_code == 200
        await settle(engine)

    async def test_a_commit_cut_under_read_your_writes_is_a_503_not_a_500(
        self,
        engine: AsyncEngine,
        db: Dependency,
        table: str,
        pg_proxy: FaultProxy,
        registry: Registry,
    ) -> None:
        """The connection dies under COMMIT: 503 as ever; the WAL position is skipped, not a 500."""
        replica = create_async_engine(engine.url, **engine_options(command_timeout=2.0))  # not read here
        router = ReadReplicaRouter(
            primary=engine,
            replica=replica,
            dependency=replica_dep(registry),
            primary_dependency=db,
            read_your_writes=True,
            sticky_after_write=0,
        )

        async def cut(request: Request) -> Response:
            async with router.for_write() as session:
                await session.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))  # noqa: S608 - the test's table
                pg_proxy.reset()
                await session.commit()
            return JSONResponse({})

        app = Starlette(
            routes=[Route("/api/cut", cut, methods=["POST"])],
            middleware=[
                Middleware(ReadYourWritesMiddleware, secret=b"0123456789abcdef0123", secure=False),
                Middleware(
                    DBHealthMiddleware, engine=engine, dependency=db, acquire_timeout=ACQUIRE, router=router
                ),
            ],
        )
        try:
            async with client(app) as c:
                response = await c.post("/api/cut")
            assert response.status_code == 503
            assert response.json()["dependency"] == "db"
            assert router.positions_failed == 1
        finally:
            await router.aclose()
            await replica.dispose()
        await settle(engine)

    async def test_bugs_propagate(self, engine: AsyncEngine, db: Dependency, table: str) -> None:
        """A constraint violation is a bug, not an outage: it propagates and counts nothing."""
        async with client(build_app(engine, db, table)) as c:
            assert (await c.post("/api/items/1")).status_code == 200
            with pytest.raises(IntegrityError):
                await c.post("/api/items/1")
        assert db.failures == 0
        await settle(engine)


class TestGateEntries:
    async def test_method_exclusion_and_require_connection(
        self, engine: AsyncEngine, db: Dependency, table: str
    ) -> None:
        """exclude='GET /api/items': the read runs ungated (require_connection says so), writes are gated."""
        seen: list[str] = []

        async def items(request: Request) -> Response:
            try:
                conn = await require_connection()
            except Exception as exc:
                seen.append(type(exc).__name__)
                return JSONResponse({"gated": False})
            seen.append("gated")
            return JSONResponse({"gated": True, "one": (await conn.execute(text("SELECT 1"))).scalar()})

        app = Starlette(
            routes=[Route("/api/items", items, methods=["GET", "POST"])],
            middleware=[
                Middleware(
                    DBHealthMiddleware,
                    engine=engine,
                    dependency=db,
                    acquire_timeout=ACQUIRE,
                    include="/api",
                    exclude="GET /api/items",
                )
            ],
        )
        async with client(app) as c:
            assert (await c.get("/api/items")).json() == {"gated": False}
            assert (await c.post("/api/items")).json() == {"gated": True, "one": 1}
        assert seen == ["ConfigurationError", "gated"]
        await settle(engine)


class TestSameServerReplica:
    """Both URLs on the same primary (development): what the router does with and without max_lag."""

    async def test_max_lag_marks_it_not_a_standby(self, postgres_dsn: str, registry: Registry) -> None:
        """With max_lag: down as not-a-standby (not lag), reads on the primary, one warning of each kind."""
        primary = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        replica = create_async_engine(
            postgres_dsn, **engine_options(acquire_timeout=0.3, command_timeout=2.0)
        )
        dep = replica_dep(registry)
        router = ReadReplicaRouter(
            primary=primary, replica=replica, dependency=dep, max_lag=5, lag_interval=0.1
        )
        try:
            with capture_logs() as logs:
                await router.start()
                await wait_for(lambda: dep.is_down, timeout=5)
                for _ in range(3):
                    async with router.for_read() as session:
                        assert session.bind is primary
                        assert (await session.execute(text("SELECT 1"))).scalar() == 1
            down = [(e["reason"], e["error"]) for e in logs if e["event"] == "dependency.down"]
            assert down == [("not-a-standby", "NotAStandby")]
            assert dep.last_error == "NotAStandby"
            events = [e["event"] for e in logs if e["event"].startswith("db.replica")]
            assert events == ["db.replica.not_a_standby", "db.replica.fallback"]
            await asyncio.sleep(0.5)  # the probe keeps it down (the server is still a primary)
            assert dep.is_down
        finally:
            await router.aclose()
            await primary.dispose()
            await replica.dispose()

    async def test_without_max_lag_it_serves_reads(self, postgres_dsn: str, registry: Registry) -> None:
        """Without max_lag nothing is measured: the 'replica' serves reads, nothing is down."""
        primary = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        replica = create_async_engine(
            postgres_dsn, **engine_options(acquire_timeout=0.3, command_timeout=2.0)
        )
        dep = replica_dep(registry)
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=dep)
        try:
            assert dep.check is not None
            await dep.check()
            async with router.for_read() as session:
                assert (await session.execute(text("SELECT 1"))).scalar() == 1
            assert not dep.is_down
        finally:
            await router.aclose()
            await primary.dispose()
            await replica.dispose()

    async def test_reads_in_flight_survive_a_replica_back_within_the_grace(
        self, postgres_dsn: str, registry: Registry
    ) -> None:
        """Down and closed again by a success at once (a saturated replica): reads in flight go on.

        Still down END_READS_AFTER later: they are ended then (503), not before.
        """
        primary = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        replica = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        dep = replica_dep(registry, failure_threshold=1, recovery_interval=5.0)  # no probe in the test
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=dep)
        try:
            async with router.for_read() as session:
                await session.execute(text("SELECT 1"))
                dep.mark_down()
                dep.record_success()  # another read answered: back within the grace
                await asyncio.sleep(router.END_READS_AFTER + 0.1)
                assert (await session.execute(text("SELECT 2"))).scalar() == 2
            assert router.terminated == 0

            async def cut_read() -> None:
                async with router.for_read() as session:
                    await session.execute(text("SELECT 1"))
                    dep.mark_down()  # and it stays down
                    start = time.monotonic()
                    await session.execute(text("SELECT pg_sleep(1)"))
                    pytest.fail(f"the read went on for {time.monotonic() - start:.2f} s")

            start = time.monotonic()
            with pytest.raises(DependencyUnavailable):
                await cut_read()
            assert router.END_READS_AFTER - 0.05 <= time.monotonic() - start < 0.9
            assert router.terminated == 1
        finally:
            await router.aclose()
            await primary.dispose()
            await replica.dispose()

    async def test_a_read_cut_by_an_outage_that_ended_does_not_trip_it_again(
        self, postgres_dsn: str, registry: Registry
    ) -> None:
        """A read in flight through the replica's outage and recovery fails as stale news, not a failure."""
        primary = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        replica = create_async_engine(postgres_dsn, **engine_options(command_timeout=2.0))
        dep = replica_dep(registry, failure_threshold=1, recovery_interval=5.0)  # no probe in the test
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=dep)
        try:

            async def cut_read() -> None:
                async with router.for_read() as session:
                    assert (await session.execute(text("SELECT 1"))).scalar() == 1
                    dep.mark_down()  # ends the reads in flight on the replica (their connections cut)
                    await asyncio.sleep(router.END_READS_AFTER + 0.05)  # ...once still down after that
                    dep.record_success()  # ...and it is back before this one notices
                    await session.execute(text("SELECT 1"))

            with pytest.raises(DependencyUnavailable):
                await cut_read()
            assert (dep.state, dep.stale_failures) == ("ok", 1)
            async with router.for_read() as session:  # a fresh read counts as ever
                assert (await session.execute(text("SELECT 1"))).scalar() == 1
        finally:
            await router.aclose()
            await primary.dispose()
            await replica.dispose()


# -- the read replica -------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    """A private primary + streaming standby for this module (skipped locally without binaries)."""
    try:
        running = start_cluster()
    except ClusterUnavailable as exc:
        if IN_CI:
            pytest.fail(f"{exc}; CI must provide the PostgreSQL server binaries")
        pytest.skip(str(exc))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def pair(cluster: PgCluster, unique: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    """An engine on the cluster's primary and a table of the test's own, dropped at teardown."""
    primary = create_async_engine(cluster.primary_dsn, **engine_options(command_timeout=2.0))
    table = f"{unique}_items"
    async with primary.begin() as conn:
        await conn.execute(text(f"CREATE TABLE {table} (id int PRIMARY KEY, name text NOT NULL)"))
    await wait_replayed(cluster)
    try:
        yield primary, table
    finally:
        cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_resume()")
        async with primary.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await primary.dispose()


async def wait_replayed(cluster: PgCluster) -> None:
    """Wait until the standby replayed everything the primary wrote so far.

    The target is the primary's WAL *insert* position: the test cluster runs with
    synchronous_commit=off, so a commit returns before its WAL is written, and
    pg_current_wal_lsn() (the write position) can still be short of the commit
    record (seen: the standby "caught up" with it, yet the new table was missing).
    """
    target = cluster.psql(cluster.primary_port, "SELECT pg_current_wal_insert_lsn()")
    deadline = time.monotonic() + 10
    query = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
    while cluster.psql(cluster.standby_port, query) != "t":
        if time.monotonic() > deadline:
            pytest.fail("the standby did not catch up within 10 s")
        await asyncio.sleep(0.05)


@pytest.fixture
async def standby_proxy(fault_proxy: Any, cluster: PgCluster) -> FaultProxy:
    """A fault proxy in front of the standby."""
    proxy: FaultProxy = await fault_proxy("127.0.0.1", cluster.standby_port)
    return proxy


@pytest.fixture
async def replica(standby_proxy: FaultProxy, cluster: PgCluster) -> AsyncIterator[AsyncEngine]:
    """An engine on the standby, through its proxy."""
    eng = create_async_engine(
        standby_proxy.url_for(cluster.standby_dsn), **engine_options(acquire_timeout=0.3, command_timeout=2.0)
    )
    try:
        yield eng
    finally:
        await _bounded.settle_abandoned(5.0)
        await eng.dispose()


def replica_dep(registry: Registry, **kwargs: Any) -> Dependency:
    """The replica's dependency: SEV-3, trips after 2 failures, probes every 0.2 s."""
    options: dict[str, Any] = {"failure_threshold": 2, "recovery_interval": 0.2, "check_timeout": 0.4}
    options.update(kwargs)
    return registry.dependency("db-replica", severity=Severity.SEV3, **options)


async def where(router: ReadReplicaRouter, table: str = "", item: int = 0) -> tuple[bool, Any]:
    """(read on the standby?, the item's name) for one for_read()."""
    async with router.for_read() as session:
        standby = (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar()
        name = None
        if table:
            select = text(f"SELECT name FROM {table} WHERE id = {item}")  # noqa: S608 - the test's own table
            name = (await session.execute(select)).scalar()
    return bool(standby), name


def fresh_context(coro: Any) -> asyncio.Task[Any]:
    """Run ``coro`` as another request would: a task with an empty context."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


class TestRouting:
    async def test_reads_on_the_standby_writes_on_the_primary(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], replica: AsyncEngine, registry: Registry
    ) -> None:
        """for_read() runs on the standby, for_write() on the primary."""
        primary, _ = pair
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=replica_dep(registry))
        assert (await where(router))[0] is True
        async with router.for_write() as session:
            assert (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar() is False

    async def test_no_replica_reads_on_the_primary(self, pair: tuple[AsyncEngine, str]) -> None:
        """replica=None (no READ_DATABASE_URL): reads run on the primary."""
        primary, _ = pair
        assert (await where(ReadReplicaRouter(primary=primary)))[0] is False

    async def test_read_your_writes(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], replica: AsyncEngine, registry: Registry
    ) -> None:
        """Replay paused: reads inside the write and right after its commit see it; other requests don't."""
        primary, table = pair
        router = ReadReplicaRouter(
            primary=primary, replica=replica, dependency=replica_dep(registry), sticky_after_write=0.5
        )
        cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")

        async def request() -> None:
            async with router.for_write() as session:
                await session.execute(text(f"INSERT INTO {table} VALUES (1, 'mine')"))  # noqa: S608
                assert await where(router, table, 1) == (False, "mine")  # inside the transaction
                await session.commit()
            assert await where(router, table, 1) == (False, "mine")  # sticky after the commit
            await asyncio.sleep(0.6)
            assert await where(router, table, 1) == (True, None)  # window over: the (paused) standby

        await fresh_context(request())
        assert await fresh_context(where(router, table, 1)) == (True, None)  # another request
        cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_resume()")
        await wait_replayed(cluster)
        assert await fresh_context(where(router, table, 1)) == (True, "mine")

    async def test_read_your_writes_in_a_gated_request(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], replica: AsyncEngine, registry: Registry
    ) -> None:
        """Through the middleware: the write request reads on the primary, the next GET on the standby."""
        primary, table = pair
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=replica_dep(registry))
        cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")
        async with client(build_app(primary, db, table, router=router)) as c:
            assert (await c.post("/api/items/5")).json() == {"id": 5, "read_on_standby": False}
            assert (await c.get("/api/items/5")).json() == {"name": None, "standby": True}


class TestLag:
    async def test_idle_primary_is_not_lag(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], replica: AsyncEngine
    ) -> None:
        """No writes for longer than max_lag: the naive now() - last replay grows, the real lag is 0."""
        primary, table = pair
        async with primary.begin() as conn:
            await conn.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))  # noqa: S608
        await wait_replayed(cluster)
        await asyncio.sleep(1.2)
        async with replica.connect() as conn:
            naive = (
                await conn.execute(text("SELECT extract(epoch FROM now() - pg_last_xact_replay_timestamp())"))
            ).scalar()
            assert float(naive) > 1.0  # what a naive check would call lag
            assert await replica_lag(conn) == 0.0
        await checks.replica(replica, max_lag=0.5)()

    async def test_null_on_a_primary_is_unknown(self, pair: tuple[AsyncEngine, str]) -> None:
        """Pointed at a primary, lag is None and the check fails as not a standby: unknown is never zero."""
        primary, _ = pair
        async with primary.connect() as conn:
            assert await replica_lag(conn) is None
        with pytest.raises(CheckFailed, match="not a standby: the replica URL points at a primary") as info:
            await checks.replica(primary, max_lag=5)()
        assert isinstance(info.value, NotAStandby)  # its own class: health details show NotAStandby

    async def test_lagging_replica_counts_as_down_until_caught_up(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], replica: AsyncEngine, registry: Registry
    ) -> None:
        """Replay paused, the primary writing: over max_lag the replica is down until it catches up."""
        primary, table = pair
        dep = replica_dep(registry)
        router = ReadReplicaRouter(
            primary=primary, replica=replica, dependency=dep, max_lag=0.5, lag_interval=0.1
        )
        await router.start()
        try:
            cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")
            async with primary.begin() as conn:
                await conn.execute(text(f"INSERT INTO {table} VALUES (1, 'x')"))  # noqa: S608
            with capture_logs() as logs:
                await wait_for(lambda: dep.is_down, timeout=5)
                assert (await fresh_context(where(router)))[0] is False
                assert [e["event"] for e in logs if e["event"].startswith("db.replica")] == [
                    "db.replica.fallback"
                ]
            assert dep.last_error == "CheckFailed"
            cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_resume()")
            await wait_for(lambda: not dep.is_down, timeout=5)
            assert (await fresh_context(where(router)))[0] is True
        finally:
            await router.aclose()


class TestReplicaOutage:
    @pytest.mark.parametrize("fault", ["refuse", "blackhole", "reset-every-connection"])
    async def test_reads_fall_back_to_the_primary(
        self,
        *,
        cluster: PgCluster,
        pair: tuple[AsyncEngine, str],
        replica: AsyncEngine,
        standby_proxy: FaultProxy,
        registry: Registry,
        fault: str,
    ) -> None:
        """Reads move to the primary within connect_timeout, one log per transition, no attempt while down."""
        primary, _ = pair
        dep = replica_dep(registry)
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=dep, connect_timeout=0.3)
        for _ in range(2):  # two idle replica connections in the pool
            assert (await where(router))[0] is True
        with capture_logs() as logs:
            if fault == "reset-every-connection":
                standby_proxy.reset()
                standby_proxy.limit_data(0)  # and every new connection is cut at its first byte
            else:
                getattr(standby_proxy, fault)()
            start = time.monotonic()
            assert (await where(router))[0] is False
            assert time.monotonic() - start < 0.3 + MARGIN
            assert (await where(router))[0] is False
            assert dep.is_down
            accepted = standby_proxy.stats().accepted
            timings = []
            for _ in range(10):
                start = time.monotonic()
                assert (await where(router))[0] is False
                timings.append(time.monotonic() - start)
            assert max(timings) < 0.1  # no connect attempt: a primary read
            assert standby_proxy.stats().accepted - accepted <= 1  # the probe at most
            standby_proxy.up()
            assert await wait_for(lambda: not dep.is_down) < 0.2 + 0.4 + MARGIN
            assert (await where(router))[0] is True
            assert (await where(router))[0] is True
        events = [e["event"] for e in logs if e["event"].startswith("db.replica")]
        assert events == ["db.replica.fallback", "db.replica.restored"]

    async def test_one_reset_costs_no_read(
        self,
        pair: tuple[AsyncEngine, str],
        replica: AsyncEngine,
        standby_proxy: FaultProxy,
        registry: Registry,
    ) -> None:
        """A one-off reset kills the pooled connections; reads reconnect and stay on the replica."""
        primary, _ = pair
        dep = replica_dep(registry)
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=dep)
        for _ in range(2):
            assert (await where(router))[0] is True
        standby_proxy.reset()
        for _ in range(3):
            assert (await where(router))[0] is True
        assert dep.failures == 0

    async def test_auth_failure_falls_back(
        self, cluster: PgCluster, pair: tuple[AsyncEngine, str], registry: Registry
    ) -> None:
        """A replica that refuses our credentials: reads run on the primary."""
        primary, _ = pair
        wrong = create_async_engine(
            cluster.dsn(cluster.standby_port).replace("postgres@", "nobody@"), **engine_options()
        )
        dep = replica_dep(registry)
        try:
            router = ReadReplicaRouter(primary=primary, replica=wrong, dependency=dep)
            assert (await where(router))[0] is False
            assert dep.failures == 1
        finally:
            await wrong.dispose()


class TestReadOnlyFallback:
    async def test_gets_served_by_the_replica_while_the_primary_is_down(
        self,
        *,
        cluster: PgCluster,
        pair: tuple[AsyncEngine, str],
        replica: AsyncEngine,
        registry: Registry,
        fault_proxy: Any,
    ) -> None:
        """Primary refused: GET/HEAD pass and read the replica; writes answer 503."""
        _, table = pair
        primary_proxy: FaultProxy = await fault_proxy("127.0.0.1", cluster.primary_port)
        primary = create_async_engine(
            primary_proxy.url_for(cluster.primary_dsn), **engine_options(acquire_timeout=ACQUIRE)
        )
        db = registry.dependency(
            "db", severity=Severity.SEV1, check=checks.sqlalchemy(primary, timeout=0.4), recovery_interval=0.2
        )
        router = ReadReplicaRouter(primary=primary, replica=replica, dependency=replica_dep(registry))
        try:
            async with client(build_app(primary, db, table, router=router, read_only_fallback=True)) as c:
                primary_proxy.refuse()
                for _ in range(3):
                    await c.post("/api/items/1")
                assert db.is_down
                response = await c.get("/api/items/1")
                assert response.status_code == 200
                assert response.json() == {"name": None, "standby": True}
                assert (await c.head("/api/items/1")).status_code == 200
                refused = await c.post("/api/items/2")
                assert refused.status_code == 503
                assert refused.json()["dependency"] == "db"
                primary_proxy.up()
                await wait_for(lambda: not db.is_down)
                assert (await c.post("/api/items/3")).status_code == 200
        finally:
            await _bounded.settle_abandoned(5.0)
            await primary.dispose()


class TestClosingOwnConnections:
    async def test_a_silent_server_costs_the_bound_and_no_error_log(
        self, pg_proxy: FaultProxy, postgres_dsn: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        """close_own on a blackholed server: aborted by asyncpg at its bound, under an outer bound too.

        The pool's graceful close, cancelled from outside instead, logged
        "Exception closing connection" with a CancelledError traceback (ERROR)
        though nothing leaked: the checks' and lag monitor's private pools did
        it whenever the server went silent between the query and the close.
        """
        engine = create_async_engine(pg_proxy.url_for(postgres_dsn))
        try:
            for outer in (5.0, 0.2):  # asyncpg's own bound, then a cancellation landing in the close
                async with engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    await conn.execute(text("SELECT 1"))
                    driver = conn.sync_connection.connection.driver_connection  # type: ignore[union-attr]
                    pg_proxy.blackhole()
                    start = time.monotonic()
                    with caplog.at_level("DEBUG", logger="sqlalchemy.pool"):
                        try:
                            await _bounded.hard_timeout(_conn.close_own(conn, 0.3), outer)
                        except TimeoutError:
                            assert outer < 0.3
                    assert time.monotonic() - start < 0.6
                    assert driver.is_closed()
                pg_proxy.up()
            await _bounded.settle_abandoned(2.0)
            errors = [r for r in caplog.records if r.levelname == "ERROR"]
            assert errors == []
            assert engine.sync_engine.pool.checkedout() == 0
        finally:
            pg_proxy.up()
            await engine.dispose()


class TestErrorChain:
    async def test_a_wrong_database_name_is_named_by_its_driver_class(
        self, postgres_dsn: str, registry: Registry
    ) -> None:
        """dependency.down and /health/deep details carry the class chain, not just DBAPIError."""
        from degrade.health import DeepHealth, _details

        url = postgres_dsn.rsplit("/", 1)[0] + "/degrade_no_such_database"
        engine = create_async_engine(url, **engine_options(acquire_timeout=1.0))
        db = registry.dependency(
            "db", severity=Severity.SEV1, check=checks.sqlalchemy(engine), failure_threshold=1
        )
        try:
            with capture_logs() as logs:
                result = await db.run_check()
            assert not result.ok
            # SQLAlchemy 2.0.3x passes asyncpg's connect error through unwrapped (no chain:
            # the class is the driver's already); later versions wrap it in DBAPIError.
            named = db.last_error_chain or db.last_error
            assert named is not None
            assert named.endswith("InvalidCatalogNameError")
            down = next(e for e in logs if e["event"] == "dependency.down")
            assert down.get("error_chain", down["error"]) == named
            assert "degrade_no_such_database" not in str(down)  # class names, never the text
            report = await DeepHealth(registry).report()
            details = _details(registry, report)["db"]
            assert details.get("error_chain", details["error"]) == named
        finally:
            await engine.dispose()
