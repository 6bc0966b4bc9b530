"""``python -m degrade proxy`` as a user runs it: a subprocess in front of the real Redis."""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO, Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

#: Generous bounds: the CI machine is shared.
START_WITHIN = 30.0
EXIT_WITHIN = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Cli:
    """The proxy CLI in a subprocess, its stdout read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "degrade", "proxy", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.errors: list[str] = []
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        # Each pipe has one reader, to its EOF: communicate() read stdout too, raced this thread for
        # its lines, then closed it under the thread (ValueError: I/O operation on closed file).
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines.put), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.errors.append), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: IO[str], put: Any) -> None:
        for line in stream:
            put(line.rstrip("\n"))

    def wait(self, timeout: float) -> None:
        """Wait for the exit (killed after ``timeout``), for both readers to reach EOF; close the pipes."""
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=EXIT_WITHIN)
        for reader in self._readers:
            reader.join(timeout=EXIT_WITHIN)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def expect(self, prefix: str, within: float = START_WITHIN) -> str:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.1)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line starting with {prefix!r} on stdout; saw {self.seen}")

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self) -> tuple[int, float, str]:
        """SIGTERM; the exit status, the seconds it took, its stderr."""
        start = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.wait(EXIT_WITHIN * 3)
        return self.process.returncode, time.monotonic() - start, "".join(f"{e}\n" for e in self.errors)


@pytest.fixture
def redis_target(redis_url: str) -> tuple[str, int]:
    parts = urlsplit(redis_url)
    assert parts.hostname is not None
    return parts.hostname, parts.port or 6379


@contextlib.contextmanager
def running_cli(*args: str) -> Iterator[Cli]:
    cli = Cli(*args)
    try:
        yield cli
    finally:
        if cli.process.poll() is None:
            cli.process.kill()
        cli.wait(EXIT_WITHIN)


def http(method: str, url: str) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, method=method)  # noqa: S310 - a local http:// URL
    try:
        with urllib.request.urlopen(request, timeout=10.0) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def ping(port: int, timeout: float) -> bytes:
    """Connect through the proxy, send a Redis PING, read the answer (bounded by ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def test_blackhole_and_up_over_http(redis_target: tuple[str, int]) -> None:
    """Through the CLI's proxy Redis answers; blackholed it hangs; after up it answers again."""
    port = free_port()
    upstream = f"{redis_target[0]}:{redis_target[1]}"
    with running_cli("--pair", f"redis=127.0.0.1:{port},{upstream}", "--control", "127.0.0.1:0") as cli:
        assert cli.expect("redis ") == f"redis 127.0.0.1:{port} -> {upstream}"
        control = cli.expect("control ").split()[1]
        assert control.startswith("http://127.0.0.1:")

        assert ping(port, timeout=5.0) == b"+PONG\r\n"

        code, body = http("POST", f"{control}/redis/blackhole")
        assert code == 200
        assert body["proxies"]["redis"]["mode"] == "blackhole"
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            ping(port, timeout=0.5)  # the connect succeeds, the read hangs
        assert time.monotonic() - start < 5.0

        code, body = http("POST", f"{control}/redis/up")
        assert code == 200
        assert body["proxies"]["redis"]["mode"] == "up"
        assert ping(port, timeout=5.0) == b"+PONG\r\n"

        code, body = http("GET", f"{control}/")
        assert code == 200
        stats = body["proxies"]["redis"]["stats"]
        assert stats["accepted"] == 3
        assert body["proxies"]["redis"]["listen"] == f"127.0.0.1:{port}"

        code, body = http("POST", f"{control}/nope/up")
        assert code == 400
        assert "no proxy named 'nope'" in body["error"]
        code, body = http("POST", f"{control}/redis/explode")
        assert code == 400
        assert "unknown action 'explode'" in body["error"]

        status, took, err = cli.stop()
    assert status == 0, err
    assert took < EXIT_WITHIN
    assert "Traceback" not in err
    assert "Exception ignored" not in err


def test_stdin_commands(redis_target: tuple[str, int]) -> None:
    """Commands typed on stdin apply too; a bad one prints an error and changes nothing."""
    port, control_port = free_port(), free_port()
    upstream = f"{redis_target[0]}:{redis_target[1]}"
    with running_cli(
        "--listen", f"127.0.0.1:{port}", "--upstream", upstream, "--control", f"127.0.0.1:{control_port}"
    ) as cli:
        assert cli.expect("control ") == f"control http://127.0.0.1:{control_port}"
        cli.send("refuse proxy")
        assert " mode=refuse " in cli.expect(f"proxy 127.0.0.1:{port} ")
        with pytest.raises(ConnectionRefusedError):
            ping(port, timeout=2.0)
        cli.send("latency 200")
        assert "with a unit" in cli.expect("error: ")
        cli.send("up")
        assert " mode=up " in cli.expect(f"proxy 127.0.0.1:{port} ")
        assert ping(port, timeout=5.0) == b"+PONG\r\n"
        status, took, err = cli.stop()
    assert status == 0, err
    assert took < EXIT_WITHIN


def test_busy_port_exits_1(redis_target: tuple[str, int]) -> None:
    """A listen port already taken is a clear error and exit status 1, not a silent shared port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cli = Cli("--pair", f"redis=127.0.0.1:{port},{redis_target[0]}:{redis_target[1]}")
        _, err = cli.process.communicate(timeout=START_WITHIN)
    assert cli.process.returncode == 1
    assert f"proxy redis: cannot listen on 127.0.0.1:{port}:" in err
