"""Redis clients that fail fast: :func:`client` and :func:`sentinel_client`.

redis-py's own defaults are built for a script, not a request path: ``Redis()``
waits 5 s for a socket and retries 10 times with backoff, so one call against a
hung Redis takes about a minute (measured: 58 s; ``Redis.from_url`` with no
options: 5 s; see docs/redis.md). These build a ``redis.asyncio.Redis`` that
gives up after ``timeout`` (0.25 s by default) and never retries on its own:
the :class:`~degrade.Dependency` state machine is the retry policy (it opens
after a few failures, then probes off the request path).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from .. import _validate
from .._classify import WRITELINES_UNGUARDED, lost_transport_write
from ..exceptions import ConfigurationError
from ._settings import SAFE_MAX_TIMEOUT, problems

__all__ = ["DEFAULT_HEALTH_CHECK_INTERVAL", "client", "sentinel_client"]

#: Default seconds between redis-py's PING on a connection that sat idle.
DEFAULT_HEALTH_CHECK_INTERVAL = 30.0

# Options that client() sets itself; passing them would defeat its purpose.
_OWNED = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "retry",
        "retry_on_timeout",
        "retry_on_error",
        "connection_pool",
        "connection_pool_class",
    }
)


def _no_retry() -> Retry:
    # A fresh object each time: redis-py deep-copies and mutates Retry objects.
    return Retry(NoBackoff(), 0)


def _fail_fast_seconds(label: str, value: object, *, upper: float = SAFE_MAX_TIMEOUT) -> float:
    """A finite number of seconds in (0, ``upper``]: the shared rule, then the fail-fast ceiling."""
    seconds = _validate.seconds(label, value)
    if seconds > upper:
        raise ConfigurationError(
            f"{label}={value!r}s is not a fail-fast setting (at most {upper:g}s). "
            "If a slower Redis really is expected, build redis.asyncio.Redis yourself "
            "and accept the start-up warning."
        )
    return seconds


def _check_options(
    *,
    timeout: float,
    connect_timeout: float | None,
    pool_timeout: float | None,
    max_connections: int,
    health_check_interval: float,
    kwargs: dict[str, Any],
) -> tuple[float, float]:
    socket_timeout = _fail_fast_seconds("timeout", timeout)
    connect = (
        socket_timeout if connect_timeout is None else _fail_fast_seconds("connect_timeout", connect_timeout)
    )
    pool_wait = socket_timeout if pool_timeout is None else _fail_fast_seconds("pool_timeout", pool_timeout)
    _validate.count("max_connections", max_connections)
    _validate.seconds("health_check_interval (0 turns it off)", health_check_interval, allow_zero=True)
    owned = sorted(_OWNED.intersection(kwargs))
    if owned:
        raise ConfigurationError(
            f"{', '.join(owned)} cannot be passed here: this client sets its own timeouts and "
            "never retries (use timeout=, connect_timeout=, pool_timeout=)"
        )
    return connect, pool_wait


def client(
    url: str,
    *,
    timeout: float = 0.25,
    connect_timeout: float | None = None,
    pool_timeout: float | None = None,
    max_connections: int = 50,
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL,
    **kwargs: Any,
) -> Redis:
    """A ``redis.asyncio.Redis`` for the request path: short timeouts, no retries.

    Failure mode: FAIL-FAST. A call raises ``redis.TimeoutError`` after
    ``timeout`` seconds without an answer, ``redis.ConnectionError`` when Redis
    refuses or is unreachable (within ``connect_timeout``), and
    ``ConnectionError("No connection available.")`` after waiting
    ``pool_timeout`` for a free pooled connection. It never retries: feed its
    errors to a :class:`~degrade.Dependency` (the safety nets do) and let the
    state machine decide when to try again.

    Args:
        url: ``redis://[[user]:[password]@]host:port/db`` (or ``rediss://``,
            ``unix://``). Query options that set timeouts or retries are
            refused, since they would win over these settings.
        timeout: Seconds a command may wait for its answer (socket timeout).
        connect_timeout: Seconds to open a connection; defaults to ``timeout``.
        pool_timeout: Seconds to wait for a free connection when all
            ``max_connections`` are busy; defaults to ``timeout``. (A burst then
            queues briefly instead of failing at once.)
        max_connections: Size of the connection pool.
        health_check_interval: A connection idle for longer than this is
            PINGed before its next command, so one that a proxy, NAT or the
            server dropped is found on the PING. Keep it under the shortest idle
            timeout between you and Redis; 0 turns it off.
        **kwargs: Passed to ``BlockingConnectionPool`` (``decode_responses``,
            ``client_name``, ``ssl_*``, ...).

    Raises:
        ConfigurationError: a timeout is not in (0, 1] seconds, or the URL or
            ``kwargs`` set timeouts or retries.
    """
    if not isinstance(url, str) or not url:
        raise ConfigurationError("url must be a Redis URL such as 'redis://127.0.0.1:6379/0'")
    connect, pool_wait = _check_options(
        timeout=timeout,
        connect_timeout=connect_timeout,
        pool_timeout=pool_timeout,
        max_connections=max_connections,
        health_check_interval=health_check_interval,
        kwargs=kwargs,
    )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_wait,
        socket_timeout=float(timeout),
        socket_connect_timeout=connect,
        retry=_no_retry(),
        health_check_interval=health_check_interval,
        **kwargs,
    )
    _make_writes_safe(pool)
    redis = Redis.from_pool(pool)
    found = problems(redis)
    if found:
        # The URL's query string won over our options (redis-py lets it): refuse
        # rather than hand out a client that hangs. The URL itself is not echoed.
        raise ConfigurationError(
            "the Redis URL overrides fail-fast settings: " + "; ".join(found) + ". Remove them from the URL."
        )
    return redis


@functools.cache
def _lost_write_safe(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` whose write to a connection Redis already closed raises ``redis.ConnectionError``.

    On Python 3.12+ asyncio raises ``AttributeError``/``TypeError`` there
    (python/cpython#136234) and redis-py passes it on, so a reset connection
    looked like a bug instead of an outage. redis-py has already dropped the
    connection when this runs; the next command reconnects.
    """

    class LostWriteSafe(cls):  # type: ignore[valid-type,misc]
        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            try:
                await super().send_packed_command(command, check_health)
            except (AttributeError, TypeError) as exc:
                if not lost_transport_write(exc):
                    raise
                raise RedisConnectionError("Redis closed the connection") from exc

    LostWriteSafe.__name__ = LostWriteSafe.__qualname__ = cls.__name__
    return LostWriteSafe


def _make_writes_safe(pool: Any) -> None:
    if WRITELINES_UNGUARDED:  # Python 3.12+; older ones write() through the guarded path
        pool.connection_class = _lost_write_safe(pool.connection_class)


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits (bounded) for a free connection instead of failing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        _make_writes_safe(self)


class _SentinelMaster(Redis):
    """The master client of :func:`sentinel_client`; closing it closes its Sentinel connections too."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            manager = getattr(self.connection_pool, "sentinel_manager", None)
            if manager is not None:
                await _close_sentinels(manager)


async def _close_sentinels(manager: Any) -> None:
    """Close the Sentinel connections: ``Sentinel.aclose()`` where redis-py has it (7.x), else each client."""
    close = getattr(manager, "aclose", None)
    if close is not None:
        await close()
        return
    first: BaseException | None = None
    for node in getattr(manager, "sentinels", ()):
        try:
            await node.aclose()
        except Exception as exc:  # close them all, then report the first failure
            first = first or exc
    if first is not None:
        raise first


def _addresses(sentinels: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    nodes = list(sentinels)
    if not nodes:
        raise ConfigurationError("sentinels must list at least one (host, port) pair")
    for i, node in enumerate(nodes):
        if not isinstance(node, tuple) or len(node) != 2 or not isinstance(node[0], str):
            raise ConfigurationError(f"each sentinel must be a (host, port) pair; got {node!r}")
        _validate.int_range(f"the port of sentinels[{i}]", node[1], minimum=1, maximum=65535)
    return nodes


def sentinel_client(
    sentinels: Sequence[tuple[str, int]],
    service_name: str,
    *,
    timeout: float = 0.25,
    connect_timeout: float | None = None,
    sentinel_timeout: float | None = None,
    pool_timeout: float | None = None,
    max_connections: int = 50,
    health_check_interval: float = DEFAULT_HEALTH_CHECK_INTERVAL,
    db: int = 0,
    username: str | None = None,
    password: str | None = None,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
    **kwargs: Any,
) -> Redis:
    """The master of a Sentinel-managed Redis, with fail-fast settings on every connection.

    ``master_for`` is called once, here: keep the returned client for the
    process's lifetime (a client per request would open a pool per request).
    Each new connection asks the Sentinels for the current master, so after a
    failover the client follows the promoted replica. Closing the client also
    closes its connections to the Sentinels.

    Failure mode: FAIL-FAST, as :func:`client`. While no Sentinel names a
    healthy master (the master is down and not yet replaced), calls raise
    ``MasterNotFoundError`` (a ``redis.ConnectionError``) within about
    ``sentinel_timeout`` per unreachable Sentinel; the Dependency sees failures
    and the safety nets degrade until a probe reaches the new master.

    Args:
        sentinels: ``[(host, port), ...]`` of the Sentinels.
        service_name: The master's name in the Sentinel configuration.
        timeout: Socket timeout of master connections, in seconds.
        connect_timeout: Connect timeout of master connections; defaults to ``timeout``.
        sentinel_timeout: Connect and socket timeout of each Sentinel query;
            defaults to ``timeout``. Sentinels are asked one after another, so
            finding the master can take up to ``len(sentinels) * sentinel_timeout``.
        pool_timeout: As for :func:`client`.
        max_connections: As for :func:`client`.
        health_check_interval: As for :func:`client`.
        db: Database number on the master.
        username: ACL user of the master and replicas, if any.
        password: Password of the master and replicas, if any.
        sentinel_username: ACL user of the Sentinels, if they require AUTH.
        sentinel_password: Password of the Sentinels, if they require AUTH.
        **kwargs: Passed to the master's connection pool.

    Raises:
        ConfigurationError: as for :func:`client`, or a malformed sentinel list.
    """
    nodes = _addresses(sentinels)
    if not isinstance(service_name, str) or not service_name:
        raise ConfigurationError("service_name must be the master's name in the Sentinel configuration")
    connect, pool_wait = _check_options(
        timeout=timeout,
        connect_timeout=connect_timeout,
        pool_timeout=pool_timeout,
        max_connections=max_connections,
        health_check_interval=health_check_interval,
        kwargs=kwargs,
    )
    s_timeout = (
        float(timeout)
        if sentinel_timeout is None
        else _fail_fast_seconds("sentinel_timeout", sentinel_timeout)
    )
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": s_timeout,
        "socket_connect_timeout": s_timeout,
        "retry": _no_retry(),
    }
    if sentinel_username is not None:
        sentinel_kwargs["username"] = sentinel_username
    if sentinel_password is not None:
        sentinel_kwargs["password"] = sentinel_password
    manager = Sentinel(nodes, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call,unused-ignore]
    master: Redis = manager.master_for(
        service_name,
        redis_class=_SentinelMaster,
        connection_pool_class=_BlockingSentinelPool,
        socket_timeout=float(timeout),
        socket_connect_timeout=connect,
        retry=_no_retry(),
        health_check_interval=health_check_interval,
        max_connections=max_connections,
        timeout=pool_wait,
        db=db,
        username=username,
        password=password,
        **kwargs,
    )
    return master
