"""One relay batch: the claim statements, and publishing the claimed rows in order with confirms.

A batch, in one transaction:

1. **Claim routing keys.** The distinct keys of the oldest ``scan`` rows, each
   taken with ``pg_try_advisory_xact_lock(hashtext(table), hashtext(key))``.
   A key another relay holds is skipped.
2. **Claim rows** of the keys it holds, oldest first:
   ``SELECT ... ORDER BY id LIMIT batch_size FOR UPDATE SKIP LOCKED``.
3. **Publish** them (:func:`publish`) through the publisher's own transport
   (the ``connect()`` of the :class:`~degrade.eventbus.EventPublisher` given:
   its URL, exchange declaration and bounds; :class:`~degrade.eventbus._transport.AmqpLink`
   ``send()``: persistent, mandatory, confirmed), ``max_in_flight`` at a time
   on one channel, in id order. Message id: the row id. No confirm progress
   for ``confirm_timeout`` ends the connection (the sender's watchdog rule).
4. **Delete** the rows confirmed (and those the broker can never take:
   unroutable, unencodable; counted as dropped) in one statement and commit,
   which releases the key locks.

Order per routing key: only the holder of a key's lock publishes that key,
rows go out in id order on one channel (which RabbitMQ keeps), and a key's
lock is released only once its rows are deleted. So a key's events reach a
queue in id order, several relays or pods at once included. Bounds: a key's
events go through one relay at a time (a hot key is one relay's throughput;
different keys spread over the relays); a hash collision only serialises two
keys; a relay that finds only held keys among the oldest ``scan`` rows waits
for the next poll. A row that is nacked (kept for the next batch) or not
confirmed before a connection loss is published again after later rows of
its key may already have been: order is kept among *first* deliveries.

Chosen over a single-claimer lease (one relay publishes at a time, the others
stand by): as strict, but every relay but one idles. Chosen over claiming
only per-key heads: one row per key per batch.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from .._classify import is_dependency_error
from ._event import Event
from ._sender import ConnectionLost, Link

__all__ = ["FINAL", "event_for", "publish", "statements"]

#: Why a row the broker will never take is deleted unpublished (``RelayStats.dropped`` keys).
FINAL = frozenset({"unroutable", "unencodable"})


def event_for(row: Any, prefix: str) -> Event:
    """The event of a claimed row: message id ``prefix + id``, its stored body, type and headers."""
    headers = None if row.headers is None else json.loads(row.headers)
    return Event(row.routing_key, row.body, f"{prefix}{row.id}", headers, row.content_type, row.ts, 0)


async def publish(
    link: Link,
    lost: asyncio.Future[None],
    events: list[tuple[int, Event]],
    max_in_flight: int,
    confirm_timeout: float,
) -> tuple[dict[int, str | None], ConnectionLost | None]:
    """Publish ``events`` in order, ``max_in_flight`` at a time; each row's outcome, and a loss if any.

    An outcome is None (confirmed) or the reason the broker gave (``nacked``,
    ``unroutable``, ``unencodable``). Rows without an outcome were not
    confirmed. Failure mode: a closed connection, a connection error or no
    confirm progress for ``confirm_timeout`` ends it and is returned as a
    :class:`ConnectionLost` (its cause the error); other errors propagate.
    """
    loop = asyncio.get_running_loop()
    pending = iter(events)
    outcomes: dict[int, str | None] = {}
    progress = [loop.time()]
    send = link.send

    async def worker() -> None:
        for row_id, event in pending:  # one shared iterator: sends start in id order
            try:
                outcomes[row_id] = await send(event)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                # aiormq fails pending confirms with CancelledError when it drops the connection.
                raise ConnectionLost("the connection was dropped while a confirm was pending") from None
            progress[0] = loop.time()

    workers = [loop.create_task(worker()) for _ in range(min(max_in_flight, len(events)))]
    error: BaseException | None = None
    try:
        while error is None and any(not w.done() for w in workers):
            await asyncio.wait(
                [*workers, lost], timeout=confirm_timeout / 4, return_when=asyncio.FIRST_COMPLETED
            )
            failed = [w for w in workers if w.done() and not w.cancelled() and w.exception() is not None]
            if failed:
                error = failed[0].exception()
            elif lost.done():
                error = ConnectionLost("the broker closed the connection")
            elif loop.time() - progress[0] > confirm_timeout:
                error = TimeoutError(f"no confirm within {confirm_timeout:g}s: the broker stalled")
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    if error is None:
        return outcomes, None
    if not is_dependency_error(error) and not isinstance(error, ConnectionLost):
        raise error
    ended = ConnectionLost("publishing ended early")
    ended.__cause__ = error
    return outcomes, ended


def statements(table: str, scan: int) -> dict[str, Any]:
    """The relay's statements on ``table`` (a checked identifier) and ``scan`` (a checked int)."""
    from sqlalchemy import bindparam, text

    return {
        "keys": text(
            "SELECT k FROM (SELECT DISTINCT routing_key AS k FROM "  # noqa: S608 - a checked identifier
            f"(SELECT routing_key FROM {table} ORDER BY id LIMIT {scan}) AS oldest) AS ks "
            "WHERE pg_try_advisory_xact_lock(hashtext(:table), hashtext(k))"
        ),
        "rows": text(
            "SELECT id, routing_key, body, content_type, CAST(headers AS text) AS headers, "  # noqa: S608 - a checked identifier
            f"EXTRACT(EPOCH FROM created_at)::float8 AS ts FROM {table} "
            "WHERE routing_key = ANY(CAST(:keys AS text[])) ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED"
        ).bindparams(bindparam("keys"), bindparam("limit")),
        "delete": text(f"DELETE FROM {table} WHERE id = ANY(CAST(:ids AS bigint[]))"),  # noqa: S608 - a checked identifier
        "backlog": text(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 "  # noqa: S608 - a checked identifier
            f"FROM (SELECT created_at FROM {table} ORDER BY id LIMIT :cap) AS capped"
        ),
    }
