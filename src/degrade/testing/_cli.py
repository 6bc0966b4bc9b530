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
import ipaddress
import json
import math
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

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

#: What a proxy can be told. ``status`` changes nothing.
ACTIONS = ("refuse", "blackhole", "latency", "reset", "limit_data", "slow_close", "up", "status")

#: Seconds the control server waits for a request before hanging up.
REQUEST_TIMEOUT = 5.0
#: Bytes of a control request (line, headers, body) accepted at most.
MAX_REQUEST = 16 * 1024

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_DURATION = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<unit>ms|s)$")
_HELP = (
    "commands: refuse | blackhole | latency DURATION [JITTER] | reset | limit_data BYTES"
    " | slow_close DURATION | up | status | help; add a proxy name to act on one proxy"
    " (e.g. 'latency 200ms redis', 'redis up'); durations take a unit: 200ms, 0.2s"
)


class CommandError(ValueError):
    """Bad input: a bad address, pair, command, amount or proxy name. Its message is for the user."""


# -- addresses and pairs --------------------------------------------------------


def parse_address(text: str, *, what: str, allow_zero: bool) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPV6]:PORT`` or a bare ``PORT`` (meaning 127.0.0.1) -> ``(host, port)``."""
    text = text.strip()
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        inside, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise CommandError(f"{what}: expected [IPV6]:PORT, got {text!r}")
        host, port_text = inside, rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise CommandError(f"{what}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise CommandError(f"{what}: expected HOST:PORT (e.g. 127.0.0.1:6379), got {text!r}")
        if any(c in host for c in "/@?# "):
            raise CommandError(f"{what}: expected HOST:PORT, not a URL; got {text!r}")
        if ":" in host:
            raise CommandError(f"{what}: write an IPv6 address in brackets, [::1]:PORT; got {text!r}")
    if not port_text.isdigit():
        raise CommandError(f"{what}: the port must be a number, got {port_text!r}")
    port = int(port_text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise CommandError(f"{what}: the port must be in {low}..65535, got {port}")
    return host, port


def format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Pair:
    """One proxy to start: its name, where it listens, the service it forwards to."""

    name: str
    listen: tuple[str, int]
    upstream: tuple[str, int]


def _check_name(name: str) -> str:
    if not _NAME.match(name):
        raise CommandError(
            f"proxy name {name!r}: use a letter, then letters, digits, '_', '.' or '-' (at most 64)"
        )
    if name.lower() in ACTIONS or name.lower() in ("help", "all"):
        raise CommandError(f"proxy name {name!r} is a command word; choose another")
    return name


def parse_pairs(pairs: Sequence[str], listens: Sequence[str], upstreams: Sequence[str]) -> list[Pair]:
    """The proxies to start, from ``--pair`` values and from ``--listen``/``--upstream`` pairs.

    ``--listen`` and ``--upstream`` pair up in order; those proxies are named
    ``proxy`` (just one) or ``proxy1``, ``proxy2``...
    """
    if len(listens) != len(upstreams):
        raise CommandError(
            f"--listen and --upstream pair up in order: got {len(listens)} --listen"
            f" and {len(upstreams)} --upstream"
        )
    found: list[Pair] = []
    for text in pairs:
        name, sep, rest = text.partition("=")
        listen, comma, upstream = rest.partition(",")
        if not sep or not comma:
            raise CommandError(f"--pair: expected NAME=LISTEN,UPSTREAM (e.g. redis=16379,6379), got {text!r}")
        found.append(
            Pair(
                _check_name(name.strip()),
                parse_address(listen, what=f"--pair {name.strip()} listen", allow_zero=True),
                parse_address(upstream, what=f"--pair {name.strip()} upstream", allow_zero=False),
            )
        )
    for i, (listen, upstream) in enumerate(zip(listens, upstreams, strict=True), start=1):
        name = "proxy" if len(listens) == 1 else f"proxy{i}"
        found.append(
            Pair(
                name,
                parse_address(listen, what="--listen", allow_zero=True),
                parse_address(upstream, what="--upstream", allow_zero=False),
            )
        )
    if not found:
        raise CommandError(
            "nothing to proxy: give --pair NAME=LISTEN,UPSTREAM or --listen ADDR --upstream ADDR"
        )
    names = [p.name for p in found]
    for name in names:
        if names.count(name) > 1:
            raise CommandError(f"proxy name {name!r} is given twice")
    listening = [p.listen for p in found if p.listen[1] != 0]
    for address in listening:
        if listening.count(address) > 1:
            raise CommandError(f"two proxies listen on {format_address(address)}")
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``proxy`` subcommand's options."""
    parser.add_argument(
        "--pair",
        action="append",
        default=[],
        metavar="NAME=LISTEN,UPSTREAM",
        help="a named proxy, e.g. redis=127.0.0.1:16379,127.0.0.1:6379 (repeatable)",
    )
    parser.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="where a proxy listens (repeatable)",
    )
    parser.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="the service behind the --listen of the same rank (repeatable)",
    )
    parser.add_argument(
        "--control",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="the HTTP control interface (default: a free port on 127.0.0.1, printed at start)",
    )
    parser.add_argument("--no-stdin", action="store_true", help="do not read commands from stdin")
    parser.add_argument(
        "--connect-timeout", type=float, default=5.0, metavar="SECONDS", help="bound of each upstream connect"
    )


# -- commands ---------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One control command: an action, its amounts, and the proxy it targets (None: every proxy)."""

    action: str
    target: str | None = None
    seconds: float | None = None
    jitter: float = 0.0
    nbytes: int | None = None


def _action(word: str) -> str | None:
    word = word.lower().replace("-", "_")
    return word if word in ACTIONS or word == "help" else None


def parse_duration(text: str) -> float:
    """``200ms``, ``0.2s`` or ``0`` -> seconds."""
    text = text.strip().lower()
    if text == "0":
        return 0.0
    match = _DURATION.match(text)
    if match is None:
        raise CommandError(f"expected a duration with a unit (200ms, 0.2s), got {text!r}")
    value = float(match["num"]) / (1000.0 if match["unit"] == "ms" else 1.0)
    if not math.isfinite(value):
        raise CommandError(f"duration {text!r} is out of range")
    return value


def _nbytes(text: str) -> int:
    if not text.isdigit():
        raise CommandError(f"limit_data takes a number of bytes (an int >= 0), got {text!r}")
    return int(text)


def _build(action: str, target: str | None, args: Sequence[str]) -> Command:
    arity = {"latency": (1, 2), "slow_close": (1, 1), "limit_data": (1, 1)}.get(action, (0, 0))
    if not arity[0] <= len(args) <= arity[1]:
        usage = {
            "latency": "latency DURATION [JITTER], e.g. latency 200ms",
            "slow_close": "slow_close DURATION, e.g. slow_close 2s",
            "limit_data": "limit_data BYTES, e.g. limit_data 1024",
        }.get(action, f"{action} takes no argument")
        raise CommandError(f"usage: {usage} [NAME]")
    if action == "latency":
        jitter = parse_duration(args[1]) if len(args) == 2 else 0.0
        return Command(action, target, seconds=parse_duration(args[0]), jitter=jitter)
    if action == "slow_close":
        seconds = parse_duration(args[0])
        if seconds == 0:
            raise CommandError("slow_close takes a duration > 0 (up clears it)")
        return Command(action, target, seconds=seconds)
    if action == "limit_data":
        return Command(action, target, nbytes=_nbytes(args[0]))
    return Command(action, target)


def parse_command(line: str) -> Command:
    """A text command: ``ACTION [ARGS] [NAME]`` or ``NAME ACTION [ARGS]``.

    The name is not checked against the running proxies here (see :func:`select`).
    """
    words = line.split()
    if not words:
        raise CommandError(f"empty command; {_HELP}")
    action = _action(words[0])
    if action is not None:
        args = words[1:]
        target = None
        if args and args[-1][:1].isalpha() and _action(args[-1]) is None:
            target = args.pop()
    else:
        if len(words) < 2 or _action(words[1]) is None:
            raise CommandError(f"unknown command {words[0]!r}; {_HELP}")
        target, action, args = words[0], words[1].lower().replace("-", "_"), words[2:]
    if action == "help":
        if args or target:
            raise CommandError("help takes no argument")
        return Command("help")
    return _build(action, target, args)


def parse_request(method: str, target: str, body: str = "") -> Command:
    """An HTTP control request -> a :class:`Command`. Raises :class:`CommandError` (answered 400)."""
    parts = urlsplit(target)
    segments = [s for s in parts.path.split("/") if s]
    query = parse_qs(parts.query, keep_blank_values=True)
    if method == "GET":
        if len(segments) > 1 or parts.query:
            raise CommandError("GET / (every proxy) or GET /NAME (one proxy); use POST to change a proxy")
        return Command("status", segments[0] if segments else None)
    if method != "POST":
        raise CommandError(f"method {method} not allowed: GET to read, POST to act")
    if not segments:
        if not body.strip():
            raise CommandError("POST /NAME/ACTION or POST /ACTION, or POST / with a text command as body")
        return parse_command(body)
    if len(segments) > 2:
        raise CommandError(f"expected /NAME/ACTION or /ACTION, got {parts.path!r}")
    action = _action(segments[-1])
    if action is None or action == "help":
        raise CommandError(f"unknown action {segments[-1]!r}; choose one of {', '.join(ACTIONS)}")
    name = segments[0] if len(segments) == 2 else None
    return _build(action, name, _query_args(action, query))


def _query_args(action: str, query: dict[str, list[str]]) -> list[str]:
    """Turn ``?ms=200&jitter_ms=50`` / ``?s=0.2`` / ``?bytes=N`` into the text form's arguments."""
    allowed = {
        "latency": {"ms", "s", "jitter_ms", "jitter_s"},
        "slow_close": {"ms", "s"},
        "limit_data": {"bytes"},
    }.get(action, set())
    unknown = sorted(set(query) - allowed)
    if unknown:
        hint = f"it takes {', '.join(sorted(allowed))}" if allowed else "it takes none"
        raise CommandError(f"{action}: unknown parameter {unknown[0]!r}; {hint}")

    def one(key: str) -> str | None:
        values = query.get(key)
        if not values:
            return None
        if len(values) > 1:
            raise CommandError(f"{action}: parameter {key!r} given twice")
        return values[0]

    if action == "limit_data":
        nbytes = one("bytes")
        return [nbytes] if nbytes is not None else []
    args: list[str] = []
    for ms_key, s_key in (("ms", "s"), ("jitter_ms", "jitter_s")):
        ms, s = one(ms_key), one(s_key)
        if ms is not None and s is not None:
            raise CommandError(f"{action}: give {ms_key} or {s_key}, not both")
        if ms is None and s is None:
            continue
        if not args and ms_key == "jitter_ms":
            raise CommandError(f"{action}: a jitter needs a latency too, e.g. ?ms=200&jitter_ms=50")
        args.append(f"{ms}ms" if ms is not None else f"{s}s")
    return args


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
