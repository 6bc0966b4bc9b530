"""RateLimitMiddleware: rate-limit every HTTP request before it reaches the app (pure ASGI).

The headers it sends are built by :mod:`degrade.ratelimit._headers`; the
per-route FastAPI dependency is :mod:`degrade.ratelimit._dependency`. A policy
of several limits (``rate="5/second;100/hour"``) takes its own branch, so a
request under one limit pays a single attribute test for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._gcra import Decision, Rate, Rates
from ..exceptions import ConfigurationError
from ..responses import unavailable_body
from ._client_ip import KeyFunc, client_ip
from ._dependency import RateLimitExceeded, rate_limit, rate_limited_response, ratelimit_exception_handlers
from ._headers import DENY_DETAIL, Headers, Policy, rate_limited_body, retry_seconds
from ._keys import hashed
from ._limiter import MAX_KEY_LENGTH, RateLimiter
from ._wire import Group

__all__ = [
    "Policy",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "rate_limit",
    "rate_limited_response",
    "ratelimit_exception_handlers",
]


class _Route:
    __slots__ = ("methods", "policy", "regex")

    def __init__(self, spec: str, rate: str | Rate | Rates) -> None:
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
        rate: The default rate, e.g. ``"100/minute"``, ``"100 per minute;burst=20"``,
            or several limits that must all allow, ``"10/second;1000/hour"``
            (none is consumed unless all allow; ``RateLimit-Policy`` lists them
            all, ``RateLimit`` the most restrictive).
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
        rate: str | Rate | Rates,
        key: KeyFunc | None = None,
        exclude: Iterable[str] = (),
        routes: Mapping[str, str | Rate | Rates] | None = None,
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
        if policy.group:
            await self._call_group(policy, client, scope, receive, send)
            return
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

    async def _call_group(
        self, policy: Policy, client: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """A request under several limits: all must allow, none is consumed unless all do."""
        limiter = self.limiter
        rates: Rates = policy.rates  # type: ignore[attr-defined]  # a _GroupPolicy
        key = policy.prefix + client
        if len(key) > MAX_KEY_LENGTH:
            key = hashed(key)
        prefix = limiter.prefix
        decision = await limiter._decide_group(Group(tuple(f"{prefix}{r.text}:{key}" for r in rates), rates))
        extra = policy.headers(
            decision, fallback=self._distributed and decision.source != "redis", legacy=self.legacy
        )
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
            status, body = 503, unavailable_body(dep.name if dep is not None else "redis", DENY_DETAIL)
        else:
            retry = retry_seconds(decision)
            status, body = 429, rate_limited_body(retry)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry).encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
