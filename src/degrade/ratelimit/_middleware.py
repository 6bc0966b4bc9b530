"""RateLimitMiddleware (pure ASGI), the FastAPI dependency and the rate-limit headers.

Headers follow draft-ietf-httpapi-ratelimit-headers-11 (May 2026; the field
syntax is unchanged since -08): ``RateLimit-Policy: "default";q=100;w=60`` names
the policy, its quota ``q`` and window ``w`` in seconds; ``RateLimit:
"default";r=42;t=12`` gives the quota remaining ``r`` and the seconds ``t``
until it is fully restored. Parameters of our own carry the vendor prefix the
draft asks for: ``degrade-burst`` (the bucket, when it differs from ``q``) and
``degrade-fallback`` (the outage policy that answered while Redis is down).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._gcra import Decision, Rate, parse_rate
from ..exceptions import ConfigurationError, DegradeError, DependencyUnavailable
from ..responses import unavailable_body
from ._client_ip import KeyFunc, client_ip
from ._limiter import MAX_KEY_LENGTH, RateLimiter

__all__ = [
    "Policy",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "rate_limit",
    "rate_limited_response",
    "ratelimit_exception_handlers",
]

Headers = list[tuple[bytes, bytes]]

_NAME_RE = re.compile(r"[\x20-\x7e]{1,100}")
_DENY_DETAIL = "rate limiting is unavailable while its store is down"
_MAX_CACHED_HEADERS = 4096


def _sf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Policy:
    """One named rate and its precomputed header values.

    Failure mode: a bad name or rate raises ``ValueError`` at construction;
    building headers never raises.
    """

    __slots__ = ("_cache", "_policy", "_quoted", "bucket_prefix", "name", "prefix", "rate")

    def __init__(self, name: str, rate: str | Rate) -> None:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ConfigurationError(
                f"a policy name is 1..100 printable ASCII characters (it goes into a header); got {name!r}"
            )
        self.name = name
        self.rate = parse_rate(rate)
        #: Prepended to the client key: each policy counts in its own buckets.
        self.prefix = f"{name}|"
        #: The limiter's storage-key prefix of this policy (set by the middleware).
        self.bucket_prefix = ""
        self._quoted = _sf_string(name)
        self._policy = self._policy_value(self.rate.limit, self.rate.burst)
        # Header lists repeat (remaining and reset take few values): build each once.
        self._cache: dict[tuple[int, int, int, str, bool, bool], Headers] = {}

    def _policy_value(self, limit: int, burst: int) -> bytes:
        value = f"{self._quoted};q={limit};w={self.rate.period}"
        if burst != limit:
            value += f";degrade-burst={burst}"
        return value.encode()

    def headers(self, decision: Decision, *, fallback: bool, legacy: bool) -> Headers:
        """The rate-limit headers of one decision (a shared list: copy it before changing it)."""
        reset = math.ceil(decision.reset_after)
        cache_key = (decision.limit, decision.remaining, reset, decision.source, fallback, legacy)
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        if len(self._cache) >= _MAX_CACHED_HEADERS:
            self._cache.clear()
        headers = self._build(decision, reset, fallback=fallback, legacy=legacy)
        self._cache[cache_key] = headers
        return headers

    def _build(self, decision: Decision, reset: int, *, fallback: bool, legacy: bool) -> Headers:
        value = f"{self._quoted};r={decision.remaining};t={reset}"
        if decision.limit == self.rate.limit:
            policy = self._policy
        else:  # the per-pod share while Redis is down
            burst = max(1, self.rate.burst * decision.limit // self.rate.limit)
            policy = self._policy_value(decision.limit, burst)
        if fallback:
            value += f";degrade-fallback={decision.source}"
        headers = [(b"ratelimit-policy", policy), (b"ratelimit", value.encode())]
        if legacy:
            headers += [
                (b"x-ratelimit-limit", str(decision.limit).encode()),
                (b"x-ratelimit-remaining", str(decision.remaining).encode()),
                (b"x-ratelimit-reset", str(reset).encode()),
            ]
        return headers


def _retry_seconds(decision: Decision) -> int:
    return max(1, math.ceil(decision.retry_after))


def _rate_limited_body(retry_after: int) -> bytes:
    return json.dumps({"error": "rate_limited", "retry_after": retry_after}, separators=(",", ":")).encode()


class _Route:
    __slots__ = ("methods", "policy", "regex")

    def __init__(self, spec: str, rate: str | Rate) -> None:
        method, sep, path = spec.strip().partition(" ")
        if not sep:
            method, path = "", spec.strip()
        if not path.startswith("/"):
            raise ConfigurationError(
                "a route is 'PATH' or 'METHOD PATH' with a Starlette path "
                f"like '/items/{{id:int}}'; got {spec!r}"
            )
        self.methods = frozenset(m.upper() for m in method.split("|") if m) if method else frozenset()
        self.regex = compile_path(path)[0]
        self.policy = Policy(spec.strip(), rate)

    def matches(self, method: str, path: str) -> bool:
        return (not self.methods or method in self.methods) and self.regex.match(path) is not None


class RateLimitMiddleware:
    """Rate-limit every HTTP request before it reaches the app (pure ASGI).

    Each request is keyed by ``key(scope)`` (default: :func:`client_ip` with no
    trusted proxy) and counted against the first matching entry of ``routes``,
    else ``rate``. Every limited response carries ``RateLimit-Policy`` and
    ``RateLimit`` headers (and ``X-RateLimit-*`` with ``legacy_headers=True``).
    Over the limit: 429 ``{"error": "rate_limited", "retry_after": N}`` with
    ``Retry-After: N``.

    Failure mode: whatever the limiter's outage policy says (see
    :class:`RateLimiter`): with ``"memory"`` or ``"allow"`` requests go on and
    the ``RateLimit`` header carries ``degrade-fallback=memory|allow``; with
    ``"deny"`` they are refused with 503 ``dependency_unavailable`` and
    ``Retry-After`` (the client did nothing wrong, the limiter cannot count).

    Args:
        app: The ASGI app.
        limiter: The :class:`RateLimiter`.
        rate: The default rate, e.g. ``"100/minute"`` or ``"100/minute;burst=20"``.
        key: Key function of the ASGI scope; returning None leaves a request unlimited.
        exclude: Path prefixes never limited and given no headers (health checks).
        routes: Per-route rates, first match wins, e.g. ``{"POST /api/v1/login":
            "5/minute", "/api/v1/search/{q}": "30/minute"}`` (Starlette path syntax,
            optional ``GET|POST`` methods). Each route has its own bucket and is
            named by its spec in the headers.
        name: The default policy's name in the headers.
        legacy_headers: Also send ``X-RateLimit-Limit/Remaining/Reset``.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        limiter: RateLimiter,
        rate: str | Rate,
        key: KeyFunc | None = None,
        exclude: Iterable[str] = (),
        routes: Mapping[str, str | Rate] | None = None,
        name: str = "default",
        legacy_headers: bool = False,
    ) -> None:
        if not isinstance(limiter, RateLimiter):
            raise ConfigurationError(f"limiter must be a degrade RateLimiter; got {limiter!r}")
        if key is not None and not callable(key):
            raise ConfigurationError(f"key must be a function of the ASGI scope; got {key!r}")
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.app = app
        self.limiter = limiter
        self.default = Policy(name, rate)
        self.key: KeyFunc = key if key is not None else client_ip()
        self.exclude = tuple(exclude)
        self.routes = tuple(_Route(spec, r) for spec, r in (routes or {}).items())
        self.legacy = bool(legacy_headers)
        self._distributed = limiter.distributed
        for policy in (self.default, *(route.policy for route in self.routes)):
            policy.bucket_prefix = limiter._bucket(policy.prefix, policy.rate)

    def _policy(self, scope: Scope) -> Policy:
        method, path = scope.get("method", "GET"), scope["path"]
        for route in self.routes:
            if route.matches(method, path):
                return route.policy
        return self.default

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.exclude and scope["path"].startswith(self.exclude)):
            await self.app(scope, receive, send)
            return
        client = self.key(scope)
        if client is None:
            await self.app(scope, receive, send)
            return
        policy = self._policy(scope) if self.routes else self.default
        limiter = self.limiter
        rate = policy.rate
        if len(client) <= MAX_KEY_LENGTH - len(policy.prefix):
            bucket = policy.bucket_prefix + client  # == limiter._bucket(policy.prefix + client, rate)
        else:
            bucket = limiter._bucket(policy.prefix + client, rate)
        if self._distributed:
            decision = limiter._decide_locally(bucket, rate)
            if decision is None:
                decision = await limiter._decide_remotely(bucket, rate)
            extra = policy.headers(decision, fallback=decision[5] != "redis", legacy=self.legacy)
        else:
            decision = limiter._memory(bucket, rate, 1)
            extra = policy.headers(decision, fallback=False, legacy=self.legacy)
        if not decision.allowed:
            await self._refuse(send, decision, extra)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _refuse(self, send: Send, decision: Decision, extra: Headers) -> None:
        if decision.source == "deny":
            dep = self.limiter.dependency
            retry = dep.retry_after if dep is not None else 1
            status, body = 503, unavailable_body(dep.name if dep is not None else "redis", _DENY_DETAIL)
        else:
            retry = _retry_seconds(decision)
            status, body = 429, _rate_limited_body(retry)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class RateLimitExceeded(HTTPException, DegradeError):
    """Raised by the :func:`rate_limit` dependency when a request is over its limit.

    A Starlette ``HTTPException`` with status 429 and the rate-limit headers, so
    even without a handler of ours it becomes a 429. Register
    :func:`ratelimit_exception_handlers` for the shared JSON body
    ``{"error": "rate_limited", "retry_after": N}``.

    Attributes:
        decision: The :class:`Decision`.
        retry_after: Whole seconds to wait (>= 1).
    """

    def __init__(self, decision: Decision, headers: Mapping[str, str]) -> None:
        self.decision = decision
        self.retry_after = _retry_seconds(decision)
        headers = {**headers, "Retry-After": str(self.retry_after)}
        super().__init__(429, detail="rate_limited", headers=headers)


async def rate_limited_response(request: Request, exc: Exception) -> Response:
    """The exception handler for :class:`RateLimitExceeded`: 429 JSON with the headers.

    Failure mode: none; any other exception given to it is re-raised unchanged.
    """
    if not isinstance(exc, RateLimitExceeded):  # Starlette routes by type; be safe anyway
        raise exc
    return Response(
        _rate_limited_body(exc.retry_after),
        status_code=429,
        media_type="application/json",
        headers={**(exc.headers or {}), "Cache-Control": "no-store"},
    )


def ratelimit_exception_handlers() -> dict[Any, Any]:
    """``{RateLimitExceeded: rate_limited_response}``, to merge with :func:`degrade.exception_handlers`.

    ``FastAPI(exception_handlers={**exception_handlers(), **ratelimit_exception_handlers()})``.
    """
    return {RateLimitExceeded: rate_limited_response}


def rate_limit(
    limiter: RateLimiter,
    rate: str | Rate,
    *,
    key: KeyFunc | None = None,
    name: str = "default",
    legacy_headers: bool = False,
) -> Callable[[Request, Response], Awaitable[Decision]]:
    """A FastAPI dependency limiting one route: ``Depends(rate_limit(limiter, "5/minute", name="login"))``.

    Needs no FastAPI import: it takes Starlette's ``Request`` and ``Response``,
    which FastAPI injects. The headers are set on FastAPI's response (routes that
    return a ``Response`` object themselves must copy them from the returned
    :class:`Decision`). The bucket is ``name`` + key, separate from the
    middleware's. Works as a plain function of a Starlette request too.

    Failure mode: over the limit raises :class:`RateLimitExceeded` (429); while
    Redis is down with ``on_outage="deny"`` raises
    :class:`~degrade.DependencyUnavailable` (503 through
    :func:`degrade.exception_handlers`); otherwise the outage policy answers.
    """
    if not isinstance(limiter, RateLimiter):
        raise ConfigurationError(f"limiter must be a degrade RateLimiter; got {limiter!r}")
    policy = Policy(name, rate)
    key_of: KeyFunc = key if key is not None else client_ip()
    legacy = bool(legacy_headers)

    async def dependency(request: Request, response: Response) -> Decision:
        client = key_of(request.scope)
        if client is None:
            return Decision(True, policy.rate.limit, policy.rate.limit, 0.0, 0.0, "memory")
        decision = await limiter.hit(policy.prefix + client, policy.rate)
        raw = policy.headers(
            decision, fallback=limiter.distributed and decision.source != "redis", legacy=legacy
        )
        headers = {k.decode(): v.decode() for k, v in raw}
        if not decision.allowed:
            if decision.source == "deny":
                dep = limiter.dependency
                raise DependencyUnavailable(
                    dep.name if dep is not None else "redis",
                    _DENY_DETAIL,
                    retry_after=dep.retry_after if dep is not None else 1,
                )
            raise RateLimitExceeded(decision, headers)
        response.headers.update(headers)
        return decision

    return dependency
