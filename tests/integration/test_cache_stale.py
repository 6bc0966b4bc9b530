"""FailSoftCache's stale-if-error tier against the real Redis, outages through the fault proxy."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from degrade import Registry, Severity, checks
from degrade.cache import CacheEntry, FailSoftCache, StaleTier
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(registry: Registry, redis_proxied: aioredis.Redis) -> Any:
    """The Redis dependency, probing through the proxy; slow probes so a test can watch the request path."""
    return registry.dependency(
        "redis", severity=Severity.SEV2, check=checks.redis(redis_proxied), recovery_interval=30
    )


@pytest.fixture
def cache(redis_proxied: aioredis.Redis, dep: Any, unique: str) -> FailSoftCache:
    tier = StaleTier(max_bytes=1 << 20, stale_for=60)
    return FailSoftCache(redis_proxied, dep, ttl=30, prefix=f"{unique}:", stale=tier, name=unique)


class Loader:
    """Counts calls; returns a fresh dict naming the key and the call."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.calls = 0

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {"key": self.key, "n": self.calls}


class TestBlackholedRedis:
    async def test_seen_key_is_served_stale_unseen_key_is_loaded(
        self,
        cache: FailSoftCache,
        redis_proxy: FaultProxy,
        redis_direct: aioredis.Redis,
        dep: Any,
        unique: str,
    ) -> None:
        """Redis blackholed: a key read a moment ago answers stale (marked, in bound); an unseen one loads."""
        seen = Loader("seen")
        assert await cache.get_entry("track:1", seen) == CacheEntry({"key": "seen", "n": 1}, "miss")
        assert await redis_direct.get(f"{unique}:track:1") == b'{"key":"seen","n":1}'
        assert (await cache.get_entry("track:1", seen)).source == "hit"
        unseen = Loader("unseen")
        with redis_proxy.outage("blackhole"):
            start = time.perf_counter()
            entry = await cache.get_entry("track:1", seen)
            assert time.perf_counter() - start < 0.8  # the cache's 0.25 s bound, not a socket timeout
            assert (entry.value, entry.source, entry.stale) == ({"key": "seen", "n": 1}, "stale", True)
            assert entry.age is not None
            assert 0 <= entry.age < 5
            assert await cache.get_entry("track:2", unseen) == CacheEntry(
                {"key": "unseen", "n": 1}, "unavailable"
            )
            assert dep.failures == 2
        assert (seen.calls, unseen.calls) == (1, 1)
        stats = cache.stats()
        assert (stats.stale, stats.unavailable, stats.stale_entries) == (1, 2, 1)
        assert await redis_direct.exists(f"{unique}:track:2") == 0  # nothing written during the outage

    async def test_known_down_serves_stale_without_redis_traffic(
        self, cache: FailSoftCache, redis_proxy: FaultProxy, dep: Any
    ) -> None:
        """Once the dependency is down, seen keys answer stale from memory: no byte goes to Redis."""
        loaders = {f"k{i}": Loader(f"k{i}") for i in range(20)}
        for key, loader in loaders.items():
            await cache.get_or_load(key, loader)
        redis_proxy.blackhole()
        for i in range(3):
            await cache.get_or_load(f"x{i}", Loader("x"))  # three timeouts: down
        assert dep.is_down
        before = redis_proxy.stats()
        start = time.perf_counter()
        entries = [await cache.get_entry(key, loader) for key, loader in loaders.items()]
        assert time.perf_counter() - start < 0.5
        after = redis_proxy.stats()
        assert {e.source for e in entries} == {"stale"}
        assert [e.value["key"] for e in entries] == list(loaders)
        assert all(loader.calls == 1 for loader in loaders.values())
        assert (after.accepted, after.bytes_up, after.held) == (before.accepted, before.bytes_up, before.held)

    async def test_invalidate_during_outage_stops_stale_answers(
        self, cache: FailSoftCache, redis_proxy: FaultProxy, redis_direct: aioredis.Redis, unique: str
    ) -> None:
        """An invalidate that cannot reach Redis still drops this process's copy: the loader answers next."""
        loader = Loader("k")
        await cache.get_or_load("k", loader)
        with redis_proxy.outage("refuse"):
            assert await cache.invalidate("k") is False
            assert (await cache.get_entry("k", loader)).source == "unavailable"
        assert loader.calls == 2
        assert await redis_direct.exists(f"{unique}:k") == 1  # Redis keeps it until its ttl (documented)
