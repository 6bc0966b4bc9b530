"""``python -m degrade proxy``: parsing of its arguments and of its control commands (no network)."""

from __future__ import annotations

import pytest

from degrade.__main__ import main
from degrade.testing._cli import (
    Command,
    CommandError,
    Pair,
    describe,
    parse_address,
    parse_command,
    parse_pairs,
    parse_request,
)


class TestAddress:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("127.0.0.1:5432", ("127.0.0.1", 5432)),
            ("localhost:6379", ("localhost", 6379)),
            ("[::1]:6379", ("::1", 6379)),
            ("16379", ("127.0.0.1", 16379)),
            ("127.0.0.1:0", ("127.0.0.1", 0)),
        ],
    )
    def test_valid(self, text: str, expected: tuple[str, int]) -> None:
        assert parse_address(text, what="--listen", allow_zero=True) == expected

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("127.0.0.1", "expected HOST:PORT"),
            (":5432", "expected HOST:PORT"),
            ("host:port", "must be a number"),
            ("host:70000", "in 0..65535"),
            ("::1:5432", "in brackets"),
            ("[nope]:5432", "not an IPv6 address"),
            ("[::1]5432", "[IPV6]:PORT"),
            ("redis://h:6379", "not a URL"),
        ],
    )
    def test_invalid(self, text: str, message: str) -> None:
        with pytest.raises(CommandError, match=message.replace("[", r"\[").replace("]", r"\]")):
            parse_address(text, what="--listen", allow_zero=True)

    def test_upstream_port_zero_refused(self) -> None:
        with pytest.raises(CommandError, match=r"--upstream: the port must be in 1\.\.65535"):
            parse_address("127.0.0.1:0", what="--upstream", allow_zero=False)


class TestPairs:
    def test_named_pairs_and_listen_upstream(self) -> None:
        pairs = parse_pairs(
            ["redis=127.0.0.1:16379,127.0.0.1:6379", "pg=15432,5432"], ["127.0.0.1:0"], ["db.internal:3306"]
        )
        assert pairs == [
            Pair("redis", ("127.0.0.1", 16379), ("127.0.0.1", 6379)),
            Pair("pg", ("127.0.0.1", 15432), ("127.0.0.1", 5432)),
            Pair("proxy", ("127.0.0.1", 0), ("db.internal", 3306)),
        ]

    def test_several_listen_upstream_are_numbered(self) -> None:
        pairs = parse_pairs([], ["1", "2"], ["3", "4"])
        assert [p.name for p in pairs] == ["proxy1", "proxy2"]

    @pytest.mark.parametrize(
        ("pairs", "listens", "upstreams", "message"),
        [
            ([], [], [], "nothing to proxy"),
            ([], ["1"], [], "pair up in order"),
            (["redis"], [], [], "NAME=LISTEN,UPSTREAM"),
            (["redis=1"], [], [], "NAME=LISTEN,UPSTREAM"),
            (["9x=1,2"], [], [], "use a letter"),
            (["up=1,2"], [], [], "is a command word"),
            (["a=1,2", "a=3,4"], [], [], "given twice"),
            (["a=1,2", "b=1,4"], [], [], "two proxies listen on 127.0.0.1:1"),
            (["a=1,nope"], [], [], "--pair a upstream"),
        ],
    )
    def test_invalid(self, pairs: list[str], listens: list[str], upstreams: list[str], message: str) -> None:
        with pytest.raises(CommandError, match=message):
            parse_pairs(pairs, listens, upstreams)


class TestTextCommands:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            ("refuse", Command("refuse")),
            ("blackhole redis", Command("blackhole", "redis")),
            ("redis blackhole", Command("blackhole", "redis")),
            ("latency 200ms", Command("latency", seconds=0.2)),
            ("latency 0.5s 50ms pg", Command("latency", "pg", seconds=0.5, jitter=0.05)),
            ("pg latency 0", Command("latency", "pg", seconds=0.0)),
            ("  RESET  ", Command("reset")),
            ("limit_data 1024 redis", Command("limit_data", "redis", nbytes=1024)),
            ("slow-close 2s", Command("slow_close", seconds=2.0)),
            ("up", Command("up")),
            ("status redis", Command("status", "redis")),
            ("help", Command("help")),
        ],
    )
    def test_valid(self, line: str, expected: Command) -> None:
        assert parse_command(line) == expected

    @pytest.mark.parametrize(
        ("line", "message"),
        [
            ("", "empty command"),
            ("explode", "unknown command 'explode'"),
            ("redis explode", "unknown command 'redis'"),
            ("latency", "usage: latency DURATION"),
            ("latency 200", "with a unit"),
            ("latency -5ms", "with a unit"),
            ("latency 1ms 2ms 3ms", "usage: latency"),
            ("up now please", "up takes no argument"),
            ("limit_data lots", "usage: limit_data"),
            ("limit_data -1", "a number of bytes"),
            ("slow_close 0", "> 0"),
            ("help me", "help takes no argument"),
        ],
    )
    def test_invalid(self, line: str, message: str) -> None:
        with pytest.raises(CommandError, match=message):
            parse_command(line)

    def test_describe(self) -> None:
        assert describe(Command("latency", "redis", seconds=0.2, jitter=0.05)) == "redis: latency 200ms 50ms"
        assert describe(Command("up")) == "all: up"


class TestHttpRequests:
    @pytest.mark.parametrize(
        ("method", "target", "body", "expected"),
        [
            ("GET", "/", "", Command("status")),
            ("GET", "/redis", "", Command("status", "redis")),
            ("POST", "/redis/blackhole", "", Command("blackhole", "redis")),
            ("POST", "/refuse", "", Command("refuse")),
            ("POST", "/redis/latency?ms=200", "", Command("latency", "redis", seconds=0.2)),
            ("POST", "/latency?s=0.5&jitter_ms=20", "", Command("latency", seconds=0.5, jitter=0.02)),
            ("POST", "/redis/slow_close?ms=1500", "", Command("slow_close", "redis", seconds=1.5)),
            ("POST", "/redis/limit-data?bytes=10", "", Command("limit_data", "redis", nbytes=10)),
            ("POST", "/redis/up/", "", Command("up", "redis")),
            ("POST", "/", "latency 200ms redis\n", Command("latency", "redis", seconds=0.2)),
        ],
    )
    def test_valid(self, method: str, target: str, body: str, expected: Command) -> None:
        assert parse_request(method, target, body) == expected

    @pytest.mark.parametrize(
        ("method", "target", "message"),
        [
            ("DELETE", "/redis/up", "not allowed"),
            ("GET", "/redis/up", "use POST"),
            ("POST", "/", "POST /NAME/ACTION"),
            ("POST", "/redis/explode", "unknown action 'explode'"),
            ("POST", "/a/b/up", "expected /NAME/ACTION"),
            ("POST", "/redis/latency", "usage: latency"),
            ("POST", "/redis/latency?ms=fast", "with a unit"),
            ("POST", "/redis/latency?ms=1&s=1", "not both"),
            ("POST", "/redis/latency?jitter_ms=5", "needs a latency"),
            ("POST", "/redis/latency?ms=1&ms=2", "given twice"),
            ("POST", "/redis/up?ms=1", "unknown parameter 'ms'; it takes none"),
            ("POST", "/redis/help", "unknown action 'help'"),
        ],
    )
    def test_invalid(self, method: str, target: str, message: str) -> None:
        with pytest.raises(CommandError, match=message):
            parse_request(method, target)


class TestMain:
    def test_bad_address_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["proxy", "--listen", "127.0.0.1", "--upstream", "127.0.0.1:6379"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m degrade proxy: --listen: expected HOST:PORT")

    def test_bad_control_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["proxy", "--pair", "r=0,6379", "--control", "nope"]) == 2
        assert "--control: expected HOST:PORT" in capsys.readouterr().err

    def test_bad_connect_timeout_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["proxy", "--pair", "r=0,6379", "--connect-timeout", "0"]) == 2
        assert "--connect-timeout must be" in capsys.readouterr().err

    def test_nothing_to_proxy_exits_2(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["proxy"]) == 2
        assert "nothing to proxy" in capsys.readouterr().err

    def test_help_lists_proxy(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exc:
            main(["proxy", "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "--pair NAME=LISTEN,UPSTREAM" in out
        assert "POST /NAME/ACTION" in out
