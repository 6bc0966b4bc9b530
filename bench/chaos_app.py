"""The example app as `make chaos` serves it: examples.app, plus a timing header and a debug route.

Run by bench/chaos.py as ``python bench/chaos_app.py PORT`` (one uvicorn worker),
configured like examples/app.py through the environment, plus:

===================  ================================================================
``CHAOS_RATES``      ``off`` (default): limits that never bite; else
                     ``default|feed|login`` rates, e.g. ``40/second;burst=10|...``
``CHAOS_PREFIX``     the Redis key / exchange prefix (one per run)
``CHAOS_APP``        ``starlette`` (default: examples/app.py) or ``fastapi``
                     (examples/fastapi_app.py, the same ``Example``)
===================  ================================================================

Nothing here changes what the example app does: the wrapper only

* adds ``x-chaos-took`` (seconds from the request reaching the app to its
  response start: the server-side wait, free of the load generator's own queueing)
  ``x-chaos-at`` (``time.monotonic()`` at the response start: the clock is
  system-wide, so the harness places each answer against the moment it broke a
  dependency) and, for a request the DB gate let in, ``x-chaos-waited`` (the
  seconds it waited for a primary connection, the gate's ``Lease.waited``: the
  gate's own bound is on that wait, the rest is the route's work);
* answers ``GET /_chaos/state`` itself, outside the app's middleware (never rate
  limited or gated): pool check-outs, asyncio tasks, open fds, RSS, the event
  publisher's counters, every dependency's state and its transitions
  (``time.monotonic()`` of each, recorded by a listener), every call site's
  degraded and shed counts (the DB gate's among them), the gate's
  ``acquire_timeout`` and terminated connections, the Redis client's timeout,
  how long the primary's and the replica's connections were held (pool
  check-out to check-in events: count, seconds, holds of 0.25 s or more), and
  how many Redis commands were sent while the request held a database
  connection (inside a router session, or with the gate's lease checked out).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ctypes
import dataclasses
import gc
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.app import Settings  # noqa: E402
from examples.app import create_app as create_starlette_app  # noqa: E402

from degrade.db._context import LEASE  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")

#: Every dependency transition of this process: ``[time.monotonic(), name, "down" | "ok"]``.
TRANSITIONS: collections.deque[list[Any]] = collections.deque(maxlen=2000)
#: Per pool ("primary", "replica"): [check-ins, seconds held in all, holds of at least LONG_HOLD s].
HOLDS: dict[str, list[float]] = {"primary": [0, 0.0, 0], "replica": [0, 0.0, 0]}
#: Collections of the oldest generation: [count, total seconds, longest seconds].
FULL_GCS: list[float] = [0, 0.0, 0.0]
_gc_started = [0.0]


def _time_full_gcs(phase: str, info: dict[str, int]) -> None:
    """gc.callbacks hook: time each full collection (they pause the whole loop)."""
    if info["generation"] != 2:
        return
    if phase == "start":
        _gc_started[0] = time.perf_counter()
        return
    took = time.perf_counter() - _gc_started[0]
    FULL_GCS[0] += 1
    FULL_GCS[1] += took
    FULL_GCS[2] = max(FULL_GCS[2], took)


#: A hold this long could have waited on a slow Redis call (the example's Redis timeout).
LONG_HOLD = 0.25


def _settings() -> Settings:
    settings = Settings.from_env()
    changes: dict[str, Any] = {"key_prefix": os.environ.get("CHAOS_PREFIX", "degrade-chaos")}
    rates = os.environ.get("CHAOS_RATES", "off")
    if rates == "off":
        changes.update(default_rate="1000000/minute", feed_rate="1000000/minute", login_rate="1000000/minute")
    else:
        default, feed, login = rates.split("|")
        changes.update(default_rate=default, feed_rate=feed, login_rate=login)
    return dataclasses.replace(settings, **changes)


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mallinfo() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None
    return libc.mallinfo2


_MALLINFO = _mallinfo()


def memory() -> dict[str, int | None]:
    """Where the memory is: Python's small-object blocks in use, and glibc malloc's bytes in use and free.

    RSS that grows while these stay flat is memory the allocators keep after a
    peak (freed, not returned to the system), not objects kept alive.
    """
    info = _MALLINFO() if _MALLINFO is not None else None
    return {
        "blocks": sys.getallocatedblocks(),
        "malloc_used": None if info is None else info.uordblks + info.hblkhd,
        "malloc_free": None if info is None else info.fordblks,
    }


def open_fds() -> int:
    """Open file descriptors of this process."""
    return len(os.listdir("/proc/self/fd"))


def _pool(engine: Any) -> dict[str, int]:
    pool = engine.sync_engine.pool
    return {
        "checkedout": pool.checkedout(),
        "open": pool.checkedin() + pool.checkedout(),
        "size": pool.size(),
        "overflow": pool.overflow(),
    }


def _redis_connections(client: Any) -> int:
    pool = client.connection_pool
    return len(getattr(pool, "_available_connections", ())) + len(getattr(pool, "_in_use_connections", ()))


def _gate(app: Any) -> Any:
    """The app's DBHealthMiddleware instance (None until Starlette built its stack on a first request)."""
    from degrade.db import DBHealthMiddleware

    node = getattr(app, "middleware_stack", None)
    for _ in range(30):
        if node is None or isinstance(node, DBHealthMiddleware):
            return node
        node = getattr(node, "app", None)
    return None


def _limiter_stats(limiter: Any) -> dict[str, Any]:
    """The limiter's counters: ``limiter.stats()`` (a snapshot) or, before 0.2.0, ``limiter.stats``."""
    stats = limiter.stats
    snapshot = stats() if callable(stats) else stats
    if dataclasses.is_dataclass(snapshot) and not isinstance(snapshot, type):
        return dataclasses.asdict(snapshot)
    return {k: getattr(snapshot, k) for k in type(snapshot).__slots__}


def _sites(ex: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """Per dependency, per call site: degraded calls and shed calls by reason."""
    return {
        name: {s.name: {"degraded": s.degraded_calls, "shed": dict(s.shed_calls)} for s in dep.sites}
        for name, dep in ex.registry.dependencies.items()
    }


def state(app: Any) -> dict[str, Any]:
    """What the harness samples: leaks, pools, events, dependencies, call sites, transitions."""
    ex = app.state.example
    bus = ex.bus.stats()
    gate = _gate(app)
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "rss": rss_bytes(),
        "memory": memory(),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "fds": open_fds(),
        "tasks": len(asyncio.all_tasks()),
        "pool": _pool(ex.primary),
        "replica_pool": _pool(ex.replica),
        "events": {
            "queued": bus.queued,
            "confirmed": bus.confirmed,
            "dropped": bus.dropped,
            "dropped_by_reason": dict(bus.dropped_by_reason),
            "resent": bus.resent,
            "buffered": bus.buffered,
            "in_flight": bus.in_flight,
            "degraded": bus.degraded,
            "connected": bus.connected,
        },
        "redis_connections": _redis_connections(ex.redis),
        "deps": {name: ("down" if dep.is_down else "ok") for name, dep in ex.registry.dependencies.items()},
        "limiter": _limiter_stats(ex.limiter),
        "sites": _sites(ex),
        "gate": None
        if gate is None
        else {"acquire_timeout": gate.acquire_timeout, "terminated": gate.terminated},
        "redis_timeout": ex.redis.connection_pool.connection_kwargs.get("socket_timeout"),
        "transitions": list(TRANSITIONS),
        "holds": {name: list(totals) for name, totals in HOLDS.items()},
        "redis_while_holding": REDIS_WHILE_HOLDING[0],
        "redis_while_holding_at": list(HELD_AT),
        "full_gcs": list(FULL_GCS),
        "gc_frozen": gc.get_freeze_count(),
        "monotonic": time.monotonic(),
    }


def wrap(app: Any) -> Any:
    """The ASGI app the harness loads: timing header plus ``/_chaos/state``."""

    async def wrapper(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if scope["path"] == "/_chaos/state":
            body = json.dumps(state(app)).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", b"%d" % len(body)),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        started = time.perf_counter()

        async def timed(message: Any) -> None:
            if message["type"] == "http.response.start":
                took = f"{time.perf_counter() - started:.4f}".encode()
                at = f"{time.monotonic():.6f}".encode()
                headers = [*message.get("headers", ()), (b"x-chaos-took", took), (b"x-chaos-at", at)]
                lease = LEASE.get()  # set while the gate serves this request (we are inside it)
                if lease is not None:
                    headers.append((b"x-chaos-waited", f"{lease.waited:.4f}".encode()))
                message["headers"] = headers
            await send(message)

        await app(scope, receive, timed)

    return wrapper


def _time_holds(engine: Any, name: str) -> None:
    """Count how long each connection of ``engine``'s pool is held (check-out to check-in)."""
    from sqlalchemy import event

    totals = HOLDS[name]

    def checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        record.info["chaos_out"] = time.perf_counter()

    def checkin(dbapi_conn: Any, record: Any) -> None:
        out = record.info.pop("chaos_out", None)
        if out is not None:
            held = time.perf_counter() - out
            totals[0] += 1
            totals[1] += held
            totals[2] += held >= LONG_HOLD

    event.listen(engine.sync_engine.pool, "checkout", checkout)
    event.listen(engine.sync_engine.pool, "checkin", checkin)


#: Redis commands sent while the request held a database connection (the cascade to rule out).
REDIS_WHILE_HOLDING = [0]
#: The first few of them: the command and where it was sent from.
HELD_AT: list[str] = []
_IN_SESSION: contextvars.ContextVar[bool] = contextvars.ContextVar("chaos_in_session", default=False)


def _holding() -> bool:
    """Does this task hold a database connection now (a router session, or the gate's lease)?"""
    lease = LEASE.get()
    return _IN_SESSION.get() or (lease is not None and lease.conn is not None)


def _watch_cascades(ex: Any) -> None:
    """Count Redis commands sent while a database connection is held (sessions and the gate's lease)."""
    router = ex.router
    for name in ("for_read", "for_write"):
        original = getattr(router, name)

        def session(original: Any = original) -> Any:
            @contextlib.asynccontextmanager
            async def held() -> Any:
                async with original() as s:
                    token = _IN_SESSION.set(True)
                    try:
                        yield s
                    finally:
                        _IN_SESSION.reset(token)

            return held()

        setattr(router, name, session)
    send = ex.redis.execute_command

    async def execute_command(*args: Any, **kwargs: Any) -> Any:
        if _holding():
            REDIS_WHILE_HOLDING[0] += 1
            if len(HELD_AT) < 5:  # where: the command and the app's frames that sent it
                frames = [f for f in traceback.extract_stack()[:-1] if "/site-packages/" not in f.filename]
                where = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[:-7:-1])
                HELD_AT.append(f"{args[0] if args else '?'} from {where}")
        return await send(*args, **kwargs)

    ex.redis.execute_command = execute_command


def _record(dep: Any) -> None:
    TRANSITIONS.append([time.monotonic(), dep.name, "down" if dep.is_down else "ok"])


def create_app(settings: Settings) -> Any:
    """The example app ``CHAOS_APP`` names: ``starlette`` (examples/app.py, the default) or ``fastapi``."""
    kind = os.environ.get("CHAOS_APP", "starlette")
    if kind == "starlette":
        return create_starlette_app(settings)
    if kind == "fastapi":
        from examples.fastapi_app import create_app as create_fastapi_app

        return create_fastapi_app(settings)
    raise SystemExit(f"CHAOS_APP must be starlette or fastapi; got {kind!r}")


def build() -> Any:
    """The wrapped example app (its lifespan runs through the wrapper untouched)."""
    app = create_app(_settings())
    for dep in app.state.example.registry.dependencies.values():
        dep.subscribe(_record)  # a plain function: held strongly
    _time_holds(app.state.example.primary, "primary")
    _time_holds(app.state.example.replica, "replica")
    _watch_cascades(app.state.example)
    return wrap(app)


app: Any = None  # built in main(): importing this module connects nothing


def watch_slow_callbacks(threshold: float) -> None:
    """Print every event-loop callback that runs ``threshold`` seconds or longer (and what it ran).

    A diagnostic for stalls the loop-lag monitor only sees as lateness:
    ``CHAOS_SLOW_CALLBACK=0.05`` in the server's environment. One clock read
    per callback, unlike asyncio's debug mode, which records a traceback at
    every ``call_soon`` and would change the load it measures.
    """
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        started = time.perf_counter()
        run(handle)
        took = time.perf_counter() - started
        if took >= threshold:
            callback = getattr(handle, "_callback", None)
            owner = getattr(callback, "__self__", None)
            what = owner.get_coro() if isinstance(owner, asyncio.Task) else callback
            print(f"slow callback: {took * 1000:.0f} ms at {time.monotonic():.3f}: {what!r}", file=sys.stderr)

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]


if __name__ == "__main__":
    import uvicorn

    port = int(sys.argv[1])
    if os.environ.get("CHAOS_SLOW_CALLBACK"):
        watch_slow_callbacks(float(os.environ["CHAOS_SLOW_CALLBACK"]))
    app = build()
    if os.environ.get("CHAOS_GC") == "freeze":
        # docs/operations.md, "Tail latency: garbage collection": the host's remedy, as a host would
        gc.collect()
        gc.freeze()
    gc.callbacks.append(_time_full_gcs)  # after that start-up collection: only the serving ones count
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        workers=1,
        log_level="info",
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
