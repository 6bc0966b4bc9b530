"""Timing helpers shared by the bench scripts (timeit-style, robust to noise).

Each case is a *runner*: ``run(n) -> elapsed_ns`` (sync) or an async function of
the same shape, that performs ``n`` calls in a tight loop timed with
``time.perf_counter_ns``. :func:`compare` runs every case for several repeats,
interleaved (case A, B, C, A, B, C, ...) so a burst of load from another process
hits all cases alike, with the garbage collector off (as ``timeit`` does).
Report the best repeat (least disturbed) and the median (typical).
"""

from __future__ import annotations

import gc
import inspect
import itertools
import os
import platform
import re
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Runner = Callable[[int], "int | Awaitable[int]"]

__all__ = [
    "Runner",
    "Stat",
    "asgi_fetch",
    "asgi_get",
    "async_loop",
    "compare",
    "format_table",
    "run_meta",
    "sync_loop",
    "write_section",
]

#: The file every script writes its own section of (``--write-results``).
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

_INTRO = (
    "# Benchmark results\n\n"
    "Each section is written by one script in `bench/`; re-run it to refresh its numbers.\n"
    "Absolute numbers depend on the machine; ratios and overheads are what the goals judge.\n"
)


@dataclass(frozen=True)
class Stat:
    """Per-call nanoseconds of one case, one value per repeat."""

    name: str
    per_call_ns: tuple[float, ...]

    @property
    def best(self) -> float:
        """The least disturbed repeat."""
        return min(self.per_call_ns)

    @property
    def median(self) -> float:
        """The typical repeat."""
        return statistics.median(self.per_call_ns)


def sync_loop(fn: Callable[..., Any], *args: Any, catch: tuple[type[BaseException], ...] = ()) -> Runner:
    """A runner calling ``fn(*args)`` n times (catching ``catch`` if given)."""
    if catch:

        def run_catching(n: int) -> int:
            it = itertools.repeat(None, n)
            t0 = time.perf_counter_ns()
            for _ in it:
                try:
                    fn(*args)
                except catch:
                    pass
            return time.perf_counter_ns() - t0

        return run_catching

    def run(n: int) -> int:
        it = itertools.repeat(None, n)
        t0 = time.perf_counter_ns()
        for _ in it:
            fn(*args)
        return time.perf_counter_ns() - t0

    return run


def async_loop(
    fn: Callable[..., Awaitable[Any]], *args: Any, catch: tuple[type[BaseException], ...] = ()
) -> Runner:
    """A runner awaiting ``fn(*args)`` n times inside the running event loop."""
    if catch:

        async def run_catching(n: int) -> int:
            it = itertools.repeat(None, n)
            t0 = time.perf_counter_ns()
            for _ in it:
                try:
                    await fn(*args)
                except catch:
                    pass
            return time.perf_counter_ns() - t0

        return run_catching

    async def run(n: int) -> int:
        it = itertools.repeat(None, n)
        t0 = time.perf_counter_ns()
        for _ in it:
            await fn(*args)
        return time.perf_counter_ns() - t0

    return run


async def compare(
    cases: Sequence[tuple[str, Runner]], *, n: int, repeats: int = 7, warmup: int | None = None
) -> dict[str, Stat]:
    """Run every case ``repeats`` times (interleaved), ``n`` calls each; GC off while timing.

    A coroutine, so sync and async runners mix; call it from inside the event loop.
    """
    warm = max(1, n // 10) if warmup is None else warmup
    for _, run in cases:
        await _maybe(run(warm))
    samples: dict[str, list[float]] = {name: [] for name, _ in cases}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, run in cases:
                samples[name].append(await _maybe(run(n)) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Stat(name, tuple(values)) for name, values in samples.items()}


async def _maybe(value: int | Awaitable[int]) -> int:
    if inspect.isawaitable(value):
        return await value
    return value


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def run_meta(
    command: str,
    load_before: Sequence[float],
    load_after: Sequence[float],
    counts: dict[str, str],
    *,
    noisy: str = "yes",
) -> dict[str, str]:
    """The facts printed under a report: command, Python, CPUs, load average, ``counts``, noise.

    ``noisy`` is shown only when the load average passed 0.75 per CPU before or
    after the run (other processes then shared the CPUs); an empty value is not shown.
    """
    cpus = os.cpu_count() or 1
    return {
        "command": command,
        "python": platform.python_version(),
        "cpus": str(cpus),
        "load_before": " ".join(f"{x:.2f}" for x in load_before),
        "load_after": " ".join(f"{x:.2f}" for x in load_after),
        **counts,
        "noisy": noisy if max(*load_before, *load_after) > cpus * 0.75 else "",
    }


def write_section(heading: str, body: str, *, written_by: str, results: Path = RESULTS) -> None:
    """Replace (or append) only the ``heading`` section of ``results``; other sections stay as they are.

    A section runs from its ``## `` heading line to the next ``## `` heading (or
    the end of the file). A missing file is created with a short intro.
    """
    text = results.read_text() if results.exists() else _INTRO
    section = f"{heading}\n\nWritten by `{written_by}`.\n\n{body}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results.write_text(text)


def _scope(path: str, headers: Sequence[tuple[bytes, bytes]], client: tuple[str, int]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"bench"), *headers],
        "client": client,
        "server": ("bench", 80),
    }


def asgi_get(
    app: Any,
    path: str = "/",
    headers: Sequence[tuple[bytes, bytes]] = (),
    *,
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> Callable[[], Awaitable[None]]:
    """One GET through ``app`` with a minimal scope, for timing: no HTTP client in the way, answer ignored."""
    template = _scope(path, headers, client)
    message = {"type": "http.request", "body": b"", "more_body": False}

    async def receive() -> dict[str, Any]:
        return message

    async def send(msg: dict[str, Any]) -> None:
        return None

    async def call() -> None:
        await app(dict(template), receive, send)

    return call


async def asgi_fetch(
    app: Any, path: str = "/", *, client: tuple[str, int] = ("127.0.0.1", 50000)
) -> tuple[int, dict[str, str], bytes]:
    """One GET, keeping status, headers and body (for checking, not timing)."""
    status = 0
    headers: dict[str, str] = {}
    body = b""

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        nonlocal status, headers, body
        if msg["type"] == "http.response.start":
            status = msg["status"]
            headers = {k.decode(): v.decode() for k, v in msg["headers"]}
        elif msg["type"] == "http.response.body":
            body += msg.get("body", b"")

    await app(_scope(path, (), client), receive, send)
    return status, headers, body


async def delete_keys(redis_url: str, prefix: str) -> int:
    """Delete this run's Redis keys (sessions live a week; the rest expires sooner); how many."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url, socket_timeout=10)
    deleted = 0
    try:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await client.unlink(*batch)
                batch = []
        if batch:
            deleted += await client.unlink(*batch)
    finally:
        await client.aclose()
    return deleted
