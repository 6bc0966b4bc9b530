"""Which exceptions mean "the database failed", as opposed to "the query has a bug"."""

from __future__ import annotations

from types import TracebackType

import sqlalchemy.exc as sa_exc

from .._classify import lost_transport_write
from .._extras import require

# asyncpg ships no type information; the module object keeps mypy out of it.
asyncpg = require("asyncpg", "postgres", feature="degrade.db")

__all__ = ["is_database_failure"]

# Connection-level failures, whichever layer raised them. A constraint
# violation or a syntax error (ProgrammingError, IntegrityError, ...) is a bug
# and propagates unchanged.
_FAILURE_TYPES: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # the pool's "QueuePool limit ... reached"
    sa_exc.DisconnectionError,
    asyncpg.PostgresConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

_DRIVER_MODULES = ("sqlalchemy.", "asyncpg.")


def _raised_by_driver(tb: TracebackType | None) -> bool:
    # A bare TimeoutError / OSError is the database's only when SQLAlchemy or
    # asyncpg raised it (asyncpg's command_timeout and a refused connect surface
    # like that); the same exception from an HTTP call in the handler is not.
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.startswith(_DRIVER_MODULES):
            return True
        tb = tb.tb_next
    return False


def is_database_failure(exc: BaseException) -> bool:
    """True when ``exc`` means Postgres is unreachable, too slow or dropped the connection."""
    if isinstance(exc, _FAILURE_TYPES):
        return True
    if getattr(exc, "connection_invalidated", False):
        return True  # SQLAlchemy's flag: the connection died under this statement
    if isinstance(exc, TimeoutError | OSError) or lost_transport_write(exc):
        # lost_transport_write: asyncio's error for a write on a connection already
        # lost, on Python 3.12/3.13 (python/cpython#136234).
        return _raised_by_driver(exc.__traceback__)
    return False
