"""Shared fixtures: service addresses (fail in CI when missing), a fresh registry, a Sentry capture."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import sentry_sdk

from degrade import Registry
from degrade.observe import sentry_active

from .support import CapturingTransport

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

POSTGRES = ("127.0.0.1", int(os.environ.get("DEGRADE_TEST_PG_PORT", "5432")))
REDIS = ("127.0.0.1", int(os.environ.get("DEGRADE_TEST_REDIS_PORT", "6379")))
RABBITMQ = ("127.0.0.1", int(os.environ.get("DEGRADE_TEST_AMQP_PORT", "5672")))


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip locally when a service is missing; fail in CI (CI=true), never skip there."""
    if _reachable(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it (see .ci/run)")
    pytest.skip(message)


@pytest.fixture
def postgres_dsn() -> str:
    """An asyncpg DSN of the real Postgres (database ``test``)."""
    require_service("PostgreSQL", *POSTGRES)
    return f"postgresql+asyncpg://postgres@{POSTGRES[0]}:{POSTGRES[1]}/test"


@pytest.fixture
def redis_url() -> str:
    """A URL of the real Redis."""
    require_service("Redis", *REDIS)
    return f"redis://{REDIS[0]}:{REDIS[1]}/0"


@pytest.fixture
def amqp_url() -> str:
    """A URL of the real RabbitMQ."""
    require_service("RabbitMQ", *RABBITMQ)
    return f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}/"


@pytest.fixture
def unique() -> str:
    """A short unique name for keys, queues, exchanges and schemas of one test."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """A fresh Registry whose probes are stopped at teardown."""
    reg = Registry(version="test")
    try:
        yield reg
    finally:
        await reg.aclose()


@pytest.fixture
def sentry() -> Iterator[CapturingTransport]:
    """A real Sentry client, initialised as a host would, sending to a capturing transport.

    The client is closed and unset at teardown; the fixture fails if one is still active.
    """
    transport = CapturingTransport()
    sentry_sdk.init(
        dsn="https://public@example.invalid/1",
        transport=transport,
        default_integrations=False,
        auto_enabling_integrations=False,
    )
    try:
        assert sentry_active()
        yield transport
    finally:
        sentry_sdk.get_client().close()
        sentry_sdk.Scope.get_global_scope().set_client(None)
    assert not sentry_sdk.get_client().is_active()


@pytest.fixture
def sentry_events(sentry: CapturingTransport) -> list[dict[str, Any]]:
    """The events the ``sentry`` client sent so far: a live list, in order."""
    return sentry.events
