"""Counting, logging and reporting lost events with bounded volume.

A drop on the request path costs a few integer increments and a bounded list
append. Log lines are summaries, one per ``log_interval`` at most, with counts
by reason and a few sample message ids; Sentry gets one event per drop up to
``sentry_rate`` per second, and one summary of what it did not get. The Sentry
calls run from the event loop (``call_soon``) right after the ``publish()``
that dropped, never inside it.

Statuses (the ``eventbus.status`` tag):

* ``degraded``: lost because the broker was unreachable or the publisher could
  not hold it (reasons ``degraded``, ``buffer_full``, ``shutdown``,
  ``spool_full``, ``spool_error``, ``dependency_down``);
* ``unroutable``: the broker returned it (no queue bound for its routing key);
* ``rejected``: the broker refused it (``basic.nack``);
* ``invalid``: it could not be encoded as an AMQP message.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import _metrics
from ..observe import logger, otel_observable, report_to_sentry, sentry_active
from ._event import Event
from ._result import PublisherStats

__all__ = ["STATUS", "Counts", "Reporter", "metrics"]

STATUS = {
    "degraded": "degraded",
    "buffer_full": "degraded",
    "shutdown": "degraded",
    "spool_full": "degraded",
    "spool_error": "degraded",
    "dependency_down": "degraded",
    "unroutable": "unroutable",
    "nacked": "rejected",
    "unencodable": "invalid",
}

#: Sample message ids kept per summary line.
SAMPLES = 5


class Counts:
    """Plain counters of one publisher; Prometheus reads them when it scrapes.

    Counting is then an integer increment on the hot path, not a locked
    ``Counter.inc()`` (as the foundation does for its per-site counters).
    """

    __slots__ = (
        "confirmed",
        "degraded",
        "exchange",
        "lost",
        "queued",
        "replayed",
        "resent",
        "spooled",
        "unsent",
    )

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.queued = 0
        self.confirmed = 0
        self.spooled = 0
        self.replayed = 0
        self.resent = 0
        self.unsent = 0  # queued while the publisher was not started
        self.lost: collections.Counter[str] = collections.Counter()
        self.degraded = False

    def snapshot(self, buffered: int, in_flight: int, connected: bool) -> PublisherStats:
        """The counters now, frozen, with the publisher's state now."""
        return PublisherStats(
            queued=self.queued,
            confirmed=self.confirmed,
            spooled=self.spooled,
            replayed=self.replayed,
            resent=self.resent,
            dropped=sum(self.lost.values()),
            dropped_by_reason=dict(self.lost),
            buffered=buffered,
            in_flight=in_flight,
            connected=connected,
            degraded=self.degraded,
            unsent=self.unsent,
        )


class _Collector:
    """Prometheus collector of every publisher's :class:`Counts` in this process."""

    def __init__(self) -> None:
        # Strong references to the small Counts objects, never to publishers: a
        # series must not vanish (a scraper reads that as a counter reset).
        self._counts: list[tuple[Counts, float]] = []

    def add(self, counts: Counts) -> None:
        self._counts.append((counts, time.time()))

    @staticmethod
    def _families() -> tuple[Any, Any, Any]:
        # Names, labels and help texts: the metric registry (degrade._metrics).
        return (
            _metrics.family("degrade_eventbus_events_total"),
            _metrics.family("degrade_eventbus_dropped_total"),
            _metrics.family("degrade_eventbus_degraded"),
        )

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> list[Any]:
        outcomes: dict[tuple[str, str], list[float]] = {}
        lost: dict[tuple[str, str], list[float]] = {}
        degraded: dict[str, float] = {}
        for counts, created in list(self._counts):
            ex = counts.exchange
            for outcome in ("queued", "confirmed", "spooled", "replayed", "resent"):
                entry = outcomes.setdefault((ex, outcome), [0.0, created])
                entry[0] += getattr(counts, outcome)
            for reason, n in counts.lost.items():
                entry = lost.setdefault((ex, reason), [0.0, created])
                entry[0] += n
            degraded[ex] = max(degraded.get(ex, 0.0), 1.0 if counts.degraded else 0.0)
        events, dropped, gauge = self._families()
        for (ex, outcome), (total, created) in outcomes.items():
            events.add_metric([ex, outcome], total, created=_metrics.created(created))
        for (ex, reason), (total, created) in lost.items():
            dropped.add_metric([ex, reason], total, created=_metrics.created(created))
        for ex, flag in degraded.items():
            gauge.add_metric([ex], flag)
        return [events, dropped, gauge]


class _Metrics:
    """Registers the collector once, when prometheus_client is installed (extra ``prometheus``)."""

    def __init__(self) -> None:
        self.collector = _Collector()
        self._otel = False
        self.enabled = _metrics.register(self.collector)

    def track(self, counts: Counts) -> None:
        # Tracked for OpenTelemetry too (plain integers, read at collection).
        self.collector.add(counts)
        if not self._otel:  # at the first publisher: importing degrade.eventbus imports no OTel
            self._otel = True
            for name, callback in (
                ("degrade.eventbus.events", self._otel_events),
                ("degrade.eventbus.dropped", self._otel_dropped),
                ("degrade.eventbus.degraded", self._otel_degraded),
            ):
                spec = _metrics.instrument(name)  # the registry's row
                otel_observable(spec.name, spec.description, callback, unit=spec.unit, kind=spec.kind)

    def _otel_events(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        totals: dict[tuple[str, str], float] = {}
        for counts, _ in list(self.collector._counts):
            for outcome in ("queued", "confirmed", "spooled", "replayed", "resent"):
                key = (counts.exchange, outcome)
                totals[key] = totals.get(key, 0.0) + getattr(counts, outcome)
        return [
            (v, {"degrade.eventbus.exchange": ex, "degrade.eventbus.outcome": o})
            for (ex, o), v in totals.items()
        ]

    def _otel_dropped(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        totals: dict[tuple[str, str], float] = {}
        for counts, _ in list(self.collector._counts):
            for reason, n in counts.lost.items():
                key = (counts.exchange, reason)
                totals[key] = totals.get(key, 0.0) + n
        return [
            (v, {"degrade.eventbus.exchange": ex, "degrade.eventbus.reason": r})
            for (ex, r), v in totals.items()
        ]

    def _otel_degraded(self) -> Iterable[tuple[float, Mapping[str, str]]]:
        flags: dict[str, float] = {}
        for counts, _ in list(self.collector._counts):
            flags[counts.exchange] = max(flags.get(counts.exchange, 0.0), 1.0 if counts.degraded else 0.0)
        return [(v, {"degrade.eventbus.exchange": ex}) for ex, v in flags.items()]


metrics = _Metrics()


class Reporter:
    """Counts every lost or spooled event of one publisher; logs and reports them in bounded volume."""

    def __init__(
        self,
        counts: Counts,
        *,
        log_interval: float,
        sentry_rate: int,
        clock: Callable[[], float],
    ) -> None:
        self.counts = counts
        self.exchange = counts.exchange
        self.log_interval = log_interval
        self.sentry_rate = sentry_rate
        self._clock = clock
        # since the last summary line
        self._lost_window: collections.Counter[str] = collections.Counter()
        self._spooled_window = 0
        self._samples: list[str] = []
        self._spool_samples: list[str] = []
        # Sentry budget: sentry_rate events per clock second
        self._second = -1.0
        self._sent_this_second = 0
        self._sentry_on = False
        self._suppressed = 0
        self._to_sentry: list[tuple[str, str, str]] = []
        self._sentry_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = float("-inf")

    @property
    def total_lost(self) -> int:
        """Every event lost so far, whatever the reason."""
        return sum(self.counts.lost.values())

    # -- the hot path ----------------------------------------------------------

    def dropped(self, event: Event, reason: str) -> None:
        """Count one lost event; its log line and Sentry event follow, bounded."""
        self.counts.lost[reason] += 1
        self._lost_window[reason] += 1
        if len(self._samples) < SAMPLES:
            self._samples.append(event.message_id)
        self._sentry(event, reason)
        self._arm()

    def spooled_one(self, event: Event) -> None:
        """Count one event written to the spool (not lost: replayed later)."""
        self.counts.spooled += 1
        self._spooled_window += 1
        if len(self._spool_samples) < SAMPLES:
            self._spool_samples.append(event.message_id)
        self._arm()

    def _sentry(self, event: Event, reason: str) -> None:
        now = self._clock()
        second = now - now % 1.0
        if second != self._second:
            # Once a second: a new budget, and whether the host has a Sentry client.
            self._second = second
            self._sent_this_second = 0
            self._sentry_on = sentry_active()
        if not self._sentry_on:
            return
        if self._sent_this_second >= self.sentry_rate:
            self._suppressed += 1
            return
        self._sent_this_second += 1
        self._to_sentry.append((event.routing_key, event.message_id, reason))
        if not self._sentry_scheduled:
            loop = _running_loop()
            if loop is None:
                self._send_to_sentry()
            else:
                self._sentry_scheduled = True
                loop.call_soon(self._send_to_sentry)

    def _arm(self) -> None:
        if self._timer is not None:
            return
        loop = _running_loop()
        if loop is not None:
            self._timer = loop.call_later(self.log_interval, self._on_timer)
            return
        # No event loop (a sync caller): no timer either, so summarise on the
        # first drop of each interval; close() writes what is left.
        now = self._clock()
        if now - self._last_flush >= self.log_interval:
            self._last_flush = now
            self.flush()

    # -- off the hot path --------------------------------------------------------

    def _send_to_sentry(self) -> None:
        self._sentry_scheduled = False
        batch, self._to_sentry = self._to_sentry, []
        for routing_key, message_id, reason in batch:
            status = STATUS.get(reason, "degraded")
            report_to_sentry(
                f"eventbus: event dropped ({reason})",
                level="warning",
                tags={
                    "eventbus.status": status,
                    "eventbus.routing_key": routing_key,
                    "eventbus.exchange": self.exchange,
                    "eventbus.reason": reason,
                },
                fingerprint=["degrade", "eventbus", status, reason, routing_key],
                extras={"message_id": message_id, "reason": reason},
            )

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> None:
        """Write the summary of what happened since the last one (no-op when nothing did)."""
        if self._to_sentry:
            self._send_to_sentry()
        if self._lost_window:
            lost, self._lost_window = self._lost_window, collections.Counter()
            samples, self._samples = self._samples, []
            logger.warning(
                "eventbus.dropped",
                exchange=self.exchange,
                dropped=sum(lost.values()),
                by_reason=dict(lost),
                dropped_total=self.total_lost,
                sample_message_ids=samples,
                sentry_suppressed=self._suppressed,
            )
        if self._spooled_window:
            spooled, self._spooled_window = self._spooled_window, 0
            samples, self._spool_samples = self._spool_samples, []
            logger.info(
                "eventbus.spooled",
                exchange=self.exchange,
                spooled=spooled,
                spooled_total=self.counts.spooled,
                sample_message_ids=samples,
            )
        if self._suppressed:
            suppressed, self._suppressed = self._suppressed, 0
            report_to_sentry(
                f"eventbus: {suppressed} more dropped events not sent one by one",
                level="warning",
                tags={
                    "eventbus.status": "degraded",
                    "eventbus.exchange": self.exchange,
                    "eventbus.reason": "sentry_rate",
                },
                fingerprint=["degrade", "eventbus", "suppressed", self.exchange],
                extras={"suppressed": suppressed, "sentry_rate_per_second": self.sentry_rate},
            )

    def close(self) -> None:
        """Cancel the pending summary and write it now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
