"""The generated runbook and alert rules, and the ``python -m degrade`` CLI."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from degrade import Registry, Severity, checks, fail_loud, fail_soft
from degrade.__main__ import main
from degrade.runbook import render_alerts, render_runbook


@pytest.fixture
def app_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A throwaway module holding a registry with one site of each mode."""
    name = f"rb_app_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            from degrade import Registry, Severity, checks, fail_loud, fail_soft

            registry = Registry(version="9.9")
            db = registry.dependency(
                "db", severity=Severity.SEV1, impact="Writes fail | 503",
                runbook="docs/runbooks/db.md", check=checks.tcp("127.0.0.1", 1),
            )
            cache = registry.dependency("cache", severity=Severity.SEV3, impact="Slower reads")
            not_a_registry = 42

            @fail_loud(db, reason="writes answer 503")
            async def save(): ...

            @fail_soft(cache, fallback=None, reason="cache miss: read from Postgres")
            async def lookup(): ...
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _registry() -> Registry:
    registry = Registry(version="1.0")
    db = registry.dependency("db", severity=Severity.SEV1, impact="All writes fail", runbook="db.md")
    cache = registry.dependency(
        "redis-cache", severity=Severity.SEV3, check=checks.tcp("127.0.0.1", 1), recovery_interval=2
    )

    @fail_loud(db, reason="writes answer 503")
    def write() -> None: ...

    @fail_soft(cache, fallback=None, reason="cache miss")
    def read() -> None: ...

    return registry


class TestRenderRunbook:
    def test_quick_lookup_lists_every_dependency_worst_first(self) -> None:
        """The quick lookup has one row per dependency, SEV-1 first, with impact and sub-runbook."""
        text = render_runbook(_registry())
        rows = [
            line
            for line in text.splitlines()
            if line.startswith("| db |") or line.startswith("| redis-cache |")
        ]
        assert rows == [
            "| db | All writes fail | SEV-1 | 503 (critical) | `db.md` |",
            "| redis-cache | — | SEV-3 | 200 `degraded` | — |",
        ]

    def test_every_site_is_listed_with_its_mode_and_reason(self) -> None:
        """Each decorated site appears under its dependency with FAIL-SOFT / FAIL-LOUD and its reason."""
        text = render_runbook(_registry())
        assert (
            "| `tests.unit.test_runbook._registry.<locals>.write` | FAIL-LOUD | — | writes answer 503 |"
            in text
        )
        assert (
            "| `tests.unit.test_runbook._registry.<locals>.read` | FAIL-SOFT | `None` | cache miss |" in text
        )

    def test_detection_describes_probe_or_trial(self) -> None:
        """A dependency with a check recovers by probe, one without by trial calls."""
        text = render_runbook(_registry())
        assert "a background check every 2 s (each bounded by 0.8 s)" in text
        assert "one trial call every 0.5 s (no check configured)" in text

    def test_pipes_in_impact_do_not_break_the_table(self) -> None:
        """A '|' in free text is escaped."""
        registry = Registry()
        registry.dependency("x", severity=Severity.SEV2, impact="a | b\nc")
        assert "| x | a \\| b c | SEV-2 |" in render_runbook(registry)


class TestRenderAlerts:
    def test_rules_are_valid_yaml_with_severity_and_runbook(self) -> None:
        """Two rules per dependency and one for flapping, labelled and annotated, parse as YAML."""
        rules = yaml.safe_load(render_alerts(_registry(), runbook_base="https://runbooks.example/"))
        by_name = {r["alert"]: r for r in rules["groups"][0]["rules"]}
        assert set(by_name) == {
            "DegradeDbDown",
            "DegradeDbDegrading",
            "DegradeRedisCacheDown",
            "DegradeRedisCacheDegrading",
            "DegradeDependencyFlapping",
        }
        down = by_name["DegradeDbDown"]
        assert down["expr"] == 'degrade_dependency_up{dependency="db"} == 0'
        assert down["labels"]["severity"] == "critical"
        assert down["annotations"]["runbook_url"] == "https://runbooks.example/db.md"
        assert by_name["DegradeRedisCacheDown"]["labels"]["severity"] == "info"
        assert "degrade_fallback_total" in by_name["DegradeDbDegrading"]["expr"]
        assert "degrade_dependency_flaps_total" in by_name["DegradeDependencyFlapping"]["expr"]


class TestCli:
    def test_runbook_prints_markdown(self, app_module: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`runbook module:attr` prints the runbook and exits 0."""
        assert main(["runbook", f"{app_module}:registry"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("# Runbook")
        assert f"`{app_module}.save` | FAIL-LOUD" in out

    def test_check_passes_on_a_current_file_and_fails_on_a_stale_one(
        self, app_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """`--check FILE` exits 0 when FILE is current, 1 with a diff when it is stale."""
        assert main(["runbook", f"{app_module}:registry"]) == 0
        current = tmp_path / "runbook.md"
        current.write_text(capsys.readouterr().out)
        assert main(["runbook", f"{app_module}:registry", "--check", str(current)]) == 0
        current.write_text(current.read_text().replace("Writes fail", "Nothing fails"))
        assert main(["runbook", f"{app_module}:registry", "--check", str(current)]) == 1
        out = capsys.readouterr().out
        assert "-| db | Nothing fails" in out
        assert "is stale" in out

    def test_middleware_declared_when_built_is_listed(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A module-level app's middleware are built, so the DB gate's site (declared on build) is listed."""
        name = f"rb_gate_{tmp_path.name.replace('-', '_')}"
        (tmp_path / f"{name}.py").write_text(
            textwrap.dedent(
                """
                from sqlalchemy.ext.asyncio import create_async_engine
                from starlette.applications import Starlette
                from starlette.middleware import Middleware

                from degrade import Registry, Severity
                from degrade.db import DBHealthMiddleware, engine_options

                registry = Registry()
                db = registry.dependency("db", severity=Severity.SEV1)
                engine = create_async_engine("postgresql+asyncpg://app@127.0.0.1:1/app", **engine_options())
                app = Starlette(middleware=[Middleware(DBHealthMiddleware, engine=engine, dependency=db)])
                """
            )
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        try:
            assert main(["runbook", f"{name}:registry"]) == 0
        finally:
            sys.modules.pop(name, None)
        assert "| `degrade.db.DBHealthMiddleware` | FAIL-LOUD |" in capsys.readouterr().out

    def test_alerts_prints_yaml(self, app_module: str, capsys: pytest.CaptureFixture[str]) -> None:
        """`alerts module:attr` prints rules that parse."""
        assert main(["alerts", f"{app_module}:registry"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["groups"][0]["name"] == "degrade"

    def test_event_drops_get_a_rule_when_a_publisher_is_registered(self) -> None:
        """A registry with an EventPublisher site gets a DegradeEventsDropped rule."""
        registry = _registry()
        registry["db"].add_site("degrade.eventbus.EventPublisher[x].publish", "fail_soft", "buffered")
        rules = yaml.safe_load(render_alerts(registry))["groups"][0]["rules"]
        dropped = [r for r in rules if r["alert"] == "DegradeEventsDropped"]
        assert len(dropped) == 1
        assert "degrade_eventbus_dropped_total" in dropped[0]["expr"]
        assert "DegradeEventsDropped" not in render_alerts(_registry())

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("no_colon", "expected module:attribute"),
            ("no_such_module_xyz:registry", "cannot import module"),
            ("{mod}:missing", "has no attribute"),
            ("{mod}:not_a_registry", "is a int, not a degrade.Registry"),
        ],
    )
    def test_bad_arguments_exit_2_with_one_line(
        self, app_module: str, spec: str, message: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Bad module:attr specs exit 2 with a one-line message, not a traceback."""
        assert main(["runbook", spec.format(mod=app_module)]) == 2
        err = capsys.readouterr().err
        assert message in err
        assert len(err.strip().splitlines()) == 1
        assert "Traceback" not in err


def _publisher_registry(*, check: bool, spool: bool = False) -> Registry:
    """A registry whose broker dependency has only an EventPublisher site (as the publisher declares it)."""
    registry = Registry()
    mq = registry.dependency(
        "rabbitmq", severity=Severity.SEV2, check=checks.tcp("127.0.0.1", 1) if check else None
    )
    mq.add_site(
        "degrade.eventbus.EventPublisher[events].publish",
        "fail_soft",
        "publish never waits: events are buffered (up to 10) ... after 30s",
        fallback="buffer, then " + ("spool" if spool else "drop"),
    )
    return registry


def _section(text: str, name: str) -> str:
    return text.split(f"## {name} (")[1].split("\n## ", maxsplit=1)[0]


class TestSiteKinds:
    def test_publisher_without_check_recovers_by_its_reconnect_loop_and_never_503s(self) -> None:
        """A publisher's broker: recovery by its reconnect loop, no 503, buffered then dropped."""
        section = _section(render_runbook(_publisher_registry(check=False)), "rabbitmq")
        assert "- Recovery: by the publisher's own reconnect loop (no check configured)" in section
        assert "trial call" not in section
        assert "Retry-After" not in section
        assert "no request answers 503 because rabbitmq is down" in section
        assert "events are buffered, then dropped" in section

    def test_publisher_with_spool_and_check(self) -> None:
        """With a check the probe owns recovery and the publisher reconnects after; a spool is named."""
        section = _section(render_runbook(_publisher_registry(check=True, spool=True)), "rabbitmq")
        assert "a background check every 0.5 s" in section
        assert "the publisher reconnects once it recovers" in section
        assert "events are buffered, then spooled to disk" in section
        assert "Retry-After" not in section

    def test_each_kind_says_what_it_does_while_down(self) -> None:
        """Gate, router, limiter, cache, revocation and decorator sites each get their own line."""
        registry = Registry()
        db = registry.dependency("db", severity=Severity.SEV1, retry_after=7)
        db.add_site("degrade.db.DBHealthMiddleware", "fail_loud", "503")
        db.add_site("degrade.db.ReadReplicaRouter.for_write", "fail_loud", "writes 503")
        # Not "redis": a module imported earlier in this process (examples/app_factory.py) may
        # declare sites by that name, and they are listed under every registry that has it.
        redis = registry.dependency("redis-kinds", severity=Severity.SEV2)
        redis.add_site("degrade.ratelimit.RateLimiter[rl:]", "fail_soft", "memory", fallback="in-memory GCRA")
        redis.add_site("degrade.cache.FailSoftCache[c].read", "fail_soft", "miss", fallback="miss")
        redis.add_site("degrade.revocation.RevocationList[r].revoke", "fail_loud", "503")
        redis.add_site("degrade.revocation.RevocationList[r].is_revoked", "fail_soft", "x", fallback="deny")
        redis.add_site("app.views.profile", "fail_soft", "default profile", fallback="None")
        text = render_runbook(registry)
        db_section, redis_section = _section(text, "db"), _section(text, "redis-kinds")
        assert "- Responses: its 503s carry `Retry-After: 7`" in db_section
        assert "    - DB gate: gated requests answer 503 at once, without touching the pool" in db_section
        assert "    - replica router: routed writes answer 503" in db_section
        assert "    - rate limiter: requests are limited without it: in-memory GCRA" in redis_section
        assert "    - cache: reads are misses" in redis_section
        assert (
            "    - revocation list: `revoke` answers 503; `is_revoked` falls back to `deny`" in redis_section
        )
        assert "    - decorated calls: 1 call site returns its fallback" in redis_section
        assert redis_section.index("rate limiter") < redis_section.index("decorated calls")

    def test_a_dependency_without_sites_has_no_while_down_list(self) -> None:
        """No sites: no 'While down' list, and no 503 claimed."""
        registry = Registry()
        registry.dependency("turn", severity=Severity.SEV3)
        section = _section(render_runbook(registry), "turn")
        assert "While down" not in section
        assert "no request answers 503" in section

    def test_outbox_relay_and_outbox_sites(self) -> None:
        """An outbox relay's broker: rows wait, no 503, its reconnect loop; the outbox's add() on the db."""
        registry = Registry()
        mq = registry.dependency("rabbitmq", severity=Severity.SEV2)
        db = registry.dependency("db", severity=Severity.SEV1)
        mq.add_site("degrade.eventbus.OutboxRelay[outbox]", "fail_soft", "rows wait", fallback="rows wait")
        db.add_site("degrade.eventbus.Outbox[outbox].add", "fail_loud", "add() fails with the transaction")
        text = render_runbook(registry)
        broker = _section(text, "rabbitmq")
        assert "by the outbox relay's own reconnect loop" in broker
        assert "    - outbox relay: never a 503: rows wait in the outbox table" in broker
        assert "Retry-After" not in broker
        assert "    - outbox: `Outbox.add()` fails with the caller's transaction" in _section(text, "db")
