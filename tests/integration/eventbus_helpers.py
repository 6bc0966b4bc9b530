"""Shared by the event bus integration tests: per-test topology, short bounds, a fault proxy.

Each test gets its own exchange and queue (named after the ``unique`` fixture),
both deleted afterwards; delivery is verified by consuming from the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from degrade.eventbus import EventPublisher
from degrade.testing import FaultProxy

__all__ = [
    "FAST",
    "Received",
    "Topology",
    "make_bus",
    "proxy",
    "topology",
    "wait_for",
]

#: Short bounds so outages show within a test's second.
FAST: dict[str, Any] = {
    "connect_timeout": 0.5,
    "confirm_timeout": 0.5,
    "backoff_initial": 0.05,
    "backoff_max": 0.2,
    "heartbeat": 1,
    "log_interval": 0.2,
}


@pytest.fixture
async def proxy(fault_proxy: Any) -> FaultProxy:
    """A fault proxy in front of RabbitMQ."""
    started: FaultProxy = await fault_proxy("127.0.0.1", 5672)
    return started


@pytest.fixture
async def make_bus() -> AsyncIterator[Callable[..., EventPublisher]]:
    """Build publishers with short bounds; each is closed at teardown."""
    buses: list[EventPublisher] = []

    def make(url: str, exchange: str, **kwargs: Any) -> EventPublisher:
        bus = EventPublisher(url, exchange, **{**FAST, **kwargs})
        buses.append(bus)
        return bus

    yield make
    for bus in buses:
        await bus.close(timeout=0)


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> float:
    """Poll every 5 ms until ``predicate()``; return the seconds it took. Fails the test after ``within``."""
    start = time.monotonic()
    for _ in range(int(within / 0.005)):
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not reached within {within}s")


@dataclass
class Received:
    """Messages consumed from the test queue."""

    messages: list[Any] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [m.message_id for m in self.messages]

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in Counter(self.ids).values())


@dataclass
class Topology:
    """The test's exchange and the queue bound to it."""

    url: str
    exchange: str
    queue: Any
    channel: Any

    async def consume(self, want: int | set[str], *, within: float = 10.0, settle: float = 0.0) -> Received:
        """Get messages until ``want`` (a count, or a set of ids all seen), for at most ``within`` seconds.

        ``settle`` keeps reading that long after the goal, to catch duplicates.
        """
        received = Received()
        deadline = time.monotonic() + within
        goal_at: float | None = None
        while time.monotonic() < deadline:
            done = len(received.messages) >= want if isinstance(want, int) else want <= set(received.ids)
            if done and goal_at is None:
                goal_at = time.monotonic()
            if goal_at is not None and time.monotonic() >= goal_at + settle:
                break
            message = await self.queue.get(no_ack=True, fail=False, timeout=5)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            received.messages.append(message)
        return received

    async def count(self) -> int:
        """Messages waiting in the queue now."""
        result = await self.channel.declare_queue(self.queue.name, passive=True)
        return int(result.declaration_result.message_count)


@contextlib.asynccontextmanager
async def topology(url: str, name: str, *, binding: str = "#") -> AsyncIterator[Topology]:
    """Declare exchange ``name`` (topic) and queue ``name`` bound with ``binding``; delete both after."""
    connection = await aio_pika.connect(url, timeout=5)
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(name, "topic", durable=True)
        queue = await channel.declare_queue(name, durable=False, auto_delete=False)
        try:
            await queue.bind(exchange, binding)
            yield Topology(url=url, exchange=name, queue=queue, channel=channel)
        finally:
            await queue.delete(if_unused=False, if_empty=False, timeout=5)
            await exchange.delete(timeout=5)
    finally:
        await connection.close()
