"""Registry shutdown: components before the clients they use (owns()), and wrap()'s order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from structlog.testing import capture_logs

from degrade import ConfigurationError, Registry, Severity
from tests.unit.test_registry import probe_tasks, refused, serving


class Client:
    """A client closed with ``aclose()`` (redis.asyncio, httpx)."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name, self.events = name, events

    async def aclose(self) -> None:
        self.events.append(f"{self.name} closed")


class Engine:
    """An engine closed with ``dispose()`` (SQLAlchemy's AsyncEngine)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    async def dispose(self) -> None:
        self.events.append("engine disposed")


class SyncEngine:
    """SQLAlchemy's sync Engine: dispose() is not a coroutine."""

    def dispose(self) -> None: ...


class Hangs:
    async def aclose(self) -> None:
        await asyncio.Event().wait()


class Breaks:
    async def aclose(self) -> None:
        raise OSError("redis://user:s3cret@cache refused")


class UsesClient:
    """A component (a limiter, a publisher) that needs its client open to stop cleanly."""

    def __init__(self, client: Client, events: list[str]) -> None:
        self.client, self.events = client, events

    async def start(self) -> None:
        self.events.append("component start")

    async def aclose(self) -> None:
        closed = f"{self.client.name} closed" in self.events
        self.events.append("component stop on a closed client" if closed else "component stop")


class TestOwns:
    async def test_components_stop_before_owned_resources_close(self) -> None:
        """Shutdown stops components first, then closes owned resources in reverse order."""
        events: list[str] = []
        registry = Registry()
        redis = registry.owns(Client("redis", events))
        registry.owns(Engine(events))
        registry.manage(UsesClient(redis, events))
        async with registry.lifespan():
            pass
        assert events == ["component start", "component stop", "engine disposed", "redis closed"]

    async def test_owns_returns_the_resource_and_keeps_one_entry(self) -> None:
        """owns() returns its argument; owning it twice closes it once."""
        events: list[str] = []
        registry = Registry()
        client = Client("redis", events)
        assert registry.owns(client) is client
        registry.owns(client)
        await registry.aclose()
        assert events == ["redis closed"]

    @pytest.mark.parametrize("resource", [object(), "redis://localhost", SyncEngine()])
    def test_needs_an_async_close(self, resource: Any) -> None:
        """Something without an async aclose/dispose/close (a URL, a sync engine) is refused at once."""
        with pytest.raises(ConfigurationError, match="owns\\(\\) takes an async client or engine"):
            Registry().owns(resource)

    async def test_a_failing_or_hanging_close_does_not_keep_others_open(self) -> None:
        """Each close is bounded by shutdown_timeout and logged by class name; the others still close."""
        events: list[str] = []
        registry = Registry(shutdown_timeout=0.05)
        registry.owns(Client("first", events))
        registry.owns(Hangs())
        registry.owns(Breaks())
        with capture_logs() as logs:
            async with asyncio.timeout(2.0):
                await registry.aclose()
        assert events == ["first closed"]
        failed = sorted((e["resource"], e["error"]) for e in logs if e["event"] == "resource.close_failed")
        assert failed == [("Breaks", "OSError"), ("Hangs", "TimeoutError")]
        assert "s3cret" not in repr(logs)


class TestWrapOrder:
    async def test_components_stop_before_the_host_teardown(self) -> None:
        """The host's teardown (closing its clients) runs after our components stopped, owned last."""
        events: list[str] = []
        client = Client("host-redis", events)
        registry = Registry()
        registry.owns(Engine(events))

        @contextlib.asynccontextmanager
        async def host(app: Starlette) -> AsyncIterator[None]:
            events.append("host start")
            registry.manage(UsesClient(client, events))  # built in the host's start-up
            yield
            await client.aclose()

        async with serving(Starlette(lifespan=registry.wrap(host))):
            pass
        assert events == [
            "host start",
            "component start",
            "component stop",
            "host-redis closed",
            "engine disposed",
        ]

    async def test_host_startup_error_still_closes_owned(self) -> None:
        """A host start-up that raises still stops probes and closes what the registry owns."""
        events: list[str] = []
        registry = Registry()
        registry.owns(Client("redis", events))
        registry.dependency("db", severity=Severity.SEV1, check=refused).mark_down()

        @contextlib.asynccontextmanager
        async def host(app: object) -> AsyncIterator[None]:
            raise RuntimeError("host misconfigured")
            yield  # pragma: no cover

        with pytest.raises(RuntimeError, match="host misconfigured"):
            async with registry.wrap(host)(None):
                pass  # pragma: no cover
        assert events == ["redis closed"]
        assert probe_tasks() == []

    async def test_host_lifespan_code_is_bound_to_the_registry(self) -> None:
        """Code in the host's lifespan (and tasks it starts) resolves by-name sites to this registry."""
        from degrade import _binding

        seen: list[Any] = []
        registry = Registry()

        @contextlib.asynccontextmanager
        async def host(app: object) -> AsyncIterator[None]:
            seen.append(_binding.current.get())
            yield

        async with registry.wrap(host)(None):
            pass
        assert seen == [registry]
        assert _binding.current.get() is None
