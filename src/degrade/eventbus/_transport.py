"""The AMQP side of the publisher: one bounded connect, and the link the sender publishes on.

Everything that knows aio-pika, aiormq or pamqp lives here; the sender
(:mod:`degrade.eventbus._sender`) sees only a :class:`~degrade.eventbus._sender.Link`
made by a ``connect()`` callable, so its unit tests fake the broker.

aio-pika traps this design avoids (measured with ``bench/bench_eventbus.py
--traps``; numbers in ``docs/eventbus.md``): ``connect()`` without a timeout
hangs for as long as a blackholed broker stays silent; ``connect_robust()``
cancelled from outside leaves its reconnect task and a half-open socket behind;
a robust channel waits for reconnection without bound; a confirm from a stalled
broker never arrives; aiormq notices a dead peer only after ``(heartbeat + 1) *
3`` seconds (183 s at the default 60 s heartbeat), and then fails the pending
confirms with ``CancelledError`` although nobody cancelled the caller. Hence a
plain ``aio_pika.connect`` per attempt, bounded by the sender, no robust
objects, and the sender's own confirm watchdog.

The connection class: aio-pika's plain Connection plus a way to cut its socket.

Closing a connection to a stalled broker the polite way waits for a
``Connection.Close-Ok`` that never comes (aiormq gives up after 2 s). The
publisher already knows the broker stalled (a confirm passed its bound), so it
resets the socket first and the close that follows returns at once.

aiormq's transport factory is its documented hook for the socket; aio-pika's
``connect(connection_class=...)`` is its documented hook for the connection.
Only the publisher's own connections use this; nothing is patched globally.
(Measured and rejected: gathering each loop turn's frames into one ``send()``
gave no throughput difference within the noise, so aiormq writes as it does.)
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
from aiormq.exceptions import DeliveryError
from pamqp import commands as spec
from yarl import URL

from .. import _compat as compat
from .._compat import aiormq as compat_aiormq
from ..observe import logger
from ._event import Event

__all__ = ["DISCONNECT_TIMEOUT", "AbortableConnection", "AmqpLink", "amqp_connector", "disconnect"]

#: Seconds closing one connection may take (a stalled broker never answers
#: Close; aiormq gives up on it after 2 s by itself).
DISCONNECT_TIMEOUT = 2.5

_UTC = datetime.UTC


class AbortableConnection(aio_pika.Connection):
    """``aio_pika.Connection`` with :meth:`abort`: reset the socket without waiting for the peer."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(url, loop, **kwargs)
        compat.report("aiormq", compat_aiormq.problems())  # once, at the first connection
        self._factory = compat_aiormq.factory_for(URL(url).scheme)
        if self._factory is not None:
            self.kwargs["transport_factory"] = self._factory

    def abort(self) -> None:
        """Reset the socket now; a ``close()`` after it does not wait for the broker."""
        if self._factory is None:  # aiormq without the hook: the close waits, bounded
            return
        transport = self._factory.transport
        if transport is not None and not transport.is_closing():
            transport.abort()


def _properties(event: Event) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type=event.content_type,
        delivery_mode=2,  # persistent
        message_id=event.message_id,
        timestamp=datetime.datetime.fromtimestamp(event.timestamp, _UTC),
        headers=event.headers,
    )


class AmqpLink:
    """One connection and its confirm channel, as the sender uses them.

    Failure mode: :meth:`send` returns the reason an event was lost (a nack,
    a return, a header AMQP cannot encode) and raises only what ends the
    connection (connection errors, ``CancelledError`` from aiormq dropping it).
    """

    __slots__ = ("_channel", "_exchange", "_publish", "_watchers", "connection")

    def __init__(self, connection: Any, channel: Any, exchange: str) -> None:
        self.connection = connection
        self._channel = channel
        self._publish = channel.basic_publish
        self._exchange = exchange
        self._watchers: list[asyncio.Future[Any]] = []

    def watch(self) -> asyncio.Future[None]:
        """A future resolved when the connection or its channel closes."""
        lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        transport = self.connection.transport
        if transport is None:  # closed between the connect and now
            lost.set_result(None)
            return lost

        def on_closed(_: object) -> None:
            if not lost.done():
                lost.set_result(None)

        self._watchers = [lost, self._channel.closing, transport.connection.closing]
        for watcher in self._watchers[1:]:
            watcher.add_done_callback(on_closed)
        return lost

    def unwatch(self) -> None:
        """Stop watching (the connection is being replaced)."""
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher.cancel()

    async def send(self, event: Event) -> str | None:
        """Publish one event and wait for its confirm: None when acked, else why it is lost."""
        try:
            result = await self._publish(
                event.body,
                exchange=self._exchange,
                routing_key=event.routing_key,
                properties=_properties(event),
                mandatory=True,
                wait=False,
            )
        except DeliveryError:
            return "nacked"
        except (TypeError, ValueError, struct.error):
            return "unencodable"  # a header AMQP cannot carry (an int over 64 bits)
        return None if isinstance(result, spec.Basic.Ack) else "unroutable"

    def abort(self) -> None:
        """Reset the socket now: the broker stalled or the link broke."""
        self.connection.abort()

    async def close(self) -> None:
        """Close the connection (the caller bounds it)."""
        await self.connection.close()


async def disconnect(closeable: Any, *, abort: bool = False, exchange: str = "") -> None:
    """Close a connection or link within :data:`DISCONNECT_TIMEOUT`; cut it first with ``abort``.

    Failure mode: closing a broken connection fails in many ways; it is gone
    either way, so errors are logged at debug level (class only) and dropped.
    ``CancelledError`` propagates.
    """
    if abort:
        closeable.abort()  # do not wait for the broker's Close-Ok
    try:
        async with asyncio.timeout(DISCONNECT_TIMEOUT):
            await closeable.close()
    except Exception as exc:
        logger.debug("eventbus.disconnect_error", exchange=exchange, error=type(exc).__name__)


def amqp_connector(
    url: URL, exchange: str, *, exchange_type: str, declare: bool, timeout: float
) -> Callable[[], Awaitable[AmqpLink]]:
    """A ``connect()`` for the sender: TCP, AMQP handshake, a confirm channel, the exchange declared.

    The sender bounds each call by ``connect_timeout`` (``timeout`` is also
    aio-pika's own bound). Failure mode: an attempt that fails, times out or
    is cancelled after the connection opened closes it; a timed-out or
    cancelled one is cut (socket reset), so no task or socket outlives it.
    """

    async def connect() -> AmqpLink:
        connection: Any = None
        try:
            connection = await aio_pika.connect(
                url,
                timeout=timeout,
                client_properties={"connection_name": f"degrade.eventbus {exchange}"},
                connection_class=AbortableConnection,
            )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=False)
            if declare:
                await channel.declare_exchange(exchange, exchange_type, durable=True)
            underlay = await channel.get_underlay_channel()
        except BaseException as exc:
            if connection is not None:  # a timed-out or cancelled attempt is cut, not closed politely
                cut = isinstance(exc, TimeoutError | asyncio.CancelledError)
                await disconnect(connection, abort=cut, exchange=exchange)
            raise
        return AmqpLink(connection, underlay, exchange)

    return connect
