"""Fuzzing for `make chaos`: Hypothesis drives hostile requests through the example app's whole stack.

In-process (httpx ASGITransport, the app's lifespan running), against the real
Postgres, Redis and RabbitMQ, every request from one untrusted peer
(127.0.0.1). Generated: methods, paths (encoded, ``..``, very long, unicode),
X-Forwarded-For / Forwarded / X-Real-IP chains (spoofed, malformed, huge,
IPv6, unicode), header sizes, bodies (empty, truncated, not JSON, deeply
nested, huge), bearer tokens (valid, malformed, forged, expired, revoked).

Properties:

* no 5xx but a documented 503: a 500 is reported with the frame that raised
  (degrade's code or the example's);
* every 503 / 429 has the documented JSON body (``dependency_unavailable`` /
  ``rate_limited``, or /health/deep's report) and ``Retry-After``;
* no limiter bypass by spoofing: login attempts without a valid token are all
  keyed by the peer, so over the run at most ``burst + rate * minutes`` pass,
  whatever the forwarding headers say.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import traceback
import uuid
from collections import Counter
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

API = "/api/v1"
LOGIN_RATE = "5/minute"
LOGIN_LIMIT = 5

ROUTES = [
    ("POST", f"{API}/auth/login"),
    ("POST", f"{API}/auth/refresh"),
    ("POST", f"{API}/auth/logout"),
    ("POST", f"{API}/tracks"),
    ("GET", f"{API}/tracks/1"),
    ("GET", f"{API}/feed"),
    ("POST", f"{API}/uploads"),
    ("GET", f"{API}/config/webrtc"),
    ("GET", f"{API}/health"),
    ("GET", f"{API}/health/deep"),
    ("GET", "/metrics"),
]

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
junk = st.text(min_size=0, max_size=40)
hop = st.one_of(
    ipv4,
    ipv6,
    ipv6.map(lambda a: f"[{a}]:443"),
    ipv4.map(lambda a: f"{a}:8080"),
    st.sampled_from(
        ["unknown", "_hidden", "127.0.0.1", "10.0.0.1", "::1", "::ffff:10.0.0.1", "", " ", "localhost"]
    ),
    junk,
)
xff = st.one_of(
    st.lists(hop, min_size=1, max_size=8).map(", ".join),
    st.lists(hop, min_size=100, max_size=300).map(",".join),  # more hops than any parser reads
    st.text(min_size=1000, max_size=9000),  # huge
    st.just("1.2.3.4, " * 2000),
)
forwarded = st.one_of(
    st.lists(hop, min_size=1, max_size=5).map(lambda hops: ", ".join(f'for="{h}";proto=https' for h in hops)),
    junk,
)


def _encode(value: str) -> bytes:
    return value.encode("utf-8", "surrogatepass")


@st.composite
def requests(draw: Any, tokens: dict[str, str]) -> dict[str, Any]:
    method, path = draw(st.sampled_from(ROUTES))
    method = draw(
        st.one_of(
            st.just(method),
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO"]),
        )
    )
    path = draw(
        st.one_of(
            st.just(path),
            st.just(path + "/.."),
            st.just(path.replace("/api", "/%61pi")),
            st.just(f"{API}/tracks/" + "9" * draw(st.integers(1, 40))),
            st.just(f"{API}/tracks/-1"),
            st.just(f"{API}/../{API}/feed"),
            st.just(f"{API}/feed%00"),
            st.just(path + "?" + "a=" * draw(st.integers(0, 3000))),
            st.just("/" + "a" * draw(st.integers(1, 20_000))),
            st.text(min_size=1, max_size=60).map(lambda t: f"{API}/" + t),
        )
    )
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.booleans()):
        headers.append((b"x-forwarded-for", _encode(draw(xff))))
    if draw(st.booleans()):
        headers.append((b"forwarded", _encode(draw(forwarded))))
    if draw(st.booleans()):
        headers.append((b"x-real-ip", _encode(draw(hop))))
    if draw(st.booleans()):  # duplicated forwarding headers
        headers.append((b"x-forwarded-for", _encode(draw(hop))))
    auth = draw(
        st.sampled_from(
            [
                "none",
                "valid",
                "expired",
                "revoked",
                "forged",
                "malformed",
                "huge",
                "other-user",
                "lower",
                "empty",
            ]
        )
    )
    token_value = {
        "none": None,
        "valid": f"Bearer {tokens['valid']}",
        "other-user": f"Bearer {tokens['other']}",
        "expired": f"Bearer {tokens['expired']}",
        "revoked": f"Bearer {tokens['revoked']}",
        "forged": f"Bearer {tokens['forged']}",
        "malformed": "Bearer " + draw(st.text(max_size=80)),
        "huge": "Bearer " + "x." * 5000,
        "lower": f"bearer {tokens['valid']}",
        "empty": "Bearer ",
    }[auth]
    if token_value is not None:
        headers.append((b"authorization", _encode(token_value)))
    if draw(st.integers(0, 9)) == 0:  # a big header
        headers.append((b"x-padding", b"p" * draw(st.integers(1000, 60_000))))
    if draw(st.integers(0, 9)) == 0:
        headers.append(
            (
                b"content-type",
                _encode(
                    draw(
                        st.sampled_from(
                            ["application/json", "text/plain", "", "application/json; charset=latin-1"]
                        )
                    )
                ),
            )
        )
    body = draw(
        st.one_of(
            st.just(b""),
            st.just(b'{"user": "fuzz"}'),
            st.just(b'{"user": "fuz'),  # truncated
            st.just(b'{"refresh_token": 12}'),
            st.just(b'{"title": ' + b'"t' * 1000 + b'"}'),
            st.just(b"[" * 100_000),  # deeply nested
            st.just(b"not json at all"),
            st.just(b"\xff\xfe\x00"),
            st.just(b'{"user": "' + b"u" * 500_000 + b'"}'),  # huge
            st.binary(max_size=200),
            st.dictionaries(
                st.text(max_size=10), st.one_of(st.none(), st.integers(), st.text(max_size=20)), max_size=4
            ).map(lambda d: json.dumps(d).encode()),
        )
    )
    return {"method": method, "path": path, "headers": headers, "body": body, "auth": auth}


@dataclasses.dataclass
class FuzzResult:
    examples: int = 0
    sent: int = 0
    unsendable: int = 0
    statuses: Counter[int] = dataclasses.field(default_factory=Counter)
    violations: list[str] = dataclasses.field(default_factory=list)
    login_unauth_allowed: int = 0
    seconds: float = 0.0


def _shape_ok(status: int, path: str, headers: httpx.Headers, body: bytes) -> str | None:
    """None when a 503 / 429 has the documented shape; else what is wrong."""
    try:
        doc = json.loads(body)
    except ValueError:
        return f"{status} body is not JSON: {body[:80]!r}"
    if not isinstance(doc, dict):
        return f"{status} body is not an object"
    if status == 503 and "error" not in doc and doc.get("status") == "down" and "/health/deep" in path:
        return None
    want = "dependency_unavailable" if status == 503 else "rate_limited"
    if doc.get("error") != want:
        return f"{status} body error={doc.get('error')!r}, documented {want!r}"
    if "retry-after" not in headers:
        return f"{status} without Retry-After"
    return None


def _origin(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/degrade/" in f.filename or "/examples/" in f.filename]
    where = ours[-1] if ours else (frames[-1] if frames else None)
    src = "degrade" if where is not None and "/degrade/" in where.filename else "example" if ours else "other"
    loc = f"{where.filename.rsplit('/', 2)[-2:]}:{where.lineno}" if where else "?"
    return f"{type(exc).__name__} raised in {src} code at {loc}"


async def _delete_exchange(amqp_url: str, name: str) -> None:
    """Delete the run's exchange (the example's publisher declared it; nothing else uses it)."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url, timeout=10)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(name)
    finally:
        await connection.close()


def run(examples: int, redis_url: str, db_url: str, amqp_url: str) -> FuzzResult:
    """Fire ``examples`` generated requests; the result (violations listed)."""
    from _util import delete_keys
    from examples import stubs
    from examples.app import Settings, create_app

    result = FuzzResult()
    loop = asyncio.new_event_loop()
    scanner = loop.run_until_complete(stubs.start("scanner"))
    settings_ = Settings(
        database_url=db_url,
        read_database_url=db_url,
        redis_url=redis_url,
        amqp_url=amqp_url,
        scanner_addr=("127.0.0.1", scanner.sockets[0].getsockname()[1]),
        turn_addr=("127.0.0.1", 9),
        key_prefix=f"degrade-chaos-fuzz-{uuid.uuid4().hex[:8]}",
        secret=uuid.uuid4().hex.encode(),
        login_rate=LOGIN_RATE,
    )
    app = create_app(settings_)
    ex = app.state.example
    tokens = {
        "valid": ex.tokens.mint("fuzz"),
        "other": ex.tokens.mint("fuzz-other"),
        "expired": ex.tokens.mint("fuzz", ttl=-10),
        "revoked": ex.tokens.mint("fuzz"),
    }
    valid = tokens["valid"]
    tokens["forged"] = valid[:-4] + ("0000" if not valid.endswith("0000") else "1111")
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    loop.run_until_complete(ex.revocations.revoke(ex.tokens.read(tokens["revoked"])[1], ttl=900))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    client = httpx.AsyncClient(transport=transport, base_url="http://fuzz", timeout=10)
    start = time.monotonic()
    seen: Counter[str] = Counter()

    def violation(text: str) -> None:
        seen[text] += 1
        if seen[text] == 1:
            result.violations.append(text)

    async def fire(req: dict[str, Any]) -> None:
        try:
            request = client.build_request(
                req["method"], "http://fuzz" + req["path"], headers=req["headers"], content=req["body"]
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol, ValueError, TypeError, UnicodeError):
            result.unsendable += 1
            return
        try:
            response = await client.send(request)
        except Exception as exc:
            violation(f"500 ({_origin(exc)}) for {req['method']} {req['path'][:60]!r} auth={req['auth']}")
            result.statuses[500] += 1
            return
        result.sent += 1
        status = response.status_code
        result.statuses[status] += 1
        if status >= 500 and status != 503:
            violation(f"{status} for {req['method']} {req['path'][:60]!r}: {response.content[:120]!r}")
        if status in (429, 503) and req["method"] != "HEAD":  # a HEAD answer has no body
            problem = _shape_ok(status, req["path"], response.headers, response.content)
            if problem:
                violation(f"{req['method']} {req['path'][:60]!r}: {problem}")
        login = req["method"] == "POST" and response.request.url.path == f"{API}/auth/login"
        # A revoked token is still signed and unexpired: the limiter keys it by its user (one
        # more bucket per real user, not one per forged header), so it is not counted here.
        if login and req["auth"] not in ("valid", "other-user", "lower", "revoked") and status != 429:
            result.login_unauth_allowed += 1

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(requests(tokens))
    def prop(req: dict[str, Any]) -> None:
        result.examples += 1
        loop.run_until_complete(fire(req))

    try:
        prop()
    finally:
        result.seconds = time.monotonic() - start
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        example = app.state.example  # its per-run outbox table goes with the run
        loop.run_until_complete(example.outbox.drop_table(example.primary, timeout=10))
        loop.run_until_complete(example.primary.dispose())
        loop.run_until_complete(_delete_exchange(amqp_url, f"{settings_.key_prefix}.events"))
        loop.run_until_complete(delete_keys(redis_url, settings_.key_prefix))  # sessions live a week
        scanner.close()
        loop.close()
    allowed = LOGIN_LIMIT + LOGIN_LIMIT * result.seconds / 60
    if result.login_unauth_allowed > allowed:
        result.violations.append(
            f"limiter bypass: {result.login_unauth_allowed} unauthenticated logins passed from one peer"
            f" in {result.seconds:.0f} s (limit {LOGIN_RATE}: at most {allowed:.0f})"
        )
    for text, n in seen.items():
        if n > 1:
            result.violations[result.violations.index(text)] = f"{n} x {text}"
    return result
