"""Test doubles and helpers shared by unit and integration tests (no services needed)."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import Transport

# The shipped fake clock (a clock, and a sleep that advances it), under the name the tests import.
from degrade.testing import FakeClock

__all__ = ["CapturingTransport", "FakeClock", "FakeRedis", "eventually", "load_bench"]

#: The benchmark scripts (not a package: run as ``python bench/NAME.py``).
BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(script: str, name: str) -> ModuleType:
    """Import ``bench/<script>`` as module ``name`` for a test; ``sys.path`` is left as it was.

    The module is registered in ``sys.modules`` while it runs (dataclasses look
    their module up as the class is built); a script that puts ``bench/`` on
    ``sys.path`` for its own imports does so only while it loads.
    """
    path = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / script)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path
    return module


class CapturingTransport(Transport):
    """A Sentry transport that keeps every envelope, and the events in them, in memory (no network)."""

    def __init__(self) -> None:
        super().__init__()
        self.envelopes: list[Envelope] = []
        self.events: list[dict[str, Any]] = []

    def capture_envelope(self, envelope: Envelope) -> None:
        self.envelopes.append(envelope)
        for item in envelope.items:
            event = item.get_event()
            if event is not None:
                self.events.append(dict(event))


class FakeRedis:
    """GET / SET / DELETE / EXISTS of an in-process Redis double, with switchable failure and latency.

    Every call is recorded in ``calls`` as ``(command, key)``; it then sleeps
    ``delay`` seconds (when set) and raises ``error`` (when set).
    """

    def __init__(self) -> None:
        self.data: dict[str, bytes | str] = {}
        self.ttls: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.error: Exception | None = None
        self.delay = 0.0

    async def _op(self, name: str, key: str) -> None:
        self.calls.append((name, key))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error

    async def get(self, key: str) -> bytes | str | None:
        await self._op("get", key)
        return self.data.get(key)

    async def set(self, key: str, value: bytes | str, px: int) -> bool:
        await self._op("set", key)
        self.data[key] = value
        self.ttls[key] = px
        return True

    async def delete(self, key: str) -> int:
        await self._op("delete", key)
        return 1 if self.data.pop(key, None) is not None else 0

    async def exists(self, key: str) -> int:
        await self._op("exists", key)
        return int(key in self.data)


async def eventually(
    condition: Callable[[], object], *, within: float = 2.0, interval: float = 0.005
) -> None:
    """Poll ``condition`` every ``interval`` seconds (real time) until it holds; fail after ``within``."""
    for _ in range(int(within / interval)):
        if condition():
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not reached within {within}s")
