"""Sentinel: a private master, replica and 3 Sentinels; failover and quorum loss, end to end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette

from degrade import CheckFailed, Registry, Severity, checks, health_routes
from degrade import redis as dredis

from .redis_cluster import SERVICE, SentinelCluster

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[SentinelCluster]:
    """A fresh master + replica + 3 Sentinels, all killed at teardown."""
    async with SentinelCluster.start(tmp_path) as c:
        yield c


@pytest.fixture
async def master(cluster: SentinelCluster) -> AsyncIterator[aioredis.Redis]:
    """degrade.redis.sentinel_client() for the cluster's service."""
    c = dredis.sentinel_client(cluster.sentinels, SERVICE, timeout=0.25)
    try:
        yield c
    finally:
        await c.aclose()


class TestFailover:
    async def test_data_and_decisions_survive_a_master_kill(
        self, cluster: SentinelCluster, master: aioredis.Redis, registry: Registry
    ) -> None:
        """Kill the master: limiter decisions continue (memory, then Redis) and earlier keys are read back."""
        from degrade.ratelimit import RateLimiter

        dep = registry.dependency(
            "redis", severity=Severity.SEV1, check=checks.redis(master, timeout=0.5), recovery_interval=0.2
        )
        limiter = RateLimiter(redis=master, dependency=dep, on_outage="memory", pods=1)
        try:
            await self._failover(cluster, master, limiter)
        finally:
            await limiter.aclose()  # hands its held connections back before the client closes

    @staticmethod
    async def _failover(cluster: SentinelCluster, master: aioredis.Redis, limiter: Any) -> None:
        written = {f"before:{i}": f"value-{i}".encode() for i in range(20)}
        for key, value in written.items():
            await master.set(key, value)
        assert await master.wait(1, 2000) == 1  # replicated before the crash
        assert await cluster.client_for(cluster.replica).get("before:0") == b"value-0"
        assert dredis.problems(master) == ()
        first = await limiter.hit("user:1", "1000/minute")
        assert (first.allowed, first.source) == (True, "redis")

        cluster.kill_master()
        killed_at = time.monotonic()
        sources: list[str] = []
        slowest = 0.0
        promoted = False
        while time.monotonic() - killed_at < 40:
            start = time.monotonic()
            decision = await limiter.hit("user:1", "1000/minute")  # never raises
            slowest = max(slowest, time.monotonic() - start)
            assert decision.allowed
            sources.append(decision.source)
            promoted = promoted or await cluster.master_port() == cluster.replica.port
            if promoted and decision.source == "redis" and "memory" in sources:
                break
            await asyncio.sleep(0.05)
        failover_s = time.monotonic() - killed_at

        assert promoted, f"no promotion within {failover_s:.1f}s"
        assert "memory" in sources, sources
        assert sources[-1] == "redis", sources[-10:]
        assert slowest < 2.0  # each decision bounded even mid-failover
        for key, value in written.items():
            assert await master.get(key) == value
        print(
            f"failover: back on redis after {failover_s:.1f}s; {len(sources)} decisions, "
            f"{sources.count('memory')} from memory, slowest {slowest * 1000:.0f} ms"
        )


class TestQuorum:
    async def test_quorum_loss_is_a_sev2_while_the_master_serves(
        self, cluster: SentinelCluster, master: aioredis.Redis, registry: Registry
    ) -> None:
        """With 2 of 3 Sentinels stopped /health/deep reports redis_sentinel down (SEV-2), Redis still ok."""
        registry.dependency("redis", severity=Severity.SEV1, check=checks.redis(master))
        registry.dependency(
            "redis_sentinel",
            severity=Severity.SEV2,
            impact="automatic failover is unavailable; a master failure now needs an operator",
            check=checks.sentinel(cluster.sentinels, SERVICE, timeout=0.5),
        )
        app = Starlette(routes=health_routes(registry, details=True, cache_ttl=0))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            healthy = await http.get("/health/deep")
            assert healthy.status_code == 200
            assert healthy.json()["status"] == "ok"

            cluster.stop_sentinels(2)
            r = await http.get("/health/deep")
            body = r.json()
            assert r.status_code == 200  # SEV-2 is not critical: the API keeps serving
            assert body["status"] == "degraded"
            assert body["checks"] == {"redis": "ok", "redis_sentinel": "down"}
            assert body["details"]["redis_sentinel"]["severity"] == "SEV-2"
            assert body["details"]["redis_sentinel"]["error"] == "CheckFailed"
            assert body["details"]["redis"]["status"] == "ok"

        assert await master.set("still", b"serving")
        assert await master.get("still") == b"serving"

        # Even when one answering Sentinel would do, the survivor's own CKQUORUM
        # fails once it has seen the other two go down.
        lone = checks.sentinel(cluster.sentinels, SERVICE, timeout=0.5, min_reachable=1)

        async def noquorum() -> bool:
            try:
                await lone()
            except CheckFailed:
                return True
            return False

        await cluster.wait_for("the surviving sentinel reports NOQUORUM", noquorum, within=10)
