"""A Redis that answers every call slowly, without one error, trips a SlowCalls rule."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from degrade import Registry, Severity
from degrade import redis as dredis
from degrade.cache import FailSoftCache
from degrade.policies import Consecutive, FailureRate, SlowCalls
from degrade.ratelimit import RateLimiter
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration

#: The proxy adds this much to each round trip; the rule calls anything over 0.1 s slow.
LATENCY = 0.2
RULE = FailureRate(min_calls=5) | SlowCalls(slower_than=0.1, threshold=0.8, min_calls=5)


class TestSlowCalls:
    async def test_cache_reads_trip_it(
        self, redis_proxy: FaultProxy, redis_url: str, registry: Registry, unique: str
    ) -> None:
        """Every read 200 ms slow: after min_calls the dependency is down and reads use the loader at once."""
        client: aioredis.Redis = dredis.client(redis_proxy.url_for(redis_url), timeout=1.0)
        dep = registry.dependency("redis-slow-cache", severity=Severity.SEV2, trip=RULE)
        cache = FailSoftCache(client, dep, ttl=60, prefix=f"{unique}:", timeout=1.0)
        loads = 0

        async def loader() -> str:
            nonlocal loads
            loads += 1
            return "from the database"

        try:
            assert await cache.get_or_load("k", loader) == "from the database"  # warm the key
            redis_proxy.latency(LATENCY)
            reads = 0
            while not dep.is_down and reads < 20:  # the two fast warm-up calls count in the window
                assert await cache.get_or_load("k", loader) == "from the database"
                reads += 1
            assert dep.is_down
            assert reads <= 10
            assert dep.trip_figures()["calls"] == 0  # reset on the transition
        finally:
            redis_proxy.up()
            await client.delete(f"{unique}:k")
            await client.aclose()

    async def test_limiter_round_trips_trip_it(
        self, redis_proxy: FaultProxy, redis_url: str, registry: Registry, unique: str
    ) -> None:
        """The limiter times its round trips for a slow-call rule: slow Redis, memory decisions."""
        client: aioredis.Redis = dredis.client(redis_proxy.url_for(redis_url), timeout=1.0)
        dep = registry.dependency("redis-slow-limiter", severity=Severity.SEV2, trip=RULE)
        limiter = RateLimiter(client, dependency=dep, prefix=f"{unique}:rl:", timeout=1.0)
        try:
            assert (await limiter.hit("user", "1000/minute")).source == "redis"  # connected
            redis_proxy.latency(LATENCY)
            sources = [(await limiter.hit("user", "1000/minute")).source for _ in range(8)]
            assert dep.is_down
            assert sources[:4] == ["redis"] * 4  # slow but correct answers, until the rule trips
            assert sources[-1] == "memory"
        finally:
            redis_proxy.up()
            await limiter.aclose()
            keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    async def test_consecutive_never_notices(
        self, redis_proxy: FaultProxy, redis_url: str, registry: Registry, unique: str
    ) -> None:
        """The default rule stays ok through the same slowness: why SlowCalls exists."""
        client: aioredis.Redis = dredis.client(redis_proxy.url_for(redis_url), timeout=1.0)
        dep = registry.dependency("redis-slow-default", severity=Severity.SEV2, trip=Consecutive(3))
        limiter = RateLimiter(client, dependency=dep, prefix=f"{unique}:rl:", timeout=1.0)
        try:
            assert (await limiter.hit("user", "1000/minute")).source == "redis"  # connected
            redis_proxy.latency(LATENCY)
            for _ in range(7):
                assert (await limiter.hit("user", "1000/minute")).source == "redis"
            assert not dep.is_down
        finally:
            redis_proxy.up()
            await limiter.aclose()
            keys = [key async for key in client.scan_iter(match=f"{unique}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()
