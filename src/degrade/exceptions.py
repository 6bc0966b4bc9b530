"""Exceptions raised by degrade.

The tree::

    DegradeError
    ├── ConfigurationError (also a ValueError): bad arguments, found at construction
    ├── MissingExtraError (also an ImportError): an optional extra is not installed
    ├── CheckFailed: a health check reached the service and found it unhealthy
    └── DependencyUnavailable: a fail-loud site refused or failed to reach a dependency
        └── Overloaded: local capacity ran out (shedding); the dependency is not down
    (degrade.ratelimit.RateLimitExceeded is a DegradeError too: 429)

Only :class:`DependencyUnavailable` (also a Starlette ``HTTPException`` with
status 503) and ``degrade.ratelimit.RateLimitExceeded`` (a DegradeError and an
``HTTPException`` with status 429) are raised on the request path; the others are
raised while the host builds its app, so a mistake shows at start-up, not mid-outage.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException

__all__ = [
    "CheckFailed",
    "ConfigurationError",
    "DegradeError",
    "DependencyUnavailable",
    "MissingExtraError",
    "Overloaded",
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


class DependencyUnavailable(DegradeError, HTTPException):
    """A dependency is down (or just failed) and the call site is FAIL-LOUD.

    ``exception_handlers()`` turns it into a 503 JSON response with a
    ``Retry-After`` header and the shared body. It is also a Starlette
    ``HTTPException`` (status 503, ``Retry-After``), so an app that forgot
    ``exception_handlers()`` still answers 503 with ``Retry-After`` (Starlette's
    plain-text or FastAPI's ``{"detail": ...}`` body) instead of a bare 500. The
    message never holds the driver's own error text (which may carry a DSN);
    the original exception is kept as ``__cause__``.

    Attributes:
        dependency: The dependency's name.
        detail: A short, credential-free explanation fit for a response body.
        retry_after: Seconds a client should wait before retrying.
    """

    def __init__(self, dependency: str, detail: str = "", *, retry_after: int = 5) -> None:
        self.dependency = dependency
        self.retry_after = retry_after
        detail = detail or f"{dependency} is unavailable"
        HTTPException.__init__(
            self, 503, detail, {"Retry-After": str(retry_after), "Cache-Control": "no-store"}
        )
        self.detail: str = detail
        self.args = (f"dependency {dependency!r} is unavailable: {detail}",)

    def __str__(self) -> str:
        return str(self.args[0])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dependency!r}, {self.detail!r}, retry_after={self.retry_after})"


class Overloaded(DependencyUnavailable):
    """Shed: the call needed *local* capacity that ran out (pool slots, a queue), not a down service.

    Answered like its parent (503 with ``Retry-After``, the shared body) but it
    is never counted as a failure of the dependency: saturation is not an
    outage. ``reason`` names the capacity (``"queue"``, ``"pool-saturated"``,
    ``"abandoned-cap"``).
    """

    def __init__(self, dependency: str, reason: str, detail: str = "", *, retry_after: int = 1) -> None:
        self.reason = reason
        super().__init__(
            dependency, detail or f"{dependency} is overloaded ({reason})", retry_after=retry_after
        )
