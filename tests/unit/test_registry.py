"""Registry: validation, the dependency map, the lifespan, managed components."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from structlog.testing import capture_logs

from degrade import ConfigurationError, Registry, Severity
from degrade.registry import Component

Message = MutableMapping[str, Any]


async def hang() -> None:
    """A blackholed check: never answers."""
    await asyncio.Event().wait()


async def refused() -> None:
    """A check whose service refuses connections."""
    raise ConnectionRefusedError("connection refused")


def probe_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("degrade.probe[") and not t.done()]


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every unfinished task of the loop except the running test's."""
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()}


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[dict[str, Any]]:
    """Run an app's ASGI lifespan as a server does; yield the lifespan state."""
    state: dict[str, Any] = {}
    to_app: asyncio.Queue[Message] = asyncio.Queue()
    from_app: asyncio.Queue[Message] = asyncio.Queue()

    async def send(message: Message) -> None:
        await from_app.put(message)

    async def run() -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
        await app(scope, to_app.get, send)

    task = asyncio.create_task(run())
    try:
        await to_app.put({"type": "lifespan.startup"})
        async with asyncio.timeout(2.0):
            started = await from_app.get()
        assert started["type"] == "lifespan.startup.complete", started
        yield state
        await to_app.put({"type": "lifespan.shutdown"})
        async with asyncio.timeout(2.0):
            stopped = await from_app.get()
        assert stopped["type"] == "lifespan.shutdown.complete", stopped
    finally:
        async with asyncio.timeout(2.0):
            await task


def with_state(app: ASGIApp, state: dict[str, Any]) -> ASGIApp:
    """Give each request a copy of the lifespan state, as servers do."""

    async def shim(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    return shim


class Recorder:
    """A managed component that records its start and stop."""

    def __init__(self, name: str, events: list[str], *, start: Callable[[], Awaitable[None]] | None = None):
        self.name = name
        self.events = events
        self._start = start

    async def start(self) -> None:
        self.events.append(f"{self.name} start")
        if self._start is not None:
            await self._start()

    async def aclose(self) -> None:
        self.events.append(f"{self.name} stop")


class FailsToStop(Recorder):
    async def aclose(self) -> None:
        await super().aclose()
        raise OSError("broker://user:s3cret@mq gone")


class TestValidation:
    def test_duplicate_name(self) -> None:
        """A second dependency with the same name is a ValueError naming it."""
        registry = Registry()
        registry.dependency("db", severity=Severity.SEV1)
        with pytest.raises(ValueError, match="a dependency named 'db' is already registered"):
            registry.dependency("db", severity=Severity.SEV2)
        assert len(registry) == 1

    @pytest.mark.parametrize("name", ["", "   ", None, 3])
    def test_empty_or_non_string_name(self, name: Any) -> None:
        """An empty, blank or non-string name is a ValueError that says what to pass."""
        with pytest.raises(ValueError, match="needs a non-empty name"):
            Registry().dependency(name, severity=Severity.SEV1)

    @pytest.mark.parametrize("option", ["recovery_interval", "check_timeout"])
    @pytest.mark.parametrize("value", [0, -0.5, math.nan, True, "1"])
    def test_non_positive_intervals(self, option: str, value: Any) -> None:
        """Non-positive (or non-numeric) intervals are a ValueError naming the option."""
        with pytest.raises(ValueError, match=f"{option} must be a finite number of seconds > 0"):
            Registry().dependency("db", severity=Severity.SEV1, **{option: value})

    @pytest.mark.parametrize("value", [0, -1, 1.5, True])
    def test_failure_threshold(self, value: Any) -> None:
        """failure_threshold must be an int >= 1."""
        with pytest.raises(ValueError, match="failure_threshold must be an int >= 1"):
            Registry().dependency("db", severity=Severity.SEV1, failure_threshold=value)

    @pytest.mark.parametrize("value", [-1, 2.5, False])
    def test_retry_after(self, value: Any) -> None:
        """retry_after must be whole seconds >= 0."""
        with pytest.raises(ValueError, match="retry_after must be a whole number of seconds"):
            Registry().dependency("db", severity=Severity.SEV1, retry_after=value)

    @pytest.mark.parametrize("severity", [1, "SEV1", None])
    def test_severity_must_be_a_severity(self, severity: Any) -> None:
        """severity must be a Severity member."""
        with pytest.raises(ValueError, match=r"severity must be a degrade\.Severity"):
            Registry().dependency("db", severity=severity)

    def test_check_must_be_callable(self) -> None:
        """A non-callable check is refused."""
        with pytest.raises(ValueError, match="check must be an async callable"):
            Registry().dependency("db", severity=Severity.SEV1, check="SELECT 1")  # type: ignore[arg-type]

    @pytest.mark.parametrize("value", [0, -1.0])
    def test_shutdown_timeout(self, value: float) -> None:
        """shutdown_timeout must be > 0."""
        with pytest.raises(ValueError, match="shutdown_timeout must be > 0"):
            Registry(shutdown_timeout=value)

    def test_errors_are_configuration_errors(self) -> None:
        """Validation errors are ConfigurationError, which is a ValueError."""
        with pytest.raises(ConfigurationError):
            Registry().dependency("", severity=Severity.SEV1)

    def test_manage_refuses_non_components(self) -> None:
        """manage() needs async start() and aclose()."""
        with pytest.raises(ValueError, match="needs async start"):
            Registry().manage(object())  # type: ignore[arg-type]


class TestDependencies:
    @pytest.mark.parametrize(
        ("severity", "critical"), [(Severity.SEV1, True), (Severity.SEV2, False), (Severity.SEV3, False)]
    )
    def test_critical_defaults_to_sev1(self, severity: Severity, critical: bool) -> None:
        """critical defaults to severity == SEV1."""
        assert Registry().dependency("x", severity=severity).critical is critical

    def test_critical_can_be_overridden(self) -> None:
        """An explicit critical wins over the severity's default."""
        registry = Registry()
        assert registry.dependency("a", severity=Severity.SEV1, critical=False).critical is False
        assert registry.dependency("b", severity=Severity.SEV3, critical=True).critical is True

    def test_options_are_kept(self) -> None:
        """The declared options are readable on the dependency."""
        dep = Registry().dependency(
            "db",
            severity=Severity.SEV1,
            impact="writes fail",
            runbook="docs/runbooks/db.md",
            failure_threshold=2,
            recovery_interval=1,
            check_timeout=0.3,
            retry_after=9,
        )
        assert (dep.name, dep.impact, dep.runbook, dep.failure_threshold) == (
            "db",
            "writes fail",
            "docs/runbooks/db.md",
            2,
        )
        assert (dep.recovery_interval, dep.check_timeout, dep.retry_after) == (1.0, 0.3, 9)

    def test_mapping_in_registration_order(self) -> None:
        """The registry iterates, indexes and counts its dependencies in registration order."""
        registry = Registry(version="1.4.2")
        db = registry.dependency("db", severity=Severity.SEV1)
        redis = registry.dependency("redis", severity=Severity.SEV2)
        assert list(registry) == [db, redis]
        assert list(registry.dependencies) == ["db", "redis"]
        assert registry["redis"] is redis
        assert len(registry) == 2
        assert repr(registry) == "<Registry version='1.4.2' db=ok, redis=ok>"

    def test_dependencies_is_a_read_only_view(self) -> None:
        """Changing the returned mapping does not change the registry."""
        registry = Registry()
        registry.dependency("db", severity=Severity.SEV1)
        view = registry.dependencies
        assert isinstance(view, dict)
        view.clear()
        assert len(registry) == 1

    def test_uptime_grows(self) -> None:
        """uptime counts seconds since the registry was created."""
        registry = Registry()
        assert 0 <= registry.uptime < 5


class TestLifespan:
    def test_starts_with_every_dependency_down(self) -> None:
        """An app whose every dependency is down starts at once, probes them, and stops cleanly."""
        registry = Registry(shutdown_timeout=1.0)
        deps = [
            registry.dependency(f"dep{i}", severity=Severity.SEV1, check=check, recovery_interval=0.01)
            for i, check in enumerate([hang, refused, hang])
        ]
        for dep in deps:
            dep.mark_down(ConnectionRefusedError())  # no event loop yet: no probe either

        async def scenario() -> None:
            app = Starlette(lifespan=registry.lifespan)
            start = time.perf_counter()
            async with serving(app):
                assert time.perf_counter() - start < 0.5
                assert sorted(t.get_name() for t in probe_tasks()) == [
                    "degrade.probe[dep0]",
                    "degrade.probe[dep1]",
                    "degrade.probe[dep2]",
                ]
                await asyncio.sleep(0.05)  # let the probes run a few rounds
                assert all(dep.is_down for dep in deps)
            assert probe_tasks() == []
            assert other_tasks() == set()

        asyncio.run(scenario())

    async def test_start_does_not_touch_dependencies(self) -> None:
        """Start-up runs no check: blackholed services cannot block it."""
        calls = 0

        async def counted() -> None:
            nonlocal calls
            calls += 1
            await hang()

        registry = Registry()
        for name in ("db", "redis", "amqp"):
            registry.dependency(name, severity=Severity.SEV1, check=counted)
        async with asyncio.timeout(0.5), registry.lifespan():
            await asyncio.sleep(0)
        assert calls == 0

    async def test_stops_probes_without_pending_tasks(self) -> None:
        """Shutdown cancels probes and leaves no task behind, even a check with a slow clean-up."""

        async def slow_cleanup() -> None:
            try:
                await hang()
            finally:
                await asyncio.sleep(0.02)  # e.g. a driver's shielded connection close

        async def instant(_: float) -> None:
            await asyncio.sleep(0)

        registry = Registry(sleep=instant)
        dep = registry.dependency("db", severity=Severity.SEV1, check=slow_cleanup, check_timeout=30)
        async with registry.lifespan():
            dep.mark_down()
            await asyncio.sleep(0.01)  # the probe is inside the check now
            assert len(probe_tasks()) == 1
        assert other_tasks() == set()

    async def test_aclose_is_idempotent(self) -> None:
        """aclose may be called again."""
        registry = Registry()
        registry.dependency("db", severity=Severity.SEV1, check=refused).mark_down()
        await registry.aclose()
        await registry.aclose()
        assert probe_tasks() == []

    async def test_components_start_in_order_and_stop_in_reverse(self) -> None:
        """Managed components start in order and stop in reverse order."""
        events: list[str] = []
        registry = Registry()
        first = registry.manage(Recorder("a", events))
        registry.manage(Recorder("b", events))
        assert isinstance(first, Component)
        async with registry.lifespan():
            assert events == ["a start", "b start"]
        assert events == ["a start", "b start", "b stop", "a stop"]

    async def test_failing_component_start_is_logged_not_raised(self) -> None:
        """A component whose start fails is logged by class name and the app still starts."""
        events: list[str] = []

        async def boom() -> None:
            raise ConnectionRefusedError("amqp://guest:s3cret@mq")

        registry = Registry()
        registry.manage(Recorder("a", events, start=boom))
        with capture_logs() as logs:
            async with registry.lifespan():
                pass
        (entry,) = [e for e in logs if e["event"] == "component.start_failed"]
        assert entry["component"] == "Recorder"
        assert entry["error"] == "ConnectionRefusedError"
        assert "s3cret" not in repr(logs)

    async def test_hanging_component_start_is_bounded(self) -> None:
        """A component whose start hangs is given up after shutdown_timeout."""
        registry = Registry(shutdown_timeout=0.05)
        registry.manage(Recorder("a", [], start=hang))
        start = time.perf_counter()
        with capture_logs() as logs:
            async with registry.lifespan():
                pass
        assert time.perf_counter() - start < 1.0
        assert [e["error"] for e in logs if e["event"] == "component.start_failed"] == ["TimeoutError"]

    async def test_failing_component_stop_does_not_block_others(self) -> None:
        """A component whose aclose fails is logged and the others still stop."""
        events: list[str] = []
        registry = Registry()
        registry.manage(Recorder("a", events))
        registry.manage(FailsToStop("b", events))
        with capture_logs() as logs:
            async with registry.lifespan():
                pass
        assert events[-2:] == ["b stop", "a stop"]
        (entry,) = [e for e in logs if e["event"] == "component.stop_failed"]
        assert (entry["component"], entry["error"]) == ("FailsToStop", "OSError")
        assert "s3cret" not in repr(logs)


class TestWrap:
    async def test_composes_with_host_lifespan_and_passes_state(self) -> None:
        """wrap(): our start-up inside the host's lifespan, our stop before its teardown; state passed."""
        events: list[str] = []

        @contextlib.asynccontextmanager
        async def host(app: Starlette) -> AsyncIterator[dict[str, Any]]:
            events.append("host start")
            yield {"greeting": "hello"}
            events.append("host stop")

        async def endpoint(request: Request) -> PlainTextResponse:
            return PlainTextResponse(request.state.greeting)

        registry = Registry()
        registry.manage(Recorder("degrade", events))
        registry.dependency("db", severity=Severity.SEV1, check=refused).mark_down()
        app = Starlette(routes=[Route("/", endpoint)], lifespan=registry.wrap(host))
        async with serving(app) as state:
            assert state == {"greeting": "hello"}
            assert len(probe_tasks()) == 1
            transport = httpx.ASGITransport(app=with_state(app, state))
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.get("/")
            assert response.text == "hello"
        assert events == ["host start", "degrade start", "degrade stop", "host stop"]
        assert probe_tasks() == []

    async def test_host_lifespan_without_state(self) -> None:
        """A host lifespan that yields nothing works too."""
        entered = False

        @contextlib.asynccontextmanager
        async def host(app: Starlette) -> AsyncIterator[None]:
            nonlocal entered
            entered = True
            yield

        app = Starlette(lifespan=Registry().wrap(host))
        async with serving(app) as state:
            assert entered
            assert state == {}

    async def test_host_startup_error_still_stops_probes(self) -> None:
        """If the host's own start-up fails, its error propagates and our probes are stopped."""

        @contextlib.asynccontextmanager
        async def host(app: object) -> AsyncIterator[None]:
            raise RuntimeError("host misconfigured")
            yield  # pragma: no cover

        registry = Registry()
        registry.dependency("db", severity=Severity.SEV1, check=refused).mark_down()
        with pytest.raises(RuntimeError, match="host misconfigured"):
            async with registry.wrap(host)(None):
                pass  # pragma: no cover
        assert probe_tasks() == []


class TestWatch:
    async def test_a_watched_dependency_goes_down_without_traffic(self) -> None:
        """watch_interval runs the check while ok, so an outage is seen with no request."""
        healthy = True

        async def check() -> None:
            if not healthy:
                raise ConnectionRefusedError

        registry = Registry()
        dep = registry.dependency(
            "turn", severity=Severity.SEV3, check=check, watch_interval=0.01, recovery_interval=0.01
        )
        async with registry.lifespan():
            await asyncio.sleep(0.05)
            assert dep.state == "ok"
            healthy = False
            for _ in range(200):
                if dep.is_down:
                    break
                await asyncio.sleep(0.01)
            assert dep.is_down
            healthy = True
            for _ in range(200):
                if not dep.is_down:
                    break
                await asyncio.sleep(0.01)
            assert dep.state == "ok"
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("degrade.")]

    def test_watch_needs_a_check_and_a_positive_interval(self) -> None:
        """watch_interval without a check, or not positive, is a configuration error."""
        registry = Registry()
        with pytest.raises(ValueError, match="watch_interval needs a check"):
            registry.dependency("a", severity=Severity.SEV3, watch_interval=1.0)
        with pytest.raises(ValueError, match="watch_interval must be a finite number of seconds > 0"):
            registry.dependency("b", severity=Severity.SEV3, watch_interval=0, check=lambda: asyncio.sleep(0))
