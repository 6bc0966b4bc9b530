"""A private Redis master + replica + 3 Sentinels (quorum 2), started from the machine's redis-server.

Used by ``test_sentinel.py``: ``async with SentinelCluster.start(tmp_path) as cluster: ...``.
Everything listens on 127.0.0.1 on free ports, lives in a temp dir, and is
killed at exit of the ``async with`` block, even when the test fails. Timings
are short (down-after 500 ms, failover-timeout 2 s) so a failover takes seconds.
Every wait is bounded; a wait that runs out raises with the tail of the logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

SERVICE = "degrade-test"
QUORUM = 2
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 2000
#: Seconds any single wait of the helper may take.
WAIT = 20.0


def redis_server_binary() -> str:
    """Path of redis-server; skip locally and fail in CI when it is missing."""
    path = shutil.which("redis-server")
    if path is not None:
        return path
    message = "redis-server is not installed (apt-get install redis-server)"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(f"{message}; CI must provide it")
    pytest.skip(message)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Node:
    """One redis-server process."""

    name: str
    port: int
    conf: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process (a crash, not a shutdown) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not hang
            proc.kill()
            proc.wait(timeout=5)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return f"[{self.name}] (no log)"
        return "\n".join(f"[{self.name}] {line}" for line in text[-lines:])


@dataclass
class SentinelCluster:
    """Master, replica and three Sentinels on 127.0.0.1."""

    directory: Path
    binary: str
    master: Node
    replica: Node
    sentinel_nodes: list[Node]
    service: str = SERVICE
    _clients: dict[str, aioredis.Redis] = field(default_factory=dict)

    # -- building -------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, directory: Path) -> AsyncIterator[SentinelCluster]:
        """Start everything, wait until Sentinel sees master, replica and each other; kill all at exit."""
        binary = redis_server_binary()
        cluster = cls._layout(directory, binary)
        try:
            await cluster._boot()
            yield cluster
        finally:
            await cluster.close()

    @classmethod
    def _layout(cls, directory: Path, binary: str) -> SentinelCluster:
        def node(name: str) -> Node:
            return Node(name, free_port(), directory / f"{name}.conf", directory / f"{name}.log")

        master, replica = node("master"), node("replica")
        sentinels = [node(f"sentinel{i}") for i in range(3)]
        common = f"bind 127.0.0.1\nprotected-mode no\ndir {directory}\n"
        for n in (master, replica):
            # diskless sync without its 5 s default delay: the replica syncs at once
            lines = (
                f'{common}port {n.port}\nlogfile {n.log}\nsave ""\nappendonly no\n'
                "repl-diskless-sync yes\nrepl-diskless-sync-delay 0\n"
            )
            if n is replica:
                lines += f"replicaof 127.0.0.1 {master.port}\nreplica-read-only yes\n"
            n.conf.write_text(lines)
        for n in sentinels:
            n.conf.write_text(
                f"{common}port {n.port}\nlogfile {n.log}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
        return cls(directory, binary, master, replica, sentinels)

    def _spawn(self, n: Node, *extra: str) -> None:
        n.proc = subprocess.Popen(
            [self.binary, str(n.conf), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=self.directory,
        )

    async def _boot(self) -> None:
        self._spawn(self.master)
        self._spawn(self.replica)
        await self.wait_for("master and replica answer", self._answers(self.master, self.replica))
        await self.wait_for("replica in sync", self._replica_linked)
        for n in self.sentinel_nodes:
            self._spawn(n, "--sentinel")
        await self.wait_for("sentinels know master, replica and each other", self._sentinels_ready)

    # -- reading state ----------------------------------------------------------

    def client_for(self, n: Node) -> aioredis.Redis:
        """A short-timeout client of one node (one per node), closed with the cluster."""
        c = self._clients.get(n.name)
        if c is None:
            c = aioredis.Redis(
                host="127.0.0.1",
                port=n.port,
                socket_timeout=0.5,
                socket_connect_timeout=0.5,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[n.name] = c
        return c

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """``[(host, port), ...]`` of the three Sentinels."""
        return [("127.0.0.1", n.port) for n in self.sentinel_nodes]

    def _answers(self, *nodes: Node) -> Callable[[], Awaitable[bool]]:
        async def ready() -> bool:
            for n in nodes:
                await self.client_for(n).ping()
            return True

        return ready

    async def _replica_linked(self) -> bool:
        info = await self.client_for(self.replica).info("replication")
        return bool(info.get("master_link_status") == "up")

    async def _sentinels_ready(self) -> bool:
        for n in self.sentinel_nodes:
            state = await self.client_for(n).execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "MASTER", SERVICE
            )
            # redis-py parses the reply into a dict (bytes keys without decode_responses)
            fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in state.items()}
            if int(fields["num-slaves"]) < 1 or int(fields["num-other-sentinels"]) < 2:
                return False
        return True

    async def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers names it."""
        for n in self.sentinel_nodes:
            if not n.running:
                continue
            with contextlib.suppress(RedisError, OSError):
                addr = await self.client_for(n).execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                if addr:
                    return int(addr[1])
        return None

    async def wait_for(self, what: str, ready: Callable[[], Awaitable[bool]], within: float = WAIT) -> float:
        """Poll ``ready`` every 50 ms until it is True; seconds taken. Raises with the logs on timeout."""
        start = time.monotonic()
        deadline = start + within
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                if await ready():
                    return time.monotonic() - start
            except (RedisError, OSError, KeyError, ValueError) as exc:
                last = exc
            await asyncio.sleep(0.05)
        logs = "\n".join(n.tail() for n in (self.master, self.replica, *self.sentinel_nodes))
        raise TimeoutError(f"cluster: {what} not reached within {within}s (last error: {last!r})\n{logs}")

    # -- faults -------------------------------------------------------------------

    def kill_master(self) -> None:
        """SIGKILL the master started by this cluster."""
        self.master.kill()

    def stop_sentinels(self, count: int) -> None:
        """SIGKILL the first ``count`` Sentinels."""
        for n in self.sentinel_nodes[:count]:
            n.kill()

    async def close(self) -> None:
        """Close helper clients and kill every process (idempotent)."""
        clients, self._clients = self._clients, {}
        for c in clients.values():
            with contextlib.suppress(Exception):
                await c.aclose()
        for n in (*self.sentinel_nodes, self.replica, self.master):
            n.kill()
