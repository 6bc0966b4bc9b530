"""RevocationList against an in-process Redis double (no services)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

import pytest
import sentry_sdk
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from structlog.testing import capture_logs

from degrade import ConfigurationError, DependencyUnavailable, Registry, Severity, _bounded
from degrade.dependency import Site
from degrade.revocation import RevocationList

from ..support import FakeClock, FakeRedis


@pytest.fixture
def fake() -> FakeRedis:
    return FakeRedis()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dep(registry: Registry) -> Any:
    async def check() -> None:
        raise RedisConnectionError("still down")

    return registry.dependency("redis", severity=Severity.SEV1, check=check, recovery_interval=5)


def make(fake: FakeRedis, dep: Any, clock: FakeClock, on_outage: Any, **kw: Any) -> RevocationList:
    return RevocationList(
        fake, dep, on_outage=on_outage, token_ttl=900, prefix="r:", timeout=0.1, clock=clock, **kw
    )


class TestPolicyIsRequired:
    def test_on_outage_has_no_default(self, fake: FakeRedis, dep: Any) -> None:
        """Building a list without on_outage is a TypeError: the choice must be written down."""
        with pytest.raises(TypeError, match="on_outage"):
            RevocationList(fake, dep)  # type: ignore[call-arg]

    @pytest.mark.parametrize("bad", [None, "", "open", "ALLOW", True])
    def test_unknown_policy(self, fake: FakeRedis, dep: Any, bad: Any) -> None:
        """Only deny, raise and allow are accepted; the message names them."""
        with pytest.raises(ConfigurationError, match=r"'deny'.*'raise'.*'allow'"):
            RevocationList(fake, dep, on_outage=bad)

    def test_other_bad_arguments(self, fake: FakeRedis, dep: Any) -> None:
        """token_ttl, max_local and dependency are validated."""
        with pytest.raises(ConfigurationError, match="token_ttl"):
            RevocationList(fake, dep, on_outage="deny", token_ttl=0)
        with pytest.raises(ConfigurationError, match="max_local"):
            RevocationList(fake, dep, on_outage="deny", max_local=0)
        with pytest.raises(ConfigurationError, match="Dependency"):
            RevocationList(fake, 42, on_outage="deny")  # type: ignore[arg-type]


NOT_A_NUMBER = [math.inf, -math.inf, math.nan, True]


def refused(arg: str, bad: object) -> str:
    """The message of a refused argument: its name, what it takes, what it got."""
    return rf"^{re.escape(arg)} must be .+; got {re.escape(repr(bad))}$"


class TestOneRuleForEveryArgument:
    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize("arg", ["token_ttl", "max_local"])
    def test_constructor(self, fake: FakeRedis, dep: Any, arg: str, bad: object) -> None:
        """Infinity, NaN and a bool are refused at construction, naming the argument."""
        with pytest.raises(ConfigurationError, match=refused(arg, bad)):
            RevocationList(fake, dep, on_outage="deny", **{arg: bad})

    @pytest.mark.parametrize("bad", [*NOT_A_NUMBER, 0, -1], ids=repr)
    async def test_revoke_ttl(self, fake: FakeRedis, dep: Any, clock: FakeClock, bad: object) -> None:
        """revoke(ttl=) takes the same rule; nothing is remembered or written when it is refused."""
        rl = make(fake, dep, clock, "deny")
        with pytest.raises(ConfigurationError, match=refused("ttl", bad)):
            await rl.revoke("j", ttl=bad)  # type: ignore[arg-type]
        assert rl.local_size == 0
        assert fake.data == {}


class TestHealthy:
    @pytest.mark.parametrize("policy", ["deny", "raise", "allow"])
    async def test_revoke_then_check(self, fake: FakeRedis, dep: Any, clock: FakeClock, policy: str) -> None:
        """A revoked jti is reported revoked, others are not, in every policy."""
        rl = make(fake, dep, clock, policy)
        await rl.revoke("jti-1")
        assert fake.data["r:jti-1"] == b"1"
        assert fake.ttls["r:jti-1"] == 900_000
        assert await rl.is_revoked("jti-1") is True
        assert await rl.is_revoked("jti-2") is False

    async def test_revocation_seen_by_another_process(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """A revocation written by another process is found in Redis."""
        rl = make(fake, dep, clock, "allow")
        fake.data["r:other"] = b"1"
        assert await rl.is_revoked("other") is True

    async def test_revoke_ttl_is_remaining_lifetime(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """revoke(ttl=) stores the revocation for the token's remaining lifetime."""
        rl = make(fake, dep, clock, "deny")
        await rl.revoke("j", ttl=12.5)
        assert fake.ttls["r:j"] == 12_500

    async def test_bad_jti(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """An empty or non-str jti is a ValueError."""
        rl = make(fake, dep, clock, "deny")
        with pytest.raises(ValueError, match="jti"):
            await rl.is_revoked("")
        with pytest.raises(ValueError, match="jti"):
            await rl.revoke(123)  # type: ignore[arg-type]


class TestDeny:
    async def test_down_treats_tokens_as_revoked_without_calls(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """deny: while Redis is down every token is revoked and Redis is not called."""
        rl = make(fake, dep, clock, "deny")
        dep.mark_down()
        assert await rl.is_revoked("any") is True
        assert fake.calls == []

    async def test_failure_treats_token_as_revoked(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """deny: a connection error answers revoked and counts one failure."""
        rl = make(fake, dep, clock, "deny")
        fake.error = RedisConnectionError("refused")
        assert await rl.is_revoked("any") is True
        assert dep.failures == 1

    async def test_slow_redis_treats_token_as_revoked(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """deny: a lookup slower than timeout answers revoked within the bound."""
        rl = make(fake, dep, clock, "deny")
        fake.delay = 5.0
        assert await asyncio.wait_for(rl.is_revoked("any"), 1.0) is True


class TestRaise:
    async def test_down_raises_dependency_unavailable(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """raise: DependencyUnavailable (503) while down, without a Redis call."""
        rl = make(fake, dep, clock, "raise")
        dep.mark_down()
        with pytest.raises(DependencyUnavailable) as info:
            await rl.is_revoked("any")
        assert info.value.dependency_name == "redis"
        assert fake.calls == []

    async def test_failure_raises(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """raise: a connection error becomes DependencyUnavailable with the cause kept."""
        rl = make(fake, dep, clock, "raise")
        fake.error = RedisConnectionError("refused")
        with pytest.raises(DependencyUnavailable) as info:
            await rl.is_revoked("any")
        assert isinstance(info.value.__cause__, RedisConnectionError)

    async def test_local_revocation_still_answers(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """raise: a revocation this process saw is answered locally even while down."""
        rl = make(fake, dep, clock, "raise")
        await rl.revoke("seen")
        dep.mark_down()
        assert await rl.is_revoked("seen") is True


class TestAllow:
    async def test_construction_warns(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """allow logs a security-tagged warning when the list is built."""
        with capture_logs() as logs:
            make(fake, dep, clock, "allow")
        (event,) = [e for e in logs if e["event"] == "revocation.fail_open_configured"]
        assert event["log_level"] == "warning"
        assert event["security"] == "revocation_fail_open"

    async def test_other_policies_do_not_warn(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """deny and raise build silently."""
        with capture_logs() as logs:
            make(fake, dep, clock, "deny")
            make(fake, dep, clock, "raise")
        assert logs == []

    async def test_down_accepts_but_rejects_locally_seen(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """allow: unknown tokens are accepted while down; revocations this process saw are not."""
        rl = make(fake, dep, clock, "allow")
        await rl.revoke("seen")
        dep.mark_down()
        assert await rl.is_revoked("seen") is True
        assert await rl.is_revoked("unseen") is False
        assert rl.accepted_unverified == 1

    async def test_local_memory_expires_with_token_ttl(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """A local revocation is kept for the token lifetime, then forgotten."""
        rl = make(fake, dep, clock, "allow")
        await rl.revoke("a")
        await rl.revoke("b", ttl=10)
        dep.mark_down()
        clock.now += 11
        assert await rl.is_revoked("a") is True
        assert await rl.is_revoked("b") is False
        clock.now += 900
        assert await rl.is_revoked("a") is False
        assert rl.local_size == 0

    async def test_local_set_is_bounded(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """Beyond max_local the oldest revocation is evicted, counted, and logged once."""
        rl = make(fake, dep, clock, "allow", max_local=3)
        with capture_logs() as logs:
            for i in range(5):
                await rl.revoke(f"j{i}")
        assert rl.local_size == 3
        assert rl.evicted == 2
        assert [e["event"] for e in logs if e["event"] == "revocation.local_evicted"] == [
            "revocation.local_evicted"
        ]
        dep.mark_down()
        assert await rl.is_revoked("j0") is False
        assert await rl.is_revoked("j4") is True

    async def test_one_event_per_transition(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, sentry_events: list[dict[str, Any]]
    ) -> None:
        """allow: one security log + Sentry event when failing open starts, one when it ends."""
        rl = make(fake, dep, clock, "allow")
        sentry_events.clear()
        with capture_logs() as logs:
            fake.error = RedisConnectionError("refused")
            for i in range(10):
                assert await rl.is_revoked(f"t{i}") is False
            assert rl.failing_open
            fake.error = None
            dep.record_success()  # what the probe does once Redis answers again
            clock.now += 42
            assert await rl.is_revoked("t0") is False
            assert not rl.failing_open
            assert await rl.is_revoked("t1") is False
        fail_open = [e for e in logs if e["event"] == "revocation.fail_open"]
        assert [e["transition"] for e in fail_open] == ["started", "ended"]
        assert all(e["security"] == "revocation_fail_open" for e in fail_open)
        assert fail_open[1]["accepted_unverified"] == 10
        assert fail_open[1]["duration_s"] == 42
        ours = [
            e for e in sentry_events if e.get("tags", {}).get("degrade.security") == "revocation_fail_open"
        ]
        assert [e["tags"]["degrade.transition"] for e in ours] == ["started", "ended"]
        assert ours[0]["level"] == "error"
        assert "failing open" in ours[0]["message"]

    async def test_unexpected_error_never_fails_open(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """allow: an error that is not an outage (WRONGTYPE) propagates, so the token is not accepted."""
        rl = make(fake, dep, clock, "allow")
        fake.error = ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
        with pytest.raises(ResponseError):
            await rl.is_revoked("any")
        assert not rl.failing_open
        assert rl.accepted_unverified == 0


class TestRevokeFailsLoud:
    @pytest.mark.parametrize("policy", ["deny", "raise", "allow"])
    async def test_revoke_while_down_raises(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, policy: str
    ) -> None:
        """revoke() raises DependencyUnavailable while Redis is down, whatever the policy."""
        rl = make(fake, dep, clock, policy)
        dep.mark_down()
        with pytest.raises(DependencyUnavailable):
            await rl.revoke("j")
        assert fake.calls == []
        assert rl.local_size == 1  # still rejected by this process

    async def test_revoke_failure_raises(self, fake: FakeRedis, dep: Any, clock: FakeClock) -> None:
        """A failing write raises DependencyUnavailable and counts a failure."""
        rl = make(fake, dep, clock, "deny")
        fake.error = RedisConnectionError("refused")
        with pytest.raises(DependencyUnavailable):
            await rl.revoke("j")
        assert dep.failures == 1


def site_named(dep: Any, suffix: str) -> Site:
    return next(s for s in dep.sites if s.name.endswith(suffix))


class TestSaturation:
    """At the abandoned-work cap lookups and revokes are shed: answered by policy, Redis not blamed."""

    @pytest.fixture(autouse=True)
    def full(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 0)

    @staticmethod
    def assert_untouched(fake: FakeRedis, dep: Any, sentry_events: list[dict[str, Any]]) -> None:
        sentry_sdk.flush()
        assert fake.calls == []
        assert (dep.state, dep.failures, dep.last_error) == ("ok", 0, None)
        assert sentry_events == []

    async def test_deny_answers_revoked(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, sentry_events: list[dict[str, Any]]
    ) -> None:
        rl = make(fake, dep, clock, "deny")
        assert [await rl.is_revoked(f"t{i}") for i in range(3)] == [True] * 3
        lookup = site_named(dep, ".is_revoked")
        assert (lookup.shed_calls, lookup.degraded_calls) == ({"abandoned-cap": 3}, 0)
        self.assert_untouched(fake, dep, sentry_events)

    async def test_raise_answers_503_and_revoke_too(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, sentry_events: list[dict[str, Any]]
    ) -> None:
        rl = make(fake, dep, clock, "raise")
        with pytest.raises(DependencyUnavailable):
            await rl.is_revoked("t")
        with pytest.raises(DependencyUnavailable):
            await rl.revoke("j")
        assert rl.local_size == 1  # still remembered by this process
        assert site_named(dep, ".is_revoked").shed_calls == {"abandoned-cap": 1}
        assert site_named(dep, ".revoke").shed_calls == {"abandoned-cap": 1}
        self.assert_untouched(fake, dep, sentry_events)

    async def test_allow_fails_open_by_its_policy(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, sentry_events: list[dict[str, Any]]
    ) -> None:
        """allow: the shed lookup accepts the token, which is failing open: its one security event
        is sent (the policy's transition), and nothing about the dependency."""
        rl = make(fake, dep, clock, "allow")
        assert [await rl.is_revoked(f"t{i}") for i in range(3)] == [False] * 3
        assert rl.failing_open
        assert rl.accepted_unverified == 3
        assert site_named(dep, ".is_revoked").shed_calls == {"abandoned-cap": 3}
        sentry_sdk.flush()
        assert [e["tags"].get("degrade.security") for e in sentry_events] == ["revocation_fail_open"]
        assert (dep.state, dep.failures) == ("ok", 0)


class TestInFlightWhenRedisGoesDown:
    async def test_lookup_in_flight_answers_by_policy_at_once(
        self, fake: FakeRedis, dep: Any, clock: FakeClock
    ) -> None:
        """deny, timeout 5 s: a lookup hanging on Redis answers True as soon as Redis goes down."""
        rl = RevocationList(fake, dep, on_outage="deny", timeout=5.0, clock=clock)
        fake.delay = 30.0
        task = asyncio.ensure_future(rl.is_revoked("t"))
        await asyncio.sleep(0.01)
        assert fake.calls == [("exists", "degrade:revoked:t")]
        start = time.perf_counter()
        dep.mark_down()
        assert await task is True
        assert time.perf_counter() - start < 0.2
        assert site_named(dep, ".is_revoked").degraded_calls == 1
        await _bounded.settle_abandoned(1.0)


class TestRunbookSites:
    @pytest.mark.parametrize(
        "case",
        [("deny", "fail_soft", "revoked"), ("raise", "fail_loud", "503"), ("allow", "fail_soft", "SECURITY")],
    )
    def test_sites_declare_the_policy(
        self, fake: FakeRedis, dep: Any, clock: FakeClock, case: tuple[str, str, str]
    ) -> None:
        """Each list registers its lookup with the policy's mode and a FAIL-LOUD revoke site."""
        policy, mode, word = case
        make(fake, dep, clock, policy, name="jwt")
        sites = {s.name: s for s in dep.sites}
        lookup = sites["degrade.revocation.RevocationList[jwt].is_revoked"]
        assert lookup.mode == mode
        assert word in lookup.reason
        revoke = sites["degrade.revocation.RevocationList[jwt].revoke"]
        assert revoke.mode == "fail_loud"
