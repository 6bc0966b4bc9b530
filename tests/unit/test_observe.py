"""Signals: one log line and one Sentry event per transition, metrics that move."""

from __future__ import annotations

import collections
import importlib
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from degrade import (
    Dependency,
    DependencyUnavailable,
    Registry,
    Severity,
    _metrics,
    fail_loud,
    fail_soft,
    observe,
    site_of,
)
from degrade.observe import report_to_sentry, sentry_active

from ..support import CapturingTransport, FakeClock, eventually

PASSWORD = "hunter2-s3cret"
DSN = f"redis://:{PASSWORD}@cache.internal:6379/0"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(500.0)


@pytest.fixture
def name() -> str:
    """A dependency name unique to this test, so process-wide metrics do not mix."""
    return f"dep_{uuid.uuid4().hex[:10]}"


def dependency(name: str, clock: FakeClock, severity: Severity = Severity.SEV1, **options: Any) -> Dependency:
    """A check-less dependency on a frozen clock (no probe, no trial call)."""
    return Registry(clock=clock).dependency(name, severity=severity, failure_threshold=1, **options)


def sample(metric: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(metric, labels) or 0.0


class TestLogs:
    def test_one_event_per_transition(self, name: str, clock: FakeClock) -> None:
        """Down then recovered logs exactly two events, with name, severity, duration and error class."""
        dep = dependency(name, clock, impact="logins fail")
        with capture_logs() as logs:
            dep.record_failure(ConnectionRefusedError(DSN))
            clock.now += 12.5
            dep.record_success()
        down, recovered = logs
        assert down == {
            "event": "dependency.down",
            "log_level": "warning",
            "dependency": name,
            "severity": "SEV-1",
            "error": "ConnectionRefusedError",
            "reason": "traffic",
            "failures": 1,
            "impact": "logins fail",
        }
        assert recovered == {
            "event": "dependency.recovered",
            "log_level": "info",
            "dependency": name,
            "severity": "SEV-1",
            "duration_s": 12.5,
            "error": "ConnectionRefusedError",
        }
        assert PASSWORD not in repr(logs)

    async def test_nothing_per_request_while_down(self, name: str, clock: FakeClock) -> None:
        """Hundreds of calls while down add no log line."""
        dep = dependency(name, clock)

        @fail_soft(dep, fallback=None, reason="cache miss")
        async def soft() -> None:
            raise OSError(DSN)

        @fail_loud(dep, reason="logins fail")
        def loud() -> None: ...

        with capture_logs() as logs:
            await soft()
            for _ in range(300):
                await soft()
                with pytest.raises(DependencyUnavailable):
                    loud()
        assert [e["event"] for e in logs] == ["dependency.down"]

    def test_failures_while_down_log_nothing(self, name: str, clock: FakeClock) -> None:
        """Failures seen while already down (trial calls, checks) log nothing."""
        dep = dependency(name, clock)
        with capture_logs() as logs:
            for _ in range(50):
                dep.record_failure(OSError())
            dep.mark_down()
        assert [e["event"] for e in logs] == ["dependency.down"]

    async def test_probe_rounds_log_nothing(self, name: str) -> None:
        """A probe failing round after round logs nothing; its success logs one recovery."""
        healthy = False
        rounds = 0

        async def check() -> None:
            nonlocal rounds
            rounds += 1
            if not healthy:
                raise ConnectionRefusedError(DSN)

        registry = Registry()
        dep = registry.dependency(
            name, severity=Severity.SEV2, check=check, failure_threshold=1, recovery_interval=0.005
        )
        try:
            with capture_logs() as logs:
                dep.record_failure(OSError())
                await eventually(lambda: rounds >= 5)
                healthy = True
                await eventually(lambda: not dep.is_down)
        finally:
            await registry.aclose()
        assert [e["event"] for e in logs] == ["dependency.down", "dependency.recovered"]

    def test_flapping_logs_each_transition(self, name: str, clock: FakeClock) -> None:
        """Each real transition is logged: down, up, down."""
        dep = dependency(name, clock)
        with capture_logs() as logs:
            dep.record_failure()
            dep.record_success()
            dep.record_failure()
        assert [e["event"] for e in logs] == ["dependency.down", "dependency.recovered", "dependency.down"]


class TestSentry:
    @pytest.mark.parametrize(("severity", "level"), [(Severity.SEV1, "error"), (Severity.SEV2, "warning")])
    def test_one_event_per_transition(
        self, sentry: CapturingTransport, name: str, clock: FakeClock, severity: Severity, level: str
    ) -> None:
        """SEV1/SEV2 send one event going down and one recovering, with per-capture tags."""
        dep = dependency(name, clock, severity=severity)
        dep.record_failure(ConnectionRefusedError(DSN))
        for _ in range(10):
            dep.record_failure(OSError())
        clock.now += 3.0
        dep.record_success()
        down, recovered = sentry.events
        assert down["message"] == f"degrade: dependency {name} is down"
        assert down["level"] == level
        assert down["tags"] == {
            "degrade.dependency": name,
            "degrade.severity": severity.label,
            "degrade.transition": "down",
        }
        assert down["fingerprint"] == ["degrade", "dependency", name, "down"]
        assert down["extra"]["error_class"] == "ConnectionRefusedError"
        assert recovered["message"] == f"degrade: dependency {name} recovered"
        assert recovered["level"] == "info"
        assert recovered["tags"]["degrade.transition"] == "recovered"
        assert recovered["fingerprint"] == ["degrade", "dependency", name, "recovered"]
        assert recovered["extra"]["down_for_s"] == 3.0

    def test_fingerprint_is_stable_across_outages(
        self, sentry: CapturingTransport, name: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two outages with different errors group under the same fingerprint."""
        monkeypatch.setattr(observe, "TRANSITION_REPORT_INTERVAL", 0.0)  # two reports in a row allowed
        dep = dependency(name, clock)
        dep.record_failure(ConnectionRefusedError())
        clock.advance(0.5)  # recovered by a probe, not by a call in flight
        dep.record_success()
        dep.record_failure(TimeoutError())
        downs = [e for e in sentry.events if e["tags"]["degrade.transition"] == "down"]
        assert len(downs) == 2
        assert downs[0]["fingerprint"] == downs[1]["fingerprint"]

    def test_sev3_sends_nothing(self, sentry: CapturingTransport, name: str, clock: FakeClock) -> None:
        """SEV3 transitions are logged but not sent to Sentry."""
        dep = dependency(name, clock, severity=Severity.SEV3)
        dep.record_failure()
        dep.record_success()
        assert sentry.envelopes == []

    def test_no_global_tags(self, sentry: CapturingTransport, name: str, clock: FakeClock) -> None:
        """Tags go with degrade's own events only: the host's next event carries none of them."""
        dependency(name, clock).record_failure()
        sentry_sdk.capture_message("host event")
        ours, host = sentry.events
        assert "degrade.dependency" in ours["tags"]
        assert not any(key.startswith("degrade.") for key in host.get("tags", {}))
        assert "fingerprint" not in host or host["fingerprint"] != ours["fingerprint"]

    def test_no_secret_in_any_envelope(self, sentry: CapturingTransport, name: str, clock: FakeClock) -> None:
        """An error holding a DSN never reaches Sentry: only its class name does."""
        dep = dependency(name, clock, impact="sessions lost")
        dep.record_failure(ConnectionRefusedError(DSN))
        dep.record_success()
        assert len(sentry.envelopes) == 2
        for envelope in sentry.envelopes:
            assert PASSWORD.encode() not in envelope.serialize()

    def test_nothing_without_a_host_client(self, name: str, clock: FakeClock) -> None:
        """Without sentry_sdk.init by the host, transitions send nothing and raise nothing."""
        assert not sentry_active()
        dep = dependency(name, clock)
        dep.record_failure()
        dep.record_success()
        report_to_sentry("x", level="error", tags={}, fingerprint=["x"])
        assert dep.state == "ok"


class TestMetrics:
    def test_dependency_up_follows_the_state(self, name: str, clock: FakeClock) -> None:
        """degrade_dependency_up is 1 while ok and 0 while down."""
        dep = dependency(name, clock)
        assert REGISTRY.get_sample_value("degrade_dependency_up", {"dependency": name}) == 1.0
        dep.record_failure()
        assert REGISTRY.get_sample_value("degrade_dependency_up", {"dependency": name}) == 0.0
        dep.record_success()
        assert REGISTRY.get_sample_value("degrade_dependency_up", {"dependency": name}) == 1.0

    def test_transitions_are_counted(self, name: str, clock: FakeClock) -> None:
        """degrade_dependency_transitions_total counts each transition by target state."""
        dep = dependency(name, clock)
        dep.record_failure()
        dep.record_failure()
        dep.record_success()
        dep.record_failure()
        total = "degrade_dependency_transitions_total"
        assert sample(total, dependency=name, to="down") == 2
        assert sample(total, dependency=name, to="ok") == 1

    async def test_fallbacks_are_counted_per_site(self, name: str, clock: FakeClock) -> None:
        """degrade_fallback_total moves once per fallback, not on success or on a bug."""
        dep = Registry(clock=clock).dependency(name, severity=Severity.SEV2, failure_threshold=2)
        outcome: BaseException | None = None

        @fail_soft(dep, fallback=None, reason="cache miss")
        async def get() -> str:
            if outcome is not None:
                raise outcome
            return "ok"

        labels = {"dependency": name, "site": site_of(get).name}
        before = sample("degrade_fallback_total", **labels)
        await get()
        outcome = KeyError("bug")
        with pytest.raises(KeyError):
            await get()
        assert sample("degrade_fallback_total", **labels) == before
        outcome = OSError()
        await get()
        await get()  # opens it
        await get()  # answered while down, not called
        assert sample("degrade_fallback_total", **labels) - before == 3
        assert site_of(get).degraded_calls == 3

    def test_fail_loud_refusals_are_counted_per_site(self, name: str, clock: FakeClock) -> None:
        """degrade_fail_loud_total moves once per DependencyUnavailable raised."""
        dep = dependency(name, clock)

        @fail_loud(dep, reason="logins fail")
        def login() -> None:
            raise ConnectionResetError

        @fail_loud(dep, reason="refresh fails")
        def refresh() -> None: ...

        login_labels = {"dependency": name, "site": site_of(login).name}
        refresh_labels = {"dependency": name, "site": site_of(refresh).name}
        before = sample("degrade_fail_loud_total", **login_labels)
        for call in (login, refresh, refresh):
            with pytest.raises(DependencyUnavailable):
                call()
        assert sample("degrade_fail_loud_total", **login_labels) - before == 1
        assert sample("degrade_fail_loud_total", **refresh_labels) == 2
        assert sample("degrade_fallback_total", **login_labels) == 0


class TestFlapping:
    def test_sentry_bounded_per_transition_kind(
        self, sentry: CapturingTransport, name: str, clock: FakeClock
    ) -> None:
        """Ten quick outages: one down and one recovered event; every transition is still logged."""
        dep = dependency(name, clock)
        with capture_logs() as logs:
            for _ in range(10):
                dep.record_failure(ConnectionRefusedError())
                clock.advance(0.5)  # recovered by a probe, not by a call in flight
                dep.record_success()
                clock.advance(0.1)
        kinds = [e["tags"]["degrade.transition"] for e in sentry.events]
        assert kinds == ["down", "recovered"]
        downs = [e for e in logs if e["event"] == "dependency.down"]
        assert len(downs) == 10
        assert "flapping" not in downs[0]
        assert downs[-1]["flapping"] is True
        assert downs[-1]["flaps"] == 9

    def test_held_back_reports_are_summarised_in_the_next_event(
        self, sentry: CapturingTransport, name: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The next allowed event says how many transitions were held back, tagged degrade.flapping."""
        dep = dependency(name, clock)
        for _ in range(3):
            dep.record_failure(ConnectionRefusedError())
            clock.advance(0.5)  # recovered by a probe, not by a call in flight
            dep.record_success()
        monkeypatch.setattr(observe, "TRANSITION_REPORT_INTERVAL", 0.0)
        for kind in ("down", "recovered"):
            dep._report_due[kind] = 0.0
        dep.record_failure(ConnectionRefusedError())
        last = sentry.events[-1]
        assert last["tags"]["degrade.flapping"] == "true"
        assert "2 more outages" in last["message"]
        assert last["extra"]["held_back"] == 2

    def test_flaps_metric(self, name: str, clock: FakeClock) -> None:
        """degrade_dependency_flaps_total counts quick relapses only."""
        prometheus_client = pytest.importorskip("prometheus_client")
        dep = dependency(name, clock)
        dep.record_failure(ConnectionRefusedError())
        clock.advance(0.5)  # recovered by a probe, not by a call in flight
        dep.record_success()
        dep.record_failure(ConnectionRefusedError())
        sample = prometheus_client.REGISTRY.get_sample_value(
            "degrade_dependency_flaps_total", {"dependency": name}
        )
        assert sample == 1.0


ROOT = Path(__file__).resolve().parents[2]

#: Every Prometheus metric degrade exports: name -> (type, labels). Dashboards and alerts
#: depend on these; a change here is a breaking change.
PROMETHEUS_METRICS = {
    "degrade_dependency_up": ("gauge", ("dependency",)),
    "degrade_dependency_transitions_total": ("counter", ("dependency", "to")),
    "degrade_dependency_flaps_total": ("counter", ("dependency",)),
    "degrade_shed_total": ("counter", ("dependency", "site", "reason")),
    "degrade_fallback_total": ("counter", ("dependency", "site")),
    "degrade_fail_loud_total": ("counter", ("dependency", "site")),
    "degrade_eventbus_events_total": ("counter", ("exchange", "outcome")),
    "degrade_eventbus_dropped_total": ("counter", ("exchange", "reason")),
    "degrade_eventbus_degraded": ("gauge", ("exchange",)),
    "degrade_outbox_events_total": ("counter", ("table", "outcome")),
    "degrade_outbox_backlog": ("gauge", ("table",)),
    "degrade_outbox_oldest_seconds": ("gauge", ("table",)),
    "degrade_ratelimit_overflow_total": ("counter", ()),
    "degrade_ratelimit_errors_total": ("counter", ("error",)),
    "degrade_ratelimit_evictions_total": ("counter", ()),
    "degrade_abandoned_in_flight": ("gauge", ()),
    "degrade_abandoned_total": ("counter", ()),
    "degrade_abandoned_refused_total": ("counter", ()),
}

#: Every OpenTelemetry instrument degrade exports: name -> (kind, observable, unit).
OTEL_INSTRUMENTS = {
    "degrade.dependency.up": ("gauge", True, "1"),
    "degrade.dependency.transitions": ("counter", False, "{transition}"),
    "degrade.dependency.flaps": ("counter", False, "{flap}"),
    "degrade.site.degraded_calls": ("counter", True, "{call}"),
    "degrade.site.shed": ("counter", True, "{call}"),
    "degrade.abandoned.in_flight": ("up_down_counter", True, "{call}"),
    "degrade.abandoned.calls": ("counter", True, "{call}"),
    "degrade.abandoned.refused": ("counter", True, "{call}"),
    "degrade.ratelimit.decisions": ("counter", True, "{decision}"),
    "degrade.eventbus.events": ("counter", True, "{event}"),
    "degrade.eventbus.dropped": ("counter", True, "{event}"),
    "degrade.eventbus.degraded": ("gauge", True, "1"),
}


def _exported_prometheus() -> list[tuple[str, str, str]]:
    """(exposed name, type, help) of every degrade_* family in prometheus_client's default registry."""
    for module in ("degrade.ratelimit", "degrade.eventbus", "degrade._gcra"):
        importlib.import_module(module)  # the modules whose import defines metrics
    found = []
    for family in REGISTRY.collect():
        if family.name.startswith("degrade_"):
            exposed = f"{family.name}_total" if family.type == "counter" else family.name
            found.append((exposed, family.type, family.documentation))
    return found


class TestMetricRegistry:
    """One registry of metric names (degrade._metrics), unchanged, each exported once, all documented."""

    def test_prometheus_names_are_unchanged(self) -> None:
        """The registry holds exactly the metrics listed above, with their types and labels."""
        table = {m.name: (m.type, m.labels) for m in _metrics.PROMETHEUS}
        assert table == PROMETHEUS_METRICS
        assert len(_metrics.PROMETHEUS) == len(PROMETHEUS_METRICS)  # no name twice

    def test_opentelemetry_names_are_unchanged(self) -> None:
        """The registry holds exactly the instruments listed above."""
        table = {i.name: (i.kind, i.observable, i.unit) for i in _metrics.OPENTELEMETRY}
        assert table == OTEL_INSTRUMENTS
        assert len(_metrics.OPENTELEMETRY) == len(OTEL_INSTRUMENTS)

    def test_every_exported_metric_is_registered_once(self) -> None:
        """Each degrade_* family prometheus_client exports is a registry row, exported once, same help."""
        exported = _exported_prometheus()
        counts = collections.Counter(name for name, _, _ in exported)
        assert counts == collections.Counter(list(PROMETHEUS_METRICS))
        for name, kind, doc in exported:
            row = _metrics.metric(name)
            assert (kind, doc) == (row.type, row.help), name

    def test_labels_match_the_registry(self, name: str, clock: FakeClock) -> None:
        """Samples carry exactly the registry's labels."""
        dep = dependency(name, clock)
        fail_soft(dep, fallback=None, reason="r")(lambda: None)()
        fail_loud(dep, reason="r")(lambda: None)
        dep.add_site("shedder", "fail_soft", "r").shed("queue")
        dep.record_failure(ConnectionRefusedError())
        for family in REGISTRY.collect():
            for sample in family.samples:
                row = _metrics.METRICS.get(sample.name)
                if row is not None:
                    assert tuple(sorted(sample.labels)) == tuple(sorted(row.labels)), sample.name

    def test_documented_in_operations(self) -> None:
        """docs/operations.md lists every metric and instrument of the registry, with its type."""
        text = (ROOT / "docs" / "operations.md").read_text()
        for row in _metrics.PROMETHEUS:
            assert re.search(rf"^\| `{row.name}` \| {row.type} \|", text, re.MULTILINE), row.name
        documented = set(re.findall(r"`(degrade\.[a-z_.]+)`", text))
        assert {i.name for i in _metrics.OPENTELEMETRY} <= documented
        assert "degrade._metrics" in text

    def test_observe_still_exports_what_it_did(self) -> None:
        """The split kept every name of degrade.observe importable."""
        for attr in (
            "Dependency",
            "Site",
            "metrics",
            "_Metrics",
            "_SiteTotals",
            "_AbandonedWork",
            "_otel_state",
            "_prometheus",
            "_sentry",
            "may_abandon",
            "shed_reported",
            "dependency_down",
            "dependency_recovered",
            "sentry_active",
            "ABANDON_LOG_INTERVAL",
            "SHED_LOG_INTERVAL",
            "TRANSITION_REPORT_INTERVAL",
        ):
            assert hasattr(observe, attr), attr
