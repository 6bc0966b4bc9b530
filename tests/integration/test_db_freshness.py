"""Read-your-writes across requests and the primary guard on a real primary + streaming standby."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from degrade import Dependency, Registry, Severity, _bounded
from degrade.db import DBHealthMiddleware, ReadReplicaRouter, ReadYourWritesMiddleware, engine_options
from degrade.testing import FaultProxy

from ..conftest import IN_CI
from .pg_cluster import ClusterUnavailable, PgCluster, start_cluster

pytestmark = pytest.mark.integration

SECRET = "test-secret-test-secret-test-secret"


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
    """An engine on the primary (pool 2 + 2) and a table of the test's own, dropped at teardown."""
    primary = create_async_engine(
        cluster.primary_dsn, **engine_options(command_timeout=5.0, pool_size=2, max_overflow=2)
    )
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


@pytest.fixture
async def replica(fault_proxy: Any, cluster: PgCluster) -> AsyncIterator[tuple[AsyncEngine, FaultProxy]]:
    """An engine on the standby, through a fault proxy."""
    proxy: FaultProxy = await fault_proxy("127.0.0.1", cluster.standby_port)
    eng = create_async_engine(
        proxy.url_for(cluster.standby_dsn), **engine_options(acquire_timeout=0.3, command_timeout=2.0)
    )
    try:
        yield eng, proxy
    finally:
        await _bounded.settle_abandoned(5.0)
        await eng.dispose()


async def wait_replayed(cluster: PgCluster) -> None:
    """Wait until the standby replayed everything the primary wrote so far (its insert position)."""
    target = cluster.psql(cluster.primary_port, "SELECT pg_current_wal_insert_lsn()")
    query = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
    deadline = time.monotonic() + 10
    while cluster.psql(cluster.standby_port, query) != "t":
        if time.monotonic() > deadline:
            pytest.fail("the standby did not catch up within 10 s")
        await asyncio.sleep(0.05)


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - test helper bound
    """Poll ``predicate`` until true (fails the test at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


def replica_dep(registry: Registry) -> Dependency:
    """The replica's dependency: SEV-3, trips after 2 failures, probes every 0.2 s."""
    return registry.dependency(
        "db-replica", severity=Severity.SEV3, failure_threshold=2, recovery_interval=0.2, check_timeout=0.4
    )


def items_app(router: ReadReplicaRouter, db: Dependency, table: str, *, gated: bool, **rwy: Any) -> Starlette:
    """``POST /api/items/{id}`` writes through the router; ``GET`` reads it (and says where)."""

    async def write(request: Request) -> Response:
        item = int(request.path_params["item"])
        async with router.for_write() as session:
            insert = text(f"INSERT INTO {table} VALUES (:id, :n)")  # noqa: S608 - the test's own table
            await session.execute(insert, {"id": item, "n": f"n{item}"})
            await session.commit()
        return JSONResponse({"id": item})

    async def read(request: Request) -> Response:
        item = int(request.path_params["item"])
        seconds = float(request.query_params.get("sleep", "0"))
        async with router.for_read() as session:
            if seconds:
                await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
            select = text(f"SELECT name FROM {table} WHERE id = :id")  # noqa: S608 - the test's own table
            name = (await session.execute(select, {"id": item})).scalar()
            standby = (await session.execute(text("SELECT pg_is_in_recovery()"))).scalar()
        return JSONResponse({"name": name, "standby": standby})

    middleware = [Middleware(ReadYourWritesMiddleware, **rwy)]
    if gated:
        middleware.append(
            Middleware(
                DBHealthMiddleware, engine=router.primary, dependency=db, acquire_timeout=1.0, router=router
            )
        )
    return Starlette(
        routes=[
            Route("/api/items/{item}", write, methods=["POST"]),
            Route("/api/items/{item}", read, methods=["GET"]),
        ],
        middleware=middleware,
    )


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)


class TestReadYourWritesAcrossRequests:
    @pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
    async def test_next_request_sees_the_write_until_the_replica_has_it(
        self,
        cluster: PgCluster,
        pair: tuple[AsyncEngine, str],
        replica: tuple[AsyncEngine, FaultProxy],
        registry: Registry,
        gated: bool,
    ) -> None:
        """Replay paused: the writer's next GET reads its write on the primary; after resume, the standby."""
        primary, table = pair
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(
            primary=primary,
            replica=replica[0],
            dependency=replica_dep(registry),
            read_your_writes=True,
            lag_interval=0.1,
            sticky_after_write=0,  # in-process requests share the test's task: no same-request stickiness
        )
        app = items_app(router, db, table, gated=gated, secret=SECRET, secure=False)
        await router.start()
        try:
            await wait_for(lambda: router.replay_lsn is not None)
            cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")
            async with client(app) as writer, client(app) as stranger:
                checkouts: list[object] = []
                event.listen(primary.sync_engine, "checkout", lambda *args: checkouts.append(args))
                response = await writer.post("/api/items/1")
                assert response.status_code == 200
                assert "degrade_lsn=" in response.headers["set-cookie"]
                # Gated: the position is asked on the request's connection; without the gate
                # the block's connection is back in the pool, so it takes one more checkout.
                assert len(checkouts) == (1 if gated else 2)
                assert (await writer.get("/api/items/1")).json() == {"name": "n1", "standby": False}
                # Without the cookie: the paused standby, which lacks the write.
                assert (await stranger.get("/api/items/1")).json() == {"name": None, "standby": True}
                assert router.fresh_on_primary == 1
                cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_resume()")
                await wait_replayed(cluster)
                written = int(writer.cookies["degrade_lsn"].split(".")[0], 16)
                await wait_for(lambda: (router.replay_lsn or 0) >= written)  # the monitor's next poll
                assert (await writer.get("/api/items/1")).json() == {"name": "n1", "standby": True}
            assert router.fresh_on_primary == 1
            assert router.positions_failed == 0
        finally:
            await router.aclose()

    async def test_header_mode(
        self,
        cluster: PgCluster,
        pair: tuple[AsyncEngine, str],
        replica: tuple[AsyncEngine, FaultProxy],
        registry: Registry,
    ) -> None:
        """via='header': the client sends the position header back and reads its write on the primary."""
        primary, table = pair
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(
            primary=primary,
            replica=replica[0],
            dependency=replica_dep(registry),
            read_your_writes=True,
            lag_interval=0.1,
        )
        app = items_app(router, db, table, gated=True, via="header")
        await router.start()
        try:
            await wait_for(lambda: router.replay_lsn is not None)
            cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")
            async with client(app) as c:
                position = (await c.post("/api/items/2")).headers["x-degrade-lsn"]
                read = await c.get("/api/items/2", headers={"x-degrade-lsn": position})
                assert read.json() == {"name": "n2", "standby": False}
                assert (await c.get("/api/items/2")).json() == {"name": None, "standby": True}
        finally:
            await router.aclose()


class TestPrimaryDown:
    async def test_the_replica_answers_when_the_primary_cannot(
        self,
        cluster: PgCluster,
        pair: tuple[AsyncEngine, str],
        replica: tuple[AsyncEngine, FaultProxy],
        registry: Registry,
    ) -> None:
        """Primary known down: a client's read goes to the replica although it lacks that write (counted)."""
        primary, table = pair
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(
            primary=primary,
            replica=replica[0],
            dependency=replica_dep(registry),
            primary_dependency=db,
            read_your_writes=True,
            lag_interval=0.1,
            sticky_after_write=0,
        )
        app = items_app(router, db, table, gated=False, via="header")
        await router.start()
        try:
            await wait_for(lambda: router.replay_lsn is not None)
            cluster.psql(cluster.standby_port, "SELECT pg_wal_replay_pause()")
            async with client(app) as c:
                position = (await c.post("/api/items/3")).headers["x-degrade-lsn"]
                with db.forced_down():
                    read = await c.get("/api/items/3", headers={"x-degrade-lsn": position})
                assert read.status_code == 200
                assert read.json() == {"name": None, "standby": True}  # an answer, without the write
                assert (router.fresh_waived, router.fresh_on_primary) == (1, 0)
                read = await c.get("/api/items/3", headers={"x-degrade-lsn": position})
                assert read.json() == {"name": "n3", "standby": False}  # primary back: fresh again
                assert router.fresh_on_primary == 1
        finally:
            await router.aclose()


class TestPrimaryGuard:
    async def test_replica_down_reads_over_the_share_are_shed_writes_proceed(
        self,
        pair: tuple[AsyncEngine, str],
        replica: tuple[AsyncEngine, FaultProxy],
        registry: Registry,
    ) -> None:
        """Replica refused, primary pool 2 + 2 (cap 2): 6 slow GETs: 2 served, 4 shed 503; a POST gets 200."""
        primary, table = pair
        replica_engine, proxy = replica
        db = registry.dependency("db", severity=Severity.SEV1)
        rdep = replica_dep(registry)
        router = ReadReplicaRouter(
            primary=primary, replica=replica_engine, dependency=rdep, connect_timeout=0.2
        )
        assert router.primary_read_cap == 2
        app = items_app(router, db, table, gated=True, secret=SECRET, secure=False)
        proxy.refuse()
        async with client(app) as c:
            for _ in range(2):  # trip the replica's dependency
                assert (await c.get("/api/items/1")).json() == {"name": None, "standby": False}
            await wait_for(lambda: rdep.is_down)
            reads = [asyncio.ensure_future(c.get("/api/items/1?sleep=1.0")) for _ in range(6)]
            await asyncio.sleep(0.5)  # the guard's line has shed the excess by now
            started = time.monotonic()
            write = await c.post("/api/items/3")
            write_took = time.monotonic() - started
            responses = await asyncio.gather(*reads)
        assert write.status_code == 200
        assert write_took < 0.5  # not behind the reads
        statuses = sorted(r.status_code for r in responses)
        assert statuses == [200, 200, 503, 503, 503, 503]
        shed = [r for r in responses if r.status_code == 503]
        assert {r.headers["retry-after"] for r in shed} == {"1"}
        assert {r.json()["dependency"] for r in shed} == {"db-replica"}
        site = next(s for s in rdep.sites if s.name.endswith("for_read"))
        assert site.shed_calls.get("primary-guard") == 4
        assert router.guard_shed == 4
        assert db.state == "ok"
        assert db.failures == 0
        assert primary.sync_engine.pool.checkedout() == 0
