"""/health and /health/deep: status codes, cache, single-flight, timeouts, no secrets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from structlog.testing import capture_logs

from degrade import ConfigurationError, Registry, Severity, health, health_routes
from degrade.health import DeepHealth

PASSWORD = "hunter2-s3cret"
DSN = f"postgresql+asyncpg://app:{PASSWORD}@db.internal:5432/app"


async def parked(_: float) -> None:
    """An injected sleep that never returns: probes started by a test never run a check."""
    await asyncio.Event().wait()


class Check:
    """A counting check: passes, fails with a DSN in its message, or hangs."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.calls = 0
        self.entered = asyncio.Event()
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> None:
        self.calls += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "fail":
            raise ConnectionRefusedError(f"could not connect to {DSN}")
        if self.mode == "hang":
            await asyncio.Event().wait()


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    reg = Registry(version="1.4.2", sleep=parked)
    try:
        yield reg
    finally:
        await reg.aclose()


def client_for(registry: Registry, **options: Any) -> httpx.AsyncClient:
    app = Starlette(routes=health_routes(registry, **options))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def get(registry: Registry, path: str = "/health/deep", **options: Any) -> httpx.Response:
    async with client_for(registry, **options) as client:
        return await client.get(path)


class TestShallow:
    async def test_answers_200_without_touching_dependencies(self, registry: Registry) -> None:
        """/health answers 200 and runs no check, even with every dependency down or hanging."""
        check = Check("hang")
        registry.dependency("db", severity=Severity.SEV1, check=check)
        registry.dependency("redis", severity=Severity.SEV1, check=Check()).mark_down()
        response = await get(registry, "/health")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "version": "1.4.2"}
        assert response.headers["cache-control"] == "no-store"
        assert check.calls == 0

    async def test_prefix(self, registry: Registry) -> None:
        """prefix= mounts both routes under it."""
        async with client_for(registry, prefix="/api/v1") as client:
            assert (await client.get("/api/v1/health")).status_code == 200
            assert (await client.get("/api/v1/health/deep")).status_code == 200
            assert (await client.get("/health")).status_code == 404

    @pytest.mark.parametrize("prefix", ["/api/", "api"])
    def test_bad_prefix(self, prefix: str) -> None:
        """A prefix must start with '/' and not end with one."""
        with pytest.raises(ConfigurationError, match="prefix must"):
            health_routes(Registry(), prefix=prefix)


class TestDeepStatus:
    async def test_all_ok(self, registry: Registry) -> None:
        """Every check passing gives 200 ok with the seed runbook's body shape."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.dependency("redis", severity=Severity.SEV2, check=Check())
        response = await get(registry)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body == {
            "status": "ok",
            "checks": {"db": "ok", "redis": "ok"},
            "version": "1.4.2",
            "uptime_seconds": body["uptime_seconds"],
        }
        assert isinstance(body["uptime_seconds"], int)

    async def test_critical_down_is_503(self, registry: Registry) -> None:
        """A failing critical (SEV1) dependency gives 503 down."""
        registry.dependency("db", severity=Severity.SEV1, check=Check("fail"))
        registry.dependency("redis", severity=Severity.SEV2, check=Check())
        response = await get(registry)
        assert response.status_code == 503
        assert response.json()["status"] == "down"
        assert response.json()["checks"] == {"db": "down", "redis": "ok"}

    async def test_only_non_critical_down_is_degraded(self, registry: Registry) -> None:
        """Only non-critical dependencies failing gives 200 degraded."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.dependency("amqp", severity=Severity.SEV2, check=Check("fail"))
        registry.dependency("replica", severity=Severity.SEV3, check=Check("fail"))
        response = await get(registry)
        assert response.status_code == 200
        assert response.json()["status"] == "degraded"
        assert response.json()["checks"] == {"db": "ok", "amqp": "down", "replica": "down"}

    @pytest.mark.parametrize(
        ("severity", "critical", "status"),
        [(Severity.SEV3, True, 503), (Severity.SEV1, False, 200)],
    )
    async def test_critical_flag_decides(
        self, registry: Registry, severity: Severity, critical: bool, status: int
    ) -> None:
        """An explicit critical= decides 503 vs degraded, not the severity."""
        registry.dependency("svc", severity=severity, critical=critical, check=Check("fail"))
        assert (await get(registry)).status_code == status

    async def test_down_by_traffic_is_reported_without_probing(self, registry: Registry) -> None:
        """A dependency already down by traffic is reported down and its check is not run."""
        check = Check()
        registry.dependency("redis", severity=Severity.SEV1, check=check).mark_down(OSError())
        response = await get(registry, details=True)
        assert response.status_code == 503
        assert response.json()["details"]["redis"]["error"] == "OSError"
        assert check.calls == 0

    async def test_dependency_without_check_reports_its_state(self, registry: Registry) -> None:
        """A dependency without a check is reported by its current state."""
        dep = registry.dependency("cache", severity=Severity.SEV3)
        assert (await get(registry)).json()["checks"] == {"cache": "ok"}
        dep.mark_down()
        assert (await get(registry, cache_ttl=0)).json()["checks"] == {"cache": "down"}

    async def test_failed_checks_feed_the_dependency(self, registry: Registry) -> None:
        """Each deep check's failure counts towards the dependency's threshold."""
        dep = registry.dependency("db", severity=Severity.SEV1, check=Check("fail"), failure_threshold=2)
        async with client_for(registry, cache_ttl=0) as client:
            await client.get("/health/deep")
            assert dep.state == "ok"
            await client.get("/health/deep")
        assert dep.is_down


class TestDeepTimeouts:
    async def test_blackholed_check_is_bounded(self, registry: Registry) -> None:
        """A hanging check is reported down after its check_timeout, well under a second."""
        registry.dependency("db", severity=Severity.SEV1, check=Check("hang"), check_timeout=0.1)
        registry.dependency("redis", severity=Severity.SEV1, check=Check())
        start = time.perf_counter()
        response = await get(registry, details=True)
        assert time.perf_counter() - start < 0.9
        assert response.status_code == 503
        details = response.json()["details"]
        assert (details["db"]["status"], details["db"]["error"]) == ("down", "TimeoutError")
        assert details["redis"]["status"] == "ok"

    async def test_checks_run_concurrently(self, registry: Registry) -> None:
        """Four hanging checks of 0.25 s each answer in about 0.25 s, not 1 s."""
        for i in range(4):
            registry.dependency(f"dep{i}", severity=Severity.SEV2, check=Check("hang"), check_timeout=0.25)
        start = time.perf_counter()
        response = await get(registry)
        elapsed = time.perf_counter() - start
        assert response.json()["status"] == "degraded"
        assert 0.2 < elapsed < 0.75


class TestDeepCache:
    async def test_results_are_cached(self, registry: Registry) -> None:
        """Within cache_ttl, a second request reuses the first run."""
        check = Check()
        registry.dependency("db", severity=Severity.SEV1, check=check)
        async with client_for(registry, cache_ttl=60) as client:
            first = await client.get("/health/deep")
            second = await client.get("/health/deep")
        assert first.json() == second.json()
        assert check.calls == 1

    async def test_a_transition_makes_the_cache_stale(self, registry: Registry) -> None:
        """Traffic marking a dependency down is seen at once: no cached 200 "ok" contradicting it."""
        dep = registry.dependency("db", severity=Severity.SEV1, check=Check())
        async with client_for(registry, cache_ttl=60, details=True) as client:
            assert (await client.get("/health/deep")).status_code == 200
            dep.mark_down(reason="traffic")
            response = await client.get("/health/deep")
        assert response.status_code == 503
        assert response.json()["details"]["db"]["status"] == "down"

    async def test_a_recovery_during_the_run_makes_its_report_stale(self, registry: Registry) -> None:
        """A dependency back while another's check still runs: that run's "down" is not cached.

        Counted at the end of the run, the transition was taken as seen, and
        /health/deep said 503 for a whole cache_ttl after the recovery.
        """
        release = asyncio.Event()

        async def slow_check() -> None:
            await release.wait()

        registry.dependency("db", severity=Severity.SEV1, check=slow_check)
        cache = registry.dependency("cache", severity=Severity.SEV1)
        cache.mark_down(reason="traffic")
        deep = DeepHealth(registry, cache_ttl=60)
        run = asyncio.ensure_future(deep.report())
        await asyncio.sleep(0.01)  # the run has read "cache" down and waits on db's check
        cache.record_success()  # cache is back
        release.set()
        assert (await run).status == "down"
        assert deep.fresh() is None
        assert (await deep.report()).status == "ok"

    async def test_failures_are_cached_too(self, registry: Registry) -> None:
        """A failed run is cached as well: a blackholed service costs one timeout per ttl."""
        check = Check("hang")
        registry.dependency("db", severity=Severity.SEV1, check=check, check_timeout=0.05)
        async with client_for(registry, cache_ttl=60) as client:
            assert (await client.get("/health/deep")).status_code == 503
            assert (await client.get("/health/deep")).status_code == 503
        assert check.calls == 1

    async def test_zero_ttl_reruns(self, registry: Registry) -> None:
        """cache_ttl=0 runs the checks on every request."""
        check = Check()
        registry.dependency("db", severity=Severity.SEV1, check=check)
        async with client_for(registry, cache_ttl=0) as client:
            await client.get("/health/deep")
            await client.get("/health/deep")
        assert check.calls == 2

    async def test_cache_expires_on_the_clock(self, registry: Registry) -> None:
        """A report older than cache_ttl is replaced by a new run (injected clock)."""
        now = [0.0]
        check = Check()
        registry.dependency("db", severity=Severity.SEV1, check=check)
        deep = DeepHealth(registry, cache_ttl=1.0, clock=lambda: now[0])
        first = await deep.report()
        now[0] = 0.99
        assert await deep.report() is first
        now[0] = 1.0
        assert await deep.report() is not first
        assert check.calls == 2

    def test_negative_ttl(self) -> None:
        """A negative cache_ttl is refused."""
        with pytest.raises(ConfigurationError, match="cache_ttl"):
            DeepHealth(Registry(), cache_ttl=-1)

    async def test_concurrent_callers_share_one_run(self, registry: Registry) -> None:
        """Concurrent requests while a run is in flight share it: each check runs once."""
        check = Check()
        check.gate = asyncio.Event()
        registry.dependency("db", severity=Severity.SEV1, check=check)
        async with client_for(registry, cache_ttl=0) as client:
            requests = [asyncio.create_task(client.get("/health/deep")) for _ in range(10)]
            await check.entered.wait()
            await asyncio.sleep(0.01)  # every request is now waiting on the run
            check.gate.set()
            responses = await asyncio.gather(*requests)
        assert check.calls == 1
        assert {r.status_code for r in responses} == {200}

    async def test_a_cancelled_caller_does_not_cancel_the_shared_run(self, registry: Registry) -> None:
        """One caller giving up does not cancel the run that others wait for."""
        check = Check()
        check.gate = asyncio.Event()
        registry.dependency("db", severity=Severity.SEV1, check=check)
        deep = DeepHealth(registry, cache_ttl=0)
        quitter = asyncio.create_task(deep.report())
        stayer = asyncio.create_task(deep.report())
        await check.entered.wait()
        quitter.cancel()
        await asyncio.sleep(0)
        check.gate.set()
        report = await stayer
        assert report.status == "ok"
        assert quitter.cancelled()


class TestDetails:
    async def test_off_by_default(self, registry: Registry) -> None:
        """Without details=, the body has no details."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        assert "details" not in (await get(registry)).json()

    async def test_fields(self, registry: Registry) -> None:
        """details=True adds severity, critical, latency, since, error, impact, runbook and the trip rule."""
        registry.dependency(
            "db",
            severity=Severity.SEV1,
            check=Check("fail"),
            impact="All writes fail (503)",
            runbook="docs/runbooks/db-failover.md",
        )
        registry.dependency("cache", severity=Severity.SEV3)
        details = (await get(registry, details=True)).json()["details"]
        db = details["db"]
        assert set(db) == {
            "status",
            "severity",
            "critical",
            "latency_ms",
            "since",
            "error",
            "impact",
            "runbook",
            "trip",
        }
        assert db["trip"] == {"rule": "3 consecutive failures", "consecutive_failures": 1}  # the failed check
        assert (db["status"], db["severity"], db["critical"], db["error"]) == (
            "down",
            "SEV-1",
            True,
            "ConnectionRefusedError",
        )
        assert (db["impact"], db["runbook"]) == ("All writes fail (503)", "docs/runbooks/db-failover.md")
        assert isinstance(db["latency_ms"], float)
        assert db["since"].endswith("Z")
        assert details["cache"]["latency_ms"] is None

    @pytest.mark.parametrize("asynchronous", [False, True])
    async def test_authoriser_decides_per_request(self, registry: Registry, asynchronous: bool) -> None:
        """A details= callable (sync or async) given the request decides who sees details."""

        def allowed(request: Request) -> bool:
            return request.headers.get("x-ops-token") == "letmein"

        async def allowed_async(request: Request) -> bool:
            return allowed(request)

        authorise: Callable[[Request], Any] = allowed_async if asynchronous else allowed
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        async with client_for(registry, details=authorise) as client:
            hidden = await client.get("/health/deep")
            shown = await client.get("/health/deep", headers={"x-ops-token": "letmein"})
        assert "details" not in hidden.json()
        assert "db" in shown.json()["details"]


class TestIetfFormat:
    @pytest.mark.parametrize(
        ("checks", "status", "code"),
        [(("ok", "ok"), "pass", 200), (("ok", "fail"), "warn", 200), (("fail", "ok"), "fail", 503)],
    )
    async def test_status_mapping(
        self, registry: Registry, checks: tuple[str, str], status: str, code: int
    ) -> None:
        """Accept: application/health+json gets pass / warn / fail."""
        registry.dependency("db", severity=Severity.SEV1, check=Check(checks[0]))
        registry.dependency("amqp", severity=Severity.SEV2, check=Check(checks[1]))
        async with client_for(registry) as client:
            response = await client.get("/health/deep", headers={"accept": "application/health+json"})
        assert response.status_code == code
        assert response.headers["content-type"] == "application/health+json"
        body = response.json()
        assert body["status"] == status
        assert body["version"] == "1.4.2"
        assert set(body["checks"]) == {"db:connection", "amqp:connection"}
        (amqp,) = body["checks"]["amqp:connection"]
        assert amqp["componentId"] == "amqp"
        assert amqp["status"] == ("pass" if checks[1] == "ok" else "warn")


class TestNoSecrets:
    @pytest.mark.parametrize("accept", ["application/json", "application/health+json"])
    async def test_dsn_in_a_check_error_never_leaks(self, registry: Registry, accept: str) -> None:
        """A check raising with a DSN holding a password leaks it nowhere: body, headers or logs."""
        registry.dependency("db", severity=Severity.SEV1, check=Check("fail"), failure_threshold=1)
        with capture_logs() as logs:
            async with client_for(registry, details=True, cache_ttl=0) as client:
                responses = [
                    await client.get("/health/deep", headers={"accept": accept}),
                    await client.get("/health/deep", headers={"accept": accept}),
                ]
        for response in responses:
            assert response.status_code == 503
            assert PASSWORD not in response.text
            assert "db.internal" not in response.text
            assert PASSWORD not in json.dumps(dict(response.headers))
        assert "ConnectionRefusedError" in responses[0].text
        assert [e["event"] for e in logs] == ["dependency.down"]
        assert PASSWORD not in repr(logs)


class Reporting:
    """A managed component that reports ``details`` (or raises them) through ``health_details()``."""

    def __init__(self, details: Any, name: str | None = None) -> None:
        self.details = details
        if name is not None:
            self.name = name

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def health_details(self) -> Any:
        if isinstance(self.details, Exception):
            raise self.details
        return self.details


class TestComponentDetails:
    async def test_a_managed_component_reports_under_its_name(self, registry: Registry) -> None:
        """With details, a managed component's health_details() is under components, keyed by its name."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.manage(Reporting({"backlog": 3}, name="outbox:events"))
        body = (await get(registry, details=True)).json()
        assert body["components"] == {"outbox:events": {"backlog": 3}}
        assert set(body["details"]) == {"db"}  # dependencies only: components are their own section

    async def test_hidden_without_details(self, registry: Registry) -> None:
        """Without details (or for a caller not allowed them), no components section."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.manage(Reporting({"backlog": 3}, name="outbox:events"))
        assert "components" not in (await get(registry)).json()
        shown = (await get(registry, details=lambda request: False)).json()
        assert "components" not in shown

    async def test_absent_when_no_component_reports(self, registry: Registry) -> None:
        """Components without health_details() add nothing: the body is as before."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.manage(_Quiet())
        assert "components" not in (await get(registry, details=True)).json()

    async def test_read_at_each_call_not_cached_with_the_report(self, registry: Registry) -> None:
        """The deep report is cached, but what a component reports is read at each call (live backlog)."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        relay = registry.manage(Reporting({"backlog": 5}, name="relay"))
        async with client_for(registry, details=True, cache_ttl=60) as client:
            first = (await client.get("/health/deep")).json()["components"]["relay"]
            relay.details = {"backlog": 0}
            second = (await client.get("/health/deep")).json()["components"]["relay"]
        assert (first, second) == ({"backlog": 5}, {"backlog": 0})

    async def test_unnamed_components_use_the_class_name_and_repeats_are_numbered(
        self, registry: Registry
    ) -> None:
        """No str name: the class name; a repeated name gets #2."""
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.manage(Reporting({"n": 1}))
        registry.manage(Reporting({"n": 2}))
        registry.manage(Reporting({"n": 3}, name="x"))
        registry.manage(Reporting({"n": 4}, name="x"))
        components = (await get(registry, details=True)).json()["components"]
        assert components == {"Reporting": {"n": 1}, "Reporting#2": {"n": 2}, "x": {"n": 3}, "x#2": {"n": 4}}

    async def test_a_failing_component_is_its_own_row_logged_once(
        self, registry: Registry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Raising, a non-mapping or a value JSON cannot encode: {"error": class}, the rest still shown."""
        monkeypatch.setattr(health, "_warned", set())
        registry.dependency("db", severity=Severity.SEV1, check=Check())
        registry.manage(Reporting(RuntimeError(f"boom {DSN}"), name="raises"))
        registry.manage(Reporting([1, 2], name="not-a-mapping"))
        registry.manage(Reporting({"at": object()}, name="not-json"))
        registry.manage(Reporting({"ok": True}, name="fine"))
        with capture_logs() as logs:
            async with client_for(registry, details=True) as client:
                answers = [await client.get("/health/deep") for _ in range(3)]
        assert {r.status_code for r in answers} == {200}
        assert PASSWORD not in answers[-1].text
        assert answers[-1].json()["components"] == {
            "raises": {"error": "RuntimeError"},
            "not-a-mapping": {"error": "TypeError"},
            "not-json": {"error": "TypeError"},
            "fine": {"ok": True},
        }
        failed = [e["component"] for e in logs if e["event"] == "health.component_details_failed"]
        assert sorted(failed) == ["not-a-mapping", "not-json", "raises"]  # once each, not per call


class _Quiet:
    """A managed component without health_details()."""

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass
