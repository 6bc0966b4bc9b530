"""A dependency that flaps for real: Redis refused and back every 200 ms through the fault proxy."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from degrade import Registry, Severity, checks, fail_soft
from degrade import redis as dredis
from degrade.policies import Probe
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration

#: The tests share 2 CPUs with other work.
MARGIN = 0.4


async def _traffic(call: Any, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await call()
        await asyncio.sleep(0.02)


async def _flap(proxy: FaultProxy, seconds: float, period: float = 0.2) -> None:
    end = time.monotonic() + seconds
    refused = False
    while time.monotonic() < end:
        refused = not refused
        if refused:
            proxy.refuse()
        else:
            proxy.up()
        await asyncio.sleep(period)
    proxy.up()


class TestFlapping:
    async def test_damped_recovery_and_bounded_reports(
        self,
        redis_proxy: FaultProxy,
        redis_url: str,
        registry: Registry,
        sentry_events: list[dict[str, Any]],
    ) -> None:
        """10 s of up/refuse every 200 ms: downs grow apart, 2 Sentry events, recovery within the cap."""
        client: aioredis.Redis = dredis.client(redis_proxy.url_for(redis_url))
        dep = registry.dependency(
            "redis-flap",
            severity=Severity.SEV1,
            check=checks.redis(client, timeout=0.3),
            recovery=Probe(interval=0.2, timeout=0.3, backoff=2.0, max_hold=2.0, flap_window=5.0),
        )
        downs: list[float] = []
        dep.subscribe(lambda d: downs.append(time.monotonic()) if d.is_down else None)

        @fail_soft(dep, fallback=None, reason="test traffic")
        async def ping() -> object:
            return await client.ping()

        stop = asyncio.Event()
        traffic = asyncio.ensure_future(_traffic(ping, stop))
        try:
            await _flap(redis_proxy, 10.0)
            ended = time.monotonic()
            while dep.is_down and time.monotonic() - ended < 2.0 + 0.2 + 0.3 + MARGIN:  # noqa: ASYNC110 - bounded poll
                await asyncio.sleep(0.02)
            recovered_after = time.monotonic() - ended
        finally:
            stop.set()
            await traffic
            await client.aclose()
        assert not dep.is_down, "still down after the schedule ended"
        assert recovered_after <= 2.0 + 0.2 + 0.3 + MARGIN  # max_hold + one interval + one check
        assert len(downs) >= 3
        gaps = [b - a for a, b in itertools.pairwise(downs)]
        # Held down longer each time: later outages are further apart than the 200 ms schedule.
        assert max(gaps[-3:]) >= 1.0
        kinds = [e["tags"]["degrade.transition"] for e in sentry_events]
        assert kinds.count("down") <= 1
        assert kinds.count("recovered") <= 1

    async def test_a_single_clean_outage_recovers_within_a_second(
        self, redis_proxy: FaultProxy, redis_url: str, registry: Registry
    ) -> None:
        """Damping never slows the first outage: back within about one probe interval (default 0.5 s)."""
        client: aioredis.Redis = dredis.client(redis_proxy.url_for(redis_url))
        dep = registry.dependency(
            "redis-once", severity=Severity.SEV2, check=checks.redis(client, timeout=0.3)
        )

        @fail_soft(dep, fallback=None, reason="test traffic")
        async def ping() -> object:
            return await client.ping()

        try:
            redis_proxy.refuse()
            for _ in range(5):
                await ping()
            assert dep.is_down
            await asyncio.sleep(1.0)
            redis_proxy.up()
            back = time.monotonic()
            while dep.is_down and time.monotonic() - back < 3.0:  # noqa: ASYNC110 - bounded poll
                await asyncio.sleep(0.01)
            assert not dep.is_down
            assert time.monotonic() - back <= 1.0
            assert dep.flaps == 0
        finally:
            redis_proxy.up()
            with contextlib.suppress(Exception):
                await client.aclose()
