"""rate_limit(): keys from the body or the handler, late binding, headers that survive a 503, reset()."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse

from degrade import ConfigurationError, DependencyUnavailable, Registry, exception_handlers
from degrade.ratelimit import (
    SCOPE_HEADERS,
    RateLimiter,
    RateLimitExceeded,
    rate_limit,
    ratelimit_exception_handlers,
)

from ..support import FakeClock

pydantic = pytest.importorskip("pydantic")
BaseModel = pydantic.BaseModel

fastapi = pytest.importorskip("fastapi")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


def client_for(app: Any, peer: str = "203.0.113.9") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def handlers() -> dict[Any, Any]:
    return {**exception_handlers(), **ratelimit_exception_handlers()}


class Credentials(BaseModel):
    username: str
    password: str


async def username(request: Request) -> str | None:
    """A key function of the body (login by username)."""
    body = await request.json()
    return f"user:{body['username']}" if isinstance(body, dict) and "username" in body else None


class TestKeyFunctions:
    async def test_async_key_reads_the_body_and_the_handler_still_can(self, clock: FakeClock) -> None:
        """An async key reads request.json(); FastAPI's own body parsing and the handler see the body too."""
        limiter = RateLimiter(clock=clock)
        app = fastapi.FastAPI(exception_handlers=handlers())

        @app.post("/login", dependencies=[fastapi.Depends(rate_limit(limiter, "2/minute", key=username))])
        async def login(credentials: Credentials, request: Request) -> dict[str, Any]:
            raw = await request.json()
            return {"user": credentials.username, "raw": raw["username"]}

        async with client_for(app) as client:
            alice = [
                await client.post("/login", json={"username": "alice", "password": "x"}) for _ in range(3)
            ]
            bob = await client.post("/login", json={"username": "bob", "password": "x"})
        assert [r.status_code for r in alice] == [200, 200, 429]
        assert alice[0].json() == {"user": "alice", "raw": "alice"}
        assert bob.status_code == 200  # another user: another bucket, same address
        assert limiter.store.kept() == [
            "degrade:rl:2/minute:default|user:alice",
            "degrade:rl:2/minute:default|user:bob",
        ]

    async def test_sync_scope_keys_still_work(self, clock: FakeClock) -> None:
        """A key function of the scope (client_ip's kind) gets the request, which reads as the scope."""
        limiter = RateLimiter(clock=clock)
        check = rate_limit(limiter, "1/minute", key=lambda scope: scope["client"][0])
        request = Request({"type": "http", "client": ("198.51.100.7", 1), "headers": [], "method": "GET"})
        decision = await check(request, PlainTextResponse(""))
        assert decision.allowed
        assert limiter.store.kept() == ["degrade:rl:1/minute:default|198.51.100.7"]

    async def test_bad_key_results(self, clock: FakeClock) -> None:
        """None leaves the request unlimited; a non-string is a bug (TypeError); long keys are hashed."""
        limiter = RateLimiter(clock=clock)
        request = Request({"type": "http", "client": ("198.51.100.7", 1), "headers": [], "method": "GET"})
        unlimited = rate_limit(limiter, "1/minute", key=lambda r: None)
        assert all([(await unlimited(request, PlainTextResponse(""))).allowed for _ in range(3)])
        with pytest.raises(TypeError, match="must be a str or None; got int"):
            await rate_limit(limiter, "1/minute", key=lambda r: 42)(request, PlainTextResponse(""))  # type: ignore[arg-type,return-value]
        long_key = rate_limit(limiter, "1/minute", key=lambda r: "u" * 1000)
        assert (await long_key(request, PlainTextResponse(""))).allowed
        with pytest.raises(RateLimitExceeded):  # the hashed key is still limited
            await long_key(request, PlainTextResponse(""))
        assert max(len(k) for k in limiter.store.kept()) < 100

    async def test_handler_computed_key(self, clock: FakeClock) -> None:
        """check(request, key=...) limits by a key the handler computed, with the same headers and 429."""
        limiter = RateLimiter(clock=clock)
        login_limit = rate_limit(limiter, "1/minute", name="login")
        app = fastapi.FastAPI(exception_handlers=handlers())

        @app.post("/login/{user}")
        async def login(user: str, request: Request, response: fastapi.Response) -> dict[str, int]:
            decision = await login_limit.check(request, key=f"user:{user}", response=response)
            return {"remaining": decision.remaining}

        async with client_for(app) as client:
            first = await client.post("/login/alice")
            second = await client.post("/login/alice")
            other = await client.post("/login/bob")
        assert first.json() == {"remaining": 0}
        assert first.headers["ratelimit"] == '"login";r=0;t=60'
        assert second.status_code == 429
        assert second.json() == {"error": "rate_limited", "retry_after": 60}
        assert other.status_code == 200

    def test_bad_arguments(self) -> None:
        """A limiter of the wrong type or a key that is not callable is refused at once."""
        with pytest.raises(ConfigurationError, match="limiter must be"):
            rate_limit(object(), "1/minute")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="key must be a function"):
            rate_limit(RateLimiter(), "1/minute", key="ip")  # type: ignore[arg-type]


class TestHeadersSurviveA503:
    async def test_fastapi_503_carries_the_ratelimit_headers(self, clock: FakeClock) -> None:
        """A handler raising DependencyUnavailable after rate_limit passed: its 503 keeps the headers."""
        app = fastapi.FastAPI(exception_handlers=handlers())
        limit = rate_limit(RateLimiter(clock=clock), "5/minute", name="search")

        @app.get("/search", dependencies=[fastapi.Depends(limit)])
        async def search() -> None:
            raise DependencyUnavailable("db", "the database is down", retry_after=3)

        async with client_for(app) as client:
            response = await client.get("/search")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        assert response.json()["error"] == "dependency_unavailable"
        assert response.headers["ratelimit-policy"] == '"search";q=5;w=60'
        assert response.headers["ratelimit"] == '"search";r=4;t=12'

    async def test_headers_are_left_in_the_scope(self, clock: FakeClock) -> None:
        """The dependency leaves its headers in scope[SCOPE_HEADERS] (merged across dependencies)."""
        limiter = RateLimiter(clock=clock)
        scope: dict[str, Any] = {
            "type": "http",
            "client": ("198.51.100.7", 1),
            "headers": [],
            "method": "GET",
        }
        await rate_limit(limiter, "5/minute", name="a")(Request(scope), PlainTextResponse(""))
        await rate_limit(limiter, "9/minute", name="b", legacy_headers=True)(
            Request(scope), PlainTextResponse("")
        )
        assert SCOPE_HEADERS == "degrade.ratelimit.headers"
        assert scope[SCOPE_HEADERS]["ratelimit"] == '"b";r=8;t=7'
        assert scope[SCOPE_HEADERS]["x-ratelimit-limit"] == "9"


class TestLateBinding:
    def build(self, registry: Registry, limit: Any) -> Any:
        app = fastapi.FastAPI(exception_handlers=handlers(), lifespan=registry.lifespan)

        @app.get("/x", dependencies=[fastapi.Depends(limit)])
        async def x() -> str:
            return "x"

        return app

    async def test_declared_before_the_limiter_resolves_per_app(self, clock: FakeClock) -> None:
        """rate_limit(None, ...) at import time finds each app's managed limiter; two apps never share one."""
        limit = rate_limit(None, "1/minute")  # module level: no limiter yet
        apps = []
        for _ in range(2):
            registry = Registry(version="test")
            limiter = registry.manage(RateLimiter(clock=clock))
            apps.append((self.build(registry, limit), limiter, registry))
        for app, limiter, _registry in apps:
            async with app.router.lifespan_context(app), client_for(app) as client:
                statuses = [(await client.get("/x")).status_code for _ in range(2)]
            assert statuses == [200, 429]
            assert len(limiter.store) == 1

    async def test_by_name(self, clock: FakeClock) -> None:
        """rate_limit('auth', ...) picks the managed limiter of that name."""
        registry = Registry(version="test")
        registry.manage(RateLimiter(clock=clock, name="api"))
        auth = registry.manage(RateLimiter(clock=clock, name="auth"))
        app = self.build(registry, rate_limit("auth", "5/minute"))
        async with app.router.lifespan_context(app), client_for(app) as client:
            response = await client.get("/x")
        assert response.status_code == 200
        assert len(auth.store) == 1

    async def test_ambiguous_or_missing_limiter_says_how_to_fix(self, clock: FakeClock) -> None:
        """No limiter, two unnamed ones, or no registry bound: a ConfigurationError naming the fix."""
        registry = Registry(version="test")
        check = rate_limit(None, "5/minute")
        request = Request({"type": "http", "client": ("198.51.100.7", 1), "headers": [], "method": "GET"})
        with pytest.raises(ConfigurationError, match="this request has none"):
            await check(request, PlainTextResponse(""))
        with registry.bind(), pytest.raises(ConfigurationError, match=r"exactly one RateLimiter.*found 0"):
            await check(request, PlainTextResponse(""))
        registry.manage(RateLimiter(clock=clock))
        registry.manage(RateLimiter(clock=clock))
        with registry.bind(), pytest.raises(ConfigurationError, match="found 2"):
            await check(request, PlainTextResponse(""))


class TestReset:
    async def test_reset_forgets_the_key_in_memory(self, clock: FakeClock) -> None:
        """reset(key) forgets every rate's bucket of the key, and only that key's."""
        limiter = RateLimiter(clock=clock)
        for key in ("a", "x:a", "b"):
            await limiter.hit(key, "1/minute")
        await limiter.hit("a", "5/minute;1/hour")
        await limiter.reset("a")
        assert sorted(limiter.store.kept()) == ["degrade:rl:1/minute:b", "degrade:rl:1/minute:x:a"]
        assert (await limiter.hit("a", "1/minute")).allowed

    async def test_reset_one_rate(self, clock: FakeClock) -> None:
        """reset(key, rate) forgets only that rate's buckets (each of several limits)."""
        limiter = RateLimiter(clock=clock)
        await limiter.hit("a", "1/minute")
        await limiter.hit("a", "5/second;1/hour")
        await limiter.reset("a", "5/second;1/hour")
        assert limiter.store.kept() == ["degrade:rl:1/minute:a"]

    async def test_reset_a_route_bucket(self, clock: FakeClock) -> None:
        """rate_limit's buckets are '<name>|<key>': reset them by that key."""
        limiter = RateLimiter(clock=clock)
        check = rate_limit(limiter, "1/minute", name="login", key=lambda r: "alice")
        request = Request({"type": "http", "client": ("198.51.100.7", 1), "headers": [], "method": "GET"})
        assert (await check(request, PlainTextResponse(""))).allowed
        await limiter.reset("login|alice")
        assert (await check(request, PlainTextResponse(""))).allowed

    async def test_bad_key(self) -> None:
        """reset() of something that is not a string is refused."""
        with pytest.raises(ConfigurationError, match="reset"):
            await RateLimiter().reset(42)  # type: ignore[arg-type]
