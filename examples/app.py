"""A small tracks API that uses every safety net of degrade (Starlette).

Run it: ``.venv/bin/uvicorn examples.app:app`` (``python examples/stubs.py`` runs
stand-ins for the virus scanner and TURN server). Configuration comes from the
environment, with defaults that point at the local services:

=====================  ==========================================================
``DATABASE_URL``       primary Postgres (``postgresql+asyncpg://postgres@127.0.0.1:5432/test``)
``READ_DATABASE_URL``  read replica (defaults to the primary's server: set it to a real replica)
``REDIS_URL``          sessions, cache, rate limits, revocations (``redis://127.0.0.1:6379/0``)
``AMQP_URL``           event bus (``amqp://guest:guest@127.0.0.1:5672/``)
``SENTRY_DSN``         Sentry, when set
``SCANNER_ADDR``       virus scanner ``host:port`` (``127.0.0.1:3310``)
``TURN_ADDR``          TURN server ``host:port`` (``127.0.0.1:3478``)
``PODS``               pods sharing the rate limit (``1``)
``CLAMAV_REQUIRED``    ``false`` opens the scanner's escape hatch (uploads unscanned)
``APP_SECRET``         key that signs access tokens
``RYW_SECRET``         key that signs the read-your-writes cookie (16+ bytes)
``SECURE_COOKIES``     ``true`` marks that cookie ``Secure`` (set it behind HTTPS)
=====================  ==========================================================

The secrets' defaults are for development only: set both in production (the
same on every instance). They are never logged or shown (``repr=False``).

What each outage does is in the registry below and in the generated runbook
(``python -m degrade runbook examples.app:registry``, committed as docs/runbook.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from degrade import (
    Registry,
    Severity,
    checks,
    exception_handlers,
    fail_loud,
    health_routes,
)
from degrade import redis as dredis
from degrade.cache import FailSoftCache, StaleTier
from degrade.db import DBHealthMiddleware, ReadReplicaRouter, ReadYourWritesMiddleware, engine_options
from degrade.eventbus import EventPublisher, Outbox, OutboxRelay
from degrade.ratelimit import RateLimiter, RateLimitMiddleware
from degrade.revocation import RevocationList

log = structlog.get_logger("example")

ACCESS_TTL = 900  # seconds an access token lives; revocations are kept as long
SESSION_TTL = 7 * 24 * 3600


@dataclass(frozen=True)
class Settings:
    """The app's configuration (see the module docstring)."""

    database_url: str = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
    read_database_url: str | None = None
    redis_url: str = "redis://127.0.0.1:6379/0"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    sentry_dsn: str | None = None
    scanner_addr: tuple[str, int] = ("127.0.0.1", 3310)
    turn_addr: tuple[str, int] = ("127.0.0.1", 3478)
    pods: int = 1
    secret: bytes = field(default=b"dev-secret-change-me", repr=False)
    #: Signs the read-your-writes cookie (a client cannot pin its reads to the primary).
    ryw_secret: bytes = field(default=b"dev-ryw-secret-change-me", repr=False)
    #: Mark that cookie ``Secure``: browsers then send it over HTTPS only.
    secure_cookies: bool = False
    version: str = "1.0.0"
    key_prefix: str = "degrade-example"
    #: Rate limits: every route, the feed (per user), login (per client).
    default_rate: str = "600/minute"
    feed_rate: str = "60/minute;burst=20"
    login_rate: str = "10/minute"

    @classmethod
    def from_env(cls) -> Settings:
        """Read the environment; unset variables keep their local defaults."""
        env = os.environ
        defaults = cls()

        def addr(name: str, default: tuple[str, int]) -> tuple[str, int]:
            if name not in env:
                return default
            host, _, port = env[name].rpartition(":")
            return host or "127.0.0.1", int(port)

        return cls(
            database_url=env.get("DATABASE_URL", defaults.database_url),
            read_database_url=env.get("READ_DATABASE_URL") or None,
            redis_url=env.get("REDIS_URL", defaults.redis_url),
            amqp_url=env.get("AMQP_URL", defaults.amqp_url),
            sentry_dsn=env.get("SENTRY_DSN") or None,
            scanner_addr=addr("SCANNER_ADDR", defaults.scanner_addr),
            turn_addr=addr("TURN_ADDR", defaults.turn_addr),
            pods=int(env.get("PODS", "1")),
            secret=env.get("APP_SECRET", "dev-secret-change-me").encode(),
            ryw_secret=env.get("RYW_SECRET", "dev-ryw-secret-change-me").encode(),
            secure_cookies=env.get("SECURE_COOKIES", "false").lower() in {"1", "true", "yes"},
        )


class Tokens:
    """Signed access tokens ``user.jti.expiry.signature`` (an HMAC, no Redis needed to read them)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()[:32]

    def mint(self, user: str, ttl: int = ACCESS_TTL) -> str:
        """A new access token for ``user``."""
        encoded = base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")
        payload = f"{encoded}.{uuid.uuid4().hex}.{int(time.time()) + ttl}"
        return f"{payload}.{self._sign(payload)}"

    def read(self, token: str) -> tuple[str, str] | None:
        """``(user, jti)`` of a valid, unexpired token, else None."""
        parts = token.split(".")
        if len(parts) != 4 or len(token) > 512:
            return None
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(parts[3], self._sign(payload)):
            return None
        try:
            if int(parts[2]) < time.time():
                return None
            user = base64.urlsafe_b64decode(parts[0] + "=" * (-len(parts[0]) % 4)).decode()
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            return None
        return user, parts[1]


def _bearer(scope: Any) -> str | None:
    """The bearer token of an ASGI scope's Authorization header."""
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return str(value[7:].decode("latin-1"))
    return None


class Unauthorized(Exception):
    """No valid, unrevoked access token (401)."""


class Example:
    """Every dependency, client and call site of the example, framework-agnostic.

    ``create_app`` (Starlette, below) and ``examples/fastapi_app.py`` are thin
    routes over these methods. Nothing here connects at construction: the app
    starts with every service down.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if settings.sentry_dsn:
            import sentry_sdk  # the host owns Sentry: degrade only reports through it

            sentry_sdk.init(dsn=settings.sentry_dsn, traces_sample_rate=0)
        self.registry = registry = Registry(version=settings.version)
        self.tokens = Tokens(settings.secret)
        prefix = self.prefix = settings.key_prefix

        # -- Postgres: primary behind the gate, reads on the replica ------------------------
        # owns(): disposed at shutdown, after the components that use them stopped.
        self.primary = registry.owns(
            create_async_engine(settings.database_url, **engine_options(acquire_timeout=1.0))
        )
        self.replica = registry.owns(
            create_async_engine(
                settings.read_database_url or settings.database_url, **engine_options(acquire_timeout=0.5)
            )
        )
        self.db = registry.dependency(
            "db",
            severity=Severity.SEV1,
            impact="All writes and most reads fail (503); GETs are served from the replica while it is up "
            "(a client's own last write may not show yet)",
            runbook="docs/runbooks/db-failover.md",
            check=checks.sqlalchemy(self.primary),
        )
        db_replica = registry.dependency(
            "db-replica",
            severity=Severity.SEV3,
            impact="Read-only routes slower: reads fall back to the primary",
            runbook="docs/runbooks/db-failover.md",
        )
        # read_your_writes: a client that wrote reads from the primary until the replica has
        # replayed its write (the position travels in a signed cookie: middleware() below).
        self.router = ReadReplicaRouter(
            primary=self.primary,
            replica=self.replica,
            dependency=db_replica,
            primary_dependency=self.db,
            read_your_writes=True,
        )
        # Events are rows written in the write's own transaction; the relay (below) publishes them.
        self.outbox = Outbox(f"{prefix.replace('-', '_')}_outbox")
        self.schema = _Schema(self.primary, self.outbox)

        # -- Redis: sessions (fail-loud), cache and rate limits (fail-soft), revocations ----
        self.redis = registry.owns(dredis.client(settings.redis_url, timeout=0.25))
        redis_dep = registry.dependency(
            "redis",
            severity=Severity.SEV1,
            impact="Login and refresh fail (503); rate limits per pod; tracks read in the last 5 minutes "
            "are served stale from memory, other cache misses read Postgres",
            runbook="docs/runbooks/redis-down.md",
            check=checks.redis(self.redis),
        )
        # stale=: while Redis is down, tracks this pod saw in Redis are served from a bounded
        # copy in memory (marked stale) instead of all going to Postgres.
        self.cache = FailSoftCache(
            self.redis,
            redis_dep,
            ttl=60,
            prefix=f"{prefix}:cache:",
            stale=StaleTier(max_bytes=16 * 2**20, stale_for=300),
        )
        self.limiter = RateLimiter(
            redis=self.redis,
            dependency=redis_dep,
            on_outage="memory",
            pods=settings.pods,
            prefix=f"{prefix}:rl:",
        )
        # FAIL-OPEN, decided: access tokens live 15 minutes and revocations this pod saw
        # are still refused; every transition is a security event in logs and Sentry.
        self.revocations = RevocationList(
            self.redis, redis_dep, on_outage="allow", token_ttl=ACCESS_TTL, prefix=f"{prefix}:revoked:"
        )

        # -- RabbitMQ: events never block a request ----------------------------------------
        amqp = registry.dependency(
            "rabbitmq",
            severity=Severity.SEV2,
            impact="New tracks' events (transcode) wait in the outbox table; published once it is back",
            runbook="docs/runbooks/rabbitmq-down.md",
            check=checks.amqp(settings.amqp_url),
        )
        self.bus = EventPublisher(settings.amqp_url, exchange=f"{prefix}.events", dependency=amqp)
        registry.manage(self.bus)
        # Publishes committed outbox rows through the bus's broker and exchange; started and
        # stopped by the lifespan. backlog_interval: the backlog in /health/deep within a second.
        self.relay = OutboxRelay(self.outbox, self.primary, self.bus, db=self.db, backlog_interval=1.0)
        registry.manage(self.relay)

        # -- The virus scanner, with the CLAMAV_REQUIRED escape hatch ------------------------
        scanner = registry.dependency(
            "scanner",
            severity=Severity.SEV2,
            impact="Track uploads fail (503) unless CLAMAV_REQUIRED=false",
            check=checks.tcp(*settings.scanner_addr),
        )
        self.clamav_required = registry.escape_hatch(
            "CLAMAV_REQUIRED",
            dependency=scanner,
            reason="uploads go through unscanned: infected files may be distributed",
            fallback=lambda data: "UNSCANNED",
            env="CLAMAV_REQUIRED",
        )

        # -- TURN: a feature flag from a non-critical dependency's state ---------------------
        turn = registry.dependency(
            "turn",
            severity=Severity.SEV3,
            impact="WebRTC calls behind symmetric NAT fail; clients are told hasTurn=false",
            check=checks.tcp(*settings.turn_addr),
            watch_interval=2.0,
        )

        # -- call sites: each one's fail mode, declared -------------------------------------
        redis = self.redis

        @fail_loud(redis_dep, reason="sessions live in Redis: login answers 503")
        async def create_session(user: str) -> str:
            refresh = secrets.token_urlsafe(24)
            await redis.set(f"{prefix}:session:{refresh}", user, ex=SESSION_TTL)
            return refresh

        @fail_loud(redis_dep, reason="sessions live in Redis: refresh answers 503")
        async def session_user(refresh: str) -> str | None:
            value = await redis.get(f"{prefix}:session:{refresh}")
            return value.decode() if value is not None else None

        @fail_loud(
            scanner,
            hatch=self.clamav_required,
            timeout=2.0,
            reason="uploads answer 503 while the scanner is down",
        )
        async def scan(data: bytes) -> str:
            reader, writer = await asyncio.open_connection(*settings.scanner_addr)
            try:
                writer.write(data)
                writer.write_eof()
                await writer.drain()
                return (await reader.readline()).decode().strip() or "NO-ANSWER"
            finally:
                writer.close()

        # A feature flag read from the state (no call on the request path); the watch
        # checks TURN every 2 s, since no request touches it.
        turn.add_site(
            "examples.app.Example.webrtc",
            "fail_soft",
            "clients are told hasTurn=false and warn before a call",
            fallback="hasTurn=false",
        )
        self.turn = turn

        self.create_session, self.session_user, self.scan = create_session, session_user, scan

    # -- operations (the routes call these) --------------------------------------------------

    async def user_of(self, authorization: str | None) -> tuple[str, str]:
        """``(user, jti)`` of a valid, unrevoked bearer token; else :class:`Unauthorized`."""
        token = authorization[7:] if authorization and authorization[:7].lower() == "bearer " else None
        claims = self.tokens.read(token) if token else None
        if claims is None or await self.revocations.is_revoked(claims[1]):
            raise Unauthorized
        return claims

    async def login(self, user: str) -> dict[str, str]:
        """New access and refresh tokens (FAIL-LOUD on Redis)."""
        refresh = await self.create_session(user)
        return {"access_token": self.tokens.mint(user), "refresh_token": refresh}

    async def refresh(self, refresh_token: str) -> dict[str, str] | None:
        """A new access token, or None for an unknown refresh token (FAIL-LOUD on Redis)."""
        user = await self.session_user(refresh_token[:64])
        return None if user is None else {"access_token": self.tokens.mint(user)}

    async def logout(self, jti: str) -> None:
        """Revoke an access token (FAIL-LOUD on Redis)."""
        await self.revocations.revoke(jti, ttl=ACCESS_TTL)

    async def _load_track(self, track_id: int) -> dict[str, Any] | None:
        if not 0 < track_id <= _MAX_ID:  # the column is a Postgres integer: no such track
            return None
        async with self.router.for_read() as session:
            row = (
                await session.execute(
                    text("SELECT id, title FROM degrade_example_tracks WHERE id = :id"), {"id": track_id}
                )
            ).first()
        return None if row is None else {"id": row.id, "title": row.title}

    async def track(self, track_id: int) -> tuple[dict[str, Any] | None, dict[str, str]]:
        """A track from the cache, else the replica, else the primary; and the response headers.

        ``X-Cache`` says where it came from (``hit``, ``miss``, ``unavailable``:
        Redis down, read from Postgres; ``stale``: Redis down, the copy this
        pod last saw, ``Age`` seconds old).
        """
        await self.schema.ready()
        entry = await self.cache.get_entry(f"track:{track_id}", lambda: self._load_track(track_id))
        headers: dict[str, str] = {"X-Cache": entry.source}
        if entry.stale and entry.age is not None:
            headers["Age"] = str(int(entry.age))
        return entry.value, headers

    async def _insert(self, title: str, event: dict[str, Any] | None = None) -> int:
        """Insert a track, and its ``track.created`` event in the same transaction (both or neither)."""
        await self.schema.ready()
        async with self.router.for_write() as session:
            track_id = int(
                (
                    await session.execute(
                        text("INSERT INTO degrade_example_tracks (title) VALUES (:t) RETURNING id"),
                        {"t": title},
                    )
                ).scalar_one()
            )
            if event is not None:
                await self.outbox.add(session, "track.created", {"track_id": track_id, **event})
            await session.commit()
        return track_id

    async def create_track(self, user: str, title: str) -> dict[str, Any]:
        """Write the track and its ``track.created`` event on the primary (RabbitMQ is not on the path)."""
        track_id = await self._insert(title[:200], {"user": user})
        return {"id": track_id, "event": "outbox"}

    async def feed(self) -> dict[str, Any]:
        """The latest tracks, read on the replica (or the primary)."""
        await self.schema.ready()
        async with self.router.for_read() as session:
            rows = (
                await session.execute(
                    text("SELECT id, title FROM degrade_example_tracks ORDER BY id DESC LIMIT 20")
                )
            ).all()
        return {"tracks": [{"id": r.id, "title": r.title} for r in rows]}

    async def upload(self, user: str, data: bytes) -> tuple[int, dict[str, Any]]:
        """Scan (FAIL-LOUD, unless the hatch is open), then store: ``(status, body)``."""
        verdict = await self.scan(data)
        if verdict == "FOUND":
            return 422, {"error": "the file is infected"}
        return 201, {"id": await self._insert(f"upload by {user}"), "scan": verdict}

    async def webrtc(self) -> dict[str, Any]:
        """ICE servers; TURN only while its dependency is up."""
        available = not self.turn.is_down
        servers: list[dict[str, str]] = [{"urls": "stun:stun.example.org"}]
        if available:
            host, port = self.settings.turn_addr
            servers.append({"urls": f"turn:{host}:{port}"})
        return {"hasTurn": available, "iceServers": servers}

    def middleware(self, api: str) -> list[Middleware]:
        """Rate limits (outermost), read-your-writes, then the database gate."""
        settings = self.settings
        return [
            Middleware(
                RateLimitMiddleware,
                limiter=self.limiter,
                rate=settings.default_rate,
                key=_user_or_ip(self.tokens),
                exclude=(f"{api}/health", "/metrics"),
                routes={f"GET {api}/feed": settings.feed_rate, f"POST {api}/auth/login": settings.login_rate},
            ),
            # The client's last write position, in a signed cookie: its next reads see its writes.
            Middleware(
                ReadYourWritesMiddleware,
                secret=settings.ryw_secret,
                secure=settings.secure_cookies,
            ),
            Middleware(
                DBHealthMiddleware,
                engine=self.primary,
                dependency=self.db,
                router=self.router,
                acquire_timeout=1.0,
                include=(f"{api}/tracks", f"{api}/feed", f"{api}/uploads"),
                read_only_fallback=True,
            ),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """Create the tables (bounded: the app starts with Postgres down).

        The registry starts its components (the publisher, the outbox relay)
        after this, and closes the clients and engines it owns after this
        returns and after its components stopped.
        """
        await self.schema.ready(wait=2.0)
        yield


def create_app(settings: Settings | None = None) -> Starlette:
    """The Starlette app: thin routes over :class:`Example`."""
    ex = Example(settings or Settings.from_env())

    async def user(request: Request) -> tuple[str, str]:
        return await ex.user_of(request.headers.get("authorization"))

    async def login(request: Request) -> Response:
        name = str((await _json(request)).get("user", "")).strip()[:64]
        if not name:
            return JSONResponse({"error": "user is required"}, status_code=400)
        return JSONResponse(await ex.login(name))

    async def refresh(request: Request) -> Response:
        tokens = await ex.refresh(str((await _json(request)).get("refresh_token", "")))
        return JSONResponse(tokens or {"error": "unknown refresh token"}, status_code=200 if tokens else 401)

    async def logout(request: Request) -> Response:
        _, jti = await user(request)
        await ex.logout(jti)
        return Response(status_code=204)

    async def get_track(request: Request) -> Response:
        await user(request)
        track, headers = await ex.track(request.path_params["track_id"])
        if track is None:
            return JSONResponse({"error": "not found"}, status_code=404, headers=headers)
        return JSONResponse(track, headers=headers)

    async def create_track(request: Request) -> Response:
        name, _ = await user(request)
        title = str((await _json(request)).get("title", "untitled"))
        return JSONResponse(await ex.create_track(name, title), status_code=202)

    async def feed(request: Request) -> Response:
        await user(request)
        return JSONResponse(await ex.feed())

    async def upload(request: Request) -> Response:
        name, _ = await user(request)
        status, body = await ex.upload(name, await request.body())
        return JSONResponse(body, status_code=status)

    async def webrtc_config(request: Request) -> Response:
        return JSONResponse(await ex.webrtc())

    api = "/api/v1"
    app = Starlette(
        routes=[
            Route(f"{api}/auth/login", login, methods=["POST"]),
            Route(f"{api}/auth/refresh", refresh, methods=["POST"]),
            Route(f"{api}/auth/logout", logout, methods=["POST"]),
            Route(f"{api}/tracks", create_track, methods=["POST"]),
            Route(f"{api}/tracks/{{track_id:int}}", get_track),
            Route(f"{api}/feed", feed),
            Route(f"{api}/uploads", upload, methods=["POST"]),
            Route(f"{api}/config/webrtc", webrtc_config),
            Route("/metrics", metrics),
            *health_routes(ex.registry, prefix=api, details=True),
        ],
        middleware=ex.middleware(api),
        exception_handlers={**exception_handlers(), Unauthorized: unauthorized},
        lifespan=ex.registry.wrap(ex.lifespan),
    )
    app.state.example = ex
    app.state.registry = ex.registry
    app.state.tokens = ex.tokens
    return app


async def metrics(request: Request) -> Response:
    """Prometheus metrics (degrade's and the process's)."""
    import prometheus_client

    return Response(prometheus_client.generate_latest(), media_type=prometheus_client.CONTENT_TYPE_LATEST)


async def unauthorized(request: Request, exc: Exception) -> Response:
    """401 with a Bearer challenge."""
    return JSONResponse({"error": "unauthorized"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})


def _user_or_ip(tokens: Tokens) -> Any:
    """Rate-limit key: the user of a valid token, else the client address."""

    def key(scope: Any) -> str | None:
        token = _bearer(scope)
        claims = tokens.read(token) if token else None
        if claims is not None:
            return f"user:{claims[0]}"
        client = scope.get("client")
        return f"ip:{client[0]}" if client else None

    return key


#: Largest id the tracks table can hold (a Postgres ``integer``).
_MAX_ID = 2**31 - 1


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return {}
    return body if isinstance(body, dict) else {}


class _Schema:
    """Creates the example's tables once; bounded, so a down database never blocks start-up."""

    def __init__(self, engine: AsyncEngine, outbox: Outbox) -> None:
        self._engine = engine
        self._outbox = outbox
        self._done = False
        self._lock = asyncio.Lock()

    async def ready(self, wait: float = 1.0) -> None:
        if self._done:
            return
        async with self._lock:
            if self._done:
                return
            try:
                async with asyncio.timeout(wait):
                    async with self._engine.begin() as conn:
                        await conn.execute(
                            text(
                                "CREATE TABLE IF NOT EXISTS degrade_example_tracks"
                                " (id serial PRIMARY KEY, title text NOT NULL)"
                            )
                        )
                    # The outbox table, its index and NOTIFY trigger (idempotent; a migration in a real app).
                    await self._outbox.create_table(self._engine, timeout=wait)
            except Exception as exc:  # the request's own query reports the outage
                log.warning("example.schema_not_ready", error=type(exc).__name__)
                return
            self._done = True


app = create_app()
registry: Registry = app.state.registry
