"""health_router: the health endpoints as a FastAPI APIRouter, in OpenAPI, same behaviour as health_routes."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette

import degrade
from degrade import ConfigurationError, MissingExtraError, Registry, Severity, health_router, health_routes
from degrade._fastapi import DeepHealthBody


async def parked(_: float) -> None:
    """An injected sleep that never returns: probes started by a test never run a check."""
    await asyncio.Event().wait()


async def ok_check() -> None:
    """A check that passes."""


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    reg = Registry(version="3.1.4", sleep=parked)
    reg.dependency("db", severity=Severity.SEV1, check=ok_check)
    reg.dependency("mq", severity=Severity.SEV2, check=ok_check)
    try:
        yield reg
    finally:
        await reg.aclose()


class _Reporting:
    """A managed component that reports through ``health_details()`` (an outbox relay, say)."""

    name = "outbox:events"

    async def start(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def health_details(self) -> dict[str, int]:
        return {"backlog": 3}


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _fastapi(registry: Registry, mount: str = "", **options: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(health_router(registry, **options), prefix=mount)
    return app


def _comparable(response: httpx.Response) -> tuple[int, dict[str, Any], str, str | None]:
    body = json.loads(response.content)
    body.pop("uptime_seconds", None)  # may tick between the two requests
    for entry in body.get("details", {}).values():
        entry.pop("latency_ms", None)  # each app runs its own checks
    if "version" in body and isinstance(body.get("checks"), dict):
        for entries in body["checks"].values():
            for entry in entries if isinstance(entries, list) else ():
                entry.pop("observedValue", None)
    return response.status_code, body, response.headers["content-type"], response.headers.get("cache-control")


class TestOpenAPI:
    def test_both_paths_are_documented_with_their_models(self, registry: Registry) -> None:
        """OpenAPI lists /health and /health/deep, their 200 models and the deep route's 503."""
        schema = _fastapi(registry, mount="/api/v1").openapi()
        paths = schema["paths"]
        assert set(paths) >= {"/api/v1/health", "/api/v1/health/deep"}
        shallow = paths["/api/v1/health"]["get"]["responses"]["200"]["content"]["application/json"]
        assert shallow["schema"] == {"$ref": "#/components/schemas/HealthBody"}
        deep = paths["/api/v1/health/deep"]["get"]["responses"]
        assert deep["200"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/DeepHealthBody"
        }
        assert deep["503"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/DeepHealthBody"
        }
        assert "application/health+json" in deep["503"]["content"]
        status = schema["components"]["schemas"]["DeepHealthBody"]["properties"]["status"]
        assert set(status["enum"]) == {"ok", "degraded", "down"}

    async def test_the_model_names_every_key_of_a_detailed_body(self, registry: Registry) -> None:
        """A /health/deep body with details and a component's report: each key is a field of the model."""
        registry.manage(_Reporting())
        async with _client(_fastapi(registry, details=True)) as client:
            body = (await client.get("/health/deep")).json()
        assert set(body) == {"status", "checks", "version", "uptime_seconds", "details", "components"}
        assert set(body) <= set(DeepHealthBody.model_fields)
        parsed = DeepHealthBody.model_validate(body)
        assert parsed.components == {"outbox:events": {"backlog": 3}}
        fields = _fastapi(registry).openapi()["components"]["schemas"]["DeepHealthBody"]["properties"]
        assert "components" in fields

    def test_include_in_schema_false_hides_them(self, registry: Registry) -> None:
        """include_in_schema=False keeps the routes out of OpenAPI (they still answer)."""
        schema = _fastapi(registry, include_in_schema=False).openapi()
        assert not any(path.startswith("/health") for path in schema.get("paths", {}))


class TestBehaviour:
    async def test_include_router_serves_under_both_prefixes(self, registry: Registry) -> None:
        """The router's own prefix and include_router's prefix combine."""
        app = _fastapi(registry, mount="/svc", prefix="/api/v1")
        async with _client(app) as client:
            response = await client.get("/svc/api/v1/health")
            assert response.status_code == 200
            assert response.json() == {"status": "ok", "version": "3.1.4"}
            assert (await client.get("/api/v1/health")).status_code == 404

    @pytest.mark.parametrize("down", [None, "mq", "db"])
    @pytest.mark.parametrize("accept", ["application/json", "application/health+json"])
    async def test_answers_equal_health_routes(
        self, registry: Registry, down: str | None, accept: str
    ) -> None:
        """Status, body, media type and Cache-Control are the same as health_routes' (ok, degraded, down)."""
        if down is not None:
            registry[down].mark_down(OSError())
        starlette_app = Starlette(routes=health_routes(registry, details=True))
        fastapi_app = _fastapi(registry, details=True)
        async with _client(starlette_app) as plain, _client(fastapi_app) as fast:
            for path in ("/health", "/health/deep"):
                expected = await plain.get(path, headers={"accept": accept})
                got = await fast.get(path, headers={"accept": accept})
                assert _comparable(got) == _comparable(expected), path
        expected_status = {None: 200, "mq": 200, "db": 503}[down]
        assert expected.status_code == expected_status

    async def test_details_callable_decides_per_request(self, registry: Registry) -> None:
        """A details callable sees the request, as with health_routes."""
        app = _fastapi(registry, details=lambda request: request.headers.get("x-admin") == "1")
        async with _client(app) as client:
            assert "details" not in (await client.get("/health/deep")).json()
            assert "details" in (await client.get("/health/deep", headers={"x-admin": "1"})).json()

    def test_bad_prefix_is_rejected(self, registry: Registry) -> None:
        """A prefix ending in '/' raises ConfigurationError, as with health_routes."""
        with pytest.raises(ConfigurationError, match="must not end with '/'"):
            health_router(registry, prefix="/api/")


class TestWithoutFastAPI:
    def test_import_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without FastAPI, `from degrade import health_router` raises MissingExtraError naming the extra."""
        monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
        monkeypatch.delitem(sys.modules, "degrade._fastapi", raising=False)
        monkeypatch.delattr(degrade, "health_router", raising=False)
        with pytest.raises(MissingExtraError, match=r"degrade\[fastapi\]"):
            from degrade import health_router  # noqa: F401
        assert isinstance(MissingExtraError("x"), ImportError)

    def test_import_degrade_does_not_import_fastapi(self) -> None:
        """`import degrade` leaves FastAPI unimported until health_router is used."""
        code = "import sys, degrade; print('fastapi' in sys.modules)"
        import subprocess

        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "False"
        importlib.import_module("degrade._fastapi")  # and it imports fine when FastAPI is there
