"""The example app as `make chaos` serves it: examples.app, plus a timing header and a debug route.

Run by bench/chaos.py as ``python bench/chaos_app.py PORT`` (one uvicorn worker),
configured like examples/app.py through the environment, plus:

===================  ================================================================
``CHAOS_RATES``      ``off`` (default): limits that never bite; else
                     ``default|feed|login`` rates, e.g. ``40/second;burst=10|...``
``CHAOS_PREFIX``     the Redis key / exchange prefix (one per run)
===================  ================================================================

Nothing here changes what the example app does: the wrapper only

* adds ``x-chaos-took`` (seconds from the request reaching the app to its
  response start: the server-side wait, free of the load generator's own queueing);
* answers ``GET /_chaos/state`` itself, outside the app's middleware (never rate
  limited or gated): pool check-outs, asyncio tasks, open fds, RSS, the event
  publisher's counters, every dependency's state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples.app import Settings, create_app  # noqa: E402

_PAGE = os.sysconf("SC_PAGE_SIZE")


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


def state(app: Any) -> dict[str, Any]:
    """What the harness samples: leaks, pools, events, dependencies."""
    ex = app.state.example
    bus = ex.bus.stats
    return {
        "pid": os.getpid(),
        "time": time.time(),
        "rss": rss_bytes(),
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
        "limiter": {k: getattr(ex.limiter.stats, k) for k in type(ex.limiter.stats).__slots__},
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
                message["headers"] = [*message.get("headers", ()), (b"x-chaos-took", took)]
            await send(message)

        await app(scope, receive, timed)

    return wrapper


def build() -> Any:
    """The wrapped example app (its lifespan runs through the wrapper untouched)."""
    return wrap(create_app(_settings()))


app: Any = None  # built in main(): importing this module connects nothing

if __name__ == "__main__":
    import uvicorn

    port = int(sys.argv[1])
    app = build()
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
