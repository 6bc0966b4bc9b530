"""Outage drills: break each dependency of a running app for real and check what it answers.

A drill runs an ASGI app in-process with a :class:`~degrade.testing.FaultProxy`
in front of each backing service. For each :class:`Scenario` it applies the
faults, fires real requests, compares the status codes with what the runbook
promises, measures latency, clears the faults and measures how long the app
takes to answer normally again::

    report = await run_drill(app, {"redis": redis_proxy}, [
        Scenario("Redis refused", {"redis": "refuse"}, [Probe("GET", "/api/v1/feed", expect=200)]),
    ])
    print(report.table())
    assert report.passed

A probe can assert more than a status: ``check`` is given each answer while
the fault is on (an ``httpx.Response``: a header, a field of the body) and
``recovered`` each answer after, so a row can say "served stale, marked" or
"the backlog drains once the broker is back".

Needs httpx (extra ``http``). Failure mode: a drill never raises because the
app or a service misbehaves; it reports FAIL rows. Every wait is bounded
(``settle_timeout``, ``recover_timeout``, ``request_timeout``).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._extras import require
from ..exceptions import ConfigurationError
from .proxy import FaultProxy

__all__ = ["DrillReport", "Probe", "ProbeResult", "Scenario", "run_drill"]

#: Seconds between polling rounds while waiting for a scenario to settle or recover.
POLL_INTERVAL = 0.02

FaultAction = str | Callable[[FaultProxy], None]

_FAULTS: dict[str, Callable[[FaultProxy], None]] = {
    "refuse": FaultProxy.refuse,
    "blackhole": FaultProxy.blackhole,
    "reset": FaultProxy.reset,
}


@dataclass(frozen=True)
class Probe:
    """One request of a scenario and the status the runbook promises for it.

    Args:
        method: HTTP method.
        path: Path (and query) of the request.
        expect: Status expected while the fault is on.
        healthy: Status expected once the fault is cleared (recovery is timed until then).
        json: JSON body to send, if any.
        headers: Extra request headers.
        content: Raw body to send, if any (instead of ``json``).
        check: Called with each answer (an ``httpx.Response``) while the fault
            is on: an answer with the expected status that it rejects (False,
            or an exception) fails the probe.
        recovered: Called with each answer once the fault is cleared: recovery
            is timed until an answer has the ``healthy`` status and passes it.
        note: What ``check`` and ``recovered`` assert, shown after the route.
    """

    method: str
    path: str
    expect: int
    healthy: int = 200
    json: Any = None
    headers: Mapping[str, str] | None = None
    content: bytes | None = None
    check: Callable[[Any], bool] | None = None
    recovered: Callable[[Any], bool] | None = None
    note: str = ""

    @property
    def route(self) -> str:
        """``"GET /path"``, and the note in brackets when there is one."""
        route = f"{self.method} {self.path}"
        return f"{route} [{self.note}]" if self.note else route


@dataclass(frozen=True)
class Scenario:
    """Faults to apply at once (proxy name to fault) and the probes to fire meanwhile.

    A fault is ``"refuse"``, ``"blackhole"``, ``"reset"`` or a callable given
    the proxy (``lambda p: p.latency(0.5)``).
    """

    name: str
    faults: Mapping[str, FaultAction]
    probes: Sequence[Probe]
    #: Called after the faults are applied (e.g. an operator opens an escape hatch).
    before: Callable[[], None] | None = None
    #: Called when the faults are cleared, before recovery is timed.
    after: Callable[[], None] | None = None


@dataclass(frozen=True)
class ProbeResult:
    """What one probe saw in one scenario."""

    scenario: str
    dependency: str
    fault: str
    route: str
    expected: int
    observed: int | None  # the most common status; None when no request got an answer
    statuses: Mapping[int, int]  # status -> count (0: no answer within request_timeout)
    p50_ms: float
    p99_ms: float
    recover_s: float | None  # None: not back to `healthy` within recover_timeout
    passed: bool
    #: Answers with the expected status that the probe's ``check`` rejected.
    check_failures: int = 0


@dataclass
class DrillReport:
    """Every probe result of a drill, and a table of them."""

    results: list[ProbeResult] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when every probe passed and every service was reachable."""
        return bool(self.results) and not self.unreachable and all(r.passed for r in self.results)

    def table(self) -> str:
        """A plain-text table: dependency, fault, route, expected, observed, latency, recovery, verdict."""
        head = ("dependency", "fault", "route", "expect", "got", "p50 ms", "p99 ms", "recover s", "")
        rows = [head]
        for r in self.results:
            rows.append(
                (
                    r.dependency,
                    r.fault,
                    r.route,
                    str(r.expected),
                    ("-" if r.observed is None else str(r.observed))
                    + (f" ({r.check_failures} failed check)" if r.check_failures else ""),
                    f"{r.p50_ms:.1f}",
                    f"{r.p99_ms:.1f}",
                    "-" if r.recover_s is None else f"{r.recover_s:.2f}",
                    "PASS" if r.passed else "FAIL",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths).rstrip())
        lines.extend(f"unreachable: {name}" for name in self.unreachable)
        return "\n".join(lines)


def _fault_label(action: FaultAction) -> str:
    return action if isinstance(action, str) else getattr(action, "__name__", "custom")


def _apply(proxy: FaultProxy, action: FaultAction) -> None:
    if isinstance(action, str):
        try:
            _FAULTS[action](proxy)
        except KeyError:
            raise ConfigurationError(
                f"unknown fault {action!r}: use one of {sorted(_FAULTS)} or a callable taking the proxy"
            ) from None
    else:
        action(proxy)


@contextlib.asynccontextmanager
async def _running(app: Any) -> AsyncIterator[None]:
    router = getattr(app, "router", None)
    lifespan = getattr(router, "lifespan_context", None)
    if lifespan is None:
        yield
        return
    async with lifespan(app):
        yield


def _passes(predicate: Callable[[Any], bool] | None, response: Any) -> bool:
    """``predicate(response)``; an exception (a missing header or field) is a failed check, not a crash."""
    if predicate is None:
        return True
    try:
        return bool(predicate(response))
    except Exception:  # the app's answer is under test: a malformed one fails the row
        return False


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run_drill(
    app: Any,
    proxies: Mapping[str, FaultProxy],
    scenarios: Sequence[Scenario],
    *,
    requests: int = 20,
    settle_timeout: float = 5.0,
    recover_timeout: float = 10.0,
    request_timeout: float = 5.0,
    progress: Callable[[str], None] | None = None,
) -> DrillReport:
    """Run ``scenarios`` against ``app`` and return what each probe saw.

    For each scenario: apply its faults; fire its probes until they answer what
    is expected (at most ``settle_timeout``: dependencies need a few failures
    to open); fire each probe ``requests`` times and record statuses and
    latency; clear every fault with ``up()``; time how long until every probe
    answers its ``healthy`` status again (at most ``recover_timeout``).

    The app's lifespan (Starlette / FastAPI) runs around the whole drill.
    """
    httpx = require("httpx", "http", feature="degrade.testing.drill")
    if requests < 1:
        raise ConfigurationError(f"requests must be >= 1; got {requests!r}")
    for scenario in scenarios:
        for name in scenario.faults:
            if name not in proxies:
                raise ConfigurationError(
                    f"scenario {scenario.name!r} names no proxy {name!r}: have {sorted(proxies)}"
                )
    say = progress or (lambda _msg: None)
    report = DrillReport()
    transport = httpx.ASGITransport(app=app)

    async def fire(
        client: Any, probe: Probe, predicate: Callable[[Any], bool] | None = None
    ) -> tuple[int, float, bool]:
        """Status (0: no answer in time), seconds taken, and whether ``predicate`` passed."""
        start = time.perf_counter()
        try:
            response = await client.request(
                probe.method, probe.path, json=probe.json, content=probe.content, headers=probe.headers
            )
        except httpx.TimeoutException:
            return 0, time.perf_counter() - start, predicate is None
        took = time.perf_counter() - start
        return response.status_code, took, _passes(predicate, response)

    async def settle(client: Any, scenario: Scenario) -> None:
        deadline = time.monotonic() + settle_timeout
        while time.monotonic() < deadline:
            seen = [await fire(client, p, p.check) for p in scenario.probes]
            if all(s == p.expect and ok for (s, _, ok), p in zip(seen, scenario.probes, strict=True)):
                return
            await asyncio.sleep(POLL_INTERVAL)

    async def measure(client: Any, probe: Probe) -> tuple[list[int], list[float], int]:
        statuses, latencies, rejected = [], [], 0
        for _ in range(requests):
            status, took, ok = await fire(client, probe, probe.check)
            statuses.append(status)
            latencies.append(took * 1000)
            rejected += status == probe.expect and not ok
        return statuses, latencies, rejected

    async def recover(client: Any, scenario: Scenario) -> dict[int, float]:
        recovered: dict[int, float] = {}
        start = time.monotonic()
        while len(recovered) < len(scenario.probes) and time.monotonic() - start < recover_timeout:
            for i, probe in enumerate(scenario.probes):
                if i in recovered:
                    continue
                status, _, ok = await fire(client, probe, probe.recovered)
                if status == probe.healthy and ok:
                    recovered[i] = time.monotonic() - start
            # An in-process request to a dependency known down never suspends: without
            # this sleep the loop would starve the probe that is to bring it back.
            await asyncio.sleep(POLL_INTERVAL)
        return recovered

    async with (
        _running(app),
        httpx.AsyncClient(transport=transport, base_url="http://drill", timeout=request_timeout) as client,
    ):
        for index, scenario in enumerate(scenarios, 1):
            say(f"[{index}/{len(scenarios)}] {scenario.name}")
            for name, action in scenario.faults.items():
                _apply(proxies[name], action)
            try:
                if scenario.before is not None:
                    scenario.before()
                await settle(client, scenario)
                measured = [(probe, *await measure(client, probe)) for probe in scenario.probes]
            finally:
                for name in scenario.faults:
                    proxies[name].up()
                if scenario.after is not None:
                    scenario.after()
            recovered = await recover(client, scenario)
            report.results += [
                _result(scenario, probe, statuses, latencies, recovered.get(i), rejected=rejected)
                for i, (probe, statuses, latencies, rejected) in enumerate(measured)
            ]
    return report


def _result(
    scenario: Scenario,
    probe: Probe,
    statuses: list[int],
    latencies: list[float],
    recover: float | None,
    *,
    rejected: int = 0,
) -> ProbeResult:
    counts = Counter(statuses)
    observed = counts.most_common(1)[0][0]
    return ProbeResult(
        scenario=scenario.name,
        dependency=", ".join(scenario.faults) if len(scenario.faults) <= 2 else f"all {len(scenario.faults)}",
        fault=", ".join(dict.fromkeys(_fault_label(a) for a in scenario.faults.values())),
        route=probe.route,
        expected=probe.expect,
        observed=observed if observed != 0 else None,
        statuses=dict(counts),
        p50_ms=_percentile(latencies, 50),
        p99_ms=_percentile(latencies, 99),
        recover_s=recover,
        passed=all(s == probe.expect for s in statuses) and not rejected and recover is not None,
        check_failures=rejected,
    )
