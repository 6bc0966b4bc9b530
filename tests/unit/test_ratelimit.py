"""Rate limiting without Redis: GCRA in memory, rates, client_ip, the middleware and its headers."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import math
import subprocess
import sys
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
import redis.exceptions as redis_exceptions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from structlog.testing import capture_logs

import degrade.ratelimit
from degrade import ConfigurationError, Dependency, DependencyUnavailable, Severity, exception_handlers
from degrade._gcra import MAX_CAPACITY_US, MemoryStore, Rate, parse_rate
from degrade.ratelimit import (
    Decision,
    LimiterStats,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    client_ip,
    rate_limit,
    ratelimit_exception_handlers,
)

from ..support import CapturingTransport, FakeClock
from .test_exported_members import _isort_order

US = 1_000_000


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def closed_port_client() -> aredis.Redis:
    """A real client of a port nobody listens on: any call it made would fail (and show)."""
    return aredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2, socket_timeout=0.2)


def connections_made(client: aredis.Redis) -> int:
    pool = client.connection_pool
    return len(pool._available_connections) + len(pool._in_use_connections)


def redis_dep(name: str = "redis", **options: Any) -> Dependency:
    return Dependency(name, severity=Severity.SEV1, **options)


# -- rates ----------------------------------------------------------------------


class TestParseRate:
    @pytest.mark.parametrize(
        ("text", "limit", "period", "burst"),
        [
            ("100/minute", 100, 60, 100),
            ("1/second", 1, 1, 1),
            ("5/hour;burst=2", 5, 3600, 2),
            (" 10 / Day ; burst = 30 ", 10, 86400, 30),
            ("3/SECOND", 3, 1, 3),
        ],
    )
    def test_accepted_forms(self, text: str, limit: int, period: int, burst: int) -> None:
        """N/second|minute|hour|day with an optional ;burst=B parse to limit, period and burst."""
        rate = parse_rate(text)
        assert (rate.limit, rate.period, rate.burst) == (limit, period, burst)

    @pytest.mark.parametrize(
        "text",
        [
            "",
            "100",
            "100/m",
            "0/second",
            "-1/second",
            "1.5/second",
            "10/second;burst=0",
            "10/second;burst=",
            "10/second;bursts=3",
            "10/second;burst=3;x=1",
            "ten/second",
            "1" * 11 + "/second",
        ],
    )
    def test_bad_strings_name_the_accepted_forms(self, text: str) -> None:
        """A bad rate raises ValueError that lists every accepted form."""
        with pytest.raises(ValueError, match=r"expected 'COUNT/UNIT' or 'COUNT per UNIT'.*burst=B"):
            parse_rate(text)

    def test_non_string_is_refused(self) -> None:
        """Only strings and Rate objects are rates."""
        with pytest.raises(ValueError, match="a rate is a string"):
            parse_rate(100)  # type: ignore[arg-type]

    def test_canonical_text(self) -> None:
        """The canonical text omits a burst equal to the limit."""
        assert str(parse_rate("100/minute;burst=100")) == "100/minute"
        assert str(parse_rate("100/minute;burst=20")) == "100/minute;burst=20"

    def test_emission_interval_rounds_up(self) -> None:
        """The emission interval is rounded up, so the rate is never exceeded."""
        rate = parse_rate("3/second")
        assert rate.emission_us == 333_334
        assert rate.capacity_us == 3 * 333_334

    def test_capacity_is_bounded(self) -> None:
        """A bucket longer than the exact range of a Lua double is refused."""
        with pytest.raises(ValueError, match="holds a client back"):
            Rate.of(1, 86400, burst=MAX_CAPACITY_US // (86400 * US) + 1)

    def test_per_pod_share(self) -> None:
        """The per-pod rate divides limit and burst (at least 1 each)."""
        assert parse_rate("100/minute;burst=20").per_pod(3)[:3] == (33, 60, 6)
        assert parse_rate("2/minute").per_pod(5)[:3] == (1, 60, 1)
        rate = parse_rate("7/second")
        assert rate.per_pod(1) is rate


# -- the algorithm --------------------------------------------------------------


class TestMemoryGCRA:
    def test_burst_then_denied_with_exact_retry_after(self) -> None:
        """A fresh key gets its burst at once; the next hit waits exactly one interval."""
        store = MemoryStore()
        rate = parse_rate("10/second;burst=3")
        now = 1_000 * US
        results = [store.hit("k", now, rate.emission_us, rate.capacity_us) for _ in range(4)]
        assert [r[0] for r in results] == [True, True, True, False]
        assert [r[1] for r in results] == [2, 1, 0, 0]
        assert results[2][2] == 3 * rate.emission_us  # full again after three intervals
        assert results[3][3] == rate.emission_us  # retry after one interval

    def test_refills_at_the_rate(self) -> None:
        """After retry_after the next hit is allowed, and not a microsecond before."""
        store = MemoryStore()
        rate = parse_rate("2/second;burst=1")
        now = 5 * US
        assert store.hit("k", now, rate.emission_us, rate.capacity_us)[0]
        denied = store.hit("k", now, rate.emission_us, rate.capacity_us)
        assert not denied[0]
        assert not store.hit("k", now + denied[3] - 1, rate.emission_us, rate.capacity_us)[0]
        assert store.hit("k", now + denied[3], rate.emission_us, rate.capacity_us)[0]

    def test_cost_counts_several_requests(self) -> None:
        """A hit of cost c uses c requests of the bucket."""
        store = MemoryStore()
        rate = parse_rate("10/second")
        allowed, remaining, _, _ = store.hit("k", US, rate.emission_us, rate.capacity_us, cost=4)
        assert allowed
        assert remaining == 6
        assert not store.hit("k", US, rate.emission_us, rate.capacity_us, cost=7)[0]
        assert store.hit("k", US, rate.emission_us, rate.capacity_us, cost=6)[0]

    def test_keys_are_independent(self) -> None:
        """One key's usage does not touch another's."""
        store = MemoryStore()
        rate = parse_rate("1/minute")
        assert store.hit("a", US, rate.emission_us, rate.capacity_us)[0]
        assert store.hit("b", US, rate.emission_us, rate.capacity_us)[0]
        assert not store.hit("a", US, rate.emission_us, rate.capacity_us)[0]

    def test_store_is_bounded_and_counts_evictions(self) -> None:
        """Past max_keys the least recently used active key is evicted and counted."""
        store = MemoryStore(max_keys=3)
        rate = parse_rate("1/minute")
        for key in "abcd":
            store.hit(key, US, rate.emission_us, rate.capacity_us)
        assert len(store) == 3
        assert store.evictions == 1
        # "a" was evicted: it gets a fresh bucket (that is what an eviction costs)
        assert store.hit("a", US, rate.emission_us, rate.capacity_us)[0]
        assert store.evictions == 2

    def test_evictions_move_the_prometheus_counter(self) -> None:
        """Each eviction also counts in degrade_ratelimit_evictions_total."""
        before = REGISTRY.get_sample_value("degrade_ratelimit_evictions_total") or 0.0
        store = MemoryStore(max_keys=1)
        rate = parse_rate("1/minute")
        for key in "abc":
            store.hit(key, US, rate.emission_us, rate.capacity_us)
        assert REGISTRY.get_sample_value("degrade_ratelimit_evictions_total") == before + 2

    def test_expired_keys_are_dropped_not_counted_as_evictions(self) -> None:
        """Keys whose time has passed are swept by new keys and count as expired."""
        store = MemoryStore(max_keys=3)
        rate = parse_rate("1/second")
        for key in "abc":
            store.hit(key, US, rate.emission_us, rate.capacity_us)
        later = 10 * US
        store.hit("d", later, rate.emission_us, rate.capacity_us)
        store.hit("e", later, rate.emission_us, rate.capacity_us)
        assert store.evictions == 0
        assert store.expired == 3
        assert len(store) == 2

    def test_recent_use_protects_a_key(self) -> None:
        """A key used again moves to the back of the eviction order."""
        store = MemoryStore(max_keys=2)
        rate = parse_rate("1/minute;burst=5")
        store.hit("a", US, rate.emission_us, rate.capacity_us)
        store.hit("b", US, rate.emission_us, rate.capacity_us)
        store.hit("a", US, rate.emission_us, rate.capacity_us)
        store.hit("c", US, rate.emission_us, rate.capacity_us)
        remaining_a = store.hit("a", US, rate.emission_us, rate.capacity_us)[1]
        assert remaining_a == 2  # a kept its three hits: it was not the one evicted

    def test_bad_max_keys(self) -> None:
        """max_keys must be a whole number >= 1."""
        with pytest.raises(ValueError, match="max_keys"):
            MemoryStore(max_keys=0)


def _count_in_windows(times: list[int], period_us: int) -> int:
    """The largest number of times inside any half-open window of one period."""
    best, left = 0, 0
    for right, t in enumerate(times):
        while t - times[left] >= period_us:
            left += 1
        best = max(best, right - left + 1)
    return best


class TestGCRAProperties:
    @settings(max_examples=200, deadline=None)
    @given(
        limit=st.integers(1, 20),
        burst=st.integers(1, 20),
        period=st.sampled_from([1, 60, 3600]),
        gaps=st.lists(st.floats(0, 1.5), min_size=1, max_size=120),
    )
    def test_never_more_than_rate_plus_burst_in_any_window(
        self, limit: int, burst: int, period: int, gaps: list[float]
    ) -> None:
        """In any window of one period fewer than limit + burst hits are allowed."""
        rate = Rate.of(limit, period, burst)
        store = MemoryStore()
        now = 10**12
        allowed_at: list[int] = []
        for gap in gaps:
            now += int(gap * rate.emission_us)
            if store.hit("k", now, rate.emission_us, rate.capacity_us)[0]:
                allowed_at.append(now)
        assert _count_in_windows(allowed_at, period * US) < limit + burst

    @settings(max_examples=200, deadline=None)
    @given(
        limit=st.integers(1, 50),
        burst=st.integers(1, 50),
        gaps=st.lists(st.integers(0, 3 * US), min_size=1, max_size=60),
    )
    def test_decisions_are_self_consistent(self, limit: int, burst: int, gaps: list[int]) -> None:
        """Allowed means no wait; denied means a wait after which a hit is allowed."""
        rate = Rate.of(limit, 1, burst)
        store = MemoryStore()
        now = 10**12
        for gap in gaps:
            now += gap
            allowed, remaining, reset, retry = store.hit("k", now, rate.emission_us, rate.capacity_us)
            assert 0 <= remaining <= burst
            assert 0 <= reset <= rate.capacity_us
            if allowed:
                assert retry == 0
            else:
                assert retry > 0
                probe = MemoryStore()
                probe._tats["k"] = now + reset
                assert probe.hit("k", now + retry, rate.emission_us, rate.capacity_us)[0]


# -- the limiter, memory path ------------------------------------------------------


class TestRateLimiterMemory:
    async def test_decision_fields(self, clock: FakeClock) -> None:
        """A memory-only limiter answers with source memory and the rate's numbers."""
        limiter = RateLimiter(clock=clock)
        decision = await limiter.hit("1.2.3.4", "2/second")
        assert decision == Decision(True, 2, 1, 0.5, 0.0, "memory")
        await limiter.hit("1.2.3.4", "2/second")
        denied = await limiter.hit("1.2.3.4", "2/second")
        assert not denied.allowed
        assert denied.retry_after == pytest.approx(0.5)
        clock.now += 0.5
        assert (await limiter.hit("1.2.3.4", "2/second")).allowed

    async def test_rates_are_separate_buckets(self, clock: FakeClock) -> None:
        """The same key under two rates has two buckets."""
        limiter = RateLimiter(clock=clock)
        assert (await limiter.hit("k", "1/minute")).allowed
        assert (await limiter.hit("k", "2/minute")).allowed
        assert not (await limiter.hit("k", "1/minute")).allowed

    async def test_memory_rate_is_divided_by_pods(self, clock: FakeClock) -> None:
        """With pods=4 each process allows a quarter of the rate."""
        limiter = RateLimiter(pods=4, clock=clock)
        decisions = [await limiter.hit("k", "100/minute") for _ in range(30)]
        assert sum(d.allowed for d in decisions) == 25
        assert decisions[0].limit == 25

    async def test_long_keys_are_hashed_and_bounded(self, clock: FakeClock) -> None:
        """Keys past 128 characters become a fixed-length hash; distinct keys stay distinct."""
        limiter = RateLimiter(clock=clock)
        a, b = "a" * 10_000, "a" * 9_999 + "b"
        assert (await limiter.hit(a, "1/minute")).allowed
        assert (await limiter.hit(b, "1/minute")).allowed
        assert not (await limiter.hit(a, "1/minute")).allowed
        assert max(len(k) for k in limiter.store._tats) < 100

    async def test_store_bound_applies(self, clock: FakeClock) -> None:
        """The limiter's store never holds more than max_keys keys."""
        limiter = RateLimiter(max_keys=10, clock=clock)
        for i in range(50):
            await limiter.hit(f"k{i}", "1/minute")
        assert len(limiter.store) == 10
        assert limiter.store.evictions == 40

    @pytest.mark.parametrize("cost", [0, -1, 1.5, "2", True, 1.0, math.inf, math.nan])
    async def test_bad_cost(self, cost: Any) -> None:
        """cost must be an int >= 1: not a bool, not a float (1.0 included), not inf or NaN."""
        with pytest.raises(ConfigurationError, match=r"cost must be an int >= 1; got "):
            await RateLimiter().hit("k", "1/second", cost=cost)

    async def test_bad_rate_raises(self) -> None:
        """A bad rate is a bug in the caller: ValueError, not a decision."""
        with pytest.raises(ValueError, match="COUNT/UNIT"):
            await RateLimiter().hit("k", "lots")
        with pytest.raises(ValueError, match="a rate is a string"):
            await RateLimiter().hit("k", ["1/second"])  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"on_outage": "open"}, "on_outage must be"),
            ({"redis": "redis://127.0.0.1:6379/0"}, "a client, not a URL"),
            ({"redis": object()}, "must be a redis.asyncio client"),
            ({"pods": 0}, "pods"),
            ({"timeout": 0}, "timeout"),
            ({"max_batch": 0}, "max_batch"),
            ({"dependency": "redis"}, "dependency must be"),
        ],
    )
    def test_bad_options(self, options: dict[str, Any], message: str) -> None:
        """Bad options raise ValueError at construction."""
        with pytest.raises(ValueError, match=message):
            RateLimiter(**options)

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"timeout": math.inf}, "timeout must be a finite number of seconds > 0; got inf"),
            ({"timeout": math.nan}, "timeout must be a finite number of seconds > 0; got nan"),
            ({"timeout": True}, "timeout must be a finite number of seconds > 0; got True"),
            ({"timeout": -0.1}, "timeout must be a finite number of seconds > 0; got -0.1"),
            ({"pods": True}, "pods must be an int >= 1; got True"),
            ({"pods": 2.0}, "pods must be an int >= 1; got 2.0"),
            ({"max_batch": math.inf}, "max_batch must be an int >= 1; got inf"),
            ({"max_in_flight": math.nan}, "max_in_flight must be an int >= 1; got nan"),
            ({"max_pending": False}, "max_pending must be an int >= 1; got False"),
        ],
    )
    def test_infinity_nan_and_bools_are_refused(self, options: dict[str, Any], message: str) -> None:
        """Infinity, NaN and bools are not numbers here; the message names the argument, rule and value."""
        with pytest.raises(ConfigurationError) as info:
            RateLimiter(**options)
        assert str(info.value) == message

    def test_timeout_is_kept_as_float(self) -> None:
        """An int timeout is accepted and kept as seconds (float)."""
        limiter = RateLimiter(timeout=2)
        assert limiter.timeout == 2.0
        assert isinstance(limiter.timeout, float)

    def test_old_fallback_name_warns_and_works(self) -> None:
        """fallback= still works for one minor version, with a DeprecationWarning naming on_outage=."""
        with pytest.warns(DeprecationWarning, match="use on_outage="):
            limiter = RateLimiter(fallback="deny")
        assert limiter.on_outage == "deny"
        with pytest.warns(DeprecationWarning, match=r"use \.on_outage"):
            assert limiter.fallback == "deny"
        with (
            pytest.raises(ValueError, match="on_outage= only"),
            pytest.warns(DeprecationWarning, match="on_outage"),
        ):
            RateLimiter(fallback="deny", on_outage="allow")

    def test_redis_needs_a_dependency(self) -> None:
        """A Redis limiter without a Dependency is refused: its state drives the outage policy."""
        with pytest.raises(ValueError, match="needs dependency="):
            RateLimiter(closed_port_client())


# -- stats: one shape, a frozen snapshot ---------------------------------------------------


class TestStats:
    async def test_stats_is_a_frozen_snapshot(self, clock: FakeClock) -> None:
        """limiter.stats() is a frozen LimiterStats; later decisions do not change one kept."""
        client = closed_port_client()
        dep = redis_dep()
        limiter = RateLimiter(client, dependency=dep, clock=clock)
        before = limiter.stats()
        assert before == LimiterStats()
        with dep.forced_down():
            for _ in range(3):
                await limiter.hit("k", "5/minute")
        after = limiter.stats()
        assert isinstance(after, LimiterStats)
        assert (before.fallback, after.fallback) == (0, 3)
        assert dataclasses.asdict(after) == {
            "redis": 0,
            "batches": 0,
            "fallback": 3,
            "overflow": 0,
            "shed": 0,
            "cut_short": 0,
            "errors": 0,
            "noscript": 0,
            "discarded_idle": 0,
        }
        with pytest.raises(dataclasses.FrozenInstanceError):
            after.fallback = 0  # type: ignore[misc]
        await client.aclose()

    async def test_old_attribute_spelling_warns_and_stays_live(self, clock: FakeClock) -> None:
        """limiter.stats.<counter> works for one minor version: the live value, a warning naming stats()."""
        client = closed_port_client()
        dep = redis_dep()
        limiter = RateLimiter(client, dependency=dep, clock=clock)
        kept = limiter.stats
        with dep.forced_down():
            await limiter.hit("k", "5/minute")
        with pytest.warns(
            DeprecationWarning,
            match=r"limiter\.stats\.fallback is deprecated; use limiter\.stats\(\)\.fallback",
        ) as record:
            assert kept.fallback == 1  # read when asked, as the old live counters were
        assert record[0].filename == __file__  # points at the caller's line
        with pytest.warns(DeprecationWarning, match=r"setting limiter\.stats\.batches is deprecated"):
            limiter.stats.batches = 7
        assert limiter.stats().batches == 7
        with pytest.raises(AttributeError, match="nope"):
            _ = limiter.stats.nope
        assert repr(limiter.stats) == repr(limiter.stats()) == repr(LimiterStats(batches=7, fallback=1))
        await client.aclose()


# -- outage policies (the dependency is held down in-process: no network) ---------------


class TestOutagePolicies:
    async def test_known_down_makes_no_redis_call(self, clock: FakeClock) -> None:
        """While the dependency is down, decisions come from memory and Redis is never called."""
        client = closed_port_client()
        dep = redis_dep()
        limiter = RateLimiter(client, dependency=dep, clock=clock)
        with dep.forced_down():
            decisions = [await limiter.hit("k", "3/minute") for _ in range(5)]
            assert dep.failures == 3  # only the forced ones: nothing was tried
        assert [d.allowed for d in decisions] == [True, True, True, False, False]
        assert {d.source for d in decisions} == {"memory"}
        assert connections_made(client) == 0
        assert limiter.stats().fallback == 5
        await client.aclose()

    async def test_memory_fallback_divides_by_pods(self, clock: FakeClock) -> None:
        """The memory fallback allows rate / pods."""
        dep = redis_dep()
        limiter = RateLimiter(closed_port_client(), dependency=dep, pods=3, clock=clock)
        with dep.forced_down():
            decisions = [await limiter.hit("k", "30/minute") for _ in range(12)]
        assert sum(d.allowed for d in decisions) == 10
        assert decisions[0].limit == 10

    async def test_deny_policy(self, clock: FakeClock) -> None:
        """on_outage='deny' refuses every decision while Redis is down, with the dependency's Retry-After."""
        dep = redis_dep(retry_after=7)
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="deny", clock=clock)
        with dep.forced_down():
            decision = await limiter.hit("k", "100/minute")
        assert decision == Decision(False, 100, 0, 7.0, 7.0, "deny")

    async def test_allow_policy_warns_at_construction(self) -> None:
        """on_outage='allow' (fail-open) logs a security warning when the limiter is built."""
        with capture_logs() as logs:
            RateLimiter(closed_port_client(), dependency=redis_dep(), on_outage="allow")
        assert [e["event"] for e in logs] == ["ratelimit.fail_open_configured"]
        assert logs[0]["log_level"] == "warning"
        assert logs[0]["security"] == "fail_open"

    async def test_allow_policy_emits_one_security_event_not_one_per_request(
        self, clock: FakeClock, sentry: CapturingTransport
    ) -> None:
        """Failing open logs and reports once when it starts, tagged degrade.security=fail_open."""
        dep = redis_dep()
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="allow", clock=clock)
        with capture_logs() as logs, dep.forced_down():
            decisions = [await limiter.hit("k", "1/minute") for _ in range(5)]
        assert all(d.allowed and d.source == "allow" for d in decisions)
        events = [e for e in logs if e["event"].startswith("ratelimit.")]
        assert [e["event"] for e in events] == ["ratelimit.fail_open"]
        assert events[0]["security"] == "fail_open"
        tagged = [event for event in sentry.events if "degrade.security" in event.get("tags", {})]
        assert len(tagged) == 1
        assert tagged[0]["tags"]["degrade.security"] == "fail_open"
        assert tagged[0]["tags"]["degrade.transition"] == "open"
        assert tagged[0]["level"] == "warning"

    async def test_site_is_registered_for_the_runbook(self) -> None:
        """The limiter declares its fail mode on the dependency, as decorated call sites do."""
        dep = redis_dep()
        RateLimiter(closed_port_client(), dependency=dep, on_outage="memory", pods=2)
        RateLimiter(closed_port_client(), dependency=dep, on_outage="deny", prefix="b:")
        RateLimiter(closed_port_client(), dependency=dep, on_outage="allow", prefix="c:")
        modes = [(s.mode, s.fallback) for s in dep.sites]
        assert modes == [
            ("fail_soft", "in-memory GCRA (rate / 2 pods)"),
            ("fail_loud", None),
            ("fail_soft", "allow every request"),
        ]
        assert "FAIL-OPEN" in dep.sites[2].reason

    async def test_degraded_decisions_are_counted_on_the_site(self, clock: FakeClock) -> None:
        """Each decision answered by the outage policy counts on the site."""
        dep = redis_dep()
        limiter = RateLimiter(closed_port_client(), dependency=dep, clock=clock)
        with dep.forced_down():
            for _ in range(4):
                await limiter.hit("k", "1/minute")
        assert limiter.site is not None
        assert limiter.site.degraded_calls == 4

    async def test_connection_failure_falls_back_and_feeds_the_dependency(self, clock: FakeClock) -> None:
        """A refused connection counts as a failure and the decision comes from memory."""
        client = closed_port_client()
        dep = redis_dep(failure_threshold=2)
        limiter = RateLimiter(client, dependency=dep, clock=clock)
        first = await limiter.hit("k", "5/minute")
        assert first.source == "memory"
        assert dep.failures == 1
        await limiter.hit("k", "5/minute")
        assert dep.is_down
        await limiter.aclose()
        await client.aclose()


class _BuggyRedis:
    """Not a Redis: a client whose every command hits a bug (a KeyError), never an outage."""

    def register_script(self, script: str) -> Any:
        return type("Script", (), {"sha": "0" * 40})()

    async def execute_command(self, *args: Any) -> Any:
        raise KeyError("a bug, not an outage")


class TestNeverFailsOpenByAccident:
    @pytest.mark.parametrize(
        ("fallback", "source", "allowed"),
        [
            ("allow", "memory", [True, False]),
            ("memory", "memory", [True, False]),
            ("deny", "deny", [False, False]),
        ],
    )
    async def test_unexpected_error_denies_or_falls_back(
        self, clock: FakeClock, fallback: Any, source: str, allowed: list[bool]
    ) -> None:
        """A bug on the Redis path is not an outage: never fail open, never feed the dependency."""
        dep = redis_dep()
        with capture_logs() as logs:
            limiter = RateLimiter(_BuggyRedis(), dependency=dep, on_outage=fallback, clock=clock)
            decisions = [await limiter.hit("k", "1/minute") for _ in range(2)]
        assert [d.allowed for d in decisions] == allowed
        assert {d.source for d in decisions} == {source}
        assert dep.failures == 0
        assert limiter.stats().errors == 2
        errors = [e for e in logs if e["event"] == "ratelimit.error"]
        assert len(errors) == 1  # logged once, counted twice
        assert errors[0]["error"] == "KeyError"
        assert "a bug" not in str(errors[0])
        assert limiter.site is not None
        assert limiter.site.unexpected_errors == 2  # shown in /health/deep details

    async def test_a_limiter_that_never_reaches_redis_says_so_loudly(
        self, clock: FakeClock, sentry_events: list[dict[str, Any]]
    ) -> None:
        """UNEXPECTED_LOUD unexpected errors in a row: one critical line and one Sentry event."""
        from degrade.ratelimit import _decisions

        dep = redis_dep()
        with capture_logs() as logs:
            limiter = RateLimiter(_BuggyRedis(), dependency=dep, clock=clock)
            for _ in range(_decisions.UNEXPECTED_LOUD * 2):
                await limiter.hit("k", "1000/minute")
        loud = [e for e in logs if e["event"] == "ratelimit.not_using_redis"]
        assert len(loud) == 1
        assert loud[0]["log_level"] == "critical"
        assert loud[0]["consecutive"] == _decisions.UNEXPECTED_LOUD
        events = [e for e in sentry_events if e["tags"].get("degrade.component") == "ratelimit"]
        assert len(events) == 1
        assert dep.state == "ok"


# -- saturation is not an outage; in-flight work on a Redis that went down -------------


def _reply(n: int) -> bytes:
    """The script's reply for n allowed decisions."""
    return b" ".join([b"1 9 100000 0"] * n)


class _HeldRedis:
    """A client (no pool: the generic path) whose every EVALSHA waits until ``release()``."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls = 0
        self.cancelled = 0

    def register_script(self, script: str) -> Any:
        return type("Script", (), {"sha": "0" * 40})()

    async def execute_command(self, *args: Any) -> Any:
        self.calls += 1
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return _reply(int(args[2]))

    def release(self) -> None:
        self.gate.set()


class _Encoder:
    encoding = "utf-8"
    encoding_errors = "strict"


class _Reader:
    def __init__(self) -> None:
        self._buffer = bytearray()


class _HeldConnection:
    """A pooled connection whose reply never gets read; ``_reader._buffer`` says whether it arrived."""

    def __init__(self, replied: bool) -> None:
        self.encoder = _Encoder()
        self._writer = None
        self._reader = _Reader()
        if replied:
            self._reader._buffer += b"$12\r\n1 9 100000 0\r\n"
        self.sent: list[bytes] = []

    async def send_packed_command(self, packed: Any, check_health: bool = True) -> None:
        self.sent.append(packed)

    async def read_response(self, timeout: float | None = None) -> Any:  # noqa: ASYNC109 - redis-py's
        await asyncio.Event().wait()  # the event loop never gets to it

    async def disconnect(self, nowait: bool = False) -> None:
        return None


class _Pool:
    """A connection pool: ``exhausted`` (every connection out, waits never end), or failing with ``error``."""

    def __init__(self, *, exhausted: bool = False, error: BaseException | None = None, replied: bool = False):
        self.exhausted = exhausted
        self.error = error
        self.replied = replied
        self.released = 0

    def can_get_connection(self) -> bool:
        return not self.exhausted

    async def get_connection(self) -> Any:
        if self.error is not None:
            raise self.error
        if self.exhausted:
            await asyncio.Event().wait()
        return _HeldConnection(self.replied)

    async def release(self, conn: Any) -> None:
        self.released += 1


class _PooledRedis:
    """A client with a connection pool (the limiter's lean path)."""

    connection = None

    def __init__(self, pool: _Pool) -> None:
        self.connection_pool = pool

    def register_script(self, script: str) -> Any:
        return type("Script", (), {"sha": "0" * 40})()


def _no_connection_error() -> redis_exceptions.ConnectionError:
    try:
        try:
            raise TimeoutError
        except TimeoutError as exc:
            raise redis_exceptions.ConnectionError("No connection available.") from exc
    except redis_exceptions.ConnectionError as err:
        return err


class TestSaturationIsNotAnOutage:
    async def test_max_pending_overflow_is_shed(self, clock: FakeClock) -> None:
        """Past max_pending, decisions are shed: counted, answered from memory, no failure fed."""
        redis = _HeldRedis()
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(redis, dependency=dep, clock=clock, max_in_flight=1, max_pending=3, timeout=5)
        tasks = [asyncio.create_task(limiter.hit(f"k{i}", "5/minute")) for i in range(10)]
        await asyncio.sleep(0.01)
        shed = [t.result() for t in tasks if t.done()]
        assert len(shed) == 6  # 1 direct call out, 3 waiting, 6 turned away
        assert {d.source for d in shed} == {"memory"}
        assert limiter.site is not None
        assert limiter.site.shed_calls == {"max-pending": 6}
        assert limiter.site.degraded_calls == 0
        stats = limiter.stats()
        assert (stats.overflow, stats.shed, stats.fallback) == (6, 6, 0)
        assert dep.failures == 0
        assert not dep.is_down
        redis.release()
        rest = await asyncio.gather(*tasks)
        assert [d.source for d in rest].count("redis") == 4
        assert dep.failures == 0

    @pytest.mark.parametrize("fallback", ["allow", "deny"])
    async def test_shed_never_fails_open(self, clock: FakeClock, fallback: Any) -> None:
        """Shedding is not an outage: "allow" answers from memory (no fail-open event), "deny" denies."""
        redis = _HeldRedis()
        dep = redis_dep()
        with capture_logs() as logs:
            limiter = RateLimiter(
                redis,
                dependency=dep,
                on_outage=fallback,
                clock=clock,
                max_in_flight=1,
                max_pending=1,
                timeout=5,
            )
            tasks = [asyncio.create_task(limiter.hit("k", "5/minute")) for _ in range(3)]
            await asyncio.sleep(0.01)
        shed = tasks[2].result()
        assert shed.source == ("memory" if fallback == "allow" else "deny")
        assert "ratelimit.fail_open" not in [e["event"] for e in logs]
        redis.release()
        await asyncio.gather(*tasks)

    async def test_exhausted_pool_is_shed_not_a_failure(self, clock: FakeClock) -> None:
        """No free connection in the client's pool within the timeout: shed, the dependency untouched."""
        pool = _Pool(exhausted=True)
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(_PooledRedis(pool), dependency=dep, clock=clock, timeout=0.05)
        decisions = await asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(5)))
        assert {d.source for d in decisions} == {"memory"}
        assert limiter.site is not None
        assert limiter.site.shed_calls == {"pool-saturated": 5}  # the direct call and the batch behind it
        assert limiter.site.degraded_calls == 0
        assert dep.failures == 0
        assert not dep.is_down

    @pytest.mark.parametrize(
        "error",
        [redis_exceptions.MaxConnectionsError("Too many connections"), _no_connection_error()],
        ids=["max-connections", "no-connection-available"],
    )
    async def test_pool_errors_are_shed(self, clock: FakeClock, error: BaseException) -> None:
        """The pool's own "no connection" errors are local capacity, not Redis failing."""
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(_PooledRedis(_Pool(error=error)), dependency=dep, clock=clock)
        decision = await limiter.hit("k", "5/minute")
        assert decision.source == "memory"
        assert limiter.site is not None
        assert limiter.site.shed_calls == {"pool-saturated": 1}
        assert dep.failures == 0

    @pytest.mark.parametrize("timed_out", [False, True], ids=["refused", "connect-timed-out"])
    async def test_connection_errors_are_still_failures(self, clock: FakeClock, timed_out: bool) -> None:
        """A real connection error from the pool (refused, ETIMEDOUT) still feeds the dependency."""
        error = redis_exceptions.ConnectionError(
            "Error 110 connecting to 10.9.9.9:6379. Connection timed out."
        )
        if timed_out:
            error.__cause__ = TimeoutError(110, "Connection timed out")
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(_PooledRedis(_Pool(error=error)), dependency=dep, clock=clock)
        assert (await limiter.hit("k", "5/minute")).source == "memory"
        assert dep.is_down
        assert limiter.site is not None
        assert limiter.site.shed_calls == {}

    async def test_late_loop_with_the_reply_in_the_buffer_is_shed(self, clock: FakeClock) -> None:
        """Redis answered but the loop never read it in time: the loop's lag, not Redis's failure."""
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(_PooledRedis(_Pool(replied=True)), dependency=dep, clock=clock, timeout=0.05)
        decisions = await asyncio.gather(*(limiter.hit(f"k{i}", "5/minute") for i in range(3)))
        assert {d.source for d in decisions} == {"memory"}
        assert limiter.site is not None
        assert limiter.site.shed_calls == {"loop-lag": 3}
        assert dep.failures == 0

    async def test_silence_on_the_wire_is_a_failure(self, clock: FakeClock) -> None:
        """No reply at all within the timeout (a blackholed Redis): a failure, as before."""
        dep = redis_dep(failure_threshold=1)
        limiter = RateLimiter(_PooledRedis(_Pool(replied=False)), dependency=dep, clock=clock, timeout=0.05)
        assert (await limiter.hit("k", "5/minute")).source == "memory"
        assert dep.is_down
        assert limiter.site is not None
        assert limiter.site.shed_calls == {}
        assert limiter.site.degraded_calls == 1


class TestInFlightWhenRedisGoesDown:
    async def test_waiting_decisions_are_answered_at_once(self, clock: FakeClock) -> None:
        """Redis going down (seen elsewhere) answers the direct call, the batch and the queue now."""
        redis = _HeldRedis()
        dep = redis_dep()
        limiter = RateLimiter(redis, dependency=dep, clock=clock, timeout=30, max_in_flight=2)
        tasks = [asyncio.create_task(limiter.hit(f"k{i}", "5/minute")) for i in range(20)]
        await asyncio.sleep(0.01)
        assert redis.calls == 2  # the direct call and one batch out, the rest queued behind them
        assert not any(t.done() for t in tasks)
        start = asyncio.get_running_loop().time()
        dep.mark_down()
        decisions = await asyncio.gather(*tasks)
        assert asyncio.get_running_loop().time() - start < 0.5  # not the 30 s timeout
        assert {d.source for d in decisions} == {"memory"}
        assert limiter.stats().cut_short == 20
        assert limiter.site is not None
        assert limiter.site.degraded_calls == 20
        assert limiter.site.shed_calls == {}
        assert redis.cancelled == 2  # the calls out were ended, not left to hang
        assert dep.failures == dep.failure_threshold  # mark_down's; nothing added per decision

    async def test_a_recovery_changes_nothing_in_flight(self, clock: FakeClock) -> None:
        """Only a transition to down ends the waits."""
        redis = _HeldRedis()
        dep = redis_dep()
        limiter = RateLimiter(redis, dependency=dep, clock=clock, timeout=30)
        dep.mark_down()
        dep.record_success()
        tasks = [asyncio.create_task(limiter.hit(f"k{i}", "5/minute")) for i in range(3)]
        await asyncio.sleep(0.01)
        assert not any(t.done() for t in tasks)
        redis.release()
        assert {d.source for d in await asyncio.gather(*tasks)} == {"redis"}
        assert limiter.stats().cut_short == 0


# -- client_ip ------------------------------------------------------------------------


def scope(peer: str | None = "203.0.113.9", xff: list[bytes] | None = None) -> dict[str, Any]:
    headers = [(b"x-forwarded-for", value) for value in (xff or [])]
    return {"type": "http", "client": (peer, 1234) if peer is not None else None, "headers": headers}


class TestClientIp:
    def test_peer_without_trusted_proxies(self) -> None:
        """With no trusted proxy, X-Forwarded-For is never read."""
        key = client_ip()
        assert key(scope("203.0.113.9", [b"1.1.1.1"])) == "203.0.113.9"

    def test_untrusted_peer_cannot_spoof(self) -> None:
        """A header from a peer that is not a trusted proxy is ignored."""
        key = client_ip(["10.0.0.0/8"])
        assert key(scope("203.0.113.9", [b"1.1.1.1"])) == "203.0.113.9"

    def test_rightmost_untrusted_hop(self) -> None:
        """Behind trusted proxies the rightmost untrusted hop is the client; hops left of it are ignored."""
        key = client_ip(["10.0.0.0/8", "192.168.1.1"])
        header = b"6.6.6.6, 198.51.100.7, 192.168.1.1, 10.1.2.3"
        assert key(scope("10.0.0.1", [header])) == "198.51.100.7"

    def test_several_header_lines_are_one_list(self) -> None:
        """Repeated X-Forwarded-For lines are read as one comma-separated list."""
        key = client_ip(["10.0.0.0/8"])
        assert key(scope("10.0.0.1", [b"6.6.6.6", b"198.51.100.7, 10.9.9.9"])) == "198.51.100.7"

    def test_all_hops_trusted_gives_the_leftmost(self) -> None:
        """When every hop is a trusted proxy, the leftmost is the client."""
        key = client_ip(["10.0.0.0/8"])
        assert key(scope("10.0.0.1", [b"10.0.0.5, 10.0.0.6"])) == "10.0.0.5"

    def test_no_header_gives_the_peer(self) -> None:
        """A trusted peer without the header is itself the client."""
        assert client_ip(["10.0.0.0/8"])(scope("10.0.0.1")) == "10.0.0.1"

    @pytest.mark.parametrize(
        "header",
        [b"not-an-ip", b"1.2.3.4, garbage", b"unknown", b"", b"1.2.3.4,,", b"999.1.1.1", b"\xff\xfe"],
    )
    def test_garbage_falls_back_to_the_peer(self, header: bytes) -> None:
        """Something that is not an address where one is needed: the peer is the key."""
        assert client_ip(["10.0.0.0/8"])(scope("10.0.0.1", [header])) == "10.0.0.1"

    def test_garbage_left_of_the_client_is_ignored(self) -> None:
        """Client-written garbage to the left of the client's hop changes nothing."""
        assert client_ip(["10.0.0.0/8"])(scope("10.0.0.1", [b"garbage, 198.51.100.7"])) == "198.51.100.7"

    def test_overlong_header_falls_back_to_the_peer(self) -> None:
        """A header past max_length bytes is not parsed."""
        header = b"198.51.100.7" + b" " * 2000
        assert client_ip(["10.0.0.0/8"])(scope("10.0.0.1", [header])) == "10.0.0.1"

    def test_too_many_hops_falls_back_to_the_peer(self) -> None:
        """More than max_hops hops is not parsed."""
        header = b",".join([b"10.0.0.2"] * 20)
        assert client_ip(["10.0.0.0/8"], max_hops=16)(scope("10.0.0.1", [header])) == "10.0.0.1"

    def test_ports_and_brackets(self) -> None:
        """Hops with a port (IPv4 or bracketed IPv6) are read without it."""
        key = client_ip(["10.0.0.0/8"], ipv6_prefix=128)
        assert key(scope("10.0.0.1", [b"198.51.100.7:4711"])) == "198.51.100.7"
        assert key(scope("10.0.0.1", [b"[2001:db8::1]:443"])) == "2001:db8::1"

    def test_ipv6_is_grouped_by_prefix(self) -> None:
        """IPv6 clients are keyed by their /64 by default: rotating addresses in it does not help."""
        key = client_ip()
        assert key(scope("2001:db8:1:2::1")) == key(scope("2001:db8:1:2:ffff::9")) == "2001:db8:1:2::/64"
        assert client_ip(ipv6_prefix=128)(scope("2001:db8:1:2::1")) == "2001:db8:1:2::1"

    def test_ipv4_mapped_is_ipv4(self) -> None:
        """An IPv4-mapped IPv6 peer is keyed, and trusted, as its IPv4 address."""
        assert client_ip()(scope("::ffff:203.0.113.9")) == "203.0.113.9"
        assert client_ip(["10.0.0.0/8"])(scope("::ffff:10.0.0.1", [b"198.51.100.7"])) == "198.51.100.7"

    def test_missing_or_odd_peer(self) -> None:
        """No peer is 'unknown'; a peer that is not an address is used, bounded."""
        key = client_ip(["10.0.0.0/8"])
        assert key(scope(None)) == "unknown"
        assert key(scope("testclient")) == "testclient"
        assert len(key(scope("x" * 500))) == 64

    def test_bad_trusted_proxy(self) -> None:
        """A trusted proxy that is not an address or network is refused at construction."""
        with pytest.raises(ValueError, match="trusted_proxies"):
            client_ip(["10.0.0.0/33"])
        with pytest.raises(ValueError, match="ipv6_prefix"):
            client_ip(ipv6_prefix=0)

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"ipv6_prefix": 129}, "ipv6_prefix must be an int in 1..128; got 129"),
            ({"ipv6_prefix": True}, "ipv6_prefix must be an int in 1..128; got True"),
            ({"ipv6_prefix": 64.0}, "ipv6_prefix must be an int in 1..128; got 64.0"),
            ({"max_hops": math.inf}, "max_hops must be an int >= 1; got inf"),
            ({"max_hops": True}, "max_hops must be an int >= 1; got True"),
            ({"max_length": math.nan}, "max_length must be an int >= 1; got nan"),
            ({"max_length": 0}, "max_length must be an int >= 1; got 0"),
        ],
    )
    def test_bad_bounds(self, options: dict[str, Any], message: str) -> None:
        """The bounds are ints in range: bools, floats, infinity and NaN are refused, named."""
        with pytest.raises(ConfigurationError) as info:
            client_ip(**options)
        assert str(info.value) == message

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(header=st.binary(max_size=300), peer=st.sampled_from(["10.0.0.1", "203.0.113.9"]))
    def test_any_header_gives_a_bounded_address(self, header: bytes, peer: str) -> None:
        """Whatever the header holds, the key is an address (or /64) of <= 64 characters."""
        key = client_ip(["10.0.0.0/8"])(scope(peer, [header]))
        assert len(key) <= 64
        ipaddress.ip_network(key, strict=False)
        if peer == "203.0.113.9":
            assert key == peer  # untrusted peer: the header is never used


# -- the middleware (memory limiter) -------------------------------------------------------


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", headers={"x-app": "1"})


def make_app(limiter: RateLimiter, **options: Any) -> Starlette:
    options.setdefault("rate", "2/minute")
    return Starlette(
        routes=[Route("/items/{id:int}", ok, methods=["GET", "POST"]), Route("/health", ok), Route("/", ok)],
        middleware=[Middleware(RateLimitMiddleware, limiter=limiter, **options)],
    )


def client_for(app: Any, peer: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


class TestMiddleware:
    async def test_headers_on_every_response(self, clock: FakeClock) -> None:
        """Allowed responses carry RateLimit-Policy and RateLimit; the app's own headers stay."""
        async with client_for(make_app(RateLimiter(clock=clock))) as client:
            first = await client.get("/")
            second = await client.get("/")
        assert first.status_code == 200
        assert first.headers["x-app"] == "1"
        assert first.headers["ratelimit-policy"] == '"default";q=2;w=60'
        assert first.headers["ratelimit"] == '"default";r=1;t=30'
        assert second.headers["ratelimit"] == '"default";r=0;t=60'
        assert "x-ratelimit-limit" not in first.headers

    async def test_over_the_limit_is_429_json(self, clock: FakeClock) -> None:
        """Over the limit: 429 with the shared JSON body, Retry-After and the headers."""
        async with client_for(make_app(RateLimiter(clock=clock))) as client:
            for _ in range(2):
                await client.get("/")
            response = await client.get("/")
        assert response.status_code == 429
        assert response.json() == {"error": "rate_limited", "retry_after": 30}
        assert response.headers["retry-after"] == "30"
        assert response.headers["ratelimit"] == '"default";r=0;t=60'
        assert response.headers["content-type"] == "application/json"

    async def test_legacy_headers_are_opt_in(self, clock: FakeClock) -> None:
        """legacy_headers=True adds X-RateLimit-Limit/Remaining/Reset."""
        app = make_app(RateLimiter(clock=clock), legacy_headers=True)
        async with client_for(app) as client:
            response = await client.get("/")
        assert response.headers["x-ratelimit-limit"] == "2"
        assert response.headers["x-ratelimit-remaining"] == "1"
        assert response.headers["x-ratelimit-reset"] == "30"

    async def test_burst_is_advertised(self, clock: FakeClock) -> None:
        """A burst other than the limit is shown as degrade-burst on the policy."""
        app = make_app(RateLimiter(clock=clock), rate="10/second;burst=2")
        async with client_for(app) as client:
            response = await client.get("/")
        assert response.headers["ratelimit-policy"] == '"default";q=10;w=1;degrade-burst=2'

    async def test_excluded_paths_are_not_limited(self, clock: FakeClock) -> None:
        """Excluded path prefixes are never limited and get no headers."""
        app = make_app(RateLimiter(clock=clock), exclude=("/health",))
        async with client_for(app) as client:
            responses = [await client.get("/health") for _ in range(5)]
        assert all(r.status_code == 200 for r in responses)
        assert all("ratelimit" not in r.headers for r in responses)

    async def test_clients_are_limited_apart(self, clock: FakeClock) -> None:
        """Two peers have two buckets."""
        app = make_app(RateLimiter(clock=clock), rate="1/minute")
        async with client_for(app, "198.51.100.1") as a, client_for(app, "198.51.100.2") as b:
            assert (await a.get("/")).status_code == 200
            assert (await b.get("/")).status_code == 200
            assert (await a.get("/")).status_code == 429

    async def test_route_table(self, clock: FakeClock) -> None:
        """A matching route gets its own rate, bucket and policy name; others use the default."""
        routes = {"POST /items/{id:int}": "1/minute", "/health": "5/second"}
        app = make_app(RateLimiter(clock=clock), rate="3/minute", routes=routes)
        async with client_for(app) as client:
            posted = [await client.post("/items/1") for _ in range(2)]
            got = await client.get("/items/1")
            health = await client.get("/health")
        assert [r.status_code for r in posted] == [200, 429]
        assert posted[0].headers["ratelimit-policy"] == '"POST /items/{id:int}";q=1;w=60'
        assert got.status_code == 200
        assert got.headers["ratelimit"] == '"default";r=2;t=20'
        assert health.headers["ratelimit-policy"] == '"/health";q=5;w=1'

    async def test_key_none_is_not_limited(self, clock: FakeClock) -> None:
        """A key function returning None leaves the request unlimited."""
        app = make_app(RateLimiter(clock=clock), rate="1/minute", key=lambda scope: None)
        async with client_for(app) as client:
            responses = [await client.get("/") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]

    async def test_long_keys_are_bounded(self, clock: FakeClock) -> None:
        """A key function's long keys are hashed: stored keys stay short, limits still apply."""
        limiter = RateLimiter(clock=clock)
        app = make_app(limiter, rate="1/minute", key=lambda scope: "user-" + "x" * 1000)
        async with client_for(app) as client:
            statuses = [(await client.get("/")).status_code for _ in range(2)]
        assert statuses == [200, 429]
        assert max(len(k) for k in limiter.store._tats) < 100

    async def test_trusted_proxy_key(self, clock: FakeClock) -> None:
        """Behind a trusted proxy each forwarded client has its own bucket."""
        app = make_app(RateLimiter(clock=clock), rate="1/minute", key=client_ip(["10.0.0.0/8"]))
        async with client_for(app, "10.0.0.1") as client:
            a = await client.get("/", headers={"x-forwarded-for": "198.51.100.1"})
            b = await client.get("/", headers={"x-forwarded-for": "198.51.100.2"})
            a2 = await client.get("/", headers={"x-forwarded-for": "198.51.100.1"})
        assert [a.status_code, b.status_code, a2.status_code] == [200, 200, 429]

    async def test_non_http_scopes_pass_through(self) -> None:
        """Lifespan (and websocket) scopes go straight to the app."""
        seen: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope["type"])

        middleware = RateLimitMiddleware(app, limiter=RateLimiter(), rate="1/minute")
        await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
        await middleware({"type": "websocket", "path": "/"}, None, None)  # type: ignore[arg-type]
        assert seen == ["lifespan", "websocket"]

    async def test_memory_fallback_is_visible(self, clock: FakeClock) -> None:
        """While Redis is down the RateLimit header says degrade-fallback=memory and the per-pod quota."""
        dep = redis_dep()
        limiter = RateLimiter(closed_port_client(), dependency=dep, pods=2, clock=clock)
        async with client_for(make_app(limiter, rate="10/minute")) as client:
            with dep.forced_down():
                response = await client.get("/")
        assert response.status_code == 200
        assert response.headers["ratelimit-policy"] == '"default";q=5;w=60'
        assert response.headers["ratelimit"] == '"default";r=4;t=12;degrade-fallback=memory'

    async def test_deny_policy_answers_503(self, clock: FakeClock) -> None:
        """on_outage='deny' while Redis is down: 503 dependency_unavailable with Retry-After."""
        dep = redis_dep(retry_after=9)
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="deny", clock=clock)
        async with client_for(make_app(limiter)) as client:
            with dep.forced_down():
                response = await client.get("/")
        assert response.status_code == 503
        assert response.json()["error"] == "dependency_unavailable"
        assert response.json()["dependency"] == "redis"
        assert response.headers["retry-after"] == "9"
        assert response.headers["ratelimit"].endswith(";degrade-fallback=deny")

    async def test_allow_policy_passes_and_shows_it(self, clock: FakeClock) -> None:
        """on_outage='allow' while Redis is down: requests pass, the header says so."""
        dep = redis_dep()
        with capture_logs():
            limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="allow", clock=clock)
            async with client_for(make_app(limiter, rate="1/minute")) as client:
                with dep.forced_down():
                    responses = [await client.get("/") for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 200, 200]
        assert responses[0].headers["ratelimit"].endswith(";degrade-fallback=allow")

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"limiter": object()}, "RateLimiter"),
            ({"rate": "fast"}, "COUNT/UNIT"),
            ({"routes": {"items": "1/second"}}, "a route is"),
            ({"name": "bad\nname"}, "policy name"),
            ({"key": "ip"}, "key must be"),
        ],
    )
    def test_bad_options(self, options: dict[str, Any], message: str) -> None:
        """Bad options raise ValueError when the middleware is built."""
        kwargs: dict[str, Any] = {"limiter": RateLimiter(), "rate": "1/second", **options}
        with pytest.raises(ValueError, match=message):
            RateLimitMiddleware(ok, **kwargs)  # type: ignore[arg-type]


# -- the per-route dependency ------------------------------------------------------------


class TestRateLimitDependency:
    async def test_starlette_endpoint(self, clock: FakeClock) -> None:
        """Used by hand in a Starlette endpoint: decisions, headers, RateLimitExceeded."""
        limiter = RateLimiter(clock=clock)
        check = rate_limit(limiter, "1/minute", name="login")

        async def login(request: Request) -> PlainTextResponse:
            response = PlainTextResponse("in")
            await check(request, response)
            return response

        app = Starlette(routes=[Route("/login", login)], exception_handlers=ratelimit_exception_handlers())
        async with client_for(app) as client:
            first = await client.get("/login")
            second = await client.get("/login")
        assert first.status_code == 200
        assert first.headers["ratelimit-policy"] == '"login";q=1;w=60'
        assert second.status_code == 429
        assert second.json() == {"error": "rate_limited", "retry_after": 60}
        assert second.headers["retry-after"] == "60"
        assert second.headers["ratelimit"] == '"login";r=0;t=60'

    async def test_fastapi_depends(self, clock: FakeClock) -> None:
        """In FastAPI: Depends(rate_limit(...)) sets the headers, 429 in the shared shape."""
        fastapi = pytest.importorskip("fastapi")
        limiter = RateLimiter(clock=clock)
        app = fastapi.FastAPI(exception_handlers={**exception_handlers(), **ratelimit_exception_handlers()})

        @app.get("/search", dependencies=[fastapi.Depends(rate_limit(limiter, "2/minute", name="search"))])
        async def search() -> dict[str, str]:
            return {"ok": "yes"}

        @app.get("/decision")
        async def decision(d: Decision = fastapi.Depends(rate_limit(limiter, "5/minute", name="d"))) -> Any:  # noqa: B008
            return {"remaining": d.remaining}

        async with client_for(app) as client:
            responses = [await client.get("/search") for _ in range(3)]
            used = await client.get("/decision")
        assert [r.status_code for r in responses] == [200, 200, 429]
        assert responses[0].headers["ratelimit"] == '"search";r=1;t=30'
        assert responses[2].json() == {"error": "rate_limited", "retry_after": 30}
        assert used.json() == {"remaining": 4}

    async def test_fastapi_without_our_handler_still_429(self, clock: FakeClock) -> None:
        """Without ratelimit_exception_handlers the exception is still a 429 with Retry-After."""
        fastapi = pytest.importorskip("fastapi")
        app = fastapi.FastAPI()

        @app.get("/x", dependencies=[fastapi.Depends(rate_limit(RateLimiter(clock=clock), "1/minute"))])
        async def x() -> str:
            return "x"

        async with client_for(app) as client:
            await client.get("/x")
            response = await client.get("/x")
        assert response.status_code == 429
        assert response.headers["retry-after"] == "60"

    async def test_deny_policy_raises_dependency_unavailable(self, clock: FakeClock) -> None:
        """on_outage='deny' while Redis is down raises DependencyUnavailable (503 via exception_handlers)."""
        dep = redis_dep(retry_after=4)
        limiter = RateLimiter(closed_port_client(), dependency=dep, on_outage="deny", clock=clock)
        check = rate_limit(limiter, "1/minute")
        request = Request({"type": "http", "client": ("203.0.113.9", 1), "headers": [], "method": "GET"})
        with dep.forced_down(), pytest.raises(DependencyUnavailable) as info:
            await check(request, PlainTextResponse(""))
        assert info.value.retry_after == 4

    def test_exceeded_is_an_http_exception(self) -> None:
        """RateLimitExceeded is a 429 HTTPException carrying the decision."""
        exc = RateLimitExceeded(Decision(False, 1, 0, 60.0, 12.2, "redis"), {"RateLimit": "x"})
        assert exc.status_code == 429
        assert exc.retry_after == 13
        assert exc.headers == {"RateLimit": "x", "Retry-After": "13"}


# -- packaging ----------------------------------------------------------------------


class TestPackaging:
    def test_public_names(self) -> None:
        """The contract's names are importable from degrade.ratelimit."""
        for name in ("RateLimiter", "RateLimitMiddleware", "Decision", "client_ip"):
            assert name in degrade.ratelimit.__all__
        assert degrade.ratelimit.__all__ == _isort_order(degrade.ratelimit.__all__)
        for name in degrade.ratelimit.__all__:
            assert getattr(degrade.ratelimit, name) is not None

    def test_missing_redis_names_the_extra(self) -> None:
        """Without redis, degrade.ratelimit raises MissingExtraError naming the extra; the core imports."""
        code = (
            "import sys; sys.modules['redis'] = None\n"
            "import degrade._gcra as g\n"
            "assert g.MemoryStore().hit('k', 1, 1, 1)[0]\n"
            "try:\n"
            "    import degrade.ratelimit\n"
            "except ImportError as exc:\n"
            "    print(type(exc).__name__, exc)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        )
        assert result.stdout.startswith("MissingExtraError")
        assert "pip install 'degrade[redis]'" in result.stdout
