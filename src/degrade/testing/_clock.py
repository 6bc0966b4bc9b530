"""A fake clock for tests: time moves only when the test, or a fake sleep, moves it.

Everything in degrade that waits or measures time takes it injected: a
``clock`` (a callable returning seconds, :func:`time.monotonic` by default) and,
where it waits, a ``sleep`` (an async callable, :func:`asyncio.sleep` by
default). :class:`FakeClock` is both at once: pass the object as the clock and
its bound :meth:`FakeClock.sleep` as the sleep,
``Registry(clock=fake, sleep=fake.sleep)``, and a 30 s recovery interval takes
no real time. Design decisions:

* **sleep() advances the clock at once, then yields to the event loop once**
  (``asyncio.sleep(0)``), so the other tasks run, and see the new time, before
  the sleeper goes on. Rejected: a sleep that waits until the test releases it
  (the step-by-step fakes in degrade's own unit tests). It pins down exactly
  which wait the code under test is in, but every test must then drive each
  wait by hand; keep such a fake for the tests that need that precision.
* **Concurrent sleeps add up.** Each sleep advances the clock by its own
  duration, so two tasks sleeping 5 s together move it 10 s: the fake clock
  follows the sum of the sleeps, not a timeline. Exact for one sleeping loop
  (a dependency's probe, a retry loop); for several, drive time with
  :meth:`FakeClock.advance` instead.
* **It starts at 1000.0, not 0.** A monotonic clock is never 0 in production;
  starting elsewhere keeps code that reads 0.0 as "never" from passing a test
  only by luck.
* **Recorded sleeps are bounded**: the last :data:`MAX_RECORDED` durations, so a
  loop that sleeps forever on a fake clock cannot grow the record without end.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from .. import _validate
from ..exceptions import ConfigurationError

__all__ = ["MAX_RECORDED", "FakeClock"]

#: Most sleep durations a :class:`FakeClock` remembers (the latest ones).
MAX_RECORDED = 1000


def _reading(label: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{label} must be a finite number of seconds; got {value!r}")
    return float(value)


class FakeClock:
    """A clock (monotonic or wall, in seconds) that moves only when told, and a sleep that moves it.

    ``fake()`` returns the current time; :meth:`advance` moves it forward;
    ``await fake.sleep(s)`` moves it forward by ``s`` and lets the event loop
    run once. Pass it where degrade takes a clock and a sleep::

        fake = FakeClock()
        registry = Registry(clock=fake, sleep=fake.sleep)

    ``now`` may also be set directly (``fake.now = 1_700_000_000.0``), also
    backwards, to model a wall clock that steps.

    Failure mode: it never blocks and never raises on its own. A non-finite
    time, or a negative :meth:`advance`, raises
    :class:`~degrade.ConfigurationError`. A loop that sleeps on it without
    end (a dependency's probe whose check keeps failing) does not hang the
    test, but it spins: each turn yields once and moves the clock, so fake
    time races ahead while the test awaits anything real. Let such a loop
    finish (make its check pass) or stop it before measuring time.

    Args:
        start: The time it reads at first, in seconds.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self._now = _reading("start", start)
        self._sleeps: deque[float] = deque(maxlen=MAX_RECORDED)

    def __call__(self) -> float:
        """The current fake time, in seconds."""
        return self._now

    @property
    def now(self) -> float:
        """The current fake time, in seconds; settable (any finite number, also backwards)."""
        return self._now

    @now.setter
    def now(self, value: float) -> None:
        self._now = _reading("now", value)

    @property
    def sleeps(self) -> list[float]:
        """The durations :meth:`sleep` was called with, oldest first (the last ``MAX_RECORDED``)."""
        return list(self._sleeps)

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (>= 0); nothing else runs.

        Raises:
            ConfigurationError: a negative or non-finite number.
        """
        self._now += _validate.seconds("advance", seconds, allow_zero=True)

    async def sleep(self, seconds: float) -> None:
        """Move the clock forward by ``seconds``, then let the event loop run once.

        A drop-in for :func:`asyncio.sleep`: a duration of 0 or less (as in
        ``sleep(deadline - now)`` past the deadline) moves nothing and just yields.

        Raises:
            ConfigurationError: a non-finite number (a fake sleep cannot last forever).
        """
        duration = _reading("sleep", seconds)
        self._sleeps.append(duration)
        if duration > 0:
            self._now += duration
        await asyncio.sleep(0)

    def __repr__(self) -> str:
        return f"<FakeClock now={self._now!r}>"
