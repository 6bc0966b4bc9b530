"""Signals: every log line, Sentry event and metric that degrade emits.

Everything observable goes through this module, so its volume is easy to reason
about: one log line and (for SEV-1/SEV-2) one Sentry event per state transition,
never one per request while a dependency stays down. Per-call outcomes only move
counters.

The host owns Sentry, structlog and OpenTelemetry: degrade never calls
``sentry_sdk.init``, never sets global tags, never reconfigures logging and
never sets a meter provider. Sentry events are sent only when the host
initialised a client; Prometheus metrics exist only when ``prometheus_client``
is installed (extra ``prometheus``); the same metrics go to OpenTelemetry
instruments when ``opentelemetry-api`` is installed (extra ``otel``), through
the global meter provider, which is a no-op until the host configures one (see
:func:`use_opentelemetry`). Both can be on together; each costs nothing when its
package is absent, and neither adds work per call: per-site counts are plain
integers read at collection time.

Every metric name is a row of one registry, :mod:`degrade._metrics` (name,
type, labels, help; ``docs/operations.md`` lists them); the objects that
report them live in :mod:`degrade._signals` and are re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import structlog

from . import _bounded, _metrics, _otel
from ._classify import error_chain
from ._extras import optional, require
from ._signals import AbandonedWork as _AbandonedWork
from ._signals import Dependency, Site, _Inc, _Severity, metrics
from ._signals import Metrics as _Metrics
from ._signals import SiteTotals as _SiteTotals
from ._signals import otel_state as _otel_state

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider

__all__ = [
    "logger",
    "metrics",
    "otel_counter",
    "otel_observable",
    "report_to_sentry",
    "security_event",
    "use_opentelemetry",
]

logger = structlog.get_logger("degrade")

_sentry: Any = optional("sentry_sdk")
_prometheus: Any = _metrics._prometheus
# Re-exported for code that read them here before the split (0.x): the
# protocols and collectors live in degrade._signals, the metric table in degrade._metrics.
_REEXPORTED = (Dependency, Site, _AbandonedWork, _Metrics, _SiteTotals, _Inc, _Severity)


def use_opentelemetry(meter_provider: MeterProvider | None = None, *, enabled: bool = True) -> bool:
    """Send degrade's metrics to OpenTelemetry through ``meter_provider``, or stop (``enabled=False``).

    Not needed in most apps: when ``opentelemetry-api`` is installed (extra
    ``otel``), degrade creates its instruments at its first signal (the first
    dependency) on the *global* meter provider, which does nothing until the
    host calls ``opentelemetry.metrics.set_meter_provider()`` and then forwards
    to it. Call this to use another provider (a test's ``MeterProvider`` with an
    in-memory reader), or with ``enabled=False`` to keep the metrics out of
    OpenTelemetry (when OpenTelemetry's Prometheus exporter shares the
    ``prometheus_client`` registry with degrade's own metrics, say).

    Instruments are created on the new provider's meter
    (``get_meter("degrade", degrade.__version__)``): per-site and abandoned
    counts are observable (read at collection, so they start from the process's
    totals); transitions and flaps count from then on. The previous provider's
    instruments stop reporting. Counters from :func:`otel_counter` follow.

    Failure mode: raises :class:`~degrade.MissingExtraError` when
    ``opentelemetry-api`` is not installed (and ``enabled`` is true); never
    touches the global meter provider. An exception raised while the host's
    reader collects is caught and logged by OpenTelemetry's SDK, not raised here.

    Args:
        meter_provider: The provider to report through; None for the global one.
        enabled: False to stop reporting to OpenTelemetry.

    Returns:
        True while degrade reports to OpenTelemetry.
    """
    if not enabled:
        _otel_state.off()
        return False
    api = require("opentelemetry.metrics", "otel", feature="OpenTelemetry metrics")
    _otel_state.bind(api, meter_provider)
    return True


def otel_counter(name: str, description: str, unit: str = "1") -> _otel.Counter:
    """An OpenTelemetry counter for a safety net's own signal; a no-op without OpenTelemetry.

    For a count that changes on its own events (a limiter decision by source,
    say): ``counter.add(1, {"degrade.ratelimit.source": "memory"})``. The
    instrument is created on degrade's meter and moves with
    :func:`use_opentelemetry`. For counts already kept as plain integers,
    prefer :func:`otel_observable`: nothing added per call.

    Failure mode: none; while OpenTelemetry is absent or off, ``add()`` is an
    attribute read and a comparison.

    Args:
        name: Instrument name, OpenTelemetry style (``"degrade.ratelimit.decisions"``).
        description: What it counts.
        unit: UCUM unit, e.g. ``"{decision}"``.
    """
    return _otel_state.counter(name, description, unit)


def otel_observable(
    name: str,
    description: str,
    callback: Callable[[], Iterable[tuple[float, Mapping[str, str]]]],
    *,
    unit: str = "1",
    kind: Literal["counter", "up_down_counter", "gauge"] = "counter",
) -> None:
    """Report ``callback()``'s (value, attributes) pairs as an observable instrument at each collection.

    For counts a safety net keeps as plain integers (a publisher's events by
    outcome): no work per call, as for the per-site counts. ``kind`` picks an
    observable counter (monotonic totals), up-down counter or gauge. Registered
    for the current meter and every later one (:func:`use_opentelemetry`).

    Failure mode: none here; an exception raised by ``callback`` is caught and
    logged by OpenTelemetry's SDK at collection (that instrument reports
    nothing that time).

    Args:
        name: Instrument name, OpenTelemetry style (``"degrade.eventbus.events"``).
        description: What it reports.
        callback: Returns (value, attributes) pairs; called at collection time.
        unit: UCUM unit, e.g. ``"{event}"``.
        kind: ``"counter"``, ``"up_down_counter"`` or ``"gauge"``.
    """
    _otel_state.observable(_otel.Observable(name, description, unit, kind, callback))


#: Seconds between two ``degrade.abandoned_cap`` warnings.
ABANDON_LOG_INTERVAL = 10.0
_abandon_log_due = 0.0


def may_abandon(where: str) -> bool:
    """True while another call may be abandoned at its bound; else the refusal is counted and reported.

    At the cap (:data:`degrade._bounded.MAX_ABANDONED` abandoned calls still
    unwinding) the caller answers degraded without an attempt. Each refusal is
    counted (``degrade_abandoned_refused_total``); a ``degrade.abandoned_cap``
    warning with the running totals is logged at most once per
    :data:`ABANDON_LOG_INTERVAL`.
    """
    if _bounded.can_abandon():
        return True
    global _abandon_log_due  # noqa: PLW0603 - one process-wide rate limit for this log line
    _bounded.Abandoned.refused += 1
    now = time.monotonic()
    if now >= _abandon_log_due:
        _abandon_log_due = now + ABANDON_LOG_INTERVAL
        logger.warning(
            "degrade.abandoned_cap",
            where=where,
            in_flight=_bounded.abandoned_in_flight(),
            cap=_bounded.MAX_ABANDONED,
            refused_total=_bounded.Abandoned.refused,
        )
    return False


#: Seconds between two ``degrade.shed`` warnings of one site.
SHED_LOG_INTERVAL = 10.0


def shed_reported(site: Site, reason: str) -> None:
    """Log a site's shedding at most once per :data:`SHED_LOG_INTERVAL` (called by ``Site.shed``).

    Shedding is saturation, not an outage: a warning with the counts since the
    last line, no Sentry event, no metric of the dependency's state.
    """
    now = time.monotonic()
    if now < site._shed_log_due:
        return
    site._shed_log_due = now + SHED_LOG_INTERVAL
    total = site.shed_total
    logger.warning(
        "degrade.shed",
        dependency=site.dependency_name,
        site=site.name,
        reason=reason,
        shed=total - site._shed_logged,
        shed_total=total,
        by_reason=dict(site.shed_calls),
    )
    site._shed_logged = total


def sentry_active() -> bool:
    """True when the host initialised a Sentry client."""
    return _sentry is not None and bool(_sentry.get_client().is_active())


def report_to_sentry(
    message: str,
    *,
    level: str,
    tags: Mapping[str, str],
    fingerprint: list[str],
    extras: Mapping[str, Any] | None = None,
) -> None:
    """Send one Sentry event with per-capture tags, if the host initialised Sentry.

    Tags and fingerprint are passed to this capture only (never set on a shared
    scope), so they cannot leak into the host's own events.
    """
    if not sentry_active():
        return
    _sentry.capture_message(
        message,
        level=level,
        tags=dict(tags),
        fingerprint=fingerprint,
        extras=dict(extras or {}),
    )


def security_event(
    event: str,
    *,
    kind: str,
    dependency: str,
    transition: str,
    message: str,
    fingerprint: list[str],
    sentry_level: str = "warning",
    extras: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    log_level: Literal["warning", "info"] = "warning",
    **fields: Any,
) -> None:
    """A security-relevant transition (a fail-open policy or an escape hatch): one log line, one Sentry event.

    The log line (a warning unless ``log_level="info"``) carries ``dependency``,
    ``security=kind`` and ``transition`` plus ``fields``; the Sentry event is
    tagged ``degrade.security``, ``degrade.dependency`` and
    ``degrade.transition``, plus ``tags``. Neither raises.
    """
    log = logger.info if log_level == "info" else logger.warning
    log(event, dependency=dependency, security=kind, transition=transition, **fields)
    report_to_sentry(
        message,
        level=sentry_level,
        tags={
            "degrade.security": kind,
            "degrade.dependency": dependency,
            "degrade.transition": transition,
            **(tags or {}),
        },
        fingerprint=fingerprint,
        extras=extras,
    )


#: Seconds between two Sentry events of one transition kind (down, recovered) of one dependency.
TRANSITION_REPORT_INTERVAL = 60.0


def _flapping_fields(dep: Dependency) -> dict[str, Any]:
    if not dep.flaps:
        return {}
    return {"flapping": True, "flaps": dep.flaps, "recovery_delay_s": round(dep.recovery_delay, 3)}


def _report_allowed(dep: Dependency, kind: str) -> tuple[bool, dict[str, Any]]:
    """At most one Sentry event per transition kind per interval; what was held back is summarised."""
    now = time.monotonic()
    if now < dep._report_due.get(kind, 0.0):
        dep._report_held[kind] = dep._report_held.get(kind, 0) + 1
        dep._report_held_since.setdefault(kind, now)
        return False, {}
    dep._report_due[kind] = now + TRANSITION_REPORT_INTERVAL
    held = dep._report_held.pop(kind, 0)
    since = dep._report_held_since.pop(kind, now)
    if not held:
        return True, {}
    return True, {"held_back": held, "held_back_over_s": round(now - since, 1)}


def _held_back(summary: dict[str, Any], what: str) -> str:
    if not summary:
        return ""
    return f" (flapping: {summary['held_back']} more {what} in {summary['held_back_over_s']} s)"


def dependency_down(dep: Dependency, error: BaseException | None, reason: str) -> None:
    """One dependency went from ok to down."""
    error_class = type(error).__name__ if error is not None else None
    chain = error_chain(error)
    logger.warning(
        "dependency.down",
        dependency=dep.name,
        severity=dep.severity.label,
        error=error_class,
        **({"error_chain": chain} if chain else {}),
        reason=reason,
        failures=dep.failures,
        impact=dep.impact or None,
        **_flapping_fields(dep),
    )
    metrics.transition(dep)
    if dep.severity.value <= 2:
        allowed, summary = _report_allowed(dep, "down")
        if not allowed:
            return
        flapping = bool(summary) or bool(dep.flaps)
        report_to_sentry(
            f"degrade: dependency {dep.name} is down"
            + (
                f" (flapping: {summary['held_back']} more outages in {summary['held_back_over_s']} s)"
                if summary
                else ""
            ),
            level="error" if dep.severity.value == 1 else "warning",
            tags={
                "degrade.dependency": dep.name,
                "degrade.severity": dep.severity.label,
                "degrade.transition": "down",
                **({"degrade.flapping": "true"} if flapping else {}),
            },
            fingerprint=["degrade", "dependency", dep.name, "down"],
            extras={
                "error_class": error_class,
                "reason": reason,
                "impact": dep.impact,
                **_flapping_fields(dep),
                **summary,
            },
        )


def dependency_recovered(dep: Dependency, down_for: float) -> None:
    """One dependency went from down back to ok."""
    logger.info(
        "dependency.recovered",
        dependency=dep.name,
        severity=dep.severity.label,
        duration_s=round(down_for, 3),
        error=dep.last_error,
        **_flapping_fields(dep),
    )
    metrics.transition(dep)
    if dep.severity.value <= 2:
        allowed, summary = _report_allowed(dep, "recovered")
        if not allowed:
            return
        report_to_sentry(
            f"degrade: dependency {dep.name} recovered"
            + (
                f" (flapping: {summary['held_back']} more recoveries in {summary['held_back_over_s']} s)"
                if summary
                else ""
            ),
            level="info",
            tags={
                "degrade.dependency": dep.name,
                "degrade.severity": dep.severity.label,
                "degrade.transition": "recovered",
                **({"degrade.flapping": "true"} if summary or dep.flaps else {}),
            },
            fingerprint=["degrade", "dependency", dep.name, "recovered"],
            extras={
                "down_for_s": round(down_for, 3),
                "error_class": dep.last_error,
                **_flapping_fields(dep),
                **summary,
            },
        )
