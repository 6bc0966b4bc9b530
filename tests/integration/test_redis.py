"""degrade.redis clients against the real Redis, through the fault proxy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from degrade import Registry, Severity, checks
from degrade import redis as dredis
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def proxy(fault_proxy: Any, redis_url: str) -> FaultProxy:
    """A fault proxy in front of the real Redis."""
    parts = urlsplit(redis_url)
    p: FaultProxy = await fault_proxy(parts.hostname, parts.port)
    return p


@pytest.fixture
async def safe(proxy: FaultProxy, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """degrade.redis.client() through the proxy."""
    c = dredis.client(proxy.url_for(redis_url))
    try:
        yield c
    finally:
        await c.aclose()


async def elapsed(coro: Any) -> tuple[float, BaseException | None]:
    """Seconds the awaitable took, and what it raised."""
    start = time.perf_counter()
    try:
        await coro
    except Exception as exc:
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, None


class TestFailFast:
    async def test_serves_normally(self, safe: aioredis.Redis, unique: str) -> None:
        """The safe client works against a healthy Redis."""
        key = f"{unique}:k"
        try:
            assert await safe.set(key, b"v", px=5000)
            assert await safe.get(key) == b"v"
        finally:
            await safe.delete(key)

    async def test_blackhole_fails_within_timeout(self, safe: aioredis.Redis, proxy: FaultProxy) -> None:
        """Against a blackholed Redis one call raises TimeoutError after ~timeout, not a minute."""
        await safe.ping()  # a pooled connection exists: it freezes
        proxy.blackhole()
        took, exc = await elapsed(safe.ping())
        assert isinstance(exc, RedisTimeoutError)
        assert 0.2 <= took < 0.8
        took, exc = await elapsed(safe.get("x"))  # a new connection: connect succeeds, handshake hangs
        assert isinstance(exc, RedisTimeoutError)
        assert took < 0.8

    async def test_default_clients_still_waiting(self, proxy: FaultProxy, redis_url: str) -> None:
        """redis-py's default clients are still waiting on a blackholed Redis after 1.5 s."""
        url = proxy.url_for(redis_url)
        parts = urlsplit(url)
        defaults = [
            aioredis.Redis.from_url(url),
            aioredis.Redis(host=str(parts.hostname), port=int(parts.port or 6379)),
        ]
        proxy.blackhole()
        try:
            for c in defaults:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.ping(), 1.5)
        finally:
            for c in defaults:
                await c.aclose()

    async def test_refused_fails_at_once(self, safe: aioredis.Redis, proxy: FaultProxy) -> None:
        """A refused connection raises ConnectionError immediately."""
        proxy.refuse()
        took, exc = await elapsed(safe.ping())
        assert isinstance(exc, RedisConnectionError)
        assert took < 0.5

    async def test_latency_beyond_timeout(self, safe: aioredis.Redis, proxy: FaultProxy) -> None:
        """Latency under the timeout is served; latency over it times out at the bound."""
        await safe.ping()
        proxy.latency(0.05)
        took, exc = await elapsed(safe.ping())
        assert exc is None
        proxy.latency(0.6)
        took, exc = await elapsed(safe.ping())
        assert isinstance(exc, RedisTimeoutError)
        assert took < 0.8

    async def test_reset_costs_one_error_no_retry(self, safe: aioredis.Redis, proxy: FaultProxy) -> None:
        """A reset pooled connection fails its call once (no client retry); the next call reconnects."""
        await safe.ping()
        proxy.reset()
        await asyncio.sleep(0.05)
        _, exc = await elapsed(safe.ping())
        assert isinstance(exc, RedisConnectionError)
        assert await safe.ping()

    async def test_recovers_without_intervention(self, safe: aioredis.Redis, proxy: FaultProxy) -> None:
        """After an outage the same client serves again."""
        proxy.refuse()
        with pytest.raises(RedisConnectionError):
            await safe.ping()
        proxy.up()
        assert await safe.ping()


class TestWithDependency:
    async def test_dependency_opens_and_recovers(
        self, safe: aioredis.Redis, proxy: FaultProxy, registry: Registry
    ) -> None:
        """Failures open the dependency; its probe (PING through the same client) closes it after up()."""
        dep = registry.dependency(
            "redis", severity=Severity.SEV2, check=checks.redis(safe), recovery_interval=0.2
        )
        proxy.blackhole()
        start = time.perf_counter()
        for _ in range(3):
            await dep.run_check()
        assert dep.is_down
        assert time.perf_counter() - start < 3.0
        proxy.up()
        for _ in range(100):  # up to 5 s
            if not dep.is_down:
                break
            await asyncio.sleep(0.05)
        assert not dep.is_down
