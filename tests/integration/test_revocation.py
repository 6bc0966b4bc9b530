"""RevocationList and a fail-loud session store against the real Redis, outages through the fault proxy."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from degrade import DependencyUnavailable, Registry, Severity, checks, exception_handlers, fail_loud
from degrade.revocation import RevocationList
from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def dep(registry: Registry, redis_proxied: aioredis.Redis) -> Any:
    """The Redis dependency (SEV-1: sessions live there), probing through the proxy."""
    return registry.dependency(
        "redis", severity=Severity.SEV1, check=checks.redis(redis_proxied), recovery_interval=0.2
    )


def revocations(client: Any, dep: Any, unique: str, on_outage: Any) -> RevocationList:
    return RevocationList(client, dep, on_outage=on_outage, token_ttl=60, prefix=f"{unique}:revoked:")


class TestHealthy:
    async def test_revocation_shared_through_redis(
        self, redis_proxied: aioredis.Redis, dep: Any, redis_direct: aioredis.Redis, unique: str
    ) -> None:
        """A revocation by one list (process) is seen by another, with the token's ttl."""
        writer = revocations(redis_proxied, dep, unique, "raise")
        reader = revocations(redis_direct, dep, unique, "raise")
        await writer.revoke("jti-1", ttl=20)
        assert await reader.is_revoked("jti-1") is True
        assert await reader.is_revoked("jti-2") is False
        assert 0 < await redis_direct.pttl(f"{unique}:revoked:jti-1") <= 20_000


class TestPolicies:
    @pytest.mark.usefixtures("redis_direct")
    @pytest.mark.parametrize("fault", ["refuse", "blackhole"])
    async def test_deny(
        self, redis_proxied: aioredis.Redis, dep: Any, redis_proxy: FaultProxy, unique: str, fault: str
    ) -> None:
        """deny: tokens count as revoked during the outage, answered within the bound."""
        rl = revocations(redis_proxied, dep, unique, "deny")
        assert await rl.is_revoked("t") is False
        with redis_proxy.outage(fault):  # type: ignore[call-overload]
            start = time.perf_counter()
            assert await rl.is_revoked("t") is True
            assert time.perf_counter() - start < 0.8

    @pytest.mark.parametrize("fault", ["refuse", "blackhole"])
    async def test_raise(
        self, redis_proxied: aioredis.Redis, dep: Any, redis_proxy: FaultProxy, unique: str, fault: str
    ) -> None:
        """raise: DependencyUnavailable during the outage."""
        rl = revocations(redis_proxied, dep, unique, "raise")
        with redis_proxy.outage(fault), pytest.raises(DependencyUnavailable):  # type: ignore[call-overload]
            await rl.is_revoked("t")

    @pytest.mark.usefixtures("redis_direct")  # deletes the test's keys
    async def test_allow_fails_open_with_security_events(
        self,
        redis_proxied: aioredis.Redis,
        dep: Any,
        redis_proxy: FaultProxy,
        unique: str,
        sentry_events: list[dict[str, Any]],
    ) -> None:
        """allow: accepts during the outage except locally seen revocations; one event each way."""
        rl = revocations(redis_proxied, dep, unique, "allow")
        await rl.revoke("seen-here")
        await redis_proxied.set(
            f"{unique}:revoked:seen-elsewhere", b"1", px=60_000
        )  # another process's revocation
        sentry_events.clear()
        with capture_logs() as logs:
            redis_proxy.refuse()
            assert await rl.is_revoked("seen-here") is True
            assert await rl.is_revoked("seen-elsewhere") is False  # the documented cost of failing open
            for _ in range(5):
                assert await rl.is_revoked("fresh") is False
            assert rl.failing_open
            redis_proxy.up()
            for _ in range(100):
                if not dep.is_down:
                    break
                await asyncio.sleep(0.05)
            assert await rl.is_revoked("seen-elsewhere") is True
            assert not rl.failing_open
        transitions = [e["transition"] for e in logs if e["event"] == "revocation.fail_open"]
        assert transitions == ["started", "ended"]
        ours = [
            e for e in sentry_events if e.get("tags", {}).get("degrade.security") == "revocation_fail_open"
        ]
        assert [e["tags"]["degrade.transition"] for e in ours] == ["started", "ended"]

    @pytest.mark.usefixtures("redis_direct")
    async def test_revoke_while_down_is_fail_loud(
        self, redis_proxied: aioredis.Redis, dep: Any, redis_proxy: FaultProxy, unique: str
    ) -> None:
        """revoke() raises DependencyUnavailable while Redis is refused or blackholed."""
        rl = revocations(redis_proxied, dep, unique, "allow")
        for fault in ("refuse", "blackhole"):
            with redis_proxy.outage(fault), pytest.raises(DependencyUnavailable):
                await rl.revoke(f"j-{fault}")


# -- sessions stay fail-loud -----------------------------------------------------


def session_app(client: aioredis.Redis, dep: Any, prefix: str) -> Starlette:
    """A tiny app whose session store lives in Redis behind @fail_loud."""

    @fail_loud(dep, reason="sessions live in Redis: login and refresh answer 503")
    async def create_session(user: str) -> str:
        token = secrets.token_urlsafe(16)
        await client.set(f"{prefix}{token}", user.encode(), px=60_000)
        return token

    @fail_loud(dep, reason="sessions live in Redis: login and refresh answer 503")
    async def rotate_session(token: str) -> str | None:
        user = await client.getdel(f"{prefix}{token}")
        if user is None:
            return None
        new = secrets.token_urlsafe(16)
        await client.set(f"{prefix}{new}", user, px=60_000)
        return new

    async def login(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"token": await create_session(body["user"])})

    async def refresh(request: Request) -> JSONResponse:
        body = await request.json()
        token = await rotate_session(body["token"])
        if token is None:
            return JSONResponse({"error": "invalid_token"}, status_code=401)
        return JSONResponse({"token": token})

    return Starlette(
        routes=[Route("/login", login, methods=["POST"]), Route("/refresh", refresh, methods=["POST"])],
        exception_handlers=exception_handlers(),
    )


class TestSessionsFailLoud:
    @pytest.mark.usefixtures("redis_direct")
    @pytest.mark.parametrize("fault", ["refuse", "blackhole"])
    async def test_login_and_refresh_answer_503_while_redis_is_down(
        self, redis_proxied: aioredis.Redis, dep: Any, redis_proxy: FaultProxy, unique: str, fault: str
    ) -> None:
        """Login and refresh answer 503 + Retry-After during the outage, then work again."""
        app = session_app(redis_proxied, dep, f"{unique}:session:")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            ok = await http.post("/login", json={"user": "ada"})
            assert ok.status_code == 200
            token = ok.json()["token"]
            with redis_proxy.outage(fault):  # type: ignore[call-overload]
                for path, payload in (("/login", {"user": "ada"}), ("/refresh", {"token": token})):
                    start = time.perf_counter()
                    r = await http.post(path, json=payload)
                    assert time.perf_counter() - start < 0.8
                    assert r.status_code == 503
                    assert r.headers["retry-after"] == str(dep.retry_after)
                    assert json.loads(r.text) == {
                        "error": "dependency_unavailable",
                        "dependency": "redis",
                        "detail": "redis is unavailable",
                    }
            for _ in range(100):
                if not dep.is_down:
                    break
                await asyncio.sleep(0.05)
            refreshed = await http.post("/refresh", json={"token": token})
            assert refreshed.status_code == 200
            assert (await http.post("/login", json={"user": "ada"})).status_code == 200
