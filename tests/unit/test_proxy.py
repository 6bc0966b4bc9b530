"""FaultProxy against a local asyncio echo server: every fault, old and new connections."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import socketserver
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from degrade import ConfigurationError
from degrade.testing import FaultProxy, ProxyStats
from degrade.testing.proxy import MAX_HELD

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Echo:
    """An echo server in the test's loop; it closes its side when the client does."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.eof_at: list[float] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            self.eof_at.append(time.monotonic())
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def aclose(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        await self.server.wait_closed()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    server = Echo()
    server.server = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.aclose()


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    p = await FaultProxy.start("127.0.0.1", echo.port)
    try:
        yield p
    finally:
        await p.close()


@contextlib.asynccontextmanager
async def connected(proxy: FaultProxy) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(*proxy.address), 2.0)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def roundtrip(stream: Stream, data: bytes = b"ping", within: float = 2.0) -> bytes:
    reader, writer = stream
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), within)


async def eventually(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def proxy_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("degrade-fault-proxy")]


class TestStart:
    async def test_forwards_both_ways_on_a_free_local_port(self, proxy: FaultProxy) -> None:
        """It listens on 127.0.0.1 on a port of its own and passes bytes through unchanged."""
        assert proxy.host == "127.0.0.1"
        assert proxy.port > 0
        assert proxy.address == ("127.0.0.1", proxy.port)
        assert proxy.mode == "up"
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"hello") == b"hello"
            assert await roundtrip(stream, b"x" * 300_000, within=5.0) == b"x" * 300_000

    async def test_runs_in_a_daemon_thread_that_close_stops(self, echo: Echo) -> None:
        """The proxy has its own daemon thread; close() ends it and is idempotent."""
        before = len(proxy_threads())
        p = await FaultProxy.start("127.0.0.1", echo.port)
        threads = proxy_threads()
        assert len(threads) == before + 1
        assert all(t.daemon for t in threads)
        await p.close()
        await p.close()
        assert p.closed
        assert len(proxy_threads()) == before

    async def test_async_with_closes_it(self, echo: Echo) -> None:
        """``async with await FaultProxy.start(...)`` closes the proxy on exit."""
        async with await FaultProxy.start("127.0.0.1", echo.port) as p, connected(p) as stream:
            assert await roundtrip(stream) == b"ping"
        assert p.closed
        assert "closed" in repr(p)

    async def test_closing_resets_open_connections(self, echo: Echo) -> None:
        """Connections still open at close() are reset, not left hanging."""
        p = await FaultProxy.start("127.0.0.1", echo.port)
        async with connected(p) as (reader, writer):
            assert await roundtrip((reader, writer)) == b"ping"
            await p.close()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)

    async def test_a_setter_on_a_closed_proxy_raises(self, echo: Echo) -> None:
        """Using a closed proxy is a mistake that fails loudly."""
        p = await FaultProxy.start("127.0.0.1", echo.port)
        await p.close()
        with pytest.raises(RuntimeError, match="closed"):
            p.refuse()

    async def test_unreachable_service_resets_the_client(self) -> None:
        """When the service refuses, the proxy resets the client and counts it."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        async with await FaultProxy.start("127.0.0.1", closed_port) as p:
            # The reset can beat the end of the client's own connect: either way it is a reset.
            with pytest.raises(ConnectionResetError):
                async with connected(p) as (reader, _):
                    await asyncio.wait_for(reader.read(10), 2.0)
            assert p.stats().upstream_failures == 1

    @pytest.mark.parametrize(
        ("host", "port", "options"),
        [
            ("", 6379, {}),
            ("127.0.0.1", 0, {}),
            ("127.0.0.1", 70000, {}),
            ("127.0.0.1", True, {}),
            ("127.0.0.1", 6379, {"max_connections": 0}),
            ("127.0.0.1", 6379, {"connect_timeout": 0}),
        ],
    )
    async def test_bad_arguments_raise(self, host: str, port: int, options: dict[str, float]) -> None:
        """Out-of-range arguments raise ConfigurationError before any thread starts."""
        before = len(proxy_threads())
        with pytest.raises(ConfigurationError):
            await FaultProxy.start(host, port, **options)  # type: ignore[arg-type]
        assert len(proxy_threads()) == before


class TestUrlFor:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            (
                "postgresql+asyncpg://app:s3cret@db.internal:5432/test?ssl=disable",
                "postgresql+asyncpg://app:s3cret@127.0.0.1:{port}/test?ssl=disable",
            ),
            ("redis://:pw@127.0.0.1:6379/0", "redis://:pw@127.0.0.1:{port}/0"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:{port}"),
            ("amqp://guest:guest@127.0.0.1:5672/", "amqp://guest:guest@127.0.0.1:{port}/"),
            ("amqp://guest:guest@rabbit/vhost", "amqp://guest:guest@127.0.0.1:{port}/vhost"),
            ("postgresql://u:p@[::1]:5432/db", "postgresql://u:p@127.0.0.1:{port}/db"),
            ("postgresql://u@[::1]/db", "postgresql://u@127.0.0.1:{port}/db"),
            ("redis://u:p%40ss@h:1/0#frag", "redis://u:p%40ss@127.0.0.1:{port}/0#frag"),
            ("postgresql:///db", "postgresql://127.0.0.1:{port}/db"),
            ("http://h:80?x=1", "http://127.0.0.1:{port}?x=1"),
        ],
    )
    async def test_points_the_url_at_the_proxy(self, proxy: FaultProxy, url: str, expected: str) -> None:
        """Only host and port change; scheme, credentials, path and query are kept."""
        assert proxy.url_for(url) == expected.format(port=proxy.port)

    @pytest.mark.parametrize("url", ["127.0.0.1:6379", "redis:/x", "postgresql://u:pw@h1:5432,h2:5432/db"])
    async def test_rejects_what_it_cannot_rewrite_without_echoing_it(
        self, proxy: FaultProxy, url: str
    ) -> None:
        """Not a URL, or several hosts: ConfigurationError, and the URL is not repeated."""
        with pytest.raises(ConfigurationError) as info:
            proxy.url_for(url)
        assert url not in str(info.value)
        assert "pw" not in str(info.value)


class TestRefuse:
    async def test_new_connections_are_refused_at_once(self, proxy: FaultProxy, echo: Echo) -> None:
        """A connect gets ECONNREFUSED immediately and never reaches the service."""
        proxy.refuse()
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*proxy.address)
        assert time.monotonic() - start < 0.5
        assert proxy.stats().accepted == 0
        assert echo.connections == 0
        assert proxy.mode == "refuse"

    async def test_open_connections_are_reset(self, proxy: FaultProxy) -> None:
        """A pooled connection is reset (RST) when refuse() starts."""
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer)) == b"ping"
            proxy.refuse()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)
        assert proxy.stats().resets == 1

    async def test_up_listens_again_on_the_same_port(self, proxy: FaultProxy) -> None:
        """After up() the same address serves again (URLs handed out stay valid)."""
        port = proxy.port
        proxy.refuse()
        proxy.up()
        assert proxy.port == port
        async with connected(proxy) as stream:
            assert await roundtrip(stream) == b"ping"


class TestBlackhole:
    async def test_new_connections_hang_without_touching_the_service(
        self, proxy: FaultProxy, echo: Echo
    ) -> None:
        """The connect succeeds, nothing comes back, and the service is not contacted."""
        proxy.blackhole()
        async with connected(proxy) as (reader, writer):
            writer.write(b"hello?")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(10), 0.3)
            assert echo.connections == 0
            assert proxy.stats().accepted == 1
            assert proxy.stats().bytes_up == 0

    async def test_open_connections_freeze_and_resume_on_up(self, proxy: FaultProxy) -> None:
        """An open connection stops passing data; up() delivers what was held, in order."""
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer)) == b"ping"
            proxy.blackhole()
            writer.write(b"one,")
            writer.write(b"two")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(10), 0.3)
            proxy.up()
            assert await asyncio.wait_for(reader.readexactly(7), 2.0) == b"one,two"

    async def test_waiting_new_connections_are_served_after_up(self, proxy: FaultProxy, echo: Echo) -> None:
        """A connection accepted during the blackhole reaches the service once it is lifted."""
        proxy.blackhole()
        async with connected(proxy) as (reader, writer):
            writer.write(b"queued")
            await asyncio.sleep(0.05)
            proxy.up()
            assert await asyncio.wait_for(reader.readexactly(6), 2.0) == b"queued"
        assert echo.connections == 1

    async def test_up_copes_with_clients_that_left_meanwhile(self, proxy: FaultProxy) -> None:
        """Clients that gave up during the blackhole are cleaned up by up(), which still succeeds."""
        proxy.blackhole()
        for _ in range(5):
            async with connected(proxy) as (_, writer):
                writer.write(b"anyone there?")
                await writer.drain()
        await asyncio.sleep(0.05)
        proxy.up()
        await eventually(lambda: proxy.stats().open == 0)
        proxy.up()
        async with connected(proxy) as stream:
            assert await roundtrip(stream) == b"ping"

    async def test_up_delivers_to_a_client_that_closed(self, proxy: FaultProxy) -> None:
        """A reply and close held for a client that left are dropped cleanly by up()."""
        proxy.latency(0.3)
        with socket.create_connection(proxy.address, timeout=2.0) as sock:
            sock.sendall(b"bye")
        await asyncio.sleep(0.45)  # the echo's reply and its FIN are held now
        proxy.blackhole()
        await asyncio.sleep(0.3)
        proxy.up()  # delivers reply (the client answers RST) and FIN in one go
        await eventually(lambda: proxy.stats().open == 0)
        async with connected(proxy) as stream:
            assert await roundtrip(stream) == b"ping"

    async def test_held_data_is_bounded(self, proxy: FaultProxy) -> None:
        """A sender that keeps writing into a blackhole is back-pressured, not buffered without end."""
        payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
        async with connected(proxy) as (reader, writer):
            proxy.blackhole()
            writer.write(payload)
            await eventually(lambda: proxy.stats().held >= MAX_HELD)
            await asyncio.sleep(0.1)
            assert proxy.stats().held <= MAX_HELD + 256 * 1024  # one recv() beyond the mark at most
            proxy.up()
            assert await asyncio.wait_for(reader.readexactly(len(payload)), 20.0) == payload


class TestLatency:
    async def test_each_direction_is_delayed(self, proxy: FaultProxy) -> None:
        """latency(s) adds about 2*s to a round trip, on a connection opened before it."""
        async with connected(proxy) as stream:
            assert await roundtrip(stream) == b"ping"
            proxy.latency(0.1)
            start = time.monotonic()
            assert await roundtrip(stream) == b"ping"
            elapsed = time.monotonic() - start
            assert 0.19 <= elapsed < 1.0
            proxy.latency(0)
            start = time.monotonic()
            assert await roundtrip(stream) == b"ping"
            assert time.monotonic() - start < 0.1

    async def test_up_delivers_delayed_data_at_once(self, proxy: FaultProxy) -> None:
        """Data already delayed by latency() is not held back once up() is called."""
        async with connected(proxy) as (reader, writer):
            proxy.latency(2.0)
            writer.write(b"late")
            await asyncio.sleep(0.05)
            start = time.monotonic()
            proxy.up()
            assert await asyncio.wait_for(reader.readexactly(4), 1.0) == b"late"
            assert time.monotonic() - start < 0.5

    async def test_jitter_never_reorders(self, proxy: FaultProxy) -> None:
        """With jitter, chunks still arrive in the order they were sent."""
        proxy.latency(0.02, jitter=0.02)
        chunks = [f"<{i}>".encode() for i in range(60)]
        async with connected(proxy) as (reader, writer):
            for chunk in chunks:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.002)
            expected = b"".join(chunks)
            assert await asyncio.wait_for(reader.readexactly(len(expected)), 5.0) == expected

    @pytest.mark.parametrize(
        ("seconds", "jitter"), [(-0.1, 0.0), (float("nan"), 0.0), (0.1, -1.0), (True, 0.0)]
    )
    async def test_bad_values_raise(self, proxy: FaultProxy, seconds: float, jitter: float) -> None:
        """Negative, NaN or boolean delays are refused."""
        with pytest.raises(ConfigurationError):
            proxy.latency(seconds, jitter)


class TestReset:
    async def test_open_connections_are_reset_new_ones_work(self, proxy: FaultProxy) -> None:
        """reset() breaks pooled connections once and keeps serving."""
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer)) == b"ping"
            proxy.reset()
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)
        assert proxy.mode == "up"
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"pong") == b"pong"
        assert proxy.stats().resets == 1

    async def test_keeps_other_faults(self, proxy: FaultProxy) -> None:
        """reset() is one-shot: a latency set before it stays."""
        proxy.latency(0.1)
        proxy.reset()
        async with connected(proxy) as stream:
            start = time.monotonic()
            assert await roundtrip(stream) == b"ping"
            assert time.monotonic() - start >= 0.19


class TestLimitData:
    async def test_cuts_a_connection_after_n_bytes(self, proxy: FaultProxy) -> None:
        """After N bytes (both ways together) the connection is reset; no byte beyond N passes."""
        proxy.limit_data(10)
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer), b"abcd") == b"abcd"  # 8 bytes so far
            writer.write(b"efgh")  # 2 of these reach the service, then the cut
            # the echo of "ef" never comes back: the cut resets the client first
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)
        stats = proxy.stats()
        assert stats.cut == 1
        assert stats.bytes_up + stats.bytes_down == 10
        assert stats.dropped_bytes >= 2

    async def test_applies_to_open_connections_from_now(self, proxy: FaultProxy) -> None:
        """An open connection gets N more bytes from the moment the limit is set."""
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer), b"x" * 100) == b"x" * 100
            proxy.limit_data(0)
            writer.write(b"y")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)

    async def test_up_lifts_the_limit(self, proxy: FaultProxy) -> None:
        """up() clears the limit for open and new connections."""
        proxy.limit_data(4)
        proxy.up()
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"0123456789") == b"0123456789"

    @pytest.mark.parametrize("nbytes", [-1, 1.5, True])
    async def test_bad_values_raise(self, proxy: FaultProxy, nbytes: int) -> None:
        """Only whole numbers >= 0 are limits."""
        with pytest.raises(ConfigurationError):
            proxy.limit_data(nbytes)


class TestSlowClose:
    async def test_a_close_reaches_each_side_late(self, proxy: FaultProxy, echo: Echo) -> None:
        """The client's FIN reaches the service s late, and the service's FIN the client s late."""
        async with connected(proxy) as (reader, writer):
            assert await roundtrip((reader, writer)) == b"ping"
            proxy.slow_close(0.3)
            start = time.monotonic()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(10), 3.0) == b""
            client_saw_close = time.monotonic() - start
        assert echo.eof_at[0] - start >= 0.28
        assert 0.58 <= client_saw_close < 2.0

    async def test_without_it_closes_are_prompt(self, proxy: FaultProxy) -> None:
        """Baseline: a half-close goes through and the service's close comes back at once."""
        async with connected(proxy) as (reader, writer):
            start = time.monotonic()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(10), 3.0) == b""
            assert time.monotonic() - start < 0.2
        await eventually(lambda: proxy.stats().open == 0)

    async def test_data_before_the_close_is_delivered(self, proxy: FaultProxy) -> None:
        """Only the close is late; data sent before it is not held back."""
        proxy.slow_close(1.0)
        async with connected(proxy) as (reader, writer):
            writer.write(b"last words")
            writer.write_eof()
            start = time.monotonic()
            assert await asyncio.wait_for(reader.readexactly(10), 2.0) == b"last words"
            assert time.monotonic() - start < 0.5

    @pytest.mark.parametrize("seconds", [0, -1])
    async def test_needs_a_positive_time(self, proxy: FaultProxy, seconds: float) -> None:
        """slow_close(0) is meaningless and refused."""
        with pytest.raises(ConfigurationError):
            proxy.slow_close(seconds)


class TestOutage:
    async def test_async_with_applies_and_restores(self, proxy: FaultProxy) -> None:
        """``async with proxy.outage("refuse")`` refuses inside and serves again after."""
        async with proxy.outage("refuse") as p:
            assert p is proxy
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*proxy.address)
        assert proxy.mode == "up"
        async with connected(proxy) as stream:
            assert await roundtrip(stream) == b"ping"

    async def test_sync_with_and_amounts(self, proxy: FaultProxy) -> None:
        """``with proxy.outage("latency", s)`` works too, and up() clears it on exit."""
        async with connected(proxy) as stream:
            with proxy.outage("latency", 0.1):
                start = time.monotonic()
                assert await roundtrip(stream) == b"ping"
                assert time.monotonic() - start >= 0.19
            start = time.monotonic()
            assert await roundtrip(stream) == b"ping"
            assert time.monotonic() - start < 0.1

    async def test_restores_when_the_block_raises(self, proxy: FaultProxy) -> None:
        """An exception inside the block still ends the outage."""
        with pytest.raises(LookupError):
            async with proxy.outage("blackhole"):
                raise LookupError
        assert proxy.mode == "up"

    async def test_exit_after_close_is_quiet(self, echo: Echo) -> None:
        """Closing the proxy inside the block is allowed."""
        p = await FaultProxy.start("127.0.0.1", echo.port)
        async with p.outage("reset"):
            await p.close()
        assert p.closed

    @pytest.mark.parametrize(
        "args", [("nope",), ("latency",), ("refuse", 1.0), ("limit_data",), ("slow_close",)]
    )
    async def test_bad_fault_raises(self, proxy: FaultProxy, args: tuple[object, ...]) -> None:
        """Unknown faults and missing or extra amounts raise ConfigurationError."""
        with pytest.raises(ConfigurationError):
            proxy.outage(*args)  # type: ignore[call-overload]

    async def test_limit_data_outage(self, proxy: FaultProxy) -> None:
        """``outage("limit_data", n)`` cuts connections inside the block."""
        async with proxy.outage("limit_data", 0), connected(proxy) as (reader, writer):
            writer.write(b"z")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(10), 2.0)


class TestStatsAndBounds:
    async def test_counts_connections_and_bytes(self, proxy: FaultProxy) -> None:
        """accepted, open and the byte counters follow the traffic."""
        assert proxy.stats() == ProxyStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"12345") == b"12345"
            await eventually(lambda: proxy.stats().bytes_down == 5)
            stats = proxy.stats()
            assert (stats.accepted, stats.open, stats.bytes_up) == (1, 1, 5)
        await eventually(lambda: proxy.stats().open == 0)

    async def test_stats_is_a_frozen_snapshot(self, proxy: FaultProxy) -> None:
        """proxy.stats() is a frozen ProxyStats made on each call; later traffic does not change one kept."""
        before = proxy.stats()
        assert isinstance(before, ProxyStats)
        with pytest.raises(dataclasses.FrozenInstanceError):
            before.accepted = 7  # type: ignore[misc]
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"abc") == b"abc"
            await eventually(lambda: proxy.stats().bytes_down == 3)
            after = proxy.stats()
        assert before == ProxyStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # unchanged by the traffic
        assert (after.accepted, after.open, after.bytes_up, after.bytes_down) == (1, 1, 3, 3)
        await eventually(lambda: proxy.stats().open == 0)
        assert proxy.stats() is not proxy.stats()  # a new snapshot on each call
        assert proxy.stats() == proxy.stats()  # with equal values while nothing happens

    async def test_old_spelling_warns_and_still_works(self, proxy: FaultProxy) -> None:
        """proxy.stats.<field> works for one minor version: the value, a warning naming stats()."""
        async with connected(proxy) as stream:
            assert await roundtrip(stream, b"12345") == b"12345"
            await eventually(lambda: proxy.stats().bytes_down == 5)
            with pytest.warns(
                DeprecationWarning,
                match=r"FaultProxy\.stats\.bytes_up is deprecated; use FaultProxy\.stats\(\)\.bytes_up",
            ) as warned:
                assert proxy.stats.bytes_up == 5
            assert len(warned) == 1
            assert warned[0].filename == __file__  # points at the caller's line, not at degrade
            snapshot = proxy.stats()
            for name in (f.name for f in dataclasses.fields(ProxyStats)):
                with pytest.warns(DeprecationWarning, match=rf"use FaultProxy\.stats\(\)\.{name}\b"):
                    assert getattr(proxy.stats, name) == getattr(snapshot, name), name
            # A view kept in a variable holds the snapshot made when it was read, as the old
            # snapshot did, so ``before = proxy.stats`` ... ``before.accepted`` still compares.
            kept = proxy.stats
            async with connected(proxy) as second:
                assert await roundtrip(second) == b"ping"
                await eventually(lambda: proxy.stats().accepted == 2)
            with pytest.warns(DeprecationWarning, match=r"FaultProxy\.stats\.accepted is deprecated"):
                assert kept.accepted == 1
            assert kept().accepted == 2  # calling it makes a fresh snapshot
        with pytest.raises(dataclasses.FrozenInstanceError):  # as on the old snapshot
            kept.accepted = 0

    async def test_unknown_attribute_raises(self, proxy: FaultProxy) -> None:
        """An attribute that is not a ProxyStats field raises AttributeError, without a warning."""
        with pytest.raises(AttributeError, match=r"FaultProxy\.stats has no attribute 'nope'; call it"):
            proxy.stats.nope  # noqa: B018
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            proxy.stats.nope = 1
        assert not hasattr(proxy.stats, "_private")

    async def test_repr_shows_the_snapshot_without_a_warning(self, proxy: FaultProxy) -> None:
        """repr(proxy.stats) is the snapshot's repr; it does not warn."""
        assert repr(proxy.stats) == repr(proxy.stats()) == repr(ProxyStats(0, 0, 0, 0, 0, 0, 0, 0, 0, 0))

    async def test_connections_beyond_the_cap_are_rejected(self, echo: Echo) -> None:
        """Over max_connections, a new connection is reset at once and counted."""
        async with (
            await FaultProxy.start("127.0.0.1", echo.port, max_connections=1) as p,
            connected(p) as first,
        ):
            assert await roundtrip(first) == b"ping"
            with pytest.raises(ConnectionResetError):
                async with connected(p) as (reader, _):
                    await asyncio.wait_for(reader.read(10), 2.0)
            assert p.stats().rejected == 1
            assert await roundtrip(first) == b"ping"


class _BlockingEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture
def blocking_echo() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _BlockingEcho)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=2.0)


class TestSyncUse:
    def test_works_from_a_sync_test(self, blocking_echo: int) -> None:
        """start_sync / setters / close_sync work without any event loop in the caller."""
        with FaultProxy.start_sync("127.0.0.1", blocking_echo) as proxy:
            with socket.create_connection(proxy.address, timeout=2.0) as sock:
                sock.sendall(b"sync")
                assert sock.recv(10) == b"sync"
                with proxy.outage("blackhole"):
                    sock.settimeout(0.3)
                    sock.sendall(b"held")
                    with pytest.raises(TimeoutError):
                        sock.recv(10)
                sock.settimeout(2.0)
                assert sock.recv(10) == b"held"
            proxy.refuse()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(proxy.address, timeout=2.0)
        assert proxy.closed

    def test_serves_while_the_callers_loop_is_blocked(self, blocking_echo: int) -> None:
        """The proxy's own thread forwards even while the test's event loop is busy."""

        async def blocked_loop() -> bytes:
            proxy = await FaultProxy.start("127.0.0.1", blocking_echo)
            try:
                # A blocking client inside a coroutine: the caller's loop cannot run.
                with socket.create_connection(proxy.address, timeout=2.0) as sock:
                    sock.sendall(b"unstarved")
                    return sock.recv(20)
            finally:
                await proxy.close()

        assert asyncio.run(blocked_loop()) == b"unstarved"


class TestPublicApi:
    def test_exports(self) -> None:
        """degrade.testing exports the proxy's public names, sorted, and does not import pytest."""
        from degrade import testing

        assert testing.__all__ == ["FakeClock", "Fault", "FaultProxy", "ProxyOutage", "ProxyStats"]
        assert all(hasattr(testing, name) for name in testing.__all__)
        source = Path(testing.__file__).read_text()
        assert "pytest" not in source.split('"""')[-1]  # code after the docstring
