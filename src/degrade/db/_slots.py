"""Fair, shedding admission to a connection pool: the DB gate's line of waiting requests.

Why the gate keeps its own line instead of waiting in SQLAlchemy's pool
(measured under ``wrk -c50`` on a healthy Postgres, pool 5 + 10, before this
module existed: p50 6.9 ms but p99 972-984 ms and 125-174 503s in 8 s):

* the zero-I/O checkout takes an idle connection straight from the pool's
  queue, ahead of requests already waiting on it, and ``asyncio.Queue`` puts a
  woken getter that finds the item gone back at the *end* of its waiters: some
  requests were passed over again and again until their 1 s ran out;
* a wait for a slot that every other request is legitimately using said
  nothing about Postgres, yet it counted as a failure: the dependency went
  down and up dozens of times on a healthy database.

:class:`Slots` hands slots out strictly in arrival order (a released slot goes
to the oldest waiter, never to a newcomer) and sheds early: with ``hold`` the
measured time one request keeps a slot (an EWMA), a pool of ``capacity`` slots
serves about ``capacity / hold`` requests a second, so a newcomer behind
``queued`` waiters would wait about ``(queued + 1) * hold / capacity``. When
that exceeds its budget it is refused at once instead of holding memory for
the whole budget and failing anyway; on each release, waiters at the tail
whose expected wait no longer fits their remaining budget are refused too.
Until the first hold is measured only the budget bounds a wait.

Nothing here touches a socket or the dependency's state: a refusal is
shedding (saturation), answered 503 and counted by the caller.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

__all__ = ["GRANTED", "Slots"]

#: The outcome of a wait that got a slot; any other outcome is a refusal reason.
GRANTED = "granted"


class _Waiter:
    __slots__ = ("deadline", "future", "live")

    def __init__(self, future: asyncio.Future[str], deadline: float) -> None:
        self.future = future
        self.deadline = deadline
        self.live = True


class Slots:
    """At most ``capacity`` holders at once, served first come, first served.

    Failure mode: none of its own. :meth:`take` returns :data:`GRANTED` or the
    reason it was refused (``"queue"``: the line is longer than the pool can
    serve within the budget; ``"pool-saturated"``: the budget ran out in line;
    or whatever :meth:`refuse_all` was given). Cancellation propagates, and a
    slot granted to a cancelled waiter is passed on.
    """

    #: Weight of the newest hold time in the running average.
    ALPHA = 0.2

    def __init__(self, capacity: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.queued = 0
        #: Running average of how long one request holds a slot, seconds (None until measured).
        self.hold: float | None = None
        self.last_release = clock()
        self._clock = clock
        self._waiters: deque[_Waiter] = deque()

    def would_shed(self, budget: float) -> bool:
        """True when a newcomer could not get a slot within ``budget`` at the measured rate."""
        hold = self.hold
        return (
            hold is not None
            and self.in_use >= self.capacity
            and (self.queued + 1) * hold > self.capacity * budget
        )

    def try_take(self) -> bool:
        """Take a free slot without waiting; False when one is not free or others wait first."""
        if self.in_use < self.capacity and not self.queued:
            self.in_use += 1
            return True
        return False

    async def take(self, budget: float) -> str:
        """Wait in line for a slot for at most ``budget`` seconds; :data:`GRANTED` or a refusal reason."""
        if self.try_take():
            return GRANTED
        if self.would_shed(budget):
            return "queue"
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self._clock() + budget)
        self._waiters.append(waiter)
        self.queued += 1
        timer = loop.call_later(budget, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.result() == GRANTED:
                self.release(None)  # granted just as we were cancelled: pass it on
            elif waiter.live:
                waiter.live = False
                self.queued -= 1
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: _Waiter) -> None:
        self._settle(waiter, "pool-saturated")

    def _settle(self, waiter: _Waiter, outcome: str) -> None:
        if waiter.live:
            waiter.live = False
            self.queued -= 1
            if not waiter.future.done():
                waiter.future.set_result(outcome)

    def release(self, held_for: float | None) -> None:
        """Give a slot back (``held_for``: how long it was held, for the rate); the oldest waiter gets it."""
        now = self._clock()
        if held_for is not None:
            hold = self.hold
            self.hold = held_for if hold is None else hold + self.ALPHA * (held_for - hold)
        self.last_release = now
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.live and not waiter.future.done():
                self._settle(waiter, GRANTED)
                self._trim(now)
                return
            if waiter.live:  # its future was cancelled: count it out
                waiter.live = False
                self.queued -= 1
        self.in_use -= 1

    def _trim(self, now: float) -> None:
        """Refuse tail waiters whose expected wait no longer fits their remaining budget."""
        hold = self.hold
        if hold is None:
            return
        waiters = self._waiters
        position = self.queued
        while waiters and position > 0:
            waiter = waiters[-1]
            if not waiter.live:
                waiters.pop()
                continue
            if position * hold / self.capacity <= waiter.deadline - now:
                return
            waiters.pop()
            self._settle(waiter, "queue")
            position -= 1

    def refuse_all(self, outcome: str) -> int:
        """Answer every waiter with ``outcome`` now (the dependency went down); returns how many."""
        refused = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.live:
                self._settle(waiter, outcome)
                refused += 1
        return refused

    def stalled(self, window: float) -> bool:
        """True when every slot is taken and none was given back for ``window`` seconds."""
        return self.in_use >= self.capacity and self._clock() - self.last_release >= window

    def __repr__(self) -> str:
        hold = "?" if self.hold is None else f"{self.hold * 1000:.1f}ms"
        return f"<Slots {self.in_use}/{self.capacity} queued={self.queued} hold={hold}>"
