"""Which settings make a Redis client slow to fail: :func:`problems` and :func:`warn_problems`.

The same pattern as :func:`degrade.db.problems` / :func:`degrade.db.warn_problems`:
``problems(x)`` returns what it found, ``warn_problems(x)`` logs it once.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from .. import _compat as compat
from .._compat import redis as compat_redis
from .._compat.redis import retry_settings
from ..observe import logger

DEFAULT_SOCKET_TIMEOUT: float | None
DEFAULT_SOCKET_CONNECT_TIMEOUT: float | None
try:  # redis-py 7.x names its defaults; before, a connection had no timeout unless given one
    from redis._defaults import DEFAULT_SOCKET_CONNECT_TIMEOUT, DEFAULT_SOCKET_TIMEOUT
except ImportError:  # pragma: no cover - older redis-py
    DEFAULT_SOCKET_TIMEOUT = None
    DEFAULT_SOCKET_CONNECT_TIMEOUT = None

__all__ = [
    "SAFE_MAX_TIMEOUT",
    "hung_call_seconds",
    "problems",
    "unsafe_settings",
    "warn_if_unsafe",
    "warn_problems",
]

#: Longest socket / connect / pool wait (seconds) that :func:`unsafe_settings` accepts.
SAFE_MAX_TIMEOUT = 1.0


def _pool_settings(pool: Any) -> dict[str, Any]:
    kw: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}))
    socket_timeout = kw.get("socket_timeout", DEFAULT_SOCKET_TIMEOUT)
    connect_timeout = kw.get("socket_connect_timeout", DEFAULT_SOCKET_CONNECT_TIMEOUT)
    if connect_timeout is None:
        connect_timeout = socket_timeout  # redis-py falls back to the socket timeout
    retry_on_error = list(kw.get("retry_on_error") or [])
    if kw.get("retry_on_timeout"):
        retry_on_error.append(TimeoutError)
    retries, backoff_cap = retry_settings(kw.get("retry"), retry_on_error)
    return {
        "socket_timeout": socket_timeout,
        "connect_timeout": connect_timeout,
        "retries": retries,
        "backoff_cap": backoff_cap,
        "pool_timeout": getattr(pool, "timeout", 0.0) if isinstance(pool, BlockingConnectionPool) else 0.0,
    }


def _problems(settings: dict[str, Any], max_timeout: float, where: str) -> list[str]:
    out: list[str] = []
    for key in ("socket_timeout", "connect_timeout"):
        value = settings[key]
        if value is None:
            out.append(f"{where}{key}=None: a hung Redis blocks a call forever")
        elif value > max_timeout:
            out.append(f"{where}{key}={value:g}s (over {max_timeout:g}s)")
    retries = settings["retries"]
    if retries < 0:
        out.append(f"{where}unlimited client-side retries")
    elif retries > 0:
        out.append(f"{where}{retries} client-side retries, each waiting out the timeout again")
    pool_timeout = settings["pool_timeout"]
    if pool_timeout is None:
        out.append(f"{where}the pool waits forever for a free connection")
    elif pool_timeout > max_timeout:
        out.append(f"{where}the pool waits up to {pool_timeout:g}s for a free connection")
    return out


def hung_call_seconds(client: Redis) -> float:
    """Roughly how long one call can take against a Redis that accepts but never answers.

    ``(retries + 1) * socket_timeout + retries * backoff cap``; ``inf`` for a
    client without a socket timeout or with unlimited retries.
    """
    s = _pool_settings(client.connection_pool)
    if s["socket_timeout"] is None or s["retries"] < 0:
        return math.inf
    return float((s["retries"] + 1) * s["socket_timeout"] + s["retries"] * s["backoff_cap"])


def problems(client: Redis, *, max_timeout: float = SAFE_MAX_TIMEOUT) -> tuple[str, ...]:
    """What makes ``client`` slow to fail, as short credential-free phrases (empty: safe).

    Flags socket or connect timeouts over ``max_timeout`` (or none at all),
    client-side retries, and a blocking pool that waits longer than
    ``max_timeout``. For a Sentinel-managed client the Sentinel connections are
    checked too.
    """
    pool = client.connection_pool
    out = _problems(_pool_settings(pool), max_timeout, "")
    manager = getattr(pool, "sentinel_manager", None)
    for node in getattr(manager, "sentinels", ()):
        for problem in _problems(_pool_settings(node.connection_pool), max_timeout, "sentinel "):
            if problem not in out:
                out.append(problem)
    return tuple(out)


_warned: weakref.WeakSet[Any] = weakref.WeakSet()


def warn_problems(client: object, *, component: str | None = None) -> tuple[str, ...]:
    """Log one ``redis.unsafe_client`` warning if ``client`` is slow to fail; once per client.

    Call it at start-up (the cache, revocation list and limiter call it when they
    are built). Returns what :func:`problems` found. An object that is
    not a redis-py client (no ``connection_pool``, e.g. a test double) is not
    checked.

    Failure mode: never raises on the client's account; it only reads settings.
    """
    compat.report("redis", compat_redis.problems())
    pool = getattr(client, "connection_pool", None)
    if pool is None or not isinstance(client, Redis):
        return ()
    found = problems(client)
    if found and pool not in _warned:
        _warned.add(pool)
        logger.warning(
            "redis.unsafe_client",
            problems=list(found),
            hung_call_up_to_s=hung_call_seconds(client),
            component=component,
            advice="build the client with degrade.redis.client() or degrade.redis.sentinel_client()",
        )
    return found


def unsafe_settings(client: Redis, *, max_timeout: float = SAFE_MAX_TIMEOUT) -> tuple[str, ...]:
    """Deprecated: :func:`problems` (the same result)."""
    warnings.warn(
        "degrade.redis.unsafe_settings() is deprecated; use degrade.redis.problems()",
        DeprecationWarning,
        stacklevel=2,
    )
    return problems(client, max_timeout=max_timeout)


def warn_if_unsafe(client: object, *, component: str | None = None) -> tuple[str, ...]:
    """Deprecated: :func:`warn_problems` (the same behaviour)."""
    warnings.warn(
        "degrade.redis.warn_if_unsafe() is deprecated; use degrade.redis.warn_problems()",
        DeprecationWarning,
        stacklevel=2,
    )
    return warn_problems(client, component=component)
