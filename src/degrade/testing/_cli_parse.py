"""Parsing for ``python -m degrade proxy`` (:mod:`degrade.testing._cli`): addresses, pairs, commands.

Pure functions and values, no I/O: what the command line, the HTTP control
interface and stdin are allowed to say, and the clear errors for what they
are not.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "ACTIONS",
    "MAX_REQUEST",
    "REQUEST_TIMEOUT",
    "Command",
    "CommandError",
    "Pair",
    "add_arguments",
    "format_address",
    "parse_address",
    "parse_command",
    "parse_duration",
    "parse_pairs",
    "parse_request",
]

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
