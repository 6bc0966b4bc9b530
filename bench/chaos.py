"""Chaos under load (`make chaos`): the example app under uvicorn, real services broken under 200 clients.

Parts (each selectable with ``--only``; all by default):

* ``matrix``: {Postgres primary, replica, Redis, RabbitMQ} x {refuse, blackhole,
  reset mid-stream, latency 2 s} through FaultProxy, plus Redis slow (latency
  200 ms: no cascade into the DB gate); per cell healthy, faulted, healed phases
  under load; checks statuses against the drill's promises (examples/drill.py),
  the wait bounds, recovery, leaks and event accounting; in the primary's
  refuse, blackhole and latency cells, that the requests in flight when Postgres
  broke were answered within the gate's acquire_timeout + 0.1 s.
* ``pods``: two uvicorn processes sharing one Redis (``PODS=2``): the global
  limit with Redis up, the per-pod shares with Redis down, the global limit back.
* ``fuzz``: Hypothesis-generated hostile requests through the full middleware
  stack in-process (bench/chaos_fuzz.py).
* ``soak``: mixed traffic under a random fault schedule; RSS, fds, tasks and
  pools sampled every 5 s.
* ``secrets``: passwords in every DSN; every answer, log line and Sentry event
  scanned for them; latency with Sentry's endpoint blackholed vs up.

One table at the end; exit status 1 on any violation. ``--smoke`` is the CI
subset (tests/integration/test_chaos_smoke.py). Flags: docs/chaos.md.
"""

# A harness, not library code: it runs short blocking commands (rabbitmqctl, redis-server, log
# reads) between phases on purpose, and its judges are long by nature.
# ruff: noqa: ASYNC109, ASYNC110, ASYNC220, ASYNC221, ASYNC240, PLR0912, PLR0917

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import astuple, dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

import httpx  # noqa: E402

from degrade.testing import FaultProxy  # noqa: E402

SECTION = "## Chaos under load (make chaos)"
API = "/api/v1"
DB_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
SERVICES = {"PostgreSQL": ("127.0.0.1", 5432), "Redis": ("127.0.0.1", 6379), "RabbitMQ": ("127.0.0.1", 5672)}
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

#: Matrix dependencies (proxy names, as in examples/drill.py) and their labels.
DEPS = {"db": "Postgres primary", "db-replica": "Postgres replica", "redis": "Redis", "rabbitmq": "RabbitMQ"}
FAULTS = ("refuse", "blackhole", "reset", "latency")
#: The matrix's faults: the outages above, and ``slow`` (Redis only; run first by default, so Redis
#: fails next three cells later, outside its 60 s relapse window).
CELL_FAULTS = ("slow", *FAULTS)
#: Dependencies with a ``slow`` cell.
SLOW_DEPS = ("redis",)
#: ``slow``: seconds of latency each way (--slow-latency); a Redis call's round trip takes twice that.
SLOW = 0.2
#: Seconds between two resets of every open connection during a ``reset`` fault (--reset-every).
RESET_EVERY = 0.25
LATENCY = 2.0

#: Seconds of dependency wait each route may add while that dependency fails: the
#: sum of the bounds of the sites on its path (docs/chaos.md lists them).
BOUNDS: dict[str, dict[str, float]] = {
    "db": {"GET /tracks/{id}": 1.0, "GET /feed": 1.0, "POST /tracks": 1.0, "GET /health/deep": 1.0},
    # the replica's pool waits 0.5 s, then the read runs on the primary
    "db-replica": {"GET /tracks/{id}": 0.5, "GET /feed": 0.5, "POST /tracks": 0.0, "GET /health/deep": 1.0},
    # each Redis call 0.25 s: the revocation check; the cache read and write
    "redis": {
        "POST /auth/login": 0.25,
        "POST /auth/refresh": 0.25,
        "GET /tracks/{id}": 0.75,
        "GET /feed": 0.25,
        "POST /tracks": 0.25,
        "GET /health/deep": 1.0,
    },
    "rabbitmq": {"POST /tracks": 0.0, "GET /health/deep": 1.0},
}
#: The servers' environment beyond the stack's (--malloc, --gc); a variable set in the harness's own wins.
SERVER_ENV: dict[str, str] = {}
#: --malloc fixed: glibc's mmap threshold held at its initial 128 KiB. Left dynamic, the first
#: large buffer freed (asyncio reads a socket into a 256 KiB bytes) raises it, later ones come
#: from the heap, and the heap keeps what they leave (docs/operations.md, "Memory").
MALLOC_FIXED = {"MALLOC_MMAP_THRESHOLD_": "131072"}
#: --gc freeze: the servers run docs/operations.md's "Tail latency: garbage collection" remedy
#: (gc.collect(); gc.freeze() once built). Without it each full collection walked the start-up
#: objects too: 50-110 ms loop stalls every ~3 s, growing over a run, in one RabbitMQ cell.
GC_FROZEN = {"CHAOS_GC": "freeze"}
#: Recovery allowed beyond --recover: /health/deep caches its result (failures too) for 1 s.
RECOVER_EXTRA = {"GET /health/deep": 1.0}
#: Allowed beyond a route's bound: the issue's 0.1 s.
SLACK = 0.1
#: Seconds after healing from which a cell counts as without its fault again (for the judge's
#: reference of a route's work under this load): past the 1 s recovery bound and its grace.
SETTLED = 3.0
#: Routes under the DB gate (examples/app.py: include=/tracks, /feed, /uploads) that the cells load.
GATED = ("GET /tracks/{id}", "GET /feed", "POST /tracks")
#: The gate's acquire_timeout in examples/app.py, if the server does not report it.
ACQUIRE = 1.0
#: Routes that read through the Redis cache (FailSoftCache): 2xx whatever Redis does.
CACHE_ROUTES = ("GET /tracks/{id}",)
#: The note of the DB gate's shedding 503 (bench/chaos_load.py's kind_of).
GATE_SHED = "dependency_unavailable:db:shed"
#: The DB gate's call site (its degraded and shed counts are the gate's 503s).
GATE_SITE = "degrade.db.DBHealthMiddleware"
#: Primary cells judged on the in-flight promise (a reset may not take the primary down at all).
IN_FLIGHT_FAULTS = ("refuse", "blackhole", "latency")


def say(*parts: object) -> None:
    print(*parts, flush=True)


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def route_label(method: str, path: str) -> str:
    parts = path.removeprefix(API).split("/")
    return f"{method} " + "/".join("{id}" if p.isdigit() else p for p in parts)


# -- expectations, from the drill ------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """One route of a cell: what it answers while the dependency fails, and when healthy."""

    label: str
    method: str
    path: str
    expect: int
    healthy: int
    body: str | None


class _Hatch:
    def open(self) -> None: ...
    def close(self) -> None: ...


def expectations(token: str, track_id: int) -> dict[tuple[str, str], list[Expect]]:
    """Per (dependency, fault) the routes to load and their statuses, from examples/drill.py.

    refuse / blackhole: the drill's scenario of that fault (a route the drill probes
    only under the other one keeps its status: both are the dependency down).
    latency 2 s: every site's bound is shorter than a round trip, so it is a blackhole.
    reset: the dependency may fail for a moment or not at all: the refuse status or the healthy one.
    Every cell also loads /health and /config/webrtc (200 whatever fails, as in "all refused").
    """
    from examples.drill import scenarios

    plan = scenarios(token, track_id, track_id, _Hatch())  # one track stands for "unseen" too
    by_fault: dict[str, dict[str, dict[str, Expect]]] = defaultdict(lambda: defaultdict(dict))
    always: dict[str, Expect] = {}
    for scenario in plan:
        if scenario.before is not None:
            continue  # the operator's escape hatch: not part of the matrix
        for probe in scenario.probes:
            body = None
            if probe.json is not None:
                body = json.dumps(probe.json)
            elif probe.content is not None:
                body = probe.content.decode()
            label = route_label(probe.method, probe.path)
            e = Expect(label, probe.method, probe.path, probe.expect, probe.healthy, body)
            if len(scenario.faults) > 1:
                if label in ("GET /health", "GET /config/webrtc"):
                    always[label] = e
                continue
            ((dep, fault),) = scenario.faults.items()
            by_fault[dep][str(fault)].setdefault(label, e)
    cells: dict[tuple[str, str], list[Expect]] = {}
    for dep in DEPS:
        refuse, blackhole = by_fault[dep]["refuse"], by_fault[dep]["blackhole"]
        routes = {**refuse, **blackhole}
        for fault in FAULTS:
            source = refuse if fault in ("refuse", "reset") else blackhole
            cell = [source.get(label, refuse.get(label, e)) for label, e in routes.items()]
            cells[(dep, fault)] = [*cell, *always.values()]
    return cells


def slow_routes(
    table: dict[tuple[str, str], list[Expect]], latency: float, timeout: float
) -> tuple[list[Expect], str]:
    """The Redis ``slow`` cell's routes and regime, from the app's Redis timeout (``timeout``).

    FaultProxy delays each way, so a call's round trip takes 2 x ``latency``.
    ``exceeds`` (2 x latency >= timeout): no call answers within the client's
    bound, so by design Redis fails at it: the statuses of the Redis latency cell
    (its blackhole's). ``within`` (2 x latency <= timeout / 2): every call answers
    in time: every route keeps its healthy status. In between the outcome depends
    on the event loop's lag: ValueError (choose another --slow-latency). Both
    regimes also load ``POST /tracks`` (Redis's revocation check, then a write
    on the gated primary): 202 throughout.
    """
    rtt = 2 * latency
    source = table[("redis", "latency")]
    if rtt >= timeout:
        regime, routes = "exceeds", list(source)
    elif rtt <= timeout / 2:
        regime, routes = "within", [replace(e, expect=e.healthy) for e in source]
    else:
        raise ValueError(
            f"--slow-latency {latency:g}: a {rtt:g} s round trip is neither over the app's Redis"
            f" timeout ({timeout:g} s) nor within half of it; the cell could not say what to expect"
        )
    write = Expect("POST /tracks", "POST", f"{API}/tracks", 202, 202, json.dumps({"title": "slow"}))
    return [*[e for e in routes if e.label != write.label], write], regime


# -- the server ------------------------------------------------------------------------


class Server:
    """bench/chaos_app.py under uvicorn (one worker) in its own process group."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Server:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(HERE / "chaos_app.py"), str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(timeout=2) as c:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited at start-up: {self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get(f"{self.url}{API}/health")).status_code == 200:
                        return self
                await asyncio.sleep(0.1)
        await self.stop()
        raise RuntimeError(f"the server did not answer /health within 30 s: {self.log_tail()}")

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        p = self.process
        if p is None or p.poll() is not None:
            return
        p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if p.poll() is None:
            p.kill()
            p.wait(5)

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    async def state(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as c:
            return dict((await c.get(f"{self.url}/_chaos/state")).json())


def log_problems(text: str) -> list[str]:
    """Lines of a server log that are bugs whatever the outage: tracebacks, destroyed tasks, 500s."""
    bad = (
        "Traceback",
        "Task was destroyed",
        "Exception in ASGI application",
        "was never awaited",
        "exception was never retrieved",
    )
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback") and any("aiormq" in x for x in lines[i + 1 : i + 3]):
            continue  # aiormq logs its reader's traceback on every broker loss (its logger, not a bug here)
        if line.startswith("Traceback") and i and "direct cause" in lines[i - 2]:
            continue
        if any(b in line for b in bad):
            found.append(
                " | ".join(lines[i : i + 1] + [x for x in lines[i + 1 : i + 40] if x and x[0] != " "][:1])
            )
    return found


# -- the event consumer ----------------------------------------------------------------


class Consumer:
    """A queue bound to the app's exchange, consumed directly (not through a proxy): delivered ids."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange
        self.ids: set[str] = set()
        #: The ``track_id`` of each delivered event (its JSON body): matched to the 202 answers.
        self.track_ids: set[int] = set()
        self.messages = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Consumer]:
        import aio_pika

        connection = await asyncio.wait_for(aio_pika.connect(self.url), 10)
        try:
            channel = await connection.channel()
            ex = await channel.declare_exchange(self.exchange, "topic", durable=True)
            queue = await channel.declare_queue(f"{self.exchange}.chaos", auto_delete=False)
            await queue.bind(ex, "track.#")

            async def on_message(message: Any) -> None:
                self.messages += 1
                self.ids.add(str(message.message_id))
                with contextlib.suppress(ValueError, AttributeError, TypeError):
                    self.track_ids.add(int(json.loads(message.body)["track_id"]))
                await message.ack()

            tag = await queue.consume(on_message)
            try:
                yield self
            finally:
                await queue.cancel(tag)
                await queue.delete(if_unused=False, if_empty=False)
                await ex.delete()
        finally:
            await connection.close()


# -- load ------------------------------------------------------------------------------


@dataclass
class Sample:
    label: str
    t0: float
    t1: float
    status: int
    took: float | None
    retry_after: str | None
    note: str
    port: int
    #: ``time.monotonic()`` at the server's response start (x-chaos-at); None without an answer.
    at: float | None = None
    #: Seconds the DB gate had it wait for a primary connection (x-chaos-waited); None outside the gate.
    waited: float | None = None
    #: The ``detail`` of a 5xx error body (quoted in the violations); None for other answers.
    detail: str | None = None

    @property
    def arrived(self) -> float | None:
        """When the request reached the app (server side), on the harness's clock."""
        return None if self.at is None or self.took is None else self.at - self.took


async def load(
    ports: Sequence[int],
    requests: Sequence[tuple[str, str, str, dict[str, str], str | None]],
    *,
    start: float,
    stop: float,
    clients: int,
    timeout: float = 10.0,
    secrets: Sequence[str] = (),
) -> tuple[list[Sample], list[str]]:
    """Run bench/chaos_load.py from ``start`` to ``stop`` (monotonic); its samples."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "out.json")
        spec = {
            "port": ports[0],
            "hosts": list(ports),
            "clients": clients,
            "start": start,
            "stop": stop,
            "timeout": timeout,
            "requests": [list(r) for r in requests],
            "secrets": list(secrets),
        }
        spec_path.write_text(json.dumps(spec))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "chaos_load.py"), str(spec_path), str(out_path)
        )
        bound = stop - time.monotonic() + timeout + 30
        try:
            await asyncio.wait_for(proc.wait(), bound)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("the load generator did not finish in time") from None
        if proc.returncode != 0:
            raise RuntimeError(f"the load generator failed ({proc.returncode})")
        result = json.loads(out_path.read_text())
    return [Sample(*s) for s in result["samples"]], list(result["secret_hits"])


# -- the stack: stubs, proxies, consumer, server ---------------------------------------


@dataclass
class Stack:
    proxies: dict[str, FaultProxy]
    consumer: Consumer
    server: Server
    token: str
    track_id: int
    prefix: str
    extra_env: dict[str, str] = field(default_factory=dict)
    consumer_base: int = 0
    consumer_tracks: set[int] = field(default_factory=set)


async def _drop_outbox(db_url: str, prefix: str) -> None:
    """Drop the outbox table (and its trigger function) the example app made for this run's prefix."""
    from sqlalchemy.ext.asyncio import create_async_engine

    from degrade.eventbus import Outbox

    engine = create_async_engine(db_url)
    try:
        await Outbox(f"{prefix.replace('-', '_')}_outbox").drop_table(engine, timeout=10)
    finally:
        await engine.dispose()


@contextlib.asynccontextmanager
async def stack(
    logdir: Path,
    *,
    name: str = "matrix",
    rates: str = "off",
    pods: int = 1,
    urls: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    proxies: dict[str, FaultProxy] | None = None,
) -> AsyncIterator[Stack]:
    """Stubs, one FaultProxy per dependency, the consumer, the server; all stopped at exit."""
    from _util import delete_keys
    from examples import stubs
    from examples.app import Tokens

    urls = {"db": DB_URL, "redis": REDIS_URL, "amqp": AMQP_URL, **(urls or {})}
    prefix = f"degrade-chaos-{name}-{uuid.uuid4().hex[:8]}"
    secret = uuid.uuid4().hex
    async with contextlib.AsyncExitStack() as st:
        st.push_async_callback(_drop_outbox, urls["db"], prefix)  # the example's per-run outbox table
        st.push_async_callback(delete_keys, urls["redis"], prefix)  # its sessions, cache, limits
        if proxies is None:
            scanner = await st.enter_async_context(await stubs.start("scanner"))
            turn = await st.enter_async_context(await stubs.start("turn"))

            def addr(url: str) -> tuple[str, int]:
                from urllib.parse import urlsplit

                parts = urlsplit(url)
                return parts.hostname or "127.0.0.1", int(parts.port or 0)

            upstreams = {
                "db": addr(urls["db"]),
                "db-replica": addr(urls["db"]),
                "redis": addr(urls["redis"]),
                "rabbitmq": addr(urls["amqp"]),
                "scanner": ("127.0.0.1", scanner.sockets[0].getsockname()[1]),
                "turn": ("127.0.0.1", turn.sockets[0].getsockname()[1]),
            }
            proxies = {}
            for pname, (host, port) in upstreams.items():
                proxies[pname] = await st.enter_async_context(
                    await FaultProxy.start(host, port, max_connections=1024)
                )
        consumer = await st.enter_async_context(Consumer(urls["amqp"], f"{prefix}.events").running())
        env = {
            **os.environ,
            "DATABASE_URL": proxies["db"].url_for(urls["db"]),
            "READ_DATABASE_URL": proxies["db-replica"].url_for(urls["db"]),
            "REDIS_URL": proxies["redis"].url_for(urls["redis"]),
            "AMQP_URL": proxies["rabbitmq"].url_for(urls["amqp"]),
            "SCANNER_ADDR": "{}:{}".format(*proxies["scanner"].address),
            "TURN_ADDR": "{}:{}".format(*proxies["turn"].address),
            "APP_SECRET": secret,
            "CHAOS_PREFIX": prefix,
            "CHAOS_RATES": rates,
            "PODS": str(pods),
            "PYTHONUNBUFFERED": "1",
            **{k: v for k, v in SERVER_ENV.items() if k not in os.environ},
            **(extra_env or {}),
        }
        env.pop("CLAMAV_REQUIRED", None)
        if "SENTRY_DSN" not in (extra_env or {}):
            env.pop("SENTRY_DSN", None)
        server = await st.enter_async_context(Server(env, logdir / f"{name}-server.log"))
        token = Tokens(secret.encode()).mint("chaos", ttl=24 * 3600)
        async with httpx.AsyncClient(timeout=10) as c:
            r = await c.post(
                f"{server.url}{API}/tracks",
                json={"title": "seed"},
                headers={"authorization": f"Bearer {token}"},
            )
            if r.status_code != 202:
                raise RuntimeError(f"the healthy app answered {r.status_code} to a write: {r.text[:200]}")
            track_id = int(r.json()["id"])
        yield Stack(proxies, consumer, server, token, track_id, prefix, extra_env or {})


# -- the matrix ------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the final table."""

    part: str
    case: str
    numbers: str
    violations: list[str]

    @property
    def verdict(self) -> str:
        return "PASS" if not self.violations else "FAIL"


@dataclass
class Durations:
    healthy: float
    faulted: float
    healed: float
    grace: float
    recover: float


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def apply_fault(proxy: FaultProxy, fault: str, slow: float = SLOW) -> Callable[[], None] | None:
    """Apply ``fault``; for ``reset`` return the tick to repeat while it lasts."""
    if fault == "slow":
        proxy.latency(slow)
    elif fault == "refuse":
        proxy.refuse()
    elif fault == "blackhole":
        proxy.blackhole()
    elif fault == "latency":
        proxy.latency(LATENCY)
    elif fault == "reset":
        proxy.reset()
        return proxy.reset
    else:
        raise ValueError(fault)
    return None


async def quiesce(server: Server, within: float = 10.0) -> dict[str, Any]:
    """The server's state once no connection is checked out and no event is in flight (bounded)."""
    deadline = time.monotonic() + within
    st = await server.state()
    while time.monotonic() < deadline:
        ev = st["events"]
        if (
            st["pool"]["checkedout"] == 0
            and st["replica_pool"]["checkedout"] == 0
            and ev["buffered"] == 0
            and ev["in_flight"] == 0
        ):
            break
        await asyncio.sleep(0.2)
        st = await server.state()
    return st


async def all_up(server: Server, within: float) -> tuple[float, list[str]]:
    """Seconds until every matrix dependency is up (bounded), and those still down."""
    start = time.monotonic()
    while True:
        deps = (await server.state())["deps"]
        down = [name for name in DEPS if deps.get(name) != "ok"]
        if not down or time.monotonic() - start > within:
            return time.monotonic() - start, down
        await asyncio.sleep(0.2)


def other_fds(st: dict[str, Any]) -> int:
    """Open fds less the pooled connections (Postgres primary and replica, Redis)."""
    pooled = st["pool"]["open"] + st["replica_pool"]["open"] + st["redis_connections"]
    return int(st["fds"]) - max(0, pooled)


@dataclass
class Margins:
    tasks: int = 5
    fds: int = 10
    rss: float = 0.10


def leak_check(before: dict[str, Any], after: dict[str, Any], m: Margins) -> tuple[str, list[str]]:
    v = []
    dt = after["tasks"] - before["tasks"]
    # pools refill after an outage drained them: count the fds that are not pooled connections
    dfd = other_fds(after) - other_fds(before)
    drss = (after["rss"] - before["rss"]) / before["rss"]
    if after["pool"]["checkedout"] or after["replica_pool"]["checkedout"]:
        v.append(
            "pool checked out after healing:"
            f" {after['pool']['checkedout']}/{after['replica_pool']['checkedout']}"
        )
    if dt > m.tasks:
        v.append(f"asyncio tasks {before['tasks']} -> {after['tasks']} (margin {m.tasks})")
    if dfd > m.fds:
        v.append(
            f"open fds, pooled connections aside, {other_fds(before)} -> {other_fds(after)} (margin {m.fds})"
        )
    if drss > m.rss:
        v.append(f"RSS {before['rss'] / 2**20:.0f} -> {after['rss'] / 2**20:.0f} MiB (margin {m.rss:.0%})")
    text = f"tasks {dt:+d}, fds {dfd:+d}, RSS {drss:+.1%}"
    if "full_gcs" in before and "full_gcs" in after:  # the loop's pauses: [count, seconds, longest]
        n = int(after["full_gcs"][0] - before["full_gcs"][0])
        spent = after["full_gcs"][1] - before["full_gcs"][1]
        text += f"; full GCs {n} ({spent * 1000:.0f} ms"
        text += f", longest so far {after['full_gcs'][2] * 1000:.0f} ms)" if n else ")"
    return text, v


def written(samples: list[Sample]) -> set[int]:
    """The track ids of the writes answered 202 (their note is ``outbox:<id>``)."""
    return {
        int(s.note.rpartition(":")[2])
        for s in samples
        if s.label == "POST /tracks" and s.status == 202 and s.note.rpartition(":")[2].isdigit()
    }


async def settle_events(
    stk: Stack, answered: set[int], before: dict[str, Any], within: float = 15.0
) -> tuple[dict[str, Any], set[int]]:
    """Wait until every write answered 202 has its event delivered or dropped (or ``within`` s).

    Returns the server's state and the track ids of the events delivered since the cell began.
    """
    deadline = time.monotonic() + within
    base = stk.consumer_tracks
    while True:
        st = await stk.server.state()
        dropped = st["events"]["dropped"] - before["events"]["dropped"]
        missing = answered - stk.consumer.track_ids
        if len(missing) <= dropped or time.monotonic() > deadline:
            await asyncio.sleep(0.3)  # late ones
            st = await stk.server.state()
            return st, stk.consumer.track_ids - base
        await asyncio.sleep(0.2)


def judge_events(
    samples: list[Sample], answered: set[int], delivered: set[int], dropped: int, after: dict[str, Any]
) -> tuple[str, list[str]]:
    """Every 202's event delivered or counted dropped; events of writes answered otherwise, explained.

    A write whose COMMIT reached Postgres just as the connection was cut (a
    primary reset or blackhole) is committed, with its outbox row, while the
    app could only answer 503 (or the client saw no answer): its event is
    delivered though the client never got a 202. Such extra events are
    allowed up to the number of writes that got no 202; more would be events
    of no write at all.
    """
    v: list[str] = []
    missing = answered - delivered
    if len(missing) != dropped:
        v.append(
            f"events: {len(missing)} writes answered 202 have no delivered event, {dropped} counted dropped"
            f" (buffered {after['events']['buffered']}, in flight {after['events']['in_flight']})"
        )
    extra = delivered - answered
    unsure = sum(1 for s in samples if s.label == "POST /tracks" and s.status not in (202, 401, 429))
    if len(extra) > unsure:
        v.append(f"events: {len(extra)} delivered for no write answered 202, only {unsure} writes unanswered")
    text = f"events {len(answered)}/{len(answered & delivered)}/{dropped}"
    if extra:
        text += f" (+{len(extra)} of writes cut at COMMIT, answered 503 or not at all)"
    return text, v


def _split(s: Sample) -> bool:
    """Does ``s`` say how long it waited in the DB gate's line (x-chaos-waited)?"""
    return s.took is not None and s.waited is not None


def baselines(samples: list[Sample], labels: Sequence[str], t_on: float) -> dict[str, float]:
    """Per route, its healthy p99 server time in this cell (at least every route's p99)."""
    every = [s.took for s in samples if s.t1 < t_on and s.took is not None]
    base: dict[str, float] = {}
    for label in labels:
        healthy = [s.took for s in samples if s.label == label and s.t1 < t_on and s.took is not None]
        base[label] = max(_pct(healthy, 99), _pct(every, 99))
    return base


def judge_cell(
    dep: str, fault: str, routes: list[Expect], samples: list[Sample], t_on: float, t_off: float, d: Durations
) -> tuple[dict[str, Any], list[str]]:
    """Statuses, bodies, wait bounds and recovery of one cell's samples."""
    by_label = {e.label: e for e in routes}
    violations: list[str] = []
    bad: Counter[str] = Counter()
    when: dict[str, tuple[float, float]] = {}
    longest: dict[str, float] = {}
    statuses: Counter[int] = Counter()
    shed = 0
    worst_over = -1e9
    worst_where = ""
    base = baselines(samples, list(by_label), t_on)
    # A gated request's wait for a connection is the gate's own bound (its line); the rest is the
    # route's work (x-chaos-waited says which is which). In the db cells the gate is the failing
    # dependency's site, and the whole time is judged.
    split = dep != "db"
    healthy_work = [s.took - (s.waited or 0.0) for s in samples if s.t1 < t_on and s.took is not None]
    # The remainder's allowance is its worst without the fault (the loop's queueing under this
    # load shows in every phase), at least every route's healthy p99. Without the fault: the
    # healthy phase and the healed one from SETTLED s after healing (past the recovery bound and
    # its grace). 5 healthy seconds alone were too few to show this load's worst: POST /tracks's
    # remainder peaked at 0.19 s in one cell's healthy phase, 0.45 s in its settled healed phase
    # and 0.51 s while RabbitMQ (not on its path) was faulted; over a 21-cell matrix the settled
    # healed worst was 0.25-1.04 s against faulted worsts of 0.0-1.45 s.
    work_base = {
        label: max(
            max(
                (
                    s.took - s.waited
                    for s in samples
                    if s.label == label and _split(s) and (s.t1 < t_on or s.t0 >= t_off + SETTLED)
                ),
                default=0.0,
            ),
            _pct(healthy_work, 99),
        )
        for label in GATED
    }
    if dep != "db":
        # The gate's line may hold any gated request up to its acquire_timeout in any cell: the
        # outage of another dependency shifts the load (Redis down: cache misses read Postgres;
        # RabbitMQ down: cheaper requests, more of them reach the pool), and waiting in line is
        # the gate's own bound, not the failing dependency's. (In the db cells that bound is the
        # cell's own.) So a gated route's allowance is at least the line's bound + its healthy p50.
        for label in GATED:
            if label in base:
                healthy = [s.took for s in samples if s.label == label and s.t1 < t_on and s.took is not None]
                base[label] = max(base[label], ACQUIRE + _pct(healthy, 50))
    # recovery: per route whose fault status differs, the first healthy answer to a request sent after
    # t_off, when the server gave it (its response start, x-chaos-at: the load generator's own lag in
    # reading the answer is not the app's; the client's receipt when the server did not say), less
    # its wait in the DB gate's line (the gate let it in: db was seen up; the line is the load's),
    # less the route's median time in the server in the healthy phase (what any answer of it takes
    # under this load: on a VM ~25 % slower per core, 0.2-0.6 s at 100 clients, which pushed login's
    # recovery to 1.01-1.24 s with Redis seen back by the probe in time)
    recovered: dict[str, float | None] = {}
    for label, e in by_label.items():
        if e.expect == e.healthy:
            continue
        served = _pct(
            [
                s.took - (s.waited or 0.0)
                for s in samples
                if s.label == label and s.t1 < t_on and s.took is not None and s.status == e.healthy
            ],
            50,
        )
        # the gate's shedding 503 counts too: while db is down the gate answers its outage 503,
        # so a shed answer says db is seen back and this request met the load's saturation (which
        # the healthy phase shows as well); without it a saturated write route looked unrecovered
        first = [
            s.t1 if s.at is None else s.at - (s.waited or 0.0)  # the gate's line is the load's wait
            for s in samples
            if s.label == label and s.t0 >= t_off and (s.status == e.healthy or s.note == GATE_SHED)
        ]
        recovered[label] = (min(first) - t_off - served) if first else None
    # a route answering the same while the dependency fails is judged by the dependency's recovery
    dep_rec = max((r for r in recovered.values() if r is not None), default=0.0)
    for s in samples:
        e = by_label[s.label]
        statuses[s.status] += 1
        if s.note.endswith(":shed"):
            shed += 1  # the gate's documented "no pooled connection within 1 s" (Retry-After: 1)
            continue
        if s.status == 0:
            bad[f"{s.label}: no answer ({s.note})"] += 1
            continue
        if s.status >= 500 and s.status != 503:
            bad[f"{s.label}: {s.status}"] += 1
            continue
        if s.status == 503 and s.label == "GET /health/deep":
            if s.note != "health:down":
                bad[f"{s.label}: 503 body is not the documented report ({s.note})"] += 1
                continue
        elif s.status == 503 and not s.note.startswith("dependency_unavailable:"):
            bad[f"{s.label}: 503 body is not the documented shape ({s.note})"] += 1
            continue
        if s.status == 503 and s.retry_after is None and s.label != "GET /health/deep":
            bad[f"{s.label}: 503 without Retry-After"] += 1
        if s.status == 429 and s.note != "rate_limited":
            bad[f"{s.label}: 429 body is not the documented shape ({s.note})"] += 1
        # which statuses this request may see, by when it was sent and answered
        rec = recovered.get(s.label, dep_rec)
        if s.t1 < t_on:
            allowed = {e.healthy}
        elif s.t0 < t_on + d.grace or fault == "reset":
            allowed = {e.healthy, e.expect}
        elif s.t1 <= t_off:
            allowed = {e.expect}
        elif rec is not None and s.t0 >= t_off + rec + d.grace:
            allowed = {e.healthy}
        else:
            allowed = {e.healthy, e.expect}
        transition = (
            s.t0 < t_on + d.grace
            or fault == "reset"
            or (t_off <= s.t1 and s.status != e.healthy and (rec is None or s.t0 < t_off + rec + d.grace))
        )
        if transition and s.status == 503 and s.note.startswith(f"dependency_unavailable:{dep}:"):
            # in flight when the dependency failed ("connections in flight ended when Postgres goes
            # down"), or before it is seen back: the dependency's own 503 is a right answer
            allowed = allowed | {503}
        if s.status not in allowed:
            phase = "healthy" if s.t1 < t_on else "faulted" if s.t1 <= t_off else "healed"
            said = f" ({s.detail})" if s.detail else ""
            key = f"{s.label}: {s.status} {s.note}{said} while {phase} (promised {sorted(allowed)})"
            bad[key] += 1
            at = s.t0 - (t_on if phase == "faulted" else t_off if phase == "healed" else t_on)
            when[key] = (min(when[key][0], at), max(when[key][1], at)) if key in when else (at, at)
        # the wait bound: the site's bound + 0.1 s, over the route's healthy p99 under this load
        if s.took is not None and t_on <= s.t0 <= t_off:
            bound = BOUNDS.get(dep, {}).get(s.label, 0.0)
            if split and s.label in GATED and s.waited is not None:
                line = s.waited - (ACQUIRE + SLACK)
                if line > 0:
                    key = f"{s.label}: waited in the DB gate's line over its bound ({ACQUIRE}+{SLACK}s)"
                    bad[key] += 1
                    longest[key] = max(longest.get(key, 0.0), s.waited)
                work, allowed_work = s.took - s.waited, bound + SLACK + work_base[s.label]
                over = work - allowed_work
                where = f"{s.label} {work:.2f}s after the line > {bound}+{SLACK}+{work_base[s.label]:.2f}"
                what = (
                    f"{s.label}: its work after the DB gate's line over its bound"
                    f" ({bound}+{SLACK}+worst without the fault {work_base[s.label]:.2f}s)"
                )
            else:
                over = s.took - (bound + SLACK + base[s.label])
                where = f"{s.label} {s.took:.2f}s > {bound}+{SLACK}+{base[s.label]:.2f}"
                what = f"{s.label}: waited over its bound ({bound}+{SLACK}+healthy p99 {base[s.label]:.2f}s)"
            if over > worst_over:
                worst_over, worst_where = over, where
            if over > 0:
                bad[what] += 1
                longest[what] = max(longest.get(what, 0.0), s.took)
    for text, n in sorted(bad.items(), key=lambda kv: -kv[1]):
        span = (
            f" [sent {when[text][0]:+.2f}..{when[text][1]:+.2f} s from the phase start]"
            if text in when
            else ""
        )
        if text in longest:
            span = f" [longest {longest[text]:.2f} s]"
        violations.append(f"{n} x {text}{span}")
    for label, rec in recovered.items():
        if rec is None:
            violations.append(f"{label}: no healthy answer after the fault cleared")
        elif rec > d.recover + RECOVER_EXTRA.get(label, 0.0):
            violations.append(
                f"{label}: first healthy answer {rec:.2f}s after the fault cleared, less its healthy"
                f" median time in the server (> {d.recover}s)"
            )
    worst_rec = max((r for r in recovered.values() if r is not None), default=None)
    client = [s.t1 - s.t0 for s in samples if s.status]
    info = {
        "requests": len(samples),
        "statuses": dict(sorted(statuses.items())),
        "shed": shed,
        "p99_ms": _pct(client, 99) * 1000,
        "worst_wait": worst_where,
        "recover": worst_rec,
    }
    return info, violations


def gate_counts(st: dict[str, Any]) -> tuple[int, int]:
    """The DB gate's site: (503s for an outage, 503s shed) so far."""
    site = st.get("sites", {}).get("db", {}).get(GATE_SITE, {})
    return int(site.get("degraded", 0)), sum(site.get("shed", {}).values())


def downs(st: dict[str, Any], name: str, since: float, until: float) -> list[float]:
    """When ``name`` went down between ``since`` and ``until`` (the server's transition log)."""
    return [
        t
        for t, dep, state in st.get("transitions", ())
        if dep == name and state == "down" and since <= t <= until
    ]


def judge_in_flight(
    samples: list[Sample],
    t_on: float,
    t_off: float,
    before: dict[str, Any],
    after: dict[str, Any],
    base: dict[str, float],
) -> tuple[str, list[str]]:
    """The gate's in-flight promise, in a cell that breaks the Postgres primary.

    A request on a gated route in flight when Postgres broke (it reached the app
    before ``t_on``, the fault's start, and was answered after it) must be answered
    by ``t_on + acquire_timeout + 0.1 s``: a silent primary is seen down within
    acquire_timeout (the first checkouts' bound), then the gate terminates the
    connections in flight and answers its line at once. So a request in flight at
    that transition (from the server's log) that the primary's outage ends (it is
    answered the db's 503) must be answered within 0.1 s of it ("503 within about
    0.1 s of the transition", docs/postgres.md); the others in flight then (replica
    reads, a write that committed in time) only finish their own work. Both bounds
    get the route's healthy p99 in this cell on top, like every wait bound here
    (the queueing of 200 clients on one worker). Times are the server's
    (x-chaos-at, x-chaos-at - x-chaos-took for the arrival).
    """
    acquire = float((after.get("gate") or {}).get("acquire_timeout") or ACQUIRE)
    went_down = downs(after, "db", t_on, t_off)
    t_down = min(went_down) if went_down else None
    v: list[str] = []

    def in_flight(t: float) -> list[Sample]:
        return [
            s
            for s in samples
            if s.label in GATED and s.arrived is not None and s.at is not None and s.arrived < t < s.at
        ]

    def ended(s: Sample) -> bool:
        return s.status == 503 and s.note.startswith("dependency_unavailable:db:")

    def latest(group: list[Sample], t: float) -> float:
        return max((s.at - t for s in group if s.at is not None), default=0.0)

    at_fault = in_flight(t_on)
    lost = [s for s in samples if s.label in GATED and s.status == 0 and s.t0 < t_on]
    late = Counter(
        f"{s.label} {s.status}"
        for s in at_fault
        if s.at is not None and s.at - t_on > acquire + SLACK + base[s.label]
    )
    worst, worst_ended = latest(at_fault, t_on), latest([s for s in at_fault if ended(s)], t_on)
    for key, n in late.most_common():
        v.append(
            f"in flight when Postgres broke: {n} x {key} answered over {acquire:g}+{SLACK}+healthy p99"
            f" after the fault (worst +{worst:.2f} s)"
        )
    if lost:
        v.append(f"in flight when Postgres broke: {len(lost)} never answered")
    if not at_fault and not lost:
        v.append("no gated request was in flight when Postgres broke: the promise was not exercised")
    if t_down is None:
        v.append("the db dependency never went down while Postgres was broken")
        tr_text = "db never went down"
    else:
        at_tr = in_flight(t_down)
        ended_tr = [s for s in at_tr if ended(s)]
        worst_tr = latest(ended_tr, t_down)
        slow_tr = Counter(
            s.label for s in ended_tr if s.at is not None and s.at - t_down > SLACK + base[s.label]
        )
        for key, n in slow_tr.most_common():
            v.append(
                f"in flight when db went down: {n} x {key} answered its 503 over {SLACK}+healthy p99"
                f" after the transition (worst +{worst_tr:.2f} s)"
            )
        tr_text = (
            f"db down +{t_down - t_on:.2f} s; in flight then {len(at_tr)}, {len(ended_tr)} ended by it"
            f" (503), the last +{worst_tr:.3f} s after it (bound {SLACK}+p99)"
        )
    terminated = ((after.get("gate") or {}).get("terminated") or 0) - (
        (before.get("gate") or {}).get("terminated") or 0
    )
    n503 = sum(1 for s in at_fault if ended(s))
    allowance = max((base[label] for label in GATED if label in base), default=0.0)
    numbers = (
        f"in flight at the fault {len(at_fault)}, answered by +{worst:.2f} s ({n503} x 503, by"
        f" +{worst_ended:.2f} s; bound {acquire:g}+{SLACK}+p99); {tr_text}; p99 {allowance:.2f} s;"
        f" gate terminated {terminated}"
    )
    return numbers, v


def holds(a: dict[str, Any], b: dict[str, Any], pool: str) -> tuple[int, float, int]:
    """Connections of ``pool`` checked in between states ``a`` and ``b``: count, mean hold (s), long holds."""
    n0, s0, l0 = a.get("holds", {}).get(pool, (0, 0.0, 0))
    n1, s1, l1 = b.get("holds", {}).get(pool, (0, 0.0, 0))
    n = int(n1 - n0)
    return n, (s1 - s0) / n if n else 0.0, int(l1 - l0)


def judge_cascade(
    samples: list[Sample],
    regime: str,
    start: float,
    t_on: float,
    t_off: float,
    states: tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]],
) -> tuple[str, list[str]]:
    """The Redis slow cell: a slow Redis never reaches Postgres, cache reads stay 2xx.

    A cascade is a database connection held while a Redis call waits: the
    server counts the Redis commands sent while the request holds one (inside
    a router session, or with the gate's lease checked out): none. The pools'
    mean holds, healthy vs slow, are shown, not judged (a hold is wall time on
    a loop the timeouts make busier: a first version that judged them failed
    on loop lag alone). No outage 503 of the DB gate, the ``db`` dependency
    never moves, every answer of a route that reads through the cache is 2xx;
    ``within``: Redis never goes down either. The gate's shed answers are
    reported by phase, not judged: with Redis down the cache's misses read
    Postgres (as documented), so the same 200 clients send the pools more work;
    the gate sheds what it cannot serve, which is saturation, not a cascade.
    """
    before, at_on, at_off, after = states
    v: list[str] = []
    d0, s0 = gate_counts(before)
    d1, s1 = gate_counts(after)
    degraded, shed = d1 - d0, s1 - s0
    if degraded:
        v.append(f"DB gate (its site's counts): {degraded} outage 503s while Redis was slow")
    held = after.get("redis_while_holding", 0) - before.get("redis_while_holding", 0)
    if held:
        at = after.get("redis_while_holding_at") or []
        new = at[len(before.get("redis_while_holding_at") or []) :]
        where = f" (first: {new[0]})" if new else ""
        v.append(f"{held} Redis commands were sent while the request held a database connection{where}")
    hold_text = [f"Redis commands while holding a connection {held}"]
    for pool in ("primary", "replica"):
        n_h, mean_h, long_h = holds(before, at_on, pool)
        n_f, mean_f, long_f = holds(at_on, at_off, pool)
        share_h, share_f = long_h / max(n_h, 1), long_f / max(n_f, 1)
        hold_text.append(
            f"{pool} holds healthy/slow {mean_h * 1000:.0f}/{mean_f * 1000:.0f} ms mean,"
            f" {share_h:.1%}/{share_f:.1%} >= 0.25 s"
        )
    gated = [s for s in samples if s.status == 503 and s.note.startswith("dependency_unavailable:db:")]
    # by phase (sent before the fault, during it, after it), per second of the phase
    phases = Counter("healthy" if s.t0 < t_on else "faulted" if s.t0 <= t_off else "healed" for s in gated)
    spans = {"healthy": t_on - start, "faulted": t_off - t_on, "healed": max(time.monotonic() - t_off, 1e-9)}
    split = "/".join(f"{phases[p] / spans[p]:.0f}" for p in ("healthy", "faulted", "healed"))
    db_down = downs(after, "db", start, time.monotonic())
    if db_down:
        v.append(f"the db dependency went down {len(db_down)} times while Redis was slow")
    cache = [s for s in samples if s.label in CACHE_ROUTES]
    not_2xx = Counter(f"{s.label} {s.status or s.note}" for s in cache if not 200 <= s.status < 300)
    for key, n in not_2xx.most_common():
        v.append(f"cache read answered non-2xx: {n} x {key}")
    redis_down = downs(after, "redis", start, time.monotonic())
    if redis_down:
        redis_text = f"Redis down +{min(redis_down) - t_on:.2f} s"
        if regime == "within":
            v.append(f"Redis went down {len(redis_down)} times though every call fits its timeout")
    else:
        redis_text = "Redis stayed ok"
        if regime == "exceeds":
            v.append("Redis never went down though no call fits its timeout: were the faults applied?")
    replica = after.get("sites", {}).get("db-replica", {})
    replica0 = before.get("sites", {}).get("db-replica", {})
    replica_shed = sum(sum(x.get("shed", {}).values()) for x in replica.values()) - sum(
        sum(x.get("shed", {}).values()) for x in replica0.values()
    )
    ok = sum(1 for s in cache if 200 <= s.status < 300)
    numbers = (
        f"DB gate 503s {degraded} (shed {shed}; shed answers/s healthy/faulted/healed {split}); {redis_text};"
        f" cache reads 2xx {ok}/{len(cache)}; replica shed {replica_shed}; {'; '.join(hold_text)}"
    )
    return numbers, v


async def run_matrix(args: argparse.Namespace, logdir: Path, rows: list[Row]) -> None:
    d = Durations(args.healthy, args.faulted, args.healed, args.grace, args.recover)
    # a dependency fails every 4th cell (Redis's slow cell, first, three cells before its next)
    cells = [
        (dep, fault) for fault in args.faults for dep in args.deps if fault != "slow" or dep in SLOW_DEPS
    ]
    if args.cells:
        cells = cells[: args.cells]
    # the FastAPI variant of the example app serves a column of its own (--fastapi-faults)
    fastapi_cells = [(dep, fault) for fault in args.fastapi_faults for dep in args.deps if fault != "slow"]
    if args.smoke:
        fastapi_cells = fastapi_cells[:1]  # one cell: the variant starts, serves and degrades
    say(
        f"matrix: {len(cells)} cells, {len(fastapi_cells)} more on the FastAPI app, {args.clients} clients,"
        f" {d.healthy:g}/{d.faulted:g}/{d.healed:g} s each"
    )
    total = len(cells) + len(fastapi_cells)
    if cells:
        await run_cells(args, logdir, rows, d, cells, app="starlette", first=1, total=total)
    if fastapi_cells:
        await run_cells(
            args, logdir, rows, d, fastapi_cells, app="fastapi", first=len(cells) + 1, total=total
        )


async def run_cells(
    args: argparse.Namespace,
    logdir: Path,
    rows: list[Row],
    d: Durations,
    cells: list[tuple[str, str]],
    *,
    app: str,
    first: int,
    total: int,
) -> None:
    """Run ``cells`` (numbered from ``first`` of ``total``) on one server of ``app``.

    ``app``: ``starlette`` (examples/app.py) or ``fastapi`` (examples/fastapi_app.py).
    """
    name = "matrix" if app == "starlette" else "matrix-fastapi"
    suffix = "" if app == "starlette" else " (FastAPI)"
    async with stack(logdir, name=name, extra_env={"CHAOS_APP": app}) as stk:
        table = expectations(stk.token, stk.track_id)
        auth = {"authorization": f"Bearer {stk.token}", "content-type": "application/json"}
        # warm up: pools, caches, the first-call costs, so the first cell's baseline is steady
        t = time.monotonic() + 0.5
        every = {e.label: e for routes in table.values() for e in routes}
        await load(
            [stk.server.port],
            [(e.label, e.method, e.path, auth, e.body) for e in every.values()],
            start=t,
            stop=t + args.warmup,
            clients=args.clients,
        )
        redis_timeout = float((await stk.server.state()).get("redis_timeout") or 0.25)
        for index, (dep, fault) in enumerate(cells, first):
            case, regime = f"{DEPS[dep]} / {fault}{suffix}", ""
            if fault == "slow":
                case = f"{DEPS[dep]} / slow (latency {args.slow_latency:g} s each way)"
                try:
                    routes, regime = slow_routes(table, args.slow_latency, redis_timeout)
                except ValueError as exc:
                    rows.append(Row("matrix", case, "not run", [str(exc)]))
                    say(f"  [{index}/{total}] {case}: not run: {exc}")
                    continue
                case += f", {2 * args.slow_latency:g} s round trip {regime} the {redis_timeout:g} s timeout"
            else:
                routes = table[(dep, fault)]
            waited, still = await all_up(stk.server, within=40.0)
            before = await quiesce(stk.server)
            stk.consumer_base = len(stk.consumer.ids)
            stk.consumer_tracks = set(stk.consumer.track_ids)
            start = time.monotonic() + 0.5
            t_on, t_off = start + d.healthy, start + d.healthy + d.faulted
            stop = t_off + d.healed
            job = asyncio.create_task(
                load(
                    [stk.server.port],
                    [(e.label, e.method, e.path, auth, e.body) for e in routes],
                    start=start,
                    stop=stop,
                    clients=args.clients,
                )
            )
            proxy = stk.proxies[dep]
            await asyncio.sleep(max(0.0, t_on - time.monotonic()))
            at_on = await stk.server.state()  # the pools' holds so far (the healthy phase's)
            t_on = time.monotonic()  # the fault's start, as the in-flight judge measures from it
            tick = apply_fault(proxy, fault, args.slow_latency)
            next_tick = time.monotonic() + (args.reset_every or 1e9)
            while time.monotonic() < t_off:
                await asyncio.sleep(min(0.05, max(0.0, t_off - time.monotonic())))
                if tick is not None and next_tick <= time.monotonic() < t_off:
                    tick()
                    next_tick += args.reset_every
            at_off = await stk.server.state()
            proxy.up()
            t_off = time.monotonic()
            samples, _ = await job
            # the cell's samples, for a closer look (fields as Sample's; t_on, t_off first)
            (logdir / f"{name}-{dep}-{fault}.samples.json").write_text(
                json.dumps({"t_on": t_on, "t_off": t_off, "samples": [astuple(s) for s in samples]})
            )
            info, violations = judge_cell(dep, fault, routes, samples, t_on, t_off, d)
            answered = written(samples)
            after = await quiesce(stk.server)
            after, delivered = await settle_events(stk, answered, before)
            dropped = after["events"]["dropped"] - before["events"]["dropped"]
            events, v = judge_events(samples, answered, delivered, dropped, after)
            violations += v
            if still:
                violations.insert(0, f"{', '.join(still)} still down {waited:.0f} s after the previous cell")
            elif waited > 1:
                numbers_extra = f"; waited {waited:.0f} s for every dependency to be up first"
                violations.insert(
                    0, f"before the cell: dependencies were down for {waited:.1f} s{numbers_extra}"
                )
            leaks, leak_v = leak_check(before, after, args.margins)
            violations += leak_v
            extra = ""
            if dep == "db" and fault in IN_FLIGHT_FAULTS:
                base = baselines(samples, GATED, t_on)
                extra, v = judge_in_flight(samples, t_on, t_off, before, after, base)
                violations += v
            elif fault == "slow":
                extra, v = judge_cascade(samples, regime, start, t_on, t_off, (before, at_on, at_off, after))
                violations += v
            d0, s0 = gate_counts(before)
            d1, s1 = gate_counts(after)
            statuses = " ".join(f"{k}:{v}" for k, v in info["statuses"].items())
            rec = "-" if info["recover"] is None else f"{info['recover']:.2f}"
            numbers = (
                f"{info['requests']} req ({info['requests'] / (stop - start):.0f}/s); {statuses};"
                f" shed {info['shed']}; gate 503s {d1 - d0} + {s1 - s0} shed; p99 {info['p99_ms']:.0f} ms;"
                f" recover {rec} s; {events}; {leaks}" + (f"; {extra}" if extra else "")
            )
            row = Row("matrix", case, numbers, violations)
            rows.append(row)
            say(f"  [{index}/{total}] {row.case}: {row.verdict}  {numbers}")
            say(f"      worst wait vs bound: {info['worst_wait']}")
            for v in violations[:12]:
                say(f"      ! {v}")
        await stk.server.stop()
        problems = log_problems(stk.server.log.read_text(errors="replace"))
        if problems:
            rows.append(Row("matrix", "server log", f"{len(problems)} problem lines", problems[:20]))


# -- fuzzing ---------------------------------------------------------------------------


async def run_fuzz(args: argparse.Namespace, logdir: Path, rows: list[Row]) -> None:
    import chaos_fuzz

    say(f"fuzz: {args.fuzz_examples} generated requests through the example app's stack (in-process)")
    r = await asyncio.to_thread(chaos_fuzz.run, args.fuzz_examples, REDIS_URL, DB_URL, AMQP_URL)
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(r.statuses.items()))
    numbers = (
        f"{r.examples} examples ({r.sent} sent, {r.unsendable} not encodable) in {r.seconds:.0f} s;"
        f" {statuses};"
        f" unauthenticated logins passed {r.login_unauth_allowed} (limit {chaos_fuzz.LOGIN_RATE})"
    )
    if r.examples < args.fuzz_examples:
        r.violations.append(f"only {r.examples} of {args.fuzz_examples} examples ran")
    rows.append(Row("fuzz", "hostile requests", numbers, r.violations))
    say(f"  {numbers}")
    for v in r.violations[:20]:
        say(f"      ! {v}")


# -- two pods --------------------------------------------------------------------------

POD_RATE, POD_BURST = 40, 10


async def run_pods(args: argparse.Namespace, logdir: Path, rows: list[Row]) -> None:
    rates = f"{POD_RATE}/second;burst={POD_BURST}|1000000/minute|1000000/minute"
    phase = args.pod_phase
    say(
        f"pods: 2 uvicorn processes, PODS=2, one Redis, {rates.split('|', maxsplit=1)[0]} per user,"
        f" {phase:g} s per phase"
    )
    async with stack(logdir, name="pods", rates=rates, pods=2) as stk:
        env = dict(stk.server.env)
        async with Server(env, logdir / "pods-2-server.log") as pod2:
            ports = [stk.server.port, pod2.port]
            auth = {"authorization": f"Bearer {stk.token}"}
            reqs = [("GET /config/webrtc", "GET", f"{API}/config/webrtc", auth, None)]
            start = time.monotonic() + 0.5
            t_down, t_up = start + phase, start + 2 * phase
            stop = t_up + phase + 1.0  # the back phase counts from when both pods see Redis back
            job = asyncio.create_task(
                load(ports, reqs, start=start, stop=stop, clients=min(args.clients, 100))
            )
            await asyncio.sleep(max(0.0, t_down - time.monotonic()))
            stk.proxies["redis"].refuse()
            await asyncio.sleep(max(0.0, t_up - time.monotonic()))
            stk.proxies["redis"].up()
            samples, _ = await job
            # when each pod saw Redis back (its probe: an interval and a check after the proxy healed)
            seen = [
                min(
                    (t for t, dep, st in ps["transitions"] if dep == "redis" and st == "ok" and t >= t_up),
                    default=t_up,
                )
                for ps in (await stk.server.state(), await pod2.state())
            ]
            await pod2.stop()
            problems = log_problems(pod2.log.read_text(errors="replace"))
        await stk.server.stop()
        problems += log_problems(stk.server.log.read_text(errors="replace"))
    violations = [f"server log: {p}" for p in problems[:10]]
    other = Counter(s.status for s in samples if s.status not in (200, 429))
    if other:
        violations.append(f"statuses other than 200/429: {dict(other)}")
    limit, top = POD_RATE, POD_RATE + POD_BURST
    detail = []
    back = max(seen)
    for name, lo, hi in (
        ("Redis up", start, t_down),
        ("Redis down", t_down, t_up),
        ("Redis back", back, stop),
    ):
        windows = []
        t = lo
        while t + 1.0 <= hi + 1e-6:
            windows.append(sum(1 for s in samples if s.status == 200 and t <= s.t1 < t + 1.0))
            t += 1.0
        detail.append(f"{name}: {'/'.join(map(str, windows))} per s")
        for i, n in enumerate(windows):
            # the first window of a phase may spend a bucket's burst (the pods' own while Redis is down)
            cap = top if i == 0 else (1.1 * limit if name == "Redis down" else top)
            if name == "Redis back" and i == 0:
                continue  # the global limit holds again within one window of the pods seeing it back
            if n > cap:
                violations.append(f"{name}, window {i + 1}: {n} allowed > {cap:.0f}")
    total = sum(1 for s in samples if s.status == 200)
    numbers = (
        f"{len(samples)} req, {total} allowed; "
        + "; ".join(detail)
        + f"; pods saw Redis back +{seen[0] - t_up:.2f} s / +{seen[1] - t_up:.2f} s after it healed"
    )
    rows.append(Row("pods", f"2 pods, limit {limit}/s burst {POD_BURST}", numbers, violations))
    say(f"  {numbers}")
    for v in violations[:20]:
        say(f"      ! {v}")


# -- soak ------------------------------------------------------------------------------


async def run_soak(args: argparse.Namespace, logdir: Path, rows: list[Row]) -> None:
    duration = args.soak
    rng = random.Random(args.seed)
    say(
        f"soak: {duration:g} s of mixed traffic, random faults,"
        f" a sample every {args.sample_every:g} s (seed {args.seed})"
    )
    samples_table: list[dict[str, Any]] = []
    async with stack(logdir, name="soak") as stk:
        table = expectations(stk.token, stk.track_id)
        auth = {"authorization": f"Bearer {stk.token}", "content-type": "application/json"}
        every = {e.label: e for routes in table.values() for e in routes}
        reqs = [(e.label, e.method, e.path, auth, e.body) for e in every.values()]
        baseline = await quiesce(stk.server)
        start = time.monotonic() + 0.5
        stop = start + duration
        job = asyncio.create_task(load([stk.server.port], reqs, start=start, stop=stop, clients=args.clients))
        faults: list[tuple[float, float, str, str]] = []
        t = start + 3.0
        while t < stop - 15:  # the last 15 s stay healthy: the final samples are healed
            length = rng.uniform(2.0, 8.0)
            faults.append((t, min(t + length, stop - 15), rng.choice(list(DEPS)), rng.choice(FAULTS)))
            t += length + rng.uniform(5.0, 10.0)
        active: dict[str, Any] = {}
        next_sample = start

        async def sample() -> None:
            st = await stk.server.state()
            cur = [f"{d}:{f}" for (a, b, d, f) in faults if a <= time.monotonic() < b]
            samples_table.append(
                {
                    "t": time.monotonic() - start,
                    "rss_mib": st["rss"] / 2**20,
                    # Python's small-object blocks (thousands) and glibc malloc's MiB in use / free
                    "blocks_k": st["memory"]["blocks"] / 1000,
                    "malloc_mib": (st["memory"]["malloc_used"] or 0) / 2**20,
                    "malloc_free_mib": (st["memory"]["malloc_free"] or 0) / 2**20,
                    "fds": st["fds"],
                    "tasks": st["tasks"],
                    "pool": st["pool"]["checkedout"],
                    "replica_pool": st["replica_pool"]["checkedout"],
                    "buffered": st["events"]["buffered"],
                    "fault": ",".join(cur) or "-",
                    "healed": any(b <= time.monotonic() for (_, b, _, _) in faults) and not cur,
                }
            )

        while time.monotonic() < stop:
            now = time.monotonic()
            for a, b, dep, fault in faults:
                if a <= now < b and dep not in active:
                    active[dep] = apply_fault(stk.proxies[dep], fault)
                elif (
                    now >= b and dep in active and not any(x <= now < y and d == dep for x, y, d, _ in faults)
                ):
                    stk.proxies[dep].up()
                    del active[dep]
            for tick in active.values():
                if tick is not None and rng.random() < 0.05:
                    tick()
            if now >= next_sample:
                await sample()
                next_sample += args.sample_every
            await asyncio.sleep(0.05)
        for dep in active:
            stk.proxies[dep].up()
        reqs_done, _ = await job
        quiet = await quiesce(stk.server)
        await sample()
        samples_table[-1]["fault"] = "(quiesced)"
        samples_table[-1]["healed"] = False
        await stk.server.stop()
        problems = log_problems(stk.server.log.read_text(errors="replace"))
    violations = [f"server log: {p}" for p in problems[:10]]
    bad = Counter(
        f"{s.label}: {s.status or s.note}"
        for s in reqs_done
        if s.status == 0 or (s.status >= 500 and s.status != 503)
    )
    violations += [f"{n} x {k}" for k, n in bad.most_common(10)]
    # RSS: the last healed sample within 10 % of the first healed one (both under load);
    # fds (pooled connections aside), tasks, pools: quiesced at the end vs quiesced before the load
    healed = [x for x in samples_table if x["healed"]]
    first = healed[0] if healed else samples_table[0]
    last = healed[-1] if healed else samples_table[-1]
    final = samples_table[-1]
    if last["rss_mib"] > first["rss_mib"] * 1.10:
        violations.append(
            f"RSS: last healed {last['rss_mib']:.1f} MiB > first healed {first['rss_mib']:.1f} + 10 %"
        )
    # what the process keeps alive, whatever the allocators hold on to: the same 10 %
    if last["blocks_k"] > first["blocks_k"] * 1.10:
        violations.append(
            f"Python blocks: last healed {last['blocks_k']:.0f}k > first healed"
            f" {first['blocks_k']:.0f}k + 10 %"
        )
    if last["malloc_mib"] > first["malloc_mib"] * 1.10:
        violations.append(
            f"malloc in use: last healed {last['malloc_mib']:.1f} MiB > first healed"
            f" {first['malloc_mib']:.1f} + 10 %"
        )
    if other_fds(quiet) > other_fds(baseline) * 1.10 + 5:
        violations.append(
            f"fds (pools aside): {other_fds(baseline)} before the soak, {other_fds(quiet)} after"
        )
    if quiet["tasks"] > baseline["tasks"] * 1.10 + 5:
        violations.append(f"asyncio tasks: {baseline['tasks']} before the soak, {quiet['tasks']} after")
    if final["pool"] or final["replica_pool"]:
        violations.append(f"pool checked out at the end: {final['pool']}/{final['replica_pool']}")
    args.soak_samples = samples_table
    numbers = (
        f"{len(reqs_done)} req, {len(faults)} faults;"
        f" RSS healed {first['rss_mib']:.1f} -> {last['rss_mib']:.1f} MiB"
        f" (Python blocks {first['blocks_k']:.0f}k -> {last['blocks_k']:.0f}k,"
        f" malloc in use {first['malloc_mib']:.1f} -> {last['malloc_mib']:.1f} MiB; malloc {args.malloc});"
        f" quiesced: fds {baseline['fds']} -> {quiet['fds']}, tasks {baseline['tasks']} -> {quiet['tasks']}"
    )
    rows.append(Row("soak", f"{duration:g} s, seed {args.seed}", numbers, violations))
    say(soak_table(samples_table))
    say(f"  {numbers}")
    for v in violations[:20]:
        say(f"      ! {v}")


def soak_table(samples: list[dict[str, Any]]) -> str:
    from _util import format_table

    return format_table(
        (
            "t (s)",
            "RSS MiB",
            "py blocks (k)",
            "malloc used/free MiB",
            "fds",
            "tasks",
            "pool out",
            "replica out",
            "events buffered",
            "fault",
        ),
        [
            (
                f"{x['t']:.0f}",
                f"{x['rss_mib']:.1f}",
                f"{x['blocks_k']:.0f}",
                f"{x['malloc_mib']:.1f}/{x['malloc_free_mib']:.1f}",
                str(x["fds"]),
                str(x["tasks"]),
                str(x["pool"]),
                str(x["replica_pool"]),
                str(x["buffered"]),
                x["fault"],
            )
            for x in samples
        ],
    )


# -- secrets ---------------------------------------------------------------------------


class SentryCapture:
    """A local HTTP endpoint standing in for Sentry: keeps every request body (gunzipped)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import gzip
        import zlib

        try:
            while True:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])
                }
                body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
                encoding = headers.get(b"content-encoding", b"")
                try:
                    if encoding == b"gzip":
                        body = gzip.decompress(body)
                    elif encoding == b"deflate":
                        body = zlib.decompress(body)
                    elif encoding == b"br":
                        import brotli  # type: ignore[import-not-found]

                        body = brotli.decompress(body)
                except Exception:
                    body = b"<undecodable " + encoding + b"> " + body
                self.bodies.append(head + body)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"
                )
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@contextlib.asynccontextmanager
async def secret_services(logdir: Path) -> AsyncIterator[tuple[dict[str, str], list[str]]]:
    """A Postgres role, a private Redis (requirepass), a RabbitMQ user, with passwords; removed after."""
    import asyncpg

    tag = uuid.uuid4().hex[:8]
    pw = {k: f"chaos{k}{uuid.uuid4().hex}" for k in ("pg", "redis", "amqp")}
    role, user = f"chaos_{tag}", f"chaos_{tag}"
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test", timeout=10)
    redis_proc = None
    amqp_added = False
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{pw['pg']}'")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS degrade_example_tracks (id serial PRIMARY KEY, title text NOT NULL)"
        )
        await conn.execute(f"GRANT SELECT, INSERT ON degrade_example_tracks TO {role}")
        await conn.execute(f"GRANT USAGE ON SEQUENCE degrade_example_tracks_id_seq TO {role}")
        # The app creates its outbox table and trigger function (PostgreSQL 15 no longer lets
        # every role create in public); DROP OWNED removes them with the role.
        await conn.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
        redis_port = free_port()
        redis_proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--requirepass",
                pw["redis"],
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                str(logdir / "secrets-redis.log"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if reachable("127.0.0.1", redis_port):
                break
            await asyncio.sleep(0.05)
        for cmd in (
            ["rabbitmqctl", "-q", "add_user", user, pw["amqp"]],
            ["rabbitmqctl", "-q", "set_permissions", "-p", "/", user, ".*", ".*", ".*"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=60)
            amqp_added = True
        urls = {
            "db": f"postgresql+asyncpg://{role}:{pw['pg']}@127.0.0.1:5432/test",
            "redis": f"redis://:{pw['redis']}@127.0.0.1:{redis_port}/0",
            "amqp": f"amqp://{user}:{pw['amqp']}@127.0.0.1:5672/",
        }
        yield urls, list(pw.values())
    finally:
        if amqp_added:
            subprocess.run(
                ["rabbitmqctl", "-q", "delete_user", user], capture_output=True, timeout=60, check=False
            )
        if redis_proc is not None:
            redis_proc.terminate()
            try:
                redis_proc.wait(10)
            except subprocess.TimeoutExpired:
                redis_proc.kill()
        with contextlib.suppress(Exception):
            await conn.execute(f"REVOKE ALL ON degrade_example_tracks FROM {role}")
            await conn.execute(f"REVOKE ALL ON SEQUENCE degrade_example_tracks_id_seq FROM {role}")
            await conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}")
            await conn.execute(f"DROP OWNED BY {role}")
            await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def run_secrets(args: argparse.Namespace, logdir: Path, rows: list[Row]) -> None:
    d = Durations(args.healthy, min(args.faulted, 4.0), min(args.healed, 4.0), args.grace, args.recover)
    cells = [("db", "refuse"), ("redis", "blackhole"), ("rabbitmq", "refuse"), ("db-replica", "reset")]
    if args.smoke:
        cells = cells[:1]
        d.faulted = 2.0
    say(f"secrets: passwords in every DSN and SENTRY_DSN; {len(cells)} cells, then Sentry blackholed vs up")
    capture = SentryCapture()
    sentry_port = await capture.start()
    violations: list[str] = []
    hits: list[str] = []
    latency: dict[str, tuple[float, float, int]] = {}
    try:
        async with secret_services(logdir) as (urls, passwords), contextlib.AsyncExitStack() as es:
            sentry_proxy = await es.enter_async_context(await FaultProxy.start("127.0.0.1", sentry_port))
            dsn = f"http://chaospublickey@127.0.0.1:{sentry_proxy.port}/1"
            async with stack(logdir, name="secrets", urls=urls, extra_env={"SENTRY_DSN": dsn}) as stk:
                table = expectations(stk.token, stk.track_id)
                auth = {"authorization": f"Bearer {stk.token}", "content-type": "application/json"}
                for dep, fault in cells:
                    routes = table[(dep, fault)]
                    await all_up(stk.server, within=40.0)
                    start = time.monotonic() + 0.3
                    t_on, t_off = start + d.healthy, start + d.healthy + d.faulted
                    job = asyncio.create_task(
                        load(
                            [stk.server.port],
                            [(e.label, e.method, e.path, auth, e.body) for e in routes],
                            start=start,
                            stop=t_off + d.healed,
                            clients=min(args.clients, 100),
                            secrets=passwords,
                        )
                    )
                    await asyncio.sleep(max(0.0, t_on - time.monotonic()))
                    apply_fault(stk.proxies[dep], fault)
                    await asyncio.sleep(max(0.0, t_off - time.monotonic()))
                    stk.proxies[dep].up()
                    samples, h = await job
                    hits += h
                    bad = [s for s in samples if s.status == 0 or (s.status >= 500 and s.status != 503)]
                    if bad:
                        violations.append(f"{DEPS[dep]} / {fault}: {len(bad)} answers 5xx or none")
                # Sentry's endpoint blackholed vs up, the same outage (Redis refused: transitions,
                # fail-open security events) under the same load
                for label, sentry_fault in (("Sentry up", None), ("Sentry blackholed", "blackhole")):
                    await all_up(stk.server, within=40.0)
                    if sentry_fault:
                        sentry_proxy.blackhole()
                    routes = table[("redis", "refuse")]
                    start = time.monotonic() + 0.3
                    t_on, t_off = start + 1.0, start + 1.0 + d.faulted
                    job = asyncio.create_task(
                        load(
                            [stk.server.port],
                            [(e.label, e.method, e.path, auth, e.body) for e in routes],
                            start=start,
                            stop=t_off + 2.0,
                            clients=min(args.clients, 100),
                            secrets=passwords,
                        )
                    )
                    await asyncio.sleep(max(0.0, t_on - time.monotonic()))
                    stk.proxies["redis"].refuse()
                    await asyncio.sleep(max(0.0, t_off - time.monotonic()))
                    stk.proxies["redis"].up()
                    samples, h = await job
                    hits += h
                    lat = [s.t1 - s.t0 for s in samples if s.status]
                    latency[label] = (_pct(lat, 50) * 1000, _pct(lat, 99) * 1000, len(samples))
                    sentry_proxy.up()
                await asyncio.sleep(1.0)  # let the SDK flush what it holds
                await stk.server.stop()
                log = stk.server.log.read_bytes()
                problems = log_problems(log.decode(errors="replace"))
            for pw in passwords:
                kind = pw[5:].rstrip("0123456789abcdef") or "?"  # chaos<kind><hex>
                secret = pw.encode()
                if secret in log:
                    at = log.index(secret)
                    context = log[max(0, at - 120) : at + 60].replace(secret, b"<PASSWORD>")
                    hits.append(
                        f"server log holds the {kind} password ({log.count(secret)} times): {context!r}"
                    )
                for body in capture.bodies:
                    if secret in body:
                        at = body.index(secret)
                        context = body[max(0, at - 160) : at + 60].replace(secret, b"<PASSWORD>")
                        hits.append(f"a Sentry event holds the {kind} password: ...{context!r}...")
            (logdir / "secrets-sentry.txt").write_bytes(b"\n\n".join(capture.bodies))
            violations += [f"server log: {p}" for p in problems[:10]]
    finally:
        capture.close()
    violations += sorted(set(hits))[:20]
    if not capture.bodies:
        violations.append("no Sentry event was captured: the scan proved nothing")
    up, down = latency.get("Sentry up"), latency.get("Sentry blackholed")
    lat_text = ""
    if up and down:
        lat_text = f"; p50/p99 ms Sentry up {up[0]:.0f}/{up[1]:.0f}, blackholed {down[0]:.0f}/{down[1]:.0f}"
        if down[1] > 2 * up[1] + 100:
            violations.append(f"Sentry blackholed: p99 {down[1]:.0f} ms > 2 x {up[1]:.0f} ms + 100 ms")
    numbers = (
        f"0 expected; {len(hits)} password hits; {len(capture.bodies)} Sentry requests captured{lat_text}"
    )
    rows.append(Row("secrets", "passwords in DSNs, Sentry", numbers, violations))
    say(f"  {numbers}")
    for v in violations[:20]:
        say(f"      ! {v}")


# -- main ------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    from _util import format_table

    return format_table(
        ("part", "case", "measured", "violations", ""),
        [(r.part, r.case, r.numbers, str(len(r.violations)), r.verdict) for r in rows],
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--only", default="matrix,pods,fuzz,soak,secrets", help="parts to run, comma separated")
    p.add_argument("--smoke", action="store_true", help="the CI subset: short durations, 3 cells, small fuzz")
    p.add_argument("--clients", type=int, default=None, help="concurrent clients (200; smoke 50)")
    p.add_argument("--healthy", type=float, default=5.0)
    p.add_argument("--faulted", type=float, default=10.0)
    p.add_argument("--healed", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds after a fault starts / clears when both statuses are right",
    )
    p.add_argument("--recover", type=float, default=1.0, help="most seconds to the first healthy answer")
    p.add_argument(
        "--reset-every", type=float, default=0.0, help="reset: seconds between resets (0: once, at the start)"
    )
    p.add_argument("--deps", default=",".join(DEPS))
    p.add_argument(
        "--faults",
        default=",".join(CELL_FAULTS),
        help="matrix faults (slow: Redis only, latency --slow-latency each way)",
    )
    p.add_argument(
        "--slow-latency",
        type=float,
        default=SLOW,
        help="slow: seconds of latency each way (a Redis round trip takes twice that)",
    )
    p.add_argument("--cells", type=int, default=0, help="run only the first N cells (0: all)")
    p.add_argument("--fuzz-examples", type=int, default=10_000)
    p.add_argument("--soak", type=float, default=120.0, help="soak seconds (make chaos SOAK=600)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument(
        "--pod-phase", type=float, default=5.0, help="pods: seconds per phase (Redis up, down, back)"
    )
    p.add_argument(
        "--fastapi-faults",
        default="blackhole",
        help="matrix: faults run once more, for every dependency, on the FastAPI variant (empty: none)",
    )
    p.add_argument(
        "--malloc",
        choices=("fixed", "default"),
        default="fixed",
        help="the servers' glibc malloc: 'fixed' mmap threshold (128 KiB, as docs/operations.md recommends) "
        "or glibc's 'default' (a threshold that rises after the first large free)",
    )
    p.add_argument(
        "--gc",
        choices=("freeze", "default"),
        default="freeze",
        help="the servers' garbage collector: 'freeze' the start-up objects (gc.collect(); gc.freeze(), "
        "as docs/operations.md recommends) or leave CPython's 'default'",
    )
    p.add_argument("--seed", type=int, default=0, help="soak: the fault schedule's seed (0: random)")
    p.add_argument("--write-results", action="store_true", help="append the table to bench/RESULTS.md")
    p.add_argument("--logdir", default="", help="keep server logs here (default: a temporary directory)")
    args = p.parse_args(argv)
    if args.clients is None:
        # The smoke pass checks that the harness and its judge work end to end, on CI's 2 CPUs
        # shared by the load generator, the server, six Python proxies and the three services:
        # at 200 clients on a VM ~25 % slower per core the rig itself oversubscribed them (Redis
        # replies outran the 0.25 s timeout with the server's loop on time); 100 still failed a
        # timing bound in 4 of 10 runs, 50 in none of 3, at the same req/s. `make chaos` keeps
        # 200 (docs/chaos.md).
        args.clients = 50 if args.smoke else 200
    if args.clients < 1:
        p.error(f"--clients must be at least 1; got {args.clients}")
    if args.smoke:
        args.healthy, args.faulted, args.healed, args.warmup = 1.0, 2.0, 2.0, 1.0
        args.fuzz_examples = min(args.fuzz_examples, 500)
        args.soak = min(args.soak, 60.0)
        args.pod_phase = min(args.pod_phase, 2.0)
        if args.cells == 0 and args.deps == ",".join(DEPS) and args.faults == ",".join(CELL_FAULTS):
            args.deps, args.faults = "db,redis,rabbitmq", "refuse"
    args.deps = [x for x in args.deps.split(",") if x]
    args.faults = [x for x in args.faults.split(",") if x]
    args.fastapi_faults = [x for x in args.fastapi_faults.split(",") if x]
    args.only = [x for x in args.only.split(",") if x]
    args.margins = Margins()
    args.seed = args.seed or random.randrange(1, 10**6)
    args.soak_samples = []
    SERVER_ENV.clear()
    if args.malloc == "fixed":
        SERVER_ENV.update(MALLOC_FIXED)
    if args.gc == "freeze":
        SERVER_ENV.update(GC_FROZEN)
    return args


async def amain(args: argparse.Namespace) -> int:
    missing = [f"{n} on {h}:{p}" for n, (h, p) in SERVICES.items() if not reachable(h, p)]
    if missing:
        say("chaos: cannot reach " + ", ".join(missing) + "; nothing was run.")
        return 2
    rows: list[Row] = []
    started = time.monotonic()
    with contextlib.ExitStack() as es:
        logdir = Path(args.logdir) if args.logdir else Path(es.enter_context(tempfile.TemporaryDirectory()))
        logdir.mkdir(parents=True, exist_ok=True)
        parts: dict[str, Callable[..., Any]] = {
            "matrix": run_matrix,
            "fuzz": run_fuzz,
            "pods": run_pods,
            "soak": run_soak,
            "secrets": run_secrets,
        }
        for name in args.only:
            if name not in parts:
                say(f"chaos: part {name!r} is not implemented")
                rows.append(Row(name, "-", "not run", [f"part {name} not implemented"]))
                continue
            t0 = time.monotonic()
            try:
                await parts[name](args, logdir, rows)
            except Exception as exc:
                rows.append(Row(name, "harness", "crashed", [f"{type(exc).__name__}: {exc}"]))
                say(f"chaos: {name} crashed: {type(exc).__name__}: {exc}")
            say(f"chaos: {name} took {time.monotonic() - t0:.0f} s")
    text = table(rows)
    say("\n" + text)
    failing = [r for r in rows if r.violations]
    for r in failing:
        say(f"\n{r.part} / {r.case}:")
        for v in r.violations[:30]:
            say(f"  - {v}")
    total = time.monotonic() - started
    say(f"\nchaos: {len(rows) - len(failing)}/{len(rows)} PASS in {total:.0f} s")
    if args.write_results:
        from _util import write_section

        body = text
        if args.soak_samples:
            body += "\n\n### Soak samples\n\n" + soak_table(args.soak_samples)
        if failing:
            body += "\n\n### Violations\n\n" + "\n".join(
                f"- {r.part} / {r.case}: {v}" for r in failing for v in r.violations[:15]
            )
        write_section(SECTION, body, written_by="python bench/chaos.py " + " ".join(sys.argv[1:]))
    return 1 if failing else 0


def main() -> None:
    args = parse(sys.argv[1:])
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
