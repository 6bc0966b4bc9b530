"""The small values of a dependency: its severity, its declared call sites, a check's outcome.

:class:`Severity` says how bad an outage is, :class:`Site` is a call site
declared FAIL-SOFT or FAIL-LOUD on a dependency (with its degraded and shed
counts, for the runbook and metrics) and :class:`CheckResult` is what one
bounded check run found. :mod:`degrade.dependency` re-exports all three, so
they are imported from there (or from :mod:`degrade`) as before.
"""

from __future__ import annotations

import enum
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from . import observe

__all__ = ["CheckResult", "Severity", "Site"]


class Severity(enum.IntEnum):
    """How bad it is when a dependency is down; SEV1 is the worst.

    By default a SEV1 dependency is *critical*: while it is down ``/health/deep``
    answers 503.
    """

    SEV1 = 1
    SEV2 = 2
    SEV3 = 3

    @property
    def label(self) -> str:
        """The runbook's spelling, e.g. ``"SEV-1"``."""
        return f"SEV-{self.value}"


@dataclass(eq=False)
class Site:
    """A call site declared FAIL-SOFT or FAIL-LOUD on a dependency (for the runbook).

    ``dependency_name`` is the name of the dependency the site is declared on
    (the ``dependency`` label of its metrics). ``.dependency`` still returns
    that name, with a :class:`DeprecationWarning`: in 0.3 it becomes the
    :class:`~degrade.Dependency` itself, as on the cache, the limiter, the
    hatch and the publisher.
    """

    name: str
    dependency_name: str
    mode: Literal["fail_soft", "fail_loud"]
    reason: str
    fallback: str | None = None
    #: Name of the escape hatch that may soften this (fail-loud) site.
    hatch: str | None = None
    #: How many calls this process answered degraded (fallback or refusal).
    degraded_calls: int = 0
    #: Calls shed for lack of *local* capacity, by reason (never a failure of the dependency).
    shed_calls: dict[str, int] = field(default_factory=dict)
    #: Unexpected errors (bugs, not outages) this site answered by its policy; in health details.
    unexpected_errors: int = 0
    _counter: Any = field(default=None, repr=False)
    _shed_log_due: float = field(default=0.0, repr=False)
    _shed_logged: int = field(default=0, repr=False)

    @property
    def dependency(self) -> str:
        """Deprecated: the dependency's name; use :attr:`dependency_name`.

        In 0.3 ``.dependency`` becomes the :class:`~degrade.Dependency`, as everywhere else.
        """
        warnings.warn(
            "Site.dependency is deprecated; use Site.dependency_name "
            "(in 0.3 .dependency becomes the Dependency)",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.dependency_name

    def count(self) -> None:
        """Count one degraded call (fallback returned or DependencyUnavailable raised)."""
        self.degraded_calls += 1
        if self._counter is not None:
            self._counter.inc()

    def shed(self, reason: str) -> None:
        """Count one call shed for lack of local capacity (saturation, not an outage).

        ``reason`` names the capacity that ran out (``"pool-saturated"``,
        ``"queue"``, ``"abandoned-cap"``, ``"max-pending"``, ``"buffer-full"``...).
        The caller answers by its policy (503, fallback, memory); the
        dependency's state is not touched. Exported as
        ``degrade_shed_total{dependency, site, reason}`` and in
        ``/health/deep`` details; logged at most once per
        :data:`degrade.observe.SHED_LOG_INTERVAL` per site, never sent to Sentry.
        """
        self.shed_calls[reason] = self.shed_calls.get(reason, 0) + 1
        observe.shed_reported(self, reason)

    @property
    def shed_total(self) -> int:
        """All calls shed at this site, whatever the reason."""
        return sum(self.shed_calls.values())


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one bounded check run."""

    ok: bool
    latency: float
    error: str | None = None  # the exception's class name; never its text
