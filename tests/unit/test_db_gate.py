"""db_gate's arguments and identity (no database needed: engines connect lazily)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from degrade import ConfigurationError, Dependency, Registry, Severity
from degrade.db import DBGate, db_gate

DSN = "postgresql+asyncpg://app:pw@127.0.0.1:1/app"


@pytest.fixture
async def engine() -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(DSN)
    yield eng
    await eng.dispose()


@pytest.fixture
def db(registry: Registry) -> Dependency:
    return registry.dependency("db", severity=Severity.SEV1)


class TestArguments:
    def test_sync_engine_is_rejected_at_once(self, db: Dependency) -> None:
        """A sync engine raises ConfigurationError when db_gate is called, naming create_async_engine."""
        with pytest.raises(ConfigurationError, match="create_async_engine"):
            db_gate(engine=create_engine("sqlite://"), dependency=db)  # type: ignore[arg-type]

    def test_bad_dependency_and_bounds(self, engine: AsyncEngine, db: Dependency) -> None:
        """A name instead of a Dependency, a negative bound or a fractional Retry-After raise."""
        with pytest.raises(ConfigurationError, match="dependency must be a degrade Dependency"):
            db_gate(engine=engine, dependency="db")  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="acquire_timeout"):
            db_gate(engine=engine, dependency=db, acquire_timeout=-1)
        with pytest.raises(ConfigurationError, match="retry_after"):
            db_gate(engine=engine, dependency=db, retry_after=1.5)  # type: ignore[arg-type]


class TestIdentity:
    def test_same_arguments_same_gate_one_site(self, engine: AsyncEngine, db: Dependency) -> None:
        """Equal arguments give the same DBGate; the runbook site is declared once, FAIL-LOUD."""
        gate = db_gate(engine=engine, dependency=db, acquire_timeout=0.5)
        assert isinstance(gate, DBGate)
        assert db_gate(engine=engine, dependency=db, acquire_timeout=0.5) is gate
        assert db_gate(engine=engine, dependency=db, acquire_timeout=0.5, retry_after=9) is not gate
        sites = [s for s in db.sites if s.name == "degrade.db.db_gate"]
        assert len(sites) == 1
        assert sites[0].mode == "fail_loud"
        assert gate.retry_after == db.retry_after
        assert "acquire_timeout=0.5s" in repr(gate)

    async def test_another_registry_gets_its_own_gate(self, engine: AsyncEngine, db: Dependency) -> None:
        """Two apps (two registries) on one engine do not share a gate by accident."""
        other = Registry()
        try:
            other_db = other.dependency("db", severity=Severity.SEV1)
            assert db_gate(engine=engine, dependency=other_db) is not db_gate(engine=engine, dependency=db)
        finally:
            await other.aclose()
