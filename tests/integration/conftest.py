"""Shared by the integration tests: fault proxies in front of the real services, Redis clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from degrade import redis as dredis
from degrade.testing import FaultProxy
from degrade.testing.plugin import FaultProxyFactory


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


@pytest.fixture
async def redis_proxy(fault_proxy: FaultProxyFactory, redis_url: str) -> FaultProxy:
    """A fault proxy in front of the real Redis."""
    return await fault_proxy(*_target(redis_url))


@pytest.fixture
async def pg_proxy(fault_proxy: FaultProxyFactory, postgres_dsn: str) -> FaultProxy:
    """A fault proxy in front of the real Postgres."""
    return await fault_proxy(*_target(postgres_dsn))


@pytest.fixture
async def redis_direct(redis_url: str, unique: str) -> AsyncIterator[aioredis.Redis]:
    """degrade.redis.client() straight to Redis (no proxy); deletes the ``{unique}:`` keys at teardown."""
    client = dredis.client(redis_url, timeout=1.0)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=f"{unique}:*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def redis_proxied(
    redis_proxy: FaultProxy, redis_url: str, redis_direct: aioredis.Redis
) -> AsyncIterator[aioredis.Redis]:
    """degrade.redis.client() (default bounds) through the proxy; ``redis_direct`` cleans up its keys."""
    client = dredis.client(redis_proxy.url_for(redis_url))
    try:
        yield client
    finally:
        await client.aclose()
