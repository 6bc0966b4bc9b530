"""The publisher's connection class: aio-pika's plain Connection plus a way to cut its socket.

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
from typing import Any

import aio_pika
from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
from yarl import URL

__all__ = ["AbortableConnection"]


class _Factory(TransportFactory):
    """aiormq's own TCP or TLS factory that remembers the socket's transport."""

    def __init__(self, base: TransportFactory) -> None:
        self._base = base
        self.transport: asyncio.WriteTransport | None = None

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await self._base.create(url, **kwargs)
        self.transport = writer.transport
        return reader, writer


class AbortableConnection(aio_pika.Connection):
    """``aio_pika.Connection`` with :meth:`abort`: reset the socket without waiting for the peer."""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(url, loop, **kwargs)
        base = TLSTransportFactory() if URL(url).scheme == "amqps" else TCPTransportFactory()
        self._factory = _Factory(base)
        self.kwargs["transport_factory"] = self._factory

    def abort(self) -> None:
        """Reset the socket now; a ``close()`` after it does not wait for the broker."""
        transport = self._factory.transport
        if transport is not None and not transport.is_closing():
            transport.abort()
