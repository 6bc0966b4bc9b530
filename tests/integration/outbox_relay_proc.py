"""A relay in a process of its own, for the SIGKILL test.

``python outbox_relay_proc.py DSN AMQP_URL EXCHANGE TABLE``.

Prints ``started`` once the relay runs, then relays until killed.
"""

from __future__ import annotations

import asyncio
import sys

import structlog
from sqlalchemy.ext.asyncio import create_async_engine

from degrade.eventbus import EventPublisher, Outbox, OutboxRelay


async def main(dsn: str, amqp_url: str, exchange: str, table: str) -> None:
    """Run one relay with small batches until the process is killed."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout says "started"
    engine = create_async_engine(dsn)
    publisher = EventPublisher(amqp_url, exchange, declare_exchange=False)
    relay = OutboxRelay(Outbox(table), engine, publisher, batch_size=200, max_in_flight=20, poll_interval=0.1)
    await relay.start()
    print("started", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
