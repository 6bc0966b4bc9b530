"""The metric objects behind :mod:`degrade.observe`: Prometheus collectors and the OpenTelemetry state.

Every metric is defined in the registry (:mod:`degrade._metrics`); this module
holds the objects that report the foundation's metrics (dependency state,
transitions, per-site degraded and shed calls, abandoned work) from it.
Counting a degraded call stays one integer increment on the site: both
collectors read the counts at collection time. :mod:`degrade.observe`
re-exports what its callers use (``metrics``, the ``Dependency`` and ``Site``
protocols).
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from . import _bounded, _metrics, _otel

__all__ = ["Dependency", "Metrics", "Site", "metrics", "otel_state"]


class _Severity(Protocol):
    @property
    def value(self) -> int: ...
    @property
    def label(self) -> str: ...


class Dependency(Protocol):
    """What the signals read of a :class:`degrade.Dependency` (a protocol: no import cycle)."""

    _report_due: dict[str, float]
    _report_held: dict[str, int]
    _report_held_since: dict[str, float]

    @property
    def name(self) -> str: ...
    @property
    def impact(self) -> str: ...
    @property
    def last_error(self) -> str | None: ...
    @property
    def severity(self) -> _Severity: ...
    @property
    def state(self) -> str: ...
    @property
    def is_down(self) -> bool: ...
    @property
    def failures(self) -> int: ...
    @property
    def flaps(self) -> int: ...
    @property
    def recovery_delay(self) -> float: ...


class Site(_otel.SiteCounts, Protocol):
    """What the signals read of a :class:`degrade.Site`: its counts, and the shed log's rate limit."""

    _shed_log_due: float
    _shed_logged: int

    @property
    def shed_total(self) -> int: ...


class _Inc(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Metrics:
    """The Prometheus metrics (no-ops when prometheus_client is missing), and what OpenTelemetry reads.

    ``sites`` and ``up`` are what both collectors read at collection time:
    every site declared in this process (with when), and the last state
    (1 ok, 0 down) of each dependency name.
    """

    def __init__(self) -> None:
        self.enabled = _metrics._prometheus is not None
        # Strong references, as prometheus_client keeps its labelled children:
        # a series never vanishes (which a scraper would read as a counter reset).
        self.sites: list[tuple[Site, float]] = []
        self.up: dict[str, int] = {}
        if not self.enabled:
            return
        self.dependency_up = _metrics.prometheus_metric("degrade_dependency_up")
        self.transitions = _metrics.prometheus_metric("degrade_dependency_transitions_total")
        self.flaps = _metrics.prometheus_metric("degrade_dependency_flaps_total")
        # degrade_fallback_total / degrade_fail_loud_total are read from each
        # Site's own count at scrape time: counting a degraded call, on the hot
        # path of an outage, is then one integer increment instead of a locked
        # prometheus_client Counter.inc() (~0.5 us, as much as the rest of the
        # fallback path; see bench/RESULTS.md).
        self.site_totals = SiteTotals(self.sites)
        _metrics.register(self.site_totals)
        _metrics.register(AbandonedWork())

    def site_counter(self, site: Site) -> _Inc | None:
        """Report ``site``'s degraded calls in the metrics; returns nothing to bump per call.

        ``Site.count()`` bumps ``site.degraded_calls``; the per-site series of
        ``degrade_fallback_total`` (FAIL-SOFT) or ``degrade_fail_loud_total``
        read it when Prometheus scrapes, and OpenTelemetry's
        ``degrade.site.degraded_calls`` when its reader collects.
        """
        self.sites.append((site, time.time()))
        otel_state.ensure()
        return None

    def state(self, dep: Dependency) -> None:
        up = 0 if dep.is_down else 1
        self.up[dep.name] = up
        otel_state.ensure()
        if self.enabled:
            self.dependency_up.labels(dependency=dep.name).set(up)

    def transition(self, dep: Dependency) -> None:
        flapped = dep.is_down and bool(dep.flaps)
        bridge = otel_state.bridge
        if bridge is not None:
            bridge.transition(dep.name, dep.state, flapped)
        if self.enabled:
            self.transitions.labels(dependency=dep.name, to=dep.state).inc()
            if flapped:
                self.flaps.labels(dependency=dep.name).inc()
        self.state(dep)


class SiteTotals:
    """Prometheus collector of the per-site counters, read from ``Site.degraded_calls``."""

    def __init__(self, sites: list[tuple[Site, float]]) -> None:
        self._sites = sites  # Metrics.sites: every site declared, with when

    @staticmethod
    def _families() -> tuple[Any, Any, Any]:
        return (
            _metrics.family("degrade_fallback_total"),
            _metrics.family("degrade_fail_loud_total"),
            _metrics.family("degrade_shed_total"),
        )

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> list[Any]:
        # Sites that share labels (the same function decorated twice) add up,
        # as they shared one labelled Counter child before.
        totals: dict[tuple[bool, str, str], list[float]] = {}
        shed: dict[tuple[str, str, str], list[float]] = {}
        for site, created in list(self._sites):
            entry = totals.setdefault(
                (site.mode == "fail_soft", site.dependency_name, site.name), [0.0, created]
            )
            entry[0] += site.degraded_calls
            for reason, count in list(site.shed_calls.items()):
                shed.setdefault((site.dependency_name, site.name, reason), [0.0, created])[0] += count
        fallback, fail_loud, shed_family = self._families()
        for (soft, dependency, name), (value, created) in totals.items():
            family = fallback if soft else fail_loud
            family.add_metric([dependency, name], value, created=_metrics.created(created))
        for labels, (value, created) in shed.items():
            shed_family.add_metric(list(labels), value, created=_metrics.created(created))
        return [fallback, fail_loud, shed_family]


class AbandonedWork:
    """Prometheus collector of the work :func:`degrade._bounded.hard_timeout` abandoned at its bound."""

    def describe(self) -> list[Any]:
        return self.collect()

    def collect(self) -> list[Any]:
        return [
            _metrics.family("degrade_abandoned_in_flight", _bounded.abandoned_in_flight()),
            _metrics.family("degrade_abandoned_total", _bounded.Abandoned.total),
            _metrics.family("degrade_abandoned_refused_total", _bounded.Abandoned.refused),
        ]


metrics = Metrics()
otel_state = _otel.State(metrics)
