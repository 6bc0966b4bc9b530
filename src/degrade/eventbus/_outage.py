"""The publisher's outage policy: buffer while the broker is unreachable, then drop or spool.

What cannot be sent (degraded mode, a full buffer, shutdown) is *diverted*:
written to the :class:`~degrade.eventbus.DiskSpool` when there is one and it
takes the event, dropped otherwise, and every drop is counted and reported.

One state machine. The broker's health is its :class:`~degrade.Dependency`'s
state, nothing else: every failed connect attempt (refused, reset, timed out)
and every lost connection is ``dep.record_failure(error)``, every successful
connect is ``dep.record_success()``. So the dependency goes down after its own
trip rule (3 consecutive failures by default), and its transitions are logged,
counted and sent to Sentry once, by :mod:`degrade.observe`
(``dependency.down`` / ``dependency.recovered``).

The publisher keeps only its policy on top of that state:

* **degraded mode** = the dependency is down AND the broker has not answered
  the sender for ``degrade_after`` seconds, counted from when it stopped
  answering: the start of the failed connect attempt, or the send of the
  oldest publish still unconfirmed when the connection was lost (the sender
  reports both as ``since``), not from when a bound noticed it. At that
  deadline the policy marks the dependency down if its trip rule has not
  (``dep.mark_down(reason="degrade_after")``: a custom rule, or errors that
  are not outages such as an exchange type clash), so degraded mode never
  shows next to a dependency that reads ``ok``. Buffered and new events are
  then dropped or spooled at once.
* Degraded mode ends when either half stops being true: the dependency
  recovers (its probe or the sender's next connect), or the sender connects.

Who notices recovery: without a ``check`` on the dependency, the sender's
reconnect loop is its probe (a successful connect is the success that closes
it). With a check (``checks.amqp(url)``), the dependency's probe owns the
broker while it is down: the sender makes no attempt of its own (the
dependency's :meth:`~degrade.Dependency.admit` says no while its probe runs)
and connects as soon as the dependency recovers, woken by
:meth:`~degrade.Dependency.subscribe`. So the broker never sees two loops.
While the dependency is held down by ``simulate_outage`` the sender is not
held back: nothing probes then.

Measured (``tests/integration/test_eventbus.py``, default bounds, RabbitMQ
blackholed through the FaultProxy while publishing every 20 ms, degrade_after
8 s): the loss was noticed 5.8 s after the first unanswered publish (the
broker's heartbeat timeout, passed on by the proxy as a reset, before the
confirm watchdog's tick); degraded mode began 8.00 s after that publish,
against 13.81 s when the count started at the notice (which comes up to
``confirm_timeout`` plus a watchdog tick late, 6.25 s by default; a blackholed
connect up to ``connect_timeout`` late).

Rejected: entering degraded mode from the confirm watchdog while the
connection is still up (the oldest publish older than ``degrade_after``):
degraded mode stands on the dependency being down, which only a failure feeds;
with ``degrade_after`` below ``confirm_timeout`` degraded mode therefore begins
when the loss is noticed. Not covered: a broker that accepts connections but
never confirms (each connect is an answer and restarts the count).

Rejected: keeping the publisher's own unreachable -> degraded -> recovered
machine next to the dependency's, and reporting its transitions to Sentry
under ``eventbus.*`` tags besides the dependency's own events under
``degrade.*``: one outage showed as two issues, and the dependency read ``ok``
for the first ``degrade_after`` seconds of an outage the sender already saw.
The per-drop Sentry events (``eventbus.status=degraded``) stay: they report
lost events, not transitions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from ..dependency import Dependency, Site
from ..exceptions import ConfigurationError
from ..observe import logger, report_to_sentry
from ._event import Event
from ._queue import SendQueue
from ._report import Reporter
from ._result import PublishResult

__all__ = ["HOLD_RECHECK", "SHED_NOT_STARTED", "SHED_SPOOL_FULL", "Outage", "publish_site"]

#: ``Site.shed`` reason: the spool had no room (saturation, not an outage).
SHED_SPOOL_FULL = "spool-full"
#: ``Site.shed`` reason: queued on a publisher that was never started (nothing sends it).
SHED_NOT_STARTED = "not-started"

#: Seconds between two looks at the dependency while the sender is held back
#: (the subscription wakes it at once; this only bounds each wait).
HOLD_RECHECK = 1.0


def publish_site(
    dependency: Dependency | None, exchange: str, buffer_size: int, spooled: bool, degrade_after: float
) -> Site | None:
    """Declare the publisher's publish site on ``dependency`` (for the runbook; where shed events count).

    Failure mode: none; None without a dependency.
    """
    if dependency is None:
        return None
    where = "spooled to disk and replayed" if spooled else "dropped, counted and reported"
    return dependency.add_site(
        f"degrade.eventbus.EventPublisher[{exchange}].publish",
        "fail_soft",
        f"publish never waits: events are buffered (up to {buffer_size}) while the broker "
        f"is unreachable, then {where} after {degrade_after:g}s "
        "(Sentry: tag:eventbus.status=degraded); the request succeeds",
        fallback="buffer, then " + ("spool" if spooled else "drop"),
    )


class Outage:
    """Feeds the broker's failures and successes to its Dependency; decides degraded mode; spools or drops.

    Failure mode: none of its own. Without a dependency it keeps degraded mode
    by itself (entered at the deadline, left at the next connection). A spool
    that fails is reported (``eventbus.spool_failed``, Sentry) and events are
    dropped and reported instead.
    """

    def __init__(
        self,
        *,
        queue: SendQueue,
        reporter: Reporter,
        dependency: Dependency | None,
        site: Site | None = None,
        degrade_after: float,
        broker: str,
        clock: Callable[[], float],
    ) -> None:
        self.queue = queue
        self.reporter = reporter
        self.counts = reporter.counts
        self.exchange = reporter.exchange
        self.spool = queue.spool
        self.site = site
        self.dependency = dependency
        self.degrade_after = degrade_after
        self.broker = broker
        self._clock = clock
        #: Degraded mode: every publish drops (or spools) at once.
        self.degraded = False
        #: When the broker stopped answering (first failure of this episode); None while it answers.
        self.since: float | None = None
        self._lost_at: float | None = None  # first failure since the last connection, for logs
        self._last_error: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._degraded_at = 0.0
        self._mark = (0, 0)  # (lost, spooled) when degraded mode began
        self._attempts: int | None = None
        self._closed = False
        self._warned_not_started = False
        self._up: asyncio.Event | None = None
        self._unsubscribe = dependency.subscribe(self._on_transition) if dependency is not None else None

    # -- fed by the sender -------------------------------------------------------

    def attempt_failed(self, error: BaseException, *, since: float | None = None) -> None:
        """A connect attempt failed: a failure of the broker, silent since the attempt began."""
        if self.dependency is not None:
            self.dependency.record_failure(error)
        self._unreachable(error, log=True, since=since)

    def connection_lost(self, error: BaseException, *, since: float | None = None) -> None:
        """A working connection ended: a failure of the broker (logged by the sender).

        ``since``: when the oldest publish it left unconfirmed was sent.
        """
        if self.dependency is not None:
            self.dependency.record_failure(error)
        self._unreachable(error, log=False, since=since)

    def setup_failed(self, error: BaseException) -> None:
        """Not an outage (an exchange type clash, a bug): not fed to the dependency, but nothing is sent."""
        self._unreachable(error, log=True, since=None)

    def connected(self, attempts: int) -> None:
        """A connection is up: a success of the broker; the end of degraded mode."""
        now = self._clock()
        self._cancel_timer()
        was_degraded, lost_at = self.degraded, self._lost_at
        self.since = self._lost_at = None
        self._attempts = attempts
        if self.dependency is not None:
            self.dependency.record_success()  # its recovery ends degraded mode (_on_transition)
        if self.degraded:  # no dependency, or one held down by simulate_outage: the broker answers
            self._leave(now)
        self._attempts = None
        if was_degraded:
            return  # eventbus.recovered said it
        if lost_at is not None:
            logger.info(
                "eventbus.reconnected",
                exchange=self.exchange,
                broker=self.broker,
                unreachable_s=round(now - lost_at, 3),
                attempts=attempts,
            )
        else:
            logger.info("eventbus.connected", exchange=self.exchange, broker=self.broker)

    def deadline(self) -> float | None:
        """Clock time degraded mode begins if the broker keeps silent (None: not counting)."""
        if self.degraded or self.since is None:
            return None
        return self.since + self.degrade_after

    def check(self) -> None:
        """Enter degraded mode if the deadline passed (the sender calls this after each wait)."""
        since = self.since
        if not self.degraded and since is not None and self._clock() - since >= self.degrade_after:
            self._enter()

    async def hold(self) -> None:
        """Return once the sender may try to connect: at once, unless the dependency's probe owns the broker.

        Held while the dependency is down, has a check of its own and its
        probe runs (``admit()`` is False); woken by its recovery, and looking
        again every :data:`HOLD_RECHECK` seconds (``admit()`` lets one trial
        through if no probe runs).
        """
        dep = self.dependency
        if dep is None or dep.check is None:
            return
        while dep.is_down and not dep.forced and not self._closed and not dep.admit():
            up = self._up = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(HOLD_RECHECK):
                    await up.wait()

    def close(self) -> None:
        """Stop following the dependency; no degraded mode begins after this."""
        self._closed = True
        self._cancel_timer()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- what cannot be sent -------------------------------------------------------

    def divert(self, event: Event, reason: str) -> PublishResult:
        """Spool the event if the spool can take it; otherwise drop it, counted and reported."""
        spool = self.spool
        if spool is not None and self.queue.spool_open:
            try:
                if spool.append(event):
                    self.reporter.spooled_one(event)
                    return PublishResult.SPOOLED
                if reason != "buffer_full" and self.site is not None:
                    self.site.shed(SHED_SPOOL_FULL)  # local capacity (one shed per event)
                reason = "spool_full"
            except OSError as exc:
                reason = "spool_error"
                self._spool_failed(exc)
        self.reporter.dropped(event, reason)
        return PublishResult.DROPPED

    def not_started(self) -> None:
        """An event was queued on a publisher never started: nothing will send it.

        Counted (``stats().unsent``), shed on the site as ``"not-started"`` (so
        ``/health/deep`` details say it under ``shed``; not a failure of the
        dependency: the broker may be fine), and warned about once.
        """
        self.counts.unsent += 1
        if self.site is not None:
            self.site.shed(SHED_NOT_STARTED)
        if self._warned_not_started:
            return
        self._warned_not_started = True
        logger.warning(
            "eventbus.not_started",
            exchange=self.exchange,
            broker=self.broker,
            detail=(
                "publish() on an EventPublisher that was never started: events wait in the buffer "
                f"(up to buffer_size={self.queue.size}, then dropped) and nothing sends them; "
                "run the registry's lifespan with registry.manage(publisher) "
                "(or use `async with publisher:`)"
            ),
        )

    def open_spool(self) -> None:
        """Open the spool if there is one (idempotent); a failure is reported and leaves it closed."""
        if self.spool is None or self.queue.spool_open:
            return
        try:
            self.spool.open()
        except (OSError, ConfigurationError) as exc:
            self._spool_failed(exc)
            return
        self.queue.spool_open = True

    def _spool_failed(self, exc: BaseException) -> None:
        self.queue.spool_open = False
        logger.error("eventbus.spool_failed", exchange=self.exchange, error=type(exc).__name__)
        report_to_sentry(
            "eventbus: the spool failed; events are dropped instead",
            level="error",
            tags={"eventbus.status": "degraded", "eventbus.exchange": self.exchange},
            fingerprint=["degrade", "eventbus", "spool_failed", self.exchange],
            extras={"error_class": type(exc).__name__},
        )

    # -- degraded mode -------------------------------------------------------------

    def _unreachable(self, error: BaseException, *, log: bool, since: float | None) -> None:
        self._last_error = error
        now = self._clock()
        at = now if since is None else min(since, now)  # when the broker stopped answering
        if self._lost_at is None:
            self._lost_at = at
        if self.since is not None:
            return
        self.since = at
        self._arm_timer(at + self.degrade_after - now)  # past already: at once (the timer's floor)
        if log:
            logger.warning(
                "eventbus.unreachable",
                exchange=self.exchange,
                broker=self.broker,
                error=type(error).__name__,
                silent_s=round(now - at, 3),
                degrade_after_s=self.degrade_after,
                buffered=len(self.queue.buffer),
            )

    def _arm_timer(self, delay: float) -> None:
        self._cancel_timer()
        with contextlib.suppress(RuntimeError):  # no running loop: the sender's checks still degrade
            self._timer = asyncio.get_running_loop().call_later(max(delay, 0.001), self._due)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _due(self) -> None:
        self._timer = None
        since = self.since
        if self.degraded or since is None or self._closed:
            return
        remaining = since + self.degrade_after - self._clock()
        if remaining > 0:
            self._arm_timer(remaining)
            return
        self._enter()

    def _enter(self) -> None:
        now = self._clock()
        self.degraded = True
        self.counts.degraded = True
        self._degraded_at = now
        self._mark = (self.reporter.total_lost, self.counts.spooled)
        self._cancel_timer()
        error = self._last_error
        since = self.since if self.since is not None else now
        moved = self.queue.take_buffered()
        logger.warning(
            "eventbus.degraded",
            exchange=self.exchange,
            broker=self.broker,
            unreachable_s=round(now - since, 3),
            error=type(error).__name__ if error is not None else None,
            buffered=len(moved),
            events="spooled" if self.queue.spool_open else "dropped",
        )
        dep = self.dependency
        if dep is not None and not dep.is_down:
            dep.mark_down(error, reason="degrade_after")
        for event in moved:
            self.divert(event, "degraded")

    def _leave(self, now: float) -> None:
        lost_mark, spooled_mark = self._mark
        self.degraded = False
        self.counts.degraded = False
        self.since = None  # a new episode counts degrade_after from its own first failure
        self._cancel_timer()
        logger.info(
            "eventbus.recovered",
            exchange=self.exchange,
            broker=self.broker,
            dropped=self.reporter.total_lost - lost_mark,
            spooled=self.counts.spooled - spooled_mark,
            degraded_s=round(now - self._degraded_at, 3),
            attempts=self._attempts,
        )
        self.reporter.flush()

    def _on_transition(self, dep: Dependency) -> None:
        if dep.is_down:
            return
        if self._up is not None:
            self._up.set()
        if self.degraded:
            self._leave(self._clock())
