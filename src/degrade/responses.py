"""The short-circuit responses every safety net shares.

503: ``{"error": "dependency_unavailable", "dependency": "db", "detail": "..."}``
with ``Retry-After``. 429: ``{"error": "rate_limited", "retry_after": 12}`` with
the rate-limit headers. Bodies never hold exception text or credentials.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Send

from .exceptions import DependencyUnavailable

__all__ = ["exception_handlers", "send_json", "unavailable_body", "unavailable_response"]


def unavailable_body(dependency: str, detail: str) -> bytes:
    """The 503 body, encoded."""
    return json.dumps(
        {"error": "dependency_unavailable", "dependency": dependency, "detail": detail},
        separators=(",", ":"),
    ).encode()


def unavailable_response(dependency: str, detail: str = "", *, retry_after: int = 5) -> Response:
    """A 503 response in the shared shape, with ``Retry-After``."""
    return Response(
        unavailable_body(dependency, detail or f"{dependency} is unavailable"),
        status_code=503,
        media_type="application/json",
        headers={"Retry-After": str(retry_after), "Cache-Control": "no-store"},
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
    return unavailable_response(exc.dependency_name, exc.detail, retry_after=exc.retry_after)


def exception_handlers() -> dict[Any, Any]:
    """Exception handlers for ``Starlette(exception_handlers=...)``.

    Maps :class:`~degrade.DependencyUnavailable` to a 503 JSON response with
    ``Retry-After``. Merge with your own: ``{**exception_handlers(), 404: ...}``.
    FastAPI: ``FastAPI(exception_handlers=exception_handlers())``.
    """
    return {DependencyUnavailable: _dependency_unavailable}
