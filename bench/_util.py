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
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

Runner = Callable[[int], "int | Awaitable[int]"]

__all__ = [
    "Runner",
    "Stat",
    "async_loop",
    "compare",
    "format_table",
    "sync_loop",
]


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
