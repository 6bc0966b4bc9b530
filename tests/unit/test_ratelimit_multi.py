"""Several limits of one request ("5/minute;100/hour"), in memory: all must allow, none consumed otherwise."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from degrade import Dependency, Severity
from degrade._gcra import MemoryStore, parse_rate
from degrade.ratelimit import Decision, Policy, RateLimiter, RateLimitMiddleware, rate_limit
from degrade.ratelimit._groups import combine, most_restrictive

from ..support import FakeClock

US = 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def closed_port_client() -> aredis.Redis:
    """A real client of a port nobody listens on: any call it made would fail (and show)."""
    return aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)


class TestMemoryStoreHitAll:
    def test_all_consume_when_all_allow(self) -> None:
        """Two limits that both allow are both consumed, each answering as its own hit would."""
        store, single = MemoryStore(), MemoryStore()
        minute, hour = parse_rate("2/minute"), parse_rate("100/hour")
        limits = [(minute.emission_us, minute.capacity_us), (hour.emission_us, hour.capacity_us)]
        answers = store.hit_all(["m", "h"], 0, limits)
        assert answers == [single.hit("m", 0, *limits[0]), single.hit("h", 0, *limits[1])]
        assert len(store) == 2

    def test_none_consume_when_one_denies(self) -> None:
        """When one limit denies, the others keep their state: no partial consumption."""
        store = MemoryStore()
        minute, hour = parse_rate("2/minute"), parse_rate("3/hour")
        limits = [(minute.emission_us, minute.capacity_us), (hour.emission_us, hour.capacity_us)]
        for t in range(3):  # three hits a minute apart use up the hour limit
            assert all(a[0] for a in store.hit_all(["m", "h"], t * 60 * US, limits))
        before = dict(store._tats)
        answers = store.hit_all(["m", "h"], 3 * 60 * US, limits)
        assert [a[0] for a in answers] == [True, False]
        assert store._tats == before
        assert answers[0][1] == 2  # the minute limit: full, untouched
        assert answers[1][3] > 0  # the hour limit says when to come back


class TestCombine:
    def test_denied_picks_the_longest_wait(self) -> None:
        """A denied group reports the denying limit with the longest retry_after."""
        a = Decision(False, 5, 0, 30.0, 12.0, "memory")
        b = Decision(True, 100, 40, 50.0, 0.0, "memory")
        c = Decision(False, 1000, 0, 900.0, 600.0, "memory")
        combined = combine([a, b, c])
        assert combined[:6] == c[:6]
        assert combined.per_limit == (a, b, c)
        assert not combined.allowed

    def test_allowed_picks_the_fewest_remaining(self) -> None:
        """An allowed group reports the limit with the fewest remaining (ties: longer reset)."""
        a = Decision(True, 5, 3, 30.0, 0.0, "memory")
        b = Decision(True, 100, 3, 300.0, 0.0, "memory")
        c = Decision(True, 1000, 900, 90.0, 0.0, "memory")
        assert most_restrictive([a, b, c]) == 1
        assert combine([a, b, c]).allowed


class TestLimiterSeveralLimits:
    async def test_every_limit_must_allow(self, clock: FakeClock) -> None:
        """'2/second;3/minute': the second limit refills, the minute limit stops the fourth hit."""
        limiter = RateLimiter(clock=clock)
        allowed = []
        for _ in range(5):
            decision = await limiter.hit("k", "2/second;3/minute")
            allowed.append(decision.allowed)
            clock.now += 1.0
        assert allowed == [True, True, True, False, False]

    async def test_decision_fields_are_the_binding_limit(self, clock: FakeClock) -> None:
        """Fields come from the most restrictive limit; per_limit holds each in the order written."""
        limiter = RateLimiter(clock=clock)
        decision = await limiter.hit("k", "10/second;3/minute")
        assert decision.allowed
        assert (decision.limit, decision.remaining) == (3, 2)
        assert [(d.limit, d.remaining) for d in decision.per_limit] == [(10, 9), (3, 2)]
        single = await limiter.hit("k", "10/second")
        assert single.per_limit == ()

    async def test_denied_consumes_nothing(self, clock: FakeClock) -> None:
        """A group denied by its hour limit leaves its second limit's bucket untouched."""
        limiter = RateLimiter(clock=clock)
        for _ in range(2):
            await limiter.hit("k", "5/second;2/hour")
        denied = await limiter.hit("k", "5/second;2/hour")
        assert not denied.allowed
        assert denied.limit == 2
        assert denied.retry_after == pytest.approx(1800)
        assert denied.per_limit[0].allowed
        assert denied.per_limit[0].remaining == 3  # two consumed, not three
        alone = await limiter.hit("k", "5/second")  # the same bucket, asked alone
        assert alone.remaining == 2

    async def test_cost_counts_in_every_limit(self, clock: FakeClock) -> None:
        """cost= counts in each limit of the group."""
        limiter = RateLimiter(clock=clock)
        decision = await limiter.hit("k", "10/second;20/minute", cost=4)
        assert [d.remaining for d in decision.per_limit] == [6, 16]

    async def test_memory_share_per_pod(self, clock: FakeClock) -> None:
        """Memory decisions of a group use each limit's per-pod share."""
        dep = Dependency("redis", severity=Severity.SEV1)
        limiter = RateLimiter(closed_port_client(), dependency=dep, pods=2, clock=clock)
        with dep.forced_down():
            decision = await limiter.hit("k", "10/second;100/hour")
        assert decision.source == "memory"
        assert [d.limit for d in decision.per_limit] == [5, 50]

    @pytest.mark.parametrize(
        ("policy", "allowed", "source"), [("deny", False, "deny"), ("allow", True, "allow")]
    )
    async def test_outage_policies(self, clock: FakeClock, policy: Any, allowed: bool, source: str) -> None:
        """While Redis is down the outage policy answers a group as it answers one limit."""
        dep = Dependency("redis", severity=Severity.SEV1, retry_after=7)
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage=policy, clock=clock)
        with dep.forced_down():
            decision = await limiter.hit("k", "1/second;5/hour")
        assert (decision.allowed, decision.source) == (allowed, source)
        assert len(decision.per_limit) == 2
        assert limiter.stats().fallback == 1

    async def test_a_failed_round_trip_answers_the_group_from_memory(self, clock: FakeClock) -> None:
        """A group whose Redis call fails is answered whole by the outage policy and feeds the dependency."""
        dep = Dependency("redis", severity=Severity.SEV1)
        limiter = RateLimiter(closed_port_client(), dependency=dep, clock=clock)
        decisions = [await limiter.hit("k", "5/second;2/hour") for _ in range(3)]
        assert [d.allowed for d in decisions] == [True, True, False]
        assert {d.source for d in decisions} == {"memory"}
        assert dep.failures >= 1 or dep.is_down
        assert limiter.stats().fallback == 3
        await limiter.aclose()


class TestGroupProperties:
    @settings(max_examples=60, deadline=None)
    @given(
        gaps=st.lists(st.integers(min_value=0, max_value=3_000_000), min_size=1, max_size=40),
        costs=st.lists(st.integers(min_value=1, max_value=3), min_size=40, max_size=40),
    )
    def test_a_group_allows_exactly_when_every_limit_alone_would(
        self, gaps: list[int], costs: list[int]
    ) -> None:
        """Group hit == all single hits allow, and then state moves exactly as the singles would."""
        rates = [parse_rate("3/second;burst=2"), parse_rate("10/minute")]
        limits = [(r.emission_us, r.capacity_us) for r in rates]
        group, singles = MemoryStore(), [MemoryStore(), MemoryStore()]
        now = 0
        for gap, cost in zip(gaps, costs, strict=False):
            now += gap
            answers = group.hit_all(["a", "b"], now, limits, cost)
            probes = [MemoryStore() for _ in singles]
            for probe, single in zip(probes, singles, strict=True):
                probe._tats.update(single._tats)
            alone = [p.hit(k, now, *lim, cost) for p, k, lim in zip(probes, ["a", "b"], limits, strict=True)]
            assert [a[0] for a in answers] == [a[0] for a in alone]
            if all(a[0] for a in alone):
                for single, probe in zip(singles, probes, strict=True):
                    single._tats = probe._tats
                assert answers == alone
            assert group._tats.get("a") == singles[0]._tats.get("a")
            assert group._tats.get("b") == singles[1]._tats.get("b")


# -- headers ---------------------------------------------------------------------------


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.9", 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


class TestHeaders:
    def test_every_limit_in_the_policy_the_binding_one_in_ratelimit(self) -> None:
        """RateLimit-Policy lists each limit as '<name>#<n>'; RateLimit reports the most restrictive."""
        policy = Policy("api", "10/second;burst=2;100/hour")
        each = (Decision(True, 10, 1, 0.2, 0.0, "redis"), Decision(True, 100, 90, 360.0, 0.0, "redis"))
        headers = dict(policy.headers(combine(list(each)), fallback=False, legacy=True))
        assert headers[b"ratelimit-policy"] == b'"api#1";q=10;w=1;degrade-burst=2, "api#2";q=100;w=3600'
        assert headers[b"ratelimit"] == b'"api#1";r=1;t=1'
        assert headers[b"x-ratelimit-limit"] == b"10"

    async def test_middleware_rate_and_routes(self, clock: FakeClock) -> None:
        """RateLimitMiddleware takes several limits in rate= and in routes=."""
        app = Starlette(
            routes=[Route("/", ok), Route("/login", ok, methods=["POST"])],
            middleware=[
                Middleware(
                    RateLimitMiddleware,
                    limiter=RateLimiter(clock=clock),
                    rate="5/second;3/minute",
                    routes={"POST /login": "1/second;2/hour"},
                )
            ],
        )
        async with client_for(app) as client:
            got = [await client.get("/") for _ in range(4)]
            posted = [await client.post("/login") for _ in range(2)]
        assert [r.status_code for r in got] == [200, 200, 200, 429]
        assert got[0].headers["ratelimit-policy"] == '"default#1";q=5;w=1, "default#2";q=3;w=60'
        assert got[0].headers["ratelimit"] == '"default#2";r=2;t=20'
        assert got[3].headers["retry-after"] == "20"
        assert got[3].json() == {"error": "rate_limited", "retry_after": 20}
        assert [r.status_code for r in posted] == [200, 429]
        assert posted[1].headers["ratelimit"] == '"POST /login#1";r=0;t=1'

    async def test_middleware_deny_policy_is_503(self, clock: FakeClock) -> None:
        """A group answered by the 'deny' policy is a 503 with Retry-After, as one limit is."""
        dep = Dependency("redis", severity=Severity.SEV1, retry_after=9)
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="deny", clock=clock)
        app = Starlette(
            routes=[Route("/", ok)],
            middleware=[Middleware(RateLimitMiddleware, limiter=limiter, rate="5/second;3/minute")],
        )
        async with client_for(app) as client:
            with dep.forced_down():
                response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "9"
        assert response.headers["ratelimit"].endswith(";degrade-fallback=deny")

    async def test_rate_limit_dependency(self, clock: FakeClock) -> None:
        """rate_limit() takes several limits; its 429 carries the binding limit's headers."""
        check = rate_limit(RateLimiter(clock=clock), "10/second;1/minute", name="login")

        async def login(request: Request) -> PlainTextResponse:
            response = PlainTextResponse("in")
            await check(request, response)
            return response

        app = Starlette(routes=[Route("/login", login)])
        async with client_for(app) as client:
            first = await client.get("/login")
            second = await client.get("/login")
        assert first.headers["ratelimit-policy"] == '"login#1";q=10;w=1, "login#2";q=1;w=60'
        assert second.status_code == 429
        assert second.headers["ratelimit"] == '"login#2";r=0;t=60'
        assert second.headers["retry-after"] == "60"
