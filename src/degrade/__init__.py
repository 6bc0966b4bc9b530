"""degrade: keep a Starlette / FastAPI API answering when its backing services fail.

Every backing service is a :class:`Dependency` with a health state; every safety
net consults it before touching the service and feeds it with what real traffic
sees. See ``docs/`` for the guide.
"""

from __future__ import annotations

import typing as _typing

from . import checks
from ._guard import DegradeMiddleware
from .dependency import CheckResult, Dependency, Severity, Site
from .exceptions import (
    CheckFailed,
    ConfigurationError,
    DegradeError,
    DependencyUnavailable,
    MissingExtraError,
    Overloaded,
)
from .hatch import EscapeHatch
from .health import health_routes
from .modes import fail_loud, fail_soft, site_of
from .registry import Registry
from .responses import exception_handlers, unavailable_response

if _typing.TYPE_CHECKING:
    from ._fastapi import health_router
else:

    def __getattr__(name: str) -> object:
        # health_router needs FastAPI (an optional extra): imported on first use, so
        # `import degrade` stays light and `from degrade import health_router` without
        # FastAPI raises the ImportError that names the extra.
        if name == "health_router":
            from ._fastapi import health_router

            globals()[name] = health_router
            return health_router
        raise AttributeError(f"module 'degrade' has no attribute {name!r}")


__version__ = "0.2.0"

__all__ = [
    "CheckFailed",
    "CheckResult",
    "ConfigurationError",
    "DegradeError",
    "DegradeMiddleware",
    "Dependency",
    "DependencyUnavailable",
    "EscapeHatch",
    "MissingExtraError",
    "Overloaded",
    "Registry",
    "Severity",
    "Site",
    "__version__",
    "checks",
    "exception_handlers",
    "fail_loud",
    "fail_soft",
    "health_router",
    "health_routes",
    "site_of",
    "unavailable_response",
]
