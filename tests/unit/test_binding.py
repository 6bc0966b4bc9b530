"""Late binding: sites declared by dependency name, bound to the app's Registry at first call.

Each test uses its own dependency names (a uuid): declarations are process-wide,
as decorators at module level are.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from degrade import (
    ConfigurationError,
    DependencyUnavailable,
    Registry,
    Severity,
    fail_loud,
    fail_soft,
    site_of,
)
from degrade.cache import FailSoftCache
from degrade.revocation import RevocationList
from degrade.runbook import render_runbook

from ..support import FakeRedis


def unique(prefix: str = "dep") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def declare_pair(name: str) -> tuple[Any, Any]:
    """An async fail-soft and a sync fail-loud site, both on ``name``; they fail while ``broken``."""
    broken = {"now": False}

    @fail_soft(name, fallback="fallback", reason="shows a stale page")
    async def read(key: str) -> str:
        if broken["now"]:
            raise ConnectionRefusedError
        return f"value of {key}"

    @fail_loud(name, reason="login answers 503")
    def write(key: str) -> str:
        if broken["now"]:
            raise ConnectionRefusedError
        return f"wrote {key}"

    read.broken = write.broken = broken  # type: ignore[attr-defined]
    return read, write


class TestDeclaration:
    def test_decorating_needs_no_registry(self) -> None:
        """A site can be declared by name before any registry declares the dependency."""
        read, write = declare_pair(unique())
        assert callable(read)
        assert callable(write)

    def test_site_is_attached_when_the_dependency_is_declared_later(self) -> None:
        """registry.dependency(name) picks up the sites already declared by that name."""
        name = unique()
        declare_pair(name)
        dep = Registry().dependency(name, severity=Severity.SEV1)
        assert sorted((s.mode, s.name.rsplit(".", 1)[-1]) for s in dep.sites) == [
            ("fail_loud", "write"),
            ("fail_soft", "read"),
        ]

    def test_site_is_attached_to_a_registry_that_exists_first(self) -> None:
        """A decorator applied after registry.dependency(name) attaches its site at once."""
        name = unique()
        dep = Registry().dependency(name, severity=Severity.SEV1)
        declare_pair(name)
        assert {s.mode for s in dep.sites} == {"fail_soft", "fail_loud"}

    def test_runbook_lists_sites_declared_by_name(self) -> None:
        """The generated runbook shows by-name sites with their reason and fallback."""
        name = unique()
        registry = Registry()
        registry.dependency(name, severity=Severity.SEV2)
        declare_pair(name)
        text = render_runbook(registry)
        assert "| FAIL-SOFT | `'fallback'` | shows a stale page |" in text
        assert "| FAIL-LOUD | — | login answers 503 |" in text

    def test_redeclaring_a_site_does_not_grow_the_declarations(self) -> None:
        """Declaring the same function again (an app factory run twice) keeps one site per registry."""
        name = unique()
        dep = Registry().dependency(name, severity=Severity.SEV1)
        declare_pair(name)
        declare_pair(name)
        assert len(dep.sites) == 2

    @pytest.mark.parametrize("bad", ["", "  "])
    def test_empty_name_is_refused(self, bad: str) -> None:
        """An empty dependency name is a ConfigurationError at declaration."""
        with pytest.raises(ConfigurationError, match="name is empty"):
            fail_soft(bad, fallback=None, reason="x")

    def test_sync_site_with_timeout_is_refused_at_declaration(self) -> None:
        """The sync-site checks run when declared by name, not at the first call."""
        with pytest.raises(ConfigurationError, match="timeout= needs an async function"):

            @fail_loud(unique(), timeout=1.0, reason="x")
            def load() -> None: ...

        async def later() -> int:
            return 1

        with pytest.raises(ConfigurationError, match="must be a value or a sync callable"):

            @fail_soft(unique(), fallback=later, reason="x")
            def read() -> int:
                return 0


class TestResolution:
    async def test_bind_resolves_the_registry(self) -> None:
        """Inside registry.bind() a by-name site consults and feeds that registry's dependency."""
        name = unique()
        registry = Registry()
        dep = registry.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        read, write = declare_pair(name)
        with registry.bind():
            assert await read("a") == "value of a"
            read.broken["now"] = True
            assert await read("a") == "fallback"
            assert dep.is_down
            with pytest.raises(DependencyUnavailable) as caught:
                write("b")
        assert caught.value.dependency_name == name
        assert site_of(read, registry).degraded_calls == 1
        assert site_of(write, registry).degraded_calls == 1

    async def test_binds_once_per_registry(self) -> None:
        """The bound wrapper is built at the first call and reused (one per registry)."""
        name = unique()
        registry = Registry()
        registry.dependency(name, severity=Severity.SEV1)
        read, _ = declare_pair(name)
        with registry.bind():
            await read("a")
            first = dict(registry._late)
            await read("b")
        assert len(first) == 1
        assert registry._late == first

    async def test_two_registries_do_not_share_state(self) -> None:
        """The same module-level site, called for two apps, feeds each app's own dependency."""
        name = unique()
        a, b = Registry(), Registry()
        dep_a = a.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        dep_b = b.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        read, _ = declare_pair(name)
        read.broken["now"] = True
        with a.bind():
            assert await read("x") == "fallback"
        read.broken["now"] = False
        with b.bind():
            assert await read("x") == "value of x"
        assert dep_a.is_down
        assert not dep_b.is_down
        assert (site_of(read, a).degraded_calls, site_of(read, b).degraded_calls) == (1, 0)
        assert site_of(read, a) is not site_of(read, b)

    async def test_tasks_inherit_the_binding(self) -> None:
        """A task created inside registry.bind() resolves the same registry."""
        name = unique()
        registry = Registry()
        registry.dependency(name, severity=Severity.SEV1)
        Registry().dependency(name, severity=Severity.SEV1)  # a second app: ambiguous outside
        read, _ = declare_pair(name)
        with registry.bind():
            task = asyncio.create_task(read("t"))
        assert await task == "value of t"
        with pytest.raises(ConfigurationError):
            await read("t")

    async def test_the_only_registry_needs_no_binding(self) -> None:
        """With one registry declaring the name, a call outside any app resolves to it."""
        name = unique()
        registry = Registry()
        dep = registry.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        read, _ = declare_pair(name)
        read.broken["now"] = True
        assert await read("x") == "fallback"
        assert dep.is_down

    async def test_the_started_registry_wins_outside_a_request(self) -> None:
        """Of two registries declaring the name, the one whose lifespan runs is used."""
        name = unique()
        idle, running = Registry(), Registry()
        idle.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        dep = running.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        read, _ = declare_pair(name)
        read.broken["now"] = True
        ready = asyncio.Event()
        done = asyncio.Event()

        async def serve() -> None:  # a server runs the lifespan in its own task
            async with running.lifespan():
                ready.set()
                await done.wait()

        task = asyncio.create_task(serve())
        await ready.wait()
        try:
            assert await read("x") == "fallback"
            assert dep.is_down
            assert not idle[name].is_down
        finally:
            done.set()
            await task
        with pytest.raises(ConfigurationError, match="2 registries declare"):
            await read("x")  # stopped: ambiguous again

    async def test_ambiguous_call_names_the_dependency_and_the_fix(self) -> None:
        """Two registries and no binding: a ConfigurationError says which dependency and what to do."""
        name = unique()
        Registry().dependency(name, severity=Severity.SEV1)
        Registry().dependency(name, severity=Severity.SEV1)
        read, _ = declare_pair(name)
        with pytest.raises(ConfigurationError) as caught:
            await read("x")
        message = str(caught.value)
        assert repr(name) in message
        assert "registry.bind()" in message
        assert "registry.lifespan" in message

    async def test_no_registry_declares_the_name(self) -> None:
        """No registry with the name: the error says how to declare it."""
        name = unique()
        read, _ = declare_pair(name)
        with pytest.raises(ConfigurationError, match=rf"registry\.dependency\('{name}', \.\.\.\)"):
            await read("x")

    def test_bound_registry_without_the_name_does_not_fall_through(self) -> None:
        """The request's registry lacks the name: an error, never another app's dependency."""
        name = unique()
        Registry().dependency(name, severity=Severity.SEV1)  # another app has it
        _, write = declare_pair(name)
        with Registry().bind(), pytest.raises(ConfigurationError, match="the app's Registry has none"):
            write("x")


class TestHatch:
    def test_hatch_by_name_is_bound_with_the_site(self) -> None:
        """hatch= may name an escape hatch; the app's hatch answers while open."""
        name = unique()
        registry = Registry()
        dep = registry.dependency(name, severity=Severity.SEV2)
        hatch = registry.escape_hatch(f"{name}-hatch", dependency=dep, reason="unscanned", fallback="open")

        @fail_loud(name, hatch=f"{name}-hatch", reason="uploads fail")
        def scan() -> str:
            return "clean"

        assert [s.hatch for s in dep.sites] == [f"{name}-hatch"]
        dep.mark_down()
        with registry.bind():
            with pytest.raises(DependencyUnavailable):
                scan()
            hatch.open(by="test")
            assert scan() == "open"
            hatch.close()

    def test_missing_hatch_is_a_configuration_error(self) -> None:
        """A hatch name the app's registry lacks fails at the first call, naming it."""
        name = unique()
        registry = Registry()
        registry.dependency(name, severity=Severity.SEV2)

        @fail_loud(name, hatch="nope", reason="uploads fail")
        def scan() -> str:
            return "clean"

        with registry.bind(), pytest.raises(ConfigurationError, match="no escape hatch named 'nope'"):
            scan()


class TestRevocationListByName:
    async def test_lookups_bind_to_the_app_registry(self) -> None:
        """RevocationList(client, "redis") consults the request's registry; its sites are in the runbook."""
        name = unique()
        registry = Registry()
        dep = registry.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        fake = FakeRedis()
        revocations = RevocationList(fake, name, on_outage="deny", prefix="r:", timeout=0.5)
        assert {s.name for s in dep.sites} == {
            "degrade.revocation.RevocationList[revocations].revoke",
            "degrade.revocation.RevocationList[revocations].is_revoked",
        }
        with registry.bind():
            assert revocations.dependency is dep
            assert await revocations.is_revoked("jti-1") is False
            fake.error = ConnectionRefusedError()
            assert await revocations.is_revoked("jti-2") is True  # deny: treated as revoked
            with pytest.raises(DependencyUnavailable):
                await revocations.revoke("jti-3")
        assert dep.is_down
        assert "dependency='" + name + "'" in repr(revocations)

    def test_blank_name_is_refused(self) -> None:
        """A blank dependency name is a ConfigurationError naming the argument."""
        with pytest.raises(ConfigurationError, match="dependency must be a Dependency"):
            RevocationList(FakeRedis(), " ", on_outage="deny")


class TestCacheByName:
    async def test_cache_binds_to_the_app_registry(self) -> None:
        """FailSoftCache(client, "redis") reads through the app's dependency; a shed read counts there."""
        name = unique()
        registry = Registry()
        dep = registry.dependency(name, severity=Severity.SEV1, failure_threshold=1)
        fake = FakeRedis()
        cache = FailSoftCache(fake, name, ttl=60, prefix="c:", timeout=0.5)
        assert f"dependency={name!r}" in repr(cache)
        with registry.bind():

            async def load() -> dict[str, int]:
                return {"n": 1}

            assert await cache.get_or_load("k", load) == {"n": 1}
            fake.error = ConnectionRefusedError()
            assert await cache.get_or_load("j", load) == {"n": 1}  # a miss answered by the loader
            cache._read_site.shed("test")
        assert dep.is_down
        read = next(s for s in dep.sites if s.name.endswith("FailSoftCache[cache].read"))
        assert read.shed_calls == {"test": 1}
