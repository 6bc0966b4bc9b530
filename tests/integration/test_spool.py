"""DiskSpool with the real RabbitMQ: nothing dropped is lost, even when the process is killed."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sentry_sdk
from structlog.testing import capture_logs

from degrade.eventbus import DiskSpool, PublishResult
from degrade.testing import FaultProxy

from .eventbus_helpers import Topology, make_bus, proxy, topology, wait_for

pytestmark = pytest.mark.integration

__all__ = ["make_bus", "proxy"]  # fixtures, imported to be used here


@pytest.fixture
async def broker(amqp_url: str, unique: str) -> AsyncIterator[Topology]:
    """The test's exchange and a queue bound to it."""
    async with topology(amqp_url, unique) as topo:
        yield topo


class TestSpool:
    async def test_degraded_events_are_spooled_and_replayed_in_order(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, tmp_path: Path
    ) -> None:
        """Degraded mode spools buffered and new events; they arrive in order once the broker is back."""
        proxy.refuse()
        bus = make_bus(
            proxy.url_for(broker.url), broker.exchange, degrade_after=0.2, spool=DiskSpool(tmp_path)
        )
        async with bus:
            early = [await bus.publish("track.up", {"i": i}, message_id=f"m{i:03}") for i in range(50)]
            await wait_for(lambda: bus.degraded)
            late = [await bus.publish("track.up", {"i": i}, message_id=f"m{i:03}") for i in range(50, 100)]
            proxy.up()
            received = await broker.consume(100)
            await wait_for(lambda: bus.stats().replayed == 100)
        assert early == [PublishResult.QUEUED] * 50
        assert late == [PublishResult.SPOOLED] * 50
        assert received.ids == [f"m{i:03}" for i in range(100)]
        assert bus.stats().spooled == 100
        assert bus.stats().dropped == 0
        assert bus.spool is not None
        assert bus.spool.size_bytes == 0  # replayed segments are deleted

    async def test_spool_is_replayed_at_the_next_start(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, tmp_path: Path
    ) -> None:
        """Events spooled by one run (broker down throughout) are delivered by the next run."""
        proxy.refuse()
        first = make_bus(
            proxy.url_for(broker.url), broker.exchange, degrade_after=0.1, spool=DiskSpool(tmp_path)
        )
        async with first:
            await wait_for(lambda: first.degraded)
            results = [await first.publish("track.up", {}, message_id=f"m{i}") for i in range(20)]
        assert results == [PublishResult.SPOOLED] * 20
        second = make_bus(broker.url, broker.exchange, spool=DiskSpool(tmp_path))
        with capture_logs() as logs:
            async with second:
                received = await broker.consume(20)
                await wait_for(lambda: second.stats().replayed == 20)
        assert received.ids == [f"m{i}" for i in range(20)]
        (started,) = [e for e in logs if e["event"] == "eventbus.started"]
        assert started["spool_backlog_bytes"] > 0

    async def test_full_spool_drops_and_reports(
        self,
        broker: Topology,
        proxy: FaultProxy,
        make_bus: Any,
        tmp_path: Path,
        sentry_events: list[dict[str, Any]],
    ) -> None:
        """Past max_bytes the spool refuses; the event is dropped as spool_full and tagged degraded."""
        proxy.refuse()
        spool = DiskSpool(tmp_path, max_bytes=2048)
        bus = make_bus(proxy.url_for(broker.url), broker.exchange, degrade_after=0.1, spool=spool)
        async with bus:
            await wait_for(lambda: bus.degraded)
            results = [
                await bus.publish("track.up", {"pad": "x" * 100}, message_id=f"m{i}") for i in range(30)
            ]
        sentry_sdk.flush()
        spooled = results.count(PublishResult.SPOOLED)
        assert 5 < spooled < 30
        assert results == [PublishResult.SPOOLED] * spooled + [PublishResult.DROPPED] * (30 - spooled)
        assert bus.stats().dropped_by_reason == {"spool_full": 30 - spooled}
        drops = [e for e in sentry_events if e["tags"].get("eventbus.reason") == "spool_full"]
        assert drops
        assert {e["tags"]["eventbus.status"] for e in drops} == {"degraded"}

    async def test_close_spools_what_it_could_not_send(
        self, broker: Topology, proxy: FaultProxy, make_bus: Any, tmp_path: Path
    ) -> None:
        """Unconfirmed events at shutdown go to the spool, and the next run delivers them."""
        bus = make_bus(
            proxy.url_for(broker.url),
            broker.exchange,
            confirm_timeout=30,
            degrade_after=30,
            spool=DiskSpool(tmp_path),
        )
        await bus.start()
        await wait_for(lambda: bus.connected)
        proxy.blackhole()
        for i in range(10):
            await bus.publish("track.up", {}, message_id=f"m{i}")
        started = time.monotonic()
        await bus.close(timeout=0.2)
        assert time.monotonic() - started < 1.5
        assert bus.stats().spooled == 10
        assert bus.stats().dropped == 0
        proxy.reset()  # the stalled connection's held publishes never reach the broker
        proxy.up()
        second = make_bus(broker.url, broker.exchange, spool=DiskSpool(tmp_path))
        async with second:
            received = await broker.consume({f"m{i}" for i in range(10)})
        assert set(received.ids) == {f"m{i}" for i in range(10)}


CHILD = textwrap.dedent(
    """
    import asyncio, sys
    import structlog
    from degrade.eventbus import DiskSpool, EventPublisher

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout is for the ids

    async def main(mode, url, exchange, path):
        spool = DiskSpool(path)
        bus = EventPublisher(url, exchange, spool=spool, degrade_after=0.5, connect_timeout=0.3,
                             backoff_initial=0.05, backoff_max=0.2, confirm_timeout=1.0)
        await bus.start()
        if mode == "drain":
            async with asyncio.timeout(30):
                while spool.backlog_bytes or bus.stats().in_flight:
                    await asyncio.sleep(0.02)
            await bus.close()
            print("drained", bus.stats().replayed, flush=True)
            return
        i = 0
        while True:  # publish until killed; a line per event once publish() has returned
            result = await bus.publish("track.up", {"i": i}, message_id=f"m{i}")
            print("EV", result.value, f"m{i}", "degraded" if bus.degraded else "-", flush=True)
            i += 1
            if i % 20 == 0:
                await asyncio.sleep(0.01)

    asyncio.run(main(*sys.argv[1:]))
    """
)


class TestZeroLoss:
    async def test_sigkill_loses_nothing(self, broker: Topology, proxy: FaultProxy, tmp_path: Path) -> None:
        """Killed with SIGKILL while spooling past degrade_after; a restart delivers every id it published."""
        script = tmp_path / "child.py"
        script.write_text(CHILD)
        spool_dir = str(tmp_path / "spool")
        proxy.blackhole()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            "publish",
            proxy.url_for(broker.url),
            broker.exchange,
            spool_dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert child.stdout is not None
        published: list[str] = []
        results: set[str] = set()
        spooled_after_degraded = 0
        try:
            async with asyncio.timeout(30):
                while spooled_after_degraded < 1000:
                    line = (await child.stdout.readline()).decode().split()
                    assert line, "the child exited early"
                    _, result, message_id, state = line
                    published.append(message_id)
                    results.add(result)
                    if result == "spooled" and state == "degraded":
                        spooled_after_degraded += 1
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        assert child.returncode == -signal.SIGKILL
        assert results == {"queued", "spooled"}  # nothing dropped

        proxy.up()
        started = time.monotonic()
        drain = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            "drain",
            proxy.url_for(broker.url),
            broker.exchange,
            spool_dir,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await asyncio.wait_for(drain.communicate(), timeout=40)
        assert drain.returncode == 0, out
        received = await broker.consume(set(published), within=20, settle=0.2)
        missing = set(published) - set(received.ids)
        assert not missing, f"{len(missing)} of {len(published)} lost"
        first_seen = list(dict.fromkeys(received.ids))
        assert first_seen == published  # replayed in the order they were published
        print(
            f"\nSIGKILL test: {len(published)} published, {len(received.ids)} received, "
            f"{received.duplicates} duplicates, replayed in {time.monotonic() - started:.1f}s"
        )
