"""``/health`` and ``/health/deep``.

``/health`` touches nothing: it says the process serves. ``/health/deep`` runs
every dependency's check concurrently, each bounded by its ``check_timeout``,
caches the outcome (failures too) for ``cache_ttl`` seconds and lets concurrent
callers share one run. A dependency already known down is reported down without
being probed. Answers: 200 ``ok``; 200 ``degraded`` when only non-critical
dependencies are down; 503 ``down`` when a critical one is.

With details on, a component the registry manages (``registry.manage()``)
that has a ``health_details()`` method adds what it returns under
``components``, keyed by its ``name`` (an outbox relay's backlog, say): read at
render time, so it must not do I/O.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .dependency import CheckResult, Dependency, transitions
from .exceptions import ConfigurationError
from .observe import logger
from .registry import Registry

__all__ = ["DeepHealth", "HealthReport", "health_routes"]

HEALTH_JSON = "application/health+json"
Authorize = Callable[[Request], bool | Awaitable[bool]]


@dataclass(frozen=True)
class HealthReport:
    """One run of every check: per-dependency results and the overall status."""

    results: dict[str, CheckResult]
    status: str  # "ok" | "degraded" | "down"
    at: float  # time.time() of the run

    @property
    def http_status(self) -> int:
        """503 when a critical dependency is down, else 200."""
        return 503 if self.status == "down" else 200


class DeepHealth:
    """Runs and caches the deep check of a registry (single-flight).

    Failure mode: never raises on a dependency's account; a check that raises
    or outlives its ``check_timeout`` is reported ``down``.
    """

    def __init__(
        self, registry: Registry, *, cache_ttl: float = 1.0, clock: Callable[[], float] = time.monotonic
    ):
        if cache_ttl < 0:
            raise ConfigurationError(f"cache_ttl must be >= 0 seconds; got {cache_ttl!r}")
        self.registry = registry
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._cached: HealthReport | None = None
        self._cached_at = 0.0
        self._cached_transitions = -1
        self._running: asyncio.Task[HealthReport] | None = None

    def fresh(self) -> HealthReport | None:
        """The cached report while it is fresh, else None (no await: the hot path).

        A transition of any dependency since the report was made makes it stale
        at once: the cache never says ``ok`` for a dependency traffic has just
        marked down (nor ``since`` a time that contradicts its status).
        """
        cached = self._cached
        if (
            cached is not None
            and self._clock() - self._cached_at < self.cache_ttl
            and self._cached_transitions == transitions()
        ):
            return cached
        return None

    async def report(self) -> HealthReport:
        """The cached report if fresh, else the result of one shared run."""
        cached = self.fresh()
        if cached is not None:
            return cached
        task = self._running
        if task is None or task.done():
            task = self._running = asyncio.ensure_future(self._run())
        # shield: a caller that disconnects must not cancel the run others share
        return await asyncio.shield(task)

    async def _run(self) -> HealthReport:
        deps = list(self.registry)
        # The transitions the run starts from: one during the run (a dependency that recovered
        # while another's check was still going) leaves this report stale at once. Counted at
        # the end, such a report said "down" for a whole cache_ttl after the recovery
        # (make chaos: /health/deep 2.16 s behind Redis's recovery).
        seen = transitions()
        results = await asyncio.gather(*(self._check(dep) for dep in deps))
        by_name = dict(zip((d.name for d in deps), results, strict=True))
        if any(not r.ok and d.critical for d, r in zip(deps, results, strict=True)):
            status = "down"
        elif any(not r.ok for r in results):
            status = "degraded"
        else:
            status = "ok"
        report = HealthReport(results=by_name, status=status, at=time.time())
        self._cached, self._cached_at = report, self._clock()
        self._cached_transitions = seen
        return report

    @staticmethod
    async def _check(dep: Dependency) -> CheckResult:
        if dep.is_down:
            return CheckResult(ok=False, latency=0.0, error=dep.last_error)
        return await dep.run_check(reason="health")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _details(registry: Registry, report: HealthReport) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dep in registry:
        result = report.results.get(dep.name)
        if result is None:
            continue
        out[dep.name] = {
            "status": "ok" if result.ok else "down",
            "severity": dep.severity.label,
            "critical": dep.critical,
            "latency_ms": round(result.latency * 1000, 2) if dep.check is not None else None,
            "since": _iso(dep.changed_at),
            "error": result.error,
            "impact": dep.impact or None,
            "runbook": dep.runbook,
        }
        out[dep.name]["trip"] = {"rule": dep.trip.describe(), **dep.trip_figures()}
        if not result.ok and dep.is_down and dep.last_error_chain:
            out[dep.name]["error_chain"] = dep.last_error_chain  # class names, never text
        if dep.flapping:
            out[dep.name]["flapping"] = True
            out[dep.name]["flaps"] = dep.flaps
            out[dep.name]["recovery_delay_s"] = round(dep.recovery_delay, 3)
        shed: dict[str, int] = {}
        for site in dep.sites:
            for reason, count in site.shed_calls.items():
                shed[reason] = shed.get(reason, 0) + count
        if shed:
            out[dep.name]["shed"] = shed
        unexpected = sum(site.unexpected_errors for site in dep.sites)
        if unexpected:
            out[dep.name]["unexpected_errors"] = unexpected
        hatches = registry.hatches_for(dep)
        if hatches:
            out[dep.name]["escape_hatches"] = [hatch.describe() for hatch in hatches]
    return out


def _json_mapping(found: object) -> dict[str, Any]:
    """``found`` as a dict, checked now: a value json cannot encode must not fail the whole body."""
    if not isinstance(found, Mapping):
        raise TypeError(type(found).__name__)
    value = dict(found)
    json.dumps(value)
    return value


#: Component names whose ``health_details()`` failure was logged (once each).
_warned: set[str] = set()


def _component_details(registry: Registry) -> dict[str, Any]:
    """What managed components with a ``health_details()`` method report, by name.

    The name is the component's ``name`` attribute when it is a non-empty
    ``str``, else its class name; a repeated name gets ``#2``, ``#3``... A
    method that raises or returns something that is not a JSON-able mapping is
    shown as ``{"error": "<class name>"}`` and logged once per name
    (``health.component_details_failed``): one component never breaks
    ``/health/deep``, nor floods the log at each call.
    """
    out: dict[str, Any] = {}
    for component in registry._all_components():
        report = getattr(component, "health_details", None)
        if not callable(report):
            continue
        name = getattr(component, "name", None)
        if not isinstance(name, str) or not name:
            name = type(component).__name__
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        try:
            value = _json_mapping(report())
        except Exception as exc:  # a component's bug is its own row, never a 500
            if key not in _warned and len(_warned) < 64:  # bounded: once per name
                _warned.add(key)
                logger.warning("health.component_details_failed", component=key, error=type(exc).__name__)
            value = {"error": type(exc).__name__}
        out[key] = value
    return out


_IETF_STATUS = {"ok": "pass", "degraded": "warn", "down": "fail"}


def _ietf_body(registry: Registry, report: HealthReport, details: bool) -> dict[str, Any]:
    checks: dict[str, list[dict[str, Any]]] = {}
    for dep in registry:
        result = report.results.get(dep.name)
        if result is None:
            continue
        entry: dict[str, Any] = {
            "componentId": dep.name,
            "status": "pass" if result.ok else ("fail" if dep.critical else "warn"),
            "time": _iso(report.at),
        }
        if details:
            entry["observedValue"] = round(result.latency * 1000, 2)
            entry["observedUnit"] = "ms"
            if result.error:
                entry["output"] = result.error
        checks[f"{dep.name}:connection"] = [entry]
    return {
        "status": _IETF_STATUS[report.status],
        "version": registry.version,
        "checks": checks,
    }


_HEALTH_JSON_BYTES = HEALTH_JSON.encode("latin-1")


def _accepts_health_json(raw_headers: Any) -> bool:
    # The first Accept header, as request.headers.get("accept") reads it, without
    # building a Headers object for one lookup (ASGI header names are lower-case).
    for key, value in raw_headers:
        if key == b"accept":
            return _HEALTH_JSON_BYTES in value
    return False


def _render(registry: Registry, report: HealthReport, *, ietf: bool, details: bool, uptime: int) -> bytes:
    body: dict[str, Any]
    if ietf:
        body = _ietf_body(registry, report, details)
    else:
        body = {
            "status": report.status,
            "checks": {name: ("ok" if r.ok else "down") for name, r in report.results.items()},
            "version": registry.version,
            "uptime_seconds": uptime,
        }
        if details:
            body["details"] = _details(registry, report)
            components = _component_details(registry)
            if components:
                body["components"] = components
    return json.dumps(body, separators=(",", ":")).encode()


def _check_prefix(prefix: str) -> None:
    if prefix.endswith("/"):
        raise ConfigurationError(f"prefix must not end with '/': {prefix!r}")
    if prefix and not prefix.startswith("/"):
        raise ConfigurationError(f"prefix must start with '/': {prefix!r}")


Endpoint = Callable[[Request], Awaitable[Response]]


def _endpoints(
    registry: Registry, *, details: bool | Authorize = False, cache_ttl: float = 1.0
) -> tuple[Endpoint, Endpoint]:
    """The ``/health`` and ``/health/deep`` endpoints (request -> response) that every router mounts.

    :func:`health_routes` mounts them as Starlette routes and
    :func:`degrade.health_router` as FastAPI routes: one behaviour, two shapes.

    Failure mode: as :func:`health_routes`.
    """
    deep = DeepHealth(registry, cache_ttl=cache_ttl)
    shallow_body = json.dumps({"status": "ok", "version": registry.version}, separators=(",", ":")).encode()
    no_store = {"Cache-Control": "no-store"}

    async def health(request: Request) -> Response:
        return Response(shallow_body, media_type="application/json", headers=no_store)

    async def may_see_details(request: Request) -> bool:
        if isinstance(details, bool):
            return details
        allowed = details(request)
        if inspect.isawaitable(allowed):
            allowed = await allowed
        return bool(allowed)

    # Bodies rendered from the current report, by (format, uptime second), so
    # a cached answer costs about what a bare route does (bench/bench_core.py).
    # Bodies with details are rendered each time: they read live dependency state.
    rendered: dict[tuple[bool, int], bytes] = {}
    rendered_from: list[HealthReport | None] = [None]

    async def health_deep(request: Request) -> Response:
        report = deep.fresh()
        if report is None:
            report = await deep.report()
        show = details if isinstance(details, bool) else await may_see_details(request)
        ietf = _accepts_health_json(request.scope["headers"])
        uptime = int(registry.uptime)
        if show:
            body = _render(registry, report, ietf=ietf, details=True, uptime=uptime)
        else:
            if rendered_from[0] is not report:
                rendered.clear()
                rendered_from[0] = report
            body_or_none = rendered.get((ietf, uptime))
            if body_or_none is None:
                if len(rendered) >= 4:  # bounded: bodies of past uptime seconds go
                    rendered.clear()
                body_or_none = rendered[(ietf, uptime)] = _render(
                    registry, report, ietf=ietf, details=False, uptime=uptime
                )
            body = body_or_none
        return Response(
            body,
            status_code=report.http_status,
            media_type=HEALTH_JSON if ietf else "application/json",
            headers=no_store,
        )

    return health, health_deep


def health_routes(
    registry: Registry,
    prefix: str = "",
    *,
    details: bool | Authorize = False,
    cache_ttl: float = 1.0,
) -> list[Route]:
    """``GET {prefix}/health`` and ``GET {prefix}/health/deep`` for a Starlette app.

    Args:
        registry: The app's dependencies.
        prefix: e.g. ``"/api/v1"``; no trailing slash.
        details: Add per-dependency details (severity, latency, since, error
            class, impact, runbook, escape hatches and whether they are open)
            to ``/health/deep``, and ``components``: what each managed
            component with a ``health_details()`` method reports (an
            :class:`~degrade.eventbus.OutboxRelay`'s backlog): ``True``, or a
            callable given the request that says whether this caller may see them.
            Raw exception text and credentials are never shown.
        cache_ttl: Seconds a deep result (failures too) is reused.

    ``Accept: application/health+json`` gets the IETF draft format
    (``pass``/``warn``/``fail``). With FastAPI, :func:`degrade.health_router`
    gives the same two routes as an ``APIRouter`` (``include_router``, OpenAPI).

    Failure mode: ``/health`` cannot fail on a dependency's account; ``/health/deep``
    answers within the largest ``check_timeout`` and never raises.
    """
    _check_prefix(prefix)
    health, health_deep = _endpoints(registry, details=details, cache_ttl=cache_ttl)
    return [
        Route(f"{prefix}/health", health, methods=["GET"], name="degrade_health"),
        Route(f"{prefix}/health/deep", health_deep, methods=["GET"], name="degrade_health_deep"),
    ]
