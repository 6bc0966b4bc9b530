"""Outage drill: break every dependency of the example app for real and check each promise.

Starts the example app in-process with a FaultProxy in front of Postgres (primary
and replica), Redis, RabbitMQ and the scanner / TURN stand-ins, then for each
scenario fires real requests and prints: dependency, fault, route, the status the
runbook promises, the status observed, p50/p99 latency, the time to recover once
the fault clears, and PASS/FAIL. Exit status 1 on any FAIL or unreachable service.

    make demo            # or: .venv/bin/python examples/drill.py [--fastapi]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `examples` as a package

import structlog

from degrade.testing import FaultProxy
from degrade.testing.drill import Probe, Scenario, run_drill

SERVICES = {
    "PostgreSQL": ("127.0.0.1", 5432),
    "Redis": ("127.0.0.1", 6379),
    "RabbitMQ": ("127.0.0.1", 5672),
}
API = "/api/v1"


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _outbox(response: Any) -> dict[str, Any]:
    """The outbox relay's entry in /health/deep's ``components`` (the example has one relay)."""
    components = response.json()["components"]
    return next(value for name, value in components.items() if name.startswith("outbox:"))


class OutboxWatch:
    """Checks of the outbox relay in /health/deep: a backlog while the broker is down, drained after."""

    def __init__(self) -> None:
        self.published = 0

    def waiting(self, response: Any) -> bool:
        """Broker down: the events of the 202s wait in the table (the relay's backlog count)."""
        relay = _outbox(response)
        self.published = max(self.published, relay["published"])
        return bool(relay["backlog"] > 0)

    def delivered(self, response: Any) -> bool:
        """Broker back: the backlog is 0, nothing dropped, and the relay published more than before."""
        relay = _outbox(response)
        return bool(relay["backlog"] == 0 and not relay["dropped"] and relay["published"] > self.published)


def scenarios(token: str, track_id: int, unseen_id: int, hatch: object) -> list[Scenario]:
    auth = {"authorization": f"Bearer {token}"}

    def p(method: str, path: str, expect: int, healthy: int = 200, **kw: object) -> Probe:
        return Probe(method, f"{API}{path}", expect=expect, healthy=healthy, headers=auth, **kw)  # type: ignore[arg-type]

    read = p("GET", f"/tracks/{track_id}", 200)
    feed = p("GET", "/feed", 200)
    write = p("POST", "/tracks", 503, healthy=202, json={"title": "drill"})
    login = p("POST", "/auth/login", 200, json={"user": "drill"})
    deep_503 = p("GET", "/health/deep", 503)
    deep_ok = p("GET", "/health/deep", 200)
    open_hatch = getattr(hatch, "open")  # noqa: B009 - a callable taken once
    close_hatch = getattr(hatch, "close")  # noqa: B009
    outbox = OutboxWatch()
    # Redis down: a track this pod read from Redis comes from the stale tier (X-Cache: stale);
    # one it never saw comes from Postgres (X-Cache: unavailable).
    stale = p(
        "GET",
        f"/tracks/{track_id}",
        200,
        check=lambda r: r.headers["x-cache"] == "stale" and int(r.headers["age"]) >= 0,
        recovered=lambda r: r.headers["x-cache"] != "stale",
        note="seen: stale, marked",
    )
    unseen = p(
        "GET",
        f"/tracks/{unseen_id}",
        200,
        check=lambda r: r.headers["x-cache"] == "unavailable",
        note="unseen: from Postgres",
    )
    every = dict.fromkeys(("db", "db-replica", "redis", "rabbitmq", "scanner", "turn"), "refuse")
    return [
        # Postgres primary: writes 503 at once; GETs served read-only from the replica.
        Scenario("primary refused", {"db": "refuse"}, [read, feed, write, login, deep_503]),
        Scenario("primary blackholed", {"db": "blackhole"}, [read, write, deep_503]),
        # Replica: reads fall back to the primary; nothing visible.
        Scenario(
            "replica refused",
            {"db-replica": "refuse"},
            [read, feed, p("POST", "/tracks", 202, 202, json={"title": "r"}), deep_ok],
        ),
        Scenario("replica blackholed", {"db-replica": "blackhole"}, [read, feed]),
        # Redis: sessions fail loud; cache, rate limits and revocation checks degrade softly.
        Scenario(
            "Redis refused",
            {"redis": "refuse"},
            [
                p("POST", "/auth/login", 503, json={"user": "drill"}),
                p("POST", "/auth/refresh", 503, 401, json={"refresh_token": "x"}),
                stale,
                unseen,
                feed,
                deep_503,
            ],
        ),
        Scenario(
            "Redis blackholed",
            {"redis": "blackhole"},
            [p("POST", "/auth/login", 503, json={"user": "drill"}), read, feed],
        ),
        # RabbitMQ: the write and its event commit together in Postgres (the outbox); the
        # relay publishes the backlog once the broker is back.
        Scenario(
            "RabbitMQ refused",
            {"rabbitmq": "refuse"},
            [
                p("POST", "/tracks", 202, 202, json={"title": "q"}),
                p(
                    "GET",
                    "/health/deep",
                    200,
                    check=outbox.waiting,
                    recovered=outbox.delivered,
                    note="outbox backlog > 0, then delivered",
                ),
            ],
        ),
        Scenario(
            "RabbitMQ blackholed",
            {"rabbitmq": "blackhole"},
            [p("POST", "/tracks", 202, 202, json={"title": "q"})],
        ),
        # Scanner: uploads fail loud, unless an operator opens the CLAMAV_REQUIRED hatch.
        Scenario(
            "scanner refused",
            {"scanner": "refuse"},
            [p("POST", "/uploads", 503, 201, content=b"data"), deep_ok],
        ),
        Scenario(
            "scanner refused, CLAMAV_REQUIRED=false",
            {"scanner": "refuse"},
            [p("POST", "/uploads", 201, 201, content=b"data")],
            before=open_hatch,
            after=close_hatch,
        ),
        # TURN: a feature flag; the config route keeps answering.
        Scenario("TURN refused", {"turn": "refuse"}, [p("GET", "/config/webrtc", 200), deep_ok]),
        # Everything at once: only what touches nothing still answers.
        Scenario(
            "all refused",
            every,
            [
                p("GET", "/health", 200),
                deep_503,
                p("GET", "/config/webrtc", 200),
                write,
                p("GET", f"/tracks/{track_id}", 503),  # no primary, no replica, no cache
                p("POST", "/auth/login", 503, json={"user": "drill"}),
            ],
        ),
    ]


async def main(argv: list[str]) -> int:
    """Run every scenario; ``--fastapi`` drills the FastAPI version of the app."""
    started = time.perf_counter()
    missing = [f"{name} on {h}:{port}" for name, (h, port) in SERVICES.items() if not reachable(h, port)]
    if missing:
        print("drill: cannot reach " + ", ".join(missing) + ".", file=sys.stderr)
        print("drill: start the services first (.ci/run shows how); no scenario was run.", file=sys.stderr)
        return 1

    from examples import stubs
    from examples.app import Settings

    if "--fastapi" in argv:
        from examples.fastapi_app import create_app
    else:
        from examples.app import create_app

    async with contextlib.AsyncExitStack() as stack:
        scanner = await stack.enter_async_context(await stubs.start("scanner"))
        turn = await stack.enter_async_context(await stubs.start("turn"))
        upstreams = {
            "db": SERVICES["PostgreSQL"],
            "db-replica": SERVICES["PostgreSQL"],
            "redis": SERVICES["Redis"],
            "rabbitmq": SERVICES["RabbitMQ"],
            "scanner": ("127.0.0.1", scanner.sockets[0].getsockname()[1]),
            "turn": ("127.0.0.1", turn.sockets[0].getsockname()[1]),
        }
        proxies: dict[str, FaultProxy] = {}
        for name, (host, port) in upstreams.items():
            proxies[name] = await stack.enter_async_context(await FaultProxy.start(host, port))
        settings = Settings(
            database_url=proxies["db"].url_for(Settings.database_url),
            read_database_url=proxies["db-replica"].url_for(Settings.database_url),
            redis_url=proxies["redis"].url_for(Settings.redis_url),
            amqp_url=proxies["rabbitmq"].url_for(Settings.amqp_url),
            scanner_addr=proxies["scanner"].address,
            turn_addr=proxies["turn"].address,
            key_prefix=f"degrade-drill-{os.getpid()}",
            # The drill fires hundreds of requests as one user: limits that never bite.
            default_rate="1000000/minute",
            feed_rate="1000000/minute",
            login_rate="1000000/minute",
        )
        # The transcode worker's queue, so the drill's events are routed (and removed after).
        await stack.enter_async_context(_worker_queue(Settings.amqp_url, f"{settings.key_prefix}.events"))
        app = create_app(settings)
        token = app.state.tokens.mint("drill")
        stack.push_async_callback(_drop_outbox, app.state.example.outbox)
        track_id, unseen_id = await _seed_tracks(app)
        plan = scenarios(token, track_id, unseen_id, app.state.registry.hatches["CLAMAV_REQUIRED"])
        kind = "FastAPI" if "--fastapi" in argv else "Starlette"
        print(f"drill: {len(plan)} scenarios against the example app ({kind})\n", flush=True)
        report = await run_drill(
            app, proxies, plan, requests=20, progress=lambda line: print("  " + line, flush=True)
        )
    print()
    print(report.table())
    passed = sum(r.passed for r in report.results)
    print(f"\n{passed}/{len(report.results)} PASS in {time.perf_counter() - started:.1f} s")
    return 0 if report.passed else 1


@contextlib.asynccontextmanager
async def _worker_queue(url: str, exchange: str):
    import aio_pika

    connection = await asyncio.wait_for(aio_pika.connect(url), 5)
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, "topic", durable=True)
        queue = await channel.declare_queue(f"{exchange}.transcode", auto_delete=False)
        await queue.bind(ex, "track.#")
        try:
            yield
        finally:
            await queue.delete(if_unused=False, if_empty=False)
            await ex.delete()
    finally:
        await connection.close()


async def _seed_tracks(app: Any) -> tuple[int, int]:
    """Two tracks: one the drill reads (seen by the cache), one it reads only while Redis is down.

    Written through the app's own code (the write and its outbox row), before its lifespan starts:
    the relay publishes their events once the drill runs it.
    """
    example = app.state.example
    try:
        seen = await example.create_track("drill", "seed")
        unseen = await example.create_track("drill", "unseen")
    except Exception as exc:
        raise SystemExit(f"drill: the healthy app could not write a track ({type(exc).__name__})") from None
    return int(seen["id"]), int(unseen["id"])


async def _drop_outbox(outbox: Any) -> None:
    """Drop the drill's outbox table and its trigger function (the table is named after the drill's pid)."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from examples.app import Settings

    engine = create_async_engine(Settings.database_url)
    try:
        await outbox.drop_table(engine, timeout=10)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    # Quiet logs: the table is the output. Transitions still print as warnings.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    # aio-pika logs every failed reconnect through stdlib logging; the table says enough.
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("aiormq", "aio_pika"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    sys.exit(asyncio.run(main(sys.argv[1:])))
