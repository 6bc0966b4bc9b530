"""OpenTelemetry: degrade.observe's signals as OTel instruments, read through the SDK's in-memory reader."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from degrade import (
    DependencyUnavailable,
    MissingExtraError,
    Registry,
    Severity,
    _bounded,
    _otel,
    fail_loud,
    fail_soft,
    observe,
    site_of,
)

from ..support import FakeClock

metrics_sdk = pytest.importorskip("opentelemetry.sdk.metrics")
export = pytest.importorskip("opentelemetry.sdk.metrics.export")

ROOT = Path(__file__).resolve().parents[2]

#: Every instrument degrade itself creates, with its unit.
INSTRUMENTS = {
    "degrade.dependency.up": "1",
    "degrade.dependency.transitions": "{transition}",
    "degrade.dependency.flaps": "{flap}",
    "degrade.site.degraded_calls": "{call}",
    "degrade.site.shed": "{call}",
    "degrade.abandoned.in_flight": "{call}",
    "degrade.abandoned.calls": "{call}",
    "degrade.abandoned.refused": "{call}",
}


class Reader:
    """A MeterProvider with an in-memory reader that degrade reports to."""

    def __init__(self) -> None:
        self.reader = export.InMemoryMetricReader()
        self.provider = metrics_sdk.MeterProvider(metric_readers=[self.reader], shutdown_on_exit=False)

    def collect(self) -> dict[str, Any]:
        """Metric name -> the metric (data points, unit...) of degrade's scope, collected now."""
        data = self.reader.get_metrics_data()
        found: dict[str, Any] = {}
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                if scope.scope.name == "degrade":
                    found.update({metric.name: metric for metric in scope.metrics})
        return found

    def points(self, name: str) -> dict[frozenset[tuple[str, Any]], float]:
        """Attributes -> value of ``name``'s data points (empty when it reported nothing)."""
        metric = self.collect().get(name)
        if metric is None:
            return {}
        return {frozenset(p.attributes.items()): p.value for p in metric.data.data_points}

    def value(self, name: str, **attributes: str) -> float | None:
        """The value of the data point of ``name`` with exactly ``attributes`` (dots spelled ``__``)."""
        key = frozenset((k.replace("__", "."), v) for k, v in attributes.items())
        return self.points(name).get(key)


@pytest.fixture
def otel() -> Iterator[Reader]:
    """degrade reporting to a fresh in-memory reader; afterwards back to the global provider."""
    reader = Reader()
    assert observe.use_opentelemetry(meter_provider=reader.provider) is True
    try:
        yield reader
    finally:
        observe.use_opentelemetry()
        reader.provider.shutdown()


@pytest.fixture
def name() -> str:
    """A dependency name unique to this test (the per-process signals are shared)."""
    return f"dep_{uuid.uuid4().hex[:10]}"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(500.0)


def dependency(name: str, clock: FakeClock, **options: Any) -> Any:
    """A check-less dependency on a frozen clock, down at its first failure."""
    return Registry(clock=clock).dependency(name, severity=Severity.SEV2, failure_threshold=1, **options)


def prometheus(metric: str, **labels: str) -> float:
    prometheus_client = pytest.importorskip("prometheus_client")
    return prometheus_client.REGISTRY.get_sample_value(metric, labels) or 0.0


class TestDependencySignals:
    def test_every_instrument_with_its_unit(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """degrade creates the documented instruments, in OTel's naming style, with UCUM units."""
        dep = dependency(name, clock)
        dep.record_failure(ConnectionRefusedError())
        clock.advance(0.5)  # recovered by a probe, not by a call in flight
        dep.record_success()
        dep.record_failure(ConnectionRefusedError())  # a flap: a synchronous counter shows once it counted
        fail_soft(dep, fallback=None, reason="r")(lambda: None)()
        dep.add_site("shedder", "fail_soft", "r").shed("queue")
        metrics = otel.collect()
        assert {n: metrics[n].unit for n in INSTRUMENTS} == INSTRUMENTS

    def test_up_gauge_follows_the_state(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """degrade.dependency.up is 1 while ok, 0 while down, like degrade_dependency_up."""
        dep = dependency(name, clock)
        assert otel.value("degrade.dependency.up", degrade__dependency=name) == 1
        dep.record_failure(ConnectionRefusedError())
        assert otel.value("degrade.dependency.up", degrade__dependency=name) == 0
        assert prometheus("degrade_dependency_up", dependency=name) == 0
        dep.record_success()
        assert otel.value("degrade.dependency.up", degrade__dependency=name) == 1

    def test_transitions_and_flaps(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """Transitions by target state; a quick relapse also counts a flap. Same numbers as Prometheus."""
        dep = dependency(name, clock)
        dep.record_failure(ConnectionRefusedError())
        clock.advance(0.5)  # recovered by a probe, not by a call in flight
        dep.record_success()
        dep.record_failure(ConnectionRefusedError())  # down again within the flap window
        transitions = otel.points("degrade.dependency.transitions")
        down = frozenset({("degrade.dependency", name), ("degrade.dependency.state", "down")})
        ok = frozenset({("degrade.dependency", name), ("degrade.dependency.state", "ok")})
        assert (transitions[down], transitions[ok]) == (2, 1)
        assert prometheus("degrade_dependency_transitions_total", dependency=name, to="down") == 2
        assert otel.value("degrade.dependency.flaps", degrade__dependency=name) == 1
        assert prometheus("degrade_dependency_flaps_total", dependency=name) == 1


class TestSiteSignals:
    async def test_degraded_calls_by_mode(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """Fallbacks and refusals are read from each site's count, as the Prometheus collector does."""
        dep = dependency(name, clock)

        @fail_soft(dep, fallback=None, reason="r")
        async def soft() -> None:
            return None

        @fail_loud(dep, reason="r")
        async def loud() -> None:
            return None

        dep.record_failure(ConnectionRefusedError())
        for _ in range(3):
            await soft()
        with pytest.raises(DependencyUnavailable):
            await loud()
        soft_site, loud_site = site_of(soft), site_of(loud)
        assert soft_site._counter is None  # nothing to bump per call: the count is read at collection
        assert (
            otel.value(
                "degrade.site.degraded_calls",
                degrade__dependency=name,
                degrade__site=soft_site.name,
                degrade__site__mode="fail_soft",
            )
            == 3
            == prometheus("degrade_fallback_total", dependency=name, site=soft_site.name)
        )
        assert (
            otel.value(
                "degrade.site.degraded_calls",
                degrade__dependency=name,
                degrade__site=loud_site.name,
                degrade__site__mode="fail_loud",
            )
            == 1
            == prometheus("degrade_fail_loud_total", dependency=name, site=loud_site.name)
        )

    def test_counts_move_between_collections(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """Each collection reads the current count: a cumulative counter."""
        dep = dependency(name, clock)
        site = dep.add_site("site", "fail_soft", "r")
        attributes = {
            "degrade__dependency": name,
            "degrade__site": "site",
            "degrade__site__mode": "fail_soft",
        }
        site.count()
        assert otel.value("degrade.site.degraded_calls", **attributes) == 1
        site.count()
        site.count()
        assert otel.value("degrade.site.degraded_calls", **attributes) == 3

    def test_shed_by_reason(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """degrade.site.shed carries the reason as degrade.shed.reason."""
        dep = dependency(name, clock)
        site = dep.add_site("pool", "fail_loud", "r")
        site.shed("queue")
        site.shed("queue")
        site.shed("pool-saturated")
        shed = otel.points("degrade.site.shed")
        mine = {
            dict(key)["degrade.shed.reason"]: value
            for key, value in shed.items()
            if ("degrade.dependency", name) in key
        }
        assert mine == {"queue": 2, "pool-saturated": 1}
        assert prometheus("degrade_shed_total", dependency=name, site="pool", reason="queue") == 2

    def test_abandoned_work(self, otel: Reader, monkeypatch: pytest.MonkeyPatch) -> None:
        """The abandoned-work counts are the process-wide ones of degrade._bounded."""
        monkeypatch.setattr(_bounded.Abandoned, "total", 7)
        monkeypatch.setattr(_bounded.Abandoned, "refused", 2)
        assert otel.value("degrade.abandoned.calls") == 7
        assert otel.value("degrade.abandoned.refused") == 2
        assert otel.value("degrade.abandoned.in_flight") == _bounded.abandoned_in_flight()


class TestSwitching:
    def test_another_provider_takes_over(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """After use_opentelemetry(other), the first provider gets nothing more; going back works."""
        dep = dependency(name, clock)
        other = Reader()
        try:
            observe.use_opentelemetry(meter_provider=other.provider)
            dep.record_failure(ConnectionRefusedError())
            assert otel.collect() == {}
            assert other.value("degrade.dependency.up", degrade__dependency=name) == 0
            observe.use_opentelemetry(meter_provider=otel.provider)  # the same instruments, reopened
            dep.record_success()
            assert otel.value("degrade.dependency.up", degrade__dependency=name) == 1
            # other keeps what it counted (cumulative) and sees nothing more (older SDKs repeat
            # an observable's last value; newer ones drop it)
            assert other.value("degrade.dependency.up", degrade__dependency=name) in (None, 0)
            assert other.points("degrade.dependency.transitions") == {
                frozenset({("degrade.dependency", name), ("degrade.dependency.state", "down")}): 1
            }
        finally:
            other.provider.shutdown()

    def test_the_same_provider_twice_is_harmless(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """Choosing the current provider again keeps its instruments reporting (no duplicate instruments)."""
        observe.use_opentelemetry(meter_provider=otel.provider)
        dependency(name, clock).record_failure(ConnectionRefusedError())
        assert otel.value("degrade.dependency.up", degrade__dependency=name) == 0

    def test_off(self, otel: Reader, name: str, clock: FakeClock) -> None:
        """enabled=False: nothing reported, counters are no-ops; Prometheus goes on."""
        counter = observe.otel_counter("degrade.test.off", "test", "{thing}")
        assert observe.use_opentelemetry(enabled=False) is False
        dep = dependency(name, clock)
        dep.record_failure(ConnectionRefusedError())
        counter.add(1)
        assert otel.collect() == {}
        assert prometheus("degrade_dependency_up", dependency=name) == 0

    def test_missing_api(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without opentelemetry-api: the bridge stays absent, use_opentelemetry() names the extra."""
        monkeypatch.setitem(sys.modules, "opentelemetry.metrics", None)
        state = _otel.State(observe.metrics)
        assert state.ensure() is None
        assert state.mode == "absent"
        counter = state.counter("degrade.test.absent", "test", "1")
        counter.add(5, {"a": "b"})  # a no-op
        with pytest.raises(MissingExtraError, match=r"degrade\[otel\]"):
            observe.use_opentelemetry()

    def test_import_does_not_load_opentelemetry(self) -> None:
        """`import degrade` costs nothing more: the API is imported at the first dependency."""
        code = (
            "import sys, degrade\n"
            "assert 'opentelemetry' not in sys.modules, 'imported by import degrade'\n"
            "degrade.Registry().dependency('x', severity=degrade.Severity.SEV3)\n"
            "assert 'opentelemetry.metrics' in sys.modules\n"
        )
        subprocess.run([sys.executable, "-W", "error", "-c", code], check=True, timeout=60)


class TestRegisteredBySafetyNets:
    def test_otel_counter(self, otel: Reader) -> None:
        """observe.otel_counter(): a counter that follows the bridge."""
        counter = observe.otel_counter("degrade.test.decisions", "Decisions by source.", "{decision}")
        counter.add(2, {"degrade.test.source": "memory"})
        counter.add(1, {"degrade.test.source": "redis"})
        points = otel.points("degrade.test.decisions")
        assert points == {
            frozenset({("degrade.test.source", "memory")}): 2,
            frozenset({("degrade.test.source", "redis")}): 1,
        }
        assert otel.collect()["degrade.test.decisions"].unit == "{decision}"
        other = Reader()
        try:
            observe.use_opentelemetry(meter_provider=other.provider)
            counter.add(4, {"degrade.test.source": "memory"})
            memory = frozenset({("degrade.test.source", "memory")})
            assert other.points("degrade.test.decisions") == {memory: 4}
        finally:
            other.provider.shutdown()

    @pytest.mark.parametrize("kind", ["counter", "up_down_counter", "gauge"])
    def test_otel_observable(self, otel: Reader, kind: Any) -> None:
        """observe.otel_observable(): (value, attributes) pairs read at each collection."""
        counts = {"confirmed": 3, "spooled": 1}
        instrument = f"degrade.test.events_{kind}"
        observe.otel_observable(
            instrument,
            "Events by outcome.",
            lambda: [(n, {"degrade.test.outcome": outcome}) for outcome, n in counts.items()],
            unit="{event}",
            kind=kind,
        )
        counts["confirmed"] += 2
        assert otel.points(instrument) == {
            frozenset({("degrade.test.outcome", "confirmed")}): 5,
            frozenset({("degrade.test.outcome", "spooled")}): 1,
        }


def test_documented() -> None:
    """docs/operations.md maps every Prometheus metric of observe to its instrument."""
    text = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"`(degrade\.[a-z_.]+)`", text))
    assert set(INSTRUMENTS) <= documented


class TestComponentSignals:
    async def test_limiter_decisions_by_source(self, otel: Reader, name: str) -> None:
        """degrade.ratelimit.decisions: per prefix and source, read from the limiter's own counts."""
        from degrade.ratelimit import RateLimiter

        limiter = RateLimiter(prefix=f"{name}:")  # memory only: decisions count as neither of the three
        await limiter.hit("k", "5/minute")
        points = otel.points("degrade.ratelimit.decisions")
        mine = {
            dict(k)["degrade.ratelimit.source"]: v
            for k, v in points.items()
            if (("degrade.ratelimit.prefix", f"{name}:") in k)
        }
        assert mine == {"redis": 0, "fallback": 0, "shed": 0}

    async def test_publisher_counts(self, otel: Reader, name: str) -> None:
        """degrade.eventbus.events / dropped / degraded come from the publisher's counts."""
        from degrade.eventbus import EventPublisher

        bus = EventPublisher("amqp://guest:guest@127.0.0.1:1/", exchange=name)
        await bus.publish("k", {"a": 1})
        events = otel.points("degrade.eventbus.events")
        queued = {
            dict(k)["degrade.eventbus.outcome"]: v
            for k, v in events.items()
            if ("degrade.eventbus.exchange", name) in k
        }
        assert queued["queued"] == 1
        degraded = otel.points("degrade.eventbus.degraded")
        assert degraded[frozenset({("degrade.eventbus.exchange", name)})] == 0

    async def test_every_instrument_is_a_registry_row(
        self, otel: Reader, name: str, clock: FakeClock
    ) -> None:
        """Each instrument on degrade's meter is a row of degrade._metrics: same unit and description."""
        from degrade import _metrics
        from degrade.eventbus import EventPublisher
        from degrade.ratelimit import RateLimiter

        dep = dependency(name, clock)
        fail_soft(dep, fallback=None, reason="r")(lambda: None)()
        dep.add_site("shedder", "fail_soft", "r").shed("queue")
        dep.record_failure(ConnectionRefusedError())
        clock.advance(0.5)  # recovered by a probe, not by a call in flight
        dep.record_success()
        dep.record_failure(ConnectionRefusedError())  # a flap
        limiter = RateLimiter(prefix=f"{name}:")
        await limiter.hit("k", "5/minute")
        bus = EventPublisher("amqp://guest:guest@127.0.0.1:1/", exchange=name)
        await bus.publish("k", {"a": 1})
        collected = {n: m for n, m in otel.collect().items() if not n.startswith("degrade.test.")}
        # All but degrade.eventbus.dropped (nothing dropped here) report; none outside the registry.
        assert set(_metrics.INSTRUMENTS) - {"degrade.eventbus.dropped"} <= set(collected)
        assert set(collected) <= set(_metrics.INSTRUMENTS)
        for metric_name, metric in collected.items():
            row = _metrics.instrument(metric_name)
            assert (metric.unit, metric.description) == (row.unit, row.description), metric_name
