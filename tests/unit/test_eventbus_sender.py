"""The sender over a fake broker (its ``connect`` seam): reconnect, backoff, bounds, churn, settling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from structlog.testing import capture_logs

from degrade.eventbus import EventPublisher
from degrade.eventbus._event import Event
from degrade.eventbus._queue import SendQueue
from degrade.eventbus._report import Counts, Reporter
from degrade.eventbus._sender import Sender

from ..support import eventually

URL = "amqp://guest:secret-pw@127.0.0.1:1/"


class FakeLink:
    """One fake connection: acks, nacks, returns or stalls as its broker says."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.lost: asyncio.Future[None] | None = None
        self.sent: list[str] = []
        self.aborted = False
        self.closed = False

    def watch(self) -> asyncio.Future[None]:
        self.lost = asyncio.get_running_loop().create_future()
        if self.broker.drop_at_once:
            self.lost.set_result(None)
        return self.lost

    def unwatch(self) -> None:
        if self.lost is not None and not self.lost.done():
            self.lost.cancel()

    async def send(self, event: Event) -> str | None:
        self.sent.append(event.message_id)
        answer = self.broker.answer(event)
        if answer == "stall":
            await asyncio.get_running_loop().create_future()  # never resolved: a stalled broker
        return None if answer == "ack" else answer

    def drop(self) -> None:
        """The broker closes the connection."""
        assert self.lost is not None
        if not self.lost.done():
            self.lost.set_result(None)

    def abort(self) -> None:
        self.aborted = True

    async def close(self) -> None:
        self.closed = True


class FakeBroker:
    """A broker behind the sender's ``connect`` seam: ``mode`` is up, refuse or blackhole."""

    def __init__(self, mode: str = "up") -> None:
        self.mode = mode
        self.attempts = 0
        self.links: list[FakeLink] = []
        self.answer: Callable[[Event], str] = lambda event: "ack"
        self.drop_at_once = False
        self.pending = 0  # blackholed attempts still waiting (they must be cancelled by the bound)

    async def connect(self) -> FakeLink:
        self.attempts += 1
        if self.mode == "refuse":
            raise ConnectionRefusedError(111, "refused")
        if self.mode == "blackhole":
            self.pending += 1
            try:
                await asyncio.sleep(3600)
            finally:
                self.pending -= 1
        if self.mode == "bad-exchange":
            raise RuntimeError("a set-up error that is not an outage")
        link = FakeLink(self)
        self.links.append(link)
        return link


class Hooks:
    """Records what the sender reports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        #: (clock time of the report, the ``since`` it gave) for each failure
        self.silences: list[tuple[float, float]] = []
        self.due: float | None = None
        self.checked = 0

    def attempt_failed(self, error: BaseException, *, since: float) -> None:
        self.calls.append(("attempt_failed", type(error).__name__))
        self.silences.append((time.monotonic(), since))

    def connection_lost(self, error: BaseException, *, since: float) -> None:
        self.calls.append(("connection_lost", type(error).__name__))
        self.silences.append((time.monotonic(), since))

    def setup_failed(self, error: BaseException) -> None:
        self.calls.append(("setup_failed", type(error).__name__))

    def connected(self, attempts: int) -> None:
        self.calls.append(("connected", str(attempts)))

    def deadline(self) -> float | None:
        return self.due

    def check(self) -> None:
        self.checked += 1

    async def hold(self) -> None:
        return None


def make_event(i: int) -> Event:
    return Event("rk", b"{}", f"m{i}", None, "application/json", 0.0, 0)


def make_sender(broker: FakeBroker, **kwargs: Any) -> tuple[Sender, SendQueue, Hooks]:
    counts = Counts("ex")
    queue = SendQueue(
        size=100, counts=counts, reporter=Reporter(counts, log_interval=60, sentry_rate=0, clock=lambda: 0.0)
    )
    hooks = Hooks()
    options: dict[str, Any] = {
        "exchange": "ex",
        "connect_timeout": 0.05,
        "confirm_timeout": 0.08,
        "backoff_initial": 0.01,
        "backoff_max": 0.02,
        "max_in_flight": 4,
        "rng": lambda: 0.0,
    }
    options.update(kwargs)
    sender = Sender(queue, broker.connect, hooks, **options)
    return sender, queue, hooks


async def stop(sender: Sender) -> None:
    sender.closing = True
    await sender.stop_workers()
    await sender.stop()
    await sender.wait_closers()


class TestReconnect:
    async def test_refused_attempts_back_off_then_connect(self) -> None:
        """Each refused attempt is reported; waits double up to backoff_max; the connect reports the count."""
        broker = FakeBroker("refuse")
        delays: list[float] = []

        async def sleep(delay: float) -> None:
            delays.append(delay)
            if len(delays) == 5:
                broker.mode = "up"
            await asyncio.sleep(0)

        sender, _, hooks = make_sender(broker, backoff_initial=0.1, backoff_max=0.4, sleep=sleep)
        sender.start()
        await eventually(lambda: sender.connected)
        assert delays == [0.1, 0.2, 0.4, 0.4, 0.4]
        assert hooks.calls == [("attempt_failed", "ConnectionRefusedError")] * 5 + [("connected", "6")]
        assert sender.attempts == 0
        await stop(sender)

    async def test_a_silent_broker_is_bounded_by_connect_timeout(self) -> None:
        """Blackholed: every attempt ends at connect_timeout as a TimeoutError, and none lingers."""
        broker = FakeBroker("blackhole")
        sender, _, hooks = make_sender(broker, connect_timeout=0.03)
        sender.start()
        await eventually(lambda: len(hooks.calls) >= 3, within=2.0)
        assert set(hooks.calls) == {("attempt_failed", "TimeoutError")}
        assert broker.pending <= 1  # only the attempt running now
        await stop(sender)
        assert broker.pending == 0

    async def test_cancelled_connect_is_not_retried(self) -> None:
        """Stopping the sender mid-attempt cancels it: CancelledError is never retried."""
        broker = FakeBroker("blackhole")
        sender, _, hooks = make_sender(broker, connect_timeout=10.0)
        sender.start()
        await eventually(lambda: broker.pending == 1)
        await stop(sender)
        assert (broker.attempts, broker.pending, hooks.calls) == (1, 0, [])

    async def test_a_set_up_error_is_reported_and_retried_after_backoff_max(self) -> None:
        """An error that is not a connection error goes to setup_failed and is logged, not retried at once."""
        broker = FakeBroker("bad-exchange")
        sender, _, hooks = make_sender(broker, backoff_max=0.05)
        with capture_logs() as logs:
            sender.start()
            await eventually(lambda: len(hooks.calls) >= 2)
            await stop(sender)
        assert set(hooks.calls) == {("setup_failed", "RuntimeError")}
        errors = [e for e in logs if e["event"] == "eventbus.sender_error"]
        assert errors
        assert errors[0]["error"] == "RuntimeError"
        assert errors[0]["retry_in_s"] == 0.05
        assert "a set-up error" not in repr(logs)  # class names, never the text

    async def test_a_wait_that_crosses_the_deadline_is_cut_there(self) -> None:
        """The backoff wait stops at the hooks' deadline, calls check(), then sleeps the rest."""
        broker = FakeBroker("refuse")
        now = [0.0]
        delays: list[float] = []
        gate = asyncio.Event()

        async def sleep(delay: float) -> None:
            delays.append(delay)
            now[0] += delay
            if len(delays) >= 3:
                await gate.wait()

        sender, _, hooks = make_sender(
            broker, backoff_initial=1.0, backoff_max=1.0, clock=lambda: now[0], sleep=sleep
        )
        hooks.due = 0.25
        sender.start()
        await eventually(lambda: len(delays) >= 2)
        assert delays[:2] == [0.25, 0.75]
        assert hooks.checked >= 1
        await stop(sender)


class TestConnection:
    async def test_events_are_sent_and_confirmed(self) -> None:
        """Buffered events go out in order and are counted as confirmed."""
        broker = FakeBroker()
        sender, queue, _ = make_sender(broker)
        for i in range(10):
            queue.put(make_event(i))
        sender.start()
        await eventually(lambda: queue.counts.confirmed == 10)
        assert broker.links[0].sent == [f"m{i}" for i in range(10)]
        await stop(sender)

    async def test_nacked_and_returned_events_are_settled_not_a_connection_loss(self) -> None:
        """A nack or a return is a lost event with its reason; the connection stays."""
        broker = FakeBroker()
        answers = iter(["nacked", "unroutable", "ack"])
        broker.answer = lambda event: next(answers)
        sender, queue, hooks = make_sender(broker)
        for i in range(3):
            queue.put(make_event(i))
        sender.start()
        await eventually(lambda: queue.counts.confirmed == 1)
        assert dict(queue.counts.lost) == {"nacked": 1, "unroutable": 1}
        assert [c[0] for c in hooks.calls] == ["connected"]
        await stop(sender)

    async def test_a_stalled_broker_is_cut_at_confirm_timeout_and_events_resent(self) -> None:
        """No confirm within confirm_timeout: the link is cut, the loss reported, the events sent again."""
        broker = FakeBroker()
        broker.answer = lambda event: "stall"
        sender, queue, hooks = make_sender(broker, confirm_timeout=0.08)
        for i in range(3):
            queue.put(make_event(i))
        sender.start()
        await eventually(lambda: ("connection_lost", "TimeoutError") in hooks.calls, within=2.0)
        broker.answer = lambda event: "ack"
        await eventually(lambda: queue.counts.confirmed == 3, within=2.0)
        first, last = broker.links[0], broker.links[-1]
        await eventually(lambda: first.aborted and first.closed)
        assert sorted(last.sent) == ["m0", "m1", "m2"]
        assert queue.counts.resent >= 3
        await stop(sender)

    async def test_connections_that_never_confirm_are_spaced_by_the_backoff(self) -> None:
        """A broker that accepts and drops at once (churn) is not reconnected to in a tight loop."""
        broker = FakeBroker()
        broker.drop_at_once = True
        delays: list[float] = []

        async def sleep(delay: float) -> None:
            delays.append(delay)
            await asyncio.sleep(0)

        sender, _, hooks = make_sender(broker, backoff_initial=0.1, backoff_max=0.4, sleep=sleep)
        sender.start()
        await eventually(lambda: len(delays) >= 4)
        await stop(sender)
        assert delays[:4] == [0.1, 0.2, 0.4, 0.4]
        assert ("connection_lost", "ConnectionLost") in hooks.calls

    async def test_stop_requeues_what_was_in_flight(self) -> None:
        """Stopping the workers puts unconfirmed events back at the front of the buffer, in order."""
        broker = FakeBroker()
        broker.answer = lambda event: "stall"
        sender, queue, _ = make_sender(broker, confirm_timeout=30.0)
        for i in range(6):
            queue.put(make_event(i))
        sender.start()
        await eventually(lambda: len(queue.in_flight) == 4)
        await stop(sender)
        assert [e.message_id for e in queue.buffer] == [f"m{i}" for i in range(6)]
        assert [e.resend for e in queue.buffer] == [True] * 4 + [False] * 2


class TestSilentSince:
    """What the sender reports as the moment the broker stopped answering (``since``)."""

    async def test_a_timed_out_attempt_is_silent_since_it_began(self) -> None:
        """Blackholed: the failure is reported at connect_timeout, silent since the attempt started."""
        broker = FakeBroker("blackhole")
        sender, _, hooks = make_sender(broker, connect_timeout=0.2)
        started = time.monotonic()
        sender.start()
        await eventually(lambda: len(hooks.silences) >= 1, within=3.0)
        await stop(sender)
        reported, since = hooks.silences[0]
        assert started <= since < started + 0.1
        assert reported - since >= 0.19  # noticed connect_timeout later, counted from the start

    async def test_a_stall_is_silent_since_the_oldest_unconfirmed_send(self) -> None:
        """No confirm: the loss is reported after confirm_timeout, silent since the first send."""
        broker = FakeBroker()
        broker.answer = lambda event: "stall"
        sender, queue, hooks = make_sender(broker, confirm_timeout=0.2)
        started = time.monotonic()
        sender.start()
        await eventually(lambda: sender.connected)
        sent = time.monotonic()
        queue.put(make_event(0))
        await eventually(lambda: len(hooks.silences) >= 1, within=3.0)
        await stop(sender)
        reported, since = hooks.silences[0]
        assert ("connection_lost", "TimeoutError") in hooks.calls
        assert started <= sent <= since < sent + 0.1
        assert reported - since > 0.2  # the watchdog's bound, then its tick

    async def test_a_loss_with_nothing_in_flight_is_silent_since_the_loss(self) -> None:
        """The broker closes an idle connection: silent from that moment, not from the last send."""
        broker = FakeBroker()
        sender, queue, hooks = make_sender(broker)
        queue.put(make_event(0))
        sender.start()
        await eventually(lambda: queue.counts.confirmed == 1)
        await asyncio.sleep(0.1)
        broker.mode = "refuse"
        broker.links[0].drop()
        await eventually(lambda: len(hooks.silences) >= 1)
        await stop(sender)
        reported, since = hooks.silences[0]
        assert hooks.calls[1] == ("connection_lost", "ConnectionLost")
        assert 0 <= reported - since < 0.05


class TestPublisherSeam:
    async def test_the_publisher_runs_on_an_injected_connect(self) -> None:
        """EventPublisher's sender can be given a fake connect: no socket, same behaviour."""
        broker = FakeBroker()
        bus = EventPublisher(URL, "ex", backoff_initial=0.01, backoff_max=0.02)
        bus._sender.connect = broker.connect
        async with bus:
            await bus.publish("rk", {"i": 1}, message_id="a")
            await eventually(lambda: bus.stats().confirmed == 1)
            assert bus.connected
        assert broker.links[0].sent == ["a"]
        assert not bus.connected
