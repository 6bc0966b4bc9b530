"""FailSoftCache against an in-process Redis double (no services)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from typing import Any

import pytest
import sentry_sdk
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from degrade import ConfigurationError, Registry, Severity, _bounded
from degrade.cache import CacheStats, FailSoftCache, JSONSerializer
from degrade.dependency import Site

from ..support import FakeRedis, eventually


class Loader:
    """Counts calls and returns (or raises) what it is told, optionally after a pause."""

    def __init__(self, value: Any = None, *, error: Exception | None = None, delay: float = 0.0) -> None:
        self.value = value
        self.error = error
        self.delay = delay
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.value


def site_named(dep: Any, suffix: str) -> Site:
    """The cache's site on ``dep`` whose name ends with ``suffix`` (".read", ".write", ".invalidate")."""
    return next(s for s in dep.sites if s.name.endswith(suffix))


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def dep(registry: Registry) -> Any:
    async def check() -> None:
        raise RedisConnectionError("still down")

    return registry.dependency("redis", severity=Severity.SEV2, check=check, recovery_interval=5)


@pytest.fixture
def cache(fake: FakeRedis, dep: Any) -> FailSoftCache:
    return FailSoftCache(fake, dep, ttl=60, prefix="p:", timeout=0.1)


class TestReadThrough:
    async def test_miss_loads_and_stores(self, cache: FailSoftCache, fake: FakeRedis) -> None:
        """A miss runs the loader and stores its result as JSON with the ttl."""
        loader = Loader({"id": 7, "title": "Ünïcode"})
        assert await cache.get_or_load("track:7", loader) == {"id": 7, "title": "Ünïcode"}
        assert loader.calls == 1
        assert json.loads(fake.data["p:track:7"]) == {"id": 7, "title": "Ünïcode"}
        assert fake.ttls["p:track:7"] == 60_000
        stats = cache.stats()
        assert (stats.misses, stats.hits, stats.loads) == (1, 0, 1)

    async def test_hit_skips_loader(self, cache: FailSoftCache, fake: FakeRedis) -> None:
        """A hit answers from Redis without calling the loader."""
        fake.data["p:k"] = b'{"a":1}'
        loader = Loader("unused")
        assert await cache.get_or_load("k", loader) == {"a": 1}
        assert loader.calls == 0
        assert cache.stats().hits == 1

    async def test_cached_none_is_a_hit(self, cache: FailSoftCache) -> None:
        """A loader result of None is cached and served as None, not reloaded."""
        loader = Loader(None)
        assert await cache.get_or_load("n", loader) is None
        assert await cache.get_or_load("n", loader) is None
        assert loader.calls == 1

    async def test_ttl_override(self, cache: FailSoftCache, fake: FakeRedis) -> None:
        """ttl= on the call overrides the cache's ttl."""
        await cache.get_or_load("k", Loader(1), ttl=1.5)
        assert fake.ttls["p:k"] == 1500

    async def test_custom_serializer(self, fake: FakeRedis, dep: Any) -> None:
        """A pluggable serializer encodes and decodes entries."""

        class Upper:
            def dumps(self, value: Any) -> str:
                return str(value).upper()

            def loads(self, data: bytes | str) -> Any:
                return f"decoded:{data!s}"

        cache = FailSoftCache(fake, dep, 10, serializer=Upper(), prefix="")
        assert await cache.get_or_load("k", Loader("abc")) == "abc"
        assert fake.data["k"] == "ABC"
        assert await cache.get_or_load("k", Loader("unused")) == "decoded:ABC"

    async def test_unreadable_entry_is_a_miss(self, cache: FailSoftCache, fake: FakeRedis) -> None:
        """An entry the serializer cannot decode is reloaded, overwritten, counted and logged once."""
        fake.data["p:k"] = b"not json{"
        fake.data["p:j"] = b"{also bad"
        with capture_logs() as logs:
            assert await cache.get_or_load("k", Loader([1])) == [1]
            assert await cache.get_or_load("j", Loader([2])) == [2]
        assert fake.data["p:k"] == b"[1]"
        assert cache.stats().decode_errors == 2
        assert [e["event"] for e in logs] == ["cache.decode_error"]

    async def test_unencodable_value_raises(self, cache: FailSoftCache) -> None:
        """A value JSON cannot encode is a bug: TypeError reaches the caller."""
        with pytest.raises(TypeError):
            await cache.get_or_load("k", Loader({1, 2}))

    def test_json_serializer_round_trip(self) -> None:
        """JSONSerializer is compact and reversible."""
        s = JSONSerializer()
        assert s.dumps({"a": [1, None]}) == b'{"a":[1,null]}'
        assert s.loads(s.dumps({"a": [1, None]})) == {"a": [1, None]}


class TestFailSoft:
    async def test_known_down_makes_no_redis_call(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """While the dependency is down: no Redis call at all, the loader answers, nothing written."""
        dep.mark_down()
        loader = Loader("from-postgres")
        for _ in range(5):
            assert await cache.get_or_load("k", loader) == "from-postgres"
        assert fake.calls == []
        assert loader.calls == 5
        assert cache.stats().unavailable == 5

    async def test_redis_error_falls_back_without_write(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A connection error: the loader answers, no write is attempted, one failure counted."""
        fake.error = RedisConnectionError("refused")
        loader = Loader("v")
        assert await cache.get_or_load("k", loader) == "v"
        assert fake.calls == [("get", "p:k")]
        assert dep.failures == 1
        assert "p:k" not in fake.data

    async def test_slow_redis_bounded_by_timeout(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A read slower than timeout is abandoned at the bound; the loader answers."""
        fake.delay = 5.0
        start = time.perf_counter()
        assert await cache.get_or_load("k", Loader("v")) == "v"
        elapsed = time.perf_counter() - start
        assert elapsed < 1.0
        assert dep.failures == 1
        assert fake.calls == [("get", "p:k")]

    async def test_failures_open_the_dependency(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """failure_threshold failing reads open the dependency; later reads skip Redis."""
        fake.error = RedisConnectionError("refused")
        for i in range(3):
            await cache.get_or_load(f"k{i}", Loader(i))
        assert dep.is_down
        calls = len(fake.calls)
        await cache.get_or_load("k9", Loader(9))
        assert len(fake.calls) == calls

    async def test_write_failure_is_swallowed(self, cache: FailSoftCache, fake: FakeRedis, dep: Any) -> None:
        """A failing write after a good read still returns the loaded value."""
        original_set = fake.set

        async def failing_set(key: str, value: bytes | str, px: int) -> bool:
            raise RedisConnectionError("gone")

        fake.set = failing_set  # type: ignore[method-assign]
        assert await cache.get_or_load("k", Loader("v")) == "v"
        assert dep.failures == 1
        fake.set = original_set  # type: ignore[method-assign]

    async def test_non_dependency_errors_propagate(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A Redis reply error (WRONGTYPE) is a bug, not an outage: it propagates, nothing counted."""
        fake.error = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        with pytest.raises(ResponseError):
            await cache.get_or_load("k", Loader("v"))
        assert dep.failures == 0

    async def test_invalidate(self, cache: FailSoftCache, fake: FakeRedis, dep: Any) -> None:
        """invalidate deletes while Redis works and reports False (no call) while it is down."""
        fake.data["p:k"] = b"1"
        assert await cache.invalidate("k") is True
        assert "p:k" not in fake.data
        dep.mark_down()
        calls = len(fake.calls)
        assert await cache.invalidate("k") is False
        assert len(fake.calls) == calls


class TestLoaderErrors:
    async def test_loader_error_propagates_unchanged(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """The loader's exception reaches the caller as is; nothing cached, no Redis failure counted."""
        boom = LookupError("no such track")
        with pytest.raises(LookupError) as info:
            await cache.get_or_load("k", Loader(error=boom))
        assert info.value is boom
        assert "p:k" not in fake.data
        assert dep.failures == 0

    async def test_loader_timeout_is_not_a_redis_failure(self, cache: FailSoftCache, dep: Any) -> None:
        """A loader TimeoutError (Postgres slow) propagates and does not count against Redis."""
        with pytest.raises(TimeoutError):
            await cache.get_or_load("k", Loader(error=TimeoutError("pg slow")))
        assert dep.failures == 0

    async def test_loader_error_shared_by_waiters(self, cache: FailSoftCache) -> None:
        """Every caller that shared the load gets the same exception."""
        boom = ValueError("bad row")
        loader = Loader(error=boom, delay=0.05)
        results = await asyncio.gather(
            *(cache.get_or_load("k", loader) for _ in range(5)), return_exceptions=True
        )
        assert loader.calls == 1
        assert all(r is boom for r in results)


class TestSingleFlight:
    async def test_concurrent_misses_share_one_load(self, cache: FailSoftCache, fake: FakeRedis) -> None:
        """Concurrent misses for one key: one loader call, one Redis read, one write."""
        loader = Loader({"v": 1}, delay=0.05)
        results = await asyncio.gather(*(cache.get_or_load("k", loader) for _ in range(20)))
        assert results == [{"v": 1}] * 20
        assert loader.calls == 1
        assert fake.calls == [("get", "p:k"), ("set", "p:k")]
        assert cache.stats().coalesced == 19

    async def test_shared_while_redis_down(self, cache: FailSoftCache, dep: Any) -> None:
        """During an outage concurrent misses still share one loader call (no DB stampede)."""
        dep.mark_down()
        loader = Loader("v", delay=0.05)
        await asyncio.gather(*(cache.get_or_load("k", loader) for _ in range(10)))
        assert loader.calls == 1

    async def test_different_keys_load_separately(self, cache: FailSoftCache) -> None:
        """Single-flight is per key."""
        loader = Loader("v", delay=0.01)
        await asyncio.gather(cache.get_or_load("a", loader), cache.get_or_load("b", loader))
        assert loader.calls == 2

    async def test_map_is_bounded(
        self, fake: FakeRedis, dep: Any, sentry_events: list[dict[str, Any]]
    ) -> None:
        """Beyond max_inflight keys a miss loads on its own: shed, logged once, never Redis's failure."""
        cache = FailSoftCache(fake, dep, 60, max_inflight=2)
        loader = Loader("v", delay=0.05)
        with capture_logs() as logs:
            results = await asyncio.gather(*(cache.get_or_load(f"k{i}", loader) for i in range(5)))
        assert results == ["v"] * 5  # the policy: each miss beyond the bound loads on its own
        assert loader.calls == 5
        assert cache.stats().uncoalesced == 3
        read = site_named(dep, ".read")
        assert read.shed_calls == {"singleflight-full": 3}
        assert read.degraded_calls == 0
        shed = [e for e in logs if e["event"] == "degrade.shed"]
        assert [e["event"] for e in logs] == ["degrade.shed"]  # rate-limited: one line for three
        assert (shed[0]["site"], shed[0]["reason"]) == (read.name, "singleflight-full")
        assert cache._inflight == {}
        assert (dep.state, dep.failures, dep.last_error) == ("ok", 0, None)
        sentry_sdk.flush()
        assert sentry_events == []

    async def test_map_empties_after_each_load(self, cache: FailSoftCache) -> None:
        """Finished loads (success or error) leave the in-flight map."""
        await cache.get_or_load("a", Loader(1))
        with pytest.raises(KeyError):
            await cache.get_or_load("b", Loader(error=KeyError("x")))
        assert cache._inflight == {}

    async def test_cancelled_waiter_leaves_the_load_alone(self, cache: FailSoftCache) -> None:
        """A waiting caller that goes away does not cancel the load the others share."""
        loader = Loader("v", delay=0.1)
        leader = asyncio.ensure_future(cache.get_or_load("k", loader))
        await asyncio.sleep(0.01)
        waiters = [asyncio.ensure_future(cache.get_or_load("k", loader)) for _ in range(2)]
        await asyncio.sleep(0.01)
        waiters[0].cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiters[0]
        assert await leader == "v"
        assert await waiters[1] == "v"
        assert loader.calls == 1

    async def test_cancelled_loader_caller_hands_over(self, cache: FailSoftCache) -> None:
        """If the caller running the load is cancelled, its waiters load again instead of failing."""
        loader = Loader("v", delay=0.1)
        leader = asyncio.ensure_future(cache.get_or_load("k", loader))
        await asyncio.sleep(0.01)
        waiters = [asyncio.ensure_future(cache.get_or_load("k", loader)) for _ in range(3)]
        await asyncio.sleep(0.01)
        leader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leader
        assert await asyncio.gather(*waiters) == ["v", "v", "v"]
        assert loader.calls == 2  # the cancelled load, then one shared reload
        assert cache._inflight == {}


class TestSaturation:
    """Local limits shed (answer by policy, counted); they never blame Redis."""

    async def test_abandoned_cap_reads_as_a_miss(
        self,
        cache: FailSoftCache,
        fake: FakeRedis,
        dep: Any,
        monkeypatch: pytest.MonkeyPatch,
        sentry_events: list[dict[str, Any]],
    ) -> None:
        """At the abandoned-work cap no Redis call is made; the loader answers; shed, not failed."""
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 0)
        loader = Loader("from-postgres")
        assert [await cache.get_or_load(f"k{i}", loader) for i in range(3)] == ["from-postgres"] * 3
        assert fake.calls == []
        assert cache.stats().unavailable == 3
        assert site_named(dep, ".read").shed_calls == {"abandoned-cap": 3}
        assert site_named(dep, ".read").degraded_calls == 0
        assert site_named(dep, ".write").shed_calls == {}  # nothing is written after a shed read
        assert await cache.invalidate("k0") is False
        assert site_named(dep, ".invalidate").shed_calls == {"abandoned-cap": 1}
        assert (dep.state, dep.failures, dep.last_error) == ("ok", 0, None)
        sentry_sdk.flush()
        assert sentry_events == []


class TestInFlightWhenRedisGoesDown:
    async def test_reads_in_flight_answer_at_once(self, fake: FakeRedis, dep: Any) -> None:
        """Reads hanging on Redis (timeout 5 s) are answered by the loader as soon as it goes down."""
        cache = FailSoftCache(fake, dep, 60, prefix="p:", timeout=5.0)
        fake.delay = 30.0
        loader = Loader("from-postgres")
        abandoned = _bounded.Abandoned.total
        tasks = [asyncio.ensure_future(cache.get_or_load(f"k{i % 3}", loader)) for i in range(9)]
        await eventually(lambda: len(fake.calls) == 3, within=1.0, interval=0.001)
        start = time.perf_counter()
        dep.mark_down()
        assert await asyncio.gather(*tasks) == ["from-postgres"] * 9
        assert time.perf_counter() - start < 0.2
        assert loader.calls == 3  # single flight still holds: one load per key
        assert cache.stats().unavailable == 3
        assert site_named(dep, ".read").degraded_calls == 3
        assert _bounded.Abandoned.total == abandoned + 3
        assert [c[0] for c in fake.calls] == ["get"] * 3  # nothing written
        await _bounded.settle_abandoned(1.0)


class TestRunbookSites:
    def test_registers_fail_soft_sites(self, fake: FakeRedis, dep: Any) -> None:
        """The cache registers its read, write and invalidate sites as FAIL-SOFT with reasons."""
        FailSoftCache(fake, dep, 60, name="tracks")
        names = {s.name: s for s in dep.sites}
        read = names["degrade.cache.FailSoftCache[tracks].read"]
        assert read.mode == "fail_soft"
        assert "loader" in read.reason
        assert read.fallback is not None
        assert "loader answers" in read.fallback
        assert names["degrade.cache.FailSoftCache[tracks].write"].mode == "fail_soft"
        assert "ttl" in names["degrade.cache.FailSoftCache[tracks].invalidate"].reason

    async def test_degraded_reads_are_counted_on_the_site(self, cache: FailSoftCache, dep: Any) -> None:
        """Each read answered without Redis bumps the site's degraded_calls."""
        dep.mark_down()
        await cache.get_or_load("k", Loader(1))
        read = next(s for s in dep.sites if s.name.endswith(".read"))
        assert read.degraded_calls == 1


class TestConfiguration:
    @pytest.mark.parametrize("ttl", [0, -1, True, "60", math.inf, -math.inf, math.nan])
    def test_bad_ttl(self, fake: FakeRedis, dep: Any, ttl: Any) -> None:
        """ttl must be a finite positive number: never a bool, infinity or NaN."""
        with pytest.raises(ConfigurationError, match="ttl must be a finite number of seconds > 0"):
            FailSoftCache(fake, dep, ttl)

    def test_bad_dependency(self, fake: FakeRedis) -> None:
        """The dependency must be a Dependency or its name."""
        with pytest.raises(ConfigurationError, match="Dependency"):
            FailSoftCache(fake, 42, 60)  # type: ignore[arg-type]

    @pytest.mark.parametrize("max_inflight", [0, True, 1.5, math.inf])
    def test_bad_max_inflight(self, fake: FakeRedis, dep: Any, max_inflight: Any) -> None:
        """max_inflight must be an int >= 1 (not a bool, a float or infinity)."""
        with pytest.raises(ConfigurationError, match="max_inflight must be an int >= 1"):
            FailSoftCache(fake, dep, 60, max_inflight=max_inflight)

    def test_bad_serializer(self, fake: FakeRedis, dep: Any) -> None:
        """A serializer needs dumps and loads."""
        with pytest.raises(ConfigurationError, match="serializer"):
            FailSoftCache(fake, dep, 60, serializer=object())  # type: ignore[arg-type]

    @pytest.mark.parametrize("ttl", [0, -1, True, math.inf, math.nan])
    async def test_bad_call_ttl(self, cache: FailSoftCache, ttl: Any) -> None:
        """A per-call ttl must be finite and positive too."""
        loader = Loader(1)
        with pytest.raises(ConfigurationError, match="ttl must be a finite number of seconds > 0"):
            await cache.get_or_load("k", loader, ttl=ttl)
        assert loader.calls == 0


class TestStats:
    async def test_stats_is_a_frozen_snapshot(self, cache: FailSoftCache) -> None:
        """cache.stats() is a CacheStats made on each call: later reads do not change it."""
        await cache.get_or_load("k", Loader(1))
        before = cache.stats()
        await cache.get_or_load("k", Loader(1))
        after = cache.stats()
        assert isinstance(before, CacheStats)
        assert before == CacheStats(misses=1, loads=1)
        assert after == CacheStats(hits=1, misses=1, loads=1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.hits = 5  # type: ignore[misc]

    async def test_attribute_access_is_deprecated_but_live(self, cache: FailSoftCache) -> None:
        """cache.stats.hits still reads the live counter, with a DeprecationWarning naming stats()."""
        counters = cache.stats
        with pytest.warns(DeprecationWarning, match=r"use FailSoftCache\.stats\(\)\.hits") as warned:
            assert counters.hits == 0
        assert warned[0].filename == __file__  # points at the caller, not at degrade
        await cache.get_or_load("k", Loader(1))
        await cache.get_or_load("k", Loader(1))
        with pytest.warns(DeprecationWarning, match=r"deprecated; use FailSoftCache\.stats\(\)") as warned:
            assert (counters.hits, counters.misses) == (1, 1)
        assert [str(w.message).split(" is ")[0] for w in warned] == [
            "FailSoftCache.stats.hits",
            "FailSoftCache.stats.misses",
        ]

    def test_attribute_write_is_deprecated_and_resets_the_counter(self, cache: FailSoftCache) -> None:
        """Resetting a counter the old way still works (with a warning) and shows in the next snapshot."""
        with pytest.warns(DeprecationWarning, match=r"stats\(\)\.loads"):
            cache.stats.loads = 7
        assert cache.stats().loads == 7

    def test_unknown_attribute(self, cache: FailSoftCache) -> None:
        """Only the counters are reachable the old way; anything else is an AttributeError, no warning."""
        with pytest.raises(AttributeError, match="nope"):
            cache.stats.nope  # noqa: B018
        with pytest.raises(AttributeError, match="nope"):
            cache.stats.nope = 1

    def test_repr_shows_the_snapshot(self, cache: FailSoftCache) -> None:
        """repr(cache.stats) shows the counters without a warning."""
        assert repr(cache.stats) == repr(CacheStats())
