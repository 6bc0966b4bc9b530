"""EventPublisher without a broker: validation, the buffer, degraded mode on an injected clock, reporting."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import socket
import sys
import uuid
from typing import Any

import httpx
import pytest
import sentry_sdk
import tenacity
from starlette.applications import Starlette
from structlog.testing import capture_logs

from degrade import ConfigurationError, MissingExtraError, Registry, Severity, health_routes
from degrade.eventbus import DiskSpool, EventPublisher, PublisherStats, PublishResult
from degrade.eventbus._event import Event, check_headers, encode_payload, new_id
from degrade.eventbus._report import Counts, Reporter
from degrade.eventbus._retry import CONNECTION_ERRORS, wait_jittered

from ..support import eventually
from .test_eventbus_sender import FakeBroker


def closed_port_url() -> str:
    """An amqp URL whose port refuses connections at once (nothing listens)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"amqp://guest:secret-pw@127.0.0.1:{port}/"


class SteppedTime:
    """An injected clock and sleep: each sleep waits until the test releases it."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []
        self._pending: asyncio.Future[None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.delays.append(delay)
        self._pending = asyncio.get_running_loop().create_future()
        await self._pending

    async def next_sleep(self) -> float:
        """Wait (real time, bounded) until the code under test sleeps; return its delay."""
        await eventually(lambda: self._pending is not None, within=5.0, interval=0.002)
        return self.delays[-1]

    def release(self) -> None:
        """End the pending sleep, advancing the clock by its delay."""
        pending, self._pending = self._pending, None
        assert pending is not None
        self.now += self.delays[-1]
        pending.set_result(None)


def event(message_id: str = "id-1", routing_key: str = "track.uploaded") -> Event:
    return Event(routing_key, b"{}", message_id, None, "application/json", 0.0, 1)


class TestExtra:
    def test_import_without_aio_pika_names_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Importing degrade.eventbus without aio-pika raises MissingExtraError naming [rabbitmq]."""
        for name in [m for m in sys.modules if m == "degrade.eventbus" or m.startswith("degrade.eventbus.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "aio_pika", None)
        with pytest.raises(MissingExtraError, match=r"degrade\[rabbitmq\]") as info:
            importlib.import_module("degrade.eventbus")
        assert isinstance(info.value, ImportError)


class TestPayload:
    def test_mapping_is_serialised_once_as_compact_json(self) -> None:
        """A dict becomes compact UTF-8 JSON with the JSON content type."""
        body, content_type = encode_payload({"track": 7, "title": "Été"})
        assert body == '{"track":7,"title":"Été"}'.encode()
        assert content_type == "application/json"

    def test_bytes_are_sent_as_they_are(self) -> None:
        """bytes, bytearray and memoryview go out unchanged as octet-stream."""
        for payload in (b"\x00raw", bytearray(b"\x00raw"), memoryview(b"\x00raw")):
            assert encode_payload(payload) == (b"\x00raw", "application/octet-stream")

    @pytest.mark.parametrize("payload", [["a"], "text", 42, None, {"when": object()}, {"x": float("nan")}])
    def test_anything_else_is_a_type_error(self, payload: object) -> None:
        """Lists, strings, numbers and mappings JSON cannot encode raise TypeError."""
        with pytest.raises(TypeError):
            encode_payload(payload)

    def test_circular_mapping_is_a_type_error(self) -> None:
        """A self-referencing dict raises TypeError, not ValueError."""
        payload: dict[str, Any] = {}
        payload["self"] = payload
        with pytest.raises(TypeError, match="JSON"):
            encode_payload(payload)

    def test_headers_must_be_json_able_with_str_keys(self) -> None:
        """Headers are copied; non-str keys or odd values raise TypeError."""
        source = {"tenant": "a", "n": 1}
        copied = check_headers(source)
        assert copied == source
        assert copied is not source
        with pytest.raises(TypeError):
            check_headers({1: "x"})
        with pytest.raises(TypeError):
            check_headers({"x": object()})
        with pytest.raises(TypeError):
            check_headers(["x"])

    def test_generated_ids_are_version_4_uuids(self) -> None:
        """new_id() gives distinct 32-hex-digit version-4 UUIDs."""
        ids = {new_id() for _ in range(1000)}
        assert len(ids) == 1000
        for value in list(ids)[:50]:
            parsed = uuid.UUID(hex=value)
            assert parsed.version == 4
            assert parsed.variant == uuid.RFC_4122
            assert parsed.hex == value


class TestPublish:
    async def test_publish_queues_without_a_started_sender(self) -> None:
        """publish() returns QUEUED at once; nothing touches the network."""
        bus = EventPublisher(closed_port_url(), "ex")
        assert await bus.publish("a.b", {"x": 1}) is PublishResult.QUEUED
        assert bus.stats().buffered == 1
        assert bus.stats().queued == 1

    async def test_bad_arguments_raise_at_the_call(self) -> None:
        """Wrong payload, routing key, message id or headers raise before anything is queued."""
        bus = EventPublisher(closed_port_url(), "ex")
        with pytest.raises(TypeError):
            await bus.publish("a", ["not", "a", "mapping"])  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await bus.publish(b"a", {})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="255"):
            await bus.publish("é" * 200, {})
        with pytest.raises(TypeError):
            await bus.publish("a", {}, message_id=7)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="message_id"):
            await bus.publish("a", {}, message_id="")
        with pytest.raises(TypeError):
            await bus.publish("a", {}, headers={"when": object()})
        assert bus.stats().buffered == 0

    async def test_bad_arguments_are_configuration_errors(self) -> None:
        """Every bad argument is a ConfigurationError; the wrong kinds are also TypeError (as before)."""
        bus = EventPublisher(closed_port_url(), "ex")
        calls: list[tuple[Any, ...]] = [
            ("a", ["not", "a", "mapping"], {}),
            (b"a", {}, {}),
            ("a", {"x": float("nan")}, {}),
            ("a", {}, {"message_id": 7}),
            ("a", {}, {"headers": {1: "x"}}),
        ]
        for routing_key, payload, kwargs in calls:
            with pytest.raises(ConfigurationError) as info:
                await bus.publish(routing_key, payload, **kwargs)
            assert isinstance(info.value, TypeError)
        too_long: list[tuple[str, dict[str, Any]]] = [
            ("é" * 200, {}),
            ("a", {"message_id": ""}),
            ("a", {"message_id": "x" * 256}),
        ]
        for routing_key, kwargs in too_long:
            with pytest.raises(ConfigurationError) as info:
                await bus.publish(routing_key, {}, **kwargs)
            assert not isinstance(info.value, TypeError)
        assert bus.stats().queued == 0

    async def test_full_buffer_drops_and_reports(self) -> None:
        """Past buffer_size a publish returns DROPPED, counted as buffer_full and logged in a summary."""
        bus = EventPublisher(closed_port_url(), "ex", buffer_size=3, log_interval=60)
        with capture_logs() as logs:
            results = [await bus.publish("a", {"i": i}, message_id=f"m{i}") for i in range(5)]
            await bus.close(timeout=0)
        assert results == [PublishResult.QUEUED] * 3 + [PublishResult.DROPPED] * 2
        assert bus.stats().dropped_by_reason == {"buffer_full": 2, "shutdown": 3}
        summaries = [e for e in logs if e["event"] == "eventbus.dropped"]
        assert len(summaries) == 1
        assert summaries[0]["by_reason"] == {"buffer_full": 2, "shutdown": 3}
        assert summaries[0]["sample_message_ids"][:2] == ["m3", "m4"]

    async def test_full_buffer_is_shed_not_an_outage(self, sentry_events: list[dict[str, Any]]) -> None:
        """A full buffer drops as before (counted, summarised, reported) and is shed on the site;
        the broker's dependency is not touched and no dependency event reaches Sentry."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV1)
        bus = EventPublisher(closed_port_url(), "ex", dependency=dep, buffer_size=3, log_interval=60)
        bus._sender.connect = FakeBroker("blackhole").connect  # started; the broker never answers
        assert bus.site is not None
        with capture_logs() as logs:
            await bus.start()
            results = [await bus.publish("a.b", {"i": i}, message_id=f"m{i}") for i in range(6)]
            await asyncio.sleep(0)  # the drops' Sentry reports are sent from the loop
            states = (dep.state, dep.failures, dep.last_error, bus.degraded)
            await bus.close(timeout=0)
        assert states == ("ok", 0, None, False)
        assert results == [PublishResult.QUEUED] * 3 + [PublishResult.DROPPED] * 3
        assert bus.stats().dropped_by_reason == {"buffer_full": 3, "shutdown": 3}
        assert bus.site.shed_calls == {"buffer-full": 3}  # shutdown is not saturation
        assert bus.site.degraded_calls == 0
        shed = [e for e in logs if e["event"] == "degrade.shed"]
        assert len(shed) == 1  # rate-limited per site
        assert shed[0]["reason"] == "buffer-full"
        assert not [e for e in logs if e["event"].startswith("dependency.")]
        summaries = [e for e in logs if e["event"] == "eventbus.dropped"]
        sentry_sdk.flush()
        # Nothing is lost silently: each drop is still reported (eventbus.reason=buffer_full) ...
        reported = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "buffer_full"]
        assert [e["extra"]["message_id"] for e in reported] == ["m3", "m4", "m5"]
        # ... but the shedding itself sends nothing, and the dependency never went down.
        assert not [e for e in sentry_events if "degrade.dependency" in e.get("tags", {})]
        assert [e["by_reason"] for e in summaries] == [{"buffer_full": 3, "shutdown": 3}]
        await registry.aclose()

    async def test_full_spool_is_shed_once_per_event(self, tmp_path: Any) -> None:
        """Events the spool has no room for are shed as spool-full (buffer-full when that came first)."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        spool = DiskSpool(tmp_path / "spool", max_bytes=1024)
        bus = EventPublisher(closed_port_url(), "ex", dependency=dep, spool=spool, buffer_size=4)
        assert bus.site is not None
        payload = {"blob": "x" * 300}
        results = [await bus.publish("a.b", payload) for i in range(5)]
        assert results == [PublishResult.QUEUED] * 4 + [PublishResult.DROPPED]  # no spool open yet
        # never started: the 4 queued are also shed as not-started (nothing would send them)
        assert bus.site.shed_calls == {"not-started": 4, "buffer-full": 1}
        await bus.close(timeout=0)  # the 4 buffered events go to the spool, which takes 2 or 3
        by_reason = bus.stats().dropped_by_reason
        assert by_reason["spool_full"] >= 1
        assert bus.site.shed_calls == {
            "not-started": 4,
            "buffer-full": 1,
            "spool-full": by_reason["spool_full"],
        }
        assert (dep.state, dep.failures) == ("ok", 0)
        await registry.aclose()

    async def test_publish_after_close_drops_as_shutdown(self) -> None:
        """A publish after close() drops at once with reason shutdown."""
        bus = EventPublisher(closed_port_url(), "ex")
        await bus.close()
        assert await bus.publish("a", {}) is PublishResult.DROPPED
        assert bus.stats().dropped_by_reason == {"shutdown": 1}

    async def test_simulated_outage_drops_without_network(self, simulate_outage: Any) -> None:
        """While the dependency is held down in-process, publish drops as dependency_down."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        bus = EventPublisher(closed_port_url(), "ex", dependency=dep)
        with simulate_outage(dep):
            assert await bus.publish("a", {}) is PublishResult.DROPPED
        assert await bus.publish("a", {}) is PublishResult.QUEUED
        assert bus.stats().dropped_by_reason == {"dependency_down": 1}
        await registry.aclose()

    async def test_no_credentials_in_logs_or_repr(self) -> None:
        """The URL's password appears in no log line and not in repr()."""
        bus = EventPublisher(
            closed_port_url(), "ex", degrade_after=0.05, backoff_initial=0.01, backoff_max=0.02
        )
        with capture_logs() as logs:
            await bus.start()
            await bus.publish("a", {})
            await eventually(lambda: bus.degraded, within=5.0, interval=0.002)
            await bus.close()
        assert "secret-pw" not in repr(bus)
        assert logs
        assert all("secret-pw" not in repr(entry) for entry in logs)


class TestNeverStarted:
    async def test_publish_without_start_warns_once_counts_and_says_it_in_health_details(self) -> None:
        """Lifespan never ran: QUEUED as before, one warning naming the fix, each event counted
        in stats().unsent and shed as not-started, which /health/deep details show."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        bus = EventPublisher(closed_port_url(), "ex", dependency=dep)
        assert bus.site is not None
        with capture_logs() as logs:
            results = [await bus.publish("a.b", {"i": i}) for i in range(3)]
        assert results == [PublishResult.QUEUED] * 3
        (warning,) = [e for e in logs if e["event"] == "eventbus.not_started"]
        assert warning["log_level"] == "warning"
        assert "never started" in warning["detail"]
        assert "registry's lifespan" in warning["detail"]
        assert "registry.manage(publisher)" in warning["detail"]
        assert "secret-pw" not in repr(logs)
        stats = bus.stats()
        assert (stats.unsent, stats.queued, stats.buffered, stats.dropped) == (3, 3, 3, 0)
        assert bus.site.shed_calls == {"not-started": 3}
        assert (dep.state, dep.failures) == ("ok", 0)  # not the broker's fault: nothing tried it
        assert "not started" in repr(bus)
        app = Starlette(routes=health_routes(registry, details=True))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = (await client.get("/health/deep")).json()
        assert body["details"]["rabbitmq"]["shed"] == {"not-started": 3}
        await bus.close(timeout=0)
        await registry.aclose()

    async def test_a_late_start_sends_what_waited_and_counting_stops(self) -> None:
        """Events queued before start() go out once it runs; only those count as unsent; one warning."""
        broker = FakeBroker()
        bus = EventPublisher(closed_port_url(), "ex", backoff_initial=0.01, backoff_max=0.02)
        bus._sender.connect = broker.connect
        with capture_logs() as logs:
            for i in range(2):
                await bus.publish("rk", {}, message_id=f"early{i}")
            async with bus:
                await bus.publish("rk", {}, message_id="late")
                await eventually(lambda: bus.stats().confirmed == 3)
        assert bus.stats().unsent == 2
        assert bus.site is None  # no dependency: the log and the counter say it
        assert [e["event"] for e in logs].count("eventbus.not_started") == 1
        assert broker.links[0].sent == ["early0", "early1", "late"]


class TestStats:
    async def test_stats_call_is_a_frozen_snapshot(self) -> None:
        """bus.stats() is a PublisherStats made on each call: later publishes do not change one kept."""
        bus = EventPublisher(closed_port_url(), "ex")
        before = bus.stats()
        await bus.publish("a", {})
        after = bus.stats()
        assert isinstance(before, PublisherStats)
        assert (before.queued, after.queued) == (0, 1)
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.queued = 5  # type: ignore[misc]
        await bus.close(timeout=0)

    async def test_the_old_spelling_warns_and_keeps_its_snapshot(self) -> None:
        """bus.stats.<field> works for one minor version: a DeprecationWarning naming bus.stats(),
        the value as of reading bus.stats (a kept view does not change, as the old snapshot did)."""
        bus = EventPublisher(closed_port_url(), "ex")
        kept = bus.stats
        await bus.publish("a", {})
        with pytest.warns(
            DeprecationWarning,
            match=r"EventPublisher\.stats\.queued is deprecated; use EventPublisher\.stats\(\)\.queued",
        ) as warned:
            assert kept.queued == 0
        assert warned[0].filename == __file__  # points at the caller
        with pytest.warns(DeprecationWarning, match=r"stats\(\)\.dropped_by_reason"):
            assert bus.stats.dropped_by_reason == {}
        assert kept().queued == 1  # calling the view gives a snapshot now
        with pytest.raises(dataclasses.FrozenInstanceError):
            kept.queued = 5
        with pytest.raises(AttributeError, match=r"stats\(\)"):
            _ = kept.nope
        assert repr(bus.stats) == repr(bus.stats())  # no warning
        await bus.close(timeout=0)


class TestConfiguration:
    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"degrade_after": -1}, "degrade_after"),
            ({"buffer_size": 0}, "buffer_size"),
            ({"connect_timeout": 0}, "connect_timeout"),
            ({"confirm_timeout": float("nan")}, "confirm_timeout"),
            ({"degrade_after": float("inf")}, "degrade_after"),
            ({"backoff_max": True}, "backoff_max"),
            ({"sentry_rate": -1}, "sentry_rate"),
            ({"replay_batch": 0}, "replay_batch"),
            ({"backoff_initial": 2.0, "backoff_max": 1.0}, "backoff_max"),
            ({"max_in_flight": 0}, "max_in_flight"),
            ({"heartbeat": 0}, "heartbeat"),
            ({"dependency": "rabbitmq"}, "Dependency"),
            ({"spool": "spool-dir"}, "DiskSpool"),
        ],
    )
    def test_bad_options_raise_configuration_error(self, kwargs: dict[str, Any], match: str) -> None:
        """Out-of-range options raise ConfigurationError naming the option."""
        with pytest.raises(ConfigurationError, match=match):
            EventPublisher("amqp://guest:guest@127.0.0.1/", **kwargs)

    def test_url_must_be_amqp_and_is_not_repeated(self) -> None:
        """A non-AMQP URL is refused; the message does not repeat it (it may hold a password)."""
        with pytest.raises(ConfigurationError) as info:
            EventPublisher("redis://user:hunter2@host/0")
        assert "hunter2" not in str(info.value)

    def test_is_a_registry_component(self) -> None:
        """registry.manage() accepts a publisher (async start / aclose)."""
        registry = Registry()
        bus = EventPublisher("amqp://guest:guest@127.0.0.1/")
        assert registry.manage(bus) is bus


class TestDegradedMode:
    async def test_default_30s_holds_on_an_injected_clock(self) -> None:
        """With the default degrade_after, events wait until 30 s of unreachable broker, then drop."""
        time = SteppedTime()
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        bus = EventPublisher(
            closed_port_url(), "ex", dependency=dep, clock=time.clock, sleep=time.sleep, rng=lambda: 0.0
        )
        await bus.start()
        try:
            assert await bus.publish("a", {}) is PublishResult.QUEUED
            delays = []
            while True:
                delay = await time.next_sleep()
                if time.now + delay >= 30.0 - 1e-9:
                    break
                assert not bus.degraded
                delays.append(delay)
                time.release()
            # exponential from 0.2 s, capped at backoff_max 5 s, no jitter with rng=0
            assert delays[:6] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
            assert all(d == 5.0 for d in delays[5:])
            # the last wait is cut at the deadline, so degraded mode starts at 30.0 exactly
            assert delay == pytest.approx(3.8)
            assert time.now + delay == pytest.approx(30.0)
            assert await bus.publish("a", {}) is PublishResult.QUEUED
            # One state machine: the failed connects fed the dependency, which went down
            # after its third (failure_threshold); the events still wait in the buffer.
            assert dep.is_down
            assert dep.failures >= 3
            assert not bus.degraded
            time.release()
            await eventually(lambda: bus.degraded, within=5.0, interval=0.002)
            assert time.now == pytest.approx(30.0)
            assert dep.is_down
            assert await bus.publish("a", {}) is PublishResult.DROPPED
            assert bus.stats().dropped_by_reason == {"degraded": 3}  # two buffered, one new
            # the rest of the cut wait, then reconnection continues at the longest backoff
            assert await time.next_sleep() == pytest.approx(1.2)
            time.release()
            assert await time.next_sleep() == 5.0
        finally:
            await bus.close()
            await registry.aclose()

    async def test_degraded_start_and_clean_shutdown_with_broker_down(self) -> None:
        """Start, degrade and close with the broker refused throughout; no task stays behind."""
        before = asyncio.all_tasks()
        bus = EventPublisher(
            closed_port_url(), "ex", degrade_after=0.05, backoff_initial=0.01, backoff_max=0.05
        )
        with capture_logs() as logs:
            await bus.start()
            await eventually(lambda: bus.degraded, within=5.0, interval=0.002)
            assert await bus.publish("a", {}) is PublishResult.DROPPED
            async with asyncio.timeout(3):
                await bus.close()
        assert asyncio.all_tasks() - before == set()
        names = [e["event"] for e in logs]
        assert names.count("eventbus.unreachable") == 1
        assert names.count("eventbus.degraded") == 1
        assert "eventbus.closed" in names

    async def test_close_cancels_a_pending_connect_without_retrying(self) -> None:
        """Cancelling the sender mid-backoff ends it: CancelledError is never retried."""
        bus = EventPublisher(closed_port_url(), "ex", backoff_initial=10.0, backoff_max=10.0)
        await bus.start()
        await asyncio.sleep(0.05)  # first attempt refused; now in a 10 s backoff
        async with asyncio.timeout(1):
            await bus.close()
        assert bus._sender.task is None
        assert bus._sender.attempts == 1


class TestWorker:
    async def test_a_confirm_failed_with_cancelled_error_is_a_connection_loss(self) -> None:
        """A CancelledError from aiormq (it dropped a stuck connection) counts as a connection loss."""

        class DroppedLink:
            async def send(self, event: Event) -> str | None:
                raise asyncio.CancelledError

        bus = EventPublisher(closed_port_url(), "ex")
        await bus.publish("a", {}, message_id="m1")
        with pytest.raises(ConnectionError):
            await bus._sender._worker(DroppedLink())  # type: ignore[arg-type]
        assert bus.stats().in_flight == 1  # kept, to be sent again on the next connection
        bus._queue.requeue_in_flight()
        assert bus.stats().buffered == 1

    async def test_a_real_cancellation_propagates(self) -> None:
        """Cancelling the worker itself raises CancelledError, never swallowed or converted."""
        started = asyncio.Event()

        class SlowLink:
            async def send(self, event: Event) -> str | None:
                started.set()
                await asyncio.sleep(10)
                return None

        bus = EventPublisher(closed_port_url(), "ex")
        await bus.publish("a", {})
        worker = asyncio.create_task(bus._sender._worker(SlowLink()))  # type: ignore[arg-type]
        await started.wait()
        worker.cancel()
        with pytest.raises(asyncio.CancelledError):
            await worker
        assert worker.cancelled()


class TestBackoff:
    def test_jitter_only_shortens_the_wait(self) -> None:
        """wait_jittered stays within [base * (1 - ratio), base]."""
        base = tenacity.wait_exponential(multiplier=0.2, max=5.0)
        state = tenacity.RetryCallState(tenacity.AsyncRetrying(), None, (), {})
        for attempt, expected in [(1, 0.2), (3, 0.8), (10, 5.0)]:
            state.attempt_number = attempt
            assert wait_jittered(base, 0.2, lambda: 0.0)(state) == pytest.approx(expected)
            assert wait_jittered(base, 0.2, lambda: 0.999999)(state) == pytest.approx(
                expected * 0.8, rel=1e-5
            )

    def test_retry_list_is_positive(self) -> None:
        """Connection errors are retried; CancelledError and bugs are not."""
        assert issubclass(ConnectionRefusedError, CONNECTION_ERRORS)
        assert issubclass(TimeoutError, CONNECTION_ERRORS)
        assert not issubclass(asyncio.CancelledError, CONNECTION_ERRORS)
        assert not issubclass(KeyError, CONNECTION_ERRORS)


class TestReporter:
    async def test_drops_are_summarised_not_logged_one_by_one(self) -> None:
        """A thousand drops make one summary line with counts and five sample ids."""
        reporter = Reporter(Counts("ex"), log_interval=60, sentry_rate=10, clock=lambda: 0.0)
        with capture_logs() as logs:
            for i in range(1000):
                reporter.dropped(event(f"m{i}"), "degraded" if i % 2 else "buffer_full")
            assert logs == []
            reporter.close()
        assert len(logs) == 1
        (line,) = logs
        assert line["event"] == "eventbus.dropped"
        assert line["dropped"] == 1000
        assert line["by_reason"] == {"buffer_full": 500, "degraded": 500}
        assert line["sample_message_ids"] == ["m0", "m1", "m2", "m3", "m4"]

    async def test_sentry_volume_is_capped_per_second(self, sentry_events: list[dict[str, Any]]) -> None:
        """At most sentry_rate drop events per second; the rest are counted in one summary event."""
        now = [100.0]
        reporter = Reporter(Counts("ex"), log_interval=60, sentry_rate=3, clock=lambda: now[0])
        for i in range(10):
            reporter.dropped(event(f"a{i}"), "degraded")
        now[0] = 101.2
        for i in range(2):
            reporter.dropped(event(f"b{i}"), "degraded")
        with capture_logs() as logs:
            reporter.close()
        sentry_sdk.flush()
        drops = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "degraded"]
        assert [e["extra"]["message_id"] for e in drops] == ["a0", "a1", "a2", "b0", "b1"]
        for e in drops:
            assert e["tags"]["eventbus.status"] == "degraded"
            assert e["tags"]["eventbus.routing_key"] == "track.uploaded"
        (summary,) = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "sentry_rate"]
        assert summary["extra"]["suppressed"] == 7
        assert summary["tags"]["eventbus.status"] == "degraded"
        assert logs[0]["sentry_suppressed"] == 7

    async def test_unroutable_has_its_own_status(self, sentry_events: list[dict[str, Any]]) -> None:
        """A returned event is reported with eventbus.status=unroutable, not degraded."""
        reporter = Reporter(Counts("ex"), log_interval=60, sentry_rate=3, clock=lambda: 0.0)
        reporter.dropped(event("r1"), "unroutable")
        reporter.close()
        sentry_sdk.flush()
        (only,) = sentry_events
        assert only["tags"]["eventbus.status"] == "unroutable"
        assert only["extra"]["message_id"] == "r1"

    def test_without_a_loop_one_line_per_interval(self) -> None:
        """Called with no event loop, drops still make at most one line per log_interval."""
        now = [0.0]
        reporter = Reporter(Counts("ex"), log_interval=5, sentry_rate=3, clock=lambda: now[0])
        with capture_logs() as logs:
            for i in range(100):
                now[0] = i * 0.1  # ten seconds of drops
                reporter.dropped(event(f"m{i}"), "degraded")
            reporter.close()
        assert [e["dropped"] for e in logs] == [1, 50, 49]

    async def test_summary_follows_within_the_log_interval(self) -> None:
        """Without close(), the summary is written by a timer after log_interval."""
        reporter = Reporter(Counts("ex"), log_interval=0.05, sentry_rate=3, clock=lambda: 0.0)
        with capture_logs() as logs:
            reporter.dropped(event("x"), "degraded")
            reporter.spooled_one(event("y"))
            await asyncio.sleep(0.15)
        assert [e["event"] for e in logs] == ["eventbus.dropped", "eventbus.spooled"]
        reporter.close()
