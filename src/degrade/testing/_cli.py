"""``python -m degrade proxy``: fault proxies outside pytest, switched over HTTP or stdin.

One :class:`~degrade.testing.FaultProxy` per ``--pair NAME=LISTEN,UPSTREAM``
(or per ``--listen``/``--upstream`` pair), each on the port it is given, and a
small control interface:

* HTTP (standard library only) on ``--control HOST:PORT`` (default: a free
  port on 127.0.0.1, printed at start)::

      GET  /                          every proxy: listen, upstream, mode, faults, stats (JSON)
      GET  /NAME                      one proxy
      POST /NAME/ACTION[?QUERY]       one proxy: refuse, blackhole, latency?ms=200[&jitter_ms=50],
                                      reset, limit_data?bytes=N, slow_close?ms=N, up, status
      POST /ACTION[?QUERY]            every proxy
      POST /  (body: a text command)  the stdin grammar below

  Bad input is answered ``400`` with ``{"error": "..."}``.

* stdin, one command a line: ``ACTION [ARGS] [NAME]`` or ``NAME ACTION [ARGS]``,
  e.g. ``blackhole``, ``latency 200ms redis``, ``redis up``, ``status``,
  ``help``. Durations take a unit (``200ms``, ``0.2s``; a bare ``0`` is allowed).
  End of input stops reading stdin, not the proxies.

SIGINT (Ctrl-C) and SIGTERM close every proxy (each bounded by ``CLOSE_TIMEOUT``)
and exit 0. Nothing here prints anything but ``host:port`` addresses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ._cli_parse import (
    _HELP,
    ACTIONS,
    MAX_REQUEST,
    REQUEST_TIMEOUT,
    Command,
    CommandError,
    Pair,
    add_arguments,
    format_address,
    parse_address,
    parse_command,
    parse_pairs,
    parse_request,
)
from ._engine import CLOSE_TIMEOUT, Engine, Runner
from .proxy import MAX_CONNECTIONS, FaultProxy

__all__ = [
    "ACTIONS",
    "Command",
    "CommandError",
    "Pair",
    "add_arguments",
    "parse_address",
    "parse_command",
    "parse_pairs",
    "parse_request",
    "run",
]

# -- the running proxies ------------------------------------------------------------


class _Engine(Engine):
    """An :class:`Engine` that listens on a given port (0: a free one) instead of always a free one."""

    def __init__(self, pair: Pair, *, connect_timeout: float) -> None:
        super().__init__(
            *pair.upstream,
            listen_host=pair.listen[0],
            max_connections=MAX_CONNECTIONS,
            connect_timeout=connect_timeout,
        )
        self.port = pair.listen[1]

    def _reserve_port(self) -> None:
        if self.port == 0:
            super()._reserve_port()
            return
        # The holder and the listener share the port through SO_REUSEPORT; a first
        # bind without it fails if anything (another proxy too) has the port already.
        probe = socket.socket(socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET)
        try:
            probe.bind((self.listen_host, self.port))
        finally:
            probe.close()
        if not hasattr(socket, "SO_REUSEPORT"):
            return
        holder = self._new_socket()
        try:
            holder.bind((self.listen_host, self.port))
        except OSError:
            holder.close()
            raise
        self.holder = holder


@dataclass
class Running:
    """One started proxy, under its name."""

    pair: Pair
    proxy: FaultProxy
    engine: Engine

    def status(self) -> dict[str, Any]:
        engine = self.engine
        faults: dict[str, Any] = {}
        if engine.delay or engine.jitter:
            faults["latency_ms"] = round(engine.delay * 1000, 3)
            if engine.jitter:
                faults["jitter_ms"] = round(engine.jitter * 1000, 3)
        if engine.limit is not None:
            faults["limit_data_bytes"] = engine.limit
        if engine.linger:
            faults["slow_close_ms"] = round(engine.linger * 1000, 3)
        return {
            "listen": format_address(self.proxy.address),
            "upstream": format_address(self.proxy.upstream),
            "mode": "closed" if self.proxy.closed else self.proxy.mode,
            "faults": faults,
            "stats": dataclasses.asdict(self.proxy.stats()),
        }


def start_proxies(pairs: Sequence[Pair], *, connect_timeout: float) -> dict[str, Running]:
    """Start one proxy per pair; on any failure close those started and raise ``OSError``/``CommandError``."""
    running: dict[str, Running] = {}
    try:
        for pair in pairs:
            engine = _Engine(pair, connect_timeout=connect_timeout)
            runner = Runner(engine, name=f"degrade-fault-proxy[{pair.name}]")
            try:
                runner.wait_ready_sync()
            except OSError as exc:
                raise OSError(
                    exc.errno,
                    f"proxy {pair.name}: cannot listen on {format_address(pair.listen)}: {exc.strerror}",
                ) from None
            running[pair.name] = Running(pair, FaultProxy(runner), engine)
    except BaseException:
        for item in running.values():
            item.proxy.close_sync()
        raise
    return running


def select(running: dict[str, Running], target: str | None) -> list[Running]:
    """The proxies a command targets; an unknown name raises :class:`CommandError`."""
    if target is None or target == "all":
        return list(running.values())
    if target not in running:
        raise CommandError(f"no proxy named {target!r}; proxies: {', '.join(running)}")
    return [running[target]]


def apply(running: dict[str, Running], command: Command) -> dict[str, Any]:
    """Apply ``command`` to its proxies (blocking: call it off the event loop); their status after it."""
    chosen = select(running, command.target)
    for item in chosen:
        proxy = item.proxy
        if command.action == "refuse":
            proxy.refuse()
        elif command.action == "blackhole":
            proxy.blackhole()
        elif command.action == "latency":
            proxy.latency(command.seconds or 0.0, command.jitter)
        elif command.action == "reset":
            proxy.reset()
        elif command.action == "limit_data":
            proxy.limit_data(command.nbytes or 0)
        elif command.action == "slow_close":
            proxy.slow_close(command.seconds or 0.0)
        elif command.action == "up":
            proxy.up()
    return {"proxies": {item.pair.name: item.status() for item in chosen}}


def describe(command: Command) -> str:
    """A command as one line of text, for the log on stdout."""
    words = [command.action]
    if command.seconds is not None:
        words.append(f"{command.seconds * 1000:g}ms")
        if command.jitter:
            words.append(f"{command.jitter * 1000:g}ms")
    if command.nbytes is not None:
        words.append(str(command.nbytes))
    return f"{command.target or 'all'}: {' '.join(words)}"


def status_line(name: str, status: dict[str, Any]) -> str:
    faults = " ".join(f"{k}={v}" for k, v in status["faults"].items())
    stats = " ".join(f"{k}={v}" for k, v in status["stats"].items())
    return (
        f"{name} {status['listen']} -> {status['upstream']} mode={status['mode']} {faults} {stats}".replace(
            "  ", " "
        )
    )


# -- the control interfaces -----------------------------------------------------------

_REASONS = {200: "OK", 400: "Bad Request", 413: "Content Too Large", 500: "Internal Server Error"}


async def _read_request(reader: asyncio.StreamReader) -> list[str] | tuple[int, dict[str, Any]]:
    """``[method, target, body]`` of one HTTP request, or the error answer ``(code, payload)``."""
    request_line = (await reader.readline()).decode("latin-1").strip()
    size = len(request_line)
    length = 0
    while True:
        header = (await reader.readline()).decode("latin-1")
        size += len(header)
        if size > MAX_REQUEST:
            return 413, {"error": "request too large"}
        if header in ("\r\n", "\n", ""):
            break
        key, _, value = header.partition(":")
        if key.strip().lower() == "content-length":
            if not value.strip().isdigit():
                return 400, {"error": "bad Content-Length"}
            length = int(value.strip())
    if length > MAX_REQUEST:
        return 413, {"error": "request too large"}
    body = (await reader.readexactly(length)).decode("utf-8", "replace") if length else ""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, {"error": "not an HTTP request"}
    return [parts[0].upper(), parts[1], body]


class Controller:
    """Runs commands from HTTP and stdin against the proxies, one at a time."""

    def __init__(self, running: dict[str, Running], out: TextIO) -> None:
        self.running = running
        self.out = out
        self.lock = asyncio.Lock()

    async def execute(self, command: Command, *, log: bool = True) -> dict[str, Any]:
        select(self.running, command.target)  # an unknown name is a CommandError before anything runs
        async with self.lock:
            result = await asyncio.to_thread(apply, self.running, command)
        if log and command.action != "status":
            print(describe(command), file=self.out, flush=True)
        return result

    async def handle_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            code, payload = await asyncio.wait_for(self._answer(reader), REQUEST_TIMEOUT)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        body = (json.dumps(payload, indent=2) + "\n").encode()
        head = (
            f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode() + body)
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
        request = await _read_request(reader)
        if isinstance(request, tuple):
            return request
        method, target, body = request
        try:
            command = parse_request(method, target, body)
            if command.action == "help":
                return 200, {"help": _HELP}
            return 200, await self.execute(command)
        except CommandError as exc:
            return 400, {"error": str(exc)}
        except (RuntimeError, TimeoutError) as exc:
            return 500, {"error": str(exc)}

    async def line(self, text: str) -> None:
        """One stdin line: run it and print the result (or the error) on stdout."""
        if not text.strip():
            return
        try:
            command = parse_command(text)
            if command.action == "help":
                print(_HELP, file=self.out, flush=True)
                return
            result = await self.execute(command, log=False)
        except CommandError as exc:
            print(f"error: {exc}", file=self.out, flush=True)
            return
        except (RuntimeError, TimeoutError) as exc:
            print(f"error: {exc}", file=self.out, flush=True)
            return
        for name, status in result["proxies"].items():
            print(status_line(name, status), file=self.out, flush=True)


def _watch_stdin(loop: asyncio.AbstractEventLoop, controller: Controller) -> Callable[[], None] | None:
    """Feed stdin lines to ``controller`` through the loop; None when stdin cannot be watched."""
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    buffer = bytearray()
    pending: set[asyncio.Task[None]] = set()

    def readable() -> None:
        try:
            chunk = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # end of input: stop reading, keep serving
            loop.remove_reader(fd)
            chunk = b"\n"
        buffer.extend(chunk)
        while b"\n" in buffer:
            raw, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            task = loop.create_task(controller.line(raw.decode("utf-8", "replace")))
            pending.add(task)
            task.add_done_callback(pending.discard)

    try:
        loop.add_reader(fd, readable)
    except (NotImplementedError, OSError, ValueError):  # Windows, or a regular file / /dev/null
        return None

    def stop() -> None:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(fd)

    return stop


async def serve(
    running: dict[str, Running], control: tuple[str, int], *, read_stdin: bool, out: TextIO
) -> None:
    """Serve the control interface until SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    controller = Controller(running, out)
    stop = asyncio.Event()
    server = await asyncio.start_server(controller.handle_http, *control)
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    unwatch = _watch_stdin(loop, controller) if read_stdin else None
    try:
        bound = server.sockets[0].getsockname()
        print(f"control http://{format_address((bound[0], bound[1]))}", file=out, flush=True)
        if unwatch is not None:
            print("stdin: type 'help' for commands", file=out, flush=True)
        await stop.wait()
    finally:
        if unwatch is not None:
            unwatch()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 1.0)


async def _close_all(running: dict[str, Running]) -> None:
    await asyncio.wait_for(
        asyncio.gather(*(item.proxy.close() for item in running.values())), CLOSE_TIMEOUT + 2.0
    )


def _connect_timeout(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise CommandError(f"--connect-timeout must be a number of seconds > 0, got {value}")
    return value


def run(args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``proxy`` subcommand; returns the exit status (2: bad arguments, 1: cannot listen)."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        pairs = parse_pairs(args.pair, args.listen, args.upstream)
        control = parse_address(args.control, what="--control", allow_zero=True)
        timeout = _connect_timeout(args.connect_timeout)
    except CommandError as exc:
        print(f"python -m degrade proxy: {exc}", file=err)
        return 2
    try:
        running = start_proxies(pairs, connect_timeout=timeout)
    except OSError as exc:
        print(f"python -m degrade proxy: {exc.strerror or exc}", file=err)
        return 1
    for name, item in running.items():
        print(
            f"{name} {format_address(item.proxy.address)} -> {format_address(item.proxy.upstream)}", file=out
        )
    out.flush()

    async def main() -> None:
        try:
            await serve(running, control, read_stdin=not args.no_stdin, out=out)
        finally:
            await _close_all(running)

    try:
        asyncio.run(main())
    except KeyboardInterrupt:  # where signal handlers are not available
        pass
    except OSError as exc:
        print(f"python -m degrade proxy: control {format_address(control)}: {exc.strerror or exc}", file=err)
        return 1
    finally:
        for item in running.values():
            item.proxy.close_sync()  # idempotent; covers a failure before main() closed them
    print("closed", file=out, flush=True)
    return 0
