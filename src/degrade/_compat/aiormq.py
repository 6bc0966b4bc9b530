"""aiormq's transport factory, which the event publisher uses to reset a stalled socket.

Checked against aiormq 6.9.0 and 7.2.4 (it appeared in 6.9; ``degrade[rabbitmq]``
requires ``aiormq>=6.9``). The factory is aiormq's documented hook for the
socket; the publisher wraps it to remember the socket's transport, so that a
connection to a broker that stopped answering can be reset at once instead of
waiting for a ``Connection.Close-Ok`` that never comes.

Fallback when it is missing: no factory, and ``abort()`` does nothing; closing a
stalled connection then waits for aiormq's own 2 s (bounded by the publisher's
``DISCONNECT_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["RememberingFactory", "factory_for", "problems"]

try:
    from aiormq.connection import TCPTransportFactory, TLSTransportFactory, TransportFactory
except ImportError:  # pragma: no cover - aiormq < 6.9
    TransportFactory = None  # type: ignore[assignment,misc]


class RememberingFactory:
    """aiormq's own TCP or TLS factory that remembers the socket's transport."""

    def __init__(self, base: Any) -> None:
        self._base = base
        self.transport: asyncio.WriteTransport | None = None

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the socket as aiormq would, and keep its transport."""
        reader, writer = await self._base.create(url, **kwargs)
        self.transport = writer.transport
        return reader, writer


if TransportFactory is not None:
    TransportFactory.register(RememberingFactory)  # aiormq checks isinstance(factory, TransportFactory)


def factory_for(scheme: str) -> RememberingFactory | None:
    """A remembering factory for an ``amqp`` / ``amqps`` URL, or None without aiormq's hook."""
    if TransportFactory is None:
        return None
    base = TLSTransportFactory() if scheme == "amqps" else TCPTransportFactory()
    return RememberingFactory(base)


def problems() -> list[str]:
    """What the installed aiormq lacks for the fast path (empty: nothing)."""
    if TransportFactory is None:
        return ["aiormq has no TransportFactory (< 6.9): closing a stalled connection waits up to 2 s"]
    return []
