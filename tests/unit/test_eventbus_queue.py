"""The send queue on its own: no broker, no aio-pika; order, bounds, requeue, replay and its commit."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import degrade.eventbus
from degrade.eventbus import DiskSpool
from degrade.eventbus._event import Event
from degrade.eventbus._queue import SendQueue
from degrade.eventbus._report import Counts, Reporter

PACKAGE = Path(degrade.eventbus.__file__).parent
DRIVERS = {"aio_pika", "aiormq", "pamqp"}


def make_event(i: int) -> Event:
    return Event("rk", b"{}", f"m{i}", None, "application/json", 0.0, 0)


def make_queue(size: int = 10, spool: DiskSpool | None = None) -> SendQueue:
    counts = Counts("ex")
    reporter = Reporter(counts, log_interval=60, sentry_rate=0, clock=lambda: 0.0)
    return SendQueue(size=size, counts=counts, reporter=reporter, spool=spool, replay_batch=3)


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_the_queue_and_what_it_uses_import_no_driver() -> None:
    """The buffer, the events, the reporting and the spool import nothing of aio-pika, aiormq or pamqp."""
    for name in ("_queue.py", "_event.py", "_report.py", "spool.py", "_outage.py", "_result.py"):
        assert not imported(PACKAGE / name) & DRIVERS, name


def test_no_module_of_the_package_is_over_450_lines() -> None:
    """The split keeps every module readable."""
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 450, path.name


class TestSendQueue:
    def test_fifo_and_full(self) -> None:
        """Events come out in the order they went in; full() counts the buffer plus what is in flight."""
        queue = make_queue(size=3)
        for i in range(3):
            queue.put(make_event(i))
        assert queue.full()
        first = queue.take()
        assert first is not None
        queue.begin(first, now=1.0)
        assert queue.full()  # in flight still holds its place
        queue.settle(first, None)
        assert not queue.full()
        assert [queue.take().message_id for _ in range(2)] == ["m1", "m2"]  # type: ignore[union-attr]
        assert queue.take() is None
        assert queue.counts.confirmed == 1

    def test_numbering_and_oldest_in_flight(self) -> None:
        """Each event is numbered on its first send; the oldest unconfirmed one is found without a scan."""
        queue = make_queue()
        for i in range(3):
            queue.put(make_event(i))
        sent = [queue.take() for _ in range(3)]
        for t, event in enumerate(sent):
            assert event is not None
            queue.begin(event, now=float(t))
        assert [e.seq for e in sent if e is not None] == [1, 2, 3]
        assert queue.oldest_sent_at() == 0.0
        assert sent[0] is not None
        queue.settle(sent[0], None)
        assert queue.oldest_sent_at() == 1.0

    def test_requeue_puts_unconfirmed_events_back_in_order(self) -> None:
        """After a lost connection, unconfirmed events lead the buffer in their send order, marked resent."""
        queue = make_queue()
        for i in range(4):
            queue.put(make_event(i))
        for _ in range(3):
            event = queue.take()
            assert event is not None
            queue.begin(event, now=0.0)
        queue.requeue_in_flight()
        assert [(e.message_id, e.resend) for e in queue.buffer] == [
            ("m0", True),
            ("m1", True),
            ("m2", True),
            ("m3", False),
        ]
        event = queue.take()
        assert event is not None
        queue.begin(event, now=0.0)
        assert queue.counts.resent == 1
        assert event.seq == 1  # keeps its number

    def test_lost_events_are_reported_with_their_reason(self) -> None:
        """A settled loss is counted by reason, never silently."""
        queue = make_queue()
        queue.put(make_event(0))
        event = queue.take()
        assert event is not None
        queue.begin(event, now=0.0)
        queue.settle(event, "nacked")
        assert dict(queue.counts.lost) == {"nacked": 1}
        assert not queue.own_pending()

    async def test_put_wakes_one_idle_worker(self) -> None:
        """A waiting worker is woken by put(); wait_for_work() cancelled leaves nothing behind."""
        queue = make_queue()
        waiter = asyncio.ensure_future(queue.wait_for_work())
        await asyncio.sleep(0)
        queue.put(make_event(0))
        await asyncio.wait_for(waiter, 1.0)
        other = asyncio.ensure_future(queue.wait_for_work())
        await asyncio.sleep(0)
        other.cancel()
        await asyncio.gather(other, return_exceptions=True)
        assert all(f.done() for f in queue.idle)

    def test_spool_is_replayed_before_the_buffer_and_committed_per_batch(self, tmp_path: Path) -> None:
        """The spool's backlog (older) goes first; its cursor moves once a whole batch is settled."""
        spool = DiskSpool(tmp_path / "spool")
        spool.open()
        try:
            for i in range(4):
                assert spool.append(make_event(100 + i))
            queue = make_queue(spool=spool)
            queue.spool_open = queue.replay_ok = True
            queue.put(make_event(0))
            taken = []
            for _ in range(3):  # replay_batch=3
                event = queue.take()
                assert event is not None
                queue.begin(event, now=0.0)
                taken.append(event)
            assert [e.message_id for e in taken] == ["m100", "m101", "m102"]
            backlog = spool.backlog_bytes
            for event in taken[:2]:
                queue.settle(event, None)
            assert spool.backlog_bytes == backlog  # not committed: one event of the batch is pending
            queue.settle(taken[2], None)
            assert spool.backlog_bytes < backlog
            assert queue.counts.replayed == 3
            rest = [queue.take(), queue.take()]
            assert [e.message_id for e in rest if e is not None] == ["m103", "m0"]
            replayed, own = rest
            assert replayed is not None
            assert own is not None
            queue.begin(replayed, now=0.0)
            assert not queue.own_pending()  # the replayed m103 is the spool's to keep
            queue.begin(own, now=0.0)
            assert queue.own_pending()  # m0 is ours
        finally:
            spool.close()

    def test_requeue_lets_replayed_events_go_back_to_the_spool(self, tmp_path: Path) -> None:
        """A replayed event in flight at a connection loss is read again from the spool, not buffered."""
        spool = DiskSpool(tmp_path / "spool")
        spool.open()
        try:
            spool.append(make_event(100))
            queue = make_queue(spool=spool)
            queue.replay_ok = True
            event = queue.take()
            assert event is not None
            queue.begin(event, now=0.0)
            queue.requeue_in_flight()
            assert not queue.buffer
            again = queue.take()
            assert again is not None
            assert again.message_id == "m100"
        finally:
            spool.close()
