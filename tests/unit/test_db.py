"""degrade.db without a database: configuration, pass-through, known-down 503s, classification."""

from __future__ import annotations

import asyncio
import importlib
import math
import re
import socket
import sys
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy.exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send
from structlog.testing import capture_logs

from degrade import (
    CheckFailed,
    ConfigurationError,
    Dependency,
    DependencyUnavailable,
    MissingExtraError,
    Registry,
    Severity,
    checks,
)
from degrade.db import (
    DBHealthMiddleware,
    NotAStandby,
    ReadReplicaRouter,
    _conn,
    _context,
    connection,
    current_connection,
    engine_options,
    is_database_failure,
    problems,
    replica_lag,
    require_connection,
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Attempts:
    """An ``async_creator`` that counts connection attempts and always fails."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        raise ConnectionRefusedError("no database in unit tests")


@pytest.fixture
def attempts() -> _Attempts:
    """Counts the engine fixture's connection attempts."""
    return _Attempts()


@pytest.fixture
async def engine(attempts: _Attempts) -> AsyncIterator[AsyncEngine]:
    """An asyncpg engine that never reaches a server (every attempt is counted and refused)."""
    eng = create_async_engine(
        f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/x",
        async_creator=attempts,
        **engine_options(acquire_timeout=0.5),
    )
    try:
        yield eng
    finally:
        await eng.dispose()


def _scope(path: str = "/api/x", *, kind: str = "http", method: str = "GET") -> Scope:
    return {
        "type": kind,
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "http",
        "query_string": b"",
        "headers": [],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1),
        "http_version": "1.1",
        "asgi": {"version": "3.0"},
    }


async def _call(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


class _Recorder:
    """A tiny ASGI app that records the scopes it saw and, when gated, uses the database."""

    def __init__(self, *, uses_db: bool = True) -> None:
        self.scopes: list[Scope] = []
        self.uses_db = uses_db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http" and self.uses_db and _context.LEASE.get() is not None:
            await connection()  # the gate checks out at the first database use
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})


class TestImport:
    @pytest.mark.parametrize("missing", ["asyncpg", "sqlalchemy"])
    def test_missing_driver_names_the_extra(self, monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
        """Importing degrade.db without SQLAlchemy or asyncpg raises MissingExtraError naming [postgres]."""
        for name in list(sys.modules):
            if name == "degrade.db" or name.startswith("degrade.db."):
                monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, missing, None)
        with pytest.raises(MissingExtraError, match=r"degrade\[postgres\]"):
            importlib.import_module("degrade.db")

    def test_public_names(self) -> None:
        """The names DESIGN.md promises are importable from degrade.db, each once in __all__."""
        from degrade import db

        assert {"DBHealthMiddleware", "ReadReplicaRouter"} <= set(db.__all__)
        assert len(db.__all__) == len(set(db.__all__))
        for name in db.__all__:
            assert getattr(db, name) is not None


class TestEngineOptions:
    def test_bounds_every_wait(self) -> None:
        """engine_options sets pool_timeout and asyncpg's connect and command timeouts."""
        opts = engine_options(acquire_timeout=0.7, command_timeout=3)
        assert opts["pool_timeout"] == 0.7
        assert opts["connect_args"] == {"timeout": 0.7, "command_timeout": 3.0}
        assert opts["pool_pre_ping"] is False
        assert (opts["pool_size"], opts["max_overflow"]) == (5, 10)

    def test_merges_connect_args_and_extra(self) -> None:
        """Extra keywords pass through; extra connect_args are merged, not replaced."""
        opts = engine_options(echo=True, connect_args={"server_settings": {"application_name": "x"}})
        assert opts["echo"] is True
        assert opts["connect_args"]["server_settings"] == {"application_name": "x"}
        assert opts["connect_args"]["timeout"] == 1.0

    @pytest.mark.parametrize(
        "kwargs",
        [{"acquire_timeout": 0}, {"command_timeout": -1}, {"pool_size": 0}, {"max_overflow": -1}],
    )
    def test_rejects_unbounded_values(self, kwargs: dict[str, Any]) -> None:
        """Zero or negative bounds and an unbounded pool are configuration errors."""
        with pytest.raises(ConfigurationError):
            engine_options(**kwargs)


class TestEngineProblems:
    def test_sync_engine_is_a_problem(self) -> None:
        """A sync Engine is reported (degrade needs create_async_engine); a non-engine is refused."""
        from sqlalchemy import create_engine

        found = problems(create_engine("sqlite://"))
        assert any("create_async_engine" in p for p in found)
        with pytest.raises(ConfigurationError, match="takes a SQLAlchemy engine"):
            problems("postgresql+asyncpg://127.0.0.1/x")  # type: ignore[arg-type]

    async def test_old_names_warn(self) -> None:
        """engine_problems, replica_check and the redis checkers' old names still work, with a warning."""
        from degrade import db as ddb

        eng = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x")
        try:
            with pytest.warns(DeprecationWarning, match=r"use degrade\.db\.problems\(\)"):
                assert isinstance(ddb.engine_problems(eng), list)
            with pytest.warns(DeprecationWarning, match=r"use degrade\.checks\.replica\(\)"):
                ddb.replica_check(eng)
        finally:
            await eng.dispose()

    async def test_defaults_are_unbounded(self) -> None:
        """A default engine: asyncpg's 60 s connect timeout and no command_timeout are reported."""
        eng = create_async_engine(f"postgresql+asyncpg://u:secret@127.0.0.1:{_closed_port()}/x")
        try:
            found = problems(eng, acquire_timeout=1.0)
        finally:
            await eng.dispose()
        text = " ".join(found)
        assert "60s" in text
        assert "command_timeout" in text
        assert "pool_timeout=30s" in text
        assert "secret" not in text

    async def test_engine_options_are_clean(self) -> None:
        """An engine built with engine_options has no problem at the same bound."""
        eng = create_async_engine(
            f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x", **engine_options(acquire_timeout=1.0)
        )
        try:
            assert problems(eng, acquire_timeout=1.0) == ()
            assert any("exceeds" in p for p in problems(eng, acquire_timeout=0.5))
        finally:
            await eng.dispose()

    @pytest.mark.parametrize("kwargs", [{"poolclass": NullPool}, {"max_overflow": -1}])
    async def test_unbounded_pools(self, kwargs: dict[str, Any]) -> None:
        """NullPool and max_overflow=-1 leave connection attempts uncapped: reported."""
        eng = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x", **kwargs)
        try:
            assert any("cap" in p for p in problems(eng))
        finally:
            await eng.dispose()

    async def test_warns_once_per_engine(self, registry: Registry) -> None:
        """The middleware logs db.engine.unbounded once per engine, however often it is built."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        eng = create_async_engine(f"postgresql+asyncpg://u:pw@127.0.0.1:{_closed_port()}/x")
        try:
            with capture_logs() as logs:
                for _ in range(3):
                    DBHealthMiddleware(_Recorder(), engine=eng, dependency=dep)
            warnings = [e for e in logs if e["event"] == "db.engine.unbounded"]
            assert len(warnings) == 1
            assert warnings[0]["log_level"] == "warning"
            assert "pw" not in repr(warnings[0])
        finally:
            await eng.dispose()


class TestMiddlewareConfig:
    async def test_rejects_bad_arguments(self, engine: AsyncEngine, registry: Registry) -> None:
        """Wrong types and ranges raise ConfigurationError at construction."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        app = _Recorder()
        bad: list[dict[str, Any]] = [
            {"engine": object(), "dependency": dep},
            {"engine": engine, "dependency": object()},
            {"engine": engine, "dependency": dep, "acquire_timeout": 0},
            {"engine": engine, "dependency": dep, "acquire_timeout": True},
            {"engine": engine, "dependency": dep, "include": ("api",)},
            {"engine": engine, "dependency": dep, "include": ()},
            {"engine": engine, "dependency": dep, "retry_after": -1},
            {"engine": engine, "dependency": dep, "read_only_fallback": True},
        ]
        for kwargs in bad:
            with pytest.raises(ConfigurationError):
                DBHealthMiddleware(app, **kwargs)

    async def test_rejects_other_drivers(self, registry: Registry) -> None:
        """Only the asyncpg driver is supported (its connections are what the bound terminates)."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        eng = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x")
        eng.sync_engine.dialect.driver = "psycopg"  # as a psycopg engine reports itself
        try:
            with pytest.raises(ConfigurationError, match="asyncpg"):
                DBHealthMiddleware(_Recorder(), engine=eng, dependency=dep)
        finally:
            await eng.dispose()

    async def test_starlette_builds_it(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry
    ) -> None:
        """Middleware(DBHealthMiddleware, ...) works through Starlette's factory (keyword-only options)."""
        dep = registry.dependency("db", severity=Severity.SEV1)

        async def home(request: Request) -> PlainTextResponse:
            return PlainTextResponse("home")

        app = Starlette(
            routes=[Route("/", home)],
            middleware=[Middleware(DBHealthMiddleware, engine=engine, dependency=dep, include=("/api",))],
        )
        sent = await _call(app, _scope("/"))
        assert sent[0]["status"] == 200
        assert attempts.calls == 0


class TestPassThrough:
    @pytest.mark.parametrize(
        ("kind", "path"),
        [("http", "/static/app.js"), ("http", "/apix"), ("http", "/api/health"), ("websocket", "/api/ws")],
    )
    async def test_untouched(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry, kind: str, path: str
    ) -> None:
        """Paths outside include, under exclude, and non-HTTP scopes pass through without a checkout."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        app = _Recorder()
        gate = DBHealthMiddleware(app, engine=engine, dependency=dep, include="/api", exclude="/api/health")
        scope = _scope(path, kind=kind)
        await _call(gate, scope)
        assert app.scopes == [scope]
        assert attempts.calls == 0
        assert dep.state == "ok"

    async def test_lifespan_passes(self, engine: AsyncEngine, registry: Registry) -> None:
        """A lifespan scope reaches the app unchanged."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        app = _Recorder()
        gate = DBHealthMiddleware(app, engine=engine, dependency=dep)
        await gate({"type": "lifespan"}, None, None)  # type: ignore[arg-type]
        assert app.scopes == [{"type": "lifespan"}]

    def test_prefix_matching(self) -> None:
        """'/api' matches '/api' and '/api/...', never '/apix'; exclude wins over include."""
        from degrade.db._gate import _matcher

        gated = _matcher(("/api",), ("/api/v1/health",))
        for method in ("GET", "POST", "PROPFIND"):  # plain prefixes: every method
            assert gated(method, "/api")
            assert gated(method, "/api/")
            assert gated(method, "/api/v1/tracks")
            assert not gated(method, "/apix")
            assert not gated(method, "/api/v1/health")
            assert not gated(method, "/api/v1/health/deep")
            assert gated(method, "/api/v1/healthz")
        everything = _matcher(("/",), ())
        assert everything("GET", "/")
        assert everything("DELETE", "/x/y")

    def test_method_entries(self) -> None:
        """'GET /users' excludes the cached read only; writes stay gated; 'POST|PUT /api' names several."""
        from degrade.db._gate import _matcher

        gated = _matcher(("/api", "/users"), ("GET /users",))
        assert not gated("GET", "/users/7")
        assert not gated("HEAD", "/users/7")  # GET covers HEAD (Starlette serves it with the GET route)
        for method in ("POST", "PUT", "PATCH", "DELETE", "PROPFIND"):
            assert gated(method, "/users/7")
        assert not gated("GET", "/usersx")
        assert gated("GET", "/api/users")  # the exclusion is a prefix of the path, not a substring
        writes = _matcher(("post|PUT /api",), ())  # method tokens are case-insensitive
        assert writes("POST", "/api/x")
        assert writes("PUT", "/api")
        assert not writes("GET", "/api/x")
        assert not writes("PROPFIND", "/api/x")
        spaced = _matcher(("GET  /a b",), ())  # spaces after the methods; the prefix may hold one
        assert spaced("GET", "/a b/c")
        assert not spaced("GET", "/a")
        mixed = _matcher("/", ["/static", "GET /cache"])  # a plain string and a list both work
        assert not mixed("POST", "/static/x")
        assert not mixed("GET", "/cache/x")
        assert mixed("POST", "/cache/x")

    @pytest.mark.parametrize(
        ("include", "exclude", "named"),
        [
            (("GET users",), (), "'GET users'"),
            (("GET",), (), "'GET'"),
            (("api",), (), "'api'"),
            (("/api",), ("FETCH /api",), "'FETCH /api'"),
            (("GET|POTS /api",), (), "'GET|POTS /api'"),
            (("GET||POST /api",), (), "'GET||POST /api'"),
            ((" /api",), (), "' /api'"),
            (("/api",), (7,), "7"),
        ],
    )
    def test_bad_entries_are_named(self, include: Any, exclude: Any, named: str) -> None:
        """No leading '/', an unknown method token: ConfigurationError naming the entry."""
        from degrade.db._gate import _matcher

        with pytest.raises(ConfigurationError, match=re.escape(named)):
            _matcher(include, exclude)

    async def test_method_exclusion_through_the_gate(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry, simulate_outage: Any
    ) -> None:
        """While down: an excluded GET reaches its (cached) handler, a POST to the same path gets 503."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        app = _Recorder(uses_db=False)
        gate = DBHealthMiddleware(app, engine=engine, dependency=dep, include="/", exclude=["GET /users"])
        with simulate_outage(dep):
            assert (await _call(gate, _scope("/users/7")))[0]["status"] == 200
            assert (await _call(gate, _scope("/users/7", method="POST")))[0]["status"] == 503
        assert [sc["method"] for sc in app.scopes] == ["GET"]
        assert attempts.calls == 0


class TestRequireConnection:
    async def test_is_connection(self) -> None:
        """require_connection is connection under its FastAPI name; current_connection still gives None."""
        assert require_connection is connection
        assert current_connection() is None
        with pytest.raises(ConfigurationError, match=r"not under the gate's include= prefixes.*exclude="):
            await require_connection()

    async def test_fastapi_depends(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry
    ) -> None:
        """Depends(require_connection): a gated path checks out (503: no server); an ungated one says so."""
        fastapi = pytest.importorskip("fastapi")
        import httpx

        dep = registry.dependency("db", severity=Severity.SEV1)
        app = fastapi.FastAPI()

        @app.get("/api/items")
        @app.get("/health/items")
        async def items(conn: Any = fastapi.Depends(require_connection)) -> Any:  # noqa: B008
            return {"rows": (await conn.execute(text("SELECT 1"))).scalar()}

        app.add_middleware(DBHealthMiddleware, engine=engine, dependency=dep, include="/api")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.get("/api/items")
            assert response.status_code == 503  # the checkout was tried, and refused
            assert attempts.calls == 1
            with pytest.raises(ConfigurationError, match="needs a request gated by DBHealthMiddleware"):
                await client.get("/health/items")  # not 'NoneType' object has no attribute 'execute'
        assert attempts.calls == 1


class TestKnownDown:
    async def test_503_without_pool_or_handler(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry, simulate_outage: Any
    ) -> None:
        """While the dependency is down: 503, shared body, Retry-After; no checkout, no handler call."""
        dep = registry.dependency("db", severity=Severity.SEV1, retry_after=7)
        app = _Recorder()
        gate = DBHealthMiddleware(app, engine=engine, dependency=dep)
        with simulate_outage(dep):
            sent = await _call(gate, _scope())
        assert app.scopes == []
        assert attempts.calls == 0
        start, body = sent
        assert start["status"] == 503
        headers = dict(start["headers"])
        assert headers[b"retry-after"] == b"7"
        assert headers[b"content-type"] == b"application/json"
        assert (
            body["body"]
            == b'{"error":"dependency_unavailable","dependency":"db","detail":"db is unavailable"}'
        )
        site = next(s for s in dep.sites if s.name == "degrade.db.DBHealthMiddleware")
        assert site.degraded_calls == 1
        assert site.mode == "fail_loud"

    async def test_refused_connect_counts_a_failure(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry
    ) -> None:
        """No connection: 503 and one failure; the threshold-th opens the dependency, then no attempts."""
        dep = registry.dependency("db", severity=Severity.SEV1, failure_threshold=2)
        app = _Recorder()
        gate = DBHealthMiddleware(app, engine=engine, dependency=dep)
        for _ in range(2):
            sent = await _call(gate, _scope())
            assert sent[0]["status"] == 503
        assert dep.is_down
        before = attempts.calls
        for _ in range(5):
            assert (await _call(gate, _scope()))[0]["status"] == 503
        assert attempts.calls == before
        assert len(app.scopes) == 2  # the handler ran up to its first database use, before the outage
        assert engine.pool.checkedout() == 0

    async def test_abandon_cap_refuses(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the cap of abandoned clean-ups reached, the gate answers 503 without a new attempt."""
        from degrade import _bounded

        dep = registry.dependency("db", severity=Severity.SEV1)
        gate = DBHealthMiddleware(_Recorder(), engine=engine, dependency=dep)
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 0)
        refused = _bounded.Abandoned.refused
        assert (await _call(gate, _scope()))[0]["status"] == 503
        assert _bounded.Abandoned.refused == refused + 1
        assert attempts.calls == 0
        assert dep.failures == 0  # self-protection, not a database failure


class TestClassification:
    def test_connection_errors_are_failures(self) -> None:
        """OperationalError, InterfaceError, pool timeouts and invalidated connections count."""
        assert is_database_failure(sa_exc.OperationalError("SELECT 1", {}, Exception("down")))
        assert is_database_failure(sa_exc.InterfaceError("SELECT 1", {}, Exception("closed")))
        assert is_database_failure(sa_exc.TimeoutError("QueuePool limit"))
        lost = sa_exc.DBAPIError("SELECT 1", {}, Exception("x"), connection_invalidated=True)
        assert is_database_failure(lost)

    def test_bugs_are_not(self) -> None:
        """Constraint violations, syntax errors and plain exceptions propagate as bugs."""
        assert not is_database_failure(sa_exc.IntegrityError("INSERT", {}, Exception("dup")))
        assert not is_database_failure(sa_exc.ProgrammingError("SELEC", {}, Exception("syntax")))
        assert not is_database_failure(ValueError("bug"))
        assert not is_database_failure(sa_exc.DBAPIError("SELECT 1", {}, Exception("x")))

    def test_timeouts_count_only_from_the_driver(self) -> None:
        """A bare TimeoutError counts when asyncpg or SQLAlchemy raised it, not from the handler."""
        namespace: dict[str, Any] = {"__name__": "asyncpg.fake"}
        exec("def boom():\n    raise TimeoutError()\n", namespace)  # noqa: S102 - a frame from 'asyncpg'
        with pytest.raises(TimeoutError) as from_driver:
            namespace["boom"]()
        assert is_database_failure(from_driver.value)
        with pytest.raises(TimeoutError) as from_handler:
            raise TimeoutError("an HTTP call in the handler")
        assert not is_database_failure(from_handler.value)

    def test_a_write_on_a_lost_connection_counts_from_the_driver(self) -> None:
        """asyncio's AttributeError of python/cpython#136234 counts when the driver was writing."""
        closed = SimpleNamespace(is_closing=lambda: True)  # the transport whose connection was lost
        writelines: dict[str, Any] = {}
        selector_events = importlib.import_module("asyncio.selector_events").__file__
        code = compile("def writelines(self):\n    raise AttributeError('x')\n", selector_events, "exec")
        exec(code, writelines)  # noqa: S102 - a function that looks like asyncio's
        driver: dict[str, Any] = {
            "__name__": "asyncpg.fake",
            "writelines": writelines["writelines"],
            "t": closed,
        }
        exec("def send():\n    writelines(t)\n", driver)  # noqa: S102 - a frame from 'asyncpg'
        with pytest.raises(AttributeError) as from_driver:
            driver["send"]()
        assert is_database_failure(from_driver.value)
        with pytest.raises(AttributeError) as from_handler:
            writelines["writelines"](closed)  # the same error with no driver frame: the handler's own write
        assert not is_database_failure(from_handler.value)


class TestLagDecision:
    @staticmethod
    def _conn(**row: Any) -> Any:
        class Result:
            def one(self) -> Any:
                return SimpleNamespace(**{"replay_lsn": None, **row})  # LAG_SQL's position column

        class Conn:
            sync_connection = None  # no driver: close_own has no socket to close

            async def execute(self, statement: Any) -> Result:
                return Result()

            async def execution_options(self, **options: Any) -> Conn:
                return self

            async def invalidate(self) -> None:
                return None

        return Conn()

    async def test_primary_is_unknown(self) -> None:
        """On a primary (not in recovery) lag is unknown (None), never zero."""
        assert await replica_lag(self._conn(standby=False, caught_up=False, since_replay=None)) is None

    async def test_primary_is_not_a_standby(self) -> None:
        """standby_lag tells a primary apart: NotAStandby (a CheckFailed), with its own message."""
        from degrade.db._lag import standby_lag

        with pytest.raises(NotAStandby, match="not a standby: the replica URL points at a primary"):
            await standby_lag(self._conn(standby=False, caught_up=False, since_replay=None))
        assert issubclass(NotAStandby, CheckFailed)
        assert await standby_lag(self._conn(standby=True, caught_up=True, since_replay=None)) == 0.0
        assert await standby_lag(self._conn(standby=True, caught_up=False, since_replay=None)) is None

    async def test_check_says_not_a_standby(
        self, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """checks.replica(max_lag=...) on a primary raises NotAStandby, not the 'unknown lag' CheckFailed."""
        row = {"standby": False, "caught_up": False, "since_replay": None}
        fake = self._conn(**row)

        class FakeEngine:
            def connect(self) -> Any:
                class Ctx:
                    async def __aenter__(self) -> Any:
                        return fake

                    async def __aexit__(self, *exc: object) -> None:
                        return None

                return Ctx()

            async def dispose(self) -> None:
                return None

        monkeypatch.setattr(checks, "_private_engine", lambda engine: FakeEngine)
        with pytest.raises(NotAStandby, match="not a standby"):
            await checks.replica(engine, max_lag=2)()
        row.update(standby=True, caught_up=False, since_replay=None)
        fake = self._conn(**row)
        with pytest.raises(CheckFailed, match="unknown") as info:
            await checks.replica(engine, max_lag=2)()
        assert type(info.value) is CheckFailed

    @pytest.mark.parametrize(
        ("error", "reason", "last_error"),
        [
            (
                NotAStandby("not a standby: the replica URL points at a primary"),
                "not-a-standby",
                "NotAStandby",
            ),
            (CheckFailed("replication lag 9.0s is over max_lag=2s"), "lag", "CheckFailed"),
        ],
    )
    async def test_monitor_reason(
        self,
        *,
        engine: AsyncEngine,
        attempts: _Attempts,
        registry: Registry,
        error: CheckFailed,
        reason: str,
        last_error: str,
    ) -> None:
        """The lag monitor marks a primary down as not-a-standby (lag stays lag); reads go to the primary."""

        async def lag_check() -> None:
            raise error

        # Its own check (the probe's, while down) is the fake too: nothing dials the replica.
        dep = registry.dependency("db-replica", severity=Severity.SEV3, check=lag_check)
        replica_attempts = _Attempts()
        replica = create_async_engine(
            f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/y", async_creator=replica_attempts
        )
        went_down = asyncio.Event()
        dep.subscribe(lambda d: went_down.set() if d.is_down else None)
        try:
            router = ReadReplicaRouter(
                primary=engine, replica=replica, dependency=dep, max_lag=2, lag_interval=0.01
            )
            router._lag_check = lag_check
            with capture_logs() as logs:
                await router.start()
                try:
                    await asyncio.wait_for(went_down.wait(), timeout=5.0)
                finally:
                    await router.aclose()
                async with router.for_read() as session:
                    assert session.bind is engine  # the primary, without trying the replica
            assert dep.is_down
            assert dep.last_error == last_error  # health details show the class: distinguishable
            assert replica_attempts.calls == 0
            down = [e for e in logs if e["event"] == "dependency.down"]
            assert [(e["reason"], e["error"]) for e in down] == [(reason, last_error)]
            fallback = [e for e in logs if e["event"] == "db.replica.fallback"]
            assert [e["error"] for e in fallback] == [last_error]
            flagged = [e for e in logs if e["event"] == "db.replica.not_a_standby"]
            assert len(flagged) == (1 if reason == "not-a-standby" else 0)
            assert all("max_lag" in e["hint"] for e in flagged)
        finally:
            await replica.dispose()

    async def test_idle_primary_is_not_lag(self) -> None:
        """Everything received replayed: 0, however old the last transaction is."""
        assert await replica_lag(self._conn(standby=True, caught_up=True, since_replay=3600.0)) == 0.0

    async def test_pending_replay(self) -> None:
        """WAL waiting: seconds since the last replayed commit; nothing replayed yet: unknown."""
        assert await replica_lag(self._conn(standby=True, caught_up=False, since_replay=4.5)) == 4.5
        assert await replica_lag(self._conn(standby=True, caught_up=False, since_replay=None)) is None

    def test_replica_check_validates(self, engine: AsyncEngine) -> None:
        """checks.replica rejects non-positive timeouts and lags."""
        with pytest.raises(ConfigurationError):
            checks.replica(engine, max_lag=0)
        with pytest.raises(ConfigurationError):
            checks.replica(engine, timeout=-1)

    async def test_check_fails_on_unknown_lag(
        self, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The check raises CheckFailed when lag is unknown or over max_lag."""
        import degrade.db._lag as lag_module

        class FakeEngine:
            def connect(self) -> Any:
                outer = self

                class Ctx:
                    async def __aenter__(self) -> Any:
                        return outer

                    async def __aexit__(self, *exc: object) -> None:
                        return None

                return Ctx()

            sync_connection = None  # the fake is its own connection too, with no driver to close

            async def execution_options(self, **options: Any) -> Any:
                return self

            async def invalidate(self) -> None:
                return None

            async def dispose(self) -> None:
                return None

        # The check runs on a private copy of the engine's pool: hand it the fake instead.
        monkeypatch.setattr(checks, "_private_engine", lambda engine: FakeEngine)
        for value, ok in ((None, False), (9.0, False), (0.5, True)):

            async def fake_lag(conn: Any, value: float | None = value) -> float | None:
                return value

            monkeypatch.setattr(lag_module, "standby_lag", fake_lag)
            check = checks.replica(engine, max_lag=2)
            if ok:
                await check()
            else:
                with pytest.raises(CheckFailed):
                    await check()


class TestRouterConfig:
    async def test_rejects_bad_arguments(self, engine: AsyncEngine, registry: Registry) -> None:
        """A replica needs its dependency; the replica is not the primary; bounds are positive."""
        dep = registry.dependency("db-replica", severity=Severity.SEV3)
        other = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/y")
        try:
            with pytest.raises(ConfigurationError):
                ReadReplicaRouter(primary=engine, replica=other)
            with pytest.raises(ConfigurationError):
                ReadReplicaRouter(primary=engine, replica=engine, dependency=dep)
            with pytest.raises(ConfigurationError):
                ReadReplicaRouter(primary=engine, replica=other, dependency=dep, connect_timeout=0)
            with pytest.raises(ConfigurationError):
                ReadReplicaRouter(primary=engine, replica=other, dependency=dep, primary_dependency=dep)
            with pytest.raises(ConfigurationError):
                ReadReplicaRouter(primary=object())  # type: ignore[arg-type]
        finally:
            await other.dispose()

    async def test_abandon_cap_reads_the_primary(
        self, engine: AsyncEngine, registry: Registry, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the cap of abandoned clean-ups reached, a read skips the replica without trying it."""
        from degrade import _bounded

        dep = registry.dependency("db-replica", severity=Severity.SEV3)
        replica_attempts = _Attempts()
        replica = create_async_engine(
            f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/y", async_creator=replica_attempts
        )
        monkeypatch.setattr(_bounded, "MAX_ABANDONED", 0)
        refused = _bounded.Abandoned.refused
        try:
            router = ReadReplicaRouter(primary=engine, replica=replica, dependency=dep)
            async with router.for_read() as session:
                assert session.bind is engine
            assert replica_attempts.calls == 0
            assert _bounded.Abandoned.refused == refused + 1
            assert dep.failures == 0  # self-protection, not a replica failure
            site = next(s for s in dep.sites if s.name == "degrade.db.ReadReplicaRouter.for_read")
            assert site.degraded_calls == 1
        finally:
            await replica.dispose()

    async def test_installs_its_check(self, engine: AsyncEngine, registry: Registry) -> None:
        """A replica dependency without a check gets the router's (connect, and lag with max_lag)."""
        dep = registry.dependency("db-replica", severity=Severity.SEV3)
        other = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/y")
        try:
            ReadReplicaRouter(primary=engine, replica=other, dependency=dep)
            assert dep.check is not None
            site = next(s for s in dep.sites if s.name == "degrade.db.ReadReplicaRouter.for_read")
            assert site.mode == "fail_soft"
        finally:
            await other.dispose()

    async def test_managed_with_max_lag(self, engine: AsyncEngine, registry: Registry) -> None:
        """With max_lag the router joins its dependency's registry (the lifespan runs the lag monitor)."""
        dep = registry.dependency("db-replica", severity=Severity.SEV3)
        other = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/y")
        try:
            router = ReadReplicaRouter(primary=engine, replica=other, dependency=dep, max_lag=5)
            assert router in dep.components  # started and stopped by the owning registry's lifespan
            await router.start()
            await router.start()  # idempotent
            await router.aclose()
            await router.aclose()
        finally:
            await other.dispose()

    async def test_middleware_attaches_primary(self, engine: AsyncEngine, registry: Registry) -> None:
        """DBHealthMiddleware(router=...) gives the router its primary dependency; another is refused."""
        db = registry.dependency("db", severity=Severity.SEV1)
        other_db = registry.dependency("db2", severity=Severity.SEV1)
        router = ReadReplicaRouter(primary=engine)
        DBHealthMiddleware(_Recorder(), engine=engine, dependency=db, router=router)
        assert router.primary_dependency is db
        with pytest.raises(ConfigurationError):
            DBHealthMiddleware(_Recorder(), engine=engine, dependency=other_db, router=router)

    async def test_write_refused_while_primary_down(
        self, engine: AsyncEngine, attempts: _Attempts, registry: Registry, simulate_outage: Any
    ) -> None:
        """With the primary known down, for_write raises DependencyUnavailable at once, no attempt."""
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(primary=engine, primary_dependency=db)
        with simulate_outage(db), pytest.raises(DependencyUnavailable) as info:
            async with router.for_write():
                pytest.fail("the block must not run")
        assert info.value.dependency_name == "db"
        assert attempts.calls == 0

    async def test_unreachable_primary_is_unavailable(self, engine: AsyncEngine, registry: Registry) -> None:
        """No primary connection: DependencyUnavailable (driver error as cause), one failure counted."""
        db = registry.dependency("db", severity=Severity.SEV1)
        router = ReadReplicaRouter(primary=engine, primary_dependency=db)
        with pytest.raises(DependencyUnavailable) as info:
            async with router.for_read() as session:
                await session.execute(text("SELECT 1"))
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert db.failures == 1
        assert current_connection() is None


class TestDeadlines:
    async def test_terminates_at_the_bound(self) -> None:
        """A driver operation that hangs is ended by terminating its connection, about on time."""
        done = asyncio.Event()

        class Driver:
            terminated = 0

            def terminate(self) -> None:
                Driver.terminated += 1
                done.set()

        async def hang() -> None:
            await done.wait()
            raise ConnectionResetError("terminated")

        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await _conn._killing_after(Driver(), 0.1, hang(), "test")
        assert 0.09 <= time.monotonic() - start < 0.5
        assert Driver.terminated == 1

    async def test_fast_operation_is_left_alone(self) -> None:
        """An operation that finishes in time is not terminated and leaves no entry behind."""

        class Driver:
            def terminate(self) -> None:
                pytest.fail("must not terminate")

        async def quick() -> None:
            await asyncio.sleep(0)

        await _conn._killing_after(Driver(), 0.05, quick(), "test")
        await asyncio.sleep(0.1)
        deadlines = _conn._deadlines_of(asyncio.get_running_loop())
        assert deadlines.ops == set()
        assert deadlines.handle is None

    async def test_an_answer_in_the_ticks_iteration_is_not_killed(self) -> None:
        """The answer and the deadline's tick land in one loop iteration: the answer wins.

        Under a CPU-bound worker an answer routinely waits in the ready queue
        while the tick runs; killing then terminated a connection the server
        had answered, and the request's next query failed ("connection is
        closed"): a false database failure (three made a false outage).
        """
        loop = asyncio.get_running_loop()
        terminated: list[int] = []

        class Driver:
            def terminate(self) -> None:
                terminated.append(1)

        answer: asyncio.Future[None] = loop.create_future()
        deadlines = _conn._deadlines_of(loop)
        task = asyncio.ensure_future(_conn._killing_after(Driver(), 0.001, answer, "test"))
        await asyncio.sleep(0.005)  # past the deadline, before the next tick
        assert not task.done()

        def one_iteration() -> None:  # the reader callback resolves, then the due timer ticks
            answer.set_result(None)
            deadlines.tick()

        loop.call_soon(one_iteration)
        await task  # no TimeoutError: the operation was answered
        await asyncio.sleep(0.02)
        assert terminated == []
        assert deadlines.ops == set()


class TestStallCheck:
    """The gate's stall check: every slot held, none back for half the bound, and a fresh connection fails."""

    @staticmethod
    def _stalled_gate(engine: AsyncEngine, dep: Dependency) -> DBHealthMiddleware:
        gate = DBHealthMiddleware(_Recorder(), engine=engine, dependency=dep)
        slots = gate._slots
        while slots.try_take():
            pass
        slots.last_release = time.monotonic() - 1.0  # nothing back for a second
        assert slots.stalled(gate._stall_window)
        return gate

    async def test_a_slot_given_back_during_the_check_does_not_clear_a_silent_server(
        self, engine: AsyncEngine, registry: Registry
    ) -> None:
        """A request that failed on something else gives its slot back meanwhile; nothing answered: down."""
        gates: list[DBHealthMiddleware] = []

        async def check() -> None:
            gates[0]._slots.release(0.01)
            raise TimeoutError

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gates.append(self._stalled_gate(engine, dep))
        with capture_logs() as logs:
            await gates[0]._confirm_stall()
        assert not gates[0]._slots.stalled(gates[0]._stall_window)
        assert dep.is_down
        assert [e["reason"] for e in logs if e["event"] == "dependency.down"] == ["stalled"]

    async def test_a_checkout_that_succeeded_during_the_check_clears_it(
        self, engine: AsyncEngine, registry: Registry
    ) -> None:
        """The pool moved (a checkout answered) and a slot came back: a slow pool, not a silent server."""
        gates: list[DBHealthMiddleware] = []

        async def check() -> None:
            gates[0]._slots.release(0.01)
            dep.record_success()
            raise TimeoutError

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gates.append(self._stalled_gate(engine, dep))
        await gates[0]._confirm_stall()
        assert not dep.is_down

    async def test_a_checkout_answered_early_in_a_failed_check_does_not_clear_it(
        self, engine: AsyncEngine, registry: Registry
    ) -> None:
        """A reply read just after the fault, then nothing for the rest of the check: down.

        (A slot came back meanwhile too: a gated request that never touched the primary.)
        """
        gates: list[DBHealthMiddleware] = []

        async def check() -> None:
            dep.record_success()
            gates[0]._slots.release(0.01)
            await asyncio.sleep(gates[0]._stall_window / 2 + 0.02)
            raise TimeoutError

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gates.append(self._stalled_gate(engine, dep))
        await gates[0]._confirm_stall()
        assert not gates[0]._slots.stalled(gates[0]._stall_window)
        assert dep.is_down

    async def test_still_stalled_is_proof_enough(self, engine: AsyncEngine, registry: Registry) -> None:
        """No slot back at all while the check failed: down, even if some success was recorded."""

        async def check() -> None:
            dep.record_success()
            raise TimeoutError

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gate = self._stalled_gate(engine, dep)
        await gate._confirm_stall()
        assert dep.is_down

    async def test_joining_a_stalled_line_starts_the_check_at_once(
        self, engine: AsyncEngine, registry: Registry
    ) -> None:
        """A newcomer to a line that has not moved starts the check on joining, not when it is refused."""
        started: list[float] = []

        async def check() -> None:
            started.append(time.monotonic())
            raise TimeoutError

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gate = self._stalled_gate(engine, dep)
        joined = time.monotonic()
        with pytest.raises(DependencyUnavailable):
            await gate._wait_in_line(_context.Lease(gate, gate._sync_engine), 0.3, joined)
        assert len(started) == 1
        assert started[0] - joined < 0.1  # on joining, not at the refusal 0.3 s later
        assert dep.is_down
        assert time.monotonic() - joined < 0.25  # going down answered the line at once

    async def test_a_passing_check_is_not_repeated_within_the_window(
        self, engine: AsyncEngine, registry: Registry
    ) -> None:
        """A slow but answering pool: one check per stall window, however many join or are refused."""
        runs: list[float] = []

        async def check() -> None:
            runs.append(time.monotonic())

        dep = registry.dependency("db", severity=Severity.SEV1, check=check, failure_threshold=5)
        gate = self._stalled_gate(engine, dep)
        for _ in range(20):
            gate._suspect_stall()
            await asyncio.sleep(0.005)
        assert len(runs) == 1
        await asyncio.sleep(gate._stall_window)
        gate._suspect_stall()
        await asyncio.sleep(0.01)
        assert len(runs) == 2
        assert not dep.is_down


class TestInstantCheckout:
    async def test_other_pools_are_never_instant(self) -> None:
        """Anything but the async queue pool goes through the bounded path."""
        eng = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x", poolclass=NullPool)
        try:
            assert not _conn._instant_checkout(eng.sync_engine)
        finally:
            await eng.dispose()

    async def test_empty_pool_is_not_instant(self, engine: AsyncEngine) -> None:
        """No idle connection: a checkout would connect, so it is bounded."""
        assert not _conn._instant_checkout(engine.sync_engine)

    async def test_pre_ping_is_not_instant(self) -> None:
        """pool_pre_ping makes every checkout a round trip."""
        eng = create_async_engine(f"postgresql+asyncpg://u@127.0.0.1:{_closed_port()}/x", pool_pre_ping=True)
        try:
            assert not _conn._instant_checkout(eng.sync_engine)
        finally:
            await eng.dispose()


#: Never a valid number of anything: infinity, NaN, and a boolean (an int to Python).
NOT_A_NUMBER = [math.inf, -math.inf, math.nan, True]


def _refused(arg: str, bad: object) -> str:
    """The message of a refused argument: its name, what it takes, what it got."""
    return rf"^{re.escape(arg)} must be .+; got {re.escape(repr(bad))}$"


class TestOneRuleForEveryArgument:
    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize("arg", ["acquire_timeout", "command_timeout", "pool_size", "max_overflow"])
    def test_engine_options(self, arg: str, bad: object) -> None:
        """engine_options refuses infinity, NaN and a bool for every bound, naming it."""
        with pytest.raises(ConfigurationError, match=_refused(arg, bad)):
            engine_options(**{arg: bad})

    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize("arg", ["acquire_timeout", "retry_after"])
    async def test_middleware(self, engine: AsyncEngine, registry: Registry, arg: str, bad: object) -> None:
        """DBHealthMiddleware refuses infinity, NaN and a bool, naming the argument."""
        dep = registry.dependency("db", severity=Severity.SEV1)
        with pytest.raises(ConfigurationError, match=_refused(arg, bad)):
            DBHealthMiddleware(_Recorder(), engine=engine, dependency=dep, **{arg: bad})

    @pytest.mark.parametrize("bad", NOT_A_NUMBER, ids=repr)
    @pytest.mark.parametrize(
        "arg", ["connect_timeout", "max_lag", "sticky_after_write", "close_timeout", "lag_interval"]
    )
    async def test_router(self, engine: AsyncEngine, arg: str, bad: object) -> None:
        """ReadReplicaRouter refuses infinity, NaN and a bool for every duration, naming it."""
        with pytest.raises(ConfigurationError, match=_refused(arg, bad)):
            ReadReplicaRouter(primary=engine, **{arg: bad})

    async def test_zero_stays_where_it_was_allowed(self, engine: AsyncEngine, registry: Registry) -> None:
        """max_overflow=0, retry_after=0 and sticky_after_write=0 are still valid; the others need > 0."""
        assert engine_options(max_overflow=0)["max_overflow"] == 0
        dep = registry.dependency("db", severity=Severity.SEV1)
        gate = DBHealthMiddleware(
            _Recorder(), engine=engine, dependency=dep, retry_after=0, acquire_timeout=2
        )
        assert (gate.retry_after, gate.acquire_timeout) == (0, 2.0)
        router = ReadReplicaRouter(primary=engine, sticky_after_write=0, max_lag=3)
        assert (router.sticky_after_write, router.max_lag) == (0.0, 3.0)
        for arg in ("connect_timeout", "close_timeout", "lag_interval", "max_lag"):
            with pytest.raises(ConfigurationError, match=rf"^{arg} must be a finite number of seconds > 0"):
                ReadReplicaRouter(primary=engine, **{arg: 0})
        for arg in ("acquire_timeout", "command_timeout"):
            with pytest.raises(ConfigurationError, match=rf"^{arg} must be a finite number of seconds > 0"):
                engine_options(**{arg: 0})
