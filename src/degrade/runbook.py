"""Generate the runbook and Prometheus alert rules from a Registry.

The runbook is a view of the code: each dependency's severity, impact and
sub-runbook, and every FAIL-SOFT / FAIL-LOUD site, outage policy and escape
hatch registered on it. ``python -m degrade runbook module:registry`` prints it;
``--check FILE`` fails when FILE is stale.
"""

from __future__ import annotations

import json
import re

from .dependency import Dependency, Severity, Site
from .registry import Registry

__all__ = ["render_alerts", "render_runbook"]

_MODE_LABEL = {
    "fail_soft": "FAIL-SOFT",
    "fail_loud": "FAIL-LOUD",
}


def _cell(text: str | None) -> str:
    """Markdown table cell: one line, pipes escaped."""
    if not text:
        return "—"
    return " ".join(text.split()).replace("|", "\\|")


def _site_row(site: Site) -> str:
    mode = _MODE_LABEL.get(site.mode, site.mode.upper().replace("_", "-"))
    fallback = f"`{site.fallback}`" if site.fallback else "—"
    if site.hatch:
        fallback += f" (escape hatch `{site.hatch}`)"
    return f"| `{site.name}` | {mode} | {fallback} | {_cell(site.reason)} |"


def _site_table(sites: list[Site]) -> list[str]:
    lines = [
        "| Call site | Mode | Fallback / policy | What the user gets |",
        "| --- | --- | --- | --- |",
    ]
    # One row per distinct site: a function decorated again (a reload) is listed once.
    seen: set[tuple[str, str]] = set()
    for site in sites:
        if (site.name, site.mode) not in seen:
            seen.add((site.name, site.mode))
            lines.append(_site_row(site))
    return lines


# The kind of a site, from the name its safety net registers it under (``Site``
# records no kind of its own): each kind fails, answers and recovers its own way.
_KIND_PREFIXES = (
    ("degrade.eventbus.EventPublisher[", "publisher"),
    ("degrade.eventbus.OutboxRelay[", "relay"),
    ("degrade.eventbus.Outbox[", "outbox"),
    ("degrade.db.DBHealthMiddleware", "gate"),
    ("degrade.db.db_gate", "gate"),
    ("degrade.db.ReadReplicaRouter.", "router"),
    ("degrade.ratelimit.RateLimiter[", "limiter"),
    ("degrade.cache.FailSoftCache[", "cache"),
    ("degrade.revocation.RevocationList[", "revocation"),
)
#: The order kinds are described in, under a dependency.
_KINDS = ("gate", "router", "outbox", "limiter", "cache", "revocation", "publisher", "relay", "decorator")


def _site_kind(site: Site) -> str:
    """``gate``, ``router``, ``limiter``, ``cache``, ``revocation``, ``publisher`` or ``decorator``."""
    for prefix, kind in _KIND_PREFIXES:
        if site.name.startswith(prefix):
            return kind
    return "decorator"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _loud(sites: list[Site]) -> list[Site]:
    return [s for s in sites if s.mode == "fail_loud"]


def _soft(sites: list[Site]) -> list[Site]:
    return [s for s in sites if s.mode != "fail_loud"]


def _gate_text(dep: Dependency, sites: list[Site]) -> str:
    return (
        "gated requests answer 503 at once, without touching the pool; "
        "the connections of gated requests in flight are terminated"
    )


def _router_text(dep: Dependency, sites: list[Site]) -> str:
    parts = []
    if any(s.name.endswith(".for_write") for s in sites):
        parts.append("routed writes answer 503")
    if any(s.name.endswith(".for_read") for s in sites):
        parts.append("routed reads run on the primary")
    return "; ".join(parts) or "the router does without it"


def _limiter_text(dep: Dependency, sites: list[Site]) -> str:
    if _loud(sites):
        return "rate-limited requests answer 503"
    fallbacks = sorted({s.fallback for s in sites if s.fallback})
    return "requests are limited without it: " + (", ".join(fallbacks) or "by the outage policy")


def _cache_text(dep: Dependency, sites: list[Site]) -> str:
    return "reads are misses (the loader answers); writes and invalidations are skipped"


def _revocation_text(dep: Dependency, sites: list[Site]) -> str:
    parts = [f"{_short(s)} answers 503" for s in _loud(sites)]
    parts += [f"{_short(s)} falls back to `{s.fallback}`" for s in _soft(sites)]
    return "; ".join(parts)


def _publisher_text(dep: Dependency, sites: list[Site]) -> str:
    outcome = "spooled to disk" if any((s.fallback or "").endswith("spool") for s in sites) else "dropped"
    return (
        f"never a 503: `publish()` returns at once and the request succeeds; events are "
        f"buffered, then {outcome} (counted and reported) once the broker has been unreachable "
        "for `degrade_after` (see the table)"
    )


def _relay_text(dep: Dependency, sites: list[Site]) -> str:
    return (
        "never a 503: rows wait in the outbox table (nothing is dropped) and are published, "
        "oldest first, once the broker is back"
    )


def _outbox_text(dep: Dependency, sites: list[Site]) -> str:
    return "`Outbox.add()` fails with the caller's transaction: the write and its event are one decision"


def _decorator_text(dep: Dependency, sites: list[Site]) -> str:
    parts = []
    soft, loud = len(_soft(sites)), len(_loud(sites))
    if soft:
        verb = "returns its" if soft == 1 else "return their"
        parts.append(f"{_plural(soft, 'call site')} {verb} fallback without calling it")
    if loud:
        verb = "raises" if loud == 1 else "raise"
        raised = "`DependencyUnavailable` (503 through `exception_handlers()`)"
        parts.append(f"{_plural(loud, 'call site')} {verb} {raised}")
    return "; ".join(parts)


#: What the sites of each kind do while their dependency is down, in one sentence.
_WHILE_DOWN = {
    "gate": ("DB gate", _gate_text),
    "router": ("replica router", _router_text),
    "limiter": ("rate limiter", _limiter_text),
    "cache": ("cache", _cache_text),
    "revocation": ("revocation list", _revocation_text),
    "publisher": ("event publisher", _publisher_text),
    "relay": ("outbox relay", _relay_text),
    "outbox": ("outbox", _outbox_text),
    "decorator": ("decorated calls", _decorator_text),
}


def _short(site: Site) -> str:
    return f"`{site.name.rsplit('.', 1)[-1]}`"


def _by_kind(dep: Dependency) -> dict[str, list[Site]]:
    kinds: dict[str, list[Site]] = {}
    for site in dep.sites:
        kinds.setdefault(_site_kind(site), []).append(site)
    return {kind: kinds[kind] for kind in _KINDS if kind in kinds}


#: Kinds whose own reconnect loop feeds their dependency (each connection is a success).
_SELF_PROBING = {"publisher": "publisher", "relay": "outbox relay"}


def _recovery(dep: Dependency, kinds: dict[str, list[Site]]) -> str:
    has_check = dep.check is not None
    loops = [label for kind, label in _SELF_PROBING.items() if kind in kinds]
    if not loops:
        return dep.recovery.describe(has_check=has_check)
    who = " and the ".join(loops)
    if has_check:
        return (
            dep.recovery.describe(has_check=True) + "; while it is down only that check touches the "
            f"broker, and the {who} reconnect{'s' if len(loops) == 1 else ''} once it recovers"
        )
    if all(kind in _SELF_PROBING for kind in kinds):
        return (
            f"the {who}'s own reconnect loop (no check configured): the next successful "
            "connection to the broker closes it, with backoff and jitter between attempts"
        )
    return dep.recovery.describe(has_check=False) + f"; the {who}'s next connection closes it too"


def _detection(dep: Dependency) -> list[str]:
    """The dependency's Detection, Recovery and While-down lines."""
    kinds = _by_kind(dep)
    lines = [
        f"- Detection: down after {dep.trip.describe()}",
        f"- Recovery: by {_recovery(dep, kinds)}",
    ]
    answers_503 = any(s.mode == "fail_loud" for s in dep.sites)
    if answers_503:
        lines.append(f"- Responses: its 503s carry `Retry-After: {dep.retry_after}`")
    else:
        lines.append(f"- Responses: no request answers 503 because {dep.name} is down (no FAIL-LOUD site)")
    if kinds:
        lines.append("- While down:")
        for kind, sites in kinds.items():
            label, describe = _WHILE_DOWN[kind]
            lines.append(f"    - {label}: {describe(dep, sites)}")
    return lines


def render_runbook(registry: Registry, *, title: str = "Runbook: graceful degradation") -> str:
    """The Markdown runbook of ``registry``: quick lookup, then one section per dependency."""
    deps = sorted(registry, key=lambda d: (d.severity, d.name))
    lines = [
        f"# {title}",
        "",
        "<!-- Generated by `python -m degrade runbook` from the code; do not edit by hand. -->",
        "",
    ]
    if registry.version:
        lines += [f"Version: `{registry.version}`", ""]
    lines += [
        "## Quick lookup: what breaks if X is down",
        "",
        "| Backing service | User-visible impact | Severity | /health/deep | Sub-runbook |",
        "| --- | --- | --- | --- | --- |",
    ]
    for dep in deps:
        health = "503 (critical)" if dep.critical else "200 `degraded`"
        sub = f"`{dep.runbook}`" if dep.runbook else "—"
        lines.append(f"| {dep.name} | {_cell(dep.impact)} | {dep.severity.label} | {health} | {sub} |")
    for dep in deps:
        lines += ["", f"## {dep.name} ({dep.severity.label}{', critical' if dep.critical else ''})", ""]
        lines += [f"- Impact: {_cell(dep.impact)}", *_detection(dep)]
        if dep.runbook:
            lines.append(f"- Sub-runbook: `{dep.runbook}`")
        sites = sorted(dep.sites, key=lambda s: (s.mode, s.name))
        lines.append("")
        if not sites:
            lines.append("No fail-soft or fail-loud site is declared on this dependency.")
        else:
            lines += _site_table(sites)
        hatches = registry.hatches_for(dep)
        if hatches:
            lines += [
                "",
                "| Escape hatch | How to open it | What opening it trades away |",
                "| --- | --- | --- |",
            ]
            for hatch in hatches:
                how = f"`{hatch.env}=false` at start-up, or `hatch.open()`" if hatch.env else "`hatch.open()`"
                lines.append(f"| `{hatch.name}` | {how} | {_cell(hatch.reason)} |")
    lines += [
        "",
        "## Adding a new degradation mode",
        "",
        "1. Declare the backing service with `registry.dependency(...)`:",
        "   severity, impact, sub-runbook, check.",
        "2. Decide each call site's fail mode in code: `@fail_soft(dep, fallback=..., reason=...)` or",
        "   `@fail_loud(dep, reason=...)`.",
        "3. Regenerate this file: `python -m degrade runbook module:registry > docs/runbook.md`.",
        "",
    ]
    return "\n".join(lines)


_ALERT_SEVERITY = {Severity.SEV1: "critical", Severity.SEV2: "warning", Severity.SEV3: "info"}


def _alert_name(name: str) -> str:
    words = re.split(r"[^A-Za-z0-9]+", name)
    return "".join(w[:1].upper() + w[1:] for w in words if w)


def _q(text: str) -> str:
    # JSON strings are valid YAML scalars and escape everything that needs it.
    return json.dumps(text, ensure_ascii=False)


def render_alerts(registry: Registry, *, runbook_base: str = "", down_for: str = "1m") -> str:
    """Prometheus alerting rules (YAML) for ``registry``.

    One ``<Name>Down`` rule per dependency on ``degrade_dependency_up == 0`` and one
    ``<Name>Degrading`` rule on fallbacks and refusals rising, labelled with the
    severity and annotated with ``runbook_url``.
    """
    lines = ["groups:", "  - name: degrade", "    rules:"]
    for dep in sorted(registry, key=lambda d: (d.severity, d.name)):
        label = _ALERT_SEVERITY[dep.severity]
        runbook_url = f"{runbook_base}{dep.runbook}" if dep.runbook else f"{runbook_base}docs/runbook.md"
        selector = "{" + f"dependency={_q(dep.name)}" + "}"
        impact = dep.impact or f"{dep.name} is unavailable"
        name = _alert_name(dep.name) or "Dependency"
        lines += [
            f"      - alert: Degrade{name}Down",
            f"        expr: {_q(f'degrade_dependency_up{selector} == 0')}",
            f"        for: {down_for}",
            "        labels:",
            f"          severity: {label}",
            f"          degrade_severity: {_q(dep.severity.label)}",
            f"          dependency: {_q(dep.name)}",
            "        annotations:",
            f"          summary: {_q(f'{dep.name} is down ({dep.severity.label})')}",
            f"          description: {_q(impact)}",
            f"          runbook_url: {_q(runbook_url)}",
        ]
        degraded = (
            f"sum(rate(degrade_fallback_total{selector}[5m])) + "
            f"sum(rate(degrade_fail_loud_total{selector}[5m])) > 0"
        )
        lines += [
            f"      - alert: Degrade{name}Degrading",
            f"        expr: {_q(degraded)}",
            "        for: 5m",
            "        labels:",
            "          severity: warning",
            f"          dependency: {_q(dep.name)}",
            "        annotations:",
            f"          summary: {_q(f'requests are served degraded because of {dep.name}')}",
            f"          description: {_q('Fallbacks or refusals are rising: ' + impact)}",
            f"          runbook_url: {_q(runbook_url)}",
        ]
    flapping = "sum by (dependency) (increase(degrade_dependency_flaps_total[10m])) > 2"
    lines += [
        "      - alert: DegradeDependencyFlapping",
        f"        expr: {_q(flapping)}",
        "        labels:",
        "          severity: warning",
        "        annotations:",
        f"          summary: {_q('{{ $labels.dependency }} keeps going down right after recovering')}",
        "          description: "
        + _q(
            "Its recovery is damped (held down longer each time) and Sentry gets one event per "
            "transition kind a minute; look for a lossy network path or a service that accepts "
            "then drops connections."
        ),
        f"          runbook_url: {_q(runbook_base + 'docs/runbook.md')}",
    ]
    dropped = "sum by (exchange, reason) (increase(degrade_eventbus_dropped_total[5m])) > 0"
    dropped_summary = "events were dropped on exchange {{ $labels.exchange }} ({{ $labels.reason }})"
    publishers = [d for d in registry if any(s.name.startswith("degrade.eventbus.") for s in d.sites)]
    for dep in publishers[:1]:  # one rule covers every publisher: the metric is labelled by exchange
        runbook_url = f"{runbook_base}{dep.runbook}" if dep.runbook else f"{runbook_base}docs/runbook.md"
        lines += [
            "      - alert: DegradeEventsDropped",
            f"        expr: {_q(dropped)}",
            "        labels:",
            "          severity: warning",
            "        annotations:",
            f"          summary: {_q(dropped_summary)}",
            f"          description: {_q('Side effects were lost; Sentry: tag:eventbus.status=degraded')}",
            f"          runbook_url: {_q(runbook_url)}",
        ]
    relays = [d for d in registry if any(s.name.startswith("degrade.eventbus.OutboxRelay[") for s in d.sites)]
    for dep in relays[:1]:  # one rule covers every outbox table: the metric is labelled by table
        runbook_url = f"{runbook_base}{dep.runbook}" if dep.runbook else f"{runbook_base}docs/runbook.md"
        waiting = "max by (table) (degrade_outbox_oldest_seconds) > 300"
        lines += [
            "      - alert: DegradeOutboxBacklog",
            f"        expr: {_q(waiting)}",
            "        for: 1m",
            "        labels:",
            "          severity: warning",
            "        annotations:",
            f"          summary: {_q('outbox {{ $labels.table }}: events wait for more than 5 minutes')}",
            f"          description: {_q('No relay publishes: RabbitMQ or Postgres down, or none running')}",
            f"          runbook_url: {_q(runbook_url)}",
        ]
    return "\n".join(lines) + "\n"
