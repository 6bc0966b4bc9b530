"""Exceptions raised by degrade.

The tree::

    DegradeError
    ├── ConfigurationError (also a ValueError): bad arguments, found at construction
    ├── MissingExtraError (also an ImportError): an optional extra is not installed
    ├── CheckFailed: a health check reached the service and found it unhealthy
    └── DependencyUnavailable: a fail-loud site refused or failed to reach a dependency
        └── Overloaded: local capacity ran out (shedding); the dependency is not down
    (degrade.ratelimit.RateLimitExceeded is a DegradeError too: 429)

Only :class:`DependencyUnavailable` and ``degrade.ratelimit.RateLimitExceeded``
(a DegradeError and a Starlette ``HTTPException`` with status 429) are raised on
the request path; the others are
raised while the host builds its app, so a mistake shows at start-up, not mid-outage.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

E = TypeVar("E", bound=BaseException)

__all__ = [
    "CheckFailed",
    "ConfigurationError",
    "DegradeError",
    "DependencyUnavailable",
    "MissingExtraError",
    "Overloaded",
    "scrubbed",
]


class DegradeError(Exception):
    """Base class of every exception that degrade raises itself."""


class ConfigurationError(DegradeError, ValueError):
    """An argument is out of range or of the wrong kind; the message says which."""


class MissingExtraError(DegradeError, ImportError):
    """A module needs an optional extra that is not installed.

    The message names the extra, e.g. ``pip install 'degrade[redis]'``.
    """


class CheckFailed(DegradeError):
    """A check reached its service and found it unhealthy (disk nearly full, lag too high).

    Health output shows only the class name, never the message.
    """


class DependencyUnavailable(DegradeError):
    """A dependency is down (or just failed) and the call site is FAIL-LOUD.

    ``exception_handlers()`` turns it into a 503 JSON response with a
    ``Retry-After`` header. The message never holds the driver's own error text
    (which may carry a DSN). The original exception is kept as ``__cause__``,
    its class and message only: its traceback (whose frames' local variables
    hold connection parameters, passwords included) is dropped, so an error
    tracker that serialises locals cannot leak them.

    It deliberately has no ``status_code``: Sentry's Starlette integration
    captures every handled exception with a 5xx ``status_code`` as an error,
    which would turn each 503 of an outage (already reported once, as a
    transition) into an event. (Tried as an ``HTTPException`` subclass, so that
    an app without ``exception_handlers()`` answers 503: that is what it did.)

    Attributes:
        dependency_name: The dependency's name (the ``dependency`` of the 503 body).
        detail: A short, credential-free explanation fit for a response body.
        retry_after: Seconds a client should wait before retrying.

    The first parameter keeps its name, ``dependency``, so that callers passing
    it by keyword still work; it is the dependency's *name*. The attribute
    ``.dependency`` still returns that name too, with a
    :class:`DeprecationWarning`: read ``.dependency_name``. In 0.3
    ``.dependency`` becomes the :class:`~degrade.Dependency`, as on the cache,
    the limiter, the hatch and the publisher.

    It pickles and copies (``dependency_name``, ``detail``, ``retry_after`` and
    any other attribute kept), without calling ``__init__`` again.
    """

    def __init__(self, dependency: str, detail: str = "", *, retry_after: int = 5) -> None:
        self.dependency_name = dependency
        self.detail = detail or f"{dependency} is unavailable"
        self.retry_after = retry_after
        super().__init__(f"dependency {dependency!r} is unavailable: {self.detail}")

    @property
    def dependency(self) -> str:
        """Deprecated: the dependency's name; use :attr:`dependency_name`."""
        warnings.warn(
            f"{type(self).__name__}.dependency is deprecated; use {type(self).__name__}.dependency_name "
            "(in 0.3 .dependency becomes the Dependency)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.dependency_name

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.dependency_name!r}, {self.detail!r}, retry_after={self.retry_after})"

    def __reduce__(self) -> tuple[Any, ...]:
        # The default, ``cls(*self.args)`` then the instance dict, would call
        # ``__init__`` with the message as the dependency's name (and fails for
        # Overloaded, whose ``reason`` is required): rebuild without ``__init__``.
        return (_rebuild, (type(self), self.args), dict(self.__dict__))

    def __setstate__(self, state: dict[str, Any] | None) -> None:
        state = dict(state or {})
        if "dependency" in state:  # pickled when .dependency was a plain attribute (0.1)
            state.setdefault("dependency_name", state.pop("dependency"))
        self.__dict__.update(state)


def _rebuild(cls: type[DependencyUnavailable], args: tuple[Any, ...]) -> DependencyUnavailable:
    """Unpickle a :class:`DependencyUnavailable` (or subclass) without calling its ``__init__``."""
    return cls.__new__(cls, *args)


class Overloaded(DependencyUnavailable):
    """Shed: the call needed *local* capacity that ran out (pool slots, a queue), not a down service.

    Answered like its parent (503 with ``Retry-After``, the shared body) but it
    is never counted as a failure of the dependency: saturation is not an
    outage. ``reason`` names the capacity (``"queue"``, ``"pool-saturated"``,
    ``"abandoned-cap"``). As on its parent, ``dependency_name`` is the
    dependency's name (``.dependency`` is its deprecated spelling), and it
    pickles and copies with its ``reason``.
    """

    def __init__(self, dependency: str, reason: str, detail: str = "", *, retry_after: int = 1) -> None:
        self.reason = reason
        super().__init__(
            dependency, detail or f"{dependency} is overloaded ({reason})", retry_after=retry_after
        )


def scrubbed(exc: E) -> E:
    """Drop the tracebacks of ``exc`` and of its chain, and return it.

    Use it where a driver's error becomes the cause of a 503:
    ``raise DependencyUnavailable("db") from scrubbed(exc)``.

    The driver's frames keep local variables (connect parameters, a DSN's
    password) that an error tracker serialising locals would send; the class
    and message stay for debugging.
    """
    _drop_tracebacks(exc)
    return exc


def _drop_tracebacks(exc: BaseException, depth: int = 8) -> None:
    """Clear the traceback of ``exc`` and of the exceptions chained to it (bounded depth)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending and depth > 0:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        depth -= 1
        current.__traceback__ = None
        pending.extend((current.__cause__, current.__context__))
