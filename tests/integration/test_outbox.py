"""The transactional outbox against the real Postgres and RabbitMQ, broker outages through the FaultProxy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from degrade import Registry, Severity
from degrade.eventbus import EventPublisher, Outbox, OutboxRelay
from degrade.testing import FaultProxy

from .eventbus_helpers import FAST, Received, Topology, proxy, topology, wait_for

pytestmark = pytest.mark.integration

__all__ = ["proxy"]  # a fixture, imported to be used here

#: Seconds the broker stays blackholed. The issue asks for 60 s; DEGRADE_LONG=1 runs that.
BLACKHOLE_S = 60.0 if os.environ.get("DEGRADE_LONG") == "1" else 5.0

#: Short relay bounds so outages show within a test's second.
RELAY_FAST: dict[str, Any] = {
    "poll_interval": 0.2,
    "db_timeout": 2.0,
    "backlog_interval": 0.2,
    "backoff_initial": 0.05,
    "backoff_max": 0.3,
}

PROC = Path(__file__).with_name("outbox_relay_proc.py")


@pytest.fixture
async def engine(postgres_dsn: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the real Postgres."""
    eng = create_async_engine(postgres_dsn)
    yield eng
    await eng.dispose()


@pytest.fixture
async def outbox(engine: AsyncEngine, unique: str) -> AsyncIterator[Outbox]:
    """The test's own outbox table, created, and dropped at teardown."""
    box = Outbox(f"{unique}_outbox")
    await box.create_table(engine)
    yield box
    await box.drop_table(engine)
    async with engine.connect() as conn:  # drop_table leaves nothing behind
        left = "SELECT to_regclass(:t) IS NULL AND to_regproc(:f) IS NULL"
        assert (await conn.execute(text(left), {"t": box.table, "f": f"{box.table}_notify"})).scalar()


@pytest.fixture
async def broker(amqp_url: str, unique: str) -> AsyncIterator[Topology]:
    """The test's exchange and a queue bound to it with ``#``."""
    async with topology(amqp_url, unique, binding="#") as topo:
        yield topo


async def consume(topo: Topology, want: set[str], *, within: float, settle: float = 0.5) -> Received:
    """Consume (pushed, not polled) until every id in ``want`` arrived, then ``settle`` more seconds."""
    received = Received()
    complete = asyncio.Event()

    async def on_message(message: Any) -> None:
        received.messages.append(message)
        if want <= set(received.ids):
            complete.set()

    tag = await topo.queue.consume(on_message, no_ack=True)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await complete.wait()
        await asyncio.sleep(settle)  # duplicates would arrive now
    finally:
        await topo.queue.cancel(tag)
    return received


def first_ids_by_key(received: Received) -> dict[str, list[int]]:
    """Per routing key, the row ids in the order they were first delivered."""
    seen: set[str] = set()
    out: dict[str, list[int]] = {}
    for message in received.messages:
        if message.message_id in seen:
            continue
        seen.add(message.message_id)
        out.setdefault(message.routing_key, []).append(int(message.message_id))
    return out


async def backlog(engine: AsyncEngine, outbox: Outbox) -> int:
    """Rows left in the table."""
    async with engine.connect() as conn:
        count = text(f"SELECT count(*) FROM {outbox.table}")  # noqa: S608 - the test's own table
        return int((await conn.execute(count)).scalar_one())


async def add_rows(engine: AsyncEngine, outbox: Outbox, n: int, keys: int = 4, start: int = 0) -> list[int]:
    """Commit ``n`` events over ``keys`` routing keys, ten per transaction; their ids."""
    ids: list[int] = []
    for base in range(start, start + n, 10):
        async with engine.begin() as conn:
            for i in range(base, min(base + 10, start + n)):
                ids.append(await outbox.add(conn, f"k.{i % keys}", {"i": i}))
    return ids


class TestTransactions:
    """add() belongs to the caller's transaction."""

    async def test_rolled_back_transaction_publishes_nothing(
        self, engine: AsyncEngine, outbox: Outbox, broker: Topology, amqp_url: str
    ) -> None:
        """Rows of a rolled-back transaction are never published; the committed ones are, in order."""
        async with engine.connect() as conn, conn.begin() as tx:
            await outbox.add(conn, "k.rolled", {"n": 0})
            await tx.rollback()
        async with AsyncSession(engine) as session, session.begin():
            kept = await outbox.add(session, "k.kept", {"n": 1}, headers={"h": "v"})
            more = await outbox.add_many(session, [("k.kept", {"n": 2}), ("k.kept", b"raw", {"x": 1})])
        async with OutboxRelay(outbox, engine, EventPublisher(amqp_url, broker.exchange, **FAST)) as relay:
            received = await broker.consume(3, within=10.0, settle=0.5)
            assert relay.stats().published == 3
        assert [m.routing_key for m in received.messages] == ["k.kept"] * 3
        assert [m.message_id for m in received.messages] == [str(kept), *map(str, more)]
        assert json.loads(received.messages[0].body) == {"n": 1}
        assert received.messages[0].headers == {"h": "v"}
        assert received.messages[2].body == b"raw"
        assert received.messages[2].content_type == "application/octet-stream"
        assert await backlog(engine, outbox) == 0

    async def test_notify_wakes_the_relay(
        self, engine: AsyncEngine, outbox: Outbox, broker: Topology, amqp_url: str
    ) -> None:
        """With a long poll interval, a commit is published at once: LISTEN/NOTIFY woke the relay."""
        publisher = EventPublisher(amqp_url, broker.exchange, **FAST)
        async with OutboxRelay(outbox, engine, publisher, poll_interval=30.0) as relay:
            await wait_for(lambda: relay.stats().listening and relay.phase == "idle", within=10.0)
            async with engine.begin() as conn:
                row_id = await outbox.add(conn, "k.wake", {})
            received = await broker.consume({str(row_id)}, within=5.0)
        assert received.ids == [str(row_id)]


class TestBrokerOutage:
    """RabbitMQ blackholed: rows wait, the backlog shows, everything goes out in order on recovery."""

    async def test_blackhole_then_heal_delivers_every_row_in_order(  # noqa: PLR0917 - fixtures
        self,
        engine: AsyncEngine,
        outbox: Outbox,
        broker: Topology,
        amqp_url: str,
        proxy: FaultProxy,
        registry: Registry,
    ) -> None:
        """Every row committed before, during and after the blackhole is delivered, in id order per key."""
        rabbit = registry.dependency("rabbitmq", severity=Severity.SEV2)
        publisher = EventPublisher(proxy.url_for(amqp_url), broker.exchange, dependency=rabbit, **FAST)
        relay = OutboxRelay(outbox, engine, publisher, batch_size=50, **RELAY_FAST)
        await relay.start()
        try:
            ids = await add_rows(engine, outbox, 100)
            await wait_for(lambda: relay.stats().published >= 100, within=10.0)
            proxy.blackhole()
            loop = asyncio.get_running_loop()
            end = loop.time() + BLACKHOLE_S
            n = 100
            while loop.time() < end:
                ids += await add_rows(engine, outbox, 20, start=n)
                n += 20
                await asyncio.sleep(0.1)
            assert rabbit.is_down
            assert relay.stats().backlog > 0
            assert relay.stats().oldest_s > 0
            proxy.up()
            ids += await add_rows(engine, outbox, 50, start=n)
            await wait_for(lambda: not rabbit.is_down, within=15.0)
            received = await consume(broker, {str(i) for i in ids}, within=30.0, settle=0.5)
        finally:
            await relay.aclose()
        assert {str(i) for i in ids} == set(received.ids)
        for key, order in first_ids_by_key(received).items():
            assert order == sorted(order), key
        assert await backlog(engine, outbox) == 0
        # No busy loop: while RabbitMQ was down the relay tried about once per recovery interval.
        assert relay.stats().broker_failures <= 10 + 4 * BLACKHOLE_S


class TestPostgresOutage:
    """Postgres refused: add() fails with the transaction; the relay waits for the database and resumes."""

    async def test_add_fails_and_relay_waits_for_postgres(  # noqa: PLR0917 - fixtures
        self,
        engine: AsyncEngine,
        outbox: Outbox,
        broker: Topology,
        amqp_url: str,
        postgres_dsn: str,
        pg_proxy: FaultProxy,
        registry: Registry,
    ) -> None:
        """add() raises on a refused database; the relay holds while db is down, then delivers what waited."""
        db = registry.dependency("db", severity=Severity.SEV1)
        proxied = create_async_engine(pg_proxy.url_for(postgres_dsn), connect_args={"timeout": 1.0})
        relay = OutboxRelay(
            outbox, proxied, EventPublisher(amqp_url, broker.exchange, **FAST), db=db, **RELAY_FAST
        )
        try:
            await relay.start()
            pg_proxy.refuse()
            with pytest.raises(OSError):
                async with proxied.begin() as conn:
                    await outbox.add(conn, "k.lost", {})
            ids = await add_rows(engine, outbox, 30)  # committed by another pod, straight to Postgres
            await wait_for(lambda: db.is_down, within=10.0)
            failures = relay.stats().db_failures
            await asyncio.sleep(2.0)
            # Held while db is down: about one trial per recovery interval, no busy loop.
            assert relay.stats().db_failures - failures <= 8
            pg_proxy.up()
            received = await consume(broker, {str(i) for i in ids}, within=15.0, settle=0.3)
        finally:
            await relay.aclose()
            await proxied.dispose()
        assert sorted(received.ids, key=int) == [str(i) for i in ids]
        assert not db.is_down


class TestCrashes:
    """A relay killed mid-batch loses nothing; two relays never deliver a row twice."""

    async def test_sigkill_mid_batch_loses_nothing(
        self,
        engine: AsyncEngine,
        outbox: Outbox,
        broker: Topology,
        amqp_url: str,
        postgres_dsn: str,
    ) -> None:
        """After a SIGKILL mid-batch and a new relay, no row is lost; a repeat has the same id and body."""
        ids = await add_rows(engine, outbox, 3000, keys=3)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(PROC),
            postgres_dsn,
            amqp_url,
            broker.exchange,
            outbox.table,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=20.0)
            assert line.strip() == b"started"
            for _ in range(2000):  # kill once the first batches are out and the next is in flight
                if await broker.count() >= 500:
                    break
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        left = await backlog(engine, outbox)
        assert 0 < left < 3000  # killed mid-way: some rows went out, some wait
        publisher = EventPublisher(amqp_url, broker.exchange, **FAST)
        async with OutboxRelay(outbox, engine, publisher, **RELAY_FAST):
            received = await consume(broker, {str(i) for i in ids}, within=30.0, settle=0.5)
        assert {str(i) for i in ids} == set(received.ids)
        index = {row_id: i for i, row_id in enumerate(ids)}
        for message in received.messages:  # a repeat is the same event: same id, same body
            assert json.loads(message.body)["i"] == index[int(message.message_id)]
        for key, order in first_ids_by_key(received).items():
            assert order == sorted(order), key
        assert await backlog(engine, outbox) == 0

    async def test_two_relays_never_deliver_a_row_twice(
        self, engine: AsyncEngine, outbox: Outbox, broker: Topology, amqp_url: str
    ) -> None:
        """Two relays on one table share the work (per routing key) and deliver each row once, in order."""
        relays = [
            OutboxRelay(
                outbox, engine, EventPublisher(amqp_url, broker.exchange, **FAST), batch_size=50, **RELAY_FAST
            )
            for _ in range(2)
        ]
        for relay in relays:
            await relay.start()
        try:
            ids = await add_rows(engine, outbox, 2000, keys=8)
            received = await consume(broker, {str(i) for i in ids}, within=30.0, settle=1.0)
        finally:
            for relay in relays:
                await relay.aclose()
        assert received.duplicates == 0
        assert sorted(received.ids, key=int) == [str(i) for i in ids]
        assert all(relay.stats().published > 0 for relay in relays)
        for key, order in first_ids_by_key(received).items():
            assert order == sorted(order), key
