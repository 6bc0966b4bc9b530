"""The ASGI guard: binds each request to its app's Registry and answers an uncaught outage with a 503.

``registry.lifespan`` installs it at start-up, just inside Starlette's (and
FastAPI's) ``ServerErrorMiddleware``, so an app needs no other line for:

* late binding: a site declared by dependency name (``@fail_loud("redis")``)
  resolves against the registry of the app serving the request;
* a :class:`~degrade.DependencyUnavailable` (or :class:`~degrade.Overloaded`)
  that no handler answered: the same 503, ``Retry-After`` and JSON body as
  :func:`degrade.exception_handlers` (which, installed, answers first: it sits
  inside, so it stays the place to customise the response), instead of a bare 500.

Reaching into the built middleware stack is a reach into Starlette's
internals (``app.middleware_stack`` is built before the lifespan runs, its
outermost layer is ``ServerErrorMiddleware``, each layer keeps the next in
``.app``). It is guarded: when the shape is not found the app runs unchanged
and one warning (``degrade.guard_not_installed``) says to add
``DegradeMiddleware`` or ``exception_handlers()``; a test fails when
Starlette's shape changes (``tests/unit/test_guard.py``).

Rejected: ``DependencyUnavailable`` as an ``HTTPException`` (Sentry's
integration then reports every 503 of an outage; see its docstring), and
``BaseHTTPMiddleware`` (costly, and it cuts contextvar propagation).
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import _binding
from .exceptions import ConfigurationError, DependencyUnavailable
from .observe import logger
from .responses import send_json, unavailable_body, unavailable_headers

__all__ = ["DegradeMiddleware", "install"]

#: Layers :func:`install` walks down an app's stack looking for ``ServerErrorMiddleware``.
MAX_DEPTH = 32

_warned = False


class DegradeMiddleware:
    """Binds each request to ``registry`` and turns an uncaught outage into a 503.

    ``registry.lifespan`` (and ``registry.wrap(...)``) install it by
    themselves; add it yourself only when the app's lifespan is not the
    registry's: ``Middleware(DegradeMiddleware, registry=registry)``, first in
    the list (outermost).

    Failure mode: none of its own. An uncaught
    :class:`~degrade.DependencyUnavailable` (or :class:`~degrade.Overloaded`)
    raised before the response started is answered with the shared 503 body and
    ``Retry-After``; after the response started it propagates unchanged (the
    server ends the connection). Other exceptions always propagate.

    Args:
        app: The ASGI app it wraps.
        registry: The app's :class:`~degrade.Registry`.
    """

    def __init__(self, app: ASGIApp, /, *, registry: Any) -> None:
        if not all(hasattr(registry, a) for a in ("_deps", "_late", "_hatches")):
            raise ConfigurationError(f"registry= takes a degrade.Registry; got {registry!r}")
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = _binding.current.set(self.registry)
        try:
            if kind != "http":
                await self.app(scope, receive, send)
                return
            started = False

            async def watched(message: Message) -> None:
                nonlocal started
                if message["type"] == "http.response.start":
                    started = True
                await send(message)

            try:
                await self.app(scope, receive, watched)
            except DependencyUnavailable as exc:
                if started:
                    raise
                headers = unavailable_headers(exc.retry_after, scope)
                await send_json(send, 503, unavailable_body(exc.dependency_name, exc.detail), headers)
        finally:
            _binding.current.reset(token)


def install(app: object, registry: Any) -> bool:
    """Insert a :class:`DegradeMiddleware` for ``registry`` just inside ``app``'s ServerErrorMiddleware.

    Returns True when the app is guarded (now or already). A Starlette app
    whose stack is not built yet (its lifespan entered by hand) gets it built
    now, as its first request would. Anything else is left unchanged, with one
    warning per process.
    """
    from starlette.applications import Starlette
    from starlette.middleware.errors import ServerErrorMiddleware

    if not isinstance(app, Starlette):
        return False  # a bare router, a test calling registry.lifespan(): nothing to guard
    stack = getattr(app, "middleware_stack", None)
    if stack is None:
        stack = app.middleware_stack = app.build_middleware_stack()
    layer: Any = stack
    outer: Any = None
    for _ in range(MAX_DEPTH):
        if isinstance(layer, DegradeMiddleware):
            return True  # already there: added by the user, or by an earlier start
        if outer is None and isinstance(layer, ServerErrorMiddleware):
            outer = layer
        inner = getattr(layer, "app", None)
        if inner is None or inner is app.router:
            break
        layer = inner
    if outer is None or not hasattr(outer, "app"):
        _warn(type(stack).__name__)
        return False
    outer.app = DegradeMiddleware(outer.app, registry=registry)
    return True


def _warn(outermost: str) -> None:
    global _warned  # noqa: PLW0603 - one warning per process
    if _warned:
        return
    _warned = True
    logger.warning(
        "degrade.guard_not_installed",
        outermost=outermost,
        detail="no ServerErrorMiddleware found in the app's stack: an uncaught DependencyUnavailable "
        "answers 500; install exception_handlers() or add Middleware(DegradeMiddleware, registry=...)",
    )
