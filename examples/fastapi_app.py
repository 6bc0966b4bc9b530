"""The example tracks API in FastAPI: the same :class:`~examples.app.Example`, FastAPI routes.

Run it: ``.venv/bin/uvicorn examples.fastapi_app:app``. Everything that degrades
lives in ``Example``; this file shows the FastAPI idioms: ``Depends`` for the
authenticated user and a per-route rate limit, ``exception_handlers()`` for the
503s, ``registry.wrap`` for the lifespan.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run
# time, and the dependency aliases below are local to create_app.
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse

from degrade import exception_handlers, health_routes
from degrade.ratelimit import Decision, rate_limit, ratelimit_exception_handlers

from .app import Example, Settings, Unauthorized, metrics, unauthorized

API = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app over one :class:`Example`."""
    ex = Example(settings or Settings.from_env())

    async def current_user(authorization: Annotated[str | None, Header()] = None) -> str:
        user, _ = await ex.user_of(authorization)
        return user

    User = Annotated[str, Depends(current_user)]
    # Per-route limit as a dependency (the middleware's route table works too).
    feed_limit = rate_limit(ex.limiter, ex.settings.feed_rate, name="feed")

    app = FastAPI(
        title="degrade example (FastAPI)",
        exception_handlers={
            **exception_handlers(),
            **ratelimit_exception_handlers(),
            Unauthorized: unauthorized,
        },
        lifespan=ex.registry.wrap(ex.lifespan),
    )
    for middleware in reversed(ex.middleware(API)):
        app.add_middleware(middleware.cls, *middleware.args, **middleware.kwargs)  # type: ignore[arg-type]
    app.router.routes.extend(health_routes(ex.registry, prefix=API, details=True))
    app.add_route("/metrics", metrics)

    @app.post(f"{API}/auth/login")
    async def login(user: Annotated[str, Body(embed=True, max_length=64)]) -> dict[str, str]:
        return await ex.login(user)

    @app.post(f"{API}/auth/refresh", response_model=None)
    async def refresh(refresh_token: Annotated[str, Body(embed=True)]) -> Any:
        tokens = await ex.refresh(refresh_token)
        return tokens or JSONResponse({"error": "unknown refresh token"}, status_code=401)

    @app.post(f"{API}/auth/logout", status_code=204)
    async def logout(authorization: Annotated[str | None, Header()] = None) -> Response:
        _, jti = await ex.user_of(authorization)
        await ex.logout(jti)
        return Response(status_code=204)

    @app.get(f"{API}/tracks/{{track_id}}", response_model=None)
    async def get_track(track_id: int, user: User) -> Any:
        track, headers = await ex.track(track_id)
        if track is None:
            return JSONResponse({"error": "not found"}, status_code=404, headers=headers)
        return JSONResponse(track, headers=headers)

    @app.post(f"{API}/tracks", status_code=202)
    async def create_track(
        user: User, title: Annotated[str, Body(embed=True)] = "untitled"
    ) -> dict[str, Any]:
        return await ex.create_track(user, title)

    @app.get(f"{API}/feed")
    async def feed(user: User, decision: Annotated[Decision, Depends(feed_limit)]) -> dict[str, Any]:
        return await ex.feed()

    @app.post(f"{API}/uploads", response_model=None)
    async def upload(request: Request, user: User) -> Any:
        status, body = await ex.upload(user, await request.body())
        return JSONResponse(body, status_code=status)

    @app.get(f"{API}/config/webrtc")
    async def webrtc() -> dict[str, Any]:
        return await ex.webrtc()

    app.state.example = ex
    app.state.registry = ex.registry
    app.state.tokens = ex.tokens
    return app


app = create_app()
registry = app.state.registry
