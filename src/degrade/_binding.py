"""Late binding: a site declared with a dependency's *name*, bound to the app's Registry at first call.

``@fail_soft("redis", fallback=None, reason=...)`` at module level needs no
``Dependency`` at import time, so app factories and test suites that build
several apps in one process work. Each call finds *its* registry:

1. the registry of the request being served: a contextvar that the ASGI guard
   (:class:`degrade.DegradeMiddleware`, installed by ``registry.lifespan``) sets
   for every request, and that ``registry.lifespan`` / ``registry.bind()`` set
   for the code they run (tasks created there inherit it);
2. outside any of those (a script, a worker, a test without the lifespan): the
   only *started* registry of the process that declares the name, else the only
   live registry that declares it;
3. else a :class:`~degrade.ConfigurationError` naming the dependency and the fix.

Two apps never share a dependency by accident: a name resolves in one registry
or fails, it never falls through from the request's registry to another one.

The site is built once per registry (the bound wrapper of :mod:`degrade._wrappers`,
cached in ``registry._late``), so a call costs a contextvar read, a dict lookup
and one more coroutine frame over a site given its ``Dependency``: measured on
the up path of an async ``@fail_soft``, 0.7 us bound, 0.9 to 1.3 us by name in
a bound context, 1.5 to 1.9 us through the fallback resolution (2 shared cores,
200k calls a run). A plain function returning its coroutine would save the
frame, but FastAPI and Starlette tell async endpoints and dependencies by
``inspect.iscoroutinefunction``, which Python 3.11 cannot be told otherwise.
Sites given a ``Dependency`` object do not go through here at all.

For the runbook, every declaration is kept (one per site, so re-declaring
replaces) and its :class:`~degrade.dependency.Site` is added to each registry
that declares a dependency of that name, whichever comes first: the decorator
or ``registry.dependency(name)``.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from .dependency import Dependency, Site
from .exceptions import ConfigurationError

__all__ = ["Binder", "Declared", "LateSite", "adopt", "current", "declare", "late", "resolve", "site_for"]

Mode = Literal["fail_soft", "fail_loud"]


class Binder(Protocol):
    """What binding reads of a :class:`degrade.Registry` (a protocol: no import cycle)."""

    _deps: dict[str, Dependency]
    _late: dict[Any, Callable[..., Any]]

    @property
    def _hatches(self) -> Mapping[str, Any]: ...


#: The registry of the code running now (a request, a lifespan, ``registry.bind()``).
current: contextvars.ContextVar[Binder | None] = contextvars.ContextVar("degrade_registry", default=None)

#: Every live registry, and those whose lifespan runs (both weak: nothing kept alive).
_registries: weakref.WeakSet[Any] = weakref.WeakSet()
_started: weakref.WeakSet[Any] = weakref.WeakSet()
#: Bumped whenever either set or a registry's dependencies change: the fallback cache's key.
_generation = 0
_fallback: dict[str, tuple[int, weakref.ref[Any]]] = {}


@dataclass(frozen=True, eq=False)
class Declared:
    """One site declared by dependency name: what the runbook shows before it is bound."""

    dependency: str
    site: str
    mode: Mode
    reason: str
    fallback: str | None = None
    hatch: str | None = None


#: One declaration per (dependency, site, mode): a module imported twice replaces, never grows.
_declared: dict[tuple[str, str, str], Declared] = {}


def _changed() -> None:
    global _generation  # noqa: PLW0603 - one process-wide counter, read by the fallback cache
    _generation += 1


def registered(registry: Binder) -> None:
    """A registry was created."""
    _registries.add(registry)
    _changed()


def started(registry: Binder, running: bool) -> None:
    """A registry's lifespan started (``running``) or ended."""
    if running:
        _started.add(registry)
    else:
        _started.discard(registry)
    _changed()


def _attach(dep: Dependency, spec: Declared) -> Site:
    site = dep.add_site(spec.site, spec.mode, spec.reason, fallback=spec.fallback)
    if spec.hatch is not None:
        site.hatch = spec.hatch
    return site


def adopt(registry: Binder, dep: Dependency) -> None:
    """``registry`` declared ``dep``: give it the sites already declared by its name."""
    for spec in list(_declared.values()):
        if spec.dependency == dep.name:
            _attach(dep, spec)
    _changed()


def declare(spec: Declared) -> None:
    """Keep ``spec`` for the runbook and attach it to every registry that has its dependency."""
    _declared[(spec.dependency, spec.site, spec.mode)] = spec
    for registry in list(_registries):
        dep = registry._deps.get(spec.dependency)
        if dep is not None:
            _attach(dep, spec)


def resolve(name: str, where: str) -> Binder:
    """The registry a call to a site on dependency ``name`` runs against (see the module docstring).

    Raises:
        ConfigurationError: no registry or more than one could be meant; the
            message names the dependency, the site (``where``) and the fix.
    """
    registry = current.get()
    if registry is not None:
        return registry
    cached = _fallback.get(name)
    if cached is not None and cached[0] == _generation:
        found = cached[1]()
        if found is not None:
            return found  # type: ignore[no-any-return]
    running = [r for r in list(_started) if name in r._deps]
    candidates = running or [r for r in list(_registries) if name in r._deps]
    if len(candidates) == 1:
        _fallback[name] = (_generation, weakref.ref(candidates[0]))
        return candidates[0]  # type: ignore[no-any-return]
    if not candidates:
        raise ConfigurationError(
            f"{where} names dependency {name!r}, but no Registry declares it: "
            f"call registry.dependency({name!r}, ...) before the first call"
        )
    raise ConfigurationError(
        f"{where} names dependency {name!r}, which {len(candidates)} registries declare, and runs "
        "outside any app: call it within a request of an app whose lifespan is registry.lifespan "
        "(or that has DegradeMiddleware), or inside `with registry.bind():`"
    )


def dependency_in(registry: Binder, name: str, where: str) -> Dependency:
    """``registry``'s dependency ``name``, or a ConfigurationError saying how to declare it."""
    dep = registry._deps.get(name)
    if dep is None:
        raise ConfigurationError(
            f"{where} names dependency {name!r}, but the app's Registry has none by that name: "
            f"declare it with registry.dependency({name!r}, ...) where the app is built"
        )
    return dep


Build = Callable[[Dependency, Binder], Callable[..., Any]]


def _bind(registry: Binder, spec: Declared, build: Build) -> Callable[..., Any]:
    inner = build(dependency_in(registry, spec.dependency, spec.site), registry)
    registry._late[spec] = inner
    return inner


def late(spec: Declared, fn: Callable[..., Any], build: Build) -> Callable[..., Any]:
    """The wrapper of a site declared by name: resolves its registry per call, binds once per registry.

    ``build(dep, registry)`` returns the bound wrapper (``FailSoft(dep, ...)(fn)``);
    it runs at the first call against each registry.
    """
    declare(spec)
    name, get = spec.dependency, current.get

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def late_async(*args: Any, **kwargs: Any) -> Any:
            registry = get()
            if registry is None:
                registry = resolve(name, spec.site)
            inner = registry._late.get(spec)
            if inner is None:
                inner = _bind(registry, spec, build)
            return await inner(*args, **kwargs)

        late_async.__degrade_late__ = spec  # type: ignore[attr-defined]
        return late_async

    @functools.wraps(fn)
    def late_sync(*args: Any, **kwargs: Any) -> Any:
        registry = get()
        if registry is None:
            registry = resolve(name, spec.site)
        inner = registry._late.get(spec)
        if inner is None:
            inner = _bind(registry, spec, build)
        return inner(*args, **kwargs)

    late_sync.__degrade_late__ = spec  # type: ignore[attr-defined]
    return late_sync


def site_for(spec: Declared, registry: Binder | None) -> Site:
    """The :class:`Site` of a by-name declaration in ``registry`` (default: the one a call would use)."""
    if registry is None:
        registry = resolve(spec.dependency, spec.site)
    return _attach(dependency_in(registry, spec.dependency, spec.site), spec)


class LateSite:
    """The :class:`Site` of a by-name wrapper in the registry a call runs against, looked up on use.

    For safety nets built of by-name sites that count on a site themselves
    (the cache counts shed reads on its read site): ``site.shed(reason)``
    resolves like a call would. Any other attribute reads the resolved site.
    """

    def __init__(self, fn: Callable[..., Any]) -> None:
        spec = getattr(fn, "__degrade_late__", None)
        if not isinstance(spec, Declared):
            raise ConfigurationError(f"{fn!r} is not a site declared by dependency name")
        self._spec = spec

    def resolve(self) -> Site:
        """The site in the current registry (see :func:`resolve`)."""
        return site_for(self._spec, None)

    def shed(self, reason: str) -> None:
        """Count one call shed on the resolved site."""
        self.resolve().shed(reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.resolve(), name)
