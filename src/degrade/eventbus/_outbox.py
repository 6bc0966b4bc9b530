"""The transactional outbox: events written in the caller's own database transaction.

``await outbox.add(conn, routing_key, payload)`` is one ``INSERT`` on the
caller's connection or session, so the event commits or rolls back with the
write it describes; an :class:`~degrade.eventbus.OutboxRelay` publishes the
committed rows (see :mod:`degrade.eventbus._outbox_relay`). The
:class:`~degrade.eventbus.DiskSpool` keeps events across a broker outage on the
pod's disk; the outbox keeps them in Postgres, so they outlive the pod and
never describe a write that rolled back.

The table (:meth:`Outbox.ddl`, ``python -m degrade outbox-ddl``):

* ``id bigint`` identity: the order rows are relayed in per routing key, and
  the message id (consumers dedupe on it). For transactions that do not
  overlap it is their commit order; two concurrent transactions are ordered
  by their ``INSERT``, and a row committed after a higher id was relayed goes
  out after it (the relay publishes what is committed, in id order).
* ``body bytea`` and ``content_type``: the payload serialised once by
  ``add()``, exactly as ``EventPublisher.publish()`` does (JSON for a mapping).
* an index on ``(routing_key, id)`` for the relay's per-key claim, and a
  statement-level ``AFTER INSERT`` trigger that sends ``NOTIFY`` on the
  table's channel. ``NOTIFY`` is transactional (sent at commit, dropped at
  rollback, one per transaction and channel), and a trigger keeps ``add()``
  at one statement whatever inserts the rows. Rejected: ``pg_notify()``
  sent by ``add()`` itself (a second statement, or a CTE around the INSERT,
  and rows inserted another way would wake nothing). Its cost: a committing
  transaction that sent a ``NOTIFY`` takes Postgres' notification-queue
  lock, which serialises those commits (not measured here; see
  ``docs/eventbus.md``, "Transactional outbox", for when to drop the
  trigger and poll).

Needs PostgreSQL 14 or later (``CREATE OR REPLACE TRIGGER``) and the
``postgres`` extra (SQLAlchemy, asyncpg); SQLAlchemy is imported when the
first ``Outbox`` is made, not when :mod:`degrade.eventbus` is.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from .. import _validate
from .._bounded import hard_timeout
from .._extras import require
from ..exceptions import ConfigurationError
from ._event import check_headers, check_routing_key, encode_json, encode_payload

__all__ = ["DEFAULT_TABLE", "Outbox", "check_table"]

#: The table name used when none is given.
DEFAULT_TABLE = "degrade_outbox"

# Lower-case identifiers need no quoting, and 48 characters leave room for the
# suffixes of the index, function and trigger names within Postgres' 63.
_IDENT = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def check_table(table: object) -> str:
    """Return ``table`` if it is ``name`` or ``schema.name``: lower-case identifiers of at most 48 characters.

    Raises:
        ConfigurationError: anything else; the name is spliced into SQL, so it is never quoted or escaped.
    """
    if not isinstance(table, str) or not all(_IDENT.fullmatch(part) for part in table.split(".")):
        raise ConfigurationError(
            "table must be 'name' or 'schema.name' with lower-case letters, digits and '_' "
            f"(at most 48 characters each, not starting with a digit); got {table!r}"
        )
    if table.count(".") > 1:
        raise ConfigurationError(f"table takes at most one schema: 'schema.name'; got {table!r}")
    return table


def _split(table: str) -> tuple[str, str]:
    schema, _, name = table.rpartition(".")
    return (f"{schema}." if schema else ""), name


def ddl_statements(table: str) -> list[str]:
    """The statements that create ``table``, its index, its NOTIFY function and trigger (idempotent)."""
    prefix, name = _split(table)
    channel = table
    return [
        f"CREATE TABLE IF NOT EXISTS {table} (\n"
        "    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,\n"
        "    routing_key text NOT NULL,\n"
        "    body bytea NOT NULL,\n"
        "    content_type text NOT NULL,\n"
        "    headers jsonb,\n"
        "    created_at timestamptz NOT NULL DEFAULT now()\n"
        ")",
        f"CREATE INDEX IF NOT EXISTS {name}_key_id ON {table} (routing_key, id)",
        f"CREATE OR REPLACE FUNCTION {prefix}{name}_notify() RETURNS trigger LANGUAGE plpgsql AS $$\n"
        f"BEGIN\n    PERFORM pg_notify('{channel}', '');\n    RETURN NULL;\nEND\n$$",
        f"CREATE OR REPLACE TRIGGER {name}_notify AFTER INSERT ON {table}\n"
        f"    FOR EACH STATEMENT EXECUTE FUNCTION {prefix}{name}_notify()",
    ]


class Outbox:
    """An outbox table: events inserted in the caller's transaction, published later by a relay.

    ``await outbox.add(conn, "order.created", {"id": 7})`` runs one
    ``INSERT`` on ``conn`` (an SQLAlchemy ``AsyncConnection`` or
    ``AsyncSession``) inside the transaction the caller has open (SQLAlchemy
    begins one if none is), so the event exists exactly when the write it
    describes committed. An :class:`~degrade.eventbus.OutboxRelay` publishes
    the committed rows.

    Failure mode: FAIL-LOUD, on purpose. ``add()`` raises what the caller's
    connection raises (Postgres down: the driver's error, and the caller's
    transaction fails with it: the write and its event are one decision). It
    never waits beyond the caller's own statement bounds and never touches
    RabbitMQ. Bad arguments raise :class:`~degrade.ConfigurationError` before
    any statement. On a connection in ``AUTOCOMMIT`` the row commits at once,
    alone: use a transaction.

    Args:
        table: ``name`` or ``schema.name`` (lower-case identifiers); also the
            ``NOTIFY`` channel the relay listens on.
    """

    def __init__(self, table: str = DEFAULT_TABLE) -> None:
        sa = require("sqlalchemy", "postgres", feature="degrade.eventbus.Outbox")
        self.table = check_table(table)
        #: The ``LISTEN`` / ``NOTIFY`` channel of the table (its name).
        self.channel = self.table
        # The table name is a checked identifier (check_table), never user input spliced raw.
        self._insert = sa.text(
            f"INSERT INTO {self.table} (routing_key, body, content_type, headers) "  # noqa: S608 - a checked identifier
            "VALUES (:routing_key, :body, :content_type, CAST(CAST(:headers AS text) AS jsonb)) RETURNING id"
        )
        self._insert_many = sa.text(
            f"INSERT INTO {self.table} (routing_key, body, content_type, headers) "  # noqa: S608 - a checked identifier
            "SELECT k, b, c, CAST(h AS jsonb) FROM unnest("
            "CAST(:routing_keys AS text[]), CAST(:bodies AS bytea[]), "
            "CAST(:content_types AS text[]), CAST(:headers AS text[])) AS u(k, b, c, h) RETURNING id"
        )
        self._lock = sa.text("SELECT pg_advisory_xact_lock(hashtext(:name))")
        self._ddl = [sa.text(statement) for statement in ddl_statements(self.table)]
        prefix, name = _split(self.table)
        self._drop = [
            sa.text(f"DROP TABLE IF EXISTS {self.table}"),
            sa.text(f"DROP FUNCTION IF EXISTS {prefix}{name}_notify()"),
        ]

    def ddl(self) -> str:
        """The SQL that creates the table, its index and its NOTIFY trigger (idempotent; for Alembic)."""
        return "".join(f"{statement};\n\n" for statement in ddl_statements(self.table)).rstrip() + "\n"

    async def create_table(self, engine: Any, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - the bound
        """Create the table, index, function and trigger if missing, in one transaction (idempotent).

        Several processes may call it at once at start-up: an advisory lock
        taken first makes them run one after the other.

        Failure mode: raises what the engine raises (Postgres down) or
        ``TimeoutError`` after ``timeout`` seconds; nothing is half-created
        (one transaction).

        Args:
            engine: An SQLAlchemy ``AsyncEngine`` on the database.
            timeout: Bound of the whole operation in seconds.
        """
        timeout = _validate.seconds("timeout", timeout)
        if not hasattr(engine, "begin"):
            raise ConfigurationError(f"engine must be an SQLAlchemy AsyncEngine; got {type(engine).__name__}")

        async def run() -> None:
            async with engine.begin() as conn:
                await conn.execute(self._lock, {"name": f"degrade.outbox:{self.table}"})
                for statement in self._ddl:
                    await conn.execute(statement)

        await hard_timeout(run(), timeout)

    async def drop_table(self, engine: Any, *, timeout: float = 10.0) -> None:  # noqa: ASYNC109 - the bound
        """Drop the table (its rows, index and trigger) and its NOTIFY function, if present.

        For tests and tear-downs: what :meth:`create_table` made goes in one
        transaction. Failure mode: as :meth:`create_table`.
        """
        timeout = _validate.seconds("timeout", timeout)
        if not hasattr(engine, "begin"):
            raise ConfigurationError(f"engine must be an SQLAlchemy AsyncEngine; got {type(engine).__name__}")

        async def run() -> None:
            async with engine.begin() as conn:
                for statement in self._drop:
                    await conn.execute(statement)

        await hard_timeout(run(), timeout)

    async def add(
        self,
        conn: Any,
        routing_key: str,
        payload: Mapping[str, Any] | bytes,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> int:
        """Insert one event in the caller's transaction (one statement); returns its row id.

        The relay publishes it after the transaction commits, with message id
        ``str(id)`` (plus the relay's ``message_id_prefix``).

        Failure mode: FAIL-LOUD: a database error propagates and fails the
        caller's transaction with it. Bad arguments raise
        :class:`~degrade.ConfigurationError` (also a ``TypeError`` when of the
        wrong kind) before anything is sent.

        Args:
            conn: An SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` with the
                transaction the event belongs to.
            routing_key: The AMQP routing key (at most 255 UTF-8 bytes).
            payload: A JSON-able mapping (``application/json``) or bytes
                (``application/octet-stream``), as for ``EventPublisher.publish()``.
            headers: AMQP headers: str keys, JSON-able values.
        """
        _check_conn(conn)
        check_routing_key(routing_key)
        body, content_type = encode_payload(payload)
        params = {
            "routing_key": routing_key,
            "body": body,
            "content_type": content_type,
            "headers": None if headers is None else encode_json(check_headers(headers)),
        }
        result = await conn.execute(self._insert, params)
        return int(result.scalar_one())

    async def add_many(
        self,
        conn: Any,
        events: Iterable[tuple[str, Mapping[str, Any] | bytes] | tuple[str, Mapping[str, Any] | bytes, Any]],
    ) -> list[int]:
        """Insert several events in one statement, in the caller's transaction; returns their ids in order.

        Failure mode: as :meth:`add`. Every event is checked before the
        statement, so a bad one inserts none. No events: no statement, ``[]``.

        Args:
            conn: An SQLAlchemy ``AsyncConnection`` or ``AsyncSession``.
            events: ``(routing_key, payload)`` or ``(routing_key, payload, headers)`` tuples.
        """
        _check_conn(conn)
        keys: list[str] = []
        bodies: list[bytes] = []
        types: list[str] = []
        headers: list[str | None] = []
        for item in events:
            if not isinstance(item, tuple) or len(item) not in {2, 3}:
                raise ConfigurationError(
                    "add_many() takes (routing_key, payload) or (routing_key, payload, headers) tuples; "
                    f"got {item!r}"
                )
            keys.append(check_routing_key(item[0]))
            body, content_type = encode_payload(item[1])
            bodies.append(body)
            types.append(content_type)
            extra = item[2] if len(item) == 3 else None
            headers.append(None if extra is None else encode_json(check_headers(extra)))
        if not keys:
            return []
        result = await conn.execute(
            self._insert_many,
            {"routing_keys": keys, "bodies": bodies, "content_types": types, "headers": headers},
        )
        return [int(row_id) for row_id in result.scalars().all()]

    def __repr__(self) -> str:
        return f"<Outbox table={self.table!r}>"


def _check_conn(conn: object) -> None:
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if not isinstance(conn, AsyncConnection | AsyncSession):
        raise ConfigurationError(
            "conn must be the SQLAlchemy AsyncConnection or AsyncSession whose transaction the event "
            f"belongs to; got {type(conn).__name__}"
        )
