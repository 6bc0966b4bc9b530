"""RateLimiter against the real Redis: GCRA in Lua, auto-pipelining, NOSCRIPT, outages via the proxy."""

from __future__ import annotations

import asyncio
import itertools
import time
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
from structlog.testing import capture_logs

from degrade import Dependency, Registry, Severity, checks, fail_soft
from degrade import redis as dredis
from degrade._gcra import Rate
from degrade.ratelimit import Decision, RateLimiter, RateLimitMiddleware
from degrade.testing import FaultProxy

from ..support import CapturingTransport, FakeClock

pytestmark = pytest.mark.integration

TIMEOUT = 0.25


@pytest.fixture
def dep(registry: Registry) -> Dependency:
    """The Redis dependency, without a probe (recovery by trial)."""
    return registry.dependency("redis", severity=Severity.SEV1, recovery_interval=0.1)


@pytest.fixture
async def make(unique: str) -> AsyncIterator[Callable[..., RateLimiter]]:
    """Build limiters with the test's key prefix; each is closed at teardown."""
    made: list[RateLimiter] = []

    def build(client: Any, dependency: Dependency | None, **options: Any) -> RateLimiter:
        options.setdefault("prefix", f"{unique}:rl:")
        options.setdefault("timeout", TIMEOUT)
        limiter = RateLimiter(client, dependency=dependency, **options)
        made.append(limiter)
        return limiter

    yield build
    for limiter in made:
        await limiter.aclose()


async def timed(coro: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await coro
    return time.perf_counter() - start, result


class TestRedisDecisions:
    async def test_burst_then_denied(self, redis_direct: aioredis.Redis, dep: Dependency, make: Any) -> None:
        """Redis answers with GCRA: the burst passes, the next hit waits one interval."""
        clock = FakeClock(1_700_000_000.0)
        limiter = make(redis_direct, dep, clock=clock)
        decisions = [await limiter.hit("k", "10/second;burst=3") for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert decisions[0] == Decision(True, 10, 2, 0.1, 0.0, "redis")
        assert decisions[3].retry_after == pytest.approx(0.1)
        clock.now += 0.1
        assert (await limiter.hit("k", "10/second;burst=3")).allowed

    async def test_keys_expire_with_the_bucket(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any, unique: str
    ) -> None:
        """A key lives in Redis only until its bucket would be full again."""
        limiter = make(redis_direct, dep)
        decision = await limiter.hit("k", "2/second")
        ttl = await redis_direct.pttl(f"{unique}:rl:2/second:k")
        assert 0 < ttl <= decision.reset_after * 1000 + 1

    async def test_concurrent_hits_are_exact(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """50 concurrent hits on one key under 10/minute: exactly 10 pass (atomic in Lua)."""
        limiter = make(redis_direct, dep)
        decisions = await asyncio.gather(*(limiter.hit("k", "10/minute") for _ in range(50)))
        assert sum(d.allowed for d in decisions) == 10
        assert {d.source for d in decisions} == {"redis"}

    async def test_concurrent_decisions_share_round_trips(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Decisions issued in one loop tick go out together: 50 decisions, at most 2 EVALSHA."""
        limiter = make(redis_direct, dep)
        decisions = await asyncio.gather(*(limiter.hit(f"k{i}", "10/minute") for i in range(50)))
        assert all(d.allowed and d.source == "redis" for d in decisions)
        assert limiter.stats().redis == 50
        assert limiter.stats().batches <= 2

    async def test_one_round_trip_per_sequential_decision(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Sequential decisions cost exactly one EVALSHA each."""
        limiter = make(redis_direct, dep)
        await limiter.hit("warm", "10/minute")  # the first one may load the script
        before = limiter.stats()
        for _ in range(10):
            await limiter.hit("k", "100/minute")
        assert limiter.stats().batches - before.batches == 10

    async def test_large_batches_are_split(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """More than max_batch waiting decisions go out as several EVALSHA calls."""
        limiter = make(redis_direct, dep, max_batch=16)
        decisions = await asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(100)))
        assert all(d.source == "redis" for d in decisions)
        assert limiter.stats().batches >= 100 // 16

    async def test_noscript_after_script_flush(
        self, redis_direct: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """After SCRIPT FLUSH (or a restart) the script is loaded again; decisions still come from Redis."""
        limiter = make(redis_direct, dep)
        assert (await limiter.hit("k", "5/minute")).source == "redis"
        noscript = limiter.stats().noscript
        await redis_direct.script_flush()
        decision = await limiter.hit("k", "5/minute")
        assert (decision.source, decision.allowed, decision.remaining) == ("redis", True, 3)
        assert limiter.stats().noscript == noscript + 1
        await redis_direct.script_flush()
        batch = await asyncio.gather(*(limiter.hit(f"b{i}", "5/minute") for i in range(20)))
        assert {d.source for d in batch} == {"redis"}
        assert dep.failures == 0

    @pytest.mark.parametrize(
        "options",
        [
            {"decode_responses": True},
            {"single_connection_client": True},
            {"protocol": 3},
        ],
    )
    async def test_any_redis_client(
        self,
        redis_url: str,
        redis_direct: aioredis.Redis,
        dep: Dependency,
        make: Any,
        options: dict[str, Any],
    ) -> None:
        """Plain, decoding, single-connection and RESP3 clients all work (lean or generic path)."""
        client = aioredis.Redis.from_url(redis_url, **options)
        try:
            limiter = make(client, dep)
            decisions = await asyncio.gather(*(limiter.hit("k", "3/minute") for _ in range(5)))
            assert sum(d.allowed for d in decisions) == 3  # concurrent: which three is not fixed
            decisions.append(await limiter.hit("k", "3/minute"))
            assert not decisions[-1].allowed
            assert {d.source for d in decisions} == {"redis"}
            await limiter.aclose()
        finally:
            await client.aclose()

    async def test_connections_are_given_back(self, redis_url: str, dep: Dependency, make: Any) -> None:
        """The limiter keeps at most two pooled connections between calls and returns them on aclose."""
        client = dredis.client(redis_url, max_connections=8)
        try:
            limiter = make(client, dep)
            for _ in range(3):
                await asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(200)))
            pool = client.connection_pool
            assert len(pool._in_use_connections) <= 2
            await limiter.aclose()
            assert len(pool._in_use_connections) == 0
        finally:
            await client.aclose()


class TestNeverFailOpenByAccident:
    @pytest.mark.parametrize(
        ("fallback", "source", "allowed"), [("allow", "memory", True), ("deny", "deny", False)]
    )
    async def test_wrong_key_type_is_not_an_outage(  # noqa: PLR0917 - fixtures and drawn values
        self,
        redis_direct: aioredis.Redis,
        dep: Dependency,
        make: Any,
        unique: str,
        fallback: Any,
        source: str,
        allowed: bool,
    ) -> None:
        """A Redis error that is a bug (WRONGTYPE) never opens the limiter and never feeds the dependency."""
        await redis_direct.hset(f"{unique}:rl:1/minute:k", "x", "1")
        with capture_logs() as logs:
            limiter = make(redis_direct, dep, on_outage=fallback)
            first = await limiter.hit("k", "1/minute")
            second = await limiter.hit("k", "1/minute")
        assert (first.source, first.allowed) == (source, allowed)
        assert not second.allowed
        assert dep.failures == 0
        assert limiter.stats().errors == 2
        assert [e["error"] for e in logs if e["event"] == "ratelimit.error"] == ["ResponseError"]


class TestSameDecisionsInMemoryAndRedis:
    counter = itertools.count()

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limit=st.integers(1, 30),
        burst=st.integers(1, 30),
        period=st.sampled_from([1, 60, 3600, 86400]),
        steps=st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 3)), min_size=1, max_size=40),
    )
    async def test_memory_and_redis_agree(  # noqa: PLR0917 - fixtures and drawn values
        self,
        redis_direct: aioredis.Redis,
        unique: str,
        limit: int,
        burst: int,
        period: int,
        steps: list[tuple[int, int]],
    ) -> None:
        """For the same hits and clock, the Lua script and the memory store give identical decisions."""
        rate = Rate.of(limit, period, burst)
        clock = FakeClock(1_700_000_000.0 + next(self.counter))
        dep = Dependency("redis", severity=Severity.SEV1)
        redis_limiter = RateLimiter(
            redis_direct, dependency=dep, prefix=f"{unique}:rl:", clock=clock, warm=False
        )
        memory_limiter = RateLimiter(clock=clock)
        key = f"p{next(self.counter)}"
        for gap_us, cost in steps:
            clock.now += gap_us / 1_000_000
            from_redis = await redis_limiter.hit(key, rate, cost=cost)
            from_memory = await memory_limiter.hit(key, rate, cost=cost)
            assert from_redis.source == "redis"
            assert from_redis._replace(source="memory") == from_memory
        await redis_limiter.aclose()

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        limit=st.integers(1, 10),
        burst=st.integers(1, 10),
        gaps=st.lists(st.floats(0, 0.3), min_size=1, max_size=60),
        concurrency=st.integers(1, 8),
    )
    async def test_never_more_than_rate_plus_burst(  # noqa: PLR0917 - fixtures and drawn values
        self,
        redis_direct: aioredis.Redis,
        unique: str,
        limit: int,
        burst: int,
        gaps: list[float],
        concurrency: int,
    ) -> None:
        """Against Redis, concurrent bursts included, no window of one period holds limit + burst passes."""
        clock = FakeClock(1_700_000_000.0)
        dep = Dependency("redis", severity=Severity.SEV1)
        limiter = RateLimiter(redis_direct, dependency=dep, prefix=f"{unique}:rl:", clock=clock)
        key = f"w{next(self.counter)}"
        rate = Rate.of(limit, 1, burst)
        passed: list[float] = []
        for gap in gaps:
            clock.now += gap
            decisions = await asyncio.gather(*(limiter.hit(key, rate) for _ in range(concurrency)))
            passed += [clock.now] * sum(d.allowed and d.source == "redis" for d in decisions)
        left = 0
        for right, t in enumerate(passed):
            while t - passed[left] >= 1.0:
                left += 1
            assert right - left + 1 < limit + burst
        await limiter.aclose()


class TestOutages:
    async def test_refused(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Redis refusing: decisions fall back to memory, and once down no call is even tried."""
        limiter = make(redis_proxied, dep)
        assert (await limiter.hit("k", "5/minute")).source == "redis"
        redis_proxy.refuse()
        decisions = [await limiter.hit("k", "5/minute") for _ in range(3)]
        assert {d.source for d in decisions} == {"memory"}
        assert dep.is_down
        before = redis_proxy.stats()
        duration, decision = await timed(limiter.hit("k", "5/minute"))
        assert decision.source == "memory"
        assert duration < 0.05  # no network wait (a refused connect alone takes longer on a busy host)
        assert redis_proxy.stats().accepted == before.accepted
        assert redis_proxy.stats().bytes_up == before.bytes_up

    async def test_blackhole_is_bounded(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, registry: Registry, make: Any
    ) -> None:
        """Redis hanging: each decision waits at most the timeout, then none waits at all."""
        # a long recovery interval: no trial call lands inside the timed loop
        dep = registry.dependency("redis", severity=Severity.SEV1, recovery_interval=60)
        limiter = make(redis_proxied, dep)
        assert (await limiter.hit("k", "5/minute")).source == "redis"
        redis_proxy.blackhole()
        for _ in range(3):
            duration, decision = await timed(limiter.hit("k", "5/minute"))
            assert decision.source == "memory"
            assert duration < TIMEOUT + 0.2
        assert dep.is_down
        bytes_up = redis_proxy.stats().bytes_up
        durations = []
        for _ in range(200):
            duration, decision = await timed(limiter.hit("k", "5/minute"))
            durations.append(duration)
        assert sorted(durations)[197] < 0.02  # p99; a blackholed call would take the 0.25 s timeout
        assert redis_proxy.stats().bytes_up == bytes_up

    async def test_blackhole_with_a_batch(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """50 concurrent decisions against a hung Redis all answer within the bound, from memory."""
        limiter = make(redis_proxied, dep)
        await limiter.hit("k", "5/minute")
        redis_proxy.blackhole()
        duration, decisions = await timed(
            asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(50)))
        )
        assert {d.source for d in decisions} == {"memory"}
        assert all(d.allowed for d in decisions)
        assert duration < 2 * TIMEOUT + 0.3  # the direct call and the batch behind it, each bounded
        assert dep.failures == 2  # one per round trip, not one per decision

    async def test_pending_is_bounded(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Past max_pending waiting decisions, the outage policy answers at once (counted)."""
        limiter = make(redis_proxied, dep, max_pending=5, max_in_flight=1)
        await limiter.hit("k", "5/minute")
        redis_proxy.blackhole()
        decisions = await asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(20)))
        assert {d.source for d in decisions} == {"memory"}
        assert limiter.stats().overflow == 14  # 1 in flight, 5 waiting, 14 turned away

    async def test_in_flight_decisions_end_when_redis_goes_down(
        self,
        redis_proxy: FaultProxy,
        redis_proxied: aioredis.Redis,
        registry: Registry,
        make: Any,
        unique: str,
    ) -> None:
        """Blackholed with decisions in flight: once the dependency is down they are answered at once."""
        dep = registry.dependency("redis", severity=Severity.SEV1, failure_threshold=1, recovery_interval=60)
        limiter = make(redis_proxied, dep, timeout=3.0)
        assert (await limiter.hit("k", "5/minute")).source == "redis"  # connected, script loaded

        @fail_soft(dep, fallback=None, timeout=0.2, reason="a cache read on the same Redis")
        async def cached() -> bytes | None:
            return await redis_proxied.get(f"{unique}:cache")

        redis_proxy.blackhole()
        start = time.perf_counter()
        hits = [asyncio.create_task(limiter.hit(f"k{i}", "5/minute")) for i in range(20)]
        await asyncio.sleep(0.05)
        assert not any(hit.done() for hit in hits)  # out on the wire or queued behind it
        assert await cached() is None  # another site sees the outage: the dependency goes down
        assert dep.is_down
        decisions = await asyncio.gather(*hits)
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0  # not the limiter's 3 s timeout
        assert {d.source for d in decisions} == {"memory"}
        assert limiter.stats().cut_short == 20
        assert dep.failures == 1  # the cache read's; the decisions cut short add none
        assert limiter.site is not None
        assert limiter.site.shed_calls == {}

    async def test_latency_above_the_timeout(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """A slow Redis (past the timeout) is an outage; a merely laggy one is not."""
        limiter = make(redis_proxied, dep)
        await limiter.hit("k", "50/minute")
        redis_proxy.latency(0.02)
        fine = [await limiter.hit("k", "50/minute") for _ in range(3)]
        assert {d.source for d in fine} == {"redis"}
        assert dep.failures == 0
        redis_proxy.latency(0.5)
        slow = [await limiter.hit("k", "50/minute") for _ in range(3)]
        assert {d.source for d in slow} == {"memory"}
        assert dep.is_down

    async def test_reset_costs_one_decision(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Connections reset under the limiter: at most the next decision falls back, then Redis again."""
        limiter = make(redis_proxied, dep)
        await limiter.hit("k", "50/minute")
        redis_proxy.reset()
        decisions = [await limiter.hit("k", "50/minute") for _ in range(3)]
        assert decisions[-1].source == "redis"
        assert sum(d.source == "memory" for d in decisions) <= 1
        assert not dep.is_down

    async def test_connections_cut_while_idle_cost_nothing_after_the_outage(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """A kept connection reset during an outage is dropped unused: no failure, no fallback after it."""
        limiter = make(redis_proxied, dep)
        assert (await limiter.hit("k", "50/minute")).source == "redis"  # leaves a kept connection
        redis_proxy.refuse()  # resets the open connections
        await asyncio.sleep(0.1)  # the kept connection's transport sees the reset
        redis_proxy.up()
        decision = await limiter.hit("k", "50/minute")
        assert decision.source == "redis"
        assert (dep.failures, dep.state) == (0, "ok")
        assert limiter.stats().discarded_idle >= 1

    async def test_recovery_by_probe(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, registry: Registry, make: Any
    ) -> None:
        """After an outage the dependency's probe closes it and decisions come from Redis again."""
        dep = registry.dependency(
            "redis",
            severity=Severity.SEV1,
            check=checks.redis(redis_proxied, timeout=0.2),
            recovery_interval=0.05,
        )
        limiter = make(redis_proxied, dep)
        async with redis_proxy.outage("refuse"):
            for _ in range(3):
                await limiter.hit("k", "50/minute")
            assert dep.is_down
        for _ in range(100):
            if not dep.is_down:
                break
            await asyncio.sleep(0.02)
        assert not dep.is_down
        assert (await limiter.hit("k", "50/minute")).source == "redis"

    async def test_recovery_by_trial(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """Without a probe, one decision per recovery_interval tries Redis; success closes the dependency."""
        limiter = make(redis_proxied, dep)
        with redis_proxy.outage("refuse"):
            for _ in range(3):
                await limiter.hit("k", "50/minute")
        assert dep.is_down
        await asyncio.sleep(dep.recovery_interval)
        decision = await limiter.hit("k", "50/minute")
        assert decision.source == "redis"
        assert not dep.is_down

    async def test_warm_memory_keeps_exhausted_clients_limited(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """With warm=True a client that used its bucket in Redis is still limited after Redis fails."""
        clock = FakeClock(1_700_000_000.0)
        warm = make(redis_proxied, dep, clock=clock)
        cold = make(redis_proxied, dep, clock=clock, warm=False, prefix=warm.prefix + "cold:")
        for limiter in (warm, cold):
            assert [(await limiter.hit("k", "3/minute")).allowed for _ in range(3)] == [True] * 3
        with dep.forced_down():
            assert not (await warm.hit("k", "3/minute")).allowed
            assert (await cold.hit("k", "3/minute")).allowed  # a fresh bucket: what warm=True prevents

    async def test_allow_policy_through_a_real_outage(
        self,
        redis_proxy: FaultProxy,
        redis_proxied: aioredis.Redis,
        dep: Dependency,
        make: Any,
        sentry: CapturingTransport,
    ) -> None:
        """fail-open: requests pass while Redis is down; security events mark start and end."""
        with capture_logs() as logs:
            limiter = make(redis_proxied, dep, on_outage="allow")
            with redis_proxy.outage("refuse"):
                decisions = [await limiter.hit("k", "1/minute") for _ in range(5)]
            await asyncio.sleep(dep.recovery_interval)
            after = [await limiter.hit("k", "1/minute") for _ in range(3)]
        assert all(d.allowed for d in decisions)
        assert {d.source for d in decisions} == {"allow"}
        assert [d.source for d in after] == ["redis"] * 3
        events = [e["event"] for e in logs if e["event"].startswith("ratelimit.fail_open")]
        assert events == [
            "ratelimit.fail_open_configured",
            "ratelimit.fail_open",
            "ratelimit.fail_open_ended",
        ]
        tags = [event["tags"] for event in sentry.events if "degrade.security" in event.get("tags", {})]
        assert [t["degrade.transition"] for t in tags] == ["open", "closed"]
        assert {t["degrade.security"] for t in tags} == {"fail_open"}

    async def test_middleware_through_an_outage(
        self, redis_proxy: FaultProxy, redis_proxied: aioredis.Redis, dep: Dependency, make: Any
    ) -> None:
        """The middleware keeps answering through an outage; the header shows the fallback."""

        async def ok(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        limiter = make(redis_proxied, dep, pods=2)
        app = Starlette(
            routes=[Route("/", ok)],
            middleware=[Middleware(RateLimitMiddleware, limiter=limiter, rate="10/minute")],
        )
        transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            healthy = await client.get("/")
            with redis_proxy.outage("blackhole"):
                degraded = [await client.get("/") for _ in range(8)]
        assert healthy.headers["ratelimit"].startswith('"default";r=9;')
        assert "degrade-fallback" not in healthy.headers["ratelimit"]
        assert all(r.headers["ratelimit"].endswith("degrade-fallback=memory") for r in degraded)
        assert degraded[0].headers["ratelimit-policy"] == '"default";q=5;w=60'
        # the per-pod share (5), warmed by the one request Redis already counted
        assert [r.status_code for r in degraded].count(200) == 4
