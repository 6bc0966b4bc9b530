"""asyncpg connects cancelled mid-handshake log nothing once degrade.db is imported (the real Postgres)."""

from __future__ import annotations

import asyncio
import gc
import random
from typing import Any

import pytest

asyncpg = pytest.importorskip("asyncpg")

import degrade.db  # noqa: E402,F401 - installs the fix


class TestCancelledConnects:
    async def test_no_never_retrieved_error_for_cancelled_connects(self, postgres_dsn: str) -> None:
        """Connects cancelled at random points (as a timeout does) leave no 'never retrieved' error behind."""
        dsn = postgres_dsn.replace("postgresql+asyncpg://", "postgresql://")
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        previous = loop.get_exception_handler()
        loop.set_exception_handler(lambda _loop, context: reported.append(context))
        rng = random.Random(11)
        opened = cancelled = 0
        try:
            for _ in range(120):
                task = asyncio.ensure_future(asyncpg.connect(dsn))
                await asyncio.sleep(rng.random() * 0.004)
                task.cancel()
                try:
                    conn = await task
                except asyncio.CancelledError:
                    cancelled += 1
                else:
                    opened += 1
                    await conn.close()
            gc.collect()
            await asyncio.sleep(0.05)
            gc.collect()
        finally:
            loop.set_exception_handler(previous)
        assert cancelled > 20  # the cancellations did land inside the connects
        assert [c.get("message") for c in reported] == []
