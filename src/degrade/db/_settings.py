"""Engine settings that make the gate's bound real, and a start-up audit of them.

Measured on this project's bench (a blackholed Postgres: TCP accepted, nothing
answered), see ``docs/postgres.md``:

* ``pool_timeout`` only bounds the wait for a free pool slot; a new connection
  that hangs waits for asyncpg's connect ``timeout``, which defaults to 60 s.
* ``asyncio.timeout()`` around a checkout or a query on a connection that went
  silent overruns its bound by SQLAlchemy's shielded graceful close (asyncpg
  ``close(timeout=2)``): 1 s asked, about 3 s taken.
* asyncpg's ``command_timeout`` is the only bound on a query already running.

The gate bounds its own checkout with a hard timeout whatever the settings;
these settings make the *engine* give up in time as well, so nothing is
abandoned on the happy path and a handler's queries are bounded too.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, QueuePool

from .. import _validate
from .._compat.sqlalchemy import max_overflow
from ..exceptions import ConfigurationError
from ..observe import logger

__all__ = ["engine_options", "engine_problems", "problems", "warn_problems"]

_warned: weakref.WeakSet[Engine] = weakref.WeakSet()


def engine_options(
    *,
    acquire_timeout: float = 1.0,
    command_timeout: float = 5.0,
    pool_size: int = 5,
    max_overflow: int = 10,
    pool_pre_ping: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """Keyword arguments for ``create_async_engine`` that bound every wait.

    ``create_async_engine(url, **engine_options(acquire_timeout=1.0))`` sets:

    * ``pool_timeout=acquire_timeout``: waiting for a free slot gives up in time;
    * asyncpg ``timeout=acquire_timeout``: a connect that hangs gives up in time
      (asyncpg's default is 60 s);
    * asyncpg ``command_timeout``: a query that hangs gives up (no default in
      asyncpg). Choose it from your slowest legitimate query; a query on a
      silent connection fails after about ``command_timeout`` plus SQLAlchemy's
      graceful close of the dead connection;
    * ``pool_size`` / ``max_overflow``: at most ``pool_size + max_overflow``
      connection attempts in flight, however many requests arrive;
    * ``pool_pre_ping`` off by default: it costs one round trip per checkout
      (see ``docs/postgres.md`` for the measured cost) and the gate already
      detects dead connections through the requests that use them.

    ``extra`` is merged in (``connect_args`` entries are merged too).

    Failure mode: none at run time; bad values raise ``ConfigurationError``.
    """
    acquire = _validate.seconds("acquire_timeout", acquire_timeout)
    command = _validate.seconds("command_timeout", command_timeout)
    _validate.count("pool_size", pool_size)
    _validate.count("max_overflow", max_overflow, minimum=0)
    connect_args: dict[str, Any] = {"timeout": acquire, "command_timeout": command}
    connect_args.update(extra.pop("connect_args", None) or {})
    return {
        "pool_size": pool_size,
        "max_overflow": max_overflow,
        "pool_timeout": acquire,
        "pool_pre_ping": bool(pool_pre_ping),
        **extra,
        "connect_args": connect_args,
    }


def _connect_params(engine: Engine) -> Mapping[str, Any] | None:
    # create_engine() keeps the URL's and connect_args' parameters only in the
    # closure of the pool's creator; a custom creator hides them (None).
    creator = getattr(engine.pool, "_creator", None)
    if creator is None:
        return None
    try:
        params = inspect.getclosurevars(creator).nonlocals.get("cparams")
    except TypeError:
        return None
    return params if isinstance(params, Mapping) else None


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]  # a URL query gives a str
    except (TypeError, ValueError):
        return None


def problems(engine: AsyncEngine | Engine, *, acquire_timeout: float = 1.0) -> tuple[str, ...]:
    """What in ``engine``'s settings stops a dead database from being bounded (empty: all is well).

    Returns short, credential-free sentences. Checks the pool (bounded size,
    ``pool_timeout``) and asyncpg's ``timeout`` and ``command_timeout`` when
    they are visible (a custom ``async_creator`` hides them; they are then not
    judged). A sync ``Engine`` is a problem of its own: degrade's safety nets
    need ``create_async_engine``. The same pattern as
    :func:`degrade.redis.problems` / :func:`degrade.redis.warn_problems`.

    Failure mode: never raises on the engine's account; it only reads settings.
    """
    if not isinstance(engine, AsyncEngine | Engine):
        raise ConfigurationError(f"problems() takes a SQLAlchemy engine; got {type(engine).__name__}")
    return tuple(_problems(engine, acquire_timeout))


def _problems(engine: AsyncEngine | Engine, acquire_timeout: float) -> list[str]:
    problems: list[str] = []
    if isinstance(engine, Engine):
        problems.append(
            "a sync Engine: degrade's safety nets run on asyncio; use create_async_engine(url, ...)"
        )
    sync = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    pool = sync.pool
    if isinstance(pool, NullPool):
        problems.append(
            "NullPool opens a connection per checkout with no cap: connection attempts pile up "
            "under load; use the default queue pool with pool_size/max_overflow"
        )
    elif isinstance(pool, QueuePool):
        overflow = max_overflow(pool)
        if (overflow is not None and overflow < 0) or pool.size() <= 0:
            problems.append(
                "the pool is unbounded (max_overflow=-1 or pool_size=0): connection attempts in flight "
                "are not capped; set pool_size and max_overflow >= 0"
            )
        pool_timeout = getattr(pool, "_timeout", None)
        if isinstance(pool_timeout, int | float) and pool_timeout > acquire_timeout:
            problems.append(
                f"pool_timeout={pool_timeout:g}s exceeds acquire_timeout={acquire_timeout:g}s: "
                "a checkout waiting for a free slot is abandoned at the bound instead of failing by itself"
            )
    params = _connect_params(sync)
    if params is not None and sync.dialect.driver == "asyncpg":
        connect = _number(params.get("timeout"))
        if connect is None or connect > acquire_timeout:
            shown = "60s (asyncpg's default)" if connect is None else f"{connect:g}s"
            problems.append(
                f"asyncpg connect timeout is {shown}, above acquire_timeout={acquire_timeout:g}s: a connect "
                "to a silent server is abandoned at the bound; set connect_args={'timeout': ...}"
            )
        if _number(params.get("command_timeout")) is None:
            problems.append(
                "asyncpg command_timeout is not set: a query on a connection that went silent mid-request "
                "hangs that request with no bound; set connect_args={'command_timeout': ...}"
            )
    return problems


def warn_problems(
    engine: AsyncEngine, *, acquire_timeout: float = 1.0, component: str | None = None
) -> tuple[str, ...]:
    """Log one ``db.engine.unbounded`` warning if :func:`problems` finds any; once per engine.

    The gate and the router call it when they are built. Returns what it found.

    Failure mode: never raises on the engine's account; it only reads settings.
    """
    problems = _problems(engine, acquire_timeout)
    sync = engine.sync_engine
    if problems and sync not in _warned:
        _warned.add(sync)
        logger.warning(
            "db.engine.unbounded",
            component=component,
            acquire_timeout=acquire_timeout,
            problems=problems,
            fix="create_async_engine(url, **degrade.db.engine_options(acquire_timeout=...))",
        )
    return tuple(problems)


def engine_problems(engine: AsyncEngine | Engine, *, acquire_timeout: float = 1.0) -> list[str]:
    """Deprecated: :func:`problems` (which returns a tuple)."""
    warnings.warn(
        "degrade.db.engine_problems() is deprecated; use degrade.db.problems()",
        DeprecationWarning,
        stacklevel=2,
    )
    return list(problems(engine, acquire_timeout=acquire_timeout))
