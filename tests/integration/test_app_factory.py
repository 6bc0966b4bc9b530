"""The app factory example: two apps built in one process, each on its own Redis proxy, share nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from examples.app_factory import Settings, create_app
from fastapi import FastAPI

from degrade.runbook import render_runbook
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"{what}: not within {within} s")


@contextlib.asynccontextmanager
async def running(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app's lifespan, and a client of it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


@pytest.fixture
async def proxies(fault_proxy: Any, redis_url: str) -> tuple[FaultProxy, FaultProxy]:
    """One fault proxy in front of the real Redis per app."""
    return await fault_proxy("127.0.0.1", 6379), await fault_proxy("127.0.0.1", 6379)


@pytest.fixture
async def cleanup(redis_url: str, unique: str) -> AsyncIterator[None]:
    yield
    direct = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in direct.scan_iter(match=f"{unique}-*")]
        if keys:
            await direct.delete(*keys)
    finally:
        await direct.aclose()


class TestTwoApps:
    async def test_an_outage_of_one_apps_redis_leaves_the_other_ok(
        self, proxies: tuple[FaultProxy, FaultProxy], redis_url: str, unique: str, cleanup: None
    ) -> None:
        """Module-level sites bound by name: app A's Redis outage degrades A only; B keeps its cache."""
        proxy_a, proxy_b = proxies
        app_a = create_app(Settings(redis_url=proxy_a.url_for(redis_url), key_prefix=f"{unique}-a"))
        app_b = create_app(Settings(redis_url=proxy_b.url_for(redis_url), key_prefix=f"{unique}-b"))
        redis_a = app_a.state.registry["redis"]
        redis_b = app_b.state.registry["redis"]
        async with running(app_a) as a, running(app_b) as b:
            for client in (a, b):
                assert (await client.post("/api/v1/sessions", json={"user": "ann"})).status_code == 200
                assert (await client.get("/api/v1/profiles/ann")).json()["cached"] is False
                assert (await client.get("/api/v1/profiles/ann")).json()["cached"] is True

            proxy_a.refuse()
            for _ in range(3):  # the default trip rule: three failures in a row
                await a.get("/api/v1/profiles/ann")
            assert redis_a.is_down
            assert not redis_b.is_down

            # A: FAIL-LOUD answers 503 with Retry-After, though the app has no exception_handlers().
            login = await a.post("/api/v1/sessions", json={"user": "ann"})
            assert login.status_code == 503
            assert login.headers["retry-after"] == str(redis_a.retry_after)
            assert login.json() == {
                "error": "dependency_unavailable",
                "dependency": "redis",
                "detail": "redis is unavailable",
            }
            # A: FAIL-SOFT still serves, rebuilt; B: untouched, still cached and logging in.
            assert (await a.get("/api/v1/profiles/ann")).json() == {
                "user": "ann",
                "greeting": "hello ann",
                "cached": False,
            }
            assert (await b.get("/api/v1/profiles/ann")).json()["cached"] is True
            assert (await b.post("/api/v1/sessions", json={"user": "bob"})).status_code == 200
            assert (await a.get("/api/v1/health/deep")).status_code == 503
            assert (await b.get("/api/v1/health/deep")).json()["status"] == "ok"

            # Each app counts its own degraded calls on its own sites.
            a_sites = {s.name.rsplit(".", 1)[-1]: s.degraded_calls for s in redis_a.sites}
            b_sites = {s.name.rsplit(".", 1)[-1]: s.degraded_calls for s in redis_b.sites}
            assert a_sites["create_session"] == 1
            assert a_sites["cached_profile"] >= 3
            assert set(b_sites.values()) == {0}

            proxy_a.up()

            async def recovered() -> bool:
                return not redis_a.is_down

            await eventually(recovered, "app A's redis recovers")
            assert (await a.post("/api/v1/sessions", json={"user": "ann"})).status_code == 200

    async def test_each_runbook_lists_the_module_level_sites(self, redis_url: str, unique: str) -> None:
        """Sites declared by name at import show in every app's generated runbook."""
        app = create_app(Settings(redis_url=redis_url, key_prefix=f"{unique}-r"))
        text = render_runbook(app.state.registry)
        for site in ("cached_profile", "cache_profile", "create_session"):
            assert f"examples.app_factory.{site}`" in text
        assert "sessions live in Redis: login answers 503" in text
        await app.state.store.redis.aclose()
