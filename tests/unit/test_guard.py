"""The ASGI guard: the lifespan registers the Registry on the app (binding, 503 without handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from structlog.testing import capture_logs

from degrade import (
    ConfigurationError,
    DegradeMiddleware,
    DependencyUnavailable,
    Overloaded,
    Registry,
    Severity,
    _guard,
    exception_handlers,
    fail_loud,
    fail_soft,
)


@contextlib.asynccontextmanager
async def client_of(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan, then yield a client of it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def app_refusing(kind: str, registry: Registry, **options: Any) -> Starlette:
    """An app whose ``/`` raises DependencyUnavailable (``/shed``: Overloaded), no handlers unless given."""
    name = unique()
    dep = registry.dependency(name, severity=Severity.SEV1, retry_after=7)
    dep.mark_down()

    @fail_loud(dep, reason="checkout answers 503")
    async def charge() -> str:
        return "paid"

    async def endpoint(request: Request) -> Response:
        return JSONResponse({"receipt": await charge()})

    async def shed(request: Request) -> Response:
        raise Overloaded(name, "pool-saturated")

    if kind == "fastapi":
        app: Starlette = FastAPI(**options)
        app.add_route("/", endpoint)
        app.add_route("/shed", shed)
        return app
    return Starlette(routes=[Route("/", endpoint), Route("/shed", shed)], **options)


def unique() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


@pytest.fixture(params=["starlette", "fastapi"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class TestWithoutExceptionHandlers:
    async def test_outage_answers_503_with_retry_after(self, kind: str) -> None:
        """No exception_handlers(): the lifespan's guard still answers 503 with the shared body."""
        registry = Registry()
        app = app_refusing(kind, registry, lifespan=registry.lifespan)
        async with client_of(app) as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert body["error"] == "dependency_unavailable"
        assert body["detail"].endswith("is unavailable")

    async def test_same_response_as_exception_handlers(self, kind: str) -> None:
        """The guard's 503 is byte for byte the one exception_handlers() gives."""
        bare, handled = Registry(), Registry()
        guarded = app_refusing(kind, bare, lifespan=bare.lifespan)
        with_handlers = app_refusing(
            kind, handled, lifespan=handled.lifespan, exception_handlers=exception_handlers()
        )
        async with client_of(guarded) as a, client_of(with_handlers) as b:
            one, two = await a.get("/"), await b.get("/")
        assert one.status_code == two.status_code == 503
        assert one.json().keys() == two.json().keys()
        for header in ("retry-after", "cache-control", "content-type", "content-length"):
            assert one.headers[header] == two.headers[header], header

    async def test_overloaded_answers_503(self, kind: str) -> None:
        """Shedding (Overloaded) is a 503 with its own Retry-After, not a 500."""
        registry = Registry()
        app = app_refusing(kind, registry, lifespan=registry.lifespan)
        async with client_of(app) as client:
            response = await client.get("/shed")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert "pool-saturated" in response.json()["detail"]

    async def test_exception_handlers_keep_priority(self, kind: str) -> None:
        """A handler of the app's own answers first: exception_handlers() stays the place to customise."""

        async def teapot(request: Request, exc: Exception) -> Response:
            return JSONResponse({"custom": True}, status_code=418)

        registry = Registry()
        app = app_refusing(
            kind, registry, lifespan=registry.lifespan, exception_handlers={DependencyUnavailable: teapot}
        )
        async with client_of(app) as client:
            response = await client.get("/")
        assert (response.status_code, response.json()) == (418, {"custom": True})

    async def test_started_response_is_not_rewritten(self) -> None:
        """An outage after the response started propagates: no second response start."""
        registry = Registry()

        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise DependencyUnavailable("feed", "feed is unavailable")

        async def endpoint(request: Request) -> Response:
            return StreamingResponse(body())

        app = Starlette(routes=[Route("/", endpoint)], lifespan=registry.lifespan)
        messages: list[dict[str, Any]] = []

        requested = False

        async def receive() -> dict[str, Any]:
            nonlocal requested
            if requested:
                await asyncio.Event().wait()  # the client stays connected
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            messages.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
        async with app.router.lifespan_context(app):
            with pytest.raises(Exception) as info:
                await app({**scope, "app": app}, receive, send)
        error: BaseException = info.value
        while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
            error = error.exceptions[0]  # Starlette < 0.44 wraps a streaming body's error in a group
        assert isinstance(error, DependencyUnavailable)
        starts = [m for m in messages if m["type"] == "http.response.start"]
        assert [m["status"] for m in starts] == [200]


class TestStarletteShape:
    async def test_guard_sits_just_inside_server_error_middleware(self, kind: str) -> None:
        """Fails when Starlette's stack changes shape: the reach into its internals must be revisited."""
        registry = Registry()
        app = app_refusing(kind, registry, lifespan=registry.lifespan)
        async with app.router.lifespan_context(app):
            stack = app.middleware_stack
            assert isinstance(stack, ServerErrorMiddleware)
            assert isinstance(stack.app, DegradeMiddleware)
            assert stack.app.registry is registry

    async def test_started_twice_guards_once(self) -> None:
        """A lifespan run again (a test client per test) does not stack a second guard."""
        registry = Registry()
        app = app_refusing("starlette", registry, lifespan=registry.lifespan)
        for _ in range(2):
            async with app.router.lifespan_context(app):
                pass
        stack: Any = app.middleware_stack
        assert isinstance(stack.app, DegradeMiddleware)
        assert not isinstance(stack.app.app, DegradeMiddleware)

    async def test_explicit_middleware_is_not_doubled(self) -> None:
        """With Middleware(DegradeMiddleware, ...) in the app's list, the lifespan adds none."""
        registry = Registry()
        app = app_refusing(
            "starlette",
            registry,
            lifespan=registry.lifespan,
            middleware=[Middleware(DegradeMiddleware, registry=registry)],
        )
        async with client_of(app) as client:
            assert (await client.get("/")).status_code == 503
        layer: Any = app.middleware_stack
        guards = 0
        while layer is not None and layer is not app.router:
            guards += isinstance(layer, DegradeMiddleware)
            layer = getattr(layer, "app", None)
        assert guards == 1

    async def test_unknown_shape_falls_back_with_one_warning(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """No ServerErrorMiddleware found: the app is left unchanged and one warning names the fix."""
        monkeypatch.setattr(_guard, "_warned", False)
        registry = Registry()
        app = app_refusing("starlette", registry, lifespan=registry.lifespan)
        built = app.build_middleware_stack()
        assert isinstance(built, ServerErrorMiddleware)
        app.middleware_stack = built.app  # a stack without ServerErrorMiddleware
        with capture_logs() as logs:
            assert _guard.install(app, registry) is False
            assert _guard.install(app, registry) is False
        warnings = [e for e in logs if e["event"] == "degrade.guard_not_installed"]
        assert len(warnings) == 1
        assert "exception_handlers()" in warnings[0]["detail"]
        assert not isinstance(app.middleware_stack, DegradeMiddleware)

    def test_non_starlette_app_is_left_alone(self) -> None:
        """registry.lifespan(None) or a bare router: nothing to guard, no warning."""
        with capture_logs() as logs:
            assert _guard.install(None, Registry()) is False
        assert logs == []


class TestExplicitMiddleware:
    async def test_own_lifespan_with_the_middleware(self, kind: str) -> None:
        """An app keeping its own lifespan binds requests and answers 503 through the middleware."""
        name = unique()
        registry = Registry()
        registry.dependency(name, severity=Severity.SEV1).mark_down()

        @fail_loud(name, reason="sessions live in Redis")
        async def load_session() -> str:
            return "session"

        async def endpoint(request: Request) -> Response:
            return JSONResponse({"session": await load_session()})

        Registry().dependency(name, severity=Severity.SEV1)  # another app: binding must pick ours
        options: dict[str, Any] = {"middleware": [Middleware(DegradeMiddleware, registry=registry)]}
        if kind == "fastapi":
            app: Starlette = FastAPI(**options)
            app.add_route("/", endpoint)
        else:
            app = Starlette(routes=[Route("/", endpoint)], **options)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.json()["dependency"] == name

    def test_registry_is_required(self) -> None:
        """Anything but a Registry is a ConfigurationError naming the argument."""
        with pytest.raises(ConfigurationError, match=r"registry= takes a degrade\.Registry"):
            DegradeMiddleware(Starlette(), registry="redis")


class TestFastAPIDepends:
    async def test_a_by_name_site_works_as_a_dependency(self) -> None:
        """Depends() on a site declared by name: FastAPI sees its signature; each app its own registry."""
        name = unique()

        def no_recommendations(limit: int = 3) -> list[int]:
            return []

        @fail_soft(name, fallback=no_recommendations, reason="the feed shows no recommendations")
        async def recommendations(limit: int = 3) -> list[int]:
            raise TimeoutError

        def create_app() -> FastAPI:
            registry = Registry()
            registry.dependency(name, severity=Severity.SEV3, failure_threshold=1)
            app = FastAPI(lifespan=registry.lifespan)

            @app.get("/feed")
            # A default, not Annotated: this module's annotations are strings and the site is local.
            async def feed(extra: list[int] = Depends(recommendations)) -> dict[str, Any]:  # noqa: B008
                return {"recommended": extra}

            app.state.registry = registry
            return app

        first, second = create_app(), create_app()
        async with client_of(first) as client:
            response = await client.get("/feed", params={"limit": 5})
        assert response.json() == {"recommended": []}
        assert first.state.registry[name].is_down
        assert not second.state.registry[name].is_down


class TestRateLimitHeaders:
    def test_scope_key_matches_the_ratelimit_package(self) -> None:
        """responses reads the key rate_limit writes (it cannot import the ratelimit package)."""
        from degrade import ratelimit, responses

        assert responses.SCOPE_HEADERS == ratelimit.SCOPE_HEADERS

    async def test_guard_503_keeps_headers_left_in_the_scope(self) -> None:
        """The guard's 503 carries the scope's rate-limit headers, but its own Retry-After."""
        from degrade.responses import SCOPE_HEADERS

        async def endpoint(request: Request) -> Response:
            request.scope[SCOPE_HEADERS] = {"ratelimit": '"x";r=4;t=12', "retry-after": "99"}
            raise DependencyUnavailable("db", retry_after=3)

        registry = Registry()
        app = Starlette(routes=[Route("/", endpoint)], lifespan=registry.lifespan)
        async with client_of(app) as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["ratelimit"] == '"x";r=4;t=12'
        assert response.headers.get_list("retry-after") == ["3"]
