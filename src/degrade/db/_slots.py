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
to the oldest waiter, never to a newcomer) and sheds early: at ``rate``
requests a second, a newcomer behind ``queued`` waiters would wait about
``(queued + 1) / rate``. When that exceeds its budget it is refused at once
instead of holding memory for the whole budget and failing anyway; on each
release, waiters at the tail whose expected wait no longer fits their
remaining budget are refused too. ``rate`` is the larger of the releases
counted over the last second and ``capacity / hold`` (``hold``, the running
average of how long a request keeps a slot). The first version used
``capacity / hold`` alone: under ``wrk -c200`` on 2 shared cores a GC pause
stretched a dozen holds at once, the average jumped, and the tail of a healthy
line was refused (482 shed in 4 s); the counted releases do not move with a
pause. A hold runs from the slot's hand-over (:meth:`Slots.take_at`) to its
release: timed from the woken request's resumption, it left out the wake-up
(milliseconds on a busy loop), the rate came out high, and ~1 % of the 503s of
an overloaded line came only at the end of the budget; hence also the gap
between :attr:`Slots.HEADROOM` and :attr:`Slots.TRIM`. Until the first hold is
measured only the budget bounds a wait.

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
    __slots__ = ("deadline", "future", "granted_at", "live")

    def __init__(self, future: asyncio.Future[str], deadline: float) -> None:
        self.future = future
        self.deadline = deadline
        self.live = True
        self.granted_at = 0.0


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
    #: Seconds over which releases are counted (in ``BUCKETS`` slices).
    RATE_WINDOW = 1.0
    BUCKETS = 10
    #: Share of a budget the line is planned to fill when a newcomer is admitted: what
    #: the pool serves within the rest varies (GC pauses, the loop's own load), and a
    #: waiter refused late costs what it waited; one refused at once costs nothing.
    HEADROOM = 0.7
    #: Share of a waiter's *remaining* budget its expected wait may fill before it is
    #: refused from the tail. Looser than :attr:`HEADROOM` (hysteresis): a waiter
    #: admitted with room to spare is not refused late for a passing dip of the rate.
    TRIM = 0.85

    def __init__(self, capacity: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.in_use = 0
        self.queued = 0
        #: Running average of how long one request holds a slot, seconds (None until measured).
        self.hold: float | None = None
        self.last_release = clock()
        self._clock = clock
        self._waiters: deque[_Waiter] = deque()
        self._slice = self.RATE_WINDOW / self.BUCKETS
        self._ring = [0] * self.BUCKETS
        self._released = 0  # releases within the window
        self._slot = int(clock() / self._slice)
        self._counting_since: float | None = None  # first counted release (the window fills from it)

    def _count_release(self, now: float) -> None:
        if self._counting_since is None:
            self._counting_since = now
        self._advance(now)
        self._ring[self._slot % self.BUCKETS] += 1
        self._released += 1

    def _advance(self, now: float) -> None:
        """Expire the slices that slid out of the window."""
        slot = int(now / self._slice)
        gap = slot - self._slot
        if gap:
            ring, n = self._ring, self.BUCKETS
            if gap >= n:
                for i in range(n):
                    ring[i] = 0
                self._released = 0
                self._counting_since = now  # idle for a whole window: start counting afresh
            else:
                for step in range(1, gap + 1):
                    i = (self._slot + step) % n
                    self._released -= ring[i]
                    ring[i] = 0
            self._slot = slot

    def rate(self) -> float | None:
        """Requests a second the pool serves, as measured (None until a hold is measured).

        The larger of two estimates: slots released over the last second (the
        real service rate while the pool is saturated; robust to a GC pause that
        stretches a few holds) and ``capacity / hold`` (the estimate while demand,
        not the pool, limits the releases).
        """
        hold = self.hold
        since = self._counting_since
        if hold is None or since is None:
            return None
        by_hold = self.capacity / hold if hold > 0 else float("inf")
        self._advance(self._clock())
        # Until a whole window has passed, count over the time that has (at least half of it).
        span = min(self.RATE_WINDOW, max(self._clock() - since, self.RATE_WINDOW / 2))
        return max(by_hold, self._released / span)

    def would_shed(self, budget: float) -> bool:
        """True when a newcomer could not get a slot within ``budget`` at the measured rate."""
        if self.in_use < self.capacity:
            return False
        rate = self.rate()
        return rate is not None and (self.queued + 1) > rate * budget * self.HEADROOM

    def try_take(self) -> bool:
        """Take a free slot without waiting; False when one is not free or others wait first."""
        if self.in_use < self.capacity and not self.queued:
            self.in_use += 1
            return True
        return False

    async def take(self, budget: float) -> str:
        """Wait in line for a slot for at most ``budget`` seconds; :data:`GRANTED` or a refusal reason."""
        outcome, _ = await self.take_at(budget)
        return outcome

    async def take_at(self, budget: float) -> tuple[str, float]:
        """Like :meth:`take`, with the clock time the slot was handed over (the start of its hold).

        The hold to give :meth:`release` runs from that moment, not from when
        the waiting task resumed: on a busy event loop the wake-up itself takes
        milliseconds, during which the slot serves nobody else.
        """
        if self.try_take():
            return GRANTED, self._clock()
        if self.would_shed(budget):
            return "queue", 0.0
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), self._clock() + budget)
        self._waiters.append(waiter)
        self.queued += 1
        timer = loop.call_later(budget, self._expire, waiter)
        try:
            return await waiter.future, waiter.granted_at
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
        """Give a slot back; the oldest waiter gets it.

        ``held_for``: seconds from the slot's hand-over (:meth:`take_at`) to now,
        for the rate; None when the slot served no request (a failed checkout).
        """
        now = self._clock()
        if held_for is not None:
            hold = self.hold
            self.hold = held_for if hold is None else hold + self.ALPHA * (held_for - hold)
            self._count_release(now)
            # Only a slot that served a request is progress: one given back by a failed
            # checkout (a connect or BEGIN that timed out on a silent server) is not, and
            # counting it hid a stalled pool from :meth:`stalled` for as long as the
            # outage lasted (``make chaos``: ``db`` went down at +4.96 s, by its probe).
            self.last_release = now
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.live and not waiter.future.done():
                waiter.granted_at = now
                self._settle(waiter, GRANTED)
                self._trim(now)
                return
            if waiter.live:  # its future was cancelled: count it out
                waiter.live = False
                self.queued -= 1
        self.in_use -= 1

    def _trim(self, now: float) -> None:
        """Refuse tail waiters whose expected wait no longer fits their remaining budget."""
        rate = self.rate()
        if rate is None:
            return
        waiters = self._waiters
        position = self.queued
        while waiters and position > 0:
            waiter = waiters[-1]
            if not waiter.live:
                waiters.pop()
                continue
            if position <= rate * (waiter.deadline - now) * self.TRIM:
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
        """True when every slot is taken and none came back from serving a request for ``window`` seconds."""
        return self.in_use >= self.capacity and self._clock() - self.last_release >= window

    def __repr__(self) -> str:
        hold = "?" if self.hold is None else f"{self.hold * 1000:.1f}ms"
        return f"<Slots {self.in_use}/{self.capacity} queued={self.queued} hold={hold}>"
