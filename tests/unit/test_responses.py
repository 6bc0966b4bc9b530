"""exception_handlers() and the shared 503 response."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from degrade import (
    DependencyUnavailable,
    Registry,
    Severity,
    exception_handlers,
    fail_loud,
    unavailable_response,
)
from degrade.exceptions import scrubbed
from degrade.responses import send_json, unavailable_body

PASSWORD = "hunter2-s3cret"


def client_for(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


class TestExceptionHandlers:
    async def test_dependency_unavailable_becomes_503_json(self) -> None:
        """DependencyUnavailable answers 503 in the shared JSON shape with Retry-After."""

        async def endpoint(request: Request) -> Response:
            raise DependencyUnavailable("db", "writes are unavailable", retry_after=12)

        app = Starlette(routes=[Route("/", endpoint)], exception_handlers=exception_handlers())
        async with client_for(app) as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["content-type"] == "application/json"
        assert response.headers["retry-after"] == "12"
        assert response.headers["cache-control"] == "no-store"
        assert response.json() == {
            "error": "dependency_unavailable",
            "dependency": "db",
            "detail": "writes are unavailable",
        }

    async def test_fail_loud_site_in_a_route(self) -> None:
        """A fail-loud site on a down dependency answers 503 with the dependency's Retry-After."""
        dep = Registry().dependency("redis", severity=Severity.SEV1, retry_after=9)

        @fail_loud(dep, reason="sessions live in Redis")
        async def load_session() -> str:
            raise ConnectionRefusedError(f"redis://:{PASSWORD}@cache:6379")

        async def endpoint(request: Request) -> Response:
            return JSONResponse({"session": await load_session()})

        app = Starlette(routes=[Route("/", endpoint)], exception_handlers=exception_handlers())
        async with client_for(app) as client:
            response = await client.get("/")
        assert response.status_code == 503
        assert response.headers["retry-after"] == "9"
        assert response.json() == {
            "error": "dependency_unavailable",
            "dependency": "redis",
            "detail": "redis is unavailable",
        }
        assert PASSWORD not in response.text

    async def test_other_exceptions_are_not_handled(self) -> None:
        """Only DependencyUnavailable is mapped; a bug still surfaces as a bug."""

        async def endpoint(request: Request) -> Response:
            raise KeyError("bug")

        app = Starlette(routes=[Route("/", endpoint)], exception_handlers=exception_handlers())
        async with client_for(app) as client:
            with pytest.raises(KeyError):
                await client.get("/")

    def test_merges_with_host_handlers(self) -> None:
        """The mapping merges with the host's own handlers."""

        async def not_found(request: Request, exc: Exception) -> Response:
            return Response(status_code=404)

        handlers = {**exception_handlers(), 404: not_found}
        assert set(handlers) == {DependencyUnavailable, 404}


class TestNoSecretsNoNoise:
    async def test_a_503_is_not_a_sentry_error_event(self) -> None:
        """With Sentry's Starlette integration on, an outage's 503s send no error event each."""
        import sentry_sdk
        from sentry_sdk.integrations.starlette import StarletteIntegration

        from ..support import CapturingTransport

        async def route(request: Request) -> Response:
            raise DependencyUnavailable("redis", retry_after=9)

        transport = CapturingTransport()
        sentry_sdk.init(
            dsn="https://public@example.invalid/1",
            transport=transport,
            default_integrations=False,
            integrations=[StarletteIntegration()],
        )
        try:
            app = Starlette(routes=[Route("/", route)], exception_handlers=exception_handlers())
            async with client_for(app) as client:
                response = await client.get("/")
            sentry_sdk.flush()
        finally:
            sentry_sdk.get_client().close()
            sentry_sdk.Scope.get_global_scope().set_client(None)
        assert response.status_code == 503
        assert transport.events == []

    def test_the_cause_keeps_no_frames(self) -> None:
        """... from scrubbed(exc) drops the driver's frames (their locals hold DSNs)."""

        def connect(password: str) -> None:
            raise ConnectionRefusedError("refused")

        try:
            try:
                connect("hunter2")
            except ConnectionRefusedError as exc:
                raise DependencyUnavailable("db") from scrubbed(exc)
        except DependencyUnavailable as raised:
            cause = raised.__cause__
        assert isinstance(cause, ConnectionRefusedError)
        assert cause.__traceback__ is None

    def test_message_and_repr_carry_no_driver_text(self) -> None:
        """str() and repr() name the dependency and the detail only."""
        exc = DependencyUnavailable("db", "the primary database failed")
        assert str(exc) == "dependency 'db' is unavailable: the primary database failed"
        assert repr(exc) == "DependencyUnavailable('db', 'the primary database failed', retry_after=5)"


class TestUnavailableResponse:
    def test_shape_and_headers(self) -> None:
        """unavailable_response builds the 503 with Retry-After and a default detail."""
        response = unavailable_response("amqp", retry_after=30)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"
        assert response.media_type == "application/json"
        assert json.loads(bytes(response.body)) == {
            "error": "dependency_unavailable",
            "dependency": "amqp",
            "detail": "amqp is unavailable",
        }

    def test_body_is_compact_json(self) -> None:
        """unavailable_body encodes the shape without spaces."""
        assert (
            unavailable_body("db", "down")
            == b'{"error":"dependency_unavailable","dependency":"db","detail":"down"}'
        )

    def test_exception_defaults(self) -> None:
        """DependencyUnavailable has a default detail and Retry-After of 5 s."""
        exc = DependencyUnavailable("db")
        assert (exc.dependency_name, exc.detail, exc.retry_after) == ("db", "db is unavailable", 5)
        assert str(exc) == "dependency 'db' is unavailable: db is unavailable"


class TestSendJson:
    async def test_sends_a_whole_response(self) -> None:
        """send_json sends start (with content-type, content-length, extra headers) then the body."""
        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        body = unavailable_body("db", "down")
        await send_json(send, 503, body, {"Retry-After": "5"})  # type: ignore[arg-type]
        start, whole = sent
        assert start == {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", b"5"),
            ],
        }
        assert whole == {"type": "http.response.body", "body": body}
