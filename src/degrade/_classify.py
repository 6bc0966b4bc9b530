"""Which exceptions count as a dependency failure.

A bug is not an outage: only connection, timeout and driver-availability errors
count. The default set holds the errors of the drivers the process has loaded.
"""

from __future__ import annotations

import asyncio.selector_events
import functools
import sys
from collections.abc import Callable

ErrorPredicate = Callable[[BaseException], bool]


_DRIVERS: dict[str, tuple[str, ...]] = {
    "redis.exceptions": ("ConnectionError", "TimeoutError", "BusyLoadingError"),
    "sqlalchemy.exc": ("OperationalError", "InterfaceError", "TimeoutError"),
    "asyncpg.exceptions": (
        "PostgresConnectionError",
        "ConnectionDoesNotExistError",
        "CannotConnectNowError",
        "TooManyConnectionsError",
        "InterfaceError",
    ),
    "aiormq.exceptions": ("AMQPConnectionError", "ConnectionClosed", "ChannelInvalidStateError"),
}


def default_failure_types() -> tuple[type[BaseException], ...]:
    """The exception types that count as failures by default.

    ``OSError`` covers ``ConnectionError`` and the builtin ``TimeoutError``
    (which ``asyncio.TimeoutError`` is, on Python 3.11+). Driver exceptions are
    taken from the drivers the process has *imported*: a driver that is not
    loaded cannot have raised anything, and importing one here would block the
    event loop (SQLAlchemy alone takes hundreds of milliseconds).
    """
    loaded = tuple(name in sys.modules for name in _DRIVERS)
    return _types_for(loaded)


@functools.cache
def _types_for(loaded: tuple[bool, ...]) -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, TimeoutError]
    for (module_name, names), present in zip(_DRIVERS.items(), loaded, strict=True):
        module = sys.modules.get(module_name) if present else None
        if module is not None:
            types += [getattr(module, name) for name in names]
    return tuple(types)


def _connection_invalidated(exc: BaseException) -> bool:
    # SQLAlchemy marks a DBAPIError whose connection died with this flag; other
    # DBAPIErrors (constraint violations, syntax errors) are bugs, not outages.
    return bool(getattr(exc, "connection_invalidated", False))


_SELECTOR_EVENTS = asyncio.selector_events.__file__
#: Python 3.12 gave the socket transport a writelines() of its own, without the
#: check write() makes for a connection already lost (python/cpython#136234).
WRITELINES_UNGUARDED = "writelines" in vars(
    asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
)


def lost_transport_write(exc: BaseException) -> bool:
    """True for the error asyncio raises when writelines() hits a connection the peer already closed.

    On the Pythons of python/cpython#136234 that is an ``AttributeError`` or
    ``TypeError`` raised inside ``_SelectorSocketTransport.writelines`` (it
    touches attributes that connection_lost cleared) instead of an OSError.
    Matched by where it was raised and by the transport being closed, never by
    its message: the same types from a caller's wrong argument, on an open
    transport, stay bugs.
    """
    if type(exc) not in (AttributeError, TypeError):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    frame = tb.tb_frame
    if frame.f_code.co_name != "writelines" or frame.f_code.co_filename != _SELECTOR_EVENTS:
        return False
    is_closing = getattr(frame.f_locals.get("self"), "is_closing", None)
    return callable(is_closing) and is_closing() is True


def is_dependency_error(exc: BaseException) -> bool:
    """True when ``exc`` means the dependency is unreachable or too slow."""
    return (
        isinstance(exc, default_failure_types()) or _connection_invalidated(exc) or lost_transport_write(exc)
    )


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


def error_chain(error: BaseException | None, *, limit: int = 4) -> str | None:
    """The failure's class chain, outermost first (``"DBAPIError <- InvalidCatalogNameError"``), or None.

    Follows a driver error wrapped by SQLAlchemy (``.orig``), then ``__cause__``
    and an unsuppressed ``__context__``; class names only, never a message (a
    message may hold a DSN). None when there is nothing beyond the outer class
    (that is ``error`` in the logs already).
    """
    if error is None:
        return None
    names = [type(error).__name__]
    seen = {id(error)}
    current: BaseException = error
    while len(names) < limit:
        orig = getattr(current, "orig", None)
        inner = orig if isinstance(orig, BaseException) else current.__cause__
        if inner is None and not current.__suppress_context__:
            inner = current.__context__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        names.append(type(inner).__name__)
        current = inner
    return " <- ".join(names) if len(names) > 1 else None
