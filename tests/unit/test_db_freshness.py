"""Read-your-writes across requests and the primary guard, without a database."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send
from structlog.testing import capture_logs

from degrade import ConfigurationError, Overloaded, Registry, Severity
from degrade.db import ReadReplicaRouter, ReadYourWritesMiddleware
from degrade.db._freshness import POSITION, Position, _Tokens, format_lsn, parse_lsn
from degrade.db._lag import standby_position

SECRET = "s3cret-s3cret-s3cret-s3cret"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def engines() -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """A primary (pool 5 + 10) and a replica on closed ports: nothing connects unless a query runs."""
    primary = create_async_engine(
        f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/p", pool_size=5, max_overflow=10
    )
    replica = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/r")
    try:
        yield primary, replica
    finally:
        await primary.dispose()
        await replica.dispose()


def position_app(middleware: dict[str, Any]) -> tuple[Starlette, list[int | None]]:
    """``POST /w?lsn=N`` records a write at N; ``GET /r`` records the floor the request carried."""
    floors: list[int | None] = []

    async def write(request: Request) -> Response:
        position = POSITION.get()
        assert position is not None
        position.wrote(int(request.query_params["lsn"]))
        return JSONResponse({})

    async def read(request: Request) -> Response:
        position = POSITION.get()
        floors.append(None if position is None else position.floor)
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/w", write, methods=["POST"]), Route("/r", read)],
        middleware=[Middleware(ReadYourWritesMiddleware, **middleware)],
    )
    return app, floors


def client(app: Any, base_url: str = "https://test") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)


def middleware_of(app: Starlette) -> ReadYourWritesMiddleware:
    stack: Any = app.middleware_stack  # built at the first request
    while not isinstance(stack, ReadYourWritesMiddleware):
        stack = stack.app
    return stack


class TestLsn:
    def test_parse_and_format_round_trip(self) -> None:
        """'16/B374D848' is (0x16 << 32) | 0xB374D848, and formats back the way PostgreSQL writes it."""
        assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
        assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
        assert parse_lsn("0/0") == 0
        assert parse_lsn("ffffffff/ffffffff") == 2**64 - 1

    def test_order_crosses_the_32_bit_boundary(self) -> None:
        """Positions compare as 64-bit numbers: 0/FFFFFFFF before 1/0 (a text compare says otherwise)."""
        assert parse_lsn("0/FFFFFFFF") < parse_lsn("1/0")
        assert parse_lsn("9/0") < parse_lsn("A/0")

    @pytest.mark.parametrize("bad", ["", "16", "16/", "/1", "G/1", "1/1/1", "123456789/0", " 1/0", "1/0\n"])
    def test_malformed_raises_value_error(self, bad: str) -> None:
        """Anything but 'X/Y' with 1-8 hex digits each is refused."""
        with pytest.raises(ValueError, match="not a WAL position"):
            parse_lsn(bad)


class TestPosition:
    def test_need_is_the_later_of_the_clients_and_the_requests_own(self) -> None:
        """A request's reads need what its client sent, or its own later write."""
        position = Position()
        assert position.need() is None
        position.wrote(50)
        assert position.need() == 50
        assert Position(80).need() == 80
        position = Position(80)
        position.wrote(60)
        assert position.need() == 80
        position.wrote(90)
        position.wrote(70)  # an earlier commit seen later never moves it back
        assert position.need() == 90


class TestTokens:
    def test_signed_round_trip(self) -> None:
        """A token issued with the key reads back as its position."""
        tokens = _Tokens(SECRET.encode(), 300, lambda: 1000.0)
        assert tokens.read(tokens.issue(0x16B374D848)) == 0x16B374D848

    def test_forged_and_tampered_tokens_are_refused(self) -> None:
        """Another key's signature, a changed position or expiry, a dropped signature: all refused."""
        tokens = _Tokens(SECRET.encode(), 300, lambda: 1000.0)
        other = _Tokens(b"another-key-another-key", 300, lambda: 1000.0)
        good = tokens.issue(100)
        lsn, expiry, sig = good.split(".")
        assert tokens.read(other.issue(100)) == "forged"
        assert tokens.read(f"{int(lsn, 16) + 1:x}.{expiry}.{sig}") == "forged"
        assert tokens.read(f"{lsn}.{int(expiry, 16) + 1:x}.{sig}") == "forged"
        assert tokens.read(f"{lsn}.{expiry}") == "malformed"
        assert tokens.read(f"{lsn}.{expiry}.{sig}é") == "forged"

    def test_expired_tokens_are_refused(self) -> None:
        """After max_age the token no longer counts, even with a good signature."""
        now = [1000.0]
        tokens = _Tokens(SECRET.encode(), 300, lambda: now[0])
        token = tokens.issue(100)
        now[0] = 1299.0
        assert tokens.read(token) == 100
        now[0] = 1301.0
        assert tokens.read(token) == "expired"

    @pytest.mark.parametrize(
        "bad", ["", "x", "1.2.3.4", "zz.10.abc", "1.-2.abc", "1." + "f" * 20 + ".a", "a" * 200]
    )
    def test_malformed_tokens_are_refused(self, bad: str) -> None:
        """Wrong shape, non-hex fields, over-long values: refused as malformed, never an exception."""
        assert _Tokens(SECRET.encode(), 300, lambda: 0.0).read(bad) == "malformed"

    def test_unsigned_tokens(self) -> None:
        """Without a key a token is position and expiry only."""
        tokens = _Tokens(None, 60, lambda: 0.0)
        token = tokens.issue(255)
        assert token == "ff.3c"
        assert tokens.read(token) == 255
        assert tokens.read(token + ".sig") == "malformed"


class TestMiddlewareConfig:
    def test_cookie_needs_a_secret(self) -> None:
        """via='cookie' without a secret raises a ConfigurationError that says what to pass."""
        with pytest.raises(ConfigurationError, match="needs secret="):
            ReadYourWritesMiddleware(Starlette())

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"secret": "short"}, "at least 16 bytes"),
            ({"secret": 12345}, "secret must be str or bytes"),
            ({"secret": SECRET, "via": "query"}, "via must be"),
            ({"secret": SECRET, "max_age": 0}, "max_age"),
            ({"secret": SECRET, "cookie_name": "a;b"}, "cookie_name"),
            ({"secret": SECRET, "header_name": "x y"}, "header_name"),
            ({"secret": SECRET, "path": "no-slash"}, "path"),
            ({"secret": SECRET, "clock": 3}, "clock"),
        ],
    )
    def test_rejects_bad_arguments(self, kwargs: dict[str, Any], match: str) -> None:
        """Each bad argument is named in its ConfigurationError."""
        with pytest.raises(ConfigurationError, match=match):
            ReadYourWritesMiddleware(Starlette(), **kwargs)

    def test_header_without_a_secret_is_allowed(self) -> None:
        """via='header' may go unsigned (the app's choice); bytes secrets are accepted too."""
        ReadYourWritesMiddleware(Starlette(), via="header")
        ReadYourWritesMiddleware(Starlette(), via="header", secret=SECRET.encode())


class TestMiddleware:
    async def test_non_http_scopes_pass_through(self) -> None:
        """A lifespan scope reaches the app untouched, with no position set."""
        seen: list[object] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((scope["type"], POSITION.get()))

        async def receive() -> Message:
            return {"type": "lifespan.startup"}

        async def send(message: Message) -> None:
            pass

        await ReadYourWritesMiddleware(app, secret=SECRET)({"type": "lifespan"}, receive, send)
        assert seen == [("lifespan", None)]

    async def test_cookie_round_trip(self) -> None:
        """A write sets a signed, HttpOnly, Secure cookie; the next request carries its position."""
        app, floors = position_app({"secret": SECRET})
        async with client(app) as c:
            response = await c.post("/w?lsn=12345")
            cookie = response.headers["set-cookie"]
            assert cookie.startswith("degrade_lsn=3039.")
            for attribute in ("Max-Age=300", "Path=/", "HttpOnly", "SameSite=Lax", "Secure"):
                assert attribute in cookie
            await c.get("/r")
        assert floors == [12345]
        assert middleware_of(app).issued == 1

    async def test_no_write_no_cookie(self) -> None:
        """A request that wrote nothing sets nothing and carries no floor."""
        app, floors = position_app({"secret": SECRET})
        async with client(app) as c:
            response = await c.get("/r")
        assert "set-cookie" not in response.headers
        assert floors == [None]

    async def test_forged_cookie_is_ignored_and_counted(self) -> None:
        """A cookie signed with another key: 200, no floor, counted and logged once."""
        app, floors = position_app({"secret": SECRET})
        forged = _Tokens(b"not-the-app-key-at-all", 300, lambda: 2e9).issue(10**12)
        with capture_logs() as logs:
            async with client(app) as c:
                for _ in range(3):
                    response = await c.get("/r", headers={"cookie": f"other=1; degrade_lsn={forged}"})
                    assert response.status_code == 200
                response = await c.get("/r", headers={"cookie": "degrade_lsn=%%%"})
                assert response.status_code == 200
        assert floors == [None] * 4
        middleware = middleware_of(app)
        assert middleware.rejected == 4
        assert middleware.rejected_by_reason == {"forged": 3, "malformed": 1}
        assert [e["event"] for e in logs] == ["db.read_your_writes.rejected"]

    async def test_expired_cookie_is_ignored(self) -> None:
        """A genuine cookie past max_age routes as if none was sent."""
        now = [1_000_000.0]
        app, floors = position_app({"secret": SECRET, "max_age": 10, "clock": lambda: now[0]})
        async with client(app) as c:
            await c.post("/w?lsn=7")
            await c.get("/r")
            now[0] += 11
            await c.get("/r")
        assert floors == [7, None]
        assert middleware_of(app).rejected_by_reason == {"expired": 1}

    async def test_header_round_trip(self) -> None:
        """via='header': the response header's value, sent back as a request header, is the floor."""
        app, floors = position_app({"via": "header", "secret": SECRET, "header_name": "X-DB-Position"})
        async with client(app) as c:
            response = await c.post("/w?lsn=99")
            value = response.headers["x-db-position"]
            assert "set-cookie" not in response.headers
            await c.get("/r", headers={"x-db-position": value})
            await c.get("/r", headers={"x-db-position": "63.ffffffff"})  # unsigned: refused with a key
        assert floors == [99, None]

    async def test_sub_second_max_age_keeps_the_cookie(self) -> None:
        """max_age=0.5 sends Max-Age=1: a Max-Age of 0 would delete the cookie at once."""
        app, _ = position_app({"secret": SECRET, "max_age": 0.5})
        async with client(app) as c:
            assert "Max-Age=1;" in (await c.post("/w?lsn=1")).headers["set-cookie"]

    async def test_insecure_cookie_over_http(self) -> None:
        """secure=False drops the Secure attribute, so a plain-HTTP client sends it back."""
        app, floors = position_app({"secret": SECRET, "secure": False})
        async with client(app, "http://test") as c:
            response = await c.post("/w?lsn=5")
            assert "Secure" not in response.headers["set-cookie"]
            await c.get("/r")
        assert floors == [5]


def replica_router(
    engines: tuple[AsyncEngine, AsyncEngine], registry: Registry, name: str = "db-replica", **kwargs: Any
) -> ReadReplicaRouter:
    primary, replica = engines
    dep = registry.dependency(name, severity=Severity.SEV3)
    return ReadReplicaRouter(primary=primary, replica=replica, dependency=dep, **kwargs)


class TestRouterFreshness:
    async def test_reads_wait_for_the_replica_to_pass_the_clients_write(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """Replay position unknown or behind: the primary (counted); at or past it: the replica."""
        router = replica_router(engines, registry, read_your_writes=True)
        token = POSITION.set(Position(1000))
        try:
            assert router._needs_primary() is True  # nothing measured yet: unknown is never fresh
            router.replay_lsn = 999
            assert router._needs_primary() is True
            router.replay_lsn = 1000
            assert router._needs_primary() is False
            POSITION.get().wrote(2000)  # type: ignore[union-attr] - set above
            assert router._needs_primary() is True
        finally:
            POSITION.reset(token)
        assert router._needs_primary() is False  # no middleware: no position
        assert router.fresh_on_primary == 3

    async def test_off_by_default(self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry) -> None:
        """Without read_your_writes a client's position changes nothing and no commit asks for one."""
        router = replica_router(engines, registry)
        token = POSITION.set(Position(1000))
        try:
            assert router._needs_primary() is False
            router._note_commit()
            assert POSITION.get().pending is False  # type: ignore[union-attr] - set above
        finally:
            POSITION.reset(token)

    async def test_lag_monitor_runs_for_read_your_writes(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """read_your_writes without max_lag still starts the monitor that measures the replay position."""
        router = replica_router(engines, registry, read_your_writes=True, lag_interval=60)
        await router.start()
        try:
            assert router._monitor is not None
            assert not router._monitor.done()
        finally:
            await router.aclose()

    async def test_rejects_bad_arguments(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """read_your_writes is a bool; primary_read_share is in (0, 1]."""
        bad: list[dict[str, Any]] = [
            {"read_your_writes": "yes"},
            {"primary_read_share": 0},
            {"primary_read_share": 1.5},
        ]
        for i, kwargs in enumerate(bad):
            with pytest.raises(ConfigurationError):
                replica_router(engines, registry, f"replica-{i}", **kwargs)


class TestPrimaryGuard:
    async def test_default_cap_is_half_the_primary_pool(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """pool_size 5 + max_overflow 10: 7 fallback reads at once; a tiny share still allows one."""
        assert replica_router(engines, registry).primary_read_cap == 7
        assert replica_router(engines, registry, "other", primary_read_share=0.01).primary_read_cap == 1

    async def test_fallback_reads_over_the_share_are_shed(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """Replica down, cap 1: a second read waits connect_timeout, then Overloaded; not a failure."""
        router = replica_router(engines, registry, primary_read_share=0.1, connect_timeout=0.1)
        dep = router.dependency
        assert dep is not None
        assert router.primary_read_cap == 1
        dep.mark_down(reason="test")
        failures = dep.failures
        inside = asyncio.Event()
        leave = asyncio.Event()

        async def hold() -> None:
            async with router.for_read() as session:
                assert session.bind is engines[0]  # the primary
                inside.set()
                await leave.wait()

        holder = asyncio.ensure_future(hold())
        await inside.wait()
        with pytest.raises(Overloaded) as info:
            async with router.for_read():
                pass
        assert info.value.reason == "primary-guard"
        assert info.value.retry_after == 1
        assert info.value.dependency_name == "db-replica"
        leave.set()
        await holder
        async with router.for_read() as session:  # the place is free again
            assert session.bind is engines[0]
        site = next(s for s in dep.sites if s.name.endswith("for_read"))
        assert site.shed_calls.get("primary-guard") == 1
        assert router.guard_shed == 1
        assert dep.failures == failures

    async def test_replica_up_is_not_guarded(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """Reads on the primary for freshness while the replica is up do not take the guard's places."""
        router = replica_router(engines, registry, primary_read_share=0.1, read_your_writes=True)
        token = POSITION.set(Position(10))
        try:
            async with router.for_read() as one, router.for_read() as two:
                assert one.bind is engines[0]
                assert two.bind is engines[0]
        finally:
            POSITION.reset(token)
        assert router.guard_shed == 0
        assert router._primary_reads.in_use == 0


class _Row:
    """A fake connection whose LAG_SQL row is ``row``."""

    def __init__(self, **row: Any) -> None:
        self.row = SimpleNamespace(**row)

    async def execute(self, statement: Any) -> Any:
        return SimpleNamespace(one=lambda: self.row)


class TestReplayPosition:
    async def test_lag_query_gives_the_replayed_position(self) -> None:
        """The lag monitor's one round trip also gives the replay position, parsed; NULL is unknown."""
        conn: Any = _Row(standby=True, caught_up=False, since_replay=1.5, replay_lsn="1/10")
        assert await standby_position(conn) == (1.5, (1 << 32) | 0x10)
        conn = _Row(standby=True, caught_up=True, since_replay=None, replay_lsn=None)
        assert await standby_position(conn) == (0.0, None)

    async def test_monitor_keeps_the_position(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """Each measurement replaces replay_lsn; a failed one keeps the last (older: the safe side)."""
        router = replica_router(engines, registry, read_your_writes=True, lag_interval=0.01)
        answers: list[Any] = [5, 9, OSError("refused")]
        seen: list[int | None] = []
        done = asyncio.Event()

        async def check() -> int | None:
            seen.append(router.replay_lsn)
            if not answers:
                done.set()
                await asyncio.Event().wait()  # park the monitor here
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return int(answer)

        router._lag_check = check
        await router.start()
        try:
            await asyncio.wait_for(done.wait(), 5)
        finally:
            await router.aclose()
        assert seen == [None, 5, 9, 9]  # the failed measurement left 9 in place


class TestRecordPosition:
    async def test_commit_marks_the_request_pending(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """With read_your_writes, a commit on the primary asks for the position after it."""
        router = replica_router(engines, registry, read_your_writes=True)
        position = Position()
        token = POSITION.set(position)
        try:
            router._note_commit()
        finally:
            POSITION.reset(token)
        assert position.pending is True

    async def test_unreachable_primary_costs_the_position_not_the_request(
        self, engines: tuple[AsyncEngine, AsyncEngine], registry: Registry
    ) -> None:
        """The primary refuses the position query: counted, on its dependency too; the request goes on."""
        primary_dep = registry.dependency("db", severity=Severity.SEV1)
        router = replica_router(engines, registry, read_your_writes=True, primary_dependency=primary_dep)
        position = Position()
        position.pending = True
        token = POSITION.set(position)
        try:
            await router._record_position(None)
        finally:
            POSITION.reset(token)
        assert position.written is None
        assert position.pending is False
        assert router.positions_failed == 1
        assert primary_dep.failures == 1
