"""The example app end to end: under uvicorn over real HTTP, and the outage drill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from examples import stubs

from degrade.testing import FaultProxy

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DB = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> float:
    """Seconds until ``check()`` is true; fails the test after ``within`` seconds."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if await check():
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    pytest.fail(f"{what}: not within {within} s")


class Server:
    """The example app under uvicorn in a subprocess, every dependency behind a FaultProxy."""

    def __init__(
        self, proxies: dict[str, FaultProxy], process: asyncio.subprocess.Process, port: int
    ) -> None:
        self.proxies = proxies
        self.process = process
        self.url = f"http://127.0.0.1:{port}"


@pytest.fixture
async def server(
    postgres_dsn: str, redis_url: str, amqp_url: str, unique: str, tmp_path: Path
) -> AsyncIterator[Server]:
    log_path = tmp_path / "uvicorn.log"
    async with AsyncExitStack() as stack:
        log_file = stack.enter_context(log_path.open("wb"))
        scanner = await stack.enter_async_context(await stubs.start("scanner"))
        turn = await stack.enter_async_context(await stubs.start("turn"))
        upstreams = {
            "db": ("127.0.0.1", 5432),
            "db-replica": ("127.0.0.1", 5432),
            "redis": ("127.0.0.1", 6379),
            "rabbitmq": ("127.0.0.1", 5672),
            "scanner": ("127.0.0.1", scanner.sockets[0].getsockname()[1]),
            "turn": ("127.0.0.1", turn.sockets[0].getsockname()[1]),
        }
        proxies = {
            name: await stack.enter_async_context(await FaultProxy.start(*addr))
            for name, addr in upstreams.items()
        }
        port = _free_port()
        env = {
            **os.environ,
            "DATABASE_URL": proxies["db"].url_for(DB),
            "READ_DATABASE_URL": proxies["db-replica"].url_for(DB),
            "REDIS_URL": proxies["redis"].url_for(redis_url),
            "AMQP_URL": proxies["rabbitmq"].url_for(amqp_url),
            "SCANNER_ADDR": "{}:{}".format(*proxies["scanner"].address),
            "TURN_ADDR": "{}:{}".format(*proxies["turn"].address),
            "APP_SECRET": unique,
        }
        env.pop("CLAMAV_REQUIRED", None)
        process = await asyncio.create_subprocess_exec(
            *[
                sys.executable,
                "-m",
                "uvicorn",
                "examples.app:app",
                "--port",
                str(port),
                "--log-level",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log_file,  # a file, not a pipe: a full pipe would block the server
        )
        try:
            srv = Server(proxies, process, port)

            async def up() -> bool:
                try:
                    async with httpx.AsyncClient() as client:
                        return (await client.get(f"{srv.url}/api/v1/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await _eventually(up, "uvicorn serves /api/v1/health", within=30)
            yield srv
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(15):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()
                pytest.fail("uvicorn did not stop within 15 s of SIGTERM")
        log = log_path.read_text(errors="replace")
        # uvicorn re-raises the signal after a graceful shutdown, so -SIGTERM is a clean exit.
        assert process.returncode in {0, -signal.SIGTERM}, log[-3000:]
        assert "Application shutdown complete" in log, log[-3000:]
        assert "Task was destroyed but it is pending" not in log


class TestUnderUvicorn:
    async def test_one_outage_per_dependency_over_http(self, server: Server) -> None:
        """Each dependency refused in turn: the promised status, then recovery once it is back."""
        api = f"{server.url}/api/v1"
        async with httpx.AsyncClient(timeout=10) as http:
            login = await http.post(f"{api}/auth/login", json={"user": "e2e"})
            assert login.status_code == 200
            auth = {"authorization": f"Bearer {login.json()['access_token']}"}
            created = await http.post(f"{api}/tracks", json={"title": "e2e"}, headers=auth)
            assert created.status_code == 202
            assert created.json()["event"] == "outbox"  # written in the insert's transaction
            assert http.cookies.get("degrade_lsn")  # read-your-writes: the write's position, signed
            track = f"{api}/tracks/{created.json()['id']}"
            first = await http.get(track, headers=auth)
            assert (first.json()["title"], first.headers["x-cache"]) == ("e2e", "miss")
            assert (await http.get(track, headers=auth)).headers["x-cache"] == "hit"

            async def status(method: str, url: str, expect: int, **kw: Any) -> Callable[[], Awaitable[bool]]:
                async def check() -> bool:
                    response = await http.request(method, url, headers=auth, **kw)
                    return response.status_code == expect

                return check

            cases = [
                # dependency, (method, url, status while down, status once back, body)
                ("db", ("POST", f"{api}/tracks", 503, 202, {"json": {"title": "x"}})),
                ("db-replica", ("GET", track, 200, 200, {})),
                ("redis", ("POST", f"{api}/auth/login", 503, 200, {"json": {"user": "e2e"}})),
                ("rabbitmq", ("POST", f"{api}/tracks", 202, 202, {"json": {"title": "q"}})),
                ("scanner", ("POST", f"{api}/uploads", 503, 201, {"content": b"data"})),
            ]
            for name, (method, url, down_status, up_status, kw) in cases:
                proxy = server.proxies[name]
                proxy.refuse()
                try:
                    await _eventually(
                        await status(method, url, down_status, **kw), f"{name} down: {down_status}"
                    )
                    if down_status == 503:
                        response = await http.request(method, url, headers=auth, **kw)
                        assert response.headers["retry-after"]
                        assert response.json()["error"] == "dependency_unavailable"
                finally:
                    proxy.up()
                recovered = await _eventually(
                    await status(method, url, up_status, **kw), f"{name} back: {up_status}"
                )
                assert recovered < 5.0, f"{name}: recovered after {recovered:.1f} s"

            server.proxies["turn"].refuse()
            try:

                async def no_turn() -> bool:  # the watch notices within ~3 checks of 2 s
                    return (await http.get(f"{api}/config/webrtc")).json()["hasTurn"] is False

                await _eventually(no_turn, "turn down: hasTurn false", within=15)
            finally:
                server.proxies["turn"].up()
            deep = await http.get(f"{api}/health/deep")
            assert deep.status_code in {200, 503}
            assert set(deep.json()["checks"]) == {"db", "db-replica", "redis", "rabbitmq", "scanner", "turn"}
            relay = deep.json()["components"]["outbox:degrade_example_outbox"]
            assert set(relay) >= {"backlog", "published", "dropped", "phase"}


class TestDrill:
    @pytest.mark.parametrize("flavour", [[], ["--fastapi"]], ids=["starlette", "fastapi"])
    def test_every_scenario_passes(
        self, flavour: list[str], postgres_dsn: str, redis_url: str, amqp_url: str
    ) -> None:
        """The README's main command: every outage scenario of the example app PASSes."""
        run = subprocess.run(
            [sys.executable, "examples/drill.py", *flavour],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert " PASS in " in run.stdout
        assert "FAIL" not in run.stdout
