"""degrade.redis clients against the real Redis, through the fault proxy."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from degrade import Registry, Severity, checks
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


async def elapsed(coro: Any) -> tuple[float, BaseException | None]:
    """Seconds the awaitable took, and what it raised."""
    start = time.perf_counter()
    try:
        await coro
    except Exception as exc:
        return time.perf_counter() - start, exc
    return time.perf_counter() - start, None


class TestFailFast:
    async def test_serves_normally(self, redis_proxied: aioredis.Redis, unique: str) -> None:
        """The safe client works against a healthy Redis."""
        key = f"{unique}:k"
        try:
            assert await redis_proxied.set(key, b"v", px=5000)
            assert await redis_proxied.get(key) == b"v"
        finally:
            await redis_proxied.delete(key)

    async def test_blackhole_fails_within_timeout(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy
    ) -> None:
        """Against a blackholed Redis one call raises TimeoutError after ~timeout, not a minute."""
        await redis_proxied.ping()  # a pooled connection exists: it freezes
        redis_proxy.blackhole()
        took, exc = await elapsed(redis_proxied.ping())
        assert isinstance(exc, RedisTimeoutError)
        assert 0.2 <= took < 0.8
        took, exc = await elapsed(
            redis_proxied.get("x")
        )  # a new connection: connect succeeds, handshake hangs
        assert isinstance(exc, RedisTimeoutError)
        assert took < 0.8

    async def test_default_clients_still_waiting(self, redis_proxy: FaultProxy, redis_url: str) -> None:
        """redis-py's default clients are still waiting on a blackholed Redis after 1.5 s."""
        url = redis_proxy.url_for(redis_url)
        parts = urlsplit(url)
        defaults = [
            aioredis.Redis.from_url(url),
            aioredis.Redis(host=str(parts.hostname), port=int(parts.port or 6379)),
        ]
        redis_proxy.blackhole()
        try:
            for c in defaults:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(c.ping(), 1.5)
        finally:
            for c in defaults:
                await c.aclose()

    async def test_refused_fails_at_once(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy
    ) -> None:
        """A refused connection raises ConnectionError immediately."""
        redis_proxy.refuse()
        took, exc = await elapsed(redis_proxied.ping())
        assert isinstance(exc, RedisConnectionError)
        assert took < 0.5

    async def test_latency_beyond_timeout(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy
    ) -> None:
        """Latency under the timeout is served; latency over it times out at the bound."""
        await redis_proxied.ping()
        redis_proxy.latency(0.05)
        took, exc = await elapsed(redis_proxied.ping())
        assert exc is None
        redis_proxy.latency(0.6)
        took, exc = await elapsed(redis_proxied.ping())
        assert isinstance(exc, RedisTimeoutError)
        assert took < 0.8

    async def test_reset_costs_one_error_no_retry(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy
    ) -> None:
        """A reset pooled connection fails its call once (no client retry); the next call reconnects."""
        await redis_proxied.ping()
        redis_proxy.reset()
        await asyncio.sleep(0.05)
        _, exc = await elapsed(redis_proxied.ping())
        if exc is None:
            # redis-py 5.0 and 8.2+ check the socket before writing and reconnect silently:
            # no error to count, and still no client-side retry of a failed call.
            version = tuple(int(p) for p in redis.__version__.split(".")[:2])
            assert version < (5, 1) or version >= (8, 2), redis.__version__
        else:
            assert isinstance(exc, RedisConnectionError)
        assert await redis_proxied.ping()

    async def test_recovers_without_intervention(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy
    ) -> None:
        """After an outage the same client serves again."""
        redis_proxy.refuse()
        with pytest.raises(RedisConnectionError):
            await redis_proxied.ping()
        redis_proxy.up()
        assert await redis_proxied.ping()


class TestWithDependency:
    async def test_dependency_opens_and_recovers(
        self, redis_proxied: aioredis.Redis, redis_proxy: FaultProxy, registry: Registry
    ) -> None:
        """Failures open the dependency; its probe (PING through the same client) closes it after up()."""
        dep = registry.dependency(
            "redis", severity=Severity.SEV2, check=checks.redis(redis_proxied), recovery_interval=0.2
        )
        redis_proxy.blackhole()
        start = time.perf_counter()
        for _ in range(3):
            await dep.run_check()
        assert dep.is_down
        assert time.perf_counter() - start < 3.0
        redis_proxy.up()
        for _ in range(100):  # up to 5 s
            if not dep.is_down:
                break
            await asyncio.sleep(0.05)
        assert not dep.is_down
