"""FailSoftCache against the real Redis, outages through the fault proxy."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from degrade import Registry, Severity, _bounded, checks, fail_soft
from degrade.cache import FailSoftCache
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
    return FailSoftCache(redis_proxied, dep, ttl=30, prefix=f"{unique}:")


class Loader:
    """Counts calls; returns a fresh dict."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay

    async def __call__(self) -> dict[str, int]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        return {"id": 7, "n": self.calls}


class TestHealthy:
    async def test_read_through(
        self, cache: FailSoftCache, redis_direct: aioredis.Redis, unique: str
    ) -> None:
        """Miss loads and stores with the ttl; the next read is a hit."""
        loader = Loader()
        assert await cache.get_or_load("track:7", loader) == {"id": 7, "n": 1}
        assert await cache.get_or_load("track:7", loader) == {"id": 7, "n": 1}
        assert loader.calls == 1
        assert await redis_direct.get(f"{unique}:track:7") == b'{"id":7,"n":1}'
        assert 0 < await redis_direct.pttl(f"{unique}:track:7") <= 30_000

    async def test_single_flight(self, cache: FailSoftCache) -> None:
        """Fifty concurrent misses on one key: one loader call."""
        loader = Loader(delay=0.05)
        results = await asyncio.gather(*(cache.get_or_load("hot", loader) for _ in range(50)))
        assert loader.calls == 1
        assert all(r == {"id": 7, "n": 1} for r in results)

    async def test_invalidate(self, cache: FailSoftCache, redis_direct: aioredis.Redis, unique: str) -> None:
        """invalidate deletes the entry so the next read loads again."""
        loader = Loader()
        await cache.get_or_load("k", loader)
        assert await cache.invalidate("k") is True
        assert await redis_direct.exists(f"{unique}:k") == 0
        await cache.get_or_load("k", loader)
        assert loader.calls == 2


class TestOutages:
    @pytest.mark.parametrize("fault", ["refuse", "blackhole"])
    async def test_down_serves_from_loader_and_writes_nothing(
        self,
        cache: FailSoftCache,
        redis_proxy: FaultProxy,
        redis_direct: aioredis.Redis,
        unique: str,
        fault: str,
    ) -> None:
        """Redis refused or blackholed: the loader answers within the bound, no error, nothing written."""
        loader = Loader()
        with redis_proxy.outage(fault):  # type: ignore[call-overload]
            start = time.perf_counter()
            assert await cache.get_or_load("k", loader) == {"id": 7, "n": 1}
            assert time.perf_counter() - start < 0.8
        assert await redis_direct.exists(f"{unique}:k") == 0

    async def test_slow_redis_past_timeout(
        self, cache: FailSoftCache, redis_proxy: FaultProxy, redis_direct: aioredis.Redis, unique: str
    ) -> None:
        """Latency beyond the timeout: loader answers at about the bound, nothing written."""
        with redis_proxy.outage("latency", 0.6):
            start = time.perf_counter()
            assert await cache.get_or_load("k", Loader()) == {"id": 7, "n": 1}
            assert time.perf_counter() - start < 0.8
        assert await redis_direct.exists(f"{unique}:k") == 0

    async def test_known_down_makes_no_redis_call(
        self, cache: FailSoftCache, redis_proxy: FaultProxy, dep: Any
    ) -> None:
        """Once the dependency is down, reads cost no Redis traffic and answer at once."""
        redis_proxy.blackhole()
        for i in range(3):
            await cache.get_or_load(f"k{i}", Loader())
        assert dep.is_down
        before = redis_proxy.stats()
        loader = Loader()
        start = time.perf_counter()
        for i in range(100):
            await cache.get_or_load(f"x{i}", loader)
        took = time.perf_counter() - start
        after = redis_proxy.stats()
        assert loader.calls == 100
        assert took < 0.5
        assert (after.accepted, after.bytes_up, after.held) == (before.accepted, before.bytes_up, before.held)

    async def test_reset_mid_traffic(self, cache: FailSoftCache, redis_proxy: FaultProxy) -> None:
        """A reset of the pooled connections costs at most a miss, never an error."""
        loader = Loader()
        await cache.get_or_load("k", loader)
        redis_proxy.reset()
        assert await cache.get_or_load("k", loader) in ({"id": 7, "n": 1}, {"id": 7, "n": 2})
        assert await cache.get_or_load("k", loader) in ({"id": 7, "n": 1}, {"id": 7, "n": 2})

    async def test_recovery_resumes_caching(
        self,
        cache: FailSoftCache,
        redis_proxy: FaultProxy,
        dep: Any,
        redis_direct: aioredis.Redis,
        unique: str,
    ) -> None:
        """After the outage the probe closes the dependency and entries are written again."""
        redis_proxy.refuse()
        for i in range(3):
            await cache.get_or_load(f"k{i}", Loader())
        assert dep.is_down
        redis_proxy.up()
        result = await dep.run_check()
        assert result.ok
        assert not dep.is_down
        await cache.get_or_load("after", Loader())
        assert await redis_direct.exists(f"{unique}:after") == 1

    async def test_single_flight_during_outage(self, cache: FailSoftCache, redis_proxy: FaultProxy) -> None:
        """While Redis is refused, concurrent misses still share one loader call."""
        redis_proxy.refuse()
        loader = Loader(delay=0.05)
        await asyncio.gather(*(cache.get_or_load("hot", loader) for _ in range(30)))
        assert loader.calls == 1


class TestInFlightWhenRedisGoesDown:
    async def test_reads_in_flight_through_a_blackhole_answer_at_once(
        self,
        registry: Registry,
        redis_proxy: FaultProxy,
        redis_url: str,
        redis_direct: aioredis.Redis,
        unique: str,
    ) -> None:
        """Reads hang in a blackhole (cache bound 5 s, socket 10 s); once other callers' failures
        open the dependency, every read in flight is answered by the loader at once."""
        # A slow-to-fail client on purpose (degrade.redis.client refuses it): only the race ends the reads.
        client = aioredis.Redis.from_url(
            redis_proxy.url_for(redis_url), socket_timeout=10.0, socket_connect_timeout=1.0, retry=None
        )
        dep = registry.dependency(
            "redis",
            severity=Severity.SEV2,
            failure_threshold=2,
            check=checks.redis(client),
            recovery_interval=30,
        )
        cache = FailSoftCache(client, dep, ttl=30, prefix=f"{unique}:", timeout=5.0, name=unique)

        @fail_soft(dep, fallback=None, timeout=0.05, reason="test: another caller with a short bound")
        async def ping() -> object:
            return await client.ping()

        try:
            loader = Loader()
            await cache.get_or_load("warm", loader)  # pooled connection up, key written
            redis_proxy.blackhole()
            reads = [asyncio.ensure_future(cache.get_or_load(f"k{i}", loader)) for i in range(10)]
            await asyncio.sleep(0.2)  # the reads are stuck in the blackhole
            assert not any(r.done() for r in reads)
            assert await ping() is None  # two timeouts: down
            assert await ping() is None
            assert dep.is_down
            start = time.perf_counter()
            results = await asyncio.gather(*reads)
            assert time.perf_counter() - start < 0.2
            assert [r["id"] for r in results] == [7] * 10
            assert loader.calls == 11
            assert cache.stats().unavailable == 10
            read_site = next(s for s in dep.sites if s.name.endswith(f"[{unique}].read"))
            assert read_site.degraded_calls == 10
            assert read_site.shed_calls == {}
            assert dep.failures == 2  # the pings' timeouts; the interrupted reads are not failures
            redis_proxy.up()
            assert await _bounded.settle_abandoned(5.0) == 0
            assert await redis_direct.exists(*(f"{unique}:k{i}" for i in range(10))) == 0  # nothing written
        finally:
            redis_proxy.up()
            await client.aclose()
