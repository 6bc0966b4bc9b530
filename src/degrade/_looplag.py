"""How late the event loop runs: a timeout on a busy loop is evidence about us, not the service.

Under ``make chaos``'s 200 clients on 2 CPUs, callbacks ran hundreds of
milliseconds late, and healthy services were marked down: a Redis reply or a
replica's ``BEGIN`` that arrived in time waited in the loop's ready queue while
the call's timer fired first (0.25 s and 0.5 s bounds measured, in effect, how
busy the worker was). DESIGN.md's principle says saturation is never an
outage; a worker too busy to read its sockets is saturation of the purest kind.

:class:`LoopLag` measures it directly: a timer due every ``INTERVAL`` notes how
late it actually ran (a loop that runs callbacks on time has it run within a
millisecond). :func:`excuses` answers the question
:meth:`degrade.Dependency.record_failure` asks of a timeout: did the loop run
at least ``threshold`` late within the last ``window`` seconds? When it did,
and the dependency still answered other calls recently, the timeout is
counted as shed (``loop-lag``), not as a failure. The second condition keeps a
real outage under load from hiding behind the lag: a service that stopped
answering altogether has no recent success to vouch for it, and its timeouts
count again.

Cost: 20 timer callbacks a second per loop while a :class:`~degrade.Registry`
runs (started by its lifespan, or by the first timeout that asks); nothing at
import time.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import deque
from collections.abc import Callable

from .observe import logger

__all__ = ["LoopLag", "TimeoutExcuse", "excuses", "is_timeout", "monitor"]


#: Links of an error's cause chain looked at by :func:`is_timeout`.
MAX_CHAIN = 4


def is_timeout(error: BaseException | None) -> bool:
    """True for a timeout of any driver (builtin/asyncio, redis-py, SQLAlchemy's pool): by class name.

    The error's causes count too (at most :data:`MAX_CHAIN` links): a driver
    that reports a connect which timed out as its ``ConnectionError``, raised
    from the ``TimeoutError`` (redis-py's connect under a connection storm),
    timed out all the same.
    """
    for _ in range(MAX_CHAIN + 1):
        if error is None:
            return False
        if any(cls.__name__ == "TimeoutError" for cls in type(error).__mro__):
            return True
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return False


class LoopLag:
    """One event loop's lateness, sampled every :attr:`INTERVAL` seconds.

    Failure mode: none of its own; a stopped monitor (or one whose loop
    closed) reports only what it sampled.
    """

    #: Seconds between samples.
    INTERVAL = 0.05
    #: Samples kept (about 5 s of history).
    KEEP = 100

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # Weakly: the monitors are keyed weakly by their loop, which a strong reference here
        # would keep alive forever.
        self._loop = weakref.ref(loop)
        #: (loop time of the sample, seconds it ran late)
        self.samples: deque[tuple[float, float]] = deque(maxlen=self.KEEP)
        self._due = 0.0
        # Weakly too: a timer handle refers to its loop; the loop's own timer heap keeps it alive.
        self._handle_ref: weakref.ref[asyncio.TimerHandle] | None = None

    @property
    def _handle(self) -> asyncio.TimerHandle | None:
        ref = self._handle_ref
        return None if ref is None else ref()

    @_handle.setter
    def _handle(self, handle: asyncio.TimerHandle | None) -> None:
        self._handle_ref = None if handle is None else weakref.ref(handle)

    @property
    def running(self) -> bool:
        """True while a sample is scheduled."""
        handle = self._handle
        return handle is not None and not handle.cancelled()

    def start(self) -> None:
        """Start sampling (idempotent)."""
        loop = self._loop()
        if not self.running and loop is not None and not loop.is_closed():
            self._due = loop.time() + self.INTERVAL
            self._handle = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        """Stop sampling (idempotent); the samples stay."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.cancel()

    def _tick(self) -> None:
        loop = self._loop()
        if loop is None:  # pragma: no cover - a collected loop runs no callbacks
            self._handle = None
            return
        now = loop.time()
        self.samples.append((now, max(0.0, now - self._due)))
        self._due = now + self.INTERVAL
        self._handle = loop.call_at(self._due, self._tick)

    def worst(self, window: float) -> float:
        """The most the loop ran late within the last ``window`` seconds, this very moment included.

        A tick that is overdue now (the loop is busy running something else)
        counts as late by as much as it is overdue.
        """
        loop = self._loop()
        if loop is None:
            return 0.0
        now = loop.time()
        worst = max(0.0, now - self._due) if self.running else 0.0
        since = now - window
        for at, late in reversed(self.samples):
            if at < since:
                break
            worst = max(worst, late)
        return worst


_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopLag] = weakref.WeakKeyDictionary()


def monitor(loop: asyncio.AbstractEventLoop | None = None, *, start: bool = True) -> LoopLag | None:
    """The running (or given) loop's monitor, started unless ``start=False``; None outside a loop."""
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
    lag = _monitors.get(loop)
    if lag is None:
        lag = _monitors[loop] = LoopLag(loop)
    if start:
        lag.start()
    return lag


def excuses(error: BaseException | None, *, threshold: float, window: float) -> bool:
    """True when ``error`` is a timeout and this loop ran >= ``threshold`` late within ``window`` seconds.

    Starts the loop's monitor if it was not running (that first timeout is
    not excused: there is no history to judge it by).
    """
    if not is_timeout(error):
        return False
    lag = monitor(start=False)
    if lag is None:
        return False
    if not lag.running:
        lag.start()
        return False
    return lag.worst(window) >= threshold


class TimeoutExcuse:
    """One dependency's rule for timeouts on a late loop (see the module docstring).

    A timeout is excused when the loop ran at least :attr:`THRESHOLD` seconds
    late within the last :attr:`WINDOW` seconds and the dependency answered a
    call within the last :attr:`VOUCH` seconds (``answered_at``, the clock
    reading of its last success). A dependency that never answered, or stopped
    answering for :attr:`VOUCH` seconds, gets no excuse: under a real outage on
    a busy worker its timeouts count again at most :attr:`VOUCH` seconds after
    its last answer, about when a call started after the outage reaches a 1 s
    bound. (It used to date an answer from the first timeout that noticed the
    success count move, up to a bound later: under ``make chaos`` a blackholed
    primary was excused until ~2.4 s after it went silent.)

    Failure mode: none of its own; counts what it excused and logs it at most
    once per :attr:`LOG_INTERVAL` seconds (``dependency.timeout_excused``).
    """

    #: Seconds late the loop must have run for a timeout to be excused.
    THRESHOLD = 0.1
    #: Seconds of the loop's history looked at.
    WINDOW = 1.0
    #: Seconds since the dependency last answered within which its timeouts may be excused: a
    #: healthy service under load answers many calls a second, a silent one none.
    VOUCH = 1.0
    LOG_INTERVAL = 10.0

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self._clock = clock
        #: Timeouts excused so far.
        self.count = 0
        self._log_due = -math.inf

    def __call__(self, error: BaseException, answered_at: float) -> bool:
        """True (and counted) when ``error`` is a timeout to excuse (``answered_at``: the last success)."""
        if not is_timeout(error):
            return False
        now = self._clock()
        if now - answered_at > self.VOUCH:
            return False
        if not excuses(error, threshold=self.THRESHOLD, window=self.WINDOW):
            return False
        self.count += 1
        if now >= self._log_due:
            self._log_due = now + self.LOG_INTERVAL
            logger.warning(
                "dependency.timeout_excused",
                dependency=self.name,
                error=type(error).__name__,
                excused=self.count,
                detail="the event loop ran late: saturation of this worker, not an outage",
            )
        return True
