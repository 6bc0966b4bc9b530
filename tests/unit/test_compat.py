"""The driver internals degrade's fast paths read are there in the installed versions.

These fail loudly (rather than letting the library fall back silently) when a
driver release moves an internal; CI runs them at the newest versions and at
the floors pyproject.toml declares (``make compat-lowest``).
"""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from degrade import _compat


class TestSqlalchemy:
    def test_fast_paths_available(self) -> None:
        """The idle-queue read, the lazy BEGIN and max_overflow all work on this SQLAlchemy."""
        pytest.importorskip("sqlalchemy")
        pytest.importorskip("asyncpg")
        from degrade._compat import sqlalchemy

        assert sqlalchemy.problems() == []

    def test_unknown_adapter_falls_back_to_a_ping(self) -> None:
        """An adapter without the lazy BEGIN gets None: the caller pings instead."""
        pytest.importorskip("sqlalchemy")
        from degrade._compat import sqlalchemy

        assert sqlalchemy.lazy_begin(object()) is None
        assert sqlalchemy.max_overflow(object()) is None


class TestRedis:
    def test_fast_paths_available(self) -> None:
        """Retry counts and backoff caps are readable on this redis-py."""
        pytest.importorskip("redis")
        from degrade._compat import redis

        assert redis.problems() == []

    def test_unknown_retry_reads_as_none(self) -> None:
        """Something that is not a Retry counts as no retries (never a false warning)."""
        pytest.importorskip("redis")
        from degrade._compat import redis

        assert redis.retry_settings(object(), None) == (0, 0.0)
        assert redis.retry_settings(None, [TimeoutError]) == (1, 0.0)


class TestReport:
    def test_a_fallback_is_logged_once_per_driver(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """report() logs degrade.compat.fallback once per driver, and nothing when all is well."""
        monkeypatch.setattr(_compat, "_reported", set())
        with capture_logs() as logs:
            _compat.report("somedriver", [])
            _compat.report("somedriver", ["x moved"])
            _compat.report("somedriver", ["x moved"])
        assert [e["event"] for e in logs] == ["degrade.compat.fallback"]
        assert logs[0]["driver"] == "somedriver"
        assert logs[0]["problems"] == ["x moved"]


class TestOptionalImports:
    def test_only_the_missing_package_itself_is_a_missing_extra(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A package that is absent names its extra; one that fails inside its own import propagates."""
        import sys

        from degrade import MissingExtraError
        from degrade._extras import optional, require

        with pytest.raises(MissingExtraError, match=r"degrade\[x\]"):
            require("degrade_no_such_package", "x", feature="f")
        assert optional("degrade_no_such_package") is None

        class Finder:
            def find_spec(self, name: str, path: object = None, target: object = None) -> None:
                if name == "degrade_broken_pkg":
                    raise ImportError("cannot import name 'x' from 'degrade_broken_dep'")

        monkeypatch.setattr(sys, "meta_path", [Finder(), *sys.meta_path])
        with pytest.raises(ImportError, match="cannot import name") as info:
            require("degrade_broken_pkg", "x", feature="f")
        assert not isinstance(info.value, MissingExtraError)
        with pytest.raises(ImportError, match="cannot import name"):
            optional("degrade_broken_pkg")


class TestAiormq:
    def test_fast_paths_available(self) -> None:
        """aiormq has the transport factory the publisher uses to reset a stalled socket."""
        pytest.importorskip("aiormq")
        from degrade._compat import aiormq

        assert aiormq.problems() == []
        factory = aiormq.factory_for("amqps")
        assert factory is not None
        assert factory.transport is None


class TestRedisConnections:
    async def test_get_connection_with_or_without_a_command_name(self) -> None:
        """Pools that want a command name get one; newer ones get none."""
        pytest.importorskip("redis")
        from degrade._compat import redis

        class Old:
            async def get_connection(self, command_name: str, *keys: object) -> str:
                return f"old:{command_name}"

        class New:
            async def get_connection(self, command_name: str | None = None) -> str:
                return f"new:{command_name}"

        assert await redis.get_connection(Old()) == "old:EVALSHA"
        assert await redis.get_connection(New()) == "new:None"
        assert redis.writer(object()) is None
        assert not redis.reply_buffered(object())


class TestAsyncpg:
    def test_fix_available_and_installed_once(self) -> None:
        """asyncpg has the SSL negotiation protocol the fix subclasses; installing twice keeps one."""
        pytest.importorskip("asyncpg")
        from asyncpg import connect_utils

        from degrade._compat import asyncpg

        assert asyncpg.problems() == []
        assert asyncpg.install()
        installed = connect_utils.TLSUpgradeProto
        assert asyncpg.install()
        assert connect_utils.TLSUpgradeProto is installed
        assert installed.__mro__[1] is asyncpg._BASE

    async def test_an_orphaned_handshake_error_counts_as_retrieved(self) -> None:
        """connection_lost before the server answered fails the future, already marked retrieved."""
        pytest.importorskip("asyncpg")
        import ssl

        from asyncpg import connect_utils

        from degrade._compat import asyncpg

        asyncpg.install()
        loop = asyncio.get_running_loop()
        proto = connect_utils.TLSUpgradeProto(loop, "h", 5432, ssl.create_default_context(), False)
        proto.connection_lost(None)
        assert isinstance(proto.on_data.exception(), ConnectionError)
        assert not proto.on_data._log_traceback  # asyncio will not log it as never retrieved
        with pytest.raises(ConnectionError):  # an awaiter still gets it
            await proto.on_data
