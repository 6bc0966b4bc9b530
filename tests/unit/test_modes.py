"""@fail_soft and @fail_loud on sync and async functions."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import time
from typing import Any

import pytest
import sentry_sdk
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from degrade import (
    ConfigurationError,
    Dependency,
    DependencyUnavailable,
    EscapeHatch,
    Registry,
    Severity,
    _bounded,
    fail_loud,
    fail_soft,
    observe,
    site_of,
)

from ..support import FakeClock, eventually

DSN = "redis://:hunter2@cache.internal:6379/0"


class Bug(Exception):
    """An application bug: not a dependency failure."""


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dep(clock: FakeClock) -> Dependency:
    """A check-less dependency on a frozen clock: while down, no trial call is ever admitted."""
    registry = Registry(clock=clock)
    return registry.dependency("cache", severity=Severity.SEV2, failure_threshold=2, retry_after=7)


class TestFailSoftAsync:
    async def test_passes_through_when_ok(self, dep: Dependency) -> None:
        """While ok, the function is called with its arguments and its value returned."""

        @fail_soft(dep, fallback=None, reason="cache miss")
        async def get(key: str, *, scale: int = 1) -> int:
            return len(key) * scale

        assert await get("abc", scale=2) == 6
        assert site_of(get).degraded_calls == 0

    async def test_dependency_error_returns_value_fallback_and_counts(self, dep: Dependency) -> None:
        """A connection error answers the fallback value and counts one failure."""

        @fail_soft(dep, fallback="fallback", reason="cache miss")
        async def get() -> str:
            raise ConnectionRefusedError(DSN)

        assert await get() == "fallback"
        assert dep.failures == 1
        assert site_of(get).degraded_calls == 1

    async def test_sync_callable_fallback_gets_the_same_arguments(self, dep: Dependency) -> None:
        """A sync callable fallback is called with the call's arguments."""
        seen: list[tuple[Any, ...]] = []

        def fallback(key: str, *, scale: int = 1) -> str:
            seen.append((key, scale))
            return f"fb:{key}"

        @fail_soft(dep, fallback=fallback, reason="cache miss")
        async def get(key: str, *, scale: int = 1) -> str:
            raise TimeoutError

        assert await get("k", scale=3) == "fb:k"
        assert seen == [("k", 3)]

    async def test_async_callable_fallback_is_awaited(self, dep: Dependency) -> None:
        """An async callable fallback is awaited."""

        async def fallback(key: str) -> str:
            await asyncio.sleep(0)
            return f"db:{key}"

        @fail_soft(dep, fallback=fallback, reason="cache miss falls back to Postgres")
        async def get(key: str) -> str:
            raise OSError

        assert await get("k") == "db:k"

    async def test_other_exceptions_propagate_and_do_not_count(self, dep: Dependency) -> None:
        """A bug is not an outage: it propagates unchanged and is not counted."""

        @fail_soft(dep, fallback=None, reason="cache miss")
        async def get() -> None:
            raise Bug("boom")

        with pytest.raises(Bug, match="boom"):
            await get()
        assert dep.failures == 0
        assert site_of(get).degraded_calls == 0

    async def test_cancellation_propagates(self, dep: Dependency) -> None:
        """Cancelling the caller cancels the call; nothing is counted, no fallback."""
        started = asyncio.Event()

        @fail_soft(dep, fallback="fallback", reason="cache miss")
        async def get() -> str:
            started.set()
            await asyncio.Event().wait()
            return "never"

        task = asyncio.create_task(get())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dep.failures == 0
        assert site_of(get).degraded_calls == 0

    async def test_cancelled_error_raised_inside_propagates(self, dep: Dependency) -> None:
        """A CancelledError raised by the function is never turned into a fallback."""

        @fail_soft(dep, fallback="fallback", on=lambda exc: True, reason="cache miss")
        async def get() -> str:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            await get()
        assert dep.failures == 0

    async def test_down_means_not_called(self, dep: Dependency) -> None:
        """While down, the function is not called and the fallback answers."""
        calls = 0

        @fail_soft(dep, fallback=lambda key: f"fb:{key}", reason="cache miss")
        async def get(key: str) -> str:
            nonlocal calls
            calls += 1
            return key

        dep.mark_down()
        assert [await get(str(i)) for i in range(5)] == [f"fb:{i}" for i in range(5)]
        assert calls == 0
        assert site_of(get).degraded_calls == 5

    async def test_threshold_failures_open_it(self, dep: Dependency) -> None:
        """failure_threshold failing calls open the dependency; the next call is not made."""
        calls = 0

        @fail_soft(dep, fallback=None, reason="cache miss")
        async def get() -> int:
            nonlocal calls
            calls += 1
            raise ConnectionResetError

        await get()
        await get()
        assert dep.is_down
        await get()
        assert calls == 2

    async def test_success_resets_failures(self, dep: Dependency) -> None:
        """A successful call resets the consecutive-failure count."""
        fail = True

        @fail_soft(dep, fallback=0, reason="cache miss")
        async def get() -> int:
            if fail:
                raise OSError
            return 1

        await get()
        assert dep.failures == 1
        fail = False
        assert await get() == 1
        assert dep.failures == 0

    async def test_timeout_returns_fallback_and_counts(self, dep: Dependency) -> None:
        """A call outliving timeout= answers the fallback and counts a failure."""

        @fail_soft(dep, fallback="slow", timeout=0.02, reason="cache miss")
        async def get() -> str:
            await asyncio.sleep(10)
            return "late"

        assert await get() == "slow"
        assert (dep.failures, dep.last_error) == (1, "TimeoutError")

    async def test_timeout_counts_even_with_custom_on(self, dep: Dependency) -> None:
        """Timeout expiry is a failure even when on= lists other exceptions."""

        @fail_soft(dep, fallback="slow", on=KeyError, timeout=0.02, reason="cache miss")
        async def get() -> str:
            await asyncio.sleep(10)
            return "late"

        assert await get() == "slow"
        assert dep.failures == 1

    async def test_custom_on_types(self, dep: Dependency) -> None:
        """on= replaces the default set: listed types count, OSError then propagates."""

        @fail_soft(dep, fallback="fb", on=(KeyError,), reason="cache miss")
        async def get(exc: Exception) -> str:
            raise exc

        assert await get(KeyError("k")) == "fb"
        with pytest.raises(OSError):
            await get(OSError())
        assert dep.failures == 1

    async def test_custom_on_predicate(self, dep: Dependency) -> None:
        """on= may be a predicate given the exception."""

        @fail_soft(dep, fallback="fb", on=lambda exc: "transient" in str(exc), reason="cache miss")
        async def get(message: str) -> str:
            raise Bug(message)

        assert await get("transient glitch") == "fb"
        with pytest.raises(Bug):
            await get("real bug")

    async def test_driver_connection_errors_count_by_default(self, dep: Dependency) -> None:
        """The default on= includes installed drivers' connection errors."""
        redis_exceptions = pytest.importorskip("redis.exceptions")

        @fail_soft(dep, fallback="fb", reason="cache miss")
        async def get() -> str:
            raise redis_exceptions.ConnectionError("down")

        assert await get() == "fb"
        assert dep.failures == 1

    async def test_invalidated_dbapi_error_counts_but_other_dbapi_errors_do_not(
        self, dep: Dependency
    ) -> None:
        """A DBAPIError counts only when its connection was invalidated."""
        sa_exc = pytest.importorskip("sqlalchemy.exc")

        @fail_soft(dep, fallback="fb", reason="db read")
        async def run(invalidated: bool) -> str:
            raise sa_exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=invalidated)

        assert await run(True) == "fb"
        with pytest.raises(sa_exc.DBAPIError):
            await run(False)
        assert dep.failures == 1

    async def test_nested_fail_loud_counts_once(self, dep: Dependency) -> None:
        """A fail-loud site inside a fail-soft site on the same dependency counts one failure."""

        @fail_loud(dep, reason="inner")
        async def inner() -> str:
            raise OSError

        @fail_soft(dep, fallback="fb", reason="outer")
        async def outer() -> str:
            return await inner()

        assert await outer() == "fb"
        assert dep.failures == 1

    async def test_trial_call_while_down_recovers(self, dep: Dependency, clock: FakeClock) -> None:
        """Without a probe, one call per recovery_interval is let through and its success closes it."""

        @fail_soft(dep, fallback="fb", reason="cache miss")
        async def get() -> str:
            return "fresh"

        dep.mark_down()
        assert await get() == "fb"
        clock.now += dep.recovery_interval
        assert await get() == "fresh"
        assert dep.state == "ok"


class TestFailSoftSync:
    def test_passes_through_when_ok(self, dep: Dependency) -> None:
        """While ok, the function is called with its arguments."""

        @fail_soft(dep, fallback=None, reason="cache miss")
        def get(key: str) -> str:
            return key.upper()

        assert get("a") == "A"

    def test_dependency_error_returns_value_fallback(self, dep: Dependency) -> None:
        """A connection error answers the fallback value and counts a failure."""

        @fail_soft(dep, fallback=[], reason="cache miss")
        def get() -> list[int]:
            raise ConnectionRefusedError(DSN)

        assert get() == []
        assert dep.failures == 1
        assert site_of(get).degraded_calls == 1

    def test_callable_fallback_gets_the_same_arguments(self, dep: Dependency) -> None:
        """A callable fallback is called with the call's arguments."""

        @fail_soft(dep, fallback=lambda a, b=0: a + b, reason="cache miss")
        def add(a: int, b: int = 0) -> int:
            raise TimeoutError

        assert add(2, b=3) == 5

    def test_other_exceptions_propagate(self, dep: Dependency) -> None:
        """A bug propagates unchanged and is not counted."""

        @fail_soft(dep, fallback=None, reason="cache miss")
        def get() -> None:
            raise Bug

        with pytest.raises(Bug):
            get()
        assert dep.failures == 0

    def test_cancelled_error_propagates(self, dep: Dependency) -> None:
        """CancelledError is never caught, even by a predicate that accepts anything."""

        @fail_soft(dep, fallback=None, on=lambda exc: True, reason="cache miss")
        def get() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            get()
        assert dep.failures == 0

    def test_down_means_not_called(self, dep: Dependency) -> None:
        """While down, the function is not called; a callable fallback answers."""
        calls = 0

        @fail_soft(dep, fallback=lambda key: "fb", reason="cache miss")
        def get(key: str) -> str:
            nonlocal calls
            calls += 1
            return key

        dep.mark_down()
        assert get("a") == "fb"
        assert calls == 0

    def test_success_resets_failures(self, dep: Dependency) -> None:
        """A success resets the failure count."""
        results: list[object] = [OSError(), "ok"]

        @fail_soft(dep, fallback=None, reason="cache miss")
        def get() -> object:
            result = results.pop(0)
            if isinstance(result, Exception):
                raise result
            return result

        get()
        assert dep.failures == 1
        assert get() == "ok"
        assert dep.failures == 0

    def test_timeout_needs_async(self, dep: Dependency) -> None:
        """timeout= on a sync function is a configuration error."""
        with pytest.raises(ConfigurationError, match="timeout= needs an async function"):

            @fail_soft(dep, fallback=None, timeout=1.0, reason="cache miss")
            def get() -> None: ...

    def test_async_fallback_needs_async_function(self, dep: Dependency) -> None:
        """An async fallback on a sync function is a configuration error."""

        async def fallback() -> None: ...

        with pytest.raises(ConfigurationError, match="must be a value or a sync callable"):

            @fail_soft(dep, fallback=fallback, reason="cache miss")
            def get() -> None: ...


class TestFailLoudAsync:
    async def test_passes_through_when_ok(self, dep: Dependency) -> None:
        """While ok, the function's value is returned."""

        @fail_loud(dep, reason="sessions live in Redis")
        async def load(token: str) -> str:
            return f"session:{token}"

        assert await load("t") == "session:t"

    async def test_down_raises_without_calling(self, dep: Dependency) -> None:
        """While down, DependencyUnavailable is raised and the function is not called."""
        calls = 0

        @fail_loud(dep, reason="sessions live in Redis")
        async def load() -> None:
            nonlocal calls
            calls += 1

        dep.mark_down()
        with pytest.raises(DependencyUnavailable) as info:
            await load()
        assert calls == 0
        assert (info.value.dependency_name, info.value.retry_after) == ("cache", 7)
        assert site_of(load).degraded_calls == 1

    async def test_failure_raises_unavailable_from_the_cause(self, dep: Dependency) -> None:
        """A dependency error becomes DependencyUnavailable, the original kept as __cause__."""
        original = ConnectionRefusedError(DSN)

        @fail_loud(dep, reason="sessions live in Redis", retry_after=30)
        async def load() -> None:
            raise original

        with pytest.raises(DependencyUnavailable) as info:
            await load()
        assert info.value.__cause__ is original
        assert info.value.retry_after == 30
        assert "hunter2" not in str(info.value)
        assert "hunter2" not in info.value.detail
        assert dep.failures == 1

    async def test_other_exceptions_propagate(self, dep: Dependency) -> None:
        """A bug propagates unchanged and is not counted."""

        @fail_loud(dep, reason="sessions live in Redis")
        async def load() -> None:
            raise Bug

        with pytest.raises(Bug):
            await load()
        assert dep.failures == 0
        assert site_of(load).degraded_calls == 0

    async def test_cancellation_propagates(self, dep: Dependency) -> None:
        """Cancelling the caller propagates CancelledError and counts nothing."""
        started = asyncio.Event()

        @fail_loud(dep, timeout=5.0, reason="sessions live in Redis")
        async def load() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(load())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert dep.failures == 0

    async def test_timeout_raises_unavailable(self, dep: Dependency) -> None:
        """A call outliving timeout= counts a failure and raises DependencyUnavailable."""

        @fail_loud(dep, timeout=0.02, on=KeyError, reason="sessions live in Redis")
        async def load() -> None:
            await asyncio.sleep(10)

        with pytest.raises(DependencyUnavailable) as info:
            await load()
        assert isinstance(info.value.__cause__, TimeoutError)
        assert dep.failures == 1

    async def test_nested_unavailable_passes_through(self, dep: Dependency, clock: FakeClock) -> None:
        """A DependencyUnavailable from an inner site propagates as is and is not counted again."""
        other = Registry(clock=clock).dependency("db", severity=Severity.SEV1)
        other.mark_down()

        @fail_loud(other, reason="inner")
        async def inner() -> None: ...

        @fail_loud(dep, reason="outer")
        async def outer() -> None:
            await inner()

        with pytest.raises(DependencyUnavailable) as info:
            await outer()
        assert info.value.dependency_name == "db"
        assert dep.failures == 0
        assert site_of(outer).degraded_calls == 0


class TestFailLoudSync:
    def test_passes_through_when_ok(self, dep: Dependency) -> None:
        """While ok, the function's value is returned."""

        @fail_loud(dep, reason="sessions live in Redis")
        def load(token: str) -> str:
            return token

        assert load("t") == "t"

    def test_down_raises_without_calling(self, dep: Dependency) -> None:
        """While down, DependencyUnavailable is raised and the function is not called."""
        calls = 0

        @fail_loud(dep, reason="sessions live in Redis")
        def load() -> None:
            nonlocal calls
            calls += 1

        dep.mark_down()
        with pytest.raises(DependencyUnavailable):
            load()
        assert calls == 0

    def test_failure_raises_unavailable(self, dep: Dependency) -> None:
        """A dependency error becomes DependencyUnavailable and counts."""

        @fail_loud(dep, reason="sessions live in Redis")
        def load() -> None:
            raise OSError(DSN)

        with pytest.raises(DependencyUnavailable) as info:
            load()
        assert isinstance(info.value.__cause__, OSError)
        assert dep.failures == 1

    def test_other_exceptions_propagate(self, dep: Dependency) -> None:
        """A bug propagates unchanged."""

        @fail_loud(dep, reason="sessions live in Redis")
        def load() -> None:
            raise Bug

        with pytest.raises(Bug):
            load()
        assert dep.failures == 0

    def test_cancelled_error_propagates(self, dep: Dependency) -> None:
        """CancelledError is never caught."""

        @fail_loud(dep, on=lambda exc: True, reason="sessions live in Redis")
        def load() -> None:
            raise asyncio.CancelledError

        with pytest.raises(asyncio.CancelledError):
            load()
        assert dep.failures == 0

    def test_timeout_needs_async(self, dep: Dependency) -> None:
        """timeout= on a sync function is a configuration error."""
        with pytest.raises(ConfigurationError, match="timeout= needs an async function"):

            @fail_loud(dep, timeout=1.0, reason="sessions live in Redis")
            def load() -> None: ...


class TestValidation:
    def test_first_argument_must_be_a_dependency(self) -> None:
        """Passing something else than a Dependency or its name is refused with a hint."""
        with pytest.raises(ConfigurationError, match=r"registry\.dependency\(\)"):
            fail_soft(42, fallback=None, reason="x")  # type: ignore[call-overload]

    @pytest.mark.parametrize("reason", ["", "   "])
    def test_reason_is_required(self, dep: Dependency, reason: str) -> None:
        """An empty reason is refused: the runbook needs it."""
        with pytest.raises(ConfigurationError, match="reason= is required"):
            fail_soft(dep, fallback=None, reason=reason)
        with pytest.raises(ConfigurationError, match="reason= is required"):
            fail_loud(dep, reason=reason)

    @pytest.mark.parametrize("timeout", [0, -1, True, "1", math.inf, -math.inf, math.nan])
    def test_timeout_must_be_positive(self, dep: Dependency, timeout: Any) -> None:
        """timeout= must be a finite positive number (never a bool, infinity or NaN), on both modes."""
        with pytest.raises(ConfigurationError, match="timeout must be a finite number of seconds > 0"):
            fail_soft(dep, fallback=None, timeout=timeout, reason="x")
        with pytest.raises(ConfigurationError, match="timeout must be a finite number of seconds > 0"):
            fail_loud(dep, timeout=timeout, reason="x")

    @pytest.mark.parametrize("retry_after", [-1, 1.5, True, math.inf, math.nan])
    def test_retry_after_must_be_whole_seconds(self, dep: Dependency, retry_after: Any) -> None:
        """retry_after= must be a whole number of seconds >= 0."""
        with pytest.raises(ConfigurationError, match="retry_after"):
            fail_loud(dep, reason="x", retry_after=retry_after)

    @pytest.mark.parametrize("on", [asyncio.CancelledError, (OSError, KeyboardInterrupt), (OSError, "x")])
    def test_on_takes_exception_subclasses_only(self, dep: Dependency, on: Any) -> None:
        """on= refuses BaseExceptions (CancelledError...) and non-types."""
        with pytest.raises(ConfigurationError, match="Exception subclasses"):
            fail_soft(dep, fallback=None, on=on, reason="x")

    def test_on_refuses_other_objects(self, dep: Dependency) -> None:
        """on= refuses something that is neither types nor a predicate."""
        with pytest.raises(ConfigurationError, match="on= takes"):
            fail_loud(dep, on=42, reason="x")  # type: ignore[arg-type]


class TestSites:
    def test_each_site_registers_on_its_dependency(self, dep: Dependency) -> None:
        """Decorating registers a Site with qualified name, mode, reason and fallback."""

        @fail_soft(dep, fallback=None, reason="cache miss falls back to Postgres")
        async def cached() -> None: ...

        @fail_loud(dep, reason="login unavailable")
        def session() -> None: ...

        soft, loud = dep.sites
        assert soft is site_of(cached)
        assert loud is site_of(session)
        assert soft.name == f"{__name__}.{cached.__qualname__}"
        assert (soft.dependency_name, soft.mode, soft.reason, soft.fallback) == (
            "cache",
            "fail_soft",
            "cache miss falls back to Postgres",
            "None",
        )
        assert (loud.mode, loud.reason, loud.fallback) == ("fail_loud", "login unavailable", None)

    def test_fallback_description(self, dep: Dependency) -> None:
        """A callable fallback is described by its qualified name, a long value is shortened."""

        def from_db() -> None: ...

        @fail_soft(dep, fallback=from_db, reason="x")
        def a() -> None: ...

        @fail_soft(dep, fallback="x" * 100, reason="x")
        def b() -> None: ...

        assert site_of(a).fallback == f"{__name__}.{from_db.__qualname__}"
        description = site_of(b).fallback
        assert description is not None
        assert len(description) == 60
        assert description.endswith("...")

    def test_site_of_undecorated_raises(self) -> None:
        """site_of on a plain function says it is not decorated."""

        def plain() -> None: ...

        with pytest.raises(ConfigurationError, match="not decorated"):
            site_of(plain)

    def test_wrappers_keep_name_doc_and_signature(self, dep: Dependency) -> None:
        """functools.wraps keeps the name, docstring, signature and coroutine-ness."""

        async def original(track_id: int, *, full: bool = False) -> dict[str, int]:
            """Load a track."""
            return {}

        soft = fail_soft(dep, fallback=None, reason="x")(original)
        loud = fail_loud(dep, reason="x")(original)
        for wrapped in (soft, loud):
            assert wrapped.__name__ == "original"
            assert wrapped.__doc__ == "Load a track."
            assert inspect.signature(wrapped) == inspect.signature(original)
            assert inspect.iscoroutinefunction(wrapped)


class TestAbandonCap:
    """Calls abandoned at timeout= are capped per process; at the cap the site answers without calling."""

    @pytest.fixture
    def roomy(self, clock: FakeClock) -> Dependency:
        """A dependency that stays ok through a few timeouts (so the cap, not the state, decides)."""
        return Registry(clock=clock).dependency("scanner", severity=Severity.SEV2, failure_threshold=10)

    @staticmethod
    def slow_to_unwind(release: asyncio.Event, calls: list[int]) -> Any:
        async def scan() -> str:
            calls.append(1)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                await asyncio.wait_for(release.wait(), 5)  # a clean-up that outlives the bound
                raise
            return "scanned"

        return scan

    async def test_fail_soft_answers_the_fallback_at_the_cap(
        self, roomy: Dependency, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Two calls unwinding with a cap of 2: the next ones get the fallback at once, uncalled, unblamed."""
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 2)
        monkeypatch.setattr(observe, "_abandon_log_due", 0.0)
        release, calls = asyncio.Event(), []
        scan = fail_soft(roomy, fallback="unscanned", timeout=0.02, reason="x")(
            self.slow_to_unwind(release, calls)
        )
        refused_before = _bounded.Abandoned.refused
        metric_before = REGISTRY.get_sample_value("degrade_abandoned_refused_total") or 0.0
        try:
            assert [await scan(), await scan()] == ["unscanned", "unscanned"]  # both abandoned at the bound
            assert _bounded.abandoned_in_flight() == 2
            with capture_logs() as logs:
                assert [await scan(), await scan()] == ["unscanned", "unscanned"]  # refused at the cap
            assert len(calls) == 2  # the function was not called again
            assert roomy.failures == 2  # the cap is not the scanner's failure
            assert site_of(scan).degraded_calls == 2  # the two timeouts; the refusals are shed
            assert site_of(scan).shed_calls == {"abandoned-cap": 2}
            assert _bounded.Abandoned.refused == refused_before + 2
            assert REGISTRY.get_sample_value("degrade_abandoned_refused_total") == metric_before + 2
            capped = [e for e in logs if e["event"] == "degrade.abandoned_cap"]
            assert len(capped) == 1  # rate-limited: one line for both
            assert capped[0]["where"] == site_of(scan).name
            assert (capped[0]["in_flight"], capped[0]["cap"]) == (2, 2)
        finally:
            release.set()
            assert await _bounded.settle_abandoned(5.0) == 0
        assert await scan() == "unscanned"  # room again: called (and abandoned) once more
        assert len(calls) == 3
        release.set()
        await _bounded.settle_abandoned(5.0)

    async def test_fail_loud_refuses_at_the_cap(
        self, roomy: Dependency, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """At the cap a fail-loud site raises DependencyUnavailable without calling."""
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 1)
        release, calls = asyncio.Event(), []
        scan = fail_loud(roomy, timeout=0.02, reason="x")(self.slow_to_unwind(release, calls))
        try:
            with pytest.raises(DependencyUnavailable):
                await scan()  # abandoned at the bound
            with pytest.raises(DependencyUnavailable):
                await scan()  # refused at the cap
            assert len(calls) == 1
            assert roomy.failures == 1
        finally:
            release.set()
            await _bounded.settle_abandoned(5.0)


class TestSaturationIsNotAnOutage:
    """At the abandoned-work cap a timeout= site sheds: policy answer, counted, dependency untouched."""

    @pytest.fixture
    def full(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The process-wide cap of abandoned calls is reached (a cap of 0: no room at all)."""
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 0)
        monkeypatch.setattr(observe, "_abandon_log_due", 0.0)

    @staticmethod
    def assert_untouched(dep: Dependency, sentry_events: list[dict[str, Any]]) -> None:
        sentry_sdk.flush()
        assert dep.state == "ok"
        assert dep.failures == 0
        assert dep.last_error is None
        assert sentry_events == []

    async def test_fail_soft_sheds_to_its_fallback(
        self, dep: Dependency, full: None, sentry_events: list[dict[str, Any]]
    ) -> None:
        """Fallback without calling; shed_calls["abandoned-cap"] counts each; no failure, no Sentry event."""
        calls: list[int] = []

        @fail_soft(dep, fallback="cached", timeout=5.0, reason="x")
        async def get() -> str:
            calls.append(1)
            return "fresh"

        site = site_of(get)
        with capture_logs() as logs:
            assert [await get() for _ in range(3)] == ["cached"] * 3
        assert calls == []
        assert site.shed_calls == {"abandoned-cap": 3}
        assert site.degraded_calls == 0  # saturation is not counted as an outage answer
        shed_lines = [e for e in logs if e["event"] == "degrade.shed"]
        assert len(shed_lines) == 1  # rate-limited per site
        assert (shed_lines[0]["site"], shed_lines[0]["reason"]) == (site.name, "abandoned-cap")
        self.assert_untouched(dep, sentry_events)

    async def test_fail_loud_sheds_with_a_503(
        self, dep: Dependency, full: None, sentry_events: list[dict[str, Any]]
    ) -> None:
        """DependencyUnavailable (503) without calling, counted as shed, not as a failure."""
        calls: list[int] = []

        @fail_loud(dep, timeout=5.0, reason="x")
        async def load() -> str:
            calls.append(1)
            return "session"

        for _ in range(3):
            with pytest.raises(DependencyUnavailable) as info:
                await load()
            assert info.value.dependency_name == "cache"
            assert info.value.retry_after == 7
            assert "busy" in info.value.detail
        assert calls == []
        assert site_of(load).shed_calls == {"abandoned-cap": 3}
        assert site_of(load).degraded_calls == 0
        self.assert_untouched(dep, sentry_events)

    async def test_fail_loud_with_an_open_hatch_sheds_to_the_hatch(self, dep: Dependency, full: None) -> None:
        """An open hatch still answers instead of the 503; the call is counted as shed only."""
        hatch = EscapeHatch("SCAN", dependency=dep, reason="x", fallback="unscanned")
        hatch.open(by="test")

        @fail_loud(dep, timeout=5.0, hatch=hatch, reason="x")
        async def scan() -> str:
            return "scanned"

        assert await scan() == "unscanned"
        assert site_of(scan).shed_calls == {"abandoned-cap": 1}
        assert site_of(scan).degraded_calls == 0
        assert dep.failures == 0
        hatch.close()


class TestInFlightWhenItGoesDown:
    """A timeout= call in flight when its dependency goes down is answered at once, not at its bound."""

    @staticmethod
    def hanging(started: asyncio.Event, unwound: list[bool]) -> Any:
        async def call() -> str:
            started.set()
            try:
                await asyncio.Event().wait()  # never answers
            except asyncio.CancelledError:
                unwound.append(True)
                raise
            return "answer"

        return call

    async def test_fail_soft_answers_its_fallback_at_once(self, dep: Dependency) -> None:
        """mark_down() mid-call: the fallback within 0.2 s of a 5 s bound; counted and abandoned."""
        started, unwound = asyncio.Event(), []
        get = fail_soft(dep, fallback="fallback", timeout=5.0, reason="x")(self.hanging(started, unwound))
        abandoned = _bounded.Abandoned.total
        task = asyncio.ensure_future(get())
        await started.wait()
        start = time.perf_counter()
        dep.mark_down()
        assert await task == "fallback"
        assert time.perf_counter() - start < 0.2
        assert site_of(get).degraded_calls == 1
        assert site_of(get).shed_calls == {}
        assert _bounded.Abandoned.total == abandoned + 1  # abandoned, as at the bound
        assert dep.failures == dep.failure_threshold  # mark_down's; the call added none
        await _bounded.settle_abandoned(1.0)
        assert unwound == [True]

    async def test_fail_loud_raises_at_once(self, dep: Dependency) -> None:
        """A fail-loud call in flight raises DependencyUnavailable as soon as the dependency goes down."""
        started, unwound = asyncio.Event(), []
        load = fail_loud(dep, timeout=5.0, reason="x")(self.hanging(started, unwound))
        task = asyncio.ensure_future(load())
        await started.wait()
        start = time.perf_counter()
        dep.mark_down()
        with pytest.raises(DependencyUnavailable) as info:
            await task
        assert time.perf_counter() - start < 0.2
        assert info.value.dependency_name == "cache"
        assert site_of(load).degraded_calls == 1
        await _bounded.settle_abandoned(1.0)
        assert unwound == [True]

    async def test_fail_loud_with_an_open_hatch_answers_the_hatch(self, dep: Dependency) -> None:
        """An open hatch answers the in-flight call instead of the 503."""
        hatch = EscapeHatch("H", dependency=dep, reason="x", fallback="hatched")
        hatch.open(by="test")
        started, unwound = asyncio.Event(), []
        load = fail_loud(dep, timeout=5.0, hatch=hatch, reason="x")(self.hanging(started, unwound))
        task = asyncio.ensure_future(load())
        await started.wait()
        dep.mark_down()
        assert await asyncio.wait_for(task, 0.2) == "hatched"
        hatch.close()
        await _bounded.settle_abandoned(1.0)

    async def test_other_callers_failures_end_every_call_in_flight(self, dep: Dependency) -> None:
        """Twenty calls hang; two failing calls open the dependency: all twenty answer at once."""
        started, unwound = asyncio.Event(), []
        get = fail_soft(dep, fallback=None, timeout=5.0, reason="x")(self.hanging(started, unwound))

        @fail_soft(dep, fallback="failed", reason="y")
        async def failing() -> str:
            raise ConnectionRefusedError

        tasks = [asyncio.ensure_future(get()) for _ in range(20)]
        await started.wait()
        await asyncio.sleep(0)
        start = time.perf_counter()
        assert [await failing(), await failing()] == ["failed", "failed"]
        assert dep.is_down
        assert await asyncio.gather(*tasks) == [None] * 20
        assert time.perf_counter() - start < 0.2
        assert dep.failures == 2  # the two real failures; the interrupted calls add none
        assert site_of(get).degraded_calls == 20
        await _bounded.settle_abandoned(1.0)
        assert len(unwound) == 20

    async def test_an_answer_that_arrived_first_wins(self, dep: Dependency) -> None:
        """A call that already finished is not turned into a fallback by a later outage."""

        @fail_soft(dep, fallback="fallback", timeout=5.0, reason="x")
        async def get() -> str:
            return "answer"

        assert await get() == "answer"
        dep.mark_down()
        assert site_of(get).degraded_calls == 0

    async def test_no_timeout_means_no_race(self, dep: Dependency) -> None:
        """Without timeout= the call is awaited inline (no task): it runs on to its own end.

        Racing would cost a task per healthy call; a site that wants in-flight
        calls ended on an outage declares a bound.
        """
        release = asyncio.Event()

        @fail_soft(dep, fallback="fallback", reason="x")
        async def get() -> str:
            await release.wait()
            return "answer"

        task = asyncio.ensure_future(get())
        await asyncio.sleep(0.01)
        dep.mark_down()
        await asyncio.sleep(0.05)
        assert not task.done()
        release.set()
        assert await task == "answer"

    async def test_cancelling_the_caller_still_propagates(self, dep: Dependency) -> None:
        """CancelledError is never swallowed; the shared went_down() future is left alone."""
        started, unwound = asyncio.Event(), []
        get = fail_soft(dep, fallback="fallback", timeout=5.0, reason="x")(self.hanging(started, unwound))
        task = asyncio.ensure_future(get())
        await started.wait()
        down = dep.went_down()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not down.cancelled()
        assert not down.done()
        await _bounded.settle_abandoned(1.0)
        assert unwound == [True]

    async def test_healthy_calls_leave_no_callback_on_the_shared_future(self, dep: Dependency) -> None:
        """Each call's wait removes its callback from went_down(): nothing accumulates while ok."""

        @fail_soft(dep, fallback=None, timeout=5.0, reason="x")
        async def get(i: int) -> int:
            return i

        assert await asyncio.gather(*(get(i) for i in range(100))) == list(range(100))
        assert not dep.went_down()._callbacks  # type: ignore[attr-defined]


class TestStaleFailures:
    """A call in flight through an outage and its recovery fails as old news: not a new failure."""

    @pytest.mark.parametrize("mode", ["soft", "loud"])
    async def test_a_call_older_than_the_recovery_does_not_count(
        self, dep: Dependency, clock: FakeClock, mode: str
    ) -> None:
        """The dependency went down and recovered while the call ran: its failure counts nothing."""
        release = asyncio.Event()

        async def slow_then_reset() -> str:
            await release.wait()
            raise ConnectionResetError("cut when it went down")

        wrapped = (
            fail_soft(dep, fallback="fallback", reason="x")(slow_then_reset)
            if mode == "soft"
            else fail_loud(dep, reason="x")(slow_then_reset)
        )
        call = asyncio.ensure_future(wrapped())
        await asyncio.sleep(0)
        dep.mark_down()
        clock.advance(1.0)
        dep.record_success()  # back before the call in flight answers
        release.set()
        if mode == "soft":
            assert await call == "fallback"
        else:
            with pytest.raises(DependencyUnavailable):
                await call
        assert (dep.state, dep.failures, dep.stale_failures) == ("ok", 0, 1)
        fresh = asyncio.ensure_future(wrapped())  # started after the recovery: counts as ever
        release.set()
        with contextlib.suppress(DependencyUnavailable):
            await fresh
        assert dep.failures == 1


class TestHardTimeoutCancelOn:
    async def test_cancel_on_abandons_the_work(self) -> None:
        """cancel_on completing ends the wait with Interrupted; the work is cancelled and counted."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        started, cancelled = asyncio.Event(), []

        async def work() -> int:
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise
            return 1

        before = _bounded.Abandoned.total
        task = asyncio.ensure_future(_bounded.hard_timeout(work(), 5.0, fut))
        await started.wait()
        fut.set_result(None)
        with pytest.raises(_bounded.Interrupted) as info:
            await task
        assert info.value.cancel_on is fut
        assert not isinstance(info.value, TimeoutError)
        assert _bounded.Abandoned.total == before + 1
        await eventually(lambda: cancelled == [True], within=1.0)

    async def test_the_bound_still_applies(self) -> None:
        """A pending cancel_on does not lift the bound: TimeoutError at timeout."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with pytest.raises(TimeoutError):
            await _bounded.hard_timeout(asyncio.sleep(10), 0.02, fut)
        assert not fut.done()

    async def test_a_result_is_returned_when_cancel_on_is_pending(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        assert await _bounded.hard_timeout(asyncio.sleep(0, "ok"), 1.0, fut) == "ok"
        assert not fut.done()


def test_the_wrappers_stay_importable_from_degrade_modes() -> None:
    """The wrappers live in degrade._wrappers; SHED_ABANDONED is still importable from degrade.modes."""
    from degrade import _wrappers, modes

    assert modes.SHED_ABANDONED == _wrappers.SHED_ABANDONED == "abandoned-cap"
    assert modes.FailSoft is _wrappers.FailSoft
    assert modes.FailLoud is _wrappers.FailLoud
