"""A throwaway PostgreSQL primary + streaming standby, built from the machine's binaries.

Used by the replica tests: ``initdb`` a primary, ``pg_basebackup -R`` a standby
from it, start both on free ports in a temp dir, and tear both down. The
servers refuse to run as root, so when the tests run as root every command runs
as the ``postgres`` user (``runuser``), which owns the temp dir.

Settings favour speed over durability (``fsync=off``, tiny buffers): the data
lives for one test module.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BINDIR = Path(os.environ.get("DEGRADE_TEST_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
START_TIMEOUT = 30.0


class ClusterUnavailable(RuntimeError):
    """The PostgreSQL binaries (or the postgres user, when running as root) are missing."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PgCluster:
    """A running primary and standby; ``dsn(...)`` gives asyncpg URLs for SQLAlchemy."""

    root: Path
    primary_port: int
    standby_port: int
    _as_user: list[str]

    def dsn(self, port: int, database: str = "postgres") -> str:
        """A ``postgresql+asyncpg://`` URL of the server on ``port``."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"

    @property
    def primary_dsn(self) -> str:
        return self.dsn(self.primary_port)

    @property
    def standby_dsn(self) -> str:
        return self.dsn(self.standby_port)

    def psql(self, port: int, sql: str) -> str:
        """Run ``sql`` with psql on ``port``; returns its unaligned output."""
        out = subprocess.run(
            [*self._as_user, str(BINDIR / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
             "-d", "postgres", "-Atc", sql],
            check=True, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        return out.stdout.strip()

    def stop(self) -> None:
        """Stop both servers (immediate mode) and remove their files."""
        for name in ("standby", "primary"):
            data = self.root / name
            if (data / "postmaster.pid").exists():
                stop = [str(BINDIR / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
                subprocess.run([*self._as_user, *stop], capture_output=True, timeout=60, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def _run(cmd: list[str], *, timeout: float = 120) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-3:])} failed ({result.returncode}): {result.stderr[-2000:]}")


def _wait_ready(as_user: list[str], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        ready = subprocess.run(
            [*as_user, str(BINDIR / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"],
            capture_output=True, timeout=10, check=False,
        )  # fmt: skip
        if ready.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"PostgreSQL on port {port} was not ready within {START_TIMEOUT:g}s")


_CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockdir}'
max_connections = 60
shared_buffers = 16MB
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = replica
max_wal_senders = 4
hot_standby = on
hot_standby_feedback = on
wal_receiver_status_interval = 1s
log_min_messages = warning
"""


def start_cluster() -> PgCluster:
    """Build and start a primary and a streaming standby; raises ClusterUnavailable if impossible."""
    if not (BINDIR / "initdb").exists():
        raise ClusterUnavailable(f"no PostgreSQL binaries in {BINDIR}")
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ClusterUnavailable("running as root and there is no 'postgres' user") from exc
        if shutil.which("runuser") is None:
            raise ClusterUnavailable("running as root and runuser is missing")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="degrade-pgcluster-"))
    if owner is not None:
        os.chown(root, owner.pw_uid, owner.pw_gid)
    cluster = PgCluster(root, _free_port(), _free_port(), as_user)
    try:
        primary, standby = root / "primary", root / "standby"
        _run([*as_user, str(BINDIR / "initdb"), "-D", str(primary), "-U", "postgres", "--auth=trust",
              "--no-sync", "-E", "UTF8", "--locale=C"])  # fmt: skip
        with (primary / "postgresql.conf").open("a") as conf:
            conf.write(_CONF.format(port=cluster.primary_port, sockdir=root))
        with (primary / "pg_hba.conf").open("a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        _run([*as_user, str(BINDIR / "pg_ctl"), "-D", str(primary), "-l", str(root / "primary.log"),
              "-w", "-t", "30", "start"])  # fmt: skip
        _wait_ready(as_user, cluster.primary_port)
        _run([*as_user, str(BINDIR / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(cluster.primary_port),
              "-U", "postgres", "-D", str(standby), "-R", "-X", "stream", "--no-sync"])  # fmt: skip
        with (standby / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {cluster.standby_port}\n")
        _run([*as_user, str(BINDIR / "pg_ctl"), "-D", str(standby), "-l", str(root / "standby.log"),
              "-w", "-t", "30", "start"])  # fmt: skip
        _wait_ready(as_user, cluster.standby_port)
        deadline = time.monotonic() + START_TIMEOUT
        while cluster.psql(cluster.primary_port, "SELECT count(*) FROM pg_stat_replication") != "1":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not start streaming")
            time.sleep(0.1)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running_cluster() -> Iterator[PgCluster]:
    """``with running_cluster() as cluster:`` starts both servers and always tears them down."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
