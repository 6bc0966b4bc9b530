"""rate_limit: the per-route FastAPI dependency, its exception and its 429 handler.

``Depends(rate_limit(limiter, "5/minute", name="login"))``. What it adds to
the middleware, for the cases the middleware cannot see:

* a key function that may be async and read the request
  (``key=username_from_body``: Starlette caches the body on the ``Request``,
  and FastAPI hands its dependencies and its own body parsing the same
  ``Request``, so the handler still reads it), or a key the handler computes
  (``await login_limit.check(request, key=username)``);
* late binding: ``rate_limit(None, ...)`` or ``rate_limit("auth", ...)`` is
  declared at import time and finds its :class:`RateLimiter` per request in
  the app's :class:`~degrade.Registry` (the one ``registry.lifespan`` binds
  each request to, see :mod:`degrade._binding`), among the components it
  manages (``registry.manage(limiter)``); cached per registry, so two apps
  built in one process never share a limiter by accident;
* headers that survive the handler's exception: besides FastAPI's injected
  ``Response`` (whose headers FastAPI drops when the handler raises), they are
  left in the ASGI scope under :data:`SCOPE_HEADERS`, and the 503 that
  :func:`degrade.exception_handlers` builds for a ``DependencyUnavailable``
  carries them.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from .. import _binding
from .._gcra import Decision, Rate, Rates
from ..exceptions import ConfigurationError, DegradeError, DependencyUnavailable
from ._client_ip import client_ip
from ._headers import DENY_DETAIL, Policy, _GroupPolicy, rate_limited_body, retry_seconds
from ._limiter import RateLimiter

__all__ = [
    "SCOPE_HEADERS",
    "RateLimitExceeded",
    "RouteLimit",
    "rate_limit",
    "rate_limited_response",
    "ratelimit_exception_handlers",
]

#: The ASGI scope key where :func:`rate_limit` leaves the rate-limit headers of the
#: request (a ``dict[str, str]``), so that a response built after the handler raised
#: (degrade's 503 handler) carries them too.
SCOPE_HEADERS = "degrade.ratelimit.headers"

#: A key function of rate_limit: the request in (a Starlette ``Request``, which is also
#: a mapping over the ASGI scope, so ``client_ip()`` works), the key out, maybe awaited.
RequestKey = Callable[[Any], "str | Awaitable[str | None] | None"]


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
        self.retry_after = retry_seconds(decision)
        headers = {**headers, "Retry-After": str(self.retry_after)}
        super().__init__(429, detail="rate_limited", headers=headers)


async def rate_limited_response(request: Request, exc: Exception) -> Response:
    """The exception handler for :class:`RateLimitExceeded`: 429 JSON with the headers.

    Failure mode: none; any other exception given to it is re-raised unchanged.
    """
    if not isinstance(exc, RateLimitExceeded):  # Starlette routes by type; be safe anyway
        raise exc
    return Response(
        rate_limited_body(exc.retry_after),
        status_code=429,
        media_type="application/json",
        headers={**(exc.headers or {}), "Cache-Control": "no-store"},
    )


def ratelimit_exception_handlers() -> dict[Any, Any]:
    """``{RateLimitExceeded: rate_limited_response}``, to merge with :func:`degrade.exception_handlers`.

    ``FastAPI(exception_handlers={**exception_handlers(), **ratelimit_exception_handlers()})``.
    """
    return {RateLimitExceeded: rate_limited_response}


class RouteLimit(Protocol):
    """What :func:`rate_limit` returns: a dependency, and ``check`` for a key the handler computed."""

    async def __call__(self, request: Request, response: Response) -> Decision:
        """Limit this request by the key function's key (FastAPI calls it)."""

    async def check(self, request: Request, *, key: str | None, response: Response | None = None) -> Decision:
        """Limit this request by ``key``: ``await login_limit.check(request, key=form.username)``."""


def _bound_limiter(target: str | None, cache: weakref.WeakKeyDictionary[Any, RateLimiter]) -> RateLimiter:
    """The request's registry's managed RateLimiter (named ``target``, or its only one)."""
    registry = _binding.current.get()
    what = "rate_limit(None, ...)" if target is None else f"rate_limit({target!r}, ...)"
    if registry is None:
        raise ConfigurationError(
            f"{what} finds its limiter in the app's Registry, and this request has none: serve the app "
            "with lifespan=registry.lifespan (or Middleware(DegradeMiddleware, registry=registry)) "
            "and registry.manage(limiter)"
        )
    limiter = cache.get(registry)
    if limiter is not None:
        return limiter
    components: list[Any] = getattr(registry, "_all_components", list)()
    found = [c for c in components if isinstance(c, RateLimiter) and (target is None or c.name == target)]
    if len(found) != 1:
        which = "RateLimiter" if target is None else f"RateLimiter(name={target!r})"
        raise ConfigurationError(
            f"{what} needs exactly one {which} managed by the app's Registry, found {len(found)}: "
            "registry.manage(RateLimiter(..., name=...)) and name it in rate_limit(...)"
        )
    cache[registry] = found[0]
    return found[0]


def rate_limit(
    limiter: RateLimiter | str | None,
    rate: str | Rate | Rates,
    *,
    key: RequestKey | None = None,
    name: str = "default",
    legacy_headers: bool = False,
) -> RouteLimit:
    """A FastAPI dependency limiting one route: ``Depends(rate_limit(limiter, "5/minute", name="login"))``.

    Needs no FastAPI import: it takes Starlette's ``Request`` and ``Response``,
    which FastAPI injects. The headers are set on FastAPI's response (routes that
    return a ``Response`` object themselves must copy them from the returned
    :class:`Decision`) and left in the scope (:data:`SCOPE_HEADERS`) for a 503
    built after the handler raised. The bucket is ``name`` + key, separate from
    the middleware's. Works as a plain function of a Starlette request too.

    Failure mode: over the limit raises :class:`RateLimitExceeded` (429); while
    Redis is down with ``on_outage="deny"`` raises
    :class:`~degrade.DependencyUnavailable` (503 through
    :func:`degrade.exception_handlers`); otherwise the outage policy answers.
    A key function that returns neither a string nor None raises ``TypeError``
    (a bug in it); longer keys than 128 characters are hashed.

    Args:
        limiter: The :class:`RateLimiter`; or, declared before it exists (app
            factories), None for the one RateLimiter the app's Registry manages,
            or the ``name=`` of one (resolved per request, cached per registry).
        rate: ``"5/minute"``, several limits that must all allow
            (``"5/minute;100/hour"``), a :class:`Rate` or :class:`Rates`.
        key: A function of the request (a Starlette ``Request``, which also reads
            as the ASGI scope, so :func:`client_ip` works) returning the key, or
            None to leave the request unlimited; it may be async and read the
            body (``(await request.json())["username"]``). Default: ``client_ip()``.
        name: The policy name in the headers (and the bucket's prefix).
        legacy_headers: Also set ``X-RateLimit-Limit/Remaining/Reset``.
    """
    if limiter is not None and not isinstance(limiter, RateLimiter | str):
        raise ConfigurationError(
            f"limiter must be a degrade RateLimiter, its name, or None (the app's one); got {limiter!r}"
        )
    if key is not None and not callable(key):
        raise ConfigurationError(f"key must be a function of the request; got {key!r}")
    policy = Policy(name, rate)
    key_of: RequestKey = key if key is not None else client_ip()
    legacy = bool(legacy_headers)
    fixed = limiter if isinstance(limiter, RateLimiter) else None
    target = limiter if isinstance(limiter, str) else None
    bound: weakref.WeakKeyDictionary[Any, RateLimiter] = weakref.WeakKeyDictionary()
    unlimited = Decision(True, policy.rate.limit, policy.rate.limit, 0.0, 0.0, "memory")
    limits: Rate | Rates = policy.rates if isinstance(policy, _GroupPolicy) else policy.rate

    async def decide(request: Request, response: Response | None, client: object) -> Decision:
        if client is None:
            return unlimited
        if not isinstance(client, str):
            raise TypeError(
                f"the key of rate_limit(name={name!r}) must be a str or None; got {type(client).__name__}"
            )
        lim = fixed if fixed is not None else _bound_limiter(target, bound)
        decision = await lim.hit(policy.prefix + client, limits)
        raw = policy.headers(decision, fallback=lim.distributed and decision.source != "redis", legacy=legacy)
        headers = {k.decode(): v.decode() for k, v in raw}
        stored = request.scope.get(SCOPE_HEADERS)
        if stored is None:
            request.scope[SCOPE_HEADERS] = dict(headers)
        else:
            stored.update(headers)
        if not decision.allowed:
            if decision.source == "deny":
                dep = lim.dependency
                raise DependencyUnavailable(
                    dep.name if dep is not None else "redis",
                    DENY_DETAIL,
                    retry_after=dep.retry_after if dep is not None else 1,
                )
            raise RateLimitExceeded(decision, headers)
        if response is not None:
            response.headers.update(headers)
        return decision

    async def dependency(request: Request, response: Response) -> Decision:
        client = key_of(request)
        if inspect.isawaitable(client):
            client = await client
        return await decide(request, response, client)

    async def check(request: Request, *, key: str | None, response: Response | None = None) -> Decision:
        return await decide(request, response, key)

    dependency.check = check  # type: ignore[attr-defined]
    return dependency  # type: ignore[return-value]
