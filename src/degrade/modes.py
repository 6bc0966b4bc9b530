"""FAIL-SOFT and FAIL-LOUD: each call site's fail mode, declared in code.

``@fail_soft`` answers with a fallback when its dependency fails or is down;
``@fail_loud`` raises :class:`~degrade.DependencyUnavailable` (a 503 through
:func:`degrade.exception_handlers`). Both consult the dependency first, so a
known outage costs a flag read and the wrapped function is not called at all;
both feed it with what they see. Each decorated function registers a
:class:`~degrade.dependency.Site` on its dependency, which the generated runbook
lists.

Only dependency errors count (connection, timeout, driver availability; see
``on=``); any other exception propagates unchanged and is not a failure.
``asyncio.CancelledError`` is never caught.

Saturation is not an outage: a ``timeout=`` site that finds the process-wide
cap of abandoned calls reached answers by its policy without calling, counted
as *shed* (``site.shed("abandoned-cap")``), never as a failure of the
dependency nor as a degraded call. Work in flight on a ``timeout=`` site is
raced against :meth:`~degrade.Dependency.went_down`: when the dependency goes
down meanwhile (another caller's failures, a probe, ``mark_down()``) the call
is abandoned at once and answered by its policy, as at its timeout but without
counting a failure.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, ParamSpec, TypeVar, overload

from . import observe
from ._bounded import Interrupted, hard_timeout
from ._classify import ErrorPredicate, predicate
from .dependency import Dependency, Site
from .exceptions import ConfigurationError, DependencyUnavailable, scrubbed
from .hatch import EscapeHatch

__all__ = ["fail_loud", "fail_soft", "site_of"]

P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")

OnErrors = type[Exception] | tuple[type[Exception], ...] | ErrorPredicate | None


def _site_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _validate(dep: Dependency, timeout: float | None, reason: str) -> None:
    if not isinstance(dep, Dependency):
        raise ConfigurationError(
            f"the first argument must be a Dependency (from registry.dependency()); got {dep!r}"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigurationError("reason= is required: say what the user sees when this site degrades")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise ConfigurationError(f"timeout must be a positive number of seconds or None; got {timeout!r}")


def _with_timeouts(is_failure: ErrorPredicate, timeout: float | None) -> ErrorPredicate:
    # timeout= asks for a bound, so its expiry (a TimeoutError) is a failure whatever on= lists.
    if timeout is None:
        return is_failure

    def failure(exc: BaseException) -> bool:
        return isinstance(exc, TimeoutError) or is_failure(exc)

    return failure


#: The reason a ``timeout=`` site sheds a call at the abandoned-work cap.
SHED_ABANDONED = "abandoned-cap"


def _register(dep: Dependency, fn: Callable[..., Any], mode: Any, reason: str, fallback: str | None) -> Site:
    return dep.add_site(_site_name(fn), mode, reason, fallback=fallback)


def _describe_fallback(fallback: object) -> str:
    if callable(fallback):
        return _site_name(fallback)
    text = repr(fallback)
    return text if len(text) <= 60 else text[:57] + "..."


def site_of(fn: Callable[..., Any]) -> Site:
    """The :class:`Site` a decorated function registered (raises if it has none)."""
    site = getattr(fn, "__degrade_site__", None)
    if not isinstance(site, Site):
        raise ConfigurationError(f"{fn!r} is not decorated with @fail_soft or @fail_loud")
    return site


class _FailSoft(Generic[T]):
    def __init__(
        self, dep: Dependency, fallback: Any, is_failure: ErrorPredicate, timeout: float | None, reason: str
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
                    if isinstance(exc, DependencyUnavailable) and exc.dependency == name:
                        pass  # a nested fail-loud site already counted this failure
                    elif is_failure(exc):
                        dep.record_failure(exc)
                    else:
                        raise
                    site.count()
                    return await fallback_async(args, kwargs)
                if dep.failures or counts:
                    dep.record_success(clock() - started if timed else None)
                return result

            soft_async.__degrade_site__ = site  # type: ignore[attr-defined]
            return soft_async

        if timeout is not None:
            raise ConfigurationError(
                f"timeout= needs an async function; {site.name} is sync. "
                "Bound a sync call with its driver's own timeout instead."
            )
        if call_fallback and inspect.iscoroutinefunction(fallback):
            raise ConfigurationError(
                f"{site.name} is sync, so its fallback must be a value or a sync callable"
            )

        @functools.wraps(fn)
        def soft_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            if dep.is_down and not dep.admit():
                site.count()
                return fallback(*args, **kwargs) if call_fallback else fallback
            started = clock() if timed else 0.0
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, DependencyUnavailable) and exc.dependency == name:
                    pass
                elif is_failure(exc):
                    dep.record_failure(exc)
                else:
                    raise
                site.count()
                return fallback(*args, **kwargs) if call_fallback else fallback
            if dep.failures or counts:
                dep.record_success(clock() - started if timed else None)
            return result

        soft_sync.__degrade_site__ = site  # type: ignore[attr-defined]
        return soft_sync


class _FailLoud:
    def __init__(
        self,
        dep: Dependency,
        *,
        is_failure: ErrorPredicate,
        timeout: float | None,
        reason: str,
        retry_after: int,
        hatch: EscapeHatch | None = None,
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
        dep, is_failure, timeout, retry_after = self.dep, self.is_failure, self.timeout, self.retry_after
        counts, timed, clock = dep.counts_calls, dep.times_calls, dep.clock
        name = dep.name
        hatch = self.hatch
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
                    dep.record_failure(exc)
                    if hatch is not None and hatch.is_open:
                        return await hatch_async(args, kwargs)
                    raise refuse() from scrubbed(exc)
                if dep.failures or counts:
                    dep.record_success(clock() - started if timed else None)
                return result

            loud_async.__degrade_site__ = site  # type: ignore[attr-defined]
            return loud_async

        if timeout is not None:
            raise ConfigurationError(
                f"timeout= needs an async function; {site.name} is sync. "
                "Bound a sync call with its driver's own timeout instead."
            )

        if hatch is not None and inspect.iscoroutinefunction(hatch.fallback):
            raise ConfigurationError(
                f"{site.name} is sync, so its hatch's fallback must be a value or a sync callable"
            )

        @functools.wraps(fn)
        def loud_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            if dep.is_down and not dep.admit():
                if hatch is not None and hatch.is_open:
                    return through_hatch(args, kwargs)
                raise refuse()
            started = clock() if timed else 0.0
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, DependencyUnavailable) or not is_failure(exc):
                    raise
                dep.record_failure(exc)
                if hatch is not None and hatch.is_open:
                    return through_hatch(args, kwargs)
                raise refuse() from scrubbed(exc)
            if dep.failures or counts:
                dep.record_success(clock() - started if timed else None)
            return result

        loud_sync.__degrade_site__ = site  # type: ignore[attr-defined]
        return loud_sync


@overload
def fail_soft(
    dep: Dependency,
    *,
    fallback: Callable[..., Awaitable[T]],
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> _FailSoft[T]: ...
@overload
def fail_soft(
    dep: Dependency,
    *,
    fallback: Callable[..., T],
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> _FailSoft[T]: ...
@overload
def fail_soft(
    dep: Dependency,
    *,
    fallback: T,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> _FailSoft[T]: ...
def fail_soft(
    dep: Dependency,
    *,
    fallback: Any,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> _FailSoft[Any]:
    """Declare a FAIL-SOFT site: when ``dep`` fails or is down, return ``fallback``.

    Works on sync and async functions and keeps their signature for type checkers.

    Failure mode: FAIL-SOFT. While ``dep`` is down the function is not called and
    the fallback answers at once. A dependency error raised by the call (or the
    call outliving ``timeout``) counts as a failure on ``dep`` and the fallback
    answers. Other exceptions propagate unchanged and do not count.

    Args:
        dep: The dependency this call uses.
        fallback: A value, or a callable (sync, or async for async functions)
            called with the same arguments. To return a callable as the value,
            wrap it: ``fallback=lambda *a, **k: my_callable``.
        on: What counts as a failure: exception types or a predicate. Defaults
            to the connection/timeout errors of the installed drivers.
        timeout: Seconds the call may take (async functions only); a hard bound.
            A call outliving it is cancelled and left to unwind in the background;
            while ``degrade._bounded.MAX_ABANDONED`` such calls still unwind, the
            fallback answers at once (shed: ``site.shed_calls["abandoned-cap"]``,
            not a failure of ``dep``). A call in flight when ``dep`` goes down
            is abandoned the same way and the fallback answers at once.
        reason: What the user gets while degraded, for the runbook.
    """
    _validate(dep, timeout, reason)
    return _FailSoft(dep, fallback, _with_timeouts(predicate(on), timeout), timeout, reason)


def fail_loud(
    dep: Dependency,
    *,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
    retry_after: int | None = None,
    hatch: EscapeHatch | None = None,
) -> _FailLoud:
    """Declare a FAIL-LOUD site: when ``dep`` fails or is down, raise ``DependencyUnavailable``.

    Failure mode: FAIL-LOUD. While ``dep`` is down the function is not called and
    :class:`~degrade.DependencyUnavailable` is raised at once (503 with
    ``Retry-After`` through :func:`degrade.exception_handlers`). A dependency
    error raised by the call counts as a failure and is re-raised as
    ``DependencyUnavailable`` (the original as ``__cause__``). Other exceptions
    propagate unchanged and do not count.

    Args:
        dep: The dependency this call needs.
        on: What counts as a failure; as for :func:`fail_soft`.
        timeout: Seconds the call may take (async functions only); a hard bound.
            A call outliving it is cancelled and left to unwind in the background;
            while ``degrade._bounded.MAX_ABANDONED`` such calls still unwind, the call
            is refused at once (``DependencyUnavailable``; shed:
            ``site.shed_calls["abandoned-cap"]``, not a failure of ``dep``). A call
            in flight when ``dep`` goes down is abandoned the same way and
            refused at once.
        reason: What breaks for the user, for the runbook.
        retry_after: ``Retry-After`` seconds; defaults to the dependency's.
        hatch: An :class:`~degrade.hatch.EscapeHatch` on the same dependency.
            While an operator holds it open, the site answers with the hatch's
            fallback instead of raising, and each use is a security warning.
    """
    _validate(dep, timeout, reason)
    if retry_after is None:
        retry_after = dep.retry_after
    elif isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ConfigurationError(f"retry_after must be a whole number of seconds >= 0; got {retry_after!r}")
    if hatch is not None and (not isinstance(hatch, EscapeHatch) or hatch.dependency is not dep):
        raise ConfigurationError(
            f"hatch= takes an EscapeHatch declared on the same dependency ({dep.name!r}); got {hatch!r}"
        )
    return _FailLoud(
        dep,
        is_failure=_with_timeouts(predicate(on), timeout),
        timeout=timeout,
        reason=reason,
        retry_after=retry_after,
        hatch=hatch,
    )
