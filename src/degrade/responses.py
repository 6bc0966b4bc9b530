"""The short-circuit responses every safety net shares.

503: ``{"error": "dependency_unavailable", "dependency": "db", "detail": "..."}``
with ``Retry-After``. 429: ``{"error": "rate_limited", "retry_after": 12}`` with
the rate-limit headers. Bodies never hold exception text or credentials.

A 503 built for a request also carries the rate-limit headers that
``degrade.ratelimit.rate_limit`` left in its scope (under
``degrade.ratelimit.SCOPE_HEADERS``): FastAPI drops the injected ``Response``'s
headers when the handler raises, and a client told to retry still needs its
quota.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from .exceptions import DependencyUnavailable

__all__ = [
    "exception_handlers",
    "send_json",
    "unavailable_body",
    "unavailable_headers",
    "unavailable_response",
]

#: Where ``rate_limit`` leaves its headers in the ASGI scope (``degrade.ratelimit.SCOPE_HEADERS``;
#: a test keeps the two equal: this module cannot import the ratelimit package).
SCOPE_HEADERS = "degrade.ratelimit.headers"
#: Headers of the 503's own that the scope's never replace.
_OWN = frozenset({"retry-after", "cache-control", "content-type", "content-length"})


def unavailable_body(dependency: str, detail: str) -> bytes:
    """The 503 body, encoded."""
    return json.dumps(
        {"error": "dependency_unavailable", "dependency": dependency, "detail": detail},
        separators=(",", ":"),
    ).encode()


def unavailable_headers(retry_after: int, scope: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The 503's headers: ``Retry-After``, ``Cache-Control``, and the rate-limit headers left in ``scope``."""
    headers: dict[str, str] = {}
    extra = scope.get(SCOPE_HEADERS) if scope is not None else None
    if isinstance(extra, Mapping):
        headers.update((str(k), str(v)) for k, v in extra.items() if str(k).lower() not in _OWN)
    headers["Retry-After"] = str(retry_after)
    headers["Cache-Control"] = "no-store"
    return headers


def unavailable_response(
    dependency: str, detail: str = "", *, retry_after: int = 5, headers: Mapping[str, str] | None = None
) -> Response:
    """A 503 response in the shared shape, with ``Retry-After`` (and ``headers``, when given)."""
    return Response(
        unavailable_body(dependency, detail or f"{dependency} is unavailable"),
        status_code=503,
        media_type="application/json",
        headers=dict(headers) if headers is not None else unavailable_headers(retry_after),
    )


async def send_json(send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None) -> None:
    """Send a whole JSON response from a pure ASGI middleware."""
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _dependency_unavailable(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, DependencyUnavailable):  # Starlette routes by type; be safe anyway
        raise exc
    headers = unavailable_headers(exc.retry_after, request.scope)
    return unavailable_response(exc.dependency_name, exc.detail, retry_after=exc.retry_after, headers=headers)


def exception_handlers() -> dict[Any, Any]:
    """Exception handlers for ``Starlette(exception_handlers=...)``.

    Maps :class:`~degrade.DependencyUnavailable` to a 503 JSON response with
    ``Retry-After`` (and the request's rate-limit headers). Merge with your own:
    ``{**exception_handlers(), 404: ...}``. FastAPI:
    ``FastAPI(exception_handlers=exception_handlers())``.

    An app whose lifespan is ``registry.lifespan`` answers the same 503 without
    these (:class:`~degrade.DegradeMiddleware`); a handler installed here
    answers first, so replace this one to customise the response.
    """
    return {DependencyUnavailable: _dependency_unavailable}
