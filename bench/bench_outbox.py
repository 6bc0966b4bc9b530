"""Transactional outbox benchmark: relay throughput against raw aio-pika, and what add() costs.

Run (against the Postgres at ``BENCH_PG_DSN``, default
``postgresql+asyncpg://postgres@127.0.0.1:5432/test``, and the RabbitMQ at
``DEGRADE_BENCH_AMQP``)::

    .venv/bin/python bench/bench_outbox.py                 # ~30 s of throughput repeats
    .venv/bin/python bench/bench_outbox.py --duration 60   # longer, steadier
    .venv/bin/python bench/bench_outbox.py --smoke         # a few seconds, too noisy to quote

What is measured:

* **Relay throughput**: one :class:`~degrade.eventbus.OutboxRelay` (batches
  of 500, 100 publishes in flight), started and connected, then N rows
  committed in one transaction (not timed); from the commit (whose NOTIFY
  wakes the relay) to the N-th row confirmed and deleted, against raw
  aio-pika publishing the same message with publisher confirms, 100 publishes
  in flight (``asyncio.gather`` of 100, batch after batch; the event bus
  bench's case). Cases interleaved, repeated for ``--duration`` seconds;
  medians compared. Goal: relay >= 0.8x raw.
* **add() statements**: SQLAlchemy ``before_cursor_execute`` events counted
  while 100 ``add()`` and one ``add_many()`` of 100 run in one transaction.
  Goal: one statement per ``add()``, one per ``add_many()``. Its time per
  event is shown too (a round trip to Postgres each; not a goal).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from degrade.eventbus import EventPublisher, Outbox, OutboxRelay

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import format_table
from bench_eventbus import AMQP_URL, PAYLOAD, Broker, load, quiet, run_raw_in_flight, wait_until

PG_DSN = os.environ.get("BENCH_PG_DSN", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
RELAY_GOAL = 0.8
KEYS = 8


async def fill(engine: AsyncEngine, outbox: Outbox, n: int) -> None:
    """Commit ``n`` events over ``KEYS`` routing keys in one transaction, 1,000 per add_many()."""
    async with engine.begin() as conn:
        for base in range(0, n, 1000):
            events = [(f"track.{i % KEYS}", PAYLOAD) for i in range(base, min(n, base + 1000))]
            await outbox.add_many(conn, events)


async def run_relay(engine: AsyncEngine, outbox: Outbox, broker: Broker, n: int) -> tuple[float, float]:
    """Messages a second from the commit of n rows to the n-th published, and CPU us per message.

    The relay is started and connected first (as the raw case connects before
    its timing starts); the commit's NOTIFY wakes it.
    """
    publisher = EventPublisher(AMQP_URL, broker.name, declare_exchange=False)
    relay = OutboxRelay(outbox, engine, publisher, batch_size=500, max_in_flight=100, backlog_interval=60.0)
    await relay.start()
    try:
        if not await wait_until(lambda: relay.stats().connected and relay.stats().listening, 30):
            raise RuntimeError("the relay did not connect")
        await fill(engine, outbox, n)
        cpu, start = time.process_time(), time.perf_counter()
        if not await wait_until(lambda: relay.stats().published >= n, 120):
            raise RuntimeError(f"only {relay.stats().published} of {n} published")
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        await relay.aclose()
    return n / elapsed, cpu / n * 1e6


async def count_statements(engine: AsyncEngine, outbox: Outbox) -> list[list[str]]:
    """Rows of the add() table: statements per event and microseconds per event."""
    seen: list[str] = []

    def on_execute(*args: Any) -> None:
        seen.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", on_execute)
    rows = []
    try:
        async with engine.connect() as conn:  # one transaction, rolled back at the end
            await outbox.add(conn, "warm.up", PAYLOAD)  # prepared statements made outside the timing
            await outbox.add_many(conn, [("warm.up", PAYLOAD)] * 100)
            seen.clear()
            start = time.perf_counter()
            for _ in range(100):
                await outbox.add(conn, "track.1", PAYLOAD)
            took = (time.perf_counter() - start) / 100
            adds = len(seen)
            seen.clear()
            start = time.perf_counter()
            await outbox.add_many(conn, [("track.1", PAYLOAD)] * 100)
            took_many = (time.perf_counter() - start) / 100
            many = len(seen)
            await conn.rollback()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", on_execute)
    for name, statements, goal, us in (
        ("add() x 100", adds, 100, took),
        ("add_many() of 100", many, 1, took_many),
    ):
        verdict = "PASS" if statements == goal else "FAIL"
        rows.append([name, str(statements), str(goal), f"{us * 1e6:.0f}", verdict])
    return rows


async def main(args: argparse.Namespace) -> int:
    quiet()
    n = 1_000 if args.smoke else 5_000
    budget = 3.0 if args.smoke else args.duration
    engine = create_async_engine(PG_DSN, pool_size=4)
    outbox = Outbox(f"bench_outbox_{uuid.uuid4().hex[:8]}")
    await outbox.create_table(engine)
    load_before = load()
    rates: dict[str, list[float]] = {"relay": [], "raw": []}
    cpus: dict[str, list[float]] = {"relay": [], "raw": []}
    try:
        statement_rows = await count_statements(engine, outbox)
        async with Broker() as broker:
            await run_relay(engine, outbox, broker, min(n, 500))  # warm-up
            await run_raw_in_flight(broker, min(n, 500))
            await broker.purge()
            deadline = time.monotonic() + budget
            while not rates["raw"] or time.monotonic() < deadline:
                for name in ("relay", "raw"):
                    if name == "relay":
                        rate, cpu = await run_relay(engine, outbox, broker, n)
                    else:
                        rate, cpu = await run_raw_in_flight(broker, n)
                    rates[name].append(rate)
                    cpus[name].append(cpu)
                    await broker.purge()
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {outbox.table}"))
            await conn.execute(text(f"DROP FUNCTION IF EXISTS {outbox.table}_notify()"))
        await engine.dispose()
    ratio = statistics.median(rates["relay"]) / statistics.median(rates["raw"])
    passed = ratio >= RELAY_GOAL and all(row[-1] == "PASS" for row in statement_rows)
    print(f"load average before/after: {load_before} / {load()}; {len(rates['raw'])} repeats of {n} messages")
    print()
    print(
        format_table(
            ["case", "msg/s median", "msg/s best", "CPU us/msg (median)"],
            [
                [
                    label,
                    f"{statistics.median(rates[key]):,.0f}",
                    f"{max(rates[key]):,.0f}",
                    f"{statistics.median(cpus[key]):.0f}",
                ]
                for key, label in (
                    ("relay", "OutboxRelay (batches of 500, 100 in flight)"),
                    ("raw", "raw aio-pika, 100 publishes in flight"),
                )
            ],
        )
    )
    print()
    verdict = "PASS" if ratio >= RELAY_GOAL else "FAIL"
    print(f"relay / raw (median msg/s): {ratio:.2f}x, goal >= {RELAY_GOAL:g}x: {verdict}")
    print()
    print(format_table(["add()", "statements", "goal", "us per event", "verdict"], statement_rows))
    print()
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", "--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of throughput repeats")
    sys.exit(asyncio.run(main(parser.parse_args())))
