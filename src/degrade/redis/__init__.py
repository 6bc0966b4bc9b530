"""Redis clients that fail fast, and a start-up warning for clients that don't (extra ``redis``).

redis-py's own defaults are built for a script, not a request path: ``Redis()``
waits 5 s for a socket and retries 10 times with backoff, so one call against a
hung Redis takes about a minute (measured: 58 s; ``Redis.from_url`` with no
options: 5 s; see docs/redis.md). :func:`client` and :func:`sentinel_client` build a
``redis.asyncio.Redis`` that gives up after ``timeout`` (0.25 s by default) and
never retries on its own: the :class:`~degrade.Dependency` state machine is the
retry policy (it opens after a few failures, then probes off the request path).

Failure mode: these clients raise ``redis.ConnectionError`` / ``redis.TimeoutError``
within about ``timeout`` (``connect_timeout`` + ``timeout`` when a connection must
be opened first); the safety nets that use them (cache, limiter, revocation list,
``@fail_soft``/``@fail_loud``) turn that into their declared fail mode.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from .._extras import require

require("redis", "redis", feature="degrade.redis")

from .. import checks  # noqa: E402
from ..checks import Check  # noqa: E402
from ._client import DEFAULT_HEALTH_CHECK_INTERVAL, client, sentinel_client  # noqa: E402
from ._settings import (  # noqa: E402
    SAFE_MAX_TIMEOUT,
    hung_call_seconds,
    problems,
    unsafe_settings,
    warn_if_unsafe,
    warn_problems,
)

__all__ = [
    "DEFAULT_HEALTH_CHECK_INTERVAL",
    "SAFE_MAX_TIMEOUT",
    "client",
    "hung_call_seconds",
    "problems",
    "sentinel_check",
    "sentinel_client",
    "unsafe_settings",
    "warn_if_unsafe",
    "warn_problems",
]


def sentinel_check(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    timeout: float = 0.5,
    min_reachable: int | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Check:
    """Deprecated: :func:`degrade.checks.sentinel` (every health check lives in ``degrade.checks``)."""
    warnings.warn(
        "degrade.redis.sentinel_check() is deprecated; use degrade.checks.sentinel()",
        DeprecationWarning,
        stacklevel=2,
    )
    return checks.sentinel(
        sentinels,
        service_name,
        timeout=timeout,
        min_reachable=min_reachable,
        username=username,
        password=password,
    )
