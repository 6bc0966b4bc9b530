"""Usage examples checked by mypy --strict: the public API keeps types and signatures.

Not run by pytest. ``assert_type`` fails the type check when an inferred type
drifts; a ``# type: ignore[code]`` marks a misuse that mypy must keep rejecting
(with ``warn_unused_ignores`` an ignore that is no longer needed is an error).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Literal, assert_type

from starlette.applications import Starlette

from degrade import (
    Dependency,
    DependencyUnavailable,
    Overloaded,
    Registry,
    Severity,
    Site,
    checks,
    exception_handlers,
    fail_loud,
    fail_soft,
    health_routes,
    site_of,
)

registry = Registry(version="1.4.2")
db = registry.dependency("db", severity=Severity.SEV1, check=checks.tcp("127.0.0.1", 5432))
cache = registry.dependency("redis", severity=Severity.SEV1, impact="cache misses", runbook="redis.md")
assert_type(db, Dependency)
assert_type(db.state, Literal["ok", "down"])
assert_type(db.is_down, bool)


class Track:
    pass


# -- fail_soft, async --------------------------------------------------------


@fail_soft(cache, fallback=None, timeout=0.05, reason="cache miss falls back to Postgres")
async def cached_track(track_id: int, *, fresh: bool = False) -> Track:
    return Track()


async def use_cached_track() -> None:
    pending = assert_type(cached_track(1), Coroutine[Any, Any, Track | None])
    pending.close()
    assert_type(await cached_track(1, fresh=True), Track | None)
    await cached_track("1")  # type: ignore[arg-type]
    await cached_track(1, stale=True)  # type: ignore[call-arg]


async def track_from_db(track_id: int, *, fresh: bool = False) -> Track:
    return Track()


@fail_soft(cache, fallback=track_from_db, reason="cache miss falls back to Postgres")
async def cached_or_db(track_id: int, *, fresh: bool = False) -> Track:
    return Track()


async def use_cached_or_db() -> None:
    assert_type(await cached_or_db(1), Track)


@fail_soft(cache, fallback=lambda track_id: [], reason="empty feed")
async def feed(track_id: int) -> list[int]:
    return [track_id]


async def use_feed() -> None:
    result = await feed(1)
    assert isinstance(result, list)


# -- fail_soft, sync ---------------------------------------------------------


@fail_soft(cache, fallback=0, reason="counter shows 0")
def play_count(track_id: int) -> int:
    return 1


assert_type(play_count(1), int)
play_count()  # type: ignore[call-arg]


@fail_soft(cache, fallback="", reason="no greeting")
def greeting(name: str) -> str | None:
    return name


assert_type(greeting("x"), str | None)


# -- fail_loud ---------------------------------------------------------------


class Session:
    pass


@fail_loud(cache, reason="sessions live in Redis", retry_after=10)
async def load_session(token: str) -> Session:
    return Session()


async def use_load_session() -> None:
    pending = assert_type(load_session("t"), Coroutine[Any, Any, Session])
    pending.close()
    assert_type(await load_session("t"), Session)
    await load_session(1)  # type: ignore[arg-type]


@fail_loud(db, reason="writes fail")
def write(row: dict[str, int]) -> bool:
    return True


assert_type(write({"a": 1}), bool)
write([1])  # type: ignore[arg-type]

assert_type(site_of(write), Site)
assert_type(site_of(write).dependency_name, str)
assert_type(site_of(write).dependency, str)  # deprecated: warns at run time, still the name
site_of(write).dependency_name = "other"  # a dataclass field
site_of(write).dependency = "other"  # type: ignore[misc]  # read-only property

fail_soft(cache, fallback=None)  # type: ignore[call-overload]
fail_loud(cache)  # type: ignore[call-arg]

# -- exceptions, health, lifespan --------------------------------------------

error = DependencyUnavailable("db", retry_after=5)
assert_type(error.retry_after, int)
assert_type(error.dependency_name, str)
assert_type(error.dependency, str)  # deprecated: warns at run time, still the name
error.dependency = "other"  # type: ignore[misc]  # read-only property
assert_type(Overloaded("db", "queue").dependency_name, str)
assert_type(DependencyUnavailable(dependency="db").dependency_name, str)  # the parameter keeps its name


@contextlib.asynccontextmanager
async def host_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    yield {"db": "engine"}


app = Starlette(
    routes=[*health_routes(registry, prefix="/api/v1")],
    exception_handlers=exception_handlers(),
    lifespan=registry.lifespan,
)
app_with_host = Starlette(lifespan=registry.wrap(host_lifespan))
