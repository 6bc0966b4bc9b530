"""One state machine: the publisher feeds and follows its Dependency; degraded mode is only policy on top."""

from __future__ import annotations

import asyncio
from typing import Any

import sentry_sdk
from structlog.testing import capture_logs

from degrade import Registry, Severity
from degrade.eventbus import EventPublisher, PublishResult
from degrade.policies import Consecutive

from ..support import eventually
from .test_eventbus_sender import FakeBroker

URL = "amqp://guest:secret-pw@127.0.0.1:1/"
FAST: dict[str, Any] = {
    "backoff_initial": 0.01,
    "backoff_max": 0.02,
    "connect_timeout": 0.05,
    "log_interval": 60,
}


def make_bus(broker: FakeBroker, **kwargs: Any) -> EventPublisher:
    bus = EventPublisher(URL, "ex", **{**FAST, **kwargs})
    bus._sender.connect = broker.connect
    return bus


class TestFeedingTheDependency:
    async def test_failed_connects_are_failures_and_a_connect_is_a_success(self) -> None:
        """The dependency trips by its own rule (3 in a row) before degrade_after; a connect closes it."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep, degrade_after=30)
        async with bus:
            await eventually(lambda: dep.is_down)
            assert dep.last_error == "ConnectionRefusedError"
            assert not bus.degraded  # the policy: buffer for degrade_after first
            assert await bus.publish("rk", {}) is PublishResult.QUEUED
            broker.mode = "up"
            await eventually(lambda: bus.connected)
            assert (dep.state, dep.failures) == ("ok", 0)
            await eventually(lambda: bus.stats().confirmed == 1)
        await registry.aclose()

    async def test_a_lost_connection_is_a_failure(self) -> None:
        """A connection the broker drops counts as one failure; the next connect resets it."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        broker = FakeBroker()
        bus = make_bus(broker, dependency=dep)
        seen: list[int] = []
        async with bus:
            await eventually(lambda: bus.connected)
            broker.mode = "refuse"
            broker.links[0].drop()
            await eventually(lambda: dep.failures >= 1)
            seen.append(dep.failures)
            broker.mode = "up"
            await eventually(lambda: bus.connected and dep.failures == 0)
        assert seen[0] >= 1
        await registry.aclose()

    async def test_a_set_up_error_is_not_fed_but_still_degrades(self) -> None:
        """Not an outage (no failure fed); past degrade_after the policy marks the dependency down itself."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        broker = FakeBroker("bad-exchange")
        bus = make_bus(broker, dependency=dep, degrade_after=0.1)
        with capture_logs() as logs:
            async with bus:
                await eventually(lambda: bus.degraded)
                assert dep.is_down
                assert await bus.publish("rk", {}) is PublishResult.DROPPED
        (down,) = [e for e in logs if e["event"] == "dependency.down"]
        assert down["reason"] == "degrade_after"
        assert down["error"] == "RuntimeError"
        await registry.aclose()

    async def test_degraded_mode_marks_down_a_dependency_whose_rule_did_not_trip(self) -> None:
        """Degraded mode never shows next to a dependency that reads ok."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2, trip=Consecutive(10_000))
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep, degrade_after=0.1)
        with capture_logs() as logs:
            async with bus:
                assert await bus.publish("rk", {}) is PublishResult.QUEUED
                await eventually(lambda: bus.degraded)
                assert dep.is_down
                broker.mode = "up"
                await eventually(lambda: not bus.degraded)
                assert not dep.is_down
        (down,) = [e for e in logs if e["event"] == "dependency.down"]
        assert down["reason"] == "degrade_after"
        assert bus.stats().dropped_by_reason == {"degraded": 1}
        await registry.aclose()


class TestOneReportPerTransition:
    async def test_sentry_gets_the_dependency_transitions_once_and_the_drops(
        self, sentry_events: list[dict[str, Any]]
    ) -> None:
        """One down and one recovered event, from the dependency; the publisher adds only per-drop reports."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep, degrade_after=0.1)
        with capture_logs() as logs:
            async with bus:
                await eventually(lambda: bus.degraded)
                assert await bus.publish("rk", {}, message_id="lost-1") is PublishResult.DROPPED
                broker.mode = "up"
                await eventually(lambda: not bus.degraded and bus.connected)
                await asyncio.sleep(0)
        await registry.aclose()
        sentry_sdk.flush()
        transitions = [e["tags"] for e in sentry_events if "degrade.transition" in e["tags"]]
        assert [(t["degrade.dependency"], t["degrade.transition"]) for t in transitions] == [
            ("rabbitmq", "down"),
            ("rabbitmq", "recovered"),
        ]
        assert not [e for e in sentry_events if "eventbus.transition" in e["tags"]]
        assert not [e for e in sentry_events if e["tags"].get("eventbus.status") == "recovered"]
        (drop,) = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "degraded"]
        assert drop["tags"]["eventbus.status"] == "degraded"
        assert drop["extra"]["message_id"] == "lost-1"
        names = [e["event"] for e in logs]
        assert names.count("dependency.down") == 1
        assert names.count("dependency.recovered") == 1
        assert names.count("eventbus.degraded") == 1  # the policy: from now on events are dropped
        (recovered,) = [e for e in logs if e["event"] == "eventbus.recovered"]
        assert recovered["dropped"] == 1


class TestWhoProbes:
    async def test_with_a_check_the_probe_alone_touches_the_broker(self) -> None:
        """While down with a check, the sender makes no attempt; the probe's success wakes it at once."""
        healthy = False
        checks = 0

        async def check() -> None:
            nonlocal checks
            checks += 1
            if not healthy:
                raise ConnectionRefusedError(111, "refused")

        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2, check=check, recovery_interval=0.02)
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep, degrade_after=0.05)
        async with bus:
            await eventually(lambda: bus.degraded)
            attempts = broker.attempts
            await eventually(lambda: checks >= 5)
            assert broker.attempts == attempts  # held: one loop against the broker, the probe's
            assert attempts == dep.failure_threshold
            broker.mode = "up"
            healthy = True
            await eventually(lambda: not dep.is_down)
            assert not bus.degraded  # left with the dependency's recovery
            await eventually(lambda: bus.connected)
            assert broker.attempts == attempts + 1
        await registry.aclose()

    async def test_without_a_check_the_sender_is_the_probe(self) -> None:
        """No check: the sender keeps trying at its backoff while down; its connect closes the dependency."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep, degrade_after=0.05)
        async with bus:
            await eventually(lambda: bus.degraded)
            attempts = broker.attempts
            await eventually(lambda: broker.attempts >= attempts + 3)
            broker.mode = "up"
            await eventually(lambda: bus.connected)
            assert not dep.is_down
            assert not bus.degraded
        await registry.aclose()

    async def test_a_simulated_outage_does_not_hold_the_sender(self, simulate_outage: Any) -> None:
        """Held down in-process: new events drop as dependency_down; buffered ones still go out."""

        async def check() -> None:
            return None

        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2, check=check)
        broker = FakeBroker("refuse")
        bus = make_bus(broker, dependency=dep)
        async with bus:
            assert await bus.publish("rk", {}) is PublishResult.QUEUED
            with simulate_outage(dep):
                assert await bus.publish("rk", {}) is PublishResult.DROPPED
                broker.mode = "up"
                await eventually(lambda: bus.stats().confirmed == 1)
                assert dep.is_down
            assert not dep.is_down
        assert bus.stats().dropped_by_reason == {"dependency_down": 1}
        await registry.aclose()


class TestDegradeAfterCountsFromSilence:
    """degrade_after runs from when the broker stopped answering, not from when a bound noticed."""

    async def test_the_deadline_is_the_silence_plus_degrade_after(self) -> None:
        """A loss noticed 5 s after the oldest unconfirmed send: degraded mode is due 25 s later, not 30."""
        now = [1000.0]
        bus = make_bus(FakeBroker(), degrade_after=30, clock=lambda: now[0])
        outage = bus._outage
        with capture_logs() as logs:
            outage.attempt_failed(TimeoutError(), since=995.0)
        assert outage.since == 995.0
        assert outage.deadline() == 1025.0
        (line,) = [e for e in logs if e["event"] == "eventbus.unreachable"]
        assert line["silent_s"] == 5.0
        now[0] = 1024.9
        outage.check()
        assert not bus.degraded
        now[0] = 1025.0
        outage.check()
        assert bus.degraded
        await bus.close(timeout=0)

    async def test_a_later_failure_does_not_move_the_start_of_the_episode(self) -> None:
        """The first silence of an episode counts; later failures of the episode do not move it."""
        now = [10.0]
        bus = make_bus(FakeBroker(), degrade_after=30, clock=lambda: now[0])
        outage = bus._outage
        outage.connection_lost(TimeoutError(), since=5.0)
        now[0] = 20.0
        outage.attempt_failed(TimeoutError(), since=15.0)
        assert outage.deadline() == 35.0
        await bus.close(timeout=0)

    async def test_silence_past_degrade_after_degrades_at_once(self) -> None:
        """A stall noticed once degrade_after has already run out degrades at once (degrade_after < bound)."""
        now = [100.0]
        bus = make_bus(FakeBroker(), degrade_after=3, clock=lambda: now[0])
        with capture_logs() as logs:
            bus._outage.connection_lost(TimeoutError(), since=94.0)
            await eventually(lambda: bus.degraded, within=2.0)
        (line,) = [e for e in logs if e["event"] == "eventbus.degraded"]
        assert line["unreachable_s"] == 6.0
        await bus.close(timeout=0)

    async def test_a_stalled_broker_degrades_degrade_after_from_the_send(self) -> None:
        """Through the publisher and its sender, real time: a broker that never confirms degrades
        degrade_after after the first unanswered publish, not degrade_after after the confirm bound."""
        broker = FakeBroker()
        bus = make_bus(broker, confirm_timeout=1.0, degrade_after=1.5)
        async with bus:
            await eventually(lambda: bus.connected)
            broker.answer = lambda event: "stall"
            broker.mode = "blackhole"  # and reconnects time out (connect_timeout 0.05 s)
            sent = asyncio.get_running_loop().time()
            assert await bus.publish("rk", {}) is PublishResult.QUEUED
            await eventually(lambda: bus.degraded, within=5.0, interval=0.005)
            took = asyncio.get_running_loop().time() - sent
        # noticed at 1.0-1.25 s (bound + a watchdog tick): counting from there would give >= 2.5 s
        assert 1.45 <= took < 2.2


class TestWithoutADependency:
    async def test_degraded_mode_ends_at_the_next_connection(self) -> None:
        """No dependency: the publisher keeps degraded mode by itself, left when the sender connects."""
        broker = FakeBroker("refuse")
        bus = make_bus(broker, degrade_after=0.05)
        with capture_logs() as logs:
            async with bus:
                await eventually(lambda: bus.degraded)
                broker.mode = "up"
                await eventually(lambda: bus.connected)
                assert not bus.degraded
        names = [e["event"] for e in logs]
        assert names.count("eventbus.unreachable") == 1
        assert names.count("eventbus.degraded") == 1
        assert names.count("eventbus.recovered") == 1
        assert not [n for n in names if n.startswith("dependency.")]
