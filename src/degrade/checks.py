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
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from . import _validate
from ._bounded import hard_timeout
from ._extras import require
from .exceptions import CheckFailed, ConfigurationError

__all__ = ["amqp", "disk", "http", "redis", "replica", "sentinel", "sqlalchemy", "tcp"]

Check = Callable[[], Awaitable[None]]


def _private_engine(engine: Any) -> Callable[[], Any]:
    """A lazily made copy of ``engine`` with its own pool (``pool.recreate()``: same connect arguments)."""
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

    if not isinstance(engine, AsyncEngine):
        raise ConfigurationError(
            f"a database check needs an AsyncEngine (create_async_engine(...)); got {type(engine).__name__}"
        )
    own: list[Any] = []

    def private() -> Any:
        if not own:
            sync = engine.sync_engine
            try:
                own.append(create_async_engine(sync.url, pool=sync.pool.recreate()))
            except Exception:  # an unusual pool or dialect: share the engine's pool, as before
                own.append(engine)
        return own[0]

    return private


@contextlib.asynccontextmanager
async def _own_connection(engine: Any, private: Callable[[], Any], close_within: float) -> AsyncIterator[Any]:
    """A connection of the check's private pool (see :func:`_private_engine`), closed for good on exit.

    It runs in ``AUTOCOMMIT`` and is closed with asyncpg's own bounded close
    (``degrade.db._conn.close_own``): a pool close cancelled from outside when
    the server went silent made SQLAlchemy log an ERROR with a traceback.
    With the engine's own pool (an unusual pool), the connection goes back to it.
    """
    own_engine = private()
    if own_engine is engine:
        async with engine.connect() as conn:
            yield conn
        return
    from .db._conn import close_own

    try:
        async with own_engine.connect() as conn:
            try:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
            finally:
                await close_own(conn, close_within)  # keep no idle connection between runs
    finally:
        await own_engine.dispose()  # nothing left to close: no I/O


def sqlalchemy(engine: Any, *, timeout: float = 0.8, query: str = "SELECT 1") -> Check:
    """Check a SQLAlchemy ``AsyncEngine``: run ``query`` on a connection of the check's own.

    The check keeps a private copy of the engine's pool (``pool.recreate()``:
    the same connect arguments, its own connections, at most one used at a
    time, closed after each run), so a pool that requests keep fully checked
    out does not fail it: saturation is not an outage. Each run opens one
    fresh connection, which also proves the server accepts new ones.
    """
    sa = require("sqlalchemy", "postgres", feature="checks.sqlalchemy")
    timeout = _validate.seconds("timeout", timeout)
    private = _private_engine(engine)
    statement = sa.text(query)

    async def check() -> None:
        async def run() -> None:
            async with _own_connection(engine, private, timeout) as conn:
                await conn.execute(statement)

        await hard_timeout(run(), timeout)

    return check


def redis(client: Any, *, timeout: float = 0.8) -> Check:
    """Check a ``redis.asyncio.Redis`` client with ``PING``."""
    require("redis", "redis", feature="checks.redis")
    timeout = _validate.seconds("timeout", timeout)

    async def check() -> None:
        await hard_timeout(client.ping(), timeout)

    return check


def amqp(url: str, *, timeout: float = 0.8) -> Check:
    """Check an AMQP broker: open a connection (handshake and login), then close it."""
    aiormq = require("aiormq", "rabbitmq", feature="checks.amqp")
    timeout = _validate.seconds("timeout", timeout)

    async def run() -> None:
        connection = await aiormq.connect(url)
        await connection.close()

    async def check() -> None:
        await hard_timeout(run(), timeout)

    return check


def tcp(host: str, port: int, *, timeout: float = 0.8) -> Check:
    """Check that ``host:port`` accepts a TCP connection."""
    _validate.int_range("port", port, minimum=1, maximum=65535)
    timeout = _validate.seconds("timeout", timeout)

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
    timeout = _validate.seconds("timeout", timeout)
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
    _validate.count("min_free_bytes", min_free_bytes, minimum=0)

    async def check() -> None:
        free = shutil.disk_usage(path).free
        if free < min_free_bytes:
            raise CheckFailed(f"{free} bytes free, want {min_free_bytes}")

    return check


def sentinel(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    timeout: float = 0.5,
    min_reachable: int | None = None,
    username: str | None = None,
    password: str | None = None,
) -> Check:
    """A health check that fails while Sentinel could not fail over automatically.

    Each run asks every Sentinel ``SENTINEL CKQUORUM <service_name>``
    concurrently, each on a fresh connection bounded by ``timeout``. It passes
    when at least ``min_reachable`` Sentinels answer (default: a majority of
    those listed) and at least one of them confirms quorum and failover
    authorisation. Register it on a SEV-2 dependency: losing quorum does not stop
    the master, it stops automatic recovery from the next master failure.

    Failure mode: raises :class:`~degrade.exceptions.CheckFailed` (or a
    connection error when no Sentinel answers); never a false "healthy".

    Args:
        sentinels: ``[(host, port), ...]`` of every Sentinel of the deployment.
        service_name: The master's name in the Sentinel configuration.
        timeout: Bound of each Sentinel query, in seconds (keep it under the
            dependency's ``check_timeout``).
        min_reachable: Sentinels that must answer; defaults to ``len // 2 + 1``.
        username: Sentinel ACL user, if required.
        password: Sentinel password, if required.
    """
    require("redis", "redis", feature="checks.sentinel")
    from redis.asyncio import Redis
    from redis.exceptions import ResponseError

    from .redis._client import _addresses, _no_retry

    nodes = _addresses(sentinels)
    if not isinstance(service_name, str) or not service_name:
        raise ConfigurationError("service_name must be the master's name in the Sentinel configuration")
    _validate.seconds("timeout", timeout)
    need = (
        len(nodes) // 2 + 1
        if min_reachable is None
        else _validate.int_range("min_reachable", min_reachable, minimum=1, maximum=len(nodes))
    )

    async def ask(host: str, port: int) -> bool:
        node = Redis(
            host=host,
            port=port,
            username=username,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=_no_retry(),
        )
        try:
            await node.execute_command("SENTINEL", "CKQUORUM", service_name)  # type: ignore[no-untyped-call]
        except ResponseError:
            return False  # reachable, but it says quorum or authorisation is lost
        finally:
            await node.aclose()
        return True

    async def check() -> None:
        answers = await asyncio.gather(
            *(hard_timeout(ask(host, port), timeout) for host, port in nodes), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, Exception):
                raise answer  # CancelledError and friends are never "unhealthy"
        reachable = [a for a in answers if isinstance(a, bool)]
        if len(reachable) < need:
            raise CheckFailed(
                f"{len(reachable)} of {len(nodes)} sentinels answered; automatic failover needs {need}"
            )
        if not any(reachable):
            raise CheckFailed("no reachable sentinel can reach quorum and authorise a failover")

    return check


def replica(engine: Any, *, max_lag: float | None = None, timeout: float = 0.8) -> Check:
    """Check a read replica: connect, and with ``max_lag``, measure replication lag.

    ``registry.dependency("db-replica", ..., check=checks.replica(replica, max_lag=5))``.
    :class:`~degrade.db.ReadReplicaRouter` installs the same check on its
    dependency when that has none. Like :func:`sqlalchemy`, it runs on a
    private copy of the engine's pool, so reads that keep every replica
    connection busy do not fail it.

    Failure mode: raises on a connection failure, ``TimeoutError`` after
    ``timeout`` (hard bound), and :class:`~degrade.CheckFailed` when the lag is
    over ``max_lag`` or unknown (a standby that has not replayed anything
    yet). With ``max_lag``, a server that is not in recovery (a primary behind
    the replica URL, a promoted replica) raises its subclass
    :class:`~degrade.db.NotAStandby` ("not a standby: the replica URL points
    at a primary"); without ``max_lag`` nothing is measured, so a primary
    passes.
    """
    sa = require("sqlalchemy", "postgres", feature="checks.replica")
    timeout = _validate.seconds("timeout", timeout)
    max_lag = _validate.optional_seconds("max_lag", max_lag)
    private = _private_engine(engine)
    ping = sa.text("SELECT 1")

    async def run() -> None:
        from .db._lag import standby_lag

        async with _own_connection(engine, private, timeout) as conn:
            if max_lag is None:
                await conn.execute(ping)
                return
            lag = await standby_lag(conn)  # NotAStandby: its own failure, not lag
        if lag is None:
            raise CheckFailed("replication lag is unknown (the standby has replayed nothing yet)")
        if lag > max_lag:
            raise CheckFailed(f"replication lag {lag:.1f}s is over max_lag={max_lag:g}s")

    async def check() -> None:
        await hard_timeout(run(), timeout)

    return check
