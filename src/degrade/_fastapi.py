"""FastAPI shapes of the health endpoints: :func:`health_router` (an ``APIRouter``, in OpenAPI).

The endpoints are :mod:`degrade.health`'s own (one behaviour, cached bodies and
all); this module only mounts them on an ``APIRouter`` and describes their
answers with pydantic models, so ``/docs`` shows both routes with their 200
and 503 schemas. The endpoints return their pre-rendered ``Response``, which
FastAPI sends as is: the models document the shape, they are not used to
serialise (validating each body again would cost what the body cache saves).

Needs FastAPI (``pip install 'degrade[fastapi]'``); importing
``degrade.health_router`` without it raises an ImportError naming the extra.
"""

from __future__ import annotations

from typing import Any, Literal

from ._extras import require

require("fastapi", "fastapi", feature="degrade.health_router")

from fastapi import APIRouter  # noqa: E402 - after the extras check
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402 - after the extras check

from .health import HEALTH_JSON, Authorize, _check_prefix, _endpoints  # noqa: E402
from .registry import Registry  # noqa: E402

__all__ = ["DeepHealthBody", "DependencyDetails", "HealthBody", "IetfHealthBody", "health_router"]


class HealthBody(BaseModel):
    """``GET /health``: the process serves; no dependency is touched."""

    status: Literal["ok"] = "ok"
    version: str = Field(description="The Registry's version")


class DependencyDetails(BaseModel):
    """One dependency in ``details`` (only when the caller may see details)."""

    model_config = ConfigDict(extra="allow")  # trip figures, shed counts, escape hatches...

    status: Literal["ok", "down"]
    severity: str = Field(examples=["SEV-1"])
    critical: bool
    latency_ms: float | None = Field(description="The check's latency; null without a check")
    since: str = Field(description="ISO 8601 time of the dependency's last transition")
    error: str | None = Field(description="The failure's exception class name, never its text")
    impact: str | None
    runbook: str | None


class DeepHealthBody(BaseModel):
    """``GET /health/deep``: 200 ``ok`` / ``degraded``, 503 ``down`` (a critical dependency is down)."""

    status: Literal["ok", "degraded", "down"]
    checks: dict[str, Literal["ok", "down"]] = Field(examples=[{"db": "ok", "rabbitmq": "down"}])
    version: str
    uptime_seconds: int
    details: dict[str, DependencyDetails] | None = Field(
        default=None, description="Per dependency, when details are enabled for this caller"
    )
    components: dict[str, dict[str, Any]] | None = Field(
        default=None,
        description="What each managed component with a health_details() method reports, by its name "
        "(an outbox relay's backlog, say), when details are enabled for this caller",
        examples=[{"outbox:events": {"backlog": 3, "oldest_s": 0.4}}],
    )


class IetfHealthBody(BaseModel):
    """``GET /health/deep`` with ``Accept: application/health+json`` (draft-inadarei-api-health-check)."""

    status: Literal["pass", "warn", "fail"]
    version: str
    checks: dict[str, list[dict[str, Any]]] = Field(
        description='One "<name>:connection" entry per dependency (componentId, status, time, ...)'
    )


def _deep_responses() -> dict[int | str, dict[str, Any]]:
    ietf = {HEALTH_JSON: {"schema": IetfHealthBody.model_json_schema()}}
    return {
        200: {
            "description": "Every critical dependency is up (`ok`, or `degraded` when only "
            "non-critical ones are down)",
            "content": ietf,
        },
        503: {
            "model": DeepHealthBody,
            "description": "A critical dependency is down (`down`)",
            "content": ietf,
        },
    }


def health_router(
    registry: Registry,
    prefix: str = "",
    *,
    details: bool | Authorize = False,
    cache_ttl: float = 1.0,
    tags: list[str] | None = None,
    include_in_schema: bool = True,
) -> APIRouter:
    """``GET {prefix}/health`` and ``GET {prefix}/health/deep`` as a FastAPI ``APIRouter``.

    The same endpoints as :func:`degrade.health_routes` (same bodies, status
    codes, cache and ``Accept: application/health+json``), mounted with
    ``app.include_router(health_router(registry))`` and listed in OpenAPI with
    their response models: :class:`HealthBody` for ``/health``,
    :class:`DeepHealthBody` for ``/health/deep``'s 200 and 503.

    Args:
        registry: The app's dependencies.
        prefix: e.g. ``"/api/v1"``; no trailing slash. (``include_router(...,
            prefix=...)`` adds its own prefix in front.)
        details: As for :func:`degrade.health_routes`: ``True``, or a callable
            given the request that says whether this caller may see details.
        cache_ttl: Seconds a deep result (failures too) is reused.
        tags: OpenAPI tags of both routes (default ``["health"]``).
        include_in_schema: False hides both routes from OpenAPI.

    Failure mode: ``/health`` cannot fail on a dependency's account;
    ``/health/deep`` answers within the largest ``check_timeout`` and never
    raises (503 when a critical dependency is down). Bad arguments raise
    :class:`~degrade.ConfigurationError`.
    """
    _check_prefix(prefix)
    health, health_deep = _endpoints(registry, details=details, cache_ttl=cache_ttl)
    router = APIRouter(tags=list(tags) if tags is not None else ["health"])
    router.add_api_route(
        f"{prefix}/health",
        health,
        methods=["GET"],
        name="degrade_health",
        summary="Liveness: the process serves",
        response_model=HealthBody,
        include_in_schema=include_in_schema,
    )
    router.add_api_route(
        f"{prefix}/health/deep",
        health_deep,
        methods=["GET"],
        name="degrade_health_deep",
        summary="Readiness: every dependency's check, bounded and cached",
        response_model=DeepHealthBody,
        responses=_deep_responses(),
        include_in_schema=include_in_schema,
    )
    return router
