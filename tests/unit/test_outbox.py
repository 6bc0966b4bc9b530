"""Outbox and OutboxRelay without the services: table names, DDL, statements, the publish loop, holding."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import prometheus_client
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from degrade import ConfigurationError, Registry, Severity
from degrade.__main__ import main
from degrade.eventbus import EventPublisher, Outbox, OutboxRelay, RelayStats
from degrade.eventbus import _outbox_relay as relay_module
from degrade.eventbus._event import Event
from degrade.eventbus._outbox import check_table
from degrade.eventbus._outbox_listen import Listener
from degrade.eventbus._sender import ConnectionLost
from degrade.runbook import render_alerts

URL = "amqp://guest:guest@127.0.0.1:1/"
#: A port nothing listens on: every connect is refused at once.
DEAD_DSN = "postgresql+asyncpg://postgres@127.0.0.1:1/test"


class Recorder(AsyncSession):
    """An AsyncSession that records statements instead of running them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, Any]]] = []

    async def execute(self, statement: Any, params: Any = None, **_: Any) -> Any:  # type: ignore[override]
        self.calls.append((str(statement), dict(params or {})))
        n = len(params["routing_keys"]) if params and "routing_keys" in params else 1
        return SimpleNamespace(
            scalar_one=lambda: 7,
            scalars=lambda: SimpleNamespace(all=lambda: list(range(1, n + 1))),
        )


class FakeLink:
    """A Link whose sends are settled by the test (or at once with a fixed answer)."""

    def __init__(self, answer: str | None = None, *, hang: bool = False) -> None:
        self.answer = answer
        self.hang = hang
        self.sent: list[Event] = []
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def watch(self) -> asyncio.Future[None]:
        return self.lost

    def unwatch(self) -> None:
        pass

    async def send(self, event: Event) -> str | None:
        self.sent.append(event)
        if self.hang:
            await asyncio.Event().wait()
        await asyncio.sleep(0)
        return self.answer

    def abort(self) -> None:
        pass

    async def close(self) -> None:
        pass


def row(row_id: int, key: str = "k", headers: str | None = None) -> Any:
    """A claimed row as the relay's SELECT returns it."""
    return SimpleNamespace(
        id=row_id, routing_key=key, body=b"{}", content_type="application/json", headers=headers, ts=1.0
    )


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    """An engine on a closed port (every connect refused)."""
    eng = create_async_engine(DEAD_DSN, connect_args={"timeout": 0.5})
    yield eng
    await eng.dispose()


@pytest.fixture
async def relays() -> AsyncIterator[list[OutboxRelay]]:
    """Relays closed at teardown."""
    made: list[OutboxRelay] = []
    yield made
    for relay in made:
        await relay.aclose()


class TestTableName:
    """The table name is spliced into SQL, so only plain identifiers pass."""

    @pytest.mark.parametrize("name", ["outbox", "app.outbox", "_x9", "a" * 48])
    def test_accepts_identifiers(self, name: str) -> None:
        """Lower-case identifiers, optionally schema-qualified, are accepted."""
        assert check_table(name) == name

    @pytest.mark.parametrize(
        "name", ["Outbox", "x;drop table y", "a.b.c", "1abc", "", "a" * 49, "a b", 'x"', None]
    )
    def test_rejects_anything_else(self, name: object) -> None:
        """Anything that would need quoting raises ConfigurationError naming the argument."""
        with pytest.raises(ConfigurationError, match="table"):
            check_table(name)


class TestDDL:
    """The DDL: idempotent, with the NOTIFY trigger, the same from Python and the CLI."""

    def test_statements(self) -> None:
        """Table, index, function and statement-level trigger, all created only if missing or replaced."""
        ddl = Outbox("app.events_out").ddl()
        assert "CREATE TABLE IF NOT EXISTS app.events_out (" in ddl
        assert "CREATE INDEX IF NOT EXISTS events_out_key_id ON app.events_out (routing_key, id)" in ddl
        assert "CREATE OR REPLACE FUNCTION app.events_out_notify()" in ddl
        assert "pg_notify('app.events_out', '')" in ddl
        assert "AFTER INSERT ON app.events_out\n    FOR EACH STATEMENT" in ddl

    def test_cli_prints_the_same_ddl(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`python -m degrade outbox-ddl --table t` prints Outbox(t).ddl() plus a blank line."""
        assert main(["outbox-ddl", "--table", "app.events_out"]) == 0
        assert capsys.readouterr().out.rstrip() == Outbox("app.events_out").ddl().rstrip()

    def test_cli_default_table(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --table the DDL is for degrade_outbox."""
        assert main(["outbox-ddl"]) == 0
        assert "CREATE TABLE IF NOT EXISTS degrade_outbox (" in capsys.readouterr().out

    def test_cli_rejects_a_bad_table(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A table name that is not an identifier exits 2 with one line on stderr."""
        assert main(["outbox-ddl", "--table", "x;drop"]) == 2
        assert "table must be" in capsys.readouterr().err

    async def test_create_table_needs_an_engine(self) -> None:
        """create_table() with something that is not an engine raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="engine"):
            await Outbox().create_table(object())


class TestAdd:
    """add() and add_many(): one statement on the caller's connection, arguments checked first."""

    async def test_add_is_one_insert(self) -> None:
        """add() runs exactly one INSERT ... RETURNING with the serialised payload and headers."""
        session = Recorder()
        assert await Outbox("t_out").add(session, "order.created", {"id": 7}, headers={"h": 1}) == 7
        [(sql, params)] = session.calls
        assert sql.startswith("INSERT INTO t_out ")
        assert "RETURNING id" in sql
        assert params == {
            "routing_key": "order.created",
            "body": b'{"id":7}',
            "content_type": "application/json",
            "headers": '{"h":1}',
        }

    async def test_add_many_is_one_insert(self) -> None:
        """add_many() sends every event in one statement and returns the ids in order."""
        session = Recorder()
        ids = await Outbox("t_out").add_many(session, [("a", {"n": 1}), ("b", b"raw", {"x": "y"})])
        assert ids == [1, 2]
        [(sql, params)] = session.calls
        assert "unnest(" in sql
        assert params["routing_keys"] == ["a", "b"]
        assert params["bodies"] == [b'{"n":1}', b"raw"]
        assert params["content_types"] == ["application/json", "application/octet-stream"]
        assert params["headers"] == [None, '{"x":"y"}']

    async def test_add_many_of_nothing_runs_nothing(self) -> None:
        """add_many() with no events returns [] without a statement."""
        session = Recorder()
        assert await Outbox().add_many(session, []) == []
        assert session.calls == []

    @pytest.mark.parametrize(
        ("key", "payload", "headers"),
        [
            (1, {}, None),
            ("k", object(), None),
            ("k", {"x": {1, 2}}, None),
            ("k", {}, {"h": object()}),
            ("k" * 300, {}, None),
        ],
    )
    async def test_bad_arguments_run_nothing(self, key: Any, payload: Any, headers: Any) -> None:
        """A bad key, payload or header raises ConfigurationError before any statement."""
        session = Recorder()
        with pytest.raises(ConfigurationError):
            await Outbox().add(session, key, payload, headers=headers)
        assert session.calls == []

    async def test_a_bad_event_in_a_batch_inserts_none(self) -> None:
        """add_many() checks every event before its one statement."""
        session = Recorder()
        with pytest.raises(ConfigurationError):
            await Outbox().add_many(session, [("a", {}), ("b", object())])
        with pytest.raises(ConfigurationError, match="tuples"):
            await Outbox().add_many(session, [["a", {}]])  # type: ignore[list-item]
        assert session.calls == []

    async def test_needs_a_connection_or_session(self, engine: AsyncEngine) -> None:
        """add() on an engine (not a connection in a transaction) raises ConfigurationError."""
        with pytest.raises(ConfigurationError, match="AsyncConnection or AsyncSession"):
            await Outbox().add(engine, "k", {})


class TestRelayArguments:
    """Bad relay arguments raise ConfigurationError naming them."""

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"batch_size": 0}, "batch_size"),
            ({"max_in_flight": -1}, "max_in_flight"),
            ({"poll_interval": 0}, "poll_interval"),
            ({"db_timeout": float("inf")}, "db_timeout"),
            ({"backoff_initial": 2.0, "backoff_max": 1.0}, "backoff_max"),
            ({"db": "db"}, "db must be a Dependency"),
            ({"message_id_prefix": 3}, "message_id_prefix"),
        ],
    )
    def test_bad_options(self, engine: AsyncEngine, kwargs: dict[str, Any], match: str) -> None:
        """Each bad option is named in the error."""
        with pytest.raises(ConfigurationError, match=match):
            OutboxRelay(Outbox(), engine, EventPublisher(URL, "x"), **kwargs)

    def test_needs_an_outbox_and_a_publisher(self, engine: AsyncEngine) -> None:
        """The outbox and the publisher are checked."""
        with pytest.raises(ConfigurationError, match="outbox"):
            OutboxRelay("t", engine, EventPublisher(URL, "x"))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="publisher"):
            OutboxRelay(Outbox(), engine, URL)  # type: ignore[arg-type]

    def test_needs_an_async_engine(self) -> None:
        """A relay on something that is not an AsyncEngine raises ConfigurationError naming engine."""
        with pytest.raises(ConfigurationError, match="engine must be"):
            OutboxRelay(Outbox(), object(), EventPublisher(URL, "x"))


class TestPublish:
    """One batch's publishing: id order, outcomes, stalls and losses end it."""

    def relay(self, engine: AsyncEngine, link: FakeLink, **kwargs: Any) -> OutboxRelay:
        publisher = EventPublisher(URL, "x", confirm_timeout=0.2)
        relay = OutboxRelay(Outbox(), engine, publisher, message_id_prefix="p-", **kwargs)
        relay._link, relay._lost = link, link.lost
        return relay

    async def test_sends_in_id_order_with_row_ids(self, engine: AsyncEngine) -> None:
        """Rows go out in the order claimed, message id = prefix + row id, headers decoded."""
        link = FakeLink()
        relay = self.relay(engine, link, max_in_flight=3)
        outcomes, lost = await relay._publish(
            [row(i, headers='{"a":1}' if i == 2 else None) for i in range(1, 8)]
        )
        assert lost is None
        assert outcomes == dict.fromkeys(range(1, 8))
        assert [e.message_id for e in link.sent] == [f"p-{i}" for i in range(1, 8)]
        assert link.sent[1].headers == {"a": 1}

    async def test_outcomes_are_counted(self, engine: AsyncEngine) -> None:
        """Unroutable rows count as dropped, nacked ones as retried, confirmed as published."""
        relay = self.relay(engine, FakeLink())
        relay.counts.settle({1: None, 2: "unroutable", 3: "nacked", 4: None})
        stats = relay.stats()
        assert isinstance(stats, RelayStats)
        assert (stats.published, stats.dropped, stats.retried) == (2, {"unroutable": 1}, {"nacked": 1})

    async def test_a_stall_ends_the_batch(self, engine: AsyncEngine) -> None:
        """No confirm within confirm_timeout: ConnectionLost caused by TimeoutError, nothing settled."""
        relay = self.relay(engine, FakeLink(hang=True))
        outcomes, lost = await asyncio.wait_for(relay._publish([row(1), row(2)]), timeout=5.0)
        assert outcomes == {}
        assert isinstance(lost, ConnectionLost)
        assert isinstance(lost.__cause__, TimeoutError)

    async def test_a_closed_connection_ends_the_batch(self, engine: AsyncEngine) -> None:
        """The connection closing mid-batch ends it with ConnectionLost."""
        link = FakeLink(hang=True)
        relay = self.relay(engine, link)
        asyncio.get_running_loop().call_later(0.05, link.lost.set_result, None)
        outcomes, lost = await asyncio.wait_for(relay._publish([row(1)]), timeout=5.0)
        assert outcomes == {}
        assert isinstance(lost, ConnectionLost)

    async def test_confirms_feed_the_broker(self, engine: AsyncEngine, registry: Registry) -> None:
        """A batch confirmed is a success of the publisher's dependency."""
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        dep.mark_down()
        publisher = EventPublisher(URL, "x", dependency=dep)
        relay = OutboxRelay(Outbox(), engine, publisher)
        link = FakeLink()
        relay._link, relay._lost = link, link.lost
        await relay._publish([row(1)])
        assert not dep.is_down


class FailingConnection:
    """An AsyncConnection stand-in whose start() raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.closed = False

    async def start(self) -> None:
        raise self.error

    async def close(self) -> None:
        self.closed = True


class TestListener:
    """LISTEN failures: an outage is retried later, LISTEN that cannot work means polling only."""

    async def test_outage_leaves_it_stopped_for_a_retry(self) -> None:
        """A refused connection: not started, not unavailable, the connection closed."""
        conn = FailingConnection(ConnectionRefusedError())
        listener = Listener("t", asyncio.Event(), timeout=1.0)
        await listener.start(SimpleNamespace(connect=lambda: conn))
        assert (listener.started, listener.listening, listener.unavailable, conn.closed) == (
            False,
            False,
            False,
            True,
        )

    async def test_listen_that_cannot_work_means_polling(self) -> None:
        """Any other error marks it unavailable (logged once) instead of failing the relay."""
        listener = Listener("t", asyncio.Event(), timeout=1.0)
        await listener.start(SimpleNamespace(connect=lambda: FailingConnection(NotImplementedError())))
        assert listener.unavailable
        assert not listener.started


class TestFollowingDependencies:
    """The relay waits for a dependency that is down and does not call it meanwhile."""

    async def test_held_while_broker_is_down_then_connects(
        self,
        engine: AsyncEngine,
        registry: Registry,
        relays: list[OutboxRelay],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """While RabbitMQ is held down no connect is attempted; its recovery wakes the relay at once."""
        monkeypatch.setattr(relay_module, "HOLD_RECHECK", 30.0)  # only the transition can wake it in time
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        publisher = EventPublisher(URL, "x", dependency=dep)
        connects: list[float] = []

        async def connect() -> Any:
            connects.append(asyncio.get_running_loop().time())
            raise ConnectionRefusedError

        monkeypatch.setattr(publisher._sender, "connect", connect)
        relay = OutboxRelay(Outbox(), engine, publisher, listen=False, backlog_interval=60.0)
        relays.append(relay)
        with dep.forced_down():
            await relay.start()
            await asyncio.sleep(0.3)
            assert relay.phase == "held"
            assert connects == []
        for _ in range(200):
            if connects:
                break
            await asyncio.sleep(0.01)
        assert connects, "the recovery did not wake the relay"

    async def test_postgres_failures_feed_db_and_back_off(
        self, engine: AsyncEngine, registry: Registry, relays: list[OutboxRelay]
    ) -> None:
        """A refused Postgres is a failure of db (down after 3); then the relay holds instead of retrying."""
        db = registry.dependency("db", severity=Severity.SEV1, check=_never_ok)
        relay = OutboxRelay(
            Outbox(),
            engine,
            EventPublisher(URL, "x"),
            db=db,
            backlog_interval=0.01,
            backoff_initial=0.01,
            backoff_max=0.05,
        )
        relays.append(relay)
        await relay.start()
        for _ in range(300):
            if db.is_down:
                break
            await asyncio.sleep(0.01)
        assert db.is_down
        assert db.last_error == "ConnectionRefusedError"
        seen = relay.stats().db_failures
        await asyncio.sleep(0.5)
        assert relay.stats().db_failures - seen <= 1  # held: the probe owns Postgres now
        assert relay.phase == "held"


async def _never_ok() -> None:
    raise ConnectionRefusedError


class TestObservability:
    """Backlog metrics, the runbook site and the alert rule."""

    def test_backlog_metrics_per_table(self, engine: AsyncEngine) -> None:
        """Each relay's table has backlog and oldest-age gauges and an events counter."""
        relay = OutboxRelay(Outbox("metrics_out"), engine, EventPublisher(URL, "x"))
        relay.counts.backlog, relay.counts.oldest_s = 12, 3.5
        relay.counts.settle({1: None})
        sample = prometheus_client.REGISTRY.get_sample_value
        assert sample("degrade_outbox_backlog", {"table": "metrics_out"}) == 12.0
        assert sample("degrade_outbox_oldest_seconds", {"table": "metrics_out"}) == 3.5
        assert sample("degrade_outbox_events_total", {"table": "metrics_out", "outcome": "published"}) >= 1.0

    def test_alert_rule_when_a_relay_is_registered(self, engine: AsyncEngine, registry: Registry) -> None:
        """A registry whose broker has a relay gets one DegradeOutboxBacklog rule on the oldest row's age."""
        dep = registry.dependency("rabbitmq", severity=Severity.SEV2)
        assert "DegradeOutboxBacklog" not in render_alerts(registry)
        OutboxRelay(Outbox(), engine, EventPublisher(URL, "x", dependency=dep))
        rules = yaml.safe_load(render_alerts(registry))["groups"][0]["rules"]
        [rule] = [r for r in rules if r["alert"] == "DegradeOutboxBacklog"]
        assert "degrade_outbox_oldest_seconds" in rule["expr"]

    def test_sites_for_the_runbook(self, engine: AsyncEngine, registry: Registry) -> None:
        """The relay declares its fail-soft site on the broker and add()'s fail-loud site on db."""
        broker = registry.dependency("rabbitmq", severity=Severity.SEV2)
        db = registry.dependency("db", severity=Severity.SEV1)
        OutboxRelay(Outbox("s_out"), engine, EventPublisher(URL, "x", dependency=broker), db=db)
        assert [(s.name, s.mode) for s in broker.sites if "Outbox" in s.name] == [
            ("degrade.eventbus.OutboxRelay[s_out]", "fail_soft")
        ]
        assert [(s.name, s.mode) for s in db.sites] == [("degrade.eventbus.Outbox[s_out].add", "fail_loud")]

    def test_stats_is_a_frozen_snapshot(self, engine: AsyncEngine) -> None:
        """stats() is a frozen value that later counting does not change."""
        relay = OutboxRelay(Outbox(), engine, EventPublisher(URL, "x"))
        before = relay.stats()
        relay.counts.settle({1: None})
        assert (before.published, relay.stats().published) == (0, 1)
        assert json.dumps(before.dropped) == "{}"
