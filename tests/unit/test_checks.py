"""Health checks against things created locally: closed ports, listening sockets, a tiny HTTP server."""

from __future__ import annotations

import asyncio
import math
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from degrade import CheckFailed, ConfigurationError, MissingExtraError, checks

PASSWORD = "hunter2-s3cret"

#: Never a valid number of anything: infinity, NaN, and a boolean (an int to Python).
NOT_A_NUMBER = [math.inf, -math.inf, math.nan, True]


def refused(arg: str, bad: object) -> str:
    """The message of a refused argument: its name, what it takes, what it got."""
    return rf"^{re.escape(arg)} must be .+; got {re.escape(repr(bad))}$"


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A local port bound but not listening: connections to it are refused at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class TinyHttp:
    """A minimal local HTTP/1.1 server answering every request with one status, or never."""

    def __init__(self) -> None:
        self.status = 200
        self.blackhole = False
        self.requests = 0
        self._stop = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/health"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def close(self) -> None:
        self._stop.set()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            if self.blackhole:
                await self._stop.wait()
            else:
                writer.write(
                    f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass


@pytest.fixture
async def http_server() -> AsyncIterator[TinyHttp]:
    server = TinyHttp()
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class TestTcp:
    async def test_listening_socket_passes(self) -> None:
        """A port that accepts connections passes."""
        accepted = asyncio.Event()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set()
            writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        try:
            await checks.tcp("127.0.0.1", server.sockets[0].getsockname()[1])()
            async with asyncio.timeout(1.0):
                await accepted.wait()
        finally:
            server.close()
            await server.wait_closed()

    async def test_closed_port_raises(self, closed_port: int) -> None:
        """A refused connection raises ConnectionRefusedError (an OSError)."""
        with pytest.raises(ConnectionRefusedError):
            await checks.tcp("127.0.0.1", closed_port)()

    @pytest.mark.parametrize("port", [0, 65536, -1, "5432", None, True, 80.0])
    def test_port_validation(self, port: Any) -> None:
        """The port must be an int in 1..65535."""
        with pytest.raises(ValueError, match=r"port must be an int in 1\.\.65535"):
            checks.tcp("127.0.0.1", port)

    @pytest.mark.parametrize("timeout", [0, -1, True, "1"])
    def test_timeout_validation(self, timeout: Any) -> None:
        """The timeout must be a positive number of seconds."""
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checks.tcp("127.0.0.1", 5432, timeout=timeout)


class TestDisk:
    async def test_enough_free_space_passes(self, tmp_path: Path) -> None:
        """A filesystem with at least min_free_bytes free passes."""
        await checks.disk(str(tmp_path), 0)()
        await checks.disk(str(tmp_path), 1)()

    async def test_too_little_free_space_fails(self, tmp_path: Path) -> None:
        """Less than min_free_bytes free raises CheckFailed."""
        with pytest.raises(CheckFailed, match="bytes free"):
            await checks.disk(str(tmp_path), 2**62)()

    async def test_missing_path_raises(self, tmp_path: Path) -> None:
        """A path that does not exist raises rather than passing."""
        with pytest.raises(FileNotFoundError):
            await checks.disk(str(tmp_path / "missing"), 0)()

    @pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
    def test_min_free_bytes_validation(self, value: Any) -> None:
        """min_free_bytes must be an int >= 0."""
        with pytest.raises(ValueError, match="min_free_bytes must be an int >= 0"):
            checks.disk("/", value)


class TestHttp:
    @pytest.mark.parametrize("status", [200, 204, 302])
    async def test_success_statuses_pass(self, http_server: TinyHttp, status: int) -> None:
        """200-399 passes."""
        http_server.status = status
        await checks.http(http_server.url)()
        assert http_server.requests == 1

    @pytest.mark.parametrize("status", [404, 500, 503])
    async def test_error_statuses_fail(self, http_server: TinyHttp, status: int) -> None:
        """A status outside 200-399 raises CheckFailed naming the status."""
        http_server.status = status
        with pytest.raises(CheckFailed, match=str(status)):
            await checks.http(http_server.url)()

    async def test_expect_decides(self, http_server: TinyHttp) -> None:
        """expect= replaces the 200-399 rule."""
        http_server.status = 418
        await checks.http(http_server.url, expect=lambda status: status == 418)()
        http_server.status = 200
        with pytest.raises(CheckFailed):
            await checks.http(http_server.url, expect=lambda status: status == 418)()

    async def test_blackholed_server_is_bounded(self, http_server: TinyHttp) -> None:
        """A server that never answers fails within the timeout."""
        http_server.blackhole = True
        start = time.perf_counter()
        with pytest.raises((TimeoutError, httpx.TimeoutException)):
            await checks.http(http_server.url, timeout=0.1)()
        assert time.perf_counter() - start < 0.6

    async def test_runs_reuse_tls_set_up(self, http_server: TinyHttp) -> None:
        """A check run does not rebuild the TLS context (about 0.1 s of CPU each time)."""
        check = checks.http(http_server.url)
        start = time.perf_counter()
        for _ in range(10):
            await check()
        assert time.perf_counter() - start < 0.3  # about 0.7 s when each run builds its own
        assert http_server.requests == 10

    async def test_closed_port_raises(self, closed_port: int) -> None:
        """A refused connection raises."""
        with pytest.raises(httpx.ConnectError):
            await checks.http(f"http://127.0.0.1:{closed_port}/")()

    @pytest.mark.parametrize("timeout", [0, -0.1, False])
    def test_timeout_validation(self, timeout: Any) -> None:
        """The timeout must be a positive number of seconds."""
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checks.http("http://127.0.0.1/", timeout=timeout)


class StubRedis:
    """A stand-in redis.asyncio client: PING answers, fails or hangs."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def ping(self) -> bool:
        if self.mode == "fail":
            raise ConnectionRefusedError
        if self.mode == "hang":
            await asyncio.Event().wait()
        return True


class TestRedis:
    async def test_ping_answering_passes(self) -> None:
        """A client whose PING answers passes."""
        await checks.redis(StubRedis("ok"))()

    async def test_ping_failing_raises(self) -> None:
        """A failing PING raises its error."""
        with pytest.raises(ConnectionRefusedError):
            await checks.redis(StubRedis("fail"))()

    async def test_ping_hanging_is_bounded(self) -> None:
        """A PING that never answers raises TimeoutError at the check's timeout."""
        start = time.perf_counter()
        with pytest.raises(TimeoutError):
            await checks.redis(StubRedis("hang"), timeout=0.05)()
        assert time.perf_counter() - start < 0.5

    async def test_real_client_on_a_closed_port_raises(self, closed_port: int) -> None:
        """A real redis.asyncio client pointed at a closed port fails within the bound."""
        redis_asyncio = pytest.importorskip("redis.asyncio")
        redis_exceptions = pytest.importorskip("redis.exceptions")
        client = redis_asyncio.Redis(host="127.0.0.1", port=closed_port, password=PASSWORD)
        try:
            with pytest.raises((redis_exceptions.ConnectionError, TimeoutError)):
                await checks.redis(client, timeout=0.15)()
        finally:
            await client.aclose()

    def test_timeout_validation(self) -> None:
        """The timeout must be positive."""
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checks.redis(StubRedis("ok"), timeout=0)


class TestSqlalchemy:
    async def test_closed_port_raises(self, closed_port: int) -> None:
        """An engine pointed at a closed port fails within the bound."""
        sa_asyncio = pytest.importorskip("sqlalchemy.ext.asyncio")
        pytest.importorskip("asyncpg")
        engine = sa_asyncio.create_async_engine(
            f"postgresql+asyncpg://app:{PASSWORD}@127.0.0.1:{closed_port}/app"
        )
        try:
            with pytest.raises((OSError, TimeoutError)):
                await checks.sqlalchemy(engine, timeout=0.5)()
        finally:
            await engine.dispose()

    def test_timeout_validation(self) -> None:
        """The timeout must be positive."""
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checks.sqlalchemy(object(), timeout=-1)

    def test_sync_engine_rejected(self) -> None:
        """A sync engine (or a URL) is refused when the check is made, not inside a probe later."""
        sa = pytest.importorskip("sqlalchemy")
        with pytest.raises(ValueError, match="needs an AsyncEngine"):
            checks.sqlalchemy(sa.create_engine("sqlite://"))
        with pytest.raises(ValueError, match="got str"):
            checks.sqlalchemy("postgresql+asyncpg://127.0.0.1/test")


class TestAmqp:
    async def test_closed_port_raises(self, closed_port: int) -> None:
        """A broker URL pointing at a closed port fails within the bound."""
        aiormq_exceptions = pytest.importorskip("aiormq.exceptions")
        start = time.perf_counter()
        with pytest.raises((aiormq_exceptions.AMQPConnectionError, OSError)):
            await checks.amqp(f"amqp://guest:{PASSWORD}@127.0.0.1:{closed_port}/", timeout=0.5)()
        assert time.perf_counter() - start < 1.0

    def test_timeout_validation(self) -> None:
        """The timeout must be positive."""
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            checks.amqp("amqp://127.0.0.1/", timeout=0)


class TestMissingExtras:
    @pytest.mark.parametrize(
        ("module", "extra", "make"),
        [
            ("sqlalchemy", "postgres", lambda: checks.sqlalchemy(object())),
            ("redis", "redis", lambda: checks.redis(object())),
            ("aiormq", "rabbitmq", lambda: checks.amqp("amqp://127.0.0.1/")),
            ("httpx", "http", lambda: checks.http("http://127.0.0.1/")),
        ],
    )
    def test_error_names_the_extra(
        self, monkeypatch: pytest.MonkeyPatch, module: str, extra: str, make: Any
    ) -> None:
        """A check whose driver is missing raises MissingExtraError (an ImportError) naming the extra."""
        monkeypatch.setitem(sys.modules, module, None)
        with pytest.raises(MissingExtraError) as info:
            make()
        assert isinstance(info.value, ImportError)
        assert f"pip install 'degrade[{extra}]'" in str(info.value)
        assert repr(module) in str(info.value)


SENTINELS = [("127.0.0.1", 26379)]


class TestOneRuleForEveryArgument:
    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize(
        ("arg", "make"),
        [
            ("timeout", lambda v: checks.sqlalchemy(object(), timeout=v)),
            ("timeout", lambda v: checks.redis(StubRedis("ok"), timeout=v)),
            ("timeout", lambda v: checks.amqp("amqp://127.0.0.1/", timeout=v)),
            ("timeout", lambda v: checks.tcp("127.0.0.1", 5432, timeout=v)),
            ("port", lambda v: checks.tcp("127.0.0.1", v)),
            ("timeout", lambda v: checks.http("http://127.0.0.1/", timeout=v)),
            ("min_free_bytes", lambda v: checks.disk("/", v)),
            ("timeout", lambda v: checks.sentinel(SENTINELS, "mymaster", timeout=v)),
            ("min_reachable", lambda v: checks.sentinel(SENTINELS, "mymaster", min_reachable=v)),
            ("timeout", lambda v: checks.replica(object(), timeout=v)),
            ("max_lag", lambda v: checks.replica(object(), max_lag=v)),
        ],
        ids=[
            "sqlalchemy.timeout",
            "redis.timeout",
            "amqp.timeout",
            "tcp.timeout",
            "tcp.port",
            "http.timeout",
            "disk.min_free_bytes",
            "sentinel.timeout",
            "sentinel.min_reachable",
            "replica.timeout",
            "replica.max_lag",
        ],
    )
    def test_infinity_nan_and_bool_refused(self, arg: str, make: Any, bad: object) -> None:
        """Infinity, NaN and a bool are ConfigurationErrors naming the argument, its rule and the value."""
        with pytest.raises(ConfigurationError, match=refused(arg, bad)):
            make(bad)

    def test_valid_values_unchanged(self) -> None:
        """The edges that were valid stay valid: port 1 and 65535, 0 free bytes, min_reachable = all."""
        checks.tcp("127.0.0.1", 1, timeout=1)
        checks.tcp("127.0.0.1", 65535)
        checks.disk("/", 0)
        checks.sentinel([*SENTINELS, ("127.0.0.1", 26380)], "mymaster", min_reachable=2)
