"""Postgres safety nets: the request gate and the read-replica router (extra ``postgres``).

* :class:`DBHealthMiddleware` answers 503 at once while Postgres is down and
  within a hard ``acquire_timeout`` when it stops answering, without piling
  requests or connection attempts up; the connection it checks out serves the
  request (:func:`connection`; :func:`require_connection` is its name for
  FastAPI's ``Depends``), so the healthy path pays one checkout.
* :class:`ReadReplicaRouter` gives ``AsyncSession``s for reads and writes:
  reads on a replica that is up and fresh enough, on the primary otherwise,
  with read-your-writes.
* :func:`engine_options` are the engine settings that bound every wait;
  :func:`problems` says which ones an engine lacks (:func:`warn_problems` logs them once).

Needs SQLAlchemy 2 (asyncio) and asyncpg: ``pip install 'degrade[postgres]'``.
See ``docs/postgres.md``.
"""

from __future__ import annotations

from .._extras import require

require("sqlalchemy", "postgres", feature="degrade.db")
require("asyncpg", "postgres", feature="degrade.db")
require("greenlet", "postgres", feature="degrade.db (SQLAlchemy's asyncio support)")

from .._compat import asyncpg as _compat_asyncpg  # noqa: E402

_compat_asyncpg.install()  # cancelled connects stop logging "Future exception was never retrieved"

from ._context import connection, current_connection, require_connection  # noqa: E402
from ._depends import DBGate, db_gate  # noqa: E402
from ._errors import is_database_failure  # noqa: E402
from ._freshness import ReadYourWritesMiddleware  # noqa: E402
from ._gate import DBHealthMiddleware  # noqa: E402
from ._lag import LAG_SQL, NotAStandby, replica_check, replica_lag  # noqa: E402
from ._router import ReadReplicaRouter  # noqa: E402
from ._settings import engine_options, engine_problems, problems, warn_problems  # noqa: E402

__all__ = [
    "LAG_SQL",
    "DBGate",
    "DBHealthMiddleware",
    "NotAStandby",
    "ReadReplicaRouter",
    "ReadYourWritesMiddleware",
    "connection",
    "current_connection",
    "db_gate",
    "engine_options",
    "engine_problems",
    "is_database_failure",
    "problems",
    "replica_check",
    "replica_lag",
    "require_connection",
    "warn_problems",
]
