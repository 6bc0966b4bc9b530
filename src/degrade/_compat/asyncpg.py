"""asyncpg's SSL negotiation protocol, which logs an error when a connect is cancelled.

Checked against asyncpg 0.29.0 and 0.32.0. asyncpg opens every TCP connection
(and the side connection that sends a cancel request) with
``connect_utils.TLSUpgradeProto``; its ``connection_lost`` sets an exception on
the ``on_data`` future if the server's answer to ``SSLRequest`` has not come.
When the connecting task is cancelled inside ``loop.create_connection`` (a
timeout: asyncpg's own ``connect(timeout=)``, SQLAlchemy's pool timeout, the
DB gate's hard bound), asyncio closes the new transport, ``connection_lost``
fails a future that nobody will ever await, and asyncio logs ``Future
exception was never retrieved ... ConnectionError('unexpected
connection_lost() call')`` at ERROR. Under an outage or overload that is one
error line per cancelled connect: noise that hides the real transition log
(MagicStack/asyncpg#1211 and #1312 are the same family). Measured on asyncpg
0.32 against a local Postgres: 165 such lines in 400 connects cancelled at
random points in their first 4 ms, 0 with the fix (the test in
``tests/integration/test_db_compat.py`` does the same on a smaller scale).

The fix marks that exception as retrieved as soon as it is set. Whoever awaits
the future still gets it raised (``Future.exception()`` only clears the
"never retrieved" flag), so no error is hidden from a caller; only the orphan
no caller will see stops being logged. It is installed when :mod:`degrade.db`
is imported (:func:`install`), once, by replacing the module's class with a
subclass; the connect path looks the class up at call time.

Fallback when the class or its ``on_data`` future is missing or changed: not
installed (the log lines stay), reported by :func:`problems`.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

__all__ = ["install", "problems"]

_connect_utils: Any
try:  # asyncpg ships no type information: typed as Any here
    _connect_utils = importlib.import_module("asyncpg.connect_utils")
except ImportError:  # pragma: no cover - asyncpg is part of the postgres extra
    _connect_utils = None

_BASE: Any = getattr(_connect_utils, "TLSUpgradeProto", None)


def _quieted(base: Any) -> Any:
    class QuietTLSUpgradeProto(base):  # type: ignore[misc]
        """asyncpg's TLSUpgradeProto whose orphaned handshake future logs nothing."""

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            future = getattr(self, "on_data", None)
            if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
                future.exception()  # retrieved: an awaiter still gets it raised

    QuietTLSUpgradeProto.__qualname__ = QuietTLSUpgradeProto.__name__ = "TLSUpgradeProto"
    QuietTLSUpgradeProto._degrade_quiet = True
    return QuietTLSUpgradeProto


def problems() -> list[str]:
    """What the installed asyncpg lacks for the fix (empty: nothing)."""
    if _BASE is None or not callable(getattr(_BASE, "connection_lost", None)):
        return ["asyncpg has no connect_utils.TLSUpgradeProto: cancelled connects may log 'never retrieved'"]
    return []


def install() -> bool:
    """Replace asyncpg's ``TLSUpgradeProto`` with the quiet subclass, once; True when installed."""
    if problems():
        return False
    current = getattr(_connect_utils, "TLSUpgradeProto", None)
    if getattr(current, "_degrade_quiet", False):
        return True
    _connect_utils.TLSUpgradeProto = _quieted(_BASE)
    return True
