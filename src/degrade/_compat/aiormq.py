"""aiormq's transport factory, which the event publisher uses to reset a stalled socket.

Checked against aiormq 6.9.0 and 7.2.4 (it appeared in 6.9; ``degrade[rabbitmq]``
requires ``aiormq>=6.9``). The factory is aiormq's documented hook for the
socket; the publisher wraps it to remember the socket's transport, so that a
connection to a broker that stopped answering can be reset at once instead of
waiting for a ``Connection.Close-Ok`` that never comes.

Fallback when it is missing: no factory, and ``abort()`` does nothing; closing a
stalled connection then waits for aiormq's own 2 s (bounded by the publisher's
``DISCONNECT_TIMEOUT``).

Its logs: on every reconnect attempt aiormq logs ``error when creating
transport: <the exception's repr>`` at ERROR, and a connection that drops logs
``Cancelling cause reader exited abnormally`` at WARNING with two chained
tracebacks (about 30 lines). The publisher reports the same events itself,
once per transition (``dependency.down``, ``eventbus.connection_lost``), so
:class:`QuietReconnects` (a ``logging.Filter`` on aiormq's and aio-pika's own
loggers, never on a handler or the root) keeps each of those records to one
line naming the error's class chain, without traceback or exception text.
The host's logging configuration (levels, handlers, format) is not touched;
``quiet_amqp_logs(False)`` takes the filter off.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from .._classify import error_chain

__all__ = [
    "AMQP_LOGGERS",
    "QuietReconnects",
    "RememberingFactory",
    "factory_for",
    "problems",
    "quiet_amqp_logs",
]

#: The loggers aiormq and aio-pika log on (a filter on a logger sees only its own records).
AMQP_LOGGERS = (
    "aiormq.connection",
    "aiormq.channel",
    "aio_pika",
    "aio_pika.channel",
    "aio_pika.connection",
    "aio_pika.exchange",
    "aio_pika.queue",
    "aio_pika.robust_channel",
    "aio_pika.robust_connection",
    "aio_pika.robust_exchange",
    "aio_pika.robust_queue",
)

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


class _ClassChain:
    """Stands for an exception in a log record's arguments: formats as its class chain, never its text."""

    __slots__ = ("text",)

    def __init__(self, exc: BaseException) -> None:
        self.text = error_chain(exc) or type(exc).__name__

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__


class QuietReconnects(logging.Filter):
    """One line per record of aiormq / aio-pika: exceptions shown by class chain, no traceback.

    A record's exception arguments (``"error when creating transport: %r"``)
    format as their class chain (``AMQPConnectionError <- ConnectionRefusedError``);
    a record with ``exc_info`` gets that chain appended to its message and
    loses its traceback. Levels are kept and nothing is dropped.

    Failure mode: never raises; a record it cannot rewrite goes through as it came.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite ``record`` in place; always let it through."""
        try:
            args = record.args
            if isinstance(args, tuple) and any(isinstance(a, BaseException) for a in args):
                record.args = tuple(_ClassChain(a) if isinstance(a, BaseException) else a for a in args)
            exc_info = record.exc_info
            if exc_info and exc_info[1] is not None:
                record.msg = f"{record.getMessage()} ({_ClassChain(exc_info[1])})"
                record.args = ()
                record.exc_info = None
                record.exc_text = None
        except Exception:  # a record we cannot rewrite is logged as it came
            return True
        return True


_FILTER = QuietReconnects()


def quiet_amqp_logs(enabled: bool = True) -> None:
    """Keep aiormq's and aio-pika's reconnect noise to one line per record (``False``: their own output).

    Attaches (or removes) :class:`QuietReconnects` on the loggers in
    :data:`AMQP_LOGGERS` only; the host's handlers, levels and root logger are
    untouched. It is on from the import of ``degrade.eventbus``; call
    ``degrade.eventbus.quiet_amqp_logs(False)`` to see aiormq's own output.

    Failure mode: none; calling it twice is harmless.
    """
    for name in AMQP_LOGGERS:
        logger = logging.getLogger(name)
        if enabled:
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
        else:
            logger.removeFilter(_FILTER)


quiet_amqp_logs()  # on by default, wherever degrade's event bus is imported
