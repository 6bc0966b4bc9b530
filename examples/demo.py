"""A short tour of degrade against the real Redis on 127.0.0.1:6379.

A FaultProxy sits between the app and Redis. The demo breaks Redis for real
(connections refused), shows the fail-soft site falling back, the fail-loud site
answering 503, /health/deep turning 503, and the probe bringing everything back
once Redis answers again.

Run it with ``make demo``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
import redis.asyncio as redis
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from degrade import Registry, Severity, checks, exception_handlers, fail_loud, fail_soft, health_routes
from degrade.testing import FaultProxy

REDIS = ("127.0.0.1", 6379)


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


async def build(proxy: FaultProxy) -> tuple[Starlette, Registry, redis.Redis]:
    # Sub-second timeouts and no client retries: the dependency is the retry policy.
    client = redis.Redis.from_url(
        proxy.url_for("redis://127.0.0.1:6379/0"),
        socket_timeout=0.25,
        socket_connect_timeout=0.25,
        retry_on_timeout=False,
        retry=None,
    )
    registry = Registry(version="demo")
    cache = registry.dependency(
        "redis",
        severity=Severity.SEV1,
        impact="Sessions fail (503); track lookups fall back to Postgres",
        check=checks.redis(client, timeout=0.3),
        recovery_interval=0.5,
    )

    @fail_soft(
        cache,
        fallback=lambda track_id: {"id": track_id, "source": "postgres"},
        timeout=0.3,
        reason="cache miss: the track is read from Postgres",
    )
    async def cached_track(track_id: int) -> dict[str, object]:
        await client.set(f"demo:track:{track_id}", "cached", ex=30)
        return {"id": track_id, "source": "redis"}

    @fail_loud(cache, timeout=0.3, reason="sessions live in Redis: login answers 503")
    async def login(user: str) -> str:
        await client.set(f"demo:session:{user}", "1", ex=30)
        return user

    async def track(request: Request) -> JSONResponse:
        return JSONResponse(await cached_track(int(request.path_params["id"])))

    async def do_login(request: Request) -> JSONResponse:
        return JSONResponse({"session": await login("ada")})

    app = Starlette(
        routes=[
            Route("/tracks/{id:int}", track),
            Route("/login", do_login, methods=["POST"]),
            *health_routes(registry),
        ],
        exception_handlers=exception_handlers(),
    )
    return app, registry, client


async def show(http: httpx.AsyncClient, method: str, path: str) -> None:
    start = time.perf_counter()
    response = await http.request(method, path)
    ms = (time.perf_counter() - start) * 1000
    extra = f"  Retry-After: {response.headers['retry-after']}" if "retry-after" in response.headers else ""
    print(f"   {method:4} {path:14} -> {response.status_code} in {ms:6.1f} ms  {response.text}{extra}")


async def main() -> int:
    try:
        proxy = await FaultProxy.start(*REDIS)
    except OSError as exc:
        print(f"demo: cannot start the fault proxy: {exc}", file=sys.stderr)
        return 1
    async with proxy:
        app, registry, client = await build(proxy)
        async with registry.lifespan(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://demo") as http:
                try:
                    await client.ping()
                except (redis.ConnectionError, redis.TimeoutError):
                    print(
                        f"demo: Redis is not answering on {REDIS[0]}:{REDIS[1]}; start it first "
                        "(see .ci/run)",
                        file=sys.stderr,
                    )
                    return 1
                say("Redis is healthy")
                for method, path in [("GET", "/tracks/7"), ("POST", "/login"), ("GET", "/health/deep")]:
                    await show(http, method, path)

                say("Redis refuses connections (FaultProxy.refuse)")
                proxy.refuse()
                for _ in range(4):
                    await show(http, "GET", "/tracks/7")
                print(f"   dependency state: {registry['redis'].state}  (3 failures in a row open it)")
                await show(http, "POST", "/login")
                await asyncio.sleep(1.1)  # let the cached /health/deep answer expire
                await show(http, "GET", "/health/deep")
                await show(http, "GET", "/health")

                say("Redis is back (FaultProxy.up); the background probe notices")
                proxy.up()
                start = time.perf_counter()
                # Poll the state to show how long recovery takes (a demo, not a pattern to copy).
                while registry["redis"].is_down and time.perf_counter() - start < 5:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
                took = time.perf_counter() - start
                print(f"   recovered after {took:.2f} s: state {registry['redis'].state}")
                await asyncio.sleep(1.1)
                for method, path in [("GET", "/tracks/7"), ("POST", "/login"), ("GET", "/health/deep")]:
                    await show(http, method, path)
        await client.aclose()
    return 0


if __name__ == "__main__":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stdout))
    sys.exit(asyncio.run(main()))
