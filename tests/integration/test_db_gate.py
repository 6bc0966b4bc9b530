"""db_gate: the DB gate as a FastAPI dependency, per route, against the real Postgres and a fault proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from starlette.middleware import Middleware

from degrade import Dependency, Registry, Severity, _bounded, checks, exception_handlers
from degrade.db import (
    DBHealthMiddleware,
    connection,
    current_connection,
    db_gate,
    engine_options,
    require_connection,
)
from degrade.db._context import LEASE
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration

#: The gate's bound in these tests (shorter than the default 1 s to keep them fast).
ACQUIRE = 0.5
#: Margin on top of a bound: the tests share 2 CPUs with other work.
MARGIN = 0.5


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
    """The Postgres dependency, probed through the proxy."""
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
            await conn.execute(text(f"CREATE TABLE {unique}.users (id int PRIMARY KEY, name text NOT NULL)"))
        yield f"{unique}.users"
    finally:
        async with direct.begin() as conn:
            await conn.execute(text(f"DROP SCHEMA IF EXISTS {unique} CASCADE"))
        await direct.dispose()


def build_app(engine: AsyncEngine, db: Dependency, table: str) -> FastAPI:
    """POST /users gated by db_gate; GET /users/{id} served from a cache, ungated."""
    cache = {0: {"id": 0, "name": "cached"}}
    app = FastAPI(exception_handlers=exception_handlers())
    gate = Depends(db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE))

    @app.get("/users/{user_id}")
    async def get_user(user_id: int) -> dict[str, object]:
        return cache[user_id]

    @app.post("/users/{user_id}", dependencies=[gate])
    async def create_user(
        user_id: int, conn: Annotated[AsyncConnection, Depends(require_connection)]
    ) -> dict[str, object]:
        insert = text(f"INSERT INTO {table} VALUES (:id, :n)")  # noqa: S608 - the test's own table
        await conn.execute(insert, {"id": user_id, "n": f"u{user_id}"})
        await conn.commit()
        assert current_connection() is conn
        return {"id": user_id}

    @app.get("/count", dependencies=[Depends(db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE))])
    async def count() -> dict[str, object]:
        conn = await connection()
        return {"n": (await conn.execute(text(f"SELECT count(*) FROM {table}"))).scalar()}  # noqa: S608

    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=10)


async def timed(client: httpx.AsyncClient, method: str, url: str) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = await client.request(method, url)
    return response, time.monotonic() - start


class TestDBGate:
    async def test_gated_route_serves_through_the_gate(
        self, engine: AsyncEngine, db: Dependency, table: str
    ) -> None:
        """A gated route gets its connection from the gate, and it goes back to the pool after."""
        app = build_app(engine, db, table)
        async with client_for(app) as client:
            assert (await client.post("/users/1")).json() == {"id": 1}
            assert (await client.post("/users/2")).status_code == 200
            assert (await client.get("/count")).json() == {"n": 2}
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    @pytest.mark.parametrize("fault", ["blackhole", "refuse"])
    async def test_gated_route_503_while_ungated_route_answers(
        self, engine: AsyncEngine, db: Dependency, table: str, pg_proxy: FaultProxy, fault: str
    ) -> None:
        """Postgres blackholed or refused: POST is 503 + Retry-After within the bound; the cached GET 200."""
        app = build_app(engine, db, table)
        async with client_for(app) as client:
            assert (await client.post("/users/1")).status_code == 200
            await engine.dispose()  # no pooled connection left to reuse: the next checkout connects
            getattr(pg_proxy, fault)()
            pg_proxy.reset()
            response, elapsed = await timed(client, "POST", "/users/2")
            assert response.status_code == 503
            assert response.headers["retry-after"] == str(db.retry_after)
            assert response.json()["error"] == "dependency_unavailable"
            assert response.json()["dependency"] == "db"
            assert elapsed < ACQUIRE + MARGIN
            cached, _ = await timed(client, "GET", "/users/0")
            assert cached.status_code == 200
            assert cached.json() == {"id": 0, "name": "cached"}

    async def test_down_dependency_refuses_at_once_without_the_pool(
        self, engine: AsyncEngine, db: Dependency, table: str, pg_proxy: FaultProxy
    ) -> None:
        """While db is down the gated route answers 503 at once and the handler never runs."""
        app = build_app(engine, db, table)
        async with client_for(app) as client:
            pg_proxy.blackhole()
            db.mark_down(ConnectionRefusedError())
            response, elapsed = await timed(client, "POST", "/users/3")
            assert response.status_code == 503
            assert "retry-after" in response.headers
            assert elapsed < 0.2
            assert (await client.get("/users/0")).status_code == 200
            site = next(s for s in db.sites if s.name == "degrade.db.db_gate")
            assert site.degraded_calls >= 1
            pg_proxy.up()
            recovered = asyncio.Event()
            db.subscribe(lambda dep: None if dep.is_down else recovered.set())
            await asyncio.wait_for(recovered.wait(), 5)  # the probe closed it
            assert (await client.post("/users/3")).status_code == 200

    async def test_same_arguments_share_one_gate(self, engine: AsyncEngine, db: Dependency) -> None:
        """db_gate(...) with the same arguments is the same gate (one line, one runbook site)."""
        first = db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE)
        assert db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE) is first
        assert db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE * 2) is not first
        assert [s.name for s in db.sites].count("degrade.db.db_gate") == 1

    async def test_under_the_middleware_the_request_is_gated_once(
        self, engine: AsyncEngine, db: Dependency
    ) -> None:
        """A route with db_gate under DBHealthMiddleware on the same engine uses the middleware's lease."""
        gate = db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE)
        app = FastAPI(
            exception_handlers=exception_handlers(),
            middleware=[
                Middleware(DBHealthMiddleware, engine=engine, dependency=db, acquire_timeout=ACQUIRE)
            ],
        )

        @app.get("/source", dependencies=[Depends(gate)])
        async def source() -> dict[str, object]:
            await connection()
            lease = LEASE.get()
            assert lease is not None
            return {"source": type(lease.source).__name__}

        async with client_for(app) as client:
            assert (await client.get("/source")).json() == {"source": "DBHealthMiddleware"}
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]

    async def test_database_failure_in_the_handler_answers_503(
        self, engine: AsyncEngine, db: Dependency, pg_proxy: FaultProxy
    ) -> None:
        """The connection dies mid-handler: the route answers 503 and one failure is counted, not a 500."""
        app = FastAPI(exception_handlers=exception_handlers())

        @app.get(
            "/dies", dependencies=[Depends(db_gate(engine=engine, dependency=db, acquire_timeout=ACQUIRE))]
        )
        async def dies() -> dict[str, object]:
            conn = await connection()
            await conn.execute(text("SELECT 1"))
            pg_proxy.reset()  # the server side of this connection goes away
            await conn.execute(text("SELECT 1"))
            return {"never": True}

        async with client_for(app) as client:
            response = await client.get("/dies")
        assert response.status_code == 503
        assert response.json()["dependency"] == "db"
        assert db.failures >= 1
        assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
