"""What an :class:`~degrade.eventbus.OutboxRelay` counts, its ``stats()`` snapshot, its Prometheus collector.

Plain integers on the relay (a batch adds to them), read by ``stats()`` and
by one collector per process at scrape time, as the publisher's ``Counts``
are. The backlog is the relay's last count of the table (every
``backlog_interval``, capped at ``backlog_cap`` rows), so a scrape never
queries Postgres.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .. import _metrics
from ..dependency import Dependency
from ._outbox_batch import FINAL

__all__ = ["RelayCounts", "RelayStats", "declare_sites", "relay_metrics"]


@dataclass(frozen=True)
class RelayStats:
    """A snapshot of one relay: ``relay.stats()``.

    ``backlog`` and ``oldest_s`` are from the last count (``counted_at``, a
    ``time.time()``; 0 before the first): rows waiting in the table, at most
    the relay's ``backlog_cap``, and the age in seconds of the oldest.
    """

    table: str
    published: int
    dropped: dict[str, int] = field(default_factory=dict)
    retried: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    backlog: int = 0
    oldest_s: float = 0.0
    counted_at: float = 0.0
    db_failures: int = 0
    broker_failures: int = 0
    errors: int = 0
    connected: bool = False
    listening: bool = False
    phase: str = "idle"

    def health_details(self) -> dict[str, Any]:
        """What ``/health/deep`` shows of the relay (with details): backlog, age, counts, phase."""
        return {k: getattr(self, k) for k in ("backlog", "oldest_s", "published", "dropped", "phase")}


class RelayCounts:
    """The counters of one relay (mutable, read by :meth:`snapshot` and the collector)."""

    __slots__ = (
        "backlog",
        "batches",
        "broker_failures",
        "counted_at",
        "db_failures",
        "dropped",
        "errors",
        "oldest_s",
        "published",
        "retried",
        "table",
    )

    def __init__(self, table: str) -> None:
        self.table = table
        self.published = 0
        self.dropped: dict[str, int] = {}
        self.retried: dict[str, int] = {}
        self.batches = 0
        self.backlog = 0
        self.oldest_s = 0.0
        self.counted_at = 0.0
        self.db_failures = 0
        self.broker_failures = 0
        self.errors = 0

    def settle(self, outcomes: dict[int, str | None]) -> dict[str, int]:
        """Count one batch's outcomes (None: published); return what it dropped, by reason."""
        dropped: dict[str, int] = {}
        for why in outcomes.values():
            if why is None:
                self.published += 1
            elif why in FINAL:
                self.dropped[why] = self.dropped.get(why, 0) + 1
                dropped[why] = dropped.get(why, 0) + 1
            else:
                self.retried[why] = self.retried.get(why, 0) + 1
        return dropped

    def snapshot(self, *, connected: bool, listening: bool, phase: str) -> RelayStats:
        """The counters now, frozen."""
        return RelayStats(
            table=self.table,
            published=self.published,
            dropped=dict(self.dropped),
            retried=dict(self.retried),
            batches=self.batches,
            backlog=self.backlog,
            oldest_s=self.oldest_s,
            counted_at=self.counted_at,
            db_failures=self.db_failures,
            broker_failures=self.broker_failures,
            errors=self.errors,
            connected=connected,
            listening=listening,
            phase=phase,
        )


class _Collector:
    """Prometheus collector of every relay's counts in this process."""

    def __init__(self) -> None:
        self.counts: list[tuple[RelayCounts, float]] = []

    @staticmethod
    def _families() -> tuple[Any, Any, Any]:
        return (
            _metrics.family("degrade_outbox_events_total"),
            _metrics.family("degrade_outbox_backlog"),
            _metrics.family("degrade_outbox_oldest_seconds"),
        )

    def describe(self) -> list[Any]:
        return list(self._families())

    def collect(self) -> list[Any]:
        events, backlog, oldest = self._families()
        totals: dict[tuple[str, str], list[float]] = {}
        waiting: dict[str, float] = {}
        age: dict[str, float] = {}
        for counts, created in list(self.counts):
            table = counts.table
            outcomes = {"published": counts.published, "dropped": sum(counts.dropped.values())}
            outcomes["retried"] = sum(counts.retried.values())
            for outcome, n in outcomes.items():
                entry = totals.setdefault((table, outcome), [0.0, created])
                entry[0] += n
            # Relays of one table count the same rows: the largest (latest) count stands.
            waiting[table] = max(waiting.get(table, 0.0), float(counts.backlog))
            age[table] = max(age.get(table, 0.0), counts.oldest_s)
        for (table, outcome), (total, created) in totals.items():
            events.add_metric([table, outcome], total, created=_metrics.created(created))
        for table, value in waiting.items():
            backlog.add_metric([table], value)
        for table, value in age.items():
            oldest.add_metric([table], value)
        return [events, backlog, oldest]


class _Metrics:
    """Registers the collector once, when prometheus_client is installed (extra ``prometheus``)."""

    def __init__(self) -> None:
        self.collector = _Collector()
        self.enabled = _metrics.register(self.collector)

    def track(self, counts: RelayCounts) -> None:
        # Strong references to the small counts objects: a series must not vanish.
        self.collector.counts.append((counts, time.time()))


relay_metrics = _Metrics()


def declare_sites(table: str, broker: Dependency | None, db: Dependency | None) -> None:
    """Declare the relay's site on the broker's dependency and add()'s on the database's (runbook)."""
    if broker is not None:
        broker.add_site(
            f"degrade.eventbus.OutboxRelay[{table}]",
            "fail_soft",
            "rows wait in the outbox table and are published, oldest first, once it is back",
            fallback="rows wait",
        )
    if db is not None:
        db.add_site(
            f"degrade.eventbus.Outbox[{table}].add",
            "fail_loud",
            "add() fails with the caller's transaction: the write and its event are one decision",
        )
