"""FaultProxy in front of the real Redis and Postgres: each fault as their clients see it."""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as aioredis
import redis.exceptions as redis_exc
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def redis_client(url: str, *, wait: float = 2.0) -> AsyncIterator[aioredis.Redis]:
    # No retries: every failure reaches the test, whatever redis-py's retry defaults are.
    client = aioredis.Redis.from_url(
        url, socket_timeout=wait, socket_connect_timeout=wait, retry=Retry(NoBackoff(), 0)
    )
    try:
        yield client
    finally:
        await client.aclose()


async def ping_time(client: aioredis.Redis) -> float:
    start = time.perf_counter()
    assert await client.ping()
    return time.perf_counter() - start


def asyncpg_dsn(proxy: FaultProxy, postgres_dsn: str) -> str:
    return proxy.url_for(postgres_dsn).replace("postgresql+asyncpg://", "postgresql://", 1)


@contextlib.asynccontextmanager
async def pg_connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn, timeout=2.0)
    try:
        yield conn
    finally:
        conn.terminate()  # no goodbye round trip: the proxy may be blackholed


class TestRedis:
    async def test_commands_pass_through(self, redis_proxy: FaultProxy, redis_url: str, unique: str) -> None:
        """Through the proxy, Redis works as usual and the traffic is counted."""
        async with redis_client(redis_proxy.url_for(redis_url)) as client:
            try:
                await client.set(f"{unique}:k", b"v", ex=60)
                assert await client.get(f"{unique}:k") == b"v"
            finally:
                await client.delete(f"{unique}:k")
        stats = redis_proxy.stats()
        assert stats.accepted >= 1
        assert stats.bytes_up > 0
        assert stats.bytes_down > 0

    async def test_refuse_fails_fast(self, redis_proxy: FaultProxy, redis_url: str) -> None:
        """refuse: a new connection errors at once; a pooled one is reset."""
        async with redis_client(redis_proxy.url_for(redis_url)) as pooled:
            assert await pooled.ping()
            redis_proxy.refuse()
            with pytest.raises(redis_exc.ConnectionError):
                await pooled.ping()
            async with redis_client(redis_proxy.url_for(redis_url)) as fresh:
                start = time.perf_counter()
                with pytest.raises(redis_exc.ConnectionError):
                    await fresh.ping()
                assert time.perf_counter() - start < 0.5

    async def test_blackhole_times_out(self, redis_proxy: FaultProxy, redis_url: str) -> None:
        """blackhole: a client with a 0.3 s socket timeout times out after about 0.3 s."""
        async with redis_client(redis_proxy.url_for(redis_url), wait=0.3) as client:
            assert await client.ping()
            redis_proxy.blackhole()
            start = time.perf_counter()
            with pytest.raises(redis_exc.TimeoutError):
                await client.ping()
            assert 0.25 <= time.perf_counter() - start < 1.5
        async with redis_client(redis_proxy.url_for(redis_url), wait=0.3) as fresh:
            start = time.perf_counter()
            with pytest.raises((redis_exc.TimeoutError, redis_exc.ConnectionError)):
                await fresh.ping()
            assert 0.25 <= time.perf_counter() - start < 1.5

    async def test_latency_adds_the_delay(self, redis_proxy: FaultProxy, redis_url: str) -> None:
        """latency(0.05): a PING round trip takes about 0.1 s more."""
        async with redis_client(redis_proxy.url_for(redis_url)) as client:
            base = statistics.median([await ping_time(client) for _ in range(5)])
            redis_proxy.latency(0.05)
            slow = statistics.median([await ping_time(client) for _ in range(5)])
        assert slow >= 0.1
        assert slow - base < 0.5

    async def test_reset_breaks_the_pooled_connection_only(
        self, redis_proxy: FaultProxy, redis_url: str
    ) -> None:
        """reset: the pooled connection fails once, the next command opens a new one that works."""
        async with redis_client(redis_proxy.url_for(redis_url)) as client:
            assert await client.ping()
            redis_proxy.reset()
            with pytest.raises(redis_exc.ConnectionError):
                await client.ping()
            assert await client.ping()
        assert redis_proxy.stats().accepted == 2
        assert redis_proxy.stats().resets == 1

    async def test_up_recovers(self, redis_proxy: FaultProxy, redis_url: str) -> None:
        """After up(), the same client works again without being rebuilt."""
        async with redis_client(redis_proxy.url_for(redis_url), wait=0.3) as client:
            with redis_proxy.outage("refuse"), pytest.raises(redis_exc.ConnectionError):
                await client.ping()
            assert await client.ping()
            with redis_proxy.outage("blackhole"), pytest.raises(redis_exc.TimeoutError):
                await client.ping()
            assert await client.ping()


class TestAsyncpg:
    async def test_refuse_fails_fast(self, pg_proxy: FaultProxy, postgres_dsn: str) -> None:
        """refuse: connect raises ConnectionRefusedError at once; an open connection is reset."""
        dsn = asyncpg_dsn(pg_proxy, postgres_dsn)
        async with pg_connection(dsn) as conn:
            assert await conn.fetchval("SELECT 1") == 1
            pg_proxy.refuse()
            with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
                await conn.fetchval("SELECT 1", timeout=2.0)
        start = time.perf_counter()
        with pytest.raises(ConnectionRefusedError):
            await asyncpg.connect(dsn, timeout=2.0)
        assert time.perf_counter() - start < 0.5

    async def test_blackhole_times_out(self, pg_proxy: FaultProxy, postgres_dsn: str) -> None:
        """blackhole: a query with timeout=0.3 and a connect with timeout=0.3 both time out."""
        dsn = asyncpg_dsn(pg_proxy, postgres_dsn)
        async with pg_connection(dsn) as conn:
            assert await conn.fetchval("SELECT 1") == 1
            pg_proxy.blackhole()
            start = time.perf_counter()
            with pytest.raises(TimeoutError):
                await conn.fetchval("SELECT 1", timeout=0.3)
            assert 0.25 <= time.perf_counter() - start < 1.5
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await asyncpg.connect(dsn, timeout=0.3)
        assert 0.25 <= time.perf_counter() - start < 1.5

    async def test_latency_and_recovery(self, pg_proxy: FaultProxy, postgres_dsn: str) -> None:
        """latency(0.05) adds about 0.1 s per query; up() removes it."""
        async with pg_connection(asyncpg_dsn(pg_proxy, postgres_dsn)) as conn:
            pg_proxy.latency(0.05)
            start = time.perf_counter()
            assert await conn.fetchval("SELECT 1") == 1
            assert time.perf_counter() - start >= 0.1
            pg_proxy.up()
            start = time.perf_counter()
            assert await conn.fetchval("SELECT 1") == 1
            assert time.perf_counter() - start < 0.1

    async def test_reset_breaks_the_connection_and_a_new_one_works(
        self, pg_proxy: FaultProxy, postgres_dsn: str
    ) -> None:
        """reset: the open connection fails; a new connection works."""
        dsn = asyncpg_dsn(pg_proxy, postgres_dsn)
        async with pg_connection(dsn) as conn:
            pg_proxy.reset()
            with pytest.raises((ConnectionError, asyncpg.exceptions.ConnectionDoesNotExistError)):
                await conn.fetchval("SELECT 1", timeout=2.0)
        async with pg_connection(dsn) as conn:
            assert await conn.fetchval("SELECT 2") == 2


@pytest.fixture
async def sa_engine(pg_proxy: FaultProxy, postgres_dsn: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(
        pg_proxy.url_for(postgres_dsn),
        pool_size=1,
        max_overflow=0,
        pool_timeout=2.0,
        connect_args={"timeout": 0.5, "command_timeout": 0.5},
    )
    try:
        yield engine
    finally:
        if not pg_proxy.closed:
            pg_proxy.up()  # let the pool say goodbye instead of waiting on a frozen socket
        await engine.dispose()


async def select_one(engine: AsyncEngine) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(text("SELECT 1"))).scalar_one()


class TestSQLAlchemy:
    async def test_reset_invalidates_the_pooled_connection(
        self, sa_engine: AsyncEngine, pg_proxy: FaultProxy
    ) -> None:
        """reset: the pooled connection fails as invalidated; the pool then reconnects."""
        assert await select_one(sa_engine) == 1
        pg_proxy.reset()
        with pytest.raises(sa_exc.DBAPIError) as info:
            await select_one(sa_engine)
        assert info.value.connection_invalidated
        assert await select_one(sa_engine) == 1
        assert pg_proxy.stats().accepted == 2

    async def test_refuse_fails_fast(self, sa_engine: AsyncEngine, pg_proxy: FaultProxy) -> None:
        """refuse: a connect through the engine fails at once."""
        pg_proxy.refuse()
        start = time.perf_counter()
        with pytest.raises((OSError, sa_exc.OperationalError, sa_exc.InterfaceError)):
            await select_one(sa_engine)
        assert time.perf_counter() - start < 0.5
        pg_proxy.up()
        assert await select_one(sa_engine) == 1

    async def test_blackhole_times_out_at_the_connect_timeout(
        self, sa_engine: AsyncEngine, pg_proxy: FaultProxy
    ) -> None:
        """blackhole: a new connection gives up at asyncpg's connect timeout (0.5 s)."""
        pg_proxy.blackhole()
        start = time.perf_counter()
        with pytest.raises((TimeoutError, sa_exc.OperationalError, sa_exc.InterfaceError)):
            await select_one(sa_engine)
        assert 0.4 <= time.perf_counter() - start < 2.0
        pg_proxy.up()
        assert await select_one(sa_engine) == 1
