"""The registry of every metric degrade exports: one table of names, types, labels and help texts.

Each Prometheus metric and each OpenTelemetry instrument of the library is
defined here, once; the modules that count (:mod:`degrade.observe`'s
collectors, the rate limiter, the event publisher, the OpenTelemetry bridge)
take their metric objects and families from this table instead of spelling the
names themselves. ``docs/operations.md`` lists the same rows (a unit test keeps
them in step); dashboards and alert rules depend on the names, so a row is
never renamed.

The table is plain data: ``prometheus_client`` (extra ``prometheus``) is
looked up with :func:`degrade._extras.optional` (absent: every helper returns
None or False), and OpenTelemetry is never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ._extras import optional

__all__ = [
    "INSTRUMENTS",
    "METRICS",
    "Instrument",
    "Metric",
    "created",
    "family",
    "instrument",
    "metric",
    "prometheus_metric",
    "register",
]

_prometheus: Any = optional("prometheus_client")


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric: its exposed name (``_total`` included for counters), type, labels, help."""

    name: str
    type: Literal["counter", "gauge"]
    labels: tuple[str, ...]
    help: str


@dataclass(frozen=True)
class Instrument:
    """One OpenTelemetry instrument on degrade's meter: name, kind, unit, attributes, description.

    ``kind`` is the instrument's value kind and ``observable`` whether it is
    read at collection time (a callback) rather than added to as events happen.
    """

    name: str
    kind: Literal["counter", "up_down_counter", "gauge"]
    observable: bool
    unit: str
    attributes: tuple[str, ...]
    description: str


_DEP = ("dependency",)
_SITE = ("dependency", "site")

#: Every Prometheus metric of the library, in the order of ``docs/operations.md``.
PROMETHEUS: tuple[Metric, ...] = (
    Metric(
        "degrade_dependency_up",
        "gauge",
        _DEP,
        "1 while the dependency is ok, 0 while degrade treats it as down.",
    ),
    Metric(
        "degrade_dependency_transitions_total",
        "counter",
        ("dependency", "to"),
        "State transitions of a dependency, by target state.",
    ),
    Metric(
        "degrade_dependency_flaps_total",
        "counter",
        _DEP,
        "Quick relapses: a dependency down again within its flap window after recovering.",
    ),
    Metric(
        "degrade_shed_total",
        "counter",
        ("dependency", "site", "reason"),
        "Calls shed for lack of local capacity (saturation, not an outage), by reason.",
    ),
    Metric("degrade_fallback_total", "counter", _SITE, "Calls of a FAIL-SOFT site answered by its fallback."),
    Metric(
        "degrade_fail_loud_total",
        "counter",
        _SITE,
        "Calls of a FAIL-LOUD site that raised DependencyUnavailable.",
    ),
    Metric(
        "degrade_eventbus_events_total",
        "counter",
        ("exchange", "outcome"),
        "Events by outcome: queued, confirmed, spooled, replayed (confirmed from the spool), resent.",
    ),
    Metric(
        "degrade_eventbus_dropped_total",
        "counter",
        ("exchange", "reason"),
        "Events lost, by reason (degraded, buffer_full, shutdown, spool_full, unroutable, nacked, ...).",
    ),
    Metric(
        "degrade_eventbus_degraded",
        "gauge",
        ("exchange",),
        "1 while a publisher of this exchange is in degraded mode (drops or spools every event).",
    ),
    Metric(
        "degrade_outbox_events_total",
        "counter",
        ("table", "outcome"),
        "Outbox rows relayed, by outcome: published, dropped (unroutable, unencodable), retried (nacked).",
    ),
    Metric(
        "degrade_outbox_backlog",
        "gauge",
        ("table",),
        "Rows waiting in an outbox table at the relay's last count (capped at its backlog_cap).",
    ),
    Metric(
        "degrade_outbox_oldest_seconds",
        "gauge",
        ("table",),
        "Age of the oldest row waiting in an outbox table at the relay's last count (0: none).",
    ),
    Metric(
        "degrade_ratelimit_overflow_total",
        "counter",
        (),
        "Rate-limit decisions shed (answered from memory, not a failure) because too many waited for Redis.",
    ),
    Metric(
        "degrade_ratelimit_errors_total",
        "counter",
        ("error",),
        "Unexpected (non-outage) errors of the Redis rate limiter, by exception class.",
    ),
    Metric(
        "degrade_ratelimit_evictions_total",
        "counter",
        (),
        "Keys of the in-memory rate limiter evicted while still active (store full).",
    ),
    Metric(
        "degrade_abandoned_in_flight",
        "gauge",
        (),
        "Calls abandoned at a hard time bound whose clean-up is still unwinding.",
    ),
    Metric(
        "degrade_abandoned_total",
        "counter",
        (),
        "Calls abandoned at a hard time bound (cancelled, left to unwind in the background).",
    ),
    Metric(
        "degrade_abandoned_refused_total",
        "counter",
        (),
        "Calls answered degraded without an attempt because too many abandoned calls were unwinding.",
    ),
)

_D, _S = "degrade.dependency", "degrade.site"
_EX = "degrade.eventbus.exchange"

#: Every OpenTelemetry instrument of the library (meter ``degrade``), as in ``docs/operations.md``.
OPENTELEMETRY: tuple[Instrument, ...] = (
    Instrument(
        "degrade.dependency.up",
        "gauge",
        True,
        "1",
        (_D,),
        "1 while the dependency is ok, 0 while degrade treats it as down.",
    ),
    Instrument(
        "degrade.dependency.transitions",
        "counter",
        False,
        "{transition}",
        (_D, "degrade.dependency.state"),
        "State transitions of a dependency, by target state.",
    ),
    Instrument(
        "degrade.dependency.flaps",
        "counter",
        False,
        "{flap}",
        (_D,),
        "Quick relapses: a dependency down again within its flap window after recovering.",
    ),
    Instrument(
        "degrade.site.degraded_calls",
        "counter",
        True,
        "{call}",
        (_D, _S, "degrade.site.mode"),
        "Calls of a site answered degraded: by its fallback (fail_soft) "
        "or with DependencyUnavailable (fail_loud).",
    ),
    Instrument(
        "degrade.site.shed",
        "counter",
        True,
        "{call}",
        (_D, _S, "degrade.shed.reason"),
        "Calls shed for lack of local capacity (saturation, not an outage), by reason.",
    ),
    Instrument(
        "degrade.abandoned.in_flight",
        "up_down_counter",
        True,
        "{call}",
        (),
        "Calls abandoned at a hard time bound whose clean-up is still unwinding.",
    ),
    Instrument(
        "degrade.abandoned.calls",
        "counter",
        True,
        "{call}",
        (),
        "Calls abandoned at a hard time bound (cancelled, left to unwind in the background).",
    ),
    Instrument(
        "degrade.abandoned.refused",
        "counter",
        True,
        "{call}",
        (),
        "Calls answered degraded without an attempt because too many abandoned calls were unwinding.",
    ),
    Instrument(
        "degrade.ratelimit.decisions",
        "counter",
        True,
        "{decision}",
        ("degrade.ratelimit.prefix", "degrade.ratelimit.source"),
        "Rate-limit decisions by where they were made: redis, fallback (outage policy), shed.",
    ),
    Instrument(
        "degrade.eventbus.events",
        "counter",
        True,
        "{event}",
        (_EX, "degrade.eventbus.outcome"),
        "Events by outcome: queued, confirmed, spooled, replayed, resent.",
    ),
    Instrument(
        "degrade.eventbus.dropped",
        "counter",
        True,
        "{event}",
        (_EX, "degrade.eventbus.reason"),
        "Events lost, by reason (degraded, buffer_full, shutdown, spool_full, unroutable, ...).",
    ),
    Instrument(
        "degrade.eventbus.degraded",
        "gauge",
        True,
        "1",
        (_EX,),
        "1 while a publisher of this exchange is in degraded mode.",
    ),
)


def _index(rows: tuple[Any, ...]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for row in rows:
        if row.name in table:  # pragma: no cover - a typo in the table above
            raise ValueError(f"metric {row.name!r} is defined twice")
        table[row.name] = row
    return table


#: Prometheus metrics by exposed name.
METRICS: Mapping[str, Metric] = _index(PROMETHEUS)
#: OpenTelemetry instruments by name.
INSTRUMENTS: Mapping[str, Instrument] = _index(OPENTELEMETRY)


def metric(name: str) -> Metric:
    """The registry's row of the Prometheus metric ``name`` (KeyError when it is not registered)."""
    return METRICS[name]


def instrument(name: str) -> Instrument:
    """The registry's row of the OpenTelemetry instrument ``name`` (KeyError when it is not registered)."""
    return INSTRUMENTS[name]


def prometheus_metric(name: str) -> Any:
    """A ``prometheus_client`` Counter or Gauge for the registered ``name``; None without the package.

    Registered in ``prometheus_client``'s default registry, as any metric made
    with its constructors: call once per process per name.
    """
    if _prometheus is None:
        return None
    row = METRICS[name]
    make = _prometheus.Counter if row.type == "counter" else _prometheus.Gauge
    return make(row.name, row.help, list(row.labels))


def family(name: str, value: float | None = None) -> Any:
    """A fresh metric family of the registered ``name``, for a collector (prometheus_client required).

    A labelled metric gets its labels (add samples with ``add_metric``); an
    unlabelled one its single ``value``.
    """
    row = METRICS[name]
    core = _prometheus.metrics_core
    make = core.CounterMetricFamily if row.type == "counter" else core.GaugeMetricFamily
    if row.labels:
        return make(row.name, row.help, labels=list(row.labels))
    return make(row.name, row.help, value=value)


def created(timestamp: float) -> float | None:
    """``timestamp`` for a sample's ``created``, or None while prometheus_client leaves ``_created`` out."""
    return timestamp if getattr(_prometheus.metrics, "_use_created", True) else None


def register(collector: Any) -> bool:
    """Register ``collector`` in ``prometheus_client``'s default registry; False without the package."""
    if _prometheus is None:
        return False
    _prometheus.REGISTRY.register(collector)
    return True
