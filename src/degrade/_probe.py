"""The probe: how a dependency that is down finds out its service is back.

While a :class:`~degrade.Dependency` is down (and not forced down), one
background task per dependency starts its check every ``recovery.interval``
seconds (start to start, jittered, held down longer while it flaps), each run bounded by
``recovery.timeout``; ``recovery.successes`` passes in a row close it. While
it is ok, :meth:`Probing.watch` runs the same check every ``watch_interval``
for a dependency no request touches. Without a running event loop no probe
starts and the dependency recovers by trial (see
:meth:`degrade.Dependency.admit`).

:class:`Probing` is that half of :class:`~degrade.Dependency`, which extends
it; the state it reads and the ``record_*`` methods it feeds are the
dependency's. It imports nothing of :mod:`degrade.dependency` (no import
cycle). The callable types a dependency takes (``Check``, ``Clock``,
``Sleep``, ``Spawn``) live here and are re-exported there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ._bounded import hard_timeout
from ._records import CheckResult

if TYPE_CHECKING:
    from .policies import Probe

__all__ = ["Check", "Clock", "Probing", "Sleep", "Spawn"]

Check = Callable[[], Awaitable[object]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class Probing:
    """The probe half of :class:`~degrade.Dependency`: the probe loop, the watch and one-off checks.

    Failure mode: the probe swallows the check's errors (they mean "still
    down") but never ``CancelledError``.
    """

    # Set by Dependency.__init__; declared here for the type checker.
    name: str
    check: Check | None
    recovery: Probe
    watch_interval: float | None
    is_down: bool
    last_error: str | None
    _forced: int
    _hold_until: float
    _probe: asyncio.Task[None] | None
    _spawn: Spawn | None
    _clock: Clock
    _sleep: Sleep
    _rng: Callable[[], float]

    if TYPE_CHECKING:  # the dependency's own, fed by the probe

        def record_failure(self, error: BaseException | None = None, *, reason: str = "traffic") -> None:
            """Count one failure (see :meth:`degrade.Dependency.record_failure`)."""

        def record_success(self, duration: float | None = None) -> None:
            """Count one success (see :meth:`degrade.Dependency.record_success`)."""

    def resume_probe(self) -> None:
        """Start the background probe if it is down, not forced, has a check and none runs yet.

        The registry's lifespan calls it for dependencies that went down before
        the event loop ran; a transition to down calls it too. Without a
        running loop it does nothing: recovery is then by trial (see
        :meth:`admit`).
        """
        if not self.is_down or self._forced or self.check is None:
            return
        if self._probe is not None and not self._probe.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (sync caller): recovery by trial, see admit()
        name = f"degrade.probe[{self.name}]"
        if self._spawn is not None:
            self._probe = self._spawn(self._probe_loop(), name)
        else:
            self._probe = loop.create_task(self._probe_loop(), name=name)

    def next_interval(self) -> float:
        """The next probe wait: ``recovery.interval`` jittered (``recovery.jitter``, +/-10% by default)."""
        return self.recovery.next_wait(self._rng)

    async def _probe_loop(self) -> None:
        streak = 0
        spent = 0.0  # how long the last check ran
        while self.is_down:
            # Probes start one interval apart, start to start: a check that ran
            # into its timeout (a blackholed service) is followed by the next one
            # at once rather than a whole interval later, so a service that came
            # back during a hung check is seen about ``timeout`` after, not
            # ``timeout + interval`` (1.3 s by default: over the 1 s recovery goal).
            wait = self.next_interval() - spent
            held = self._hold_until - self._clock()
            await self._sleep(max(wait, held, 0.0))  # a flapping dependency is held down longer
            if not self.is_down:
                return
            if self._forced:
                spent = 0.0
                continue
            needed = self.recovery.successes
            started = self._clock()
            if needed <= 1:
                await self.run_check(reason="probe")
                spent = self._clock() - started
                continue
            # Several successes in a row close it: only the last one feeds the state.
            result = await self._bounded_check()
            spent = self._clock() - started
            if result is None:
                streak += 1
                if streak >= needed:
                    self.record_success()
            else:
                streak = 0
                self.record_failure(result, reason="probe")

    async def _bounded_check(self) -> Exception | None:
        """Run the check once, bounded; None when it passed, else what it raised."""
        if self.check is None:  # pragma: no cover - probes run only with a check
            return None
        try:
            await hard_timeout(_call(self.check), self.recovery.timeout)
        except Exception as exc:  # a failed check is any exception; CancelledError passes
            return exc
        return None

    async def watch(self) -> None:
        """Run the check every ``watch_interval`` (jittered) while ok; the lifespan runs this.

        For a dependency that no request touches (a feature flag's service), so
        an outage is noticed without traffic. While down, the probe takes over.
        """
        if self.watch_interval is None:
            return
        while True:
            await self._sleep(self.watch_interval * (1.0 + self.recovery.jitter * (2.0 * self._rng() - 1.0)))
            if not self.is_down:
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
            down = self.is_down
            return CheckResult(ok=not down, latency=0.0, error=self.last_error if down else None)
        start = self._clock()
        try:
            await hard_timeout(_call(self.check), self.recovery.timeout)
        except Exception as exc:  # a failed check is any exception; CancelledError passes
            self.record_failure(exc, reason=reason)
            return CheckResult(ok=False, latency=self._clock() - start, error=type(exc).__name__)
        self.record_success()
        return CheckResult(ok=True, latency=self._clock() - start)


async def _call(check: Check) -> object:
    return await check()
