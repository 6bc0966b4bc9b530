"""Escape hatches: an operator switch that softens a fail-loud site, loudly."""

from __future__ import annotations

import httpx
import pytest
import sentry_sdk
from starlette.applications import Starlette
from structlog.testing import capture_logs

from degrade import DependencyUnavailable, Registry, Severity, fail_loud, health_routes
from degrade.runbook import render_runbook

from ..support import CapturingTransport, FakeClock


def _scanner(registry: Registry):
    return registry.dependency("scanner", severity=Severity.SEV2, failure_threshold=1)


class TestEscapeHatch:
    async def test_closed_hatch_keeps_the_site_fail_loud(self) -> None:
        """While closed, a failing site raises DependencyUnavailable as usual."""
        registry = Registry()
        dep = _scanner(registry)
        hatch = registry.escape_hatch(
            "CLAMAV_REQUIRED", dependency=dep, reason="unscanned", fallback="skipped"
        )

        @fail_loud(dep, hatch=hatch, reason="uploads 503")
        async def scan(data: bytes) -> str:
            raise ConnectionRefusedError

        with pytest.raises(DependencyUnavailable):
            await scan(b"x")
        with pytest.raises(DependencyUnavailable):  # now down: refused without a call
            await scan(b"x")
        assert hatch.uses == 0

    async def test_open_hatch_answers_with_the_fallback_and_reports_every_use(self) -> None:
        """While open, failures and a down dependency give the fallback; uses are security warnings."""
        clock = FakeClock(0.0)
        registry = Registry(clock=clock)
        dep = _scanner(registry)
        hatch = registry.escape_hatch(
            "CLAMAV_REQUIRED",
            dependency=dep,
            reason="uploads go through unscanned",
            fallback=lambda data: f"unscanned:{len(data)}",
            log_interval=10,
        )
        calls = 0

        @fail_loud(dep, hatch=hatch, reason="uploads 503")
        async def scan(data: bytes) -> str:
            nonlocal calls
            calls += 1
            raise ConnectionRefusedError

        with capture_logs() as logs:
            hatch.open(by="ops: INC-1")
            assert await scan(b"abc") == "unscanned:3"  # the call failed: the hatch answers
            for _ in range(5):
                assert await scan(b"abcd") == "unscanned:4"  # down: not called at all
            clock.now = 11  # past recovery_interval: one trial call goes through, fails again
            assert await scan(b"a") == "unscanned:1"
            hatch.close()
        assert calls == 2
        assert hatch.uses == 7
        logs = [e for e in logs if e["event"].startswith("degrade.escape_hatch")]
        events = [(e["event"], e.get("uses")) for e in logs]
        assert events == [
            ("degrade.escape_hatch.opened", None),
            ("degrade.escape_hatch.used", 1),  # the first use at once
            ("degrade.escape_hatch.used", 6),  # then one summary per interval
            ("degrade.escape_hatch.closed", 7),
        ]
        assert all(e["security"] == "escape_hatch" for e in logs)
        assert [e["transition"] for e in logs] == ["opened", "used", "used", "closed"]
        assert logs[0]["by"] == "ops: INC-1"
        with pytest.raises(DependencyUnavailable):
            await scan(b"x")

    def test_sync_site_uses_the_hatch_too(self) -> None:
        """A sync fail-loud site answers through an open hatch."""
        registry = Registry()
        dep = _scanner(registry)
        hatch = registry.escape_hatch("H", dependency=dep, reason="r", fallback=None)

        @fail_loud(dep, hatch=hatch, reason="x")
        def scan() -> str:
            raise ConnectionRefusedError

        hatch.open()
        assert scan() is None

    def test_environment_opens_it_at_start(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """CLAMAV_REQUIRED=false in the environment opens the hatch when it is declared."""
        monkeypatch.setenv("CLAMAV_REQUIRED", "False")
        registry = Registry()
        hatch = registry.escape_hatch(
            "CLAMAV_REQUIRED", dependency=_scanner(registry), reason="r", fallback=None, env="CLAMAV_REQUIRED"
        )
        assert hatch.is_open
        assert hatch.opened_by == "environment: CLAMAV_REQUIRED"
        monkeypatch.setenv("OTHER_REQUIRED", "true")
        other = registry.escape_hatch(
            "OTHER", dependency=registry["scanner"], reason="r", fallback=None, env="OTHER_REQUIRED"
        )
        assert not other.is_open

    def test_bad_declarations_are_rejected(self) -> None:
        """Duplicate names, foreign dependencies, missing reasons and mismatched sites raise ValueError."""
        registry = Registry()
        dep = _scanner(registry)
        registry.escape_hatch("H", dependency=dep, reason="r", fallback=None)
        with pytest.raises(ValueError, match="already registered"):
            registry.escape_hatch("H", dependency=dep, reason="r", fallback=None)
        other = Registry().dependency("scanner", severity=Severity.SEV2)
        with pytest.raises(ValueError, match="not a dependency of this registry"):
            registry.escape_hatch("X", dependency=other, reason="r", fallback=None)
        with pytest.raises(ValueError, match="reason= is required"):
            registry.escape_hatch("Y", dependency=dep, reason=" ", fallback=None)
        db = registry.dependency("db", severity=Severity.SEV1)
        with pytest.raises(ValueError, match="same dependency"):
            fail_loud(db, reason="x", hatch=registry.hatches["H"])

    async def test_health_details_and_runbook_show_it(self) -> None:
        """/health/deep details list the hatch and whether it is open; the runbook lists it."""
        registry = Registry()
        dep = _scanner(registry)
        hatch = registry.escape_hatch(
            "CLAMAV_REQUIRED",
            dependency=dep,
            reason="infected files may be distributed",
            fallback=None,
            env="X",
        )

        @fail_loud(dep, hatch=hatch, reason="uploads 503")
        async def scan() -> None: ...

        hatch.open(by="ops")
        app = Starlette(routes=health_routes(registry, details=True))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = (await client.get("/health/deep")).json()
        assert body["details"]["scanner"]["escape_hatches"] == [
            {"name": "CLAMAV_REQUIRED", "open": True, "uses": 0, "opened_by": "ops"}
        ]
        text = render_runbook(registry)
        assert (
            "| `CLAMAV_REQUIRED` | `X=false` at start-up, or `hatch.open()` "
            "| infected files may be distributed |" in text
        )
        assert "(escape hatch `CLAMAV_REQUIRED`)" in text


class TestSentry:
    def test_opening_and_using_are_security_tagged_events(self, sentry: CapturingTransport) -> None:
        """Each report goes to Sentry with degrade.security=escape_hatch."""
        registry = Registry()
        hatch = registry.escape_hatch("H", dependency=_scanner(registry), reason="r", fallback=None)
        hatch.open()
        hatch.used("site")
        sentry_sdk.flush()
        events = [item.payload.json for env in sentry.envelopes for item in env.items if item.type == "event"]
        assert len(events) == 2
        assert all(e["tags"]["degrade.security"] == "escape_hatch" for e in events)
        assert {e["tags"]["degrade.hatch"] for e in events} == {"H"}
        assert [e["tags"]["degrade.transition"] for e in events] == ["opened", "used"]
