"""Which exceptions count as a dependency failure.

A bug is not an outage: only connection, timeout and driver-availability errors
count. The default set is built once, from the drivers that are installed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from ._extras import optional

ErrorPredicate = Callable[[BaseException], bool]


@functools.cache
def default_failure_types() -> tuple[type[BaseException], ...]:
    """The exception types that count as failures by default.

    ``OSError`` covers ``ConnectionError`` and the builtin ``TimeoutError``
    (which ``asyncio.TimeoutError`` is, on Python 3.11+).
    """
    types: list[type[BaseException]] = [OSError, TimeoutError]
    redis_exc = optional("redis.exceptions")
    if redis_exc is not None:
        types += [redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError]
    sa_exc = optional("sqlalchemy.exc")
    if sa_exc is not None:
        types += [sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError]
    asyncpg_exc = optional("asyncpg.exceptions")
    if asyncpg_exc is not None:
        types += [
            asyncpg_exc.PostgresConnectionError,
            asyncpg_exc.ConnectionDoesNotExistError,
            asyncpg_exc.CannotConnectNowError,
            asyncpg_exc.TooManyConnectionsError,
            asyncpg_exc.InterfaceError,
        ]
    aiormq_exc = optional("aiormq.exceptions")
    if aiormq_exc is not None:
        types += [
            aiormq_exc.AMQPConnectionError,
            aiormq_exc.ConnectionClosed,
            aiormq_exc.ChannelInvalidStateError,
        ]
    return tuple(types)


def _connection_invalidated(exc: BaseException) -> bool:
    # SQLAlchemy marks a DBAPIError whose connection died with this flag; other
    # DBAPIErrors (constraint violations, syntax errors) are bugs, not outages.
    return bool(getattr(exc, "connection_invalidated", False))


def is_dependency_error(exc: BaseException) -> bool:
    """True when ``exc`` means the dependency is unreachable or too slow."""
    return isinstance(exc, default_failure_types()) or _connection_invalidated(exc)


def predicate(
    on: type[BaseException] | tuple[type[BaseException], ...] | ErrorPredicate | None,
) -> ErrorPredicate:
    """Turn a decorator's ``on=`` argument into one predicate."""
    from .exceptions import ConfigurationError

    if on is None:
        return is_dependency_error
    if isinstance(on, type):
        on = (on,)
    if isinstance(on, tuple):
        for t in on:
            if not (isinstance(t, type) and issubclass(t, Exception)):
                raise ConfigurationError(
                    f"on= takes Exception subclasses (or a predicate); got {t!r}. "
                    "CancelledError and other BaseExceptions are never treated as failures."
                )
        types = on

        def matches(exc: BaseException) -> bool:
            return isinstance(exc, types)

        return matches
    if callable(on):
        return on
    raise ConfigurationError(f"on= takes an exception type, a tuple of them or a predicate; got {on!r}")
