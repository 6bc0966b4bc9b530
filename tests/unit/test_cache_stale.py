"""FailSoftCache's stale-if-error tier (``stale=StaleTier(...)``) against an in-process Redis double."""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from degrade import ConfigurationError, Registry, Severity
from degrade._stale import ENTRY_BYTES
from degrade.cache import CacheEntry, CacheStats, FailSoftCache, JSONSerializer, StaleTier
from degrade.testing import FakeClock

from ..support import FakeRedis


class Loader:
    """Counts calls and returns what it is told."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        return self.value


def charge(key: str, data: bytes) -> int:
    """What the tier charges for one entry: the serialized length, the key's and the bookkeeping."""
    return len(data) + len(key) + ENTRY_BYTES


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def dep(registry: Registry) -> Any:
    async def check() -> None:
        raise RedisConnectionError("still down")

    return registry.dependency("redis", severity=Severity.SEV2, check=check, recovery_interval=5)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(fake: FakeRedis, dep: Any, clock: FakeClock) -> FailSoftCache:
    tier = StaleTier(max_bytes=2**20, stale_for=300, clock=clock)
    return FailSoftCache(fake, dep, ttl=60, prefix="p:", timeout=0.1, stale=tier)


class TestServedWhileRedisIsDown:
    async def test_hit_is_served_stale_and_marked(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """A value read from Redis is answered from memory while Redis is down, marked stale with its age."""
        fake.data["p:track:7"] = b'{"id":7}'
        assert await cache.get_entry("track:7", Loader("unused")) == CacheEntry({"id": 7}, "hit")
        clock.advance(42)
        loader = Loader("from-postgres")
        with dep.forced_down():
            entry = await cache.get_entry("track:7", loader)
        assert (entry.value, entry.source, entry.stale, entry.age) == ({"id": 7}, "stale", True, 42.0)
        assert loader.calls == 0
        stats = cache.stats()
        assert (stats.hits, stats.unavailable, stats.stale, stats.loads) == (1, 1, 1, 0)

    async def test_written_value_is_served_stale(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A value loaded and written to Redis is remembered too."""
        await cache.get_or_load("k", Loader([1, 2]))
        assert fake.data["p:k"] == b"[1,2]"
        with dep.forced_down():
            entry = await cache.get_entry("k", Loader("from-postgres"))
        assert (entry.value, entry.source) == ([1, 2], "stale")

    async def test_get_or_load_still_returns_the_bare_value(self, cache: FailSoftCache, dep: Any) -> None:
        """get_or_load's result is the value itself, stale or not: existing callers see no change."""
        await cache.get_or_load("k", Loader({"a": 1}))
        with dep.forced_down():
            assert await cache.get_or_load("k", Loader("from-postgres")) == {"a": 1}
        assert cache.stats().stale == 1

    async def test_unseen_key_falls_back_to_the_loader(self, cache: FailSoftCache, dep: Any) -> None:
        """A key this process never saw in Redis is loaded, as without the tier, and not remembered."""
        loader = Loader("from-postgres")
        with dep.forced_down():
            entry = await cache.get_entry("never-seen", loader)
            assert await cache.get_entry("never-seen", loader) == CacheEntry("from-postgres", "unavailable")
        assert (entry.value, entry.source, entry.stale, entry.age) == (
            "from-postgres",
            "unavailable",
            False,
            None,
        )
        assert loader.calls == 2
        stats = cache.stats()
        assert (stats.unavailable, stats.stale, stats.loads, stats.stale_entries) == (2, 0, 2, 0)

    async def test_failing_read_is_served_stale(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A read that fails before the dependency opens is answered stale, and counted as a failure."""
        await cache.get_or_load("k", Loader("v1"))
        fake.error = RedisConnectionError("reset")
        entry = await cache.get_entry("k", Loader("from-postgres"))
        assert (entry.value, entry.source) == ("v1", "stale")
        assert dep.failures == 1
        assert not dep.is_down

    async def test_stale_answers_are_fresh_objects(self, cache: FailSoftCache, dep: Any) -> None:
        """Each stale answer is decoded anew: a caller mutating its copy does not change the next one."""
        await cache.get_or_load("k", Loader({"tags": ["a"]}))
        with dep.forced_down():
            first = await cache.get_or_load("k", Loader(None))
            first["tags"].append("mutated")
            assert await cache.get_or_load("k", Loader(None)) == {"tags": ["a"]}

    async def test_concurrent_callers_all_get_the_stale_mark(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """Callers sharing one read (single flight) during a slow failure all get the stale answer."""
        await cache.get_or_load("k", Loader("v1"))
        fake.delay = 5.0  # slower than the cache's timeout (0.1 s): a failed read
        entries = await asyncio.gather(*(cache.get_entry("k", Loader("from-postgres")) for _ in range(5)))
        assert {(e.value, e.source) for e in entries} == {("v1", "stale")}
        assert cache.stats().coalesced == 4
        assert cache.stats().stale == 1  # one read, shared

    async def test_no_tier_no_stale_answers(self, fake: FakeRedis, dep: Any) -> None:
        """Without stale= nothing is remembered: an outage reads through to the loader; stats stay zero."""
        cache = FailSoftCache(fake, dep, ttl=60, prefix="p:")
        await cache.get_or_load("k", Loader("v1"))
        assert await cache.get_entry("k", Loader("unused")) == CacheEntry("v1", "hit")
        with dep.forced_down():
            assert await cache.get_entry("k", Loader("from-postgres")) == CacheEntry(
                "from-postgres", "unavailable"
            )
        stats = cache.stats()
        assert (stats.stale, stats.stale_entries, stats.stale_bytes) == (0, 0, 0)
        assert stats == CacheStats(hits=1, misses=1, unavailable=1, loads=2)


class TestStaleFor:
    async def test_expires_stale_for_after_it_was_stored(
        self, cache: FailSoftCache, dep: Any, clock: FakeClock
    ) -> None:
        """A copy is served up to stale_for seconds after it was stored, then dropped and counted."""
        await cache.get_or_load("k", Loader("v1"))
        loader = Loader("from-postgres")
        with dep.forced_down():
            clock.advance(300)
            assert (await cache.get_entry("k", loader)).source == "stale"  # exactly stale_for: still served
            clock.advance(0.001)
            assert await cache.get_entry("k", loader) == CacheEntry("from-postgres", "unavailable")
            assert await cache.get_entry("k", loader) == CacheEntry("from-postgres", "unavailable")
        assert loader.calls == 2
        stats = cache.stats()
        assert (stats.stale, stats.stale_expired, stats.stale_entries, stats.stale_bytes) == (1, 1, 0, 0)

    async def test_a_hit_restarts_the_window(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """Seeing the value in Redis again restarts its window: the age counts from the last hit."""
        await cache.get_or_load("k", Loader("v1"))
        clock.advance(200)
        assert (await cache.get_entry("k", Loader("unused"))).source == "hit"
        clock.advance(250)  # 450 s after the write, 250 s after the hit
        with dep.forced_down():
            entry = await cache.get_entry("k", Loader("from-postgres"))
        assert (entry.source, entry.age) == ("stale", 250.0)

    async def test_a_stale_answer_does_not_restart_the_window(
        self, cache: FailSoftCache, dep: Any, clock: FakeClock
    ) -> None:
        """Serving a copy stale does not make it younger: the window runs from Redis, not from use."""
        await cache.get_or_load("k", Loader("v1"))
        with dep.forced_down():
            clock.advance(200)
            assert (await cache.get_entry("k", Loader(None))).age == 200.0
            clock.advance(101)
            assert (await cache.get_entry("k", Loader("from-postgres"))).source == "unavailable"


class TestBound:
    async def test_bytes_never_exceed_max_bytes(self, fake: FakeRedis, dep: Any) -> None:
        """Many keys through a small tier: its charged bytes stay within max_bytes; evictions are counted."""
        one = charge("k000", b'"value-000"')
        cache = FailSoftCache(fake, dep, 60, prefix="p:", stale=StaleTier(max_bytes=10 * one, stale_for=60))
        for i in range(100):
            await cache.get_or_load(f"k{i:03}", Loader(f"value-{i:03}"))
            assert cache.stats().stale_bytes <= 10 * one
        stats = cache.stats()
        assert (stats.stale_entries, stats.stale_bytes, stats.stale_evicted) == (10, 10 * one, 90)
        with dep.forced_down():
            sources = [(await cache.get_entry(f"k{i:03}", Loader(None))).source for i in range(100)]
        assert sources == ["unavailable"] * 90 + ["stale"] * 10  # the 10 most recent survived

    async def test_least_recently_used_is_evicted_first(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """A hit, or a stale answer, makes an entry the most recent; the least recent goes first."""
        one = charge("a", b'"a"')
        tier = StaleTier(max_bytes=3 * one, stale_for=60, clock=clock)
        cache = FailSoftCache(fake, dep, 60, prefix="p:", stale=tier)
        for key in "abc":
            await cache.get_or_load(key, Loader(key))
        await cache.get_or_load("a", Loader("unused"))  # a hit: order b, c, a
        fake.error = RedisConnectionError("reset")
        assert (await cache.get_entry("b", Loader(None))).source == "stale"  # order c, a, b
        fake.error = None
        await cache.get_or_load("d", Loader("d"))  # evicts c
        await cache.get_or_load("e", Loader("e"))  # evicts a
        with dep.forced_down():
            found = {k: (await cache.get_entry(k, Loader(None))).source for k in "abcde"}
        assert found == {"a": "unavailable", "b": "stale", "c": "unavailable", "d": "stale", "e": "stale"}
        assert cache.stats().stale_evicted == 2

    async def test_charge_is_serialized_size_key_and_bookkeeping(self, cache: FailSoftCache) -> None:
        """An entry costs the lengths of its serialized value and key, plus ENTRY_BYTES."""
        await cache.get_or_load("track:1", Loader({"id": 1, "title": "x" * 1000}))
        data = JSONSerializer().dumps({"id": 1, "title": "x" * 1000})
        assert cache.stats().stale_bytes == charge("track:1", data)
        await cache.get_or_load("track:1", Loader("unused"))  # a hit replaces the entry: same charge
        assert (cache.stats().stale_entries, cache.stats().stale_bytes) == (1, charge("track:1", data))

    async def test_value_larger_than_the_budget_is_not_kept(self, fake: FakeRedis, dep: Any) -> None:
        """A value that alone exceeds max_bytes is not remembered (counted as evicted); others stay."""
        cache = FailSoftCache(fake, dep, 60, prefix="p:", stale=StaleTier(max_bytes=2000, stale_for=60))
        await cache.get_or_load("small", Loader("s"))
        await cache.get_or_load("big", Loader("x" * 5000))
        stats = cache.stats()
        assert (stats.stale_entries, stats.stale_evicted) == (1, 1)
        with dep.forced_down():
            assert (await cache.get_entry("small", Loader(None))).source == "stale"
            assert (await cache.get_entry("big", Loader("from-postgres"))).source == "unavailable"

    async def test_too_large_new_value_drops_the_older_copy(self, fake: FakeRedis, dep: Any) -> None:
        """A key's new value too large to keep supersedes its older copy; other entries are untouched."""
        cache = FailSoftCache(fake, dep, 60, prefix="p:", stale=StaleTier(max_bytes=2000, stale_for=60))
        await cache.get_or_load("other", Loader("o"))
        await cache.get_or_load("k", Loader("small"))
        del fake.data["p:k"]
        await cache.get_or_load("k", Loader("x" * 5000))
        stats = cache.stats()
        assert (stats.stale_entries, stats.stale_evicted) == (1, 1)
        assert stats.stale_bytes == charge("other", b'"o"')
        with dep.forced_down():
            assert (await cache.get_entry("k", Loader("from-postgres"))).source == "unavailable"
            assert (await cache.get_entry("other", Loader(None))).source == "stale"

    async def test_str_values_are_charged_their_size_in_memory(self, fake: FakeRedis, dep: Any) -> None:
        """A str value (a decode_responses client) is charged sys.getsizeof: non-ASCII text costs more."""

        class Text:
            def dumps(self, value: Any) -> str:
                return json.dumps(value, ensure_ascii=False)

            def loads(self, data: bytes | str) -> Any:
                return json.loads(data)

        tier = StaleTier(max_bytes=2**20, stale_for=60)
        cache = FailSoftCache(fake, dep, 60, serializer=Text(), stale=tier)
        await cache.get_or_load("k", Loader("\N{MUSICAL NOTE}" * 100))
        data = fake.data["degrade:cache:k"]
        assert isinstance(data, str)
        assert cache.stats().stale_bytes == sys.getsizeof(data) + len("k") + ENTRY_BYTES
        assert sys.getsizeof(data) > 4 * len(data)  # 4 bytes a character in memory, not 1


class TestFreshness:
    async def test_invalidate_drops_the_local_copy(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """invalidate() removes the copy as well as the Redis entry: an outage then reads the loader."""
        await cache.get_or_load("k", Loader("v1"))
        assert await cache.invalidate("k") is True
        with dep.forced_down():
            assert await cache.get_entry("k", Loader("v2")) == CacheEntry("v2", "unavailable")
        assert (cache.stats().stale_invalidated, cache.stats().stale_entries) == (1, 0)

    async def test_invalidate_while_down_still_drops_the_copy(self, cache: FailSoftCache, dep: Any) -> None:
        """An invalidate that cannot reach Redis (False) still stops this process serving the old value."""
        await cache.get_or_load("k", Loader("v1"))
        with dep.forced_down():
            assert await cache.invalidate("k") is False
            assert await cache.get_entry("k", Loader("v2")) == CacheEntry("v2", "unavailable")
        assert cache.stats().stale_invalidated == 1

    async def test_fresh_write_replaces_the_copy(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """A newer value loaded and written replaces the older copy."""
        await cache.get_or_load("k", Loader("v1"))
        del fake.data["p:k"]  # expired (or deleted by another process)
        assert await cache.get_entry("k", Loader("v2")) == CacheEntry("v2", "miss")
        with dep.forced_down():
            assert (await cache.get_entry("k", Loader(None))).value == "v2"
        assert cache.stats().stale_entries == 1

    async def test_newer_value_redis_did_not_take_drops_the_copy(
        self, cache: FailSoftCache, fake: FakeRedis, dep: Any
    ) -> None:
        """When the write of a newer value fails, the older copy is dropped rather than served later."""
        await cache.get_or_load("k", Loader("v1"))
        del fake.data["p:k"]

        async def failing_set(key: str, value: bytes | str, px: int) -> bool:
            raise RedisConnectionError("gone")

        fake.set = failing_set  # type: ignore[method-assign]
        assert await cache.get_entry("k", Loader("v2")) == CacheEntry("v2", "miss")
        with dep.forced_down():
            assert await cache.get_entry("k", Loader("v3")) == CacheEntry("v3", "unavailable")
        assert (cache.stats().stale_invalidated, cache.stats().stale_entries) == (1, 0)

    async def test_unreadable_copy_falls_back_to_the_loader(self, fake: FakeRedis, dep: Any) -> None:
        """A copy the serializer cannot read back is dropped as a decode error; the loader answers."""

        class Flaky(JSONSerializer):
            broken = False

            def loads(self, data: bytes | str) -> Any:
                if self.broken:
                    raise ValueError("cannot read")
                return super().loads(data)

        serializer = Flaky()
        cache = FailSoftCache(
            fake, dep, 60, serializer=serializer, stale=StaleTier(max_bytes=2**20, stale_for=60)
        )
        await cache.get_or_load("k", Loader("v1"))
        serializer.broken = True
        with capture_logs() as logs, dep.forced_down():
            assert await cache.get_entry("k", Loader("v2")) == CacheEntry("v2", "unavailable")
        stats = cache.stats()
        assert (stats.decode_errors, stats.stale, stats.stale_entries) == (1, 0, 0)
        assert [e["event"] for e in logs if e["event"].startswith("cache.")] == ["cache.decode_error"]


class TestMarking:
    async def test_sources(self, cache: FailSoftCache, dep: Any, clock: FakeClock) -> None:
        """get_entry names where each answer came from; only a stale one has an age."""
        miss = await cache.get_entry("k", Loader("v"))
        hit = await cache.get_entry("k", Loader("unused"))
        clock.advance(3)
        with dep.forced_down():
            stale = await cache.get_entry("k", Loader("unused"))
            unavailable = await cache.get_entry("other", Loader("v"))
        assert [(e.source, e.stale, e.age) for e in (miss, hit, stale, unavailable)] == [
            ("miss", False, None),
            ("hit", False, None),
            ("stale", True, 3.0),
            ("unavailable", False, None),
        ]

    def test_entry_is_frozen(self) -> None:
        """A CacheEntry cannot be changed after the fact."""
        entry = CacheEntry(1, "hit")
        with pytest.raises(AttributeError):
            entry.value = 2  # type: ignore[misc]


class TestRunbook:
    def test_read_site_states_the_window(self, fake: FakeRedis, dep: Any) -> None:
        """With a tier, the read site's reason (shown in the runbook) names the stale window."""
        FailSoftCache(fake, dep, 60, name="plain")
        FailSoftCache(fake, dep, 60, name="tiered", stale=StaleTier(max_bytes=1024, stale_for=120))
        reasons = {s.name.rsplit("[", 1)[-1]: s.reason for s in dep.sites if s.name.endswith(".read")}
        assert "stale" not in reasons["plain].read"]
        assert "last 120s: served stale" in reasons["tiered].read"]


class TestConfiguration:
    @pytest.mark.parametrize("max_bytes", [0, -1, True, 1.5, "64MB", math.inf])
    def test_bad_max_bytes(self, max_bytes: Any) -> None:
        """max_bytes must be an int >= 1."""
        with pytest.raises(ConfigurationError, match="max_bytes must be an int >= 1"):
            StaleTier(max_bytes=max_bytes, stale_for=60)

    @pytest.mark.parametrize("stale_for", [0, -1, True, "300", math.inf, math.nan])
    def test_bad_stale_for(self, stale_for: Any) -> None:
        """stale_for must be a finite number of seconds > 0."""
        with pytest.raises(ConfigurationError, match="stale_for must be a finite number of seconds > 0"):
            StaleTier(max_bytes=1024, stale_for=stale_for)

    def test_bad_clock(self) -> None:
        """clock must be callable."""
        with pytest.raises(ConfigurationError, match="clock must be a callable"):
            StaleTier(max_bytes=1024, stale_for=60, clock=1.0)  # type: ignore[arg-type]

    def test_both_bounds_are_required(self) -> None:
        """There is no default window or budget: each cache states its own."""
        with pytest.raises(TypeError):
            StaleTier(max_bytes=1024)  # type: ignore[call-arg]
        with pytest.raises(TypeError):
            StaleTier(1024, 60)  # type: ignore[call-arg]

    def test_stale_must_be_a_stale_tier(self, fake: FakeRedis, dep: Any) -> None:
        """stale= takes a StaleTier (or None); the error says how to build one."""
        with pytest.raises(ConfigurationError, match=r"stale must be a StaleTier\(max_bytes="):
            FailSoftCache(fake, dep, 60, stale={"max_bytes": 1024})  # type: ignore[arg-type]

    def test_stale_for_is_normalised(self) -> None:
        """stale_for is kept as float seconds."""
        assert StaleTier(max_bytes=1024, stale_for=300).stale_for == 300.0
