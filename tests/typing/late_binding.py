"""Typing of sites declared by dependency name: checked by ``mypy --strict tests/typing``.

Not run by pytest. Declaring by name keeps the decorated function's signature,
as declaring with the Dependency does.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, assert_type

from starlette.applications import Starlette
from starlette.middleware import Middleware

from degrade import DegradeMiddleware, Registry, fail_loud, fail_soft


@fail_soft("redis", fallback=None, reason="a cache miss")
async def cached(track_id: int) -> dict[str, str]:
    return {"id": str(track_id)}


@fail_loud("redis", reason="login answers 503", hatch="SESSIONS_OPTIONAL")
def session(token: str) -> str:
    return token


@fail_soft("redis", fallback=0, reason="counts as zero")
def counter(key: str) -> int:
    return len(key)


async def use_cached() -> None:
    pending = assert_type(cached(1), Coroutine[Any, Any, dict[str, str] | None])
    assert_type(await pending, dict[str, str] | None)


assert_type(session("token"), str)
assert_type(counter("key"), int)

registry = Registry()
with registry.bind() as bound:
    assert_type(bound, Registry)
app = Starlette(middleware=[Middleware(DegradeMiddleware, registry=registry)])
engine_like = registry.owns(app)  # type-checks: owns() returns what it is given (refused at run time)
assert_type(engine_like, Starlette)
