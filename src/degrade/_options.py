"""What a dependency is made with: its pass-through options and its trip and recovery policies.

:class:`DependencyOptions` lists the options of :class:`~degrade.Dependency`
that :meth:`degrade.Registry.dependency` passes through.
:func:`resolve_policies` turns the constructor's ``trip=`` / ``recovery=``
policy objects, or the older keyword shorthands (``failure_threshold=``,
``recovery_interval=``, ``check_timeout=``), into the two policies, and
refuses a mix of both. :mod:`degrade.dependency` re-exports
``DependencyOptions``.
"""

from __future__ import annotations

from typing import TypedDict

from . import _validate
from ._probe import Check
from .exceptions import ConfigurationError
from .policies import Consecutive, Probe, Trip

__all__ = ["DependencyOptions", "resolve_policies"]


class DependencyOptions(TypedDict, total=False):
    """The options of :class:`Dependency` that :meth:`degrade.Registry.dependency` passes through."""

    impact: str
    runbook: str | None
    check: Check | None
    critical: bool | None
    trip: Trip | None
    recovery: Probe | None
    retry_after: int
    watch_interval: float | None
    failure_threshold: int | None
    recovery_interval: float | None
    check_timeout: float | None


def resolve_policies(
    trip: Trip | None,
    recovery: Probe | None,
    failure_threshold: int | None,
    recovery_interval: float | None,
    check_timeout: float | None,
) -> tuple[Trip, Probe]:
    """The trip and recovery policies, from the policy objects or the older keyword shorthands."""
    if trip is not None and failure_threshold is not None:
        raise ConfigurationError("pass trip=Consecutive(n) or failure_threshold=n, not both")
    if recovery is not None and (recovery_interval is not None or check_timeout is not None):
        raise ConfigurationError(
            "pass recovery=Probe(interval=..., timeout=...) or recovery_interval=/check_timeout=, not both"
        )
    if trip is None:
        trip = Consecutive(
            3 if failure_threshold is None else _validate.count("failure_threshold", failure_threshold)
        )
    elif not isinstance(trip, Trip):
        raise ConfigurationError(f"trip must be a degrade.policies.Trip such as Consecutive(3); got {trip!r}")
    if recovery is None:
        recovery = Probe(
            interval=0.5
            if recovery_interval is None
            else _validate.seconds("recovery_interval", recovery_interval),
            timeout=0.8 if check_timeout is None else _validate.seconds("check_timeout", check_timeout),
        )
    elif not isinstance(recovery, Probe):
        raise ConfigurationError(f"recovery must be a degrade.policies.Probe; got {recovery!r}")
    return trip, recovery
