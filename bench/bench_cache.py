"""Cache benchmark: FailSoftCache's stale-if-error tier, on the healthy path and during a Redis outage.

Run::

    .venv/bin/python bench/bench_cache.py                  # full run, a minute or two
    .venv/bin/python bench/bench_cache.py --smoke          # a few seconds, numbers too noisy to quote
    .venv/bin/python bench/bench_cache.py --write-results  # also rewrite our section of RESULTS.md

Two measurements, two goals (issue 16, part 3):

* **Healthy-path cost of the tier** (goal: at most 1 µs per get). The same
  ``get_or_load`` hit (and, for reference, a miss that loads and writes) on a
  cache without the tier and on one with ``stale=StaleTier(max_bytes=64 MiB,
  stale_for=300)``, both in front of an in-process Redis double (a dict behind
  ``async get/set``), so the difference is the tier's own work and not noise of
  a network round trip. Both caches have ``timeout=None``: the bound's task per
  call costs the same with or without the tier and is several times the
  cache's own code, so it would only hide the difference. The tier's work on
  a hit (``StaleStore.remember``) is also timed on its own. Timed with
  ``bench/_util.py``'s ``compare`` (GC off, cases interleaved over many short
  repeats, so each pair of repeats shares the machine's state) but in this
  thread's CPU time (``time.thread_time_ns``), not wall time: on the shared
  2-core machine the time other processes hold the CPU is larger than the
  microsecond being judged. The goal is judged on the difference of the best
  repeats; the median of the repeat-by-repeat differences shows the noise.
* **Postgres reads during a Redis outage** (goal: at least halved at a 64 MB
  bound). The example app's track lookup (``SELECT id, title FROM ... WHERE id
  = :id`` through a SQLAlchemy async engine, cached as ``track:{id}`` for 60 s)
  over a table of ``--keys`` tracks in the real Postgres, with the real Redis
  behind a ``FaultProxy``. Each configuration gets a fresh cache, dependency
  and key prefix, and the same seeded Zipf-like key sequence (rank ``k`` drawn
  with weight ``1 / k**s``): a warm phase with Redis up, then the proxy
  blackholes Redis (the dependency opens after three 0.25 s timeouts) and the
  outage phase runs. The count is of loader calls during the outage phase:
  each one is one Postgres query. Requests run ``--concurrency`` at a time,
  so single flight (which both configurations have) also takes its share.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import logging
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from degrade import Registry, Severity, checks
from degrade import redis as dredis
from degrade._stale import StaleStore
from degrade.cache import FailSoftCache, StaleTier
from degrade.testing import FaultProxy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _util import RESULTS, Runner, Stat, compare, format_table, run_meta, write_section

REDIS_URL = os.environ.get("DEGRADE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
PG_URL = os.environ.get("DEGRADE_BENCH_PG", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")
SECTION = "## Cache: stale-if-error tier"

#: Goals (issue 16, part 3).
MAX_TIER_COST_NS = 1000.0
MIN_READ_REDUCTION = 0.5
MB = 2**20
STALE_FOR = 300.0


class MemoryRedis:
    """An in-process Redis double: GET and SET on a dict, nothing else (the healthy path, no network)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes | str] = {}

    async def get(self, key: str) -> bytes | str | None:
        return self.data.get(key)

    async def set(self, key: str, value: bytes | str, px: int) -> bool:
        self.data[key] = value
        return True


# -- healthy path -------------------------------------------------------------------------


def cpu_async_loop(fn: Callable[..., Awaitable[Any]], *args: Any) -> Runner:
    """Like ``_util.async_loop``, timed in this thread's CPU time.

    The machine is shared: wall-clock loops also count the time other processes
    held the CPU, which on 2 busy cores is larger than the 1 µs being judged.
    CPU time leaves that out (caches and frequency still vary: hence repeats).
    """

    async def run(n: int) -> int:
        it = itertools.repeat(None, n)
        t0 = time.thread_time_ns()
        for _ in it:
            await fn(*args)
        return time.thread_time_ns() - t0

    return run


def cpu_sync_loop(fn: Callable[..., Any], *args: Any) -> Runner:
    """Like ``_util.sync_loop``, timed in this thread's CPU time."""

    def run(n: int) -> int:
        it = itertools.repeat(None, n)
        t0 = time.thread_time_ns()
        for _ in it:
            fn(*args)
        return time.thread_time_ns() - t0

    return run


async def bench_healthy(n: int, repeats: int) -> dict[str, Stat]:
    """Per-get cost of a hit and of a miss (load + write), without and with the tier."""
    registry = Registry(version="bench")
    dep = registry.dependency("redis-bench", severity=Severity.SEV2)
    tier = StaleTier(max_bytes=64 * MB, stale_for=STALE_FOR)
    plain = FailSoftCache(MemoryRedis(), dep, 60, timeout=None, name="plain")
    tiered = FailSoftCache(MemoryRedis(), dep, 60, timeout=None, name="tiered", stale=tier)
    value = {"id": 7, "title": "Blue in Green"}
    store = StaleStore(tier)
    data = plain.serializer.dumps(value)

    async def loader() -> dict[str, Any]:
        return value

    counter = itertools.count()

    def miss(cache: FailSoftCache) -> Callable[[], Awaitable[Any]]:
        async def call() -> Any:
            # a new key each call: a miss that loads and writes (the double keeps them, both alike)
            return await cache.get_or_load(f"m{next(counter)}", loader)

        return call

    try:
        for cache in (plain, tiered):
            await cache.get_or_load("track:7", loader)
        return await compare(
            [
                ("hit, no tier", cpu_async_loop(plain.get_or_load, "track:7", loader)),
                ("hit, tier", cpu_async_loop(tiered.get_or_load, "track:7", loader)),
                ("miss, no tier", cpu_async_loop(miss(plain))),
                ("miss, tier", cpu_async_loop(miss(tiered))),
                ("StaleStore.remember alone", cpu_sync_loop(store.remember, "track:7", data)),
            ],
            n=n,
            repeats=repeats,
        )
    finally:
        await registry.aclose()


# -- outage ---------------------------------------------------------------------------------


@dataclass
class OutageRun:
    """What one configuration did in the outage phase."""

    label: str
    requests: int
    pg_reads: int
    stale: int
    stale_entries: int
    stale_bytes: int
    stale_evicted: int
    seconds: float


def zipf_keys(n_keys: int, count: int, s: float, seed: int) -> list[int]:
    """``count`` track ids in 1..n_keys, rank k drawn with weight 1/k**s (seeded: the same for every run)."""
    cum = list(itertools.accumulate(1.0 / k**s for k in range(1, n_keys + 1)))
    rng = random.Random(seed)
    ids = list(range(1, n_keys + 1))
    rng.shuffle(ids)  # popularity is not id order (as with real tracks)
    return [ids[r] for r in (rng.choices(range(n_keys), cum_weights=cum, k=count))]


async def drive(
    cache: FailSoftCache, engine: AsyncEngine, table: str, keys: list[int], concurrency: int
) -> int:
    """Look every key up through the cache, ``concurrency`` at a time; the number of Postgres reads."""
    reads = 0
    query = text(f"SELECT id, title FROM {table} WHERE id = :id")  # noqa: S608 - our own uuid table name

    async def load(track_id: int) -> dict[str, Any] | None:
        nonlocal reads
        reads += 1
        async with engine.connect() as conn:
            row = (await conn.execute(query, {"id": track_id})).first()
        return None if row is None else {"id": row.id, "title": row.title}

    it = iter(keys)

    async def worker() -> None:
        for track_id in it:
            await cache.get_or_load(f"track:{track_id}", functools.partial(load, track_id))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return reads


async def run_outage(
    *,
    label: str,
    tier: StaleTier | None,
    proxy: FaultProxy,
    engine: AsyncEngine,
    table: str,
    warm: list[int],
    outage: list[int],
    concurrency: int,
) -> OutageRun:
    """Warm with Redis up, blackhole it, then count the Postgres reads of the outage phase."""
    proxy.up()
    client = dredis.client(proxy.url_for(REDIS_URL))
    registry = Registry(version="bench")
    dep = registry.dependency(
        "redis", severity=Severity.SEV2, check=checks.redis(client), recovery_interval=60
    )
    prefix = f"bench:{uuid.uuid4().hex[:12]}:"
    cache = FailSoftCache(client, dep, ttl=60, prefix=prefix, stale=tier, name=label)
    try:
        await drive(cache, engine, table, warm, concurrency)
        proxy.blackhole()
        start = time.perf_counter()
        reads = await drive(cache, engine, table, outage, concurrency)
        took = time.perf_counter() - start
        assert dep.is_down, "the outage did not open the dependency"
        s = cache.stats()
        return OutageRun(
            label, len(outage), reads, s.stale, s.stale_entries, s.stale_bytes, s.stale_evicted, took
        )
    finally:
        proxy.up()
        await registry.aclose()
        direct = dredis.client(REDIS_URL, timeout=1.0)
        keys = [k async for k in direct.scan_iter(match=f"{prefix}*", count=1000)]
        for i in range(0, len(keys), 1000):
            await direct.delete(*keys[i : i + 1000])
        await direct.aclose()
        await client.aclose()


async def bench_outage(
    *, n_keys: int, n_warm: int, n_outage: int, s: float, concurrency: int, small_mb: float
) -> list[OutageRun]:
    """No tier, a 64 MB tier and a small tier on the same key sequence; a private table, dropped after."""
    engine = create_async_engine(PG_URL, pool_size=concurrency, max_overflow=0)
    table = f"bench_cache_tracks_{uuid.uuid4().hex[:12]}"
    proxy = await FaultProxy.start(*_host_port(REDIS_URL))
    keys = zipf_keys(n_keys, n_warm + n_outage, s, seed=16)
    warm, outage = keys[:n_warm], keys[n_warm:]
    try:
        async with engine.begin() as conn:
            await conn.execute(text(f"CREATE TABLE {table} (id integer PRIMARY KEY, title text NOT NULL)"))
            await conn.execute(
                text(f"INSERT INTO {table} SELECT g, 'Track ' || g FROM generate_series(1, :n) g"),  # noqa: S608
                {"n": n_keys},
            )
        configs: list[tuple[str, StaleTier | None]] = [
            ("no tier", None),
            ("tier 64 MB", StaleTier(max_bytes=64 * MB, stale_for=STALE_FOR)),
            (f"tier {small_mb:g} MB", StaleTier(max_bytes=int(small_mb * MB), stale_for=STALE_FOR)),
        ]
        return [
            await run_outage(
                label=label,
                tier=tier,
                proxy=proxy,
                engine=engine,
                table=table,
                warm=warm,
                outage=outage,
                concurrency=concurrency,
            )
            for label, tier in configs
        ]
    finally:
        async with engine.begin() as conn:
            await conn.execute(text(f"DROP TABLE IF EXISTS {table}"))
        await engine.dispose()
        await proxy.close()


def _host_port(url: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379


# -- report ---------------------------------------------------------------------------------


def render(
    healthy: dict[str, Stat], runs: list[OutageRun], meta: dict[str, str], zipf: str
) -> tuple[str, bool]:
    """The report (Markdown) and whether both goals were met."""
    lines = ["### Healthy path: per-get cost (in-process Redis double, CPU time)\n"]
    rows = [[name, f"{st.best:,.0f}", f"{st.median:,.0f}"] for name, st in healthy.items()]
    lines.append(format_table(["case", "best ns/get", "median ns/get"], rows))
    hit_cost = healthy["hit, tier"].best - healthy["hit, no tier"].best
    with_tier, without = healthy["hit, tier"].per_call_ns, healthy["hit, no tier"].per_call_ns
    hit_paired = statistics.median(t - p for t, p in zip(with_tier, without, strict=True))
    alone = healthy["StaleStore.remember alone"].best
    miss_cost = healthy["miss, tier"].best - healthy["miss, no tier"].best
    cost_ok = hit_cost <= MAX_TIER_COST_NS
    lines.append(
        f"\nTier cost per get (best repeats, with minus without): hit {hit_cost:+,.0f} ns "
        f"(median of the repeat-by-repeat differences {hit_paired:+,.0f} ns), miss {miss_cost:+,.0f} ns; "
        f"its work on a hit alone {alone:,.0f} ns "
        f"(goal: hit <= {MAX_TIER_COST_NS:,.0f} ns): **{'PASS' if cost_ok else 'FAIL'}**"
    )
    lines.append(f"\n### Postgres reads during a Redis outage ({zipf})\n")
    base = runs[0].pg_reads
    rows = [
        [
            r.label,
            f"{r.requests:,}",
            f"{r.pg_reads:,}",
            f"{r.pg_reads / base:.2f}x" if base else "-",
            f"{r.stale:,}",
            f"{r.stale_entries:,}",
            f"{r.stale_bytes / MB:.1f}",
            f"{r.stale_evicted:,}",
            f"{r.seconds:.2f}",
        ]
        for r in runs
    ]
    lines.append(
        format_table(
            [
                "config",
                "requests",
                "Postgres reads",
                "vs no tier",
                "stale answers",
                "entries",
                "MB",
                "evicted",
                "s",
            ],
            rows,
        )
    )
    tier64 = next(r for r in runs if r.label == "tier 64 MB")
    reads_ok = base > 0 and tier64.pg_reads <= base * MIN_READ_REDUCTION
    lines.append(
        f"\nPostgres reads with the 64 MB tier: {tier64.pg_reads:,} of {base:,} without "
        f"(goal: at most {MIN_READ_REDUCTION:.0%}): **{'PASS' if reads_ok else 'FAIL'}**"
    )
    lines.append(
        "\nMethod: real Postgres (one `SELECT id, title ... WHERE id = :id` per loader call, counted) "
        "and real Redis behind a FaultProxy that blackholes it after the warm phase; "
        "same seeded key sequence for every configuration."
    )
    lines.append("\n" + " · ".join(f"{k}: {v}" for k, v in meta.items() if v))
    return "\n".join(lines), cost_ok and reads_ok


async def main(args: argparse.Namespace) -> int:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    if args.smoke:
        n_get, repeats, n_keys, n_warm, n_outage, small_mb = 1_000, 45, 2_000, 1_000, 1_000, 0.05
    else:
        n_get, repeats, n_keys, n_warm, n_outage = 2_000, 151, args.keys, 20_000, 20_000
        small_mb = args.small_mb
    load_before = os.getloadavg()
    print("healthy path ...")
    healthy = await bench_healthy(n_get, repeats)
    print("outage ...")
    runs = await bench_outage(
        n_keys=n_keys,
        n_warm=n_warm,
        n_outage=n_outage,
        s=args.zipf_s,
        concurrency=args.concurrency,
        small_mb=small_mb,
    )
    load_after = os.getloadavg()
    command = ".venv/bin/python bench/bench_cache.py" + (" --smoke" if args.smoke else "")
    meta = run_meta(
        command,
        load_before,
        load_after,
        {
            "n": f"gets {n_get:,} x {repeats} repeats; tracks {n_keys:,}, "
            f"warm {n_warm:,}, outage {n_outage:,}",
            "concurrency": str(args.concurrency),
        },
    )
    zipf = f"{n_keys:,} tracks, Zipf s={args.zipf_s:g}, warm {n_warm:,} then outage {n_outage:,} requests"
    report, ok = render(healthy, runs, meta, zipf)
    print()
    print(report)
    if args.write_results:
        write_section(SECTION, report, written_by="bench/bench_cache.py --write-results")
        print(f"\nwrote section {SECTION!r} of {RESULTS}")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", "--quick", action="store_true", help="a few seconds (smoke test)")
    parser.add_argument("--keys", type=int, default=100_000, help="tracks in the table (full run)")
    parser.add_argument("--zipf-s", type=float, default=1.0, help="Zipf exponent of the key popularity")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--small-mb", type=float, default=1.0, help="the bound of the small tier, MB")
    parser.add_argument("--write-results", action="store_true", help=f"rewrite {SECTION!r} in RESULTS.md")
    sys.exit(asyncio.run(main(parser.parse_args())))
