"""The DB gate's line: first come, first served, early shedding, no slot lost to a cancellation."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("asyncpg")

from degrade.db._slots import GRANTED, Slots


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TestSlots:
    async def test_free_slots_are_taken_without_waiting(self) -> None:
        """Up to capacity, try_take succeeds; then it fails and nobody barges."""
        slots = Slots(2)
        assert slots.try_take()
        assert slots.try_take()
        assert not slots.try_take()
        assert slots.in_use == 2

    async def test_served_in_arrival_order(self) -> None:
        """A released slot goes to the oldest waiter, never to a newcomer."""
        slots = Slots(1)
        assert slots.try_take()
        order: list[int] = []

        async def wait(i: int) -> None:
            assert await slots.take(5.0) == GRANTED
            order.append(i)
            await asyncio.sleep(0)
            slots.release(0.01)

        waiters = [asyncio.ensure_future(wait(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert slots.queued == 5
        assert not slots.try_take()  # a newcomer may not pass the line
        slots.release(0.01)
        await asyncio.gather(*waiters)
        assert order == [0, 1, 2, 3, 4]
        assert slots.in_use == 0
        assert slots.queued == 0

    async def test_budget_runs_out_in_line(self) -> None:
        """A waiter not served within its budget is refused as pool-saturated."""
        slots = Slots(1)
        assert slots.try_take()
        assert await slots.take(0.05) == "pool-saturated"
        assert slots.queued == 0
        assert slots.in_use == 1

    async def test_early_shedding_once_the_hold_time_is_known(self) -> None:
        """100 ms holds, 2 slots, 0.5 s: 10 could be served, 7 are planned (headroom): the 8th is refused."""
        clock = FakeClock()
        slots = Slots(2, clock=clock)
        assert not slots.would_shed(0.5)  # nothing measured yet: only the budget bounds a wait
        slots.try_take()
        slots.release(0.1)
        assert slots.hold == pytest.approx(0.1)
        slots.try_take()
        slots.try_take()
        waiters = [asyncio.ensure_future(slots.take(0.5)) for _ in range(6)]
        await asyncio.sleep(0)
        assert not slots.would_shed(0.5)  # the 7th fits: 20/s x 0.5 s x 0.7 = 7
        waiters.append(asyncio.ensure_future(slots.take(0.5)))
        await asyncio.sleep(0)
        assert slots.would_shed(0.5)
        assert await slots.take(0.5) == "queue"
        slots.refuse_all("down")
        assert set(await asyncio.gather(*waiters)) == {"down"}

    async def test_hold_starts_at_the_hand_over_not_at_the_wake_up(self) -> None:
        """A granted waiter learns when its slot was handed over: the wake-up after it is part of the hold.

        On a busy loop the woken request runs milliseconds after the release
        that granted it; measured from then, holds looked short, the rate high,
        and the line admitted more than the pool served in time.
        """
        clock = FakeClock()
        slots = Slots(1, clock=clock)
        assert await slots.take_at(1.0) == (GRANTED, clock.now)
        waiter = asyncio.ensure_future(slots.take_at(1.0))
        await asyncio.sleep(0)
        clock.now += 0.2
        handed_over = clock.now
        slots.release(0.2)
        clock.now += 0.05  # the loop is busy: the waiter resumes later
        assert await waiter == (GRANTED, handed_over)
        slots.release(clock.now - handed_over)
        assert slots.hold == pytest.approx(0.2 + 0.2 * (0.05 - 0.2))  # running average of 0.2 and 0.05
        assert slots.in_use == 0

    async def test_tail_trimmed_when_it_can_no_longer_be_served(self) -> None:
        """On a release, tail waiters whose expected wait exceeds their remaining budget are refused."""
        clock = FakeClock()
        slots = Slots(1, clock=clock)
        slots.try_take()
        waiters = [asyncio.ensure_future(slots.take(1.0)) for _ in range(5)]
        await asyncio.sleep(0)
        clock.now += 0.5
        slots.release(0.3)  # one served; 4 left, 0.5 s left each, 0.3 s per hold: 1 fits
        await asyncio.sleep(0)
        outcomes = [w.result() for w in waiters if w.done()]
        assert outcomes.count(GRANTED) == 1
        assert outcomes.count("queue") == 3
        assert slots.queued == 1
        slots.refuse_all("down")
        await asyncio.gather(*waiters)

    async def test_a_cancelled_waiter_passes_its_slot_on(self) -> None:
        """Cancelled in line: it leaves the line; granted just before: the slot goes to the next."""
        slots = Slots(1)
        slots.try_take()
        first = asyncio.ensure_future(slots.take(5.0))
        second = asyncio.ensure_future(slots.take(5.0))
        await asyncio.sleep(0)
        slots.release(0.01)  # granted to first...
        first.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == GRANTED
        assert slots.in_use == 1
        assert slots.queued == 0

    async def test_stalled(self) -> None:
        """Stalled: every slot held and none given back for the window."""
        clock = FakeClock()
        slots = Slots(1, clock=clock)
        slots.try_take()
        assert not slots.stalled(1.0)
        clock.now += 1.5
        assert slots.stalled(1.0)
        slots.release(1.5)
        assert not slots.stalled(1.0)

    async def test_a_failed_checkout_is_not_progress(self) -> None:
        """Slots given back by checkouts that failed (a silent server) do not hide the stall."""
        clock = FakeClock()
        slots = Slots(2, clock=clock)
        slots.try_take()  # a query that hangs on the silent server
        clock.now += 0.3
        for _ in range(5):
            assert slots.try_take()  # a newcomer's connect or BEGIN...
            clock.now += 0.1
            slots.release(None)  # ...times out: the slot comes back having served nobody
        slots.try_take()
        assert slots.stalled(0.5)

    async def test_a_pause_that_stretches_holds_does_not_shed_a_healthy_line(self) -> None:
        """Counted releases keep the rate when a GC pause inflates the average hold."""
        clock = FakeClock()
        slots = Slots(10, clock=clock)
        for _ in range(10):
            slots.try_take()
        for _ in range(500):  # a busy second: 500 releases of 20 ms holds
            clock.now += 0.002
            slots.release(0.02)
            slots.try_take()
        for _ in range(10):  # a 150 ms pause stretches the next ten holds
            slots.release(0.15)
            slots.try_take()
        assert slots.hold is not None
        assert slots.hold > 0.1  # the average jumped...
        assert slots.rate() is not None
        assert slots.rate() >= 400  # ...the counted rate did not
        waiters = [asyncio.ensure_future(slots.take(1.0)) for _ in range(200)]
        await asyncio.sleep(0)
        assert not slots.would_shed(1.0)
        slots.refuse_all("down")
        await asyncio.gather(*waiters)
