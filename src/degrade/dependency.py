"""A backing service and its health state.

A :class:`Dependency` is ``ok`` or ``down``. Every safety net consults it before
touching the service (a known outage costs a flag read, not a timeout) and feeds
it with what real traffic sees:

* ``failure_threshold`` consecutive failures move it to ``down``;
* while down, one background probe runs its ``check`` every
  ``recovery_interval`` (jittered by +/-10%), each run bounded by
  ``check_timeout``; the first success moves it back to ``ok``;
* a dependency without a check (or without a running event loop for its probe)
  recovers by trial instead: once per ``recovery_interval`` one real call is let
  through, and its success closes it.

Every transition is logged once, counted and (SEV-1/SEV-2) sent to Sentry by
:mod:`degrade.observe`; nothing is logged per request while it stays down.

The pieces: this module (the state machine: reading, feeding and following
the state, the transitions), ``_probe`` (the probe loop, the watch and one-off
checks, which :class:`Dependency` inherits), ``_records`` (:class:`Severity`,
:class:`Site`, :class:`CheckResult`) and ``_options`` (the pass-through
options and the trip and recovery policies they resolve to). Every name is
importable from here as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import random
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Literal

from . import _validate, observe
from ._classify import error_chain
from ._looplag import TimeoutExcuse
from ._options import DependencyOptions, resolve_policies
from ._probe import Check as Check  # noqa: PLC0414 - re-exported: importable here as before
from ._probe import Clock as Clock  # noqa: PLC0414
from ._probe import Probing
from ._probe import Sleep as Sleep  # noqa: PLC0414
from ._probe import Spawn as Spawn  # noqa: PLC0414
from ._records import CheckResult, Severity, Site
from .exceptions import ConfigurationError
from .policies import Consecutive, Probe, Trip

__all__ = ["CheckResult", "Dependency", "DependencyOptions", "Severity", "Site", "transitions"]

Listener = Callable[["Dependency"], object]

_transitions = 0


def transitions() -> int:
    """How many transitions any dependency of this process made (cached health reports compare it)."""
    return _transitions


#: Relative jitter of the probe interval: each wait is interval * (1 +/- JITTER).
JITTER = 0.1


class Dependency(Probing):
    """One backing service (database, cache, broker, ...) and its health state.

    Create it with :meth:`degrade.Registry.dependency`, not directly.

    Failure mode: none of its own; it is the switch that safety nets read. Its
    probe swallows the check's errors (they mean "still down") but never
    ``CancelledError``.
    """

    def __init__(
        self,
        name: str,
        *,
        severity: Severity,
        impact: str = "",
        runbook: str | None = None,
        check: Check | None = None,
        critical: bool | None = None,
        trip: Trip | None = None,
        recovery: Probe | None = None,
        retry_after: int = 5,
        watch_interval: float | None = None,
        failure_threshold: int | None = None,
        recovery_interval: float | None = None,
        check_timeout: float | None = None,
        spawn: Spawn | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError("a dependency needs a non-empty name, e.g. 'db' or 'redis'")
        if not isinstance(severity, Severity):
            raise ConfigurationError(
                f"severity must be a degrade.Severity (SEV1, SEV2 or SEV3); got {severity!r}"
            )
        trip, recovery = resolve_policies(trip, recovery, failure_threshold, recovery_interval, check_timeout)
        retry_after = _validate.whole_seconds("retry_after", retry_after)
        if check is not None and not callable(check):
            raise ConfigurationError(f"check must be an async callable taking no arguments; got {check!r}")
        self.name = name
        self.severity = severity
        self.impact = impact
        self.runbook = runbook
        self.check = check
        self.critical = severity == Severity.SEV1 if critical is None else critical
        #: How it trips (:class:`~degrade.policies.Consecutive` by default).
        self.trip = trip
        #: How it recovers (:class:`~degrade.policies.Probe` by default).
        self.recovery = recovery
        self._tracker = trip.tracker(clock)
        #: For safety nets: feed every success (the trip rule is a rate), not only the
        #: first after a failure; and pass each success's duration (a slow-call rule).
        self.counts_calls = self._tracker.counts_calls
        self.times_calls = self._tracker.times_calls
        if watch_interval is not None:
            _validate.seconds("watch_interval", watch_interval)
            if check is None:
                raise ConfigurationError(
                    "watch_interval needs a check: there is nothing to run while it is ok"
                )
        #: Seconds between checks while ok (None: only traffic and /health/deep notice an outage).
        self.watch_interval = None if watch_interval is None else float(watch_interval)
        self.retry_after = retry_after
        self.sites: list[Site] = []
        #: Components (an event publisher, a replica router's lag monitor) that the
        #: lifespan of the registry owning this dependency starts and stops.
        self.components: list[Any] = []
        #: Class name of the last failure seen, never its text (it may hold a DSN).
        self.last_error: str | None = None
        #: Its class chain when it wraps others (``"DBAPIError <- InvalidCatalogNameError"``), else None.
        self.last_error_chain: str | None = None
        self._spawn = spawn
        #: The dependency's clock (monotonic by default), for safety nets timing calls.
        self.clock = clock
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        #: True while degrade treats the service as unavailable (read it; transitions set it).
        self.is_down = False
        self._forced = 0
        #: Consecutive failures seen since the last success (read it; record_* set it).
        self.failures = 0
        #: Successes recorded so far.
        self.answered = 0
        #: Clock reading of the last success (vouches for timeouts on a late event loop).
        self.answered_at = -math.inf
        #: Failures not counted because their call started before the last recovery.
        self.stale_failures = 0
        self._excuse = TimeoutExcuse(name, clock)
        self._since = clock()
        #: Wall-clock time (``time.time()``) of the last transition, for health details.
        self.changed_at = time.time()
        self._next_trial = 0.0
        self._trial_at: float | None = None  # when the trial call in flight was let through
        self._probe: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], Listener | None]] = []
        self._down_future: asyncio.Future[None] | None = None
        #: Quick relapses in a row (down again within ``recovery.flap_window`` of recovering).
        self.flaps = 0
        self._recovered_at: float | None = None
        self._flap_from: float | None = None  # the last recovery a relapse is a flap against
        self._hold_until = 0.0
        # observe's bounded reports: per transition kind, when the next Sentry
        # event may go out and how many were held back meanwhile.
        self._report_due: dict[str, float] = {}
        self._report_held: dict[str, int] = {}
        self._report_held_since: dict[str, float] = {}
        observe.metrics.state(self)

    # -- reading the state ---------------------------------------------------

    @property
    def state(self) -> Literal["ok", "down"]:
        """``"ok"`` or ``"down"``."""
        return "down" if self.is_down else "ok"

    @property
    def timeouts_excused(self) -> int:
        """Timeouts not counted as failures because the event loop ran late (``degrade._looplag``)."""
        return self._excuse.count

    @property
    def forced(self) -> bool:
        """True while held down by :meth:`forced_down` (a simulated outage)."""
        return self._forced > 0

    @property
    def failure_threshold(self) -> int | None:
        """Failures in a row that open it, when ``trip`` is :class:`~degrade.policies.Consecutive`."""
        trip = self.trip
        return trip.failures if isinstance(trip, Consecutive) else None

    @property
    def recovery_interval(self) -> float:
        """Seconds between probes while down (``recovery.interval``)."""
        return self.recovery.interval

    @property
    def check_timeout(self) -> float:
        """Bound of one check run (``recovery.timeout``)."""
        return self.recovery.timeout

    def trip_figures(self) -> dict[str, Any]:
        """What the trip rule currently sees (calls, failure %, slow % for a rate), for health details."""
        return self._tracker.figures()

    @property
    def flapping(self) -> bool:
        """True while it relapses quickly after recovering (its recovery is damped)."""
        return self.flaps > 0

    @property
    def recovery_delay(self) -> float:
        """Seconds it is held down before its first probe after the current outage (0: not damped)."""
        return self.recovery.hold(self.flaps)

    @property
    def since(self) -> float:
        """Clock reading (monotonic by default) of the last transition."""
        return self._since

    def admit(self) -> bool:
        """May a call go to the service now?

        True while ok. While down: False, except that a dependency recovering
        by trial (no check, or no event loop for a probe) admits one call per
        ``recovery_interval``, and only one at a time (half-open): no other
        trial is admitted until that one's success or failure is recorded (or,
        should it never be, for ``2 x interval + timeout``).
        """
        if not self.is_down:
            return True
        if self._forced or (self._probe is not None and not self._probe.done()):
            return False
        now = self._clock()
        trial = self._trial_at
        if trial is not None and now - trial < 2 * self.recovery_interval + self.check_timeout:
            return False  # one trial at a time: the last one's outcome has not come back yet
        if now >= self._next_trial:
            self._next_trial = now + self.recovery_interval
            self._trial_at = now
            return True
        return False

    def add_site(
        self,
        name: str,
        mode: Literal["fail_soft", "fail_loud"],
        reason: str,
        *,
        fallback: str | None = None,
    ) -> Site:
        """Declare a call site's fail mode on this dependency, for the runbook and metrics.

        The decorators do this for you; safety nets that are objects (a cache,
        a limiter, a publisher) call it once. The same ``(name, mode)`` declared
        again returns the existing site (an app built twice shares it).
        """
        for site in self.sites:
            if site.name == name and site.mode == mode:
                return site
        site = Site(name=name, dependency_name=self.name, mode=mode, reason=reason, fallback=fallback)
        site._counter = observe.metrics.site_counter(site)
        self.sites.append(site)
        return site

    # -- following the state -------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(dependency)`` after every transition; returns the unsubscribe function.

        For safety nets that must act on a transition at once (the DB gate ends
        the work in flight on a database that went down). A bound method is
        held weakly, so a subscribed object can still be garbage-collected.

        Failure mode: an exception raised by a listener is logged
        (``dependency.listener_error``, class name only) and never stops the
        transition or the other listeners.
        """
        if not callable(listener):
            raise ConfigurationError(f"listener must be callable; got {listener!r}")
        ref: Callable[[], Listener | None]
        if inspect.ismethod(listener):
            ref = weakref.WeakMethod(listener)
        else:

            def ref() -> Listener:
                return listener

        self._listeners.append(ref)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(ref)

        return unsubscribe

    def went_down(self) -> asyncio.Future[None]:
        """A future of the running loop that completes when this dependency next goes down.

        Callers waiting on the service race their call against it, so work in
        flight is answered by its policy as soon as the outage is known instead
        of at its own timeout. One future is shared by every caller on a loop.
        Never cancel it; it is resolved (or replaced) by the transition.
        """
        loop = asyncio.get_running_loop()
        fut = self._down_future
        if fut is None or fut.done() or fut.get_loop() is not loop:
            fut = self._down_future = loop.create_future()
        return fut

    def _notify(self) -> None:
        global _transitions  # noqa: PLW0603 - one process-wide counter, read by the health cache
        _transitions += 1
        if self.is_down:
            fut, self._down_future = self._down_future, None
            if fut is not None and not fut.done():
                with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                    fut.set_result(None)
        for ref in list(self._listeners):
            listener = ref()
            if listener is None:
                with contextlib.suppress(ValueError):
                    self._listeners.remove(ref)
                continue
            try:
                listener(self)
            except Exception as exc:
                observe.logger.error(
                    "dependency.listener_error", dependency=self.name, error=type(exc).__name__
                )

    # -- feeding the state ---------------------------------------------------

    def record_failure(
        self, error: BaseException | None = None, *, reason: str = "traffic", started: float | None = None
    ) -> None:
        """Count one failure; the ``failure_threshold``-th in a row opens it.

        A timeout of traffic while this worker's event loop ran late (and the
        service still answered recently) is not counted: the worker was
        saturated, the service was not shown to fail (:attr:`timeouts_excused`).

        A call that ``started`` (on :attr:`clock`; :attr:`since` read when the
        call began will do, and costs no clock read) before the last recovery
        was in flight during the outage: its failure is old news, not counted
        (:attr:`stale_failures`), so it cannot knock a dependency that just
        recovered straight back down.
        """
        if started is not None and not self.is_down:
            recovered = self._recovered_at
            if recovered is not None and started < recovered:
                self.stale_failures += 1
                return
        if reason == "traffic" and error is not None and self._excuse(error, self.answered_at):
            return
        self.failures += 1
        self._trial_at = None
        if error is not None:
            self.last_error = type(error).__name__
            self.last_error_chain = error_chain(error)
        if self._tracker.failure() and not self.is_down:
            self._go_down(error, reason)

    def record_success(self, duration: float | None = None) -> None:
        """Count one success: reset the failure count and close it if it was down.

        ``duration`` (seconds the call took) feeds a slow-call rule
        (:class:`~degrade.policies.SlowCalls`), which may open it on successes.
        """
        self.failures = 0
        self.answered += 1
        self.answered_at = self._clock()
        if self._trial_at is not None:
            self._trial_at = None
        if self._tracker.success(duration) and not self.is_down:
            self._go_down(None, "slow")
            return
        if self.is_down and not self._forced:
            self._go_up()

    def mark_down(self, error: BaseException | None = None, *, reason: str = "marked") -> None:
        """Open it now, whatever the failure count (an operator or a safety net knows)."""
        self.failures = max(self.failures, self.failure_threshold or 1)
        if error is not None:
            self.last_error = type(error).__name__
            self.last_error_chain = error_chain(error)
        if not self.is_down:
            self._go_down(error, reason)

    @contextlib.contextmanager
    def forced_down(self) -> Iterator[Dependency]:
        """Hold it down in-process until the block exits (no network involved).

        While forced, neither probes nor successes close it. On exit it goes
        back up, unless it was already down before the block: then it stays
        down and its probe resumes. Used by the ``simulate_outage`` pytest
        fixture and by drills.
        """
        was_down = self.is_down
        self._forced += 1
        try:
            if not self.is_down:
                self.failures = max(self.failures, self.failure_threshold or 1)
                self._go_down(None, "simulated")
            yield self
        finally:
            self._forced -= 1
            if not self._forced and self.is_down:
                if was_down:
                    # It was really down before the simulation: stay down, let the probe decide.
                    self.resume_probe()
                else:
                    self.failures = 0
                    self._go_up()

    # -- transitions ---------------------------------------------------------

    def _go_down(self, error: BaseException | None, reason: str) -> None:
        now = self._clock()
        recovered = self._flap_from
        if recovered is not None and now - recovered < self.recovery.flap_window and not self._forced:
            self.flaps += 1
        else:
            self.flaps = 0
        self._hold_until = now + self.recovery.hold(self.flaps)
        self.is_down = True
        self._tracker.reset()
        self._since = now
        self.changed_at = time.time()
        self._next_trial = max(self._since + self.recovery_interval, self._hold_until)
        observe.dependency_down(self, error, reason)
        if not self._forced:
            self.resume_probe()
        self._notify()

    def _go_up(self) -> None:
        now = self._clock()
        down_for = now - self._since
        self.is_down = False
        self._tracker.reset()
        self._recovered_at = now
        recovery = self.recovery
        if down_for >= recovery.interval * (1.0 - recovery.jitter):
            self._flap_from = now
        else:
            # Closed sooner than any probe or trial could run: by a call already in flight when
            # it went down, which the service answered. A misjudged moment (``make chaos`` on a
            # saturated host: 11 of 13 false Redis outages lasted 1-95 ms), not an outage: it
            # neither counts as a flap nor opens a flap window, which had held later real
            # outages down 7 s, and once 30 s, past their recovery. (Counted as a relapse,
            # it raised the count by one; otherwise the count was reset to 0 on going down.)
            self.flaps = max(0, self.flaps - 1)
        self._since = now
        self.changed_at = time.time()
        observe.dependency_recovered(self, down_for)
        self._notify()

    # -- components (the probe, the watch and run_check: see degrade._probe) --

    def manage(self, component: Any) -> Any:
        """Have the lifespan of the registry that owns this dependency start and stop ``component``.

        For safety nets built on a dependency that run background work (the
        replica router's lag monitor): they need no reference to the registry.
        Returns ``component``. Failure mode: none here; see
        :meth:`degrade.Registry.manage`.
        """
        if component not in self.components:
            self.components.append(component)
        return component

    def __repr__(self) -> str:
        return f"<Dependency {self.name!r} {self.severity.label} {self.state}>"
