"""What a FAIL-SOFT or FAIL-LOUD call does: the wrappers ``@fail_soft`` and ``@fail_loud`` build.

:func:`degrade.fail_soft` and :func:`degrade.fail_loud` (in
:mod:`degrade.modes`) check their arguments and return one of these; called
on a function, it registers the function's :class:`~degrade.dependency.Site`
and returns the wrapper that consults the dependency, bounds and races the
call, feeds the dependency and answers a degraded call by its policy
(fallback, ``DependencyUnavailable`` or the escape hatch). The wrappers read
what is fixed per site (the dependency's trip rule, the fallback) once, when
they are built, and keep it in closure locals: this is the hot path of every
call. A site declared with a dependency's *name* is wrapped by
:func:`degrade._binding.late`, which builds one of these per registry at its
first call there.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import _binding, observe
from ._bounded import Interrupted, hard_timeout
from ._classify import ErrorPredicate
from .dependency import Dependency, Site
from .exceptions import ConfigurationError, DependencyUnavailable, scrubbed
from .hatch import EscapeHatch

__all__ = ["SHED_ABANDONED", "FailLoud", "FailSoft"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


#: The reason a ``timeout=`` site sheds a call at the abandoned-work cap.
SHED_ABANDONED = "abandoned-cap"


def _site_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _register(dep: Dependency, fn: Callable[..., Any], mode: Any, reason: str, fallback: str | None) -> Site:
    return dep.add_site(_site_name(fn), mode, reason, fallback=fallback)


def _describe_fallback(fallback: object) -> str:
    if callable(fallback):
        return _site_name(fallback)
    text = repr(fallback)
    return text if len(text) <= 60 else text[:57] + "..."


class FailSoft(Generic[T]):
    """What :func:`degrade.fail_soft` returns: applied to a function, the FAIL-SOFT wrapper of it."""

    def __init__(
        self,
        dep: Dependency | str,
        fallback: Any,
        is_failure: ErrorPredicate,
        timeout: float | None,
        reason: str,
    ):
        self.dep = dep
        self.fallback = fallback
        self.is_failure = is_failure
        self.timeout = timeout
        self.reason = reason

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R | T]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | T]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if isinstance(self.dep, str):
            return self._late(self.dep, fn)
        dep, is_failure, timeout = self.dep, self.is_failure, self.timeout
        # Fixed with the dependency's trip rule: read once, not per call.
        counts, timed, clock = dep.counts_calls, dep.times_calls, dep.clock
        fallback = self.fallback
        call_fallback = callable(fallback)
        name = dep.name
        site = _register(dep, fn, "fail_soft", self.reason, _describe_fallback(fallback))

        if inspect.iscoroutinefunction(fn):

            async def fallback_async(args: Any, kwargs: Any) -> Any:
                if not call_fallback:
                    return fallback
                value = fallback(*args, **kwargs)
                if inspect.isawaitable(value):
                    value = await value
                return value

            @functools.wraps(fn)
            async def soft_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                if dep.is_down and not dep.admit():
                    site.count()
                    if not call_fallback:
                        return fallback  # the hot path of an outage: no extra coroutine
                    return await fallback_async(args, kwargs)
                if timeout is not None and not observe.may_abandon(site.name):
                    # Too many calls abandoned at their bound still unwind: do not add one.
                    # Local saturation (shed), not a failure of dep nor a degraded call.
                    site.shed(SHED_ABANDONED)
                    return await fallback_async(args, kwargs)
                down = None
                started = clock() if timed else 0.0
                since = dep._since  # a failure of a call older than the last recovery is stale
                try:
                    if timeout is None:
                        # Not raced against dep.went_down(): that needs a task per call
                        # (~10 us) on the hot path of every healthy call. See docs/modes.md.
                        result = await fn(*args, **kwargs)
                    else:
                        down = dep.went_down()
                        result = await hard_timeout(fn(*args, **kwargs), timeout, down)
                except Interrupted as exc:
                    if exc.cancel_on is not down:
                        raise  # another site's, escaped from fn: not ours to answer, not a failure
                    # dep went down while this call was in flight: answered now, not at the
                    # bound; abandoned (counted) like at the bound, no failure counted.
                    site.count()
                    return await fallback_async(args, kwargs)
                except Exception as exc:
                    if isinstance(exc, DependencyUnavailable) and exc.dependency_name == name:
                        pass  # a nested fail-loud site already counted this failure
                    elif is_failure(exc):
                        dep.record_failure(exc, started=since)
                    else:
                        raise
                    site.count()
                    return await fallback_async(args, kwargs)
                if dep.failures or counts:
                    dep.record_success(clock() - started if timed else None)
                return result

            soft_async.__degrade_site__ = site  # type: ignore[attr-defined]
            return soft_async

        _check_sync(site.name, timeout, fallback, "its fallback")

        @functools.wraps(fn)
        def soft_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            if dep.is_down and not dep.admit():
                site.count()
                return fallback(*args, **kwargs) if call_fallback else fallback
            started = clock() if timed else 0.0
            since = dep._since
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, DependencyUnavailable) and exc.dependency_name == name:
                    pass
                elif is_failure(exc):
                    dep.record_failure(exc, started=since)
                else:
                    raise
                site.count()
                return fallback(*args, **kwargs) if call_fallback else fallback
            if dep.failures or counts:
                dep.record_success(clock() - started if timed else None)
            return result

        soft_sync.__degrade_site__ = site  # type: ignore[attr-defined]
        return soft_sync

    def _late(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spec = _binding.Declared(
            name, _site_name(fn), "fail_soft", self.reason, fallback=_describe_fallback(self.fallback)
        )
        if not inspect.iscoroutinefunction(fn):
            _check_sync(spec.site, self.timeout, self.fallback, "its fallback")
        fallback, is_failure, timeout, reason = self.fallback, self.is_failure, self.timeout, self.reason

        def build(dep: Dependency, registry: _binding.Binder) -> Callable[..., Any]:
            return FailSoft(dep, fallback, is_failure, timeout, reason)(fn)

        return _binding.late(spec, fn, build)


class FailLoud:
    """What :func:`degrade.fail_loud` returns: applied to a function, the FAIL-LOUD wrapper of it."""

    def __init__(
        self,
        dep: Dependency | str,
        *,
        is_failure: ErrorPredicate,
        timeout: float | None,
        reason: str,
        retry_after: int | None,
        hatch: EscapeHatch | str | None = None,
    ):
        self.dep = dep
        self.is_failure = is_failure
        self.timeout = timeout
        self.reason = reason
        self.retry_after = retry_after
        self.hatch = hatch

    @overload
    def __call__(self, fn: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]: ...
    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R]: ...
    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        if isinstance(self.dep, str):
            return self._late(self.dep, fn)
        dep, is_failure, timeout = self.dep, self.is_failure, self.timeout
        retry_after = dep.retry_after if self.retry_after is None else self.retry_after
        counts, timed, clock = dep.counts_calls, dep.times_calls, dep.clock
        name = dep.name
        hatch = self.hatch
        if isinstance(hatch, str):
            raise ConfigurationError("hatch= by name needs the dependency by name too; pass the EscapeHatch")
        site = _register(dep, fn, "fail_loud", self.reason, None)
        if hatch is not None:
            site.hatch = hatch.name
        detail = f"{name} is unavailable"
        shed_detail = f"{name} is busy: too many calls still unwinding in this process"

        def refuse() -> DependencyUnavailable:
            site.count()
            return DependencyUnavailable(name, detail, retry_after=retry_after)

        def through_hatch(args: Any, kwargs: Any, *, count: bool = True) -> Any:
            # Only called while the hatch is open: the operator chose the fallback over a 503.
            assert hatch is not None  # noqa: S101 - narrowing for the type checker only
            if count:
                site.count()
            hatch.used(site.name)
            fallback = hatch.fallback
            return fallback(*args, **kwargs) if callable(fallback) else fallback

        if inspect.iscoroutinefunction(fn):

            async def hatch_async(args: Any, kwargs: Any, *, count: bool = True) -> Any:
                value = through_hatch(args, kwargs, count=count)
                if inspect.isawaitable(value):
                    value = await value
                return value

            async def shed_async(args: Any, kwargs: Any) -> Any:
                # Local saturation: counted as shed, not as a degraded call nor a failure of dep.
                site.shed(SHED_ABANDONED)
                if hatch is not None and hatch.is_open:
                    return await hatch_async(args, kwargs, count=False)
                raise DependencyUnavailable(name, shed_detail, retry_after=retry_after)

            @functools.wraps(fn)
            async def loud_async(*args: P.args, **kwargs: P.kwargs) -> Any:
                if dep.is_down and not dep.admit():
                    if hatch is not None and hatch.is_open:
                        return await hatch_async(args, kwargs)
                    raise refuse()
                if timeout is not None and not observe.may_abandon(site.name):
                    # Too many calls abandoned at their bound still unwind: do not add one.
                    return await shed_async(args, kwargs)
                down = None
                started = clock() if timed else 0.0
                since = dep._since  # a failure of a call older than the last recovery is stale
                try:
                    if timeout is None:
                        # Not raced against dep.went_down(): see fail_soft and docs/modes.md.
                        result = await fn(*args, **kwargs)
                    else:
                        down = dep.went_down()
                        result = await hard_timeout(fn(*args, **kwargs), timeout, down)
                except Interrupted as exc:
                    if exc.cancel_on is not down:
                        raise  # another site's, escaped from fn: not ours to answer, not a failure
                    # dep went down while this call was in flight: refused now, not at the bound.
                    if hatch is not None and hatch.is_open:
                        return await hatch_async(args, kwargs)
                    raise refuse() from scrubbed(exc)
                except Exception as exc:
                    if isinstance(exc, DependencyUnavailable) or not is_failure(exc):
                        raise
                    dep.record_failure(exc, started=since)
                    if hatch is not None and hatch.is_open:
                        return await hatch_async(args, kwargs)
                    raise refuse() from scrubbed(exc)
                if dep.failures or counts:
                    dep.record_success(clock() - started if timed else None)
                return result

            loud_async.__degrade_site__ = site  # type: ignore[attr-defined]
            return loud_async

        _check_sync(site.name, timeout, None if hatch is None else hatch.fallback, "its hatch's fallback")

        @functools.wraps(fn)
        def loud_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            if dep.is_down and not dep.admit():
                if hatch is not None and hatch.is_open:
                    return through_hatch(args, kwargs)
                raise refuse()
            started = clock() if timed else 0.0
            since = dep._since
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, DependencyUnavailable) or not is_failure(exc):
                    raise
                dep.record_failure(exc, started=since)
                if hatch is not None and hatch.is_open:
                    return through_hatch(args, kwargs)
                raise refuse() from scrubbed(exc)
            if dep.failures or counts:
                dep.record_success(clock() - started if timed else None)
            return result

        loud_sync.__degrade_site__ = site  # type: ignore[attr-defined]
        return loud_sync

    def _late(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        hatch = self.hatch
        hatch_name = hatch if isinstance(hatch, str) or hatch is None else hatch.name
        spec = _binding.Declared(name, _site_name(fn), "fail_loud", self.reason, hatch=hatch_name)
        if not inspect.iscoroutinefunction(fn):
            fallback = hatch.fallback if isinstance(hatch, EscapeHatch) else None
            _check_sync(spec.site, self.timeout, fallback, "its hatch's fallback")
        is_failure, timeout, reason = self.is_failure, self.timeout, self.reason
        retry_after = self.retry_after

        def build(dep: Dependency, registry: _binding.Binder) -> Callable[..., Any]:
            bound = hatch
            if isinstance(bound, str):
                bound = registry._hatches.get(bound)
                if bound is None:
                    raise ConfigurationError(
                        f"{spec.site}: the app's Registry has no escape hatch named {hatch_name!r}; "
                        f"declare it with registry.escape_hatch({hatch_name!r}, dependency=..., ...)"
                    )
            if bound is not None and bound.dependency is not dep:
                raise ConfigurationError(
                    f"{spec.site}: hatch {hatch_name!r} is not on the app's dependency {name!r}; "
                    "declare the hatch on the registry the app uses"
                )
            if bound is not None and not inspect.iscoroutinefunction(fn):
                _check_sync(spec.site, None, bound.fallback, "its hatch's fallback")
            loud = FailLoud(
                dep, is_failure=is_failure, timeout=timeout, reason=reason, retry_after=retry_after
            )
            loud.hatch = bound
            return loud(fn)

        return _binding.late(spec, fn, build)


def _check_sync(site: str, timeout: float | None, fallback: object, what: str) -> None:
    """The checks of a sync site: no ``timeout=``, no async fallback."""
    if timeout is not None:
        raise ConfigurationError(
            f"timeout= needs an async function; {site} is sync. "
            "Bound a sync call with its driver's own timeout instead."
        )
    if callable(fallback) and inspect.iscoroutinefunction(fallback):
        raise ConfigurationError(f"{site} is sync, so {what} must be a value or a sync callable")
