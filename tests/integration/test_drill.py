"""The drill helper against a small app over the real Redis, broken through the FaultProxy."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from degrade import Registry, Severity, checks, exception_handlers, fail_loud, fail_soft, health_routes
from degrade.redis import client as redis_client
from degrade.testing import FaultProxy
from degrade.testing.drill import Probe, Scenario, run_drill

pytestmark = pytest.mark.integration


@pytest.fixture
async def app(redis_proxy: FaultProxy, unique: str) -> AsyncIterator[Starlette]:
    """A tiny app with a fail-soft and a fail-loud route over Redis; its client closed after."""
    client = redis_client(redis_proxy.url_for("redis://127.0.0.1:6379/0"), timeout=0.2)
    try:
        yield _app(client, unique)
    finally:
        await client.aclose()


def _app(client: Any, unique: str) -> Starlette:
    registry = Registry(version="drill")
    dep = registry.dependency(
        "redis", severity=Severity.SEV1, check=checks.redis(client, timeout=0.3), recovery_interval=0.1
    )

    @fail_soft(dep, fallback=None, reason="cache miss")
    async def cached() -> bytes | None:
        return await client.get(f"{unique}:k")

    @fail_loud(dep, reason="sessions 503")
    async def session() -> bytes | None:
        return await client.get(f"{unique}:s")

    async def feed(request: Request) -> JSONResponse:
        return JSONResponse({"cached": await cached() is not None})

    async def login(request: Request) -> JSONResponse:
        return JSONResponse({"session": await session() is not None})

    return Starlette(
        routes=[Route("/feed", feed), Route("/login", login, methods=["POST"]), *health_routes(registry)],
        exception_handlers=exception_handlers(),
        lifespan=registry.lifespan,
    )


class TestRunDrill:
    async def test_every_scenario_passes_and_recovers(self, app: Starlette, redis_proxy: FaultProxy) -> None:
        """Refused and blackholed Redis: fail-soft 200, fail-loud 503, deep health 503; all recover."""
        proxy = redis_proxy
        probes = [
            Probe("GET", "/feed", expect=200),
            Probe("POST", "/login", expect=503),
            Probe("GET", "/health/deep", expect=503),
        ]
        seen: list[str] = []
        report = await run_drill(
            app,
            {"redis": proxy},
            [
                Scenario("Redis refused", {"redis": "refuse"}, probes),
                Scenario("Redis blackholed", {"redis": "blackhole"}, probes),
            ],
            requests=5,
            progress=seen.append,
        )
        assert seen == ["[1/2] Redis refused", "[2/2] Redis blackholed"]
        assert report.passed, report.table()
        assert len(report.results) == 6
        for result in report.results:
            assert result.recover_s is not None
            assert result.recover_s < 3.0
        assert "FAIL" not in report.table()

    async def test_a_wrong_promise_is_reported_as_fail(self, app: Starlette, redis_proxy: FaultProxy) -> None:
        """A probe whose expected status is not what the app answers makes the report fail."""
        proxy = redis_proxy
        report = await run_drill(
            app,
            {"redis": proxy},
            [Scenario("Redis refused", {"redis": "refuse"}, [Probe("POST", "/login", expect=200)])],
            requests=3,
        )
        assert not report.passed
        (result,) = report.results
        assert result.observed == 503
        assert "FAIL" in report.table()

    async def test_unknown_proxy_or_fault_is_a_configuration_error(self, redis_proxy: FaultProxy) -> None:
        """Naming a proxy that was not given, or an unknown fault, fails before anything runs."""
        proxy = redis_proxy
        app = Starlette()
        with pytest.raises(ValueError, match="names no proxy 'db'"):
            await run_drill(app, {"redis": proxy}, [Scenario("x", {"db": "refuse"}, [])])
        with pytest.raises(ValueError, match="unknown fault 'melt'"):
            await run_drill(
                app, {"redis": proxy}, [Scenario("x", {"redis": "melt"}, [Probe("GET", "/", expect=404)])]
            )


class TestProbeChecks:
    async def test_a_check_asserts_more_than_the_status(
        self, app: Starlette, redis_proxy: FaultProxy
    ) -> None:
        """Each answer while the fault is on goes through check: rejected ones fail the row, counted."""
        proxy = redis_proxy
        probes = [
            Probe("GET", "/feed", expect=200, check=lambda r: r.json()["cached"] is False, note="cold"),
            Probe("GET", "/feed", expect=200, check=lambda r: r.json()["cached"] is True, note="warm"),
            Probe("GET", "/feed", expect=200, check=lambda r: r.json()["missing"], note="raises"),
        ]
        report = await run_drill(
            app, {"redis": proxy}, [Scenario("Redis refused", {"redis": "refuse"}, probes)], requests=4
        )
        cold, warm, raises = report.results
        assert (cold.passed, cold.check_failures) == (True, 0)
        assert (warm.passed, warm.check_failures) == (False, 4)  # status 200 each time, check failed
        assert (raises.passed, raises.check_failures) == (False, 4)  # a KeyError is a failed check
        assert not report.passed
        table = report.table()
        assert "GET /feed [warm]" in table
        assert "200 (4 failed check)" in table

    async def test_recovery_waits_for_the_recovered_check(
        self, app: Starlette, redis_proxy: FaultProxy
    ) -> None:
        """Recovery is timed until an answer has the healthy status and passes recovered; never: FAIL."""
        proxy = redis_proxy
        seen: list[int] = []

        def third_answer(response: Any) -> bool:
            seen.append(response.status_code)
            return len(seen) >= 3

        report = await run_drill(
            app,
            {"redis": proxy},
            [
                Scenario(
                    "Redis refused",
                    {"redis": "refuse"},
                    [
                        Probe("GET", "/feed", expect=200, recovered=third_answer),
                        Probe("GET", "/feed", expect=200, recovered=lambda r: False),
                    ],
                )
            ],
            requests=2,
            recover_timeout=1.0,
        )
        later, never = report.results
        assert len(seen) == 3  # called after the fault cleared, until it passed
        assert (later.passed, later.recover_s is not None) == (True, True)
        assert (never.passed, never.recover_s) == (False, None)
