"""Several limits and reset() against the real Redis: one round trip, no partial consumption, own prefix."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from degrade import Dependency, Registry, Severity
from degrade._gcra import Rate, Rates
from degrade.ratelimit import RateLimiter, RateLimitMiddleware

from ..support import FakeClock

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(registry: Registry) -> Dependency:
    return registry.dependency("redis", severity=Severity.SEV1, recovery_interval=0.1)


@pytest.fixture
async def make(unique: str) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Build limiters with the test's key prefix; each is closed at teardown."""
    made: list[RateLimiter] = []

    def build(client: Any, dependency: Dependency | None, **options: Any) -> RateLimiter:
        options.setdefault("prefix", f"{unique}:rl:")
        options.setdefault("timeout", 0.5)
        limiter = RateLimiter(client, dependency=dependency, **options)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


class TestSeveralLimitsInRedis:
    async def test_one_round_trip_per_request(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """A request under three limits costs one EVALSHA, like a request under one."""
        limiter = make(redis_direct, dep)
        await limiter.hit("warm", "10/minute")  # the first call may load the script
        before = limiter.stats()
        decision = await limiter.hit("k", "10/second;100/minute;1000/hour")
        after = limiter.stats()
        assert (after.batches - before.batches, after.redis - before.redis) == (1, 1)
        assert decision.source == "redis"
        assert [d.remaining for d in decision.per_limit] == [9, 99, 999]

    async def test_no_partial_consumption(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any, unique: str
    ) -> None:
        """When the hour limit denies, the second limit's bucket in Redis is not touched."""
        clock = FakeClock(1_700_000_000.0)
        limiter = make(redis_direct, dep, clock=clock)
        for _ in range(2):
            assert (await limiter.hit("k", "5/second;2/hour")).allowed
        stored = await redis_direct.get(f"{unique}:rl:5/second:k")
        denied = await limiter.hit("k", "5/second;2/hour")
        assert not denied.allowed
        assert denied.source == "redis"
        assert denied.retry_after == pytest.approx(1800)
        assert await redis_direct.get(f"{unique}:rl:5/second:k") == stored
        assert [d.allowed for d in denied.per_limit] == [True, False]

    async def test_concurrent_groups_are_exact(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """50 concurrent requests under '100/second;7/minute', batched with single limits: exactly 7 pass."""
        limiter = make(redis_direct, dep)
        hits = [limiter.hit("k", "100/second;7/minute") for _ in range(50)]
        singles = [limiter.hit(f"s{i}", "1/minute") for i in range(20)]
        decisions = await asyncio.gather(*hits, *singles)
        assert sum(d.allowed for d in decisions[:50]) == 7
        assert all(d.allowed for d in decisions[50:])
        assert {d.source for d in decisions} == {"redis"}
        second = decisions[0].per_limit[0]
        assert second.limit == 100

    @pytest.mark.parametrize("options", [{"single_connection_client": True}, {"decode_responses": True}])
    async def test_generic_and_decoding_clients(
        self, redis_url: str, dep: Dependency, make: Any, options: dict[str, Any]
    ) -> None:
        """redis-py's generic call (single-connection client) and decoding clients run groups too."""
        client = aioredis.Redis.from_url(redis_url, **options)
        try:
            limiter = make(client, dep)
            decisions = [await limiter.hit("k", "10/second;2/minute") for _ in range(3)]
            assert [d.allowed for d in decisions] == [True, True, False]
            assert {d.source for d in decisions} == {"redis"}
            await limiter.aclose()
        finally:
            await client.aclose()

    async def test_middleware_on_redis(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """The middleware with several limits on Redis: headers list each, the binding one reports."""
        limiter = make(redis_direct, dep, clock=FakeClock(1_700_000_000.0))

        async def ok(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        app = Starlette(
            routes=[Route("/", ok)],
            middleware=[Middleware(RateLimitMiddleware, limiter=limiter, rate="10/second;2/minute")],
        )
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            responses = [await client.get("/") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert responses[0].headers["ratelimit-policy"] == '"default#1";q=10;w=1, "default#2";q=2;w=60'
        assert responses[0].headers["ratelimit"] == '"default#2";r=1;t=30'
        assert "degrade-fallback" not in responses[0].headers["ratelimit"]


class TestSameGroupDecisionsInMemoryAndRedis:
    counter = itertools.count()

    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limits=st.lists(
            st.tuples(st.integers(1, 20), st.integers(1, 20), st.sampled_from([1, 60, 3600])),
            min_size=2,
            max_size=3,
            unique_by=lambda t: (t[0], t[2], t[1]),
        ),
        steps=st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 3)), min_size=1, max_size=30),
    )
    async def test_memory_and_redis_agree(
        self, redis_direct: aioredis.Redis, unique: str, limits: list[tuple[int, int, int]], steps: list[Any]
    ) -> None:
        """For the same hits and clock, the script's group and MemoryStore.hit_all decide identically."""
        rates = Rates(Rate.of(limit, period, burst) for limit, burst, period in limits)
        if len({r.text for r in rates}) < len(rates):
            return  # two spellings of one limit: the grammar refuses those
        clock = FakeClock(1_700_000_000.0 + next(self.counter))
        dep = Dependency("redis", severity=Severity.SEV1)
        redis_limiter = RateLimiter(
            redis_direct, dependency=dep, prefix=f"{unique}:rl:", clock=clock, warm=False
        )
        memory_limiter = RateLimiter(clock=clock)
        key = f"g{next(self.counter)}"
        for gap_us, cost in steps:
            clock.now += gap_us / 1_000_000
            from_redis = await redis_limiter.hit(key, rates, cost=cost)
            from_memory = await memory_limiter.hit(key, rates, cost=cost)
            assert from_redis.source == "redis"
            assert from_redis[:5] == from_memory[:5]
            assert [d[:5] for d in from_redis.per_limit] == [d[:5] for d in from_memory.per_limit]
        await redis_limiter.aclose()


class TestReset:
    async def test_reset_deletes_every_bucket_of_the_key(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any, unique: str
    ) -> None:
        """reset(key) deletes the key's buckets of every rate, and no other key's (not even 'x:key')."""
        limiter = make(redis_direct, dep)
        for key in ("user:1", "x:user:1", "user:10"):
            await limiter.hit(key, "1/minute")
        await limiter.hit("user:1", "5/second;1/hour")
        assert not (await limiter.hit("user:1", "1/minute")).allowed
        await limiter.reset("user:1")
        left = sorted(k.decode() for k in await redis_direct.keys(f"{unique}:rl:*"))
        assert left == [f"{unique}:rl:1/minute:user:10", f"{unique}:rl:1/minute:x:user:1"]
        decision = await limiter.hit("user:1", "1/minute")
        assert (decision.allowed, decision.source) == (True, "redis")

    async def test_reset_one_rate(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any, unique: str
    ) -> None:
        """reset(key, rate) deletes that rate's buckets only (each limit of several)."""
        limiter = make(redis_direct, dep)
        await limiter.hit("k", "1/minute")
        await limiter.hit("k", "5/second;1/hour")
        await limiter.reset("k", "5/second;1/hour")
        left = [k.decode() for k in await redis_direct.keys(f"{unique}:rl:*")]
        assert left == [f"{unique}:rl:1/minute:k"]
        assert len(limiter.store) == 1  # the memory mirror forgot them too

    async def test_reset_keys_with_glob_characters(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any, unique: str
    ) -> None:
        """A key with '*' or '[' is matched literally: reset('a*') leaves 'ab' alone."""
        limiter = make(redis_direct, dep)
        await limiter.hit("a*", "1/minute")
        await limiter.hit("ab", "1/minute")
        await limiter.reset("a*")
        left = [k.decode() for k in await redis_direct.keys(f"{unique}:rl:*")]
        assert left == [f"{unique}:rl:1/minute:ab"]

    async def test_reset_fails_loudly_when_redis_is_unreachable(self, dep: Dependency, make: Any) -> None:
        """A reset that could not reach Redis raises (it must not look done)."""
        client = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
        try:
            limiter = make(client, dep)
            with pytest.raises(Exception) as info:
                await limiter.reset("k")
            assert "Connection" in type(info.value).__name__
        finally:
            await client.aclose()
