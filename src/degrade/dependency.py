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
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import inspect
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from . import observe
from ._bounded import hard_timeout
from .exceptions import ConfigurationError

if TYPE_CHECKING:
    from .hatch import EscapeHatch
    from .registry import Registry

__all__ = ["CheckResult", "Dependency", "Severity", "Site"]

Check = Callable[[], Awaitable[object]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Listener = Callable[["Dependency"], object]

#: Relative jitter of the probe interval: each wait is interval * (1 +/- JITTER).
JITTER = 0.1


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
    """A call site declared FAIL-SOFT or FAIL-LOUD on a dependency (for the runbook)."""

    name: str
    dependency: str
    mode: Literal["fail_soft", "fail_loud"]
    reason: str
    fallback: str | None = None
    #: Name of the escape hatch that may soften this (fail-loud) site.
    hatch: str | None = None
    #: How many calls this process answered degraded (fallback or refusal).
    degraded_calls: int = 0
    #: Calls shed for lack of *local* capacity, by reason (never a failure of the dependency).
    shed_calls: dict[str, int] = field(default_factory=dict)
    _counter: Any = field(default=None, repr=False)
    _shed_log_due: float = field(default=0.0, repr=False)
    _shed_logged: int = field(default=0, repr=False)

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


class Dependency:
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
        failure_threshold: int = 3,
        recovery_interval: float = 0.5,
        check_timeout: float = 0.8,
        retry_after: int = 5,
        watch_interval: float | None = None,
        registry: Registry | None = None,
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
        if (
            isinstance(failure_threshold, bool)
            or not isinstance(failure_threshold, int)
            or failure_threshold < 1
        ):
            raise ConfigurationError(f"failure_threshold must be an int >= 1; got {failure_threshold!r}")
        for label, value in (("recovery_interval", recovery_interval), ("check_timeout", check_timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigurationError(f"{label} must be a positive number of seconds; got {value!r}")
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigurationError(
                f"retry_after must be a whole number of seconds >= 0; got {retry_after!r}"
            )
        if check is not None and not callable(check):
            raise ConfigurationError(f"check must be an async callable taking no arguments; got {check!r}")
        self.name = name
        self.severity = severity
        self.impact = impact
        self.runbook = runbook
        self.check = check
        self.critical = severity == Severity.SEV1 if critical is None else critical
        self.failure_threshold = failure_threshold
        self.recovery_interval = float(recovery_interval)
        self.check_timeout = float(check_timeout)
        if watch_interval is not None:
            if (
                isinstance(watch_interval, bool)
                or not isinstance(watch_interval, int | float)
                or not watch_interval > 0
            ):
                raise ConfigurationError(
                    f"watch_interval must be a positive number of seconds or None; got {watch_interval!r}"
                )
            if check is None:
                raise ConfigurationError(
                    "watch_interval needs a check: there is nothing to run while it is ok"
                )
        #: Seconds between checks while ok (None: only traffic and /health/deep notice an outage).
        self.watch_interval = None if watch_interval is None else float(watch_interval)
        self.retry_after = retry_after
        self.sites: list[Site] = []
        #: Escape hatches that may soften this dependency's fail-loud sites.
        self.hatches: list[EscapeHatch] = []
        #: Class name of the last failure seen, never its text (it may hold a DSN).
        self.last_error: str | None = None
        self._registry = registry
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._down = False
        self._forced = 0
        self._failures = 0
        self._since = clock()
        #: Wall-clock time (``time.time()``) of the last transition, for health details.
        self.changed_at = time.time()
        self._next_trial = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], Listener | None]] = []
        self._down_future: asyncio.Future[None] | None = None
        observe.metrics.state(self)

    # -- reading the state ---------------------------------------------------

    @property
    def state(self) -> Literal["ok", "down"]:
        """``"ok"`` or ``"down"``."""
        return "down" if self._down else "ok"

    @property
    def is_down(self) -> bool:
        """True while degrade treats the service as unavailable."""
        return self._down

    @property
    def forced(self) -> bool:
        """True while held down by :meth:`forced_down` (a simulated outage)."""
        return self._forced > 0

    @property
    def failures(self) -> int:
        """Consecutive failures seen since the last success."""
        return self._failures

    @property
    def since(self) -> float:
        """Clock reading (monotonic by default) of the last transition."""
        return self._since

    def admit(self) -> bool:
        """May a call go to the service now?

        True while ok. While down: False, except that a dependency recovering
        by trial (no check, or no event loop for a probe) admits one call per
        ``recovery_interval``.
        """
        if not self._down:
            return True
        if self._forced or (self._probe is not None and not self._probe.done()):
            return False
        now = self._clock()
        if now >= self._next_trial:
            self._next_trial = now + self.recovery_interval
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
        site = Site(name=name, dependency=self.name, mode=mode, reason=reason, fallback=fallback)
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
        if self._down:
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

    def record_failure(self, error: BaseException | None = None, *, reason: str = "traffic") -> None:
        """Count one failure; the ``failure_threshold``-th in a row opens it."""
        self._failures += 1
        if error is not None:
            self.last_error = type(error).__name__
        if not self._down and self._failures >= self.failure_threshold:
            self._go_down(error, reason)

    def record_success(self) -> None:
        """Count one success: reset the failure count and close it if it was down."""
        self._failures = 0
        if self._down and not self._forced:
            self._go_up()

    def mark_down(self, error: BaseException | None = None, *, reason: str = "marked") -> None:
        """Open it now, whatever the failure count (an operator or a safety net knows)."""
        self._failures = max(self._failures, self.failure_threshold)
        if error is not None:
            self.last_error = type(error).__name__
        if not self._down:
            self._go_down(error, reason)

    @contextlib.contextmanager
    def forced_down(self) -> Iterator[Dependency]:
        """Hold it down in-process until the block exits (no network involved).

        While forced, neither probes nor successes close it. On exit it goes
        back up, unless it was already down before the block: then it stays
        down and its probe resumes. Used by the ``simulate_outage`` pytest
        fixture and by drills.
        """
        was_down = self._down
        self._forced += 1
        try:
            if not self._down:
                self._failures = max(self._failures, self.failure_threshold)
                self._go_down(None, "simulated")
            yield self
        finally:
            self._forced -= 1
            if not self._forced and self._down:
                if was_down:
                    # It was really down before the simulation: stay down, let the probe decide.
                    self._start_probe()
                else:
                    self._failures = 0
                    self._go_up()

    # -- transitions ---------------------------------------------------------

    def _go_down(self, error: BaseException | None, reason: str) -> None:
        self._down = True
        self._since = self._clock()
        self.changed_at = time.time()
        self._next_trial = self._since + self.recovery_interval
        observe.dependency_down(self, error, reason)
        if not self._forced:
            self._start_probe()
        self._notify()

    def _go_up(self) -> None:
        now = self._clock()
        down_for = now - self._since
        self._down = False
        self._since = now
        self.changed_at = time.time()
        observe.dependency_recovered(self, down_for)
        self._notify()

    def _start_probe(self) -> None:
        if self.check is None or (self._probe is not None and not self._probe.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (sync caller): recovery by trial, see admit()
        self._probe = loop.create_task(self._probe_loop(), name=f"degrade.probe[{self.name}]")
        if self._registry is not None:
            self._registry._track(self._probe)

    def next_interval(self) -> float:
        """The next probe wait: ``recovery_interval`` jittered by +/-10%."""
        return self.recovery_interval * (1.0 + JITTER * (2.0 * self._rng() - 1.0))

    async def _probe_loop(self) -> None:
        while self._down:
            await self._sleep(self.next_interval())
            if not self._down:
                return
            if self._forced:
                continue
            await self.run_check(reason="probe")

    async def watch(self) -> None:
        """Run the check every ``watch_interval`` (jittered) while ok; the lifespan runs this.

        For a dependency that no request touches (a feature flag's service), so
        an outage is noticed without traffic. While down, the probe takes over.
        """
        if self.watch_interval is None:
            return
        while True:
            await self._sleep(self.watch_interval * (1.0 + JITTER * (2.0 * self._rng() - 1.0)))
            if not self._down:
                await self.run_check(reason="watch")

    async def stop_probe(self) -> None:
        """Cancel the background probe, if one runs, and wait for it."""
        probe, self._probe = self._probe, None
        if probe is None or probe.done():
            return
        probe.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probe
        # Re-raise if *we* were cancelled while waiting (suppress() above would
        # otherwise swallow our own cancellation).
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise asyncio.CancelledError

    async def run_check(self, *, reason: str = "check") -> CheckResult:
        """Run the check once, bounded by ``check_timeout``, and feed the result.

        A dependency without a check reports its current state. The check's
        exceptions (anything but ``CancelledError``) count as a failed check.
        """
        if self.check is None:
            return CheckResult(ok=not self._down, latency=0.0, error=self.last_error if self._down else None)
        start = self._clock()
        try:
            await hard_timeout(_call(self.check), self.check_timeout)
        except Exception as exc:  # a failed check is any exception; CancelledError passes
            self.record_failure(exc, reason=reason)
            return CheckResult(ok=False, latency=self._clock() - start, error=type(exc).__name__)
        self.record_success()
        return CheckResult(ok=True, latency=self._clock() - start)

    def __repr__(self) -> str:
        return f"<Dependency {self.name!r} {self.severity.label} {self.state}>"


async def _call(check: Check) -> object:
    return await check()
