"""degrade.redis: fail-fast client settings, the unsafe-client warning, Sentinel builders (no services)."""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from structlog.testing import capture_logs

from degrade import ConfigurationError, checks
from degrade import redis as dredis

#: redis-py 7.x names its defaults (5 s timeouts, 10 retries); before, a client had no timeout.
NAMED_DEFAULTS = importlib.util.find_spec("redis._defaults") is not None

SECRET = "s3cr3t-pw"


@pytest.fixture
async def closing() -> AsyncIterator[list[Any]]:
    """Clients to close at teardown."""
    clients: list[Any] = []
    yield clients
    for c in clients:
        await c.aclose()


def settings(client: Any) -> dict[str, Any]:
    return dict(client.connection_pool.connection_kwargs)


class TestClient:
    async def test_sub_second_timeouts_and_no_retries(self, closing: list[Any]) -> None:
        """client() sets 0.25 s socket/connect timeouts and a Retry with zero retries."""
        c = dredis.client("redis://127.0.0.1:6379/0")
        closing.append(c)
        assert isinstance(c, aioredis.Redis)
        kw = settings(c)
        assert kw["socket_timeout"] == 0.25
        assert kw["socket_connect_timeout"] == 0.25
        assert isinstance(kw["retry"], Retry)
        assert kw["retry"]._retries == 0
        assert kw["health_check_interval"] == dredis.DEFAULT_HEALTH_CHECK_INTERVAL
        assert dredis.problems(c) == ()
        assert dredis.hung_call_seconds(c) == pytest.approx(0.25)

    async def test_bounded_blocking_pool(self, closing: list[Any]) -> None:
        """The pool waits at most pool_timeout (default: timeout) for a free connection."""
        c = dredis.client("redis://127.0.0.1:6379/0", timeout=0.4, max_connections=7)
        closing.append(c)
        assert isinstance(c.connection_pool, BlockingConnectionPool)
        assert c.connection_pool.max_connections == 7
        assert c.connection_pool.timeout == 0.4

    async def test_separate_connect_and_pool_timeouts(self, closing: list[Any]) -> None:
        """connect_timeout and pool_timeout override the defaults taken from timeout."""
        c = dredis.client("redis://127.0.0.1:6379/0", timeout=0.2, connect_timeout=0.5, pool_timeout=0.1)
        closing.append(c)
        kw = settings(c)
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (0.2, 0.5)
        pool: Any = c.connection_pool
        assert pool.timeout == 0.1

    async def test_extra_options_pass_through(self, closing: list[Any]) -> None:
        """Options client() does not own reach the pool."""
        c = dredis.client("redis://127.0.0.1:6379/3", decode_responses=True, client_name="api")
        closing.append(c)
        kw = settings(c)
        assert kw["decode_responses"] is True
        assert kw["client_name"] == "api"
        assert kw["db"] == 3

    @pytest.mark.parametrize(
        "option", ["socket_timeout", "socket_connect_timeout", "retry", "retry_on_timeout", "retry_on_error"]
    )
    def test_refuses_owned_options(self, option: str) -> None:
        """Timeouts and retries cannot be smuggled in through kwargs."""
        with pytest.raises(ConfigurationError, match=option):
            dredis.client("redis://127.0.0.1:6379/0", **{option: 5})

    @pytest.mark.parametrize(
        "kwargs", [{"timeout": 0}, {"timeout": 2.0}, {"connect_timeout": 5}, {"pool_timeout": -1}]
    )
    def test_refuses_slow_or_bad_timeouts(self, kwargs: dict[str, Any]) -> None:
        """A timeout outside (0, 1] s is refused with a message naming it."""
        with pytest.raises(ConfigurationError, match=next(iter(kwargs))):
            dredis.client("redis://127.0.0.1:6379/0", **kwargs)

    def test_refuses_bad_pool_and_health_settings(self) -> None:
        """max_connections < 1 and a negative health_check_interval are refused."""
        with pytest.raises(ConfigurationError, match="max_connections"):
            dredis.client("redis://127.0.0.1:6379/0", max_connections=0)
        with pytest.raises(ConfigurationError, match="health_check_interval"):
            dredis.client("redis://127.0.0.1:6379/0", health_check_interval=-1)

    def test_refuses_url_that_overrides_timeouts(self) -> None:
        """A URL query that sets a slow timeout wins in redis-py, so client() refuses it."""
        url = f"redis://:{SECRET}@127.0.0.1:6379/0?socket_timeout=5"
        with pytest.raises(ConfigurationError, match="socket_timeout=5s") as info:
            dredis.client(url)
        assert SECRET not in str(info.value)

    def test_refuses_non_url(self) -> None:
        """An empty URL is a configuration error."""
        with pytest.raises(ConfigurationError, match="URL"):
            dredis.client("")


class TestUnsafeSettings:
    async def test_from_url_defaults_are_unsafe(self, closing: list[Any]) -> None:
        """redis-py's from_url defaults wait 5 s for a socket (before 7.x: forever)."""
        c = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
        closing.append(c)
        problems = dredis.problems(c)
        if NAMED_DEFAULTS:
            assert "socket_timeout=5s (over 1s)" in problems
            assert "connect_timeout=5s (over 1s)" in problems
            assert dredis.hung_call_seconds(c) == 5.0
        else:
            assert "socket_timeout=None: a hung Redis blocks a call forever" in problems
            assert dredis.hung_call_seconds(c) == math.inf

    async def test_constructor_defaults_retry_ten_times(self, closing: list[Any]) -> None:
        """Redis() retries 10 times with backoff (7.x): about a minute against a hung server."""
        c = aioredis.Redis()
        closing.append(c)
        problems = dredis.problems(c)
        if NAMED_DEFAULTS:
            assert any("10 client-side retries" in p for p in problems)
            assert dredis.hung_call_seconds(c) == pytest.approx(11 * 5 + 10 * 1)
        else:  # older redis-py: no timeout at all, which is worse
            assert any("blocks a call forever" in p for p in problems)

    async def test_no_timeout_is_unsafe(self, closing: list[Any]) -> None:
        """socket_timeout=None means a hung Redis blocks forever."""
        c = aioredis.Redis(socket_timeout=None, retry=Retry(ConstantBackoff(0), 0))
        closing.append(c)
        assert any("blocks a call forever" in p for p in dredis.problems(c))
        assert math.isinf(dredis.hung_call_seconds(c))

    async def test_retry_on_error_counts_as_retry(self, closing: list[Any]) -> None:
        """retry_on_error without a Retry makes redis-py retry once."""
        c = aioredis.Redis(
            socket_timeout=0.1,
            socket_connect_timeout=0.1,
            retry=None,  # type: ignore[arg-type]
            retry_on_error=[RedisConnectionError],
        )
        closing.append(c)
        assert any("1 client-side retries" in p for p in dredis.problems(c))

    async def test_unlimited_retries(self, closing: list[Any]) -> None:
        """retries=-1 (redis-py: forever) is flagged."""
        c = aioredis.Redis(
            socket_timeout=0.1, socket_connect_timeout=0.1, retry=Retry(ConstantBackoff(0), -1)
        )
        closing.append(c)
        assert "unlimited client-side retries" in dredis.problems(c)

    async def test_slow_blocking_pool(self, closing: list[Any]) -> None:
        """A blocking pool that waits 20 s (its default) for a connection is flagged."""
        pool = BlockingConnectionPool(
            socket_timeout=0.1, socket_connect_timeout=0.1, retry=Retry(ConstantBackoff(0), 0)
        )
        c = aioredis.Redis.from_pool(pool)
        closing.append(c)
        assert dredis.problems(c) == ("the pool waits up to 20s for a free connection",)

    async def test_threshold_is_configurable(self, closing: list[Any]) -> None:
        """max_timeout sets the bar: a 0.25 s client fails a 0.1 s bar."""
        c = dredis.client("redis://127.0.0.1:6379/0")
        closing.append(c)
        assert dredis.problems(c, max_timeout=0.1)


class TestWarnIfUnsafe:
    async def test_warns_once_per_client(self, closing: list[Any]) -> None:
        """One structlog warning per unsafe client, however often it is checked."""
        c = aioredis.Redis.from_url(f"redis://:{SECRET}@127.0.0.1:6379/0")
        closing.append(c)
        with capture_logs() as logs:
            first = dredis.warn_problems(c, component="cache")
            second = dredis.warn_problems(c, component="limiter")
        assert first == second
        assert first
        warnings = [e for e in logs if e["event"] == "redis.unsafe_client"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert warnings[0]["component"] == "cache"
        assert warnings[0]["hung_call_up_to_s"] == (5.0 if NAMED_DEFAULTS else math.inf)
        assert SECRET not in repr(warnings)

    async def test_safe_client_is_silent(self, closing: list[Any]) -> None:
        """A client from client() logs nothing."""
        c = dredis.client("redis://127.0.0.1:6379/0")
        closing.append(c)
        with capture_logs() as logs:
            assert dredis.warn_problems(c) == ()
        assert logs == []

    def test_ignores_test_doubles(self) -> None:
        """An object that is not a redis-py client is not checked."""
        with capture_logs() as logs:
            assert dredis.warn_problems(object()) == ()
        assert logs == []


class TestSentinelClient:
    async def test_master_and_sentinel_connections_are_fail_fast(self, closing: list[Any]) -> None:
        """master_for is built with safe timeouts; the Sentinel connections get them too."""
        c = dredis.sentinel_client(
            [("127.0.0.1", 26379), ("127.0.0.1", 26380)], "mymaster", timeout=0.3, sentinel_timeout=0.2
        )
        closing.append(c)
        assert isinstance(c, aioredis.Redis)
        kw = settings(c)
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (0.3, 0.3)
        assert kw["retry"]._retries == 0
        pool: Any = c.connection_pool
        assert pool.service_name == "mymaster"
        assert pool.is_master
        assert isinstance(c.connection_pool, BlockingConnectionPool)
        assert pool.timeout == 0.3
        nodes = pool.sentinel_manager.sentinels
        assert len(nodes) == 2
        for node in nodes:
            nkw = settings(node)
            assert (nkw["socket_timeout"], nkw["socket_connect_timeout"]) == (0.2, 0.2)
            assert nkw["retry"]._retries == 0
        assert dredis.problems(c) == ()

    async def test_credentials_reach_the_right_connections(self, closing: list[Any]) -> None:
        """password goes to the master pool, sentinel_password to the Sentinel pools."""
        c = dredis.sentinel_client(
            [("127.0.0.1", 26379)], "mymaster", password="master-pw", sentinel_password="sentinel-pw", db=2
        )
        closing.append(c)
        assert settings(c)["password"] == "master-pw"
        assert settings(c)["db"] == 2
        pool: Any = c.connection_pool
        assert settings(pool.sentinel_manager.sentinels[0])["password"] == "sentinel-pw"
        assert "master-pw" not in repr(c)

    async def test_aclose_closes_sentinel_clients(self) -> None:
        """Closing the master client also closes the Sentinel clients it owns."""
        c = dredis.sentinel_client([("127.0.0.1", 26379)], "mymaster")
        closed: list[bool] = []
        pool: Any = c.connection_pool
        manager = pool.sentinel_manager
        node = manager.sentinels[0]
        original = node.aclose

        async def tracking_aclose(*args: Any) -> None:
            closed.append(True)
            await original(*args)

        node.aclose = tracking_aclose
        await c.aclose()
        assert closed == [True]

    @pytest.mark.parametrize(
        "sentinels", [[], [("127.0.0.1",)], [("127.0.0.1", 0)], [("127.0.0.1", "26379")], ["127.0.0.1:26379"]]
    )
    def test_refuses_malformed_sentinel_lists(self, sentinels: Any) -> None:
        """Each sentinel must be a (host, port) pair."""
        with pytest.raises(ConfigurationError, match="sentinel"):
            dredis.sentinel_client(sentinels, "mymaster")

    def test_refuses_slow_sentinel_timeout(self) -> None:
        """sentinel_timeout follows the same (0, 1] s rule."""
        with pytest.raises(ConfigurationError, match="sentinel_timeout"):
            dredis.sentinel_client([("127.0.0.1", 26379)], "mymaster", sentinel_timeout=3)

    def test_refuses_empty_service_name(self) -> None:
        """The master's name is required."""
        with pytest.raises(ConfigurationError, match="service_name"):
            dredis.sentinel_client([("127.0.0.1", 26379)], "")


class TestSentinelCheckConfig:
    def test_min_reachable_bounds(self) -> None:
        """min_reachable must be within 1..len(sentinels)."""
        nodes = [("127.0.0.1", 26379), ("127.0.0.1", 26380), ("127.0.0.1", 26381)]
        with pytest.raises(ConfigurationError, match="min_reachable"):
            checks.sentinel(nodes, "mymaster", min_reachable=4)
        with pytest.raises(ConfigurationError, match="min_reachable"):
            checks.sentinel(nodes, "mymaster", min_reachable=0)

    def test_returns_async_callable(self) -> None:
        """checks.sentinel builds the check without connecting."""
        check = checks.sentinel([("127.0.0.1", 26379)], "mymaster")
        assert callable(check)

    def test_refuses_bad_timeout(self) -> None:
        """The per-Sentinel timeout must be positive."""
        with pytest.raises(ConfigurationError, match="timeout"):
            checks.sentinel([("127.0.0.1", 26379)], "mymaster", timeout=0)


class TestOldNames:
    def test_deprecated_spellings_warn_and_work(self) -> None:
        """unsafe_settings, warn_if_unsafe and sentinel_check still work, naming their replacement."""
        c = dredis.client("redis://127.0.0.1:6379/0")
        with pytest.warns(DeprecationWarning, match=r"degrade\.redis\.problems\(\)"):
            assert dredis.unsafe_settings(c) == ()
        with pytest.warns(DeprecationWarning, match=r"degrade\.redis\.warn_problems\(\)"):
            assert dredis.warn_if_unsafe(c) == ()
        with pytest.warns(DeprecationWarning, match=r"degrade\.checks\.sentinel\(\)"):
            assert callable(dredis.sentinel_check([("127.0.0.1", 26379)], "mymaster"))


#: Never a valid number of anything: infinity, NaN, and a boolean (an int to Python).
NOT_A_NUMBER = [math.inf, -math.inf, math.nan, True]


def refused(arg: str, bad: object) -> str:
    """The message of a refused argument: its name, what it takes, what it got."""
    return rf"^{re.escape(arg)} must be .+; got {re.escape(repr(bad))}$"


class TestOneRuleForEveryArgument:
    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize(
        ("arg", "label"),
        [
            ("timeout", "timeout"),
            ("connect_timeout", "connect_timeout"),
            ("pool_timeout", "pool_timeout"),
            ("max_connections", "max_connections"),
            ("health_check_interval", "health_check_interval (0 turns it off)"),
        ],
    )
    def test_client(self, arg: str, label: str, bad: object) -> None:
        """client() refuses infinity, NaN and a bool, naming the argument (not the fail-fast ceiling)."""
        with pytest.raises(ConfigurationError, match=refused(label, bad)):
            dredis.client("redis://127.0.0.1:6379/0", **{arg: bad})

    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize(
        ("arg", "label"),
        [
            ("timeout", "timeout"),
            ("connect_timeout", "connect_timeout"),
            ("sentinel_timeout", "sentinel_timeout"),
            ("pool_timeout", "pool_timeout"),
            ("max_connections", "max_connections"),
            ("health_check_interval", "health_check_interval (0 turns it off)"),
        ],
    )
    def test_sentinel_client(self, arg: str, label: str, bad: object) -> None:
        """sentinel_client() refuses infinity, NaN and a bool, naming the argument."""
        with pytest.raises(ConfigurationError, match=refused(label, bad)):
            dredis.sentinel_client([("127.0.0.1", 26379)], "mymaster", **{arg: bad})

    @pytest.mark.parametrize("bad", [*NOT_A_NUMBER, 26379.0, 0, 65536])
    def test_sentinel_ports(self, bad: object) -> None:
        """A sentinel's port is an int in 1..65535; the message says which sentinel."""
        nodes = [("127.0.0.1", 26379), ("127.0.0.1", bad)]
        with pytest.raises(ConfigurationError, match=refused("the port of sentinels[1]", bad)):
            dredis.sentinel_client(nodes, "mymaster")
        with pytest.raises(ConfigurationError, match=refused("the port of sentinels[1]", bad)):
            checks.sentinel(nodes, "mymaster")

    def test_ceiling_still_has_its_own_message(self) -> None:
        """A finite timeout over 1 s is still refused as not fail-fast."""
        with pytest.raises(ConfigurationError, match=r"^connect_timeout=1\.5s is not a fail-fast setting"):
            dredis.client("redis://127.0.0.1:6379/0", connect_timeout=1.5)

    async def test_valid_values_unchanged(self, closing: list[Any]) -> None:
        """Ints are accepted as seconds, 1 s is the inclusive ceiling, 0 turns health checks off."""
        c = dredis.client("redis://127.0.0.1:6379/0", timeout=1, pool_timeout=1, health_check_interval=0)
        closing.append(c)
        kw = settings(c)
        assert (kw["socket_timeout"], kw["socket_connect_timeout"]) == (1.0, 1.0)
        assert kw["health_check_interval"] == 0
        pool: Any = c.connection_pool
        assert pool.timeout == 1.0
        s = dredis.sentinel_client([("127.0.0.1", 1), ("127.0.0.1", 65535)], "mymaster", sentinel_timeout=1)
        closing.append(s)
