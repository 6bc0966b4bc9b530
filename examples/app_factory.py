"""A FastAPI app factory whose call sites are declared at import time, by dependency name.

Run it: ``.venv/bin/uvicorn --factory examples.app_factory:main``. Nothing here
exists at import time but the declarations: ``create_app(settings)`` builds the
Registry, the Redis client and the app, so a test suite can build several apps
in one process, each pointing at its own Redis (or fault proxy) and key prefix,
and they share no state: each request is bound to its own app's Registry.

* ``@fail_soft("redis", ...)`` / ``@fail_loud("redis", ...)`` name the
  dependency; the first call in an app binds them to that app's ``"redis"``.
* ``registry.wrap(lifespan)`` registers the Registry on the app: no
  ``exception_handlers()`` here, yet FAIL-LOUD answers 503 with ``Retry-After``.
* ``registry.owns(client)`` closes the Redis client at shutdown, after
  everything that uses it stopped.

The runbook command reads a module-level Registry; for a factory keep one
built from default settings where the command can import it (no connection is
made), e.g. ``registry = create_app(Settings()).state.registry`` in a
``yourapp/runbook_entry.py``, then ``python -m degrade runbook
yourapp.runbook_entry:registry``. Sites declared by name are listed under it.
"""

# No `from __future__ import annotations`: FastAPI reads these annotations at run time.
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, FastAPI, Request
from redis.asyncio import Redis

from degrade import Registry, Severity, checks, fail_loud, fail_soft, health_routes
from degrade import redis as dredis

API = "/api/v1"
SESSION_TTL = 3600


@dataclass(frozen=True)
class Settings:
    """One app's configuration; tests build several with different URLs and prefixes."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "degrade-factory"
    version: str = "1.0.0"

    @classmethod
    def from_env(cls) -> "Settings":
        """Read ``REDIS_URL`` and ``KEY_PREFIX``; unset variables keep the local defaults."""
        defaults = cls()
        return cls(
            redis_url=os.environ.get("REDIS_URL", defaults.redis_url),
            key_prefix=os.environ.get("KEY_PREFIX", defaults.key_prefix),
        )


# -- What a route needs from its app, through Depends -------------------------------------


class Store:
    """The app's Redis client and key prefix (one per app)."""

    def __init__(self, redis: Redis, prefix: str) -> None:
        self.redis = redis
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))


def store_of(request: Request) -> Store:
    """The store of the app serving this request."""
    store: Store = request.app.state.store
    return store


AppStore = Annotated[Store, Depends(store_of)]


# -- Call sites: declared once, at import, by dependency name ------------------------------


@fail_soft("redis", fallback=None, timeout=0.5, reason="a cache miss: the profile is rebuilt")
async def cached_profile(store: Store, user: str) -> dict[str, Any] | None:
    raw = await store.redis.get(store.key("profile", user))
    return None if raw is None else dict(json.loads(raw))


@fail_soft("redis", fallback=False, timeout=0.5, reason="the profile is not cached; served anyway")
async def cache_profile(store: Store, user: str, profile: dict[str, Any]) -> bool:
    await store.redis.set(store.key("profile", user), json.dumps(profile), ex=60)
    return True


@fail_loud("redis", timeout=0.5, reason="sessions live in Redis: login answers 503")
async def create_session(store: Store, user: str) -> str:
    token = secrets.token_urlsafe(16)
    await store.redis.set(store.key("session", token), user, ex=SESSION_TTL)
    return token


# -- Routes --------------------------------------------------------------------------------

router = APIRouter(prefix=API)


@router.post("/sessions")
async def login(store: AppStore, user: Annotated[str, Body(embed=True, max_length=64)]) -> dict[str, str]:
    """A new session token (FAIL-LOUD: 503 while Redis is down)."""
    return {"token": await create_session(store, user)}


@router.get("/profiles/{user}")
async def profile(store: AppStore, user: str) -> dict[str, Any]:
    """A profile from the cache, else rebuilt (FAIL-SOFT: served while Redis is down)."""
    cached = await cached_profile(store, user)
    if cached is not None:
        return {**cached, "cached": True}
    built = {"user": user, "greeting": f"hello {user}"}
    await cache_profile(store, user, built)
    return {**built, "cached": False}


# -- The factory ---------------------------------------------------------------------------


def create_app(settings: Settings) -> FastAPI:
    """One app: its own Registry, Redis client and key prefix."""
    registry = Registry(version=settings.version)
    redis = registry.owns(dredis.client(settings.redis_url, timeout=0.25))
    registry.dependency(
        "redis",
        severity=Severity.SEV1,
        impact="Login fails (503); profiles are rebuilt on every request",
        check=checks.redis(redis),
        recovery_interval=0.2,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The host's own start-up and teardown; the registry's components stop
        # before the code after the yield runs, and the client it owns closes last.
        yield

    app = FastAPI(title="degrade app factory", version=settings.version, lifespan=registry.wrap(lifespan))
    app.include_router(router)
    app.router.routes.extend(health_routes(registry, prefix=API))
    app.state.registry = registry
    app.state.store = Store(redis, settings.key_prefix)
    return app


def main() -> FastAPI:
    """``uvicorn --factory examples.app_factory:main``: the app from the environment."""
    return create_app(Settings.from_env())
