"""The relay's ``LISTEN`` connection: woken by the outbox table's ``NOTIFY`` at each commit.

One connection of the relay's private pool holds ``LISTEN`` on the table's
channel through asyncpg's ``add_listener`` (the driver reads notifications as
they arrive, between queries or idle). A listener that cannot start or whose
connection closed is dropped; the relay polls meanwhile and tries again at its
next batch. It never feeds the database's Dependency: the batches do.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .._bounded import hard_timeout
from .._classify import is_dependency_error
from ..observe import logger

__all__ = ["Listener"]


class Listener:
    """``LISTEN`` on one channel; sets ``wake`` on each notification.

    Failure mode: a connection error or timeout while starting is logged at
    debug level (``outbox.listen_failed``) and leaves it stopped (started
    again later). Any other error (``LISTEN`` refused: a pooler in transaction
    mode, a driver without ``add_listener``) is logged once
    (``outbox.listen_unavailable``, warning) and marks it :attr:`unavailable`:
    the relay then polls. Every wait is bounded by ``timeout`` (closing by 1 s).
    """

    def __init__(self, channel: str, wake: asyncio.Event, *, timeout: float) -> None:
        self.channel = channel
        self.wake = wake
        self.timeout = timeout
        self._conn: Any = None  # the SQLAlchemy AsyncConnection
        self._raw: Any = None  # its asyncpg connection
        #: Set when LISTEN cannot work here (not an outage): the relay polls only.
        self.unavailable = False

    @property
    def listening(self) -> bool:
        """True while its connection is open (as far as the driver knows)."""
        return self._raw is not None and not self._raw.is_closed()

    @property
    def started(self) -> bool:
        """True once started and not dropped since."""
        return self._raw is not None

    async def start(self, engine: Any) -> None:
        """Open a connection of ``engine`` and ``LISTEN`` on it."""
        conn = engine.connect()
        try:
            await hard_timeout(conn.start(), self.timeout)
            raw = (await hard_timeout(conn.get_raw_connection(), self.timeout)).driver_connection
            await hard_timeout(raw.add_listener(self.channel, self._on_notify), self.timeout)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await hard_timeout(conn.close(), 1.0)
            if is_dependency_error(exc):
                logger.debug("outbox.listen_failed", table=self.channel, error=type(exc).__name__)
            else:
                self.unavailable = True
                logger.warning("outbox.listen_unavailable", table=self.channel, error=type(exc).__name__)
            return
        self._conn, self._raw = conn, raw

    def _on_notify(self, *_args: object) -> None:
        self.wake.set()

    async def drop(self) -> None:
        """Close the connection (bounded); it may be started again."""
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await hard_timeout(conn.close(), 1.0)
