"""dispatcher.pgcluster: a private PostgreSQL cluster that starts, restarts, survives a crash
and leaves nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.pgcluster import ClusterError, EphemeralPostgres, pg_bin, process_alive


def psql(dsn: str, sql: str) -> str:
    proc = subprocess.run(
        [str(pg_bin("psql")), "-X", "-v", "ON_ERROR_STOP=1", "-Atc", sql, dsn],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def cluster_processes(root: Path) -> list[int]:
    """PIDs of live processes whose command line names a path inside `root` (Linux only)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(str(root).encode()) for a in argv) and process_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def pg() -> Iterator[EphemeralPostgres]:
    with EphemeralPostgres(durable=False) as cluster:
        yield cluster


def test_start_accepts_connections(pg: EphemeralPostgres) -> None:
    assert pg.is_running()
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"
    assert psql(pg.dsn, "select 1") == "1"
    settings = psql(
        pg.dsn,
        "select current_user, current_setting('listen_addresses'),"
        " current_setting('max_connections'), current_setting('fsync'),"
        " pg_encoding_to_char(encoding) from pg_database where datname = 'postgres'",
    )
    assert settings == "postgres|127.0.0.1|200|off|UTF8"
    pg.start()  # idempotent while running
    assert psql(pg.dsn, "select 2") == "2"


def test_restart_keeps_data_and_port(pg: EphemeralPostgres) -> None:
    psql(pg.dsn, "create table kept (v text); insert into kept values ('before restart')")
    port, pid = pg.port, pg.postmaster_pid
    pg.restart()
    assert pg.port == port
    assert pg.postmaster_pid not in (None, pid)
    assert pid is not None
    assert not process_alive(pid)
    assert psql(pg.dsn, "select v from kept") == "before restart"


def test_kill_then_start_recovers(pg: EphemeralPostgres) -> None:
    # synchronous_commit is off in a non-durable cluster: make this commit reach the WAL.
    psql(pg.dsn, "set synchronous_commit = on; create table crashed as select 42 as v")
    pid = pg.postmaster_pid
    assert pid is not None
    pg.kill()
    assert not pg.is_running()
    assert not process_alive(pid)
    pg.start()
    assert pg.postmaster_pid not in (None, pid)
    assert psql(pg.dsn, "select v from crashed") == "42"
    assert pg.log_path is not None
    assert "automatic recovery in progress" in pg.log_path.read_text()


def test_create_database(pg: EphemeralPostgres) -> None:
    dsn = pg.create_database("events db")
    assert dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/events%20db"
    assert psql(dsn, "select current_database()") == "events db"
    with pytest.raises(ClusterError, match="already exists"):
        pg.create_database("events db")


def test_cleanup_leaves_no_process_and_no_directory() -> None:
    cluster = EphemeralPostgres(durable=False)
    try:
        cluster.start()
        root, pid = cluster.root, cluster.postmaster_pid
        assert root is not None
        assert root.is_dir()
        assert pid is not None
        assert process_alive(pid)
        assert psql(cluster.dsn, "select 1") == "1"
    finally:
        cluster.cleanup()
    assert not process_alive(pid)
    assert not root.exists()
    assert cluster_processes(root) == []
    cluster.cleanup()  # a second call is harmless


def test_failed_start_reports_log_and_cleans_up() -> None:
    cluster = EphemeralPostgres(durable=False, settings={"max_connections": "lots"})
    with pytest.raises(ClusterError, match="max_connections") as info:
        cluster.start()
    assert "last lines of" in str(info.value)
    root = cluster.root
    assert root is not None
    assert cluster_processes(root) == []
    cluster.cleanup()
    assert not root.exists()
