"""FAIL-SOFT and FAIL-LOUD: each call site's fail mode, declared in code.

``@fail_soft`` answers with a fallback when its dependency fails or is down;
``@fail_loud`` raises :class:`~degrade.DependencyUnavailable` (a 503 through
:func:`degrade.exception_handlers`). Both consult the dependency first, so a
known outage costs a flag read and the wrapped function is not called at all;
both feed it with what they see. Each decorated function registers a
:class:`~degrade.dependency.Site` on its dependency, which the generated runbook
lists.

The dependency may be given by *name* (``@fail_soft("redis", ...)``): nothing
needs to exist at import time. The site is then bound at its first call to the
dependency of that name in the app's :class:`~degrade.Registry` (the request's,
or the one ``registry.bind()`` / the lifespan set; see :mod:`degrade._binding`),
once per registry, so app factories and tests that build several apps work.

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

This module checks the arguments and declares the sites; what a decorated call
does (consult, bound, race, feed, answer) is in ``_wrappers``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, overload

from . import _binding
from ._classify import ErrorPredicate, predicate
from ._validate import optional_seconds, whole_seconds
from ._wrappers import SHED_ABANDONED as SHED_ABANDONED  # noqa: PLC0414 - importable here as before
from ._wrappers import FailLoud, FailSoft
from .dependency import Dependency, Site
from .exceptions import ConfigurationError
from .hatch import EscapeHatch

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["fail_loud", "fail_soft", "site_of"]

T = TypeVar("T")

OnErrors = type[Exception] | tuple[type[Exception], ...] | ErrorPredicate | None


def _check_args(dep: Dependency | str, timeout: float | None, reason: str) -> float | None:
    """Check a site's common arguments; returns ``timeout`` as seconds (``float``) or None."""
    if isinstance(dep, str):
        if not dep.strip():
            raise ConfigurationError("the dependency's name is empty: pass e.g. 'redis' or the Dependency")
    elif not isinstance(dep, Dependency):
        raise ConfigurationError(
            "the first argument must be a Dependency (from registry.dependency()) or its name "
            f"(e.g. 'redis'); got {dep!r}"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ConfigurationError("reason= is required: say what the user sees when this site degrades")
    return optional_seconds("timeout", timeout)


def _with_timeouts(is_failure: ErrorPredicate, timeout: float | None) -> ErrorPredicate:
    # timeout= asks for a bound, so its expiry (a TimeoutError) is a failure whatever on= lists.
    if timeout is None:
        return is_failure

    def failure(exc: BaseException) -> bool:
        return isinstance(exc, TimeoutError) or is_failure(exc)

    return failure


def site_of(fn: Callable[..., Any], registry: Registry | None = None) -> Site:
    """The :class:`Site` a decorated function registered (raises if it has none).

    A site declared by dependency name has one :class:`Site` per registry:
    ``registry`` picks it (default: the registry a call would use now).
    """
    declared = getattr(fn, "__degrade_late__", None)
    if isinstance(declared, _binding.Declared):
        return _binding.site_for(declared, registry)
    site = getattr(fn, "__degrade_site__", None)
    if not isinstance(site, Site):
        raise ConfigurationError(f"{fn!r} is not decorated with @fail_soft or @fail_loud")
    return site


@overload
def fail_soft(
    dep: Dependency | str,
    *,
    fallback: Callable[..., Awaitable[T]],
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> FailSoft[T]: ...
@overload
def fail_soft(
    dep: Dependency | str,
    *,
    fallback: Callable[..., T],
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> FailSoft[T]: ...
@overload
def fail_soft(
    dep: Dependency | str,
    *,
    fallback: T,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> FailSoft[T]: ...
def fail_soft(
    dep: Dependency | str,
    *,
    fallback: Any,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
) -> FailSoft[Any]:
    """Declare a FAIL-SOFT site: when ``dep`` fails or is down, return ``fallback``.

    Works on sync and async functions and keeps their signature for type checkers.

    Failure mode: FAIL-SOFT. While ``dep`` is down the function is not called and
    the fallback answers at once. A dependency error raised by the call (or the
    call outliving ``timeout``) counts as a failure on ``dep`` and the fallback
    answers. Other exceptions propagate unchanged and do not count.

    Args:
        dep: The dependency this call uses, or its name (bound at the first
            call to the app's dependency of that name; see the module docstring).
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
    timeout = _check_args(dep, timeout, reason)
    return FailSoft(dep, fallback, _with_timeouts(predicate(on), timeout), timeout, reason)


def fail_loud(
    dep: Dependency | str,
    *,
    on: OnErrors = None,
    timeout: float | None = None,
    reason: str,
    retry_after: int | None = None,
    hatch: EscapeHatch | str | None = None,
) -> FailLoud:
    """Declare a FAIL-LOUD site: when ``dep`` fails or is down, raise ``DependencyUnavailable``.

    Failure mode: FAIL-LOUD. While ``dep`` is down the function is not called and
    :class:`~degrade.DependencyUnavailable` is raised at once (503 with
    ``Retry-After`` through :func:`degrade.exception_handlers`). A dependency
    error raised by the call counts as a failure and is re-raised as
    ``DependencyUnavailable`` (the original as ``__cause__``). Other exceptions
    propagate unchanged and do not count.

    Args:
        dep: The dependency this call needs, or its name (bound at the first call).
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
        hatch: An :class:`~degrade.hatch.EscapeHatch` on the same dependency
            (when ``dep`` is a name, the hatch's name may be given instead).
            While an operator holds it open, the site answers with the hatch's
            fallback instead of raising, and each use is a security warning.
    """
    timeout = _check_args(dep, timeout, reason)
    if retry_after is not None:
        retry_after = whole_seconds("retry_after", retry_after)
    if isinstance(dep, str):
        # Bound at the first call: the hatch is then checked against the app's dependency.
        if hatch is not None and not (
            (isinstance(hatch, str) and hatch.strip())
            or (isinstance(hatch, EscapeHatch) and hatch.dependency.name == dep)
        ):
            raise ConfigurationError(
                f"hatch= takes the name of an escape hatch, or an EscapeHatch on {dep!r}; got {hatch!r}"
            )
    elif hatch is not None and (not isinstance(hatch, EscapeHatch) or hatch.dependency is not dep):
        raise ConfigurationError(
            f"hatch= takes an EscapeHatch declared on the same dependency ({dep.name!r}); got {hatch!r}"
        )
    return FailLoud(
        dep,
        is_failure=_with_timeouts(predicate(on), timeout),
        timeout=timeout,
        reason=reason,
        retry_after=retry_after,
        hatch=hatch,
    )
