"""Escape hatches: an operator switch that softens a FAIL-LOUD site during an outage.

Some fail-loud decisions are safety trades: uploads wait for the virus scanner
because unscanned files must not be distributed. When the scanner is down for
long, an operator may decide that uploads matter more, for a while. The runbook
calls this ``CLAMAV_REQUIRED=false``. An :class:`EscapeHatch` makes that switch
a first-class, visible thing:

* declared in code on the dependency (``registry.escape_hatch(...)``) and given
  to the fail-loud site (``@fail_loud(dep, hatch=hatch, ...)``);
* closed by default; opened from the environment at start-up or at run time
  (``hatch.open(by="ops: INC-1234")``), closed again with ``hatch.close()``;
* while open and the dependency fails, the site answers with the hatch's
  fallback instead of a 503, and **every use is reported** as a security
  warning: the first at once, then a summary with the count every
  ``log_interval`` seconds (bounded volume), in structlog and Sentry
  (tag ``degrade.security=escape_hatch``);
* ``/health/deep`` details and the generated runbook show it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Literal

from . import observe
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .dependency import Dependency

__all__ = ["EscapeHatch"]

#: Environment values that open a hatch whose variable names a requirement ("X_REQUIRED=false").
OPENING_VALUES = frozenset({"0", "false", "no", "off"})


class EscapeHatch:
    """An operator switch that lets a FAIL-LOUD site answer with a fallback.

    Create it with :meth:`degrade.Registry.escape_hatch`.

    Failure mode: while closed it does nothing (the site stays FAIL-LOUD). While
    open, the site becomes FAIL-SOFT with ``fallback`` and each use is a
    security warning (volume bounded to one summary per ``log_interval``).

    Args:
        name: The switch's name, as operators know it (e.g. ``"CLAMAV_REQUIRED"``).
        dependency: The dependency whose outage it lets through.
        reason: What the trade costs (security, correctness), for logs and runbook.
        fallback: The value the site returns while open, or a callable given the
            site's arguments (sync, or async for async sites).
        env: An environment variable read once at construction; the hatch starts
            open when its value (lower-cased) is one of ``env_opens``.
        env_opens: Values of ``env`` that open it; by default those that switch a
            requirement off: ``0``, ``false``, ``no``, ``off``.
        log_interval: Seconds between use summaries while open.
    """

    def __init__(
        self,
        name: str,
        *,
        dependency: Dependency,
        reason: str,
        fallback: Any,
        env: str | None = None,
        env_opens: Collection[str] = OPENING_VALUES,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError("an escape hatch needs a non-empty name, e.g. 'CLAMAV_REQUIRED'")
        if not isinstance(reason, str) or not reason.strip():
            raise ConfigurationError("reason= is required: say what opening this hatch trades away")
        if not log_interval > 0:
            raise ConfigurationError(f"log_interval must be > 0 seconds; got {log_interval!r}")
        self.name = name
        self.dependency = dependency
        self.reason = reason
        self.fallback = fallback
        self.env = env
        self.log_interval = float(log_interval)
        self._clock = clock
        #: Uses since the hatch was last opened.
        self.uses = 0
        self._unreported = 0
        self._next_report = 0.0
        self.opened_by: str | None = None
        self.is_open = False
        if env is not None and os.environ.get(env, "").strip().lower() in {v.lower() for v in env_opens}:
            self.open(by=f"environment: {env}")

    def open(self, *, by: str = "operator") -> None:
        """Open the hatch: the site answers with the fallback while its dependency fails."""
        if self.is_open:
            return
        self.is_open = True
        self.opened_by = by
        self.uses = self._unreported = 0
        self._next_report = 0.0
        self._signal("opened", "warning", by=by)

    def close(self) -> None:
        """Close the hatch: the site is FAIL-LOUD again."""
        if not self.is_open:
            return
        self._flush()
        self.is_open = False
        self._signal("closed", "info", uses=self.uses)

    def used(self, site: str) -> None:
        """Count one use by ``site``; report at once or in the next summary."""
        self.uses += 1
        self._unreported += 1
        now = self._clock()
        if now >= self._next_report:
            self._next_report = now + self.log_interval
            self._flush(site=site)

    def _flush(self, site: str | None = None) -> None:
        if not self._unreported:
            return
        count, self._unreported = self._unreported, 0
        self._signal("used", "warning", uses=count, total=self.uses, site=site)

    def _signal(self, transition: str, level: Literal["warning", "info"], **fields: Any) -> None:
        observe.security_event(
            f"degrade.escape_hatch.{transition}",
            kind="escape_hatch",
            dependency=self.dependency.name,
            transition=transition,
            message=f"degrade: escape hatch {self.name} {transition}",
            fingerprint=["degrade", "escape_hatch", self.name, transition],
            extras={"reason": self.reason, **{k: v for k, v in fields.items() if v is not None}},
            tags={"degrade.hatch": self.name},
            log_level=level,
            hatch=self.name,
            reason=self.reason,
            **fields,
        )

    def describe(self) -> dict[str, Any]:
        """State for health details: name, open, uses, who opened it."""
        return {"name": self.name, "open": self.is_open, "uses": self.uses, "opened_by": self.opened_by}

    def __repr__(self) -> str:
        return (
            f"<EscapeHatch {self.name!r} on {self.dependency.name!r} {'open' if self.is_open else 'closed'}>"
        )
