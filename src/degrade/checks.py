"""Health checks: small async callables that raise when a service is unhealthy.

Give one to ``registry.dependency(..., check=...)``. Each check is bounded by its
own ``timeout`` (a hard bound: it stops waiting even if the driver's clean-up is
slow) and the dependency bounds it again by its ``check_timeout``. A check only
reads: it writes nothing to the service.

Failure mode: a check raises (``TimeoutError``, the driver's error, or
:class:`~degrade.exceptions.CheckFailed`); it never returns a false "healthy".
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from ._bounded import hard_timeout
from ._extras import require
from .exceptions import CheckFailed, ConfigurationError

__all__ = ["amqp", "disk", "http", "redis", "sqlalchemy", "tcp"]

Check = Callable[[], Awaitable[None]]


def _positive(label: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{label} must be a positive number of seconds; got {value!r}")
    return float(value)


def sqlalchemy(engine: Any, *, timeout: float = 0.8, query: str = "SELECT 1") -> Check:
    """Check a SQLAlchemy ``AsyncEngine``: run ``query`` on a connection of the check's own.

    The check keeps a private copy of the engine's pool (``pool.recreate()``:
    the same connect arguments, its own connections, at most one used at a
    time, closed after each run), so a pool that requests keep fully checked
    out does not fail it: saturation is not an outage. Each run opens one
    fresh connection, which also proves the server accepts new ones.
    """
    sa = require("sqlalchemy", "postgres", feature="checks.sqlalchemy")
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

    timeout = _positive("timeout", timeout)
    if not isinstance(engine, AsyncEngine):
        raise ConfigurationError(
            f"checks.sqlalchemy needs an AsyncEngine (create_async_engine(...)); got {type(engine).__name__}"
        )
    statement = sa.text(query)
    own: list[Any] = []

    def private() -> Any:
        if not own:
            sync = engine.sync_engine
            try:
                own.append(create_async_engine(sync.url, pool=sync.pool.recreate()))
            except Exception:  # an unusual pool or dialect: share the engine's pool, as before
                own.append(engine)
        return own[0]

    async def check() -> None:
        async def run() -> None:
            own_engine = private()
            try:
                async with own_engine.connect() as conn:
                    await conn.execute(statement)
            finally:
                if own_engine is not engine:
                    await own_engine.dispose()  # keep no idle connection between runs

        await hard_timeout(run(), timeout)

    return check


def redis(client: Any, *, timeout: float = 0.8) -> Check:
    """Check a ``redis.asyncio.Redis`` client with ``PING``."""
    require("redis", "redis", feature="checks.redis")
    timeout = _positive("timeout", timeout)

    async def check() -> None:
        await hard_timeout(client.ping(), timeout)

    return check


def amqp(url: str, *, timeout: float = 0.8) -> Check:
    """Check an AMQP broker: open a connection (handshake and login), then close it."""
    aiormq = require("aiormq", "rabbitmq", feature="checks.amqp")
    timeout = _positive("timeout", timeout)

    async def run() -> None:
        connection = await aiormq.connect(url)
        await connection.close()

    async def check() -> None:
        await hard_timeout(run(), timeout)

    return check


def tcp(host: str, port: int, *, timeout: float = 0.8) -> Check:
    """Check that ``host:port`` accepts a TCP connection."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigurationError(f"port must be an int in 1..65535; got {port!r}")
    timeout = _positive("timeout", timeout)

    async def run() -> None:
        _, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()

    async def check() -> None:
        await hard_timeout(run(), timeout)

    return check


def http(url: str, *, timeout: float = 0.8, expect: Callable[[int], bool] | None = None) -> Check:
    """Check an HTTP endpoint with ``GET``; a status outside 200-399 (or ``expect``) fails."""
    httpx = require("httpx", "http", feature="checks.http")
    timeout = _positive("timeout", timeout)
    accept = expect or (lambda status: 200 <= status < 400)
    # Built once: a new client would load the CA bundle again (~0.1 s of CPU per check run).
    tls = httpx.create_ssl_context()

    async def run() -> None:
        async with httpx.AsyncClient(timeout=timeout, verify=tls) as client:
            response = await client.get(url)
        if not accept(response.status_code):
            raise CheckFailed(f"HTTP check answered {response.status_code}")

    async def check() -> None:
        await hard_timeout(run(), timeout)

    return check


def disk(path: str, min_free_bytes: int) -> Check:
    """Check that the filesystem holding ``path`` has at least ``min_free_bytes`` free."""
    if isinstance(min_free_bytes, bool) or not isinstance(min_free_bytes, int) or min_free_bytes < 0:
        raise ConfigurationError(f"min_free_bytes must be an int >= 0; got {min_free_bytes!r}")

    async def check() -> None:
        free = shutil.disk_usage(path).free
        if free < min_free_bytes:
            raise CheckFailed(f"{free} bytes free, want {min_free_bytes}")

    return check
