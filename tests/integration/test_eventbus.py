"""EventPublisher against the real RabbitMQ, outages through the FaultProxy."""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import httpx
import prometheus_client
import pytest
import sentry_sdk
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from degrade import Registry, Severity, checks
from degrade.eventbus import EventPublisher, PublishResult
from degrade.testing import FaultProxy

from .eventbus_helpers import Topology, make_bus, proxy, topology, wait_for

pytestmark = pytest.mark.integration

__all__ = ["make_bus", "proxy"]  # fixtures, imported to be used here


@pytest.fixture
async def broker(amqp_url: str, unique: str) -> AsyncIterator[Topology]:
    """The test's exchange and a queue bound to it with ``track.#``."""
    async with topology(amqp_url, unique, binding="track.#") as topo:
        yield topo


def established_to(port: int) -> int:
    """Client-side TCP connections of this machine to ``port`` in state ESTABLISHED (Linux /proc)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                    count += 1
    return count


async def publish_timed(
    bus: EventPublisher, n: int, *, prefix: str = "m", key: str = "track.up"
) -> list[float]:
    """Publish ``n`` events with ids ``prefix0..``; return each call's duration in seconds."""
    took = []
    for i in range(n):
        start = time.perf_counter()
        await bus.publish(key, {"i": i}, message_id=f"{prefix}{i}")
        took.append(time.perf_counter() - start)
    return took


class TestDelivery:
    async def test_events_arrive_with_their_properties(self, broker: Topology, make_bus: Any) -> None:
        """Mapping and bytes events arrive persistent, with id, timestamp, content type and headers."""
        bus = make_bus(broker.url, broker.exchange)
        async with bus:
            before = time.time()
            r1 = await bus.publish("track.uploaded", {"track": 7}, message_id="id-7", headers={"tenant": "a"})
            r2 = await bus.publish("track.raw", b"\x00\x01")
            received = await broker.consume(2)
        assert (r1, r2) == (PublishResult.QUEUED, PublishResult.QUEUED)
        first, second = received.messages
        assert json.loads(first.body) == {"track": 7}
        assert first.message_id == "id-7"
        assert first.content_type == "application/json"
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert first.headers == {"tenant": "a"}
        assert first.timestamp.timestamp() >= int(before)
        assert first.routing_key == "track.uploaded"
        assert second.body == b"\x00\x01"
        assert second.content_type == "application/octet-stream"
        assert len(second.message_id) == 32
        assert bus.stats().confirmed == 2

    async def test_unroutable_event_is_reported(
        self, broker: Topology, make_bus: Any, sentry_events: list[dict[str, Any]]
    ) -> None:
        """An event no queue is bound for comes back from the broker and is reported, not lost silently."""
        bus = make_bus(broker.url, broker.exchange)
        with capture_logs() as logs:
            async with bus:
                await bus.publish("nobody.listens", {}, message_id="lost-1")
                await wait_for(lambda: bus.stats().dropped == 1)
        sentry_sdk.flush()
        assert bus.stats().dropped_by_reason == {"unroutable": 1}
        (summary,) = [e for e in logs if e["event"] == "eventbus.dropped"]
        assert summary["sample_message_ids"] == ["lost-1"]
        (event,) = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "unroutable"]
        assert event["tags"]["eventbus.status"] == "unroutable"
        assert event["tags"]["eventbus.routing_key"] == "nobody.listens"
        assert event["extra"]["message_id"] == "lost-1"

    async def test_many_confirms_in_flight(self, broker: Topology, proxy: FaultProxy, make_bus: Any) -> None:
        """With 100 ms of round trip, 200 events confirm in a fraction of 200 round trips."""
        proxy.latency(0.05)
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, confirm_timeout=2.0, connect_timeout=2.0)
        async with bus:
            await wait_for(lambda: bus.connected)
            took = await publish_timed(bus, 200)
            elapsed = await wait_for(lambda: bus.stats().confirmed == 200, within=15)
            received = await broker.consume(200)
        assert sum(took) < 0.1  # all 200 calls together took less than one round trip: none waited
        assert elapsed < 5.0  # one at a time would take >= 20 s
        assert sorted(received.ids) == sorted(f"m{i}" for i in range(200))
        proxy.up()


class TestOutages:
    async def test_refused_broker_then_recovery(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """Refused: events wait in the buffer (no drop before degrade_after) and flow once it is back."""
        proxy.refuse()
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, degrade_after=30)
        with capture_logs() as logs:
            async with bus:
                took = await publish_timed(bus, 20)
                await asyncio.sleep(0.5)
                assert await broker.count() == 0
                assert not bus.degraded
                proxy.up()
                received = await broker.consume(20)
        assert max(took) < 0.1  # far below any wait on the broker (connect_timeout 0.5 s): none waited
        assert sorted(received.ids) == sorted(f"m{i}" for i in range(20))
        assert bus.stats().dropped == 0
        names = [e["event"] for e in logs]
        assert names.count("eventbus.unreachable") == 1
        assert "eventbus.reconnected" in names
        assert names.count("eventbus.retry") >= 2

    async def test_blackholed_connects_are_bounded(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """A silent broker: each connect attempt ends at connect_timeout, none lingers, recovery follows."""
        proxy.blackhole()
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, degrade_after=30)
        with capture_logs() as logs:
            await bus.start()
            took = await publish_timed(bus, 10)
            await asyncio.sleep(1.3)
            retries = [e for e in logs if e["event"] == "eventbus.retry"]
            assert retries
            assert {e["error"] for e in retries} == {"TimeoutError"}
            # attempts time out and close their socket, no task of theirs lingers:
            # at most the current attempt is alive (the proxy itself holds the
            # frozen server sides until up(), as a partitioned network would)
            assert established_to(proxy.port) <= 1
            attempts = [
                t
                for t in asyncio.all_tasks()
                if getattr(t.get_coro(), "__qualname__", "") == "Connection.connect"
            ]
            assert len(attempts) <= 1  # aiormq's handshake task of the attempt running now, if any
            proxy.up()
            received = await broker.consume(10)
            await bus.close()
        assert max(took) < 0.1  # far below any wait on the broker (connect_timeout 0.5 s): none waited
        assert sorted(set(received.ids)) == sorted(f"m{i}" for i in range(10))
        await wait_for(lambda: proxy.stats().open == 0)

    async def test_stalled_broker_mid_stream(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """Blackholed while connected: the confirm bound notices, events are sent again after recovery."""
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, degrade_after=30)
        with capture_logs() as logs:
            async with bus:
                await wait_for(lambda: bus.connected)
                proxy.blackhole()
                took = await publish_timed(bus, 10)
                noticed = await wait_for(lambda: not bus.connected, within=3)
                proxy.up()
                received = await broker.consume({f"m{i}" for i in range(10)}, settle=0.3)
        assert max(took) < 0.1  # far below any wait on the broker (connect_timeout 0.5 s): none waited
        assert noticed < 3.0  # confirm_timeout 0.5 s (+ a watchdog tick), not aiormq's (1 + 1) * 3 = 6 s
        assert set(received.ids) == {f"m{i}" for i in range(10)}
        assert bus.stats().resent >= 1
        lost = [e for e in logs if e["event"] == "eventbus.connection_lost"]
        assert lost
        assert lost[0]["error"] == "TimeoutError"

    async def test_reset_mid_stream(self, broker: Topology, proxy: FaultProxy, make_bus: Any) -> None:
        """Connections reset while events flow: every event still arrives (duplicates allowed)."""
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, degrade_after=30)
        async with bus:
            await wait_for(lambda: bus.connected)

            async def produce() -> None:
                for i in range(300):
                    await bus.publish("track.up", {"i": i}, message_id=f"m{i}")
                    if i % 10 == 0:
                        await asyncio.sleep(0.005)

            producer = asyncio.create_task(produce())
            for _ in range(3):
                await asyncio.sleep(0.05)
                proxy.reset()
            await producer
            received = await broker.consume({f"m{i}" for i in range(300)}, within=15)
        assert set(received.ids) == {f"m{i}" for i in range(300)}
        assert bus.stats().dropped == 0

    async def test_latency_without_connection_loss(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """A slow broker (latency under the bounds) costs no reconnect and no loss; removing it speeds up."""
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, confirm_timeout=2.0, connect_timeout=2.0)
        with capture_logs() as logs:
            async with bus:
                await wait_for(lambda: bus.connected)
                proxy.latency(0.2)
                await publish_timed(bus, 20)
                slow = await wait_for(lambda: bus.stats().confirmed == 20, within=5)
                proxy.up()
                await publish_timed(bus, 20, prefix="n")
                fast = await wait_for(lambda: bus.stats().confirmed == 40, within=5)
                received = await broker.consume(40)
        assert slow >= 0.3
        assert fast < slow
        assert len(set(received.ids)) == 40
        assert not [e for e in logs if e["event"] == "eventbus.connection_lost"]


class TestDegradedMode:
    async def test_degraded_drops_are_reported_then_recovery(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, sentry_events: list[dict[str, Any]]
    ) -> None:
        """Past degrade_after: dependency down, drops counted, logged, tagged in Sentry; recovery ends it."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        proxy.refuse()
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, dependency=dep, degrade_after=0.3)
        with capture_logs() as logs:
            async with bus:
                await publish_timed(bus, 3, prefix="early")
                took = await wait_for(lambda: bus.degraded)
                assert dep.is_down
                results = [await bus.publish("track.up", {}, message_id=f"late{i}") for i in range(5)]
                await asyncio.sleep(0.3)  # one summary interval
                proxy.up()
                await wait_for(lambda: not bus.degraded)
                assert not dep.is_down
                assert await bus.publish("track.up", {}, message_id="after") is PublishResult.QUEUED
                received = await broker.consume(1)
        await registry.aclose()
        sentry_sdk.flush()
        assert 0.25 <= took < 1.5
        assert results == [PublishResult.DROPPED] * 5
        assert received.ids == ["after"]
        assert bus.stats().dropped_by_reason == {"degraded": 8}
        drops = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "degraded"]
        assert {e["extra"]["message_id"] for e in drops} == {f"early{i}" for i in range(3)} | {
            f"late{i}" for i in range(5)
        }
        for event in drops:
            assert event["tags"]["eventbus.status"] == "degraded"
            assert event["tags"]["eventbus.routing_key"] == "track.up"
        summaries = [e for e in logs if e["event"] == "eventbus.dropped"]
        assert sum(e["dropped"] for e in summaries) == 8
        assert len(summaries) <= 3
        (recovered,) = [e for e in logs if e["event"] == "eventbus.recovered"]
        assert recovered["dropped"] == 8
        value = prometheus_client.REGISTRY.get_sample_value(
            "degrade_eventbus_dropped_total", {"exchange": broker.exchange, "reason": "degraded"}
        )
        assert value == 8

    async def test_one_state_machine_one_report_per_transition(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, sentry_events: list[dict[str, Any]]
    ) -> None:
        """Refused connects trip the dependency by its own rule before degrade_after; Sentry gets its
        down and recovered events once each and no transition event of the publisher's."""
        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        proxy.refuse()
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, dependency=dep, degrade_after=1.0)
        with capture_logs() as logs:
            async with bus:
                assert await bus.publish("track.up", {}, message_id="held") is PublishResult.QUEUED
                await wait_for(lambda: dep.is_down)
                assert not bus.degraded  # still buffering: the policy waits for degrade_after
                await wait_for(lambda: bus.degraded)
                proxy.up()
                await wait_for(lambda: not dep.is_down and not bus.degraded)
                assert await bus.publish("track.up", {}, message_id="after") is PublishResult.QUEUED
                received = await broker.consume(1)
        await registry.aclose()
        sentry_sdk.flush()
        assert received.ids == ["after"]
        transitions = [
            (e["tags"]["degrade.dependency"], e["tags"]["degrade.transition"])
            for e in sentry_events
            if "degrade.transition" in e["tags"]
        ]
        assert transitions == [("rabbitmq", "down"), ("rabbitmq", "recovered")]
        assert not [e for e in sentry_events if "eventbus.transition" in e["tags"]]
        assert [e["extra"]["message_id"] for e in sentry_events if e["tags"].get("eventbus.reason")] == [
            "held"
        ]
        (down,) = [e for e in logs if e["event"] == "dependency.down"]
        assert (down["reason"], down["error"]) == ("traffic", "AMQPConnectionError")

    async def test_a_check_owns_the_broker_while_down(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """With checks.amqp on the dependency, its probe alone touches the broker while it is down;
        the sender connects as soon as the probe brings the dependency back."""
        url = proxy.url_for(broker.url)
        probes = 0
        amqp_check = checks.amqp(url, timeout=0.5)

        async def check() -> None:
            nonlocal probes
            probes += 1
            await amqp_check()

        registry = Registry()
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2, check=check, recovery_interval=0.1)
        proxy.refuse()
        bus = make_bus(url, broker.exchange, dependency=dep, degrade_after=0.3)
        async with bus:
            await wait_for(lambda: bus.degraded)
            attempts, probed = bus._sender.attempts, probes
            await asyncio.sleep(0.6)
            assert bus._sender.attempts == attempts  # held: no connect attempt of its own
            assert probes >= probed + 3
            proxy.up()
            took = await wait_for(lambda: bus.connected)
            assert not dep.is_down
            assert not bus.degraded
            assert await bus.publish("track.up", {}, message_id="after") is PublishResult.QUEUED
            received = await broker.consume(1)
        await registry.aclose()
        assert took < 1.5  # about one probe interval, then one connect
        assert received.ids == ["after"]

    async def test_full_buffer_drops_before_degraded_mode(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, sentry_events: list[dict[str, Any]]
    ) -> None:
        """A full buffer drops at once (reason buffer_full, tagged degraded); what it holds is sent later."""
        proxy.refuse()
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, buffer_size=5, degrade_after=30)
        async with bus:
            results = [await bus.publish("track.up", {}, message_id=f"m{i}") for i in range(8)]
            proxy.up()
            received = await broker.consume(5)
        sentry_sdk.flush()
        assert results == [PublishResult.QUEUED] * 5 + [PublishResult.DROPPED] * 3
        assert sorted(received.ids) == [f"m{i}" for i in range(5)]
        drops = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "buffer_full"]
        assert sorted(e["extra"]["message_id"] for e in drops) == ["m5", "m6", "m7"]
        assert {e["tags"]["eventbus.status"] for e in drops} == {"degraded"}

    async def test_app_runs_with_the_broker_down_throughout(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """Start, serve and shut down through registry.lifespan while RabbitMQ is refused the whole time."""
        proxy.refuse()
        registry = Registry(shutdown_timeout=5)
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        bus = registry.manage(
            make_bus(proxy.url_for(broker.url), broker.exchange, dependency=dep, degrade_after=0.2)
        )
        assert isinstance(bus, EventPublisher)

        async def upload(request: Request) -> JSONResponse:
            result = await bus.publish("track.uploaded", {"id": 1})
            return JSONResponse({"event": result.value}, status_code=202)

        app = Starlette(routes=[Route("/upload", upload, methods=["POST"])])
        before = asyncio.all_tasks()
        started = time.monotonic()
        async with registry.lifespan(app):
            assert time.monotonic() - started < 0.5  # start never waits on the broker
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
            async with client:
                first = await client.post("/upload")
                await wait_for(lambda: bus.degraded)
                later = await client.post("/upload")
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 3
        assert (first.status_code, first.json()) == (202, {"event": "queued"})
        assert (later.status_code, later.json()) == (202, {"event": "dropped"})
        assert dep.is_down
        assert asyncio.all_tasks() - before == set()


#: Past confirm_timeout (5 s) plus a watchdog tick (1.25 s): the stall is seen before the deadline.
#: A longer one only makes the test longer.
SILENCE_DEGRADE_AFTER = 8.0
#: Generous on 2 shared CPUs (the timer, the 5 ms polling, a late loop), and still less than the
#: confirm_timeout by which degraded mode used to come late.
SILENCE_MARGIN = 2.0


class TestDegradeAfterCountsFromSilence:
    async def test_blackholed_mid_stream_degrades_degrade_after_from_the_first_unanswered_publish(
        self, broker: Topology, proxy: FaultProxy
    ) -> None:
        """Default bounds: blackholed while publishing, degraded mode begins degrade_after after the
        first publish the broker left unanswered, not after the confirm bound noticed it (5-6.25 s later)."""
        confirm_timeout = inspect.signature(EventPublisher).parameters["confirm_timeout"].default
        assert confirm_timeout == 5.0
        bus = EventPublisher(proxy.url_for(broker.url), broker.exchange, degrade_after=SILENCE_DEGRADE_AFTER)
        published: list[float] = []  # monotonic time of each publish() call
        stop = asyncio.Event()

        async def produce() -> None:
            i = 0
            while not stop.is_set():
                published.append(time.monotonic())
                await bus.publish("track.up", {"i": i}, message_id=f"m{i}")
                i += 1
                await asyncio.sleep(0.02)

        with capture_logs() as logs:
            await bus.start()
            producer = asyncio.create_task(produce())
            try:
                await wait_for(lambda: bus.stats().confirmed >= 10, within=15)  # the broker answers
                proxy.blackhole()
                blackholed = time.monotonic()
                await wait_for(lambda: not bus.connected, within=2 * confirm_timeout)
                noticed = time.monotonic()
                await wait_for(lambda: bus.degraded, within=SILENCE_DEGRADE_AFTER + 2 * confirm_timeout)
                degraded = time.monotonic()
            finally:
                stop.set()
                await producer
                await bus.close(timeout=0)
                proxy.up()
        first = next(t for t in published if t >= blackholed)  # the first publish left unanswered
        since_first, noticed_after = degraded - first, noticed - first
        print(
            f"blackholed mid-stream: loss noticed {noticed_after:.3f} s and degraded mode began "
            f"{since_first:.3f} s after the first unanswered publish "
            f"(degrade_after {SILENCE_DEGRADE_AFTER:g} s, confirm_timeout {confirm_timeout:g} s; loss: "
            f"{[e['error'] for e in logs if e['event'] == 'eventbus.connection_lost'][:1]})"
        )
        # the loss is noticed seconds later: at the confirm bound (plus up to a watchdog tick), or
        # earlier when the broker's heartbeat timeout resets the connection through the proxy ...
        assert noticed_after <= 1.25 * confirm_timeout + SILENCE_MARGIN
        # ... but degraded mode counts degrade_after from the silence itself:
        assert SILENCE_DEGRADE_AFTER - 0.5 <= since_first <= SILENCE_DEGRADE_AFTER + SILENCE_MARGIN
        # counted from the notice it would have begun at degrade_after + 5-6.25 s
        assert since_first < SILENCE_DEGRADE_AFTER + confirm_timeout - SILENCE_MARGIN
        (entered,) = [e for e in logs if e["event"] == "eventbus.degraded"]
        # the publisher's own count: from the oldest unconfirmed send to degraded mode, never early
        assert (
            SILENCE_DEGRADE_AFTER - 0.01 <= entered["unreachable_s"] <= SILENCE_DEGRADE_AFTER + SILENCE_MARGIN
        )
        (lost,) = [e for e in logs if e["event"] == "eventbus.connection_lost"][:1]
        assert lost["silent_s"] == pytest.approx(noticed_after, abs=0.5)
        assert bus.stats().dropped_by_reason["degraded"] >= 1


class TestShutdown:
    async def test_close_flushes_within_its_timeout(self, broker: Topology, make_bus: Any) -> None:
        """close() right after 500 publishes waits for their confirms; every one arrives."""
        bus = make_bus(broker.url, broker.exchange)
        await bus.start()
        await wait_for(lambda: bus.connected)
        await publish_timed(bus, 500)
        started = time.monotonic()
        await bus.close(timeout=10)
        assert time.monotonic() - started < 10
        assert bus.stats().confirmed == 500
        assert bus.stats().dropped == 0
        received = await broker.consume(500)
        assert len(set(received.ids)) == 500

    async def test_close_with_a_stalled_broker_is_bounded(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any
    ) -> None:
        """Stalled broker at shutdown: close() returns within its bounds, the rest is dropped and reported."""
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, confirm_timeout=30, degrade_after=30)
        await bus.start()
        await wait_for(lambda: bus.connected)
        proxy.blackhole()
        await publish_timed(bus, 20)
        before = asyncio.all_tasks()
        with capture_logs() as logs:
            started = time.monotonic()
            await bus.close(timeout=0.3)
            took = time.monotonic() - started
        assert took < 1.5  # the flush bound, then the stalled connection is cut, not awaited
        assert bus.stats().dropped_by_reason == {"shutdown": 20}
        (closed,) = [e for e in logs if e["event"] == "eventbus.closed"]
        assert closed["shutdown_leftovers"] == 20
        assert not [t for t in asyncio.all_tasks() - before if "eventbus" in t.get_name()]
        proxy.up()

    async def test_exchange_type_clash_is_reported_not_fatal(
        self, amqp_url: str, unique: str, make_bus: Any
    ) -> None:
        """An exchange declared with another type: the sender logs the error and keeps the app running."""
        name = f"{unique}.direct"
        connection = await aio_pika.connect(amqp_url, timeout=5)
        try:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(name, "direct", durable=True)
            bus = make_bus(amqp_url, name, exchange_type="topic")
            with capture_logs() as logs:
                async with bus:
                    assert await bus.publish("a", {}) is PublishResult.QUEUED
                    await wait_for(lambda: any(e["event"] == "eventbus.sender_error" for e in logs))
            (error,) = [e for e in logs if e["event"] == "eventbus.sender_error"][:1]
            assert error["error"] == "ChannelPreconditionFailed"
        finally:
            await exchange.delete(timeout=5)
            await connection.close()
