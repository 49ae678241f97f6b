"""Running under systemd: the notify protocol against a real datagram socket standing in for
NOTIFY_SOCKET (in process and as a subprocess), and the database password from a file or a
systemd credential (LoadCredential=db-password:...)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import asyncpg
import pytest
import structlog

from dispatcher import cli
from dispatcher.config import Config, ConfigError, load_config
from dispatcher.daemon import Dispatcher
from dispatcher.db import DatabaseError, connect, connect_kwargs, migrate
from dispatcher.listener import Listener
from dispatcher.pgcluster import EphemeralPostgres
from dispatcher.systemd import Notifier
from tests.conftest import Db, RunningDaemon, make_config, wait_until
from tests.test_lifecycle import start_daemon


@dataclass
class NotifySocket:
    """A bound AF_UNIX datagram socket collecting what the daemon sends, as systemd would."""

    sock: socket.socket
    address: str  # as NOTIFY_SOCKET spells it: a path, or "@name" for an abstract socket
    messages: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def drain(self) -> list[dict[str, str]]:
        """Collect every datagram already queued (sending is synchronous, so nothing sent is
        still on its way) and return the new ones."""
        new: list[dict[str, str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return new
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))
            new.append(fields)

    def received(self, name: str, value: str = "1") -> list[float]:
        """When each message carrying NAME=value arrived (after a drain)."""
        self.drain()
        return [at for at, fields in self.messages if fields.get(name) == value]


def bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + address[1:] if address.startswith("@") else address)
    sock.setblocking(False)
    return sock


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    address = str(tmp_path / "notify")
    with bind(address) as sock:
        yield NotifySocket(sock, address)


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    address = f"@dispatcher-test-{uuid.uuid4().hex}"
    with bind(address) as sock:
        yield NotifySocket(sock, address)


# The protocol ---------------------------------------------------------------------------------


def test_watchdog_is_half_of_watchdog_usec_and_only_for_our_pid() -> None:
    ours = str(os.getpid())
    base = {"NOTIFY_SOCKET": "/run/notify"}
    assert Notifier.from_env({}).enabled is False
    assert Notifier.from_env(base).watchdog_interval is None
    n = Notifier.from_env(base | {"WATCHDOG_USEC": "30000000"})
    assert (n.enabled, n.watchdog_interval) == (True, 15.0)
    assert Notifier.from_env(base | {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": ours})
    other = Notifier.from_env(base | {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    assert Notifier.from_env(base | {"WATCHDOG_USEC": "0"}).watchdog_interval is None
    assert Notifier.from_env(base | {"WATCHDOG_USEC": "soon"}).watchdog_interval is None


def test_messages_reach_a_path_and_an_abstract_socket(
    notify_socket: NotifySocket, abstract_notify_socket: NotifySocket
) -> None:
    for target in (notify_socket, abstract_notify_socket):
        n = Notifier(target.address)
        assert n.notify(READY=1, STATUS="Delivering")
        n.close()
        assert target.drain() == [{"READY": "1", "STATUS": "Delivering"}]


def test_a_missing_socket_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "gone"))
    with structlog.testing.capture_logs() as logged:
        assert n.notify(READY=1) is False
        assert n.notify(WATCHDOG=1) is False
    warnings = [e for e in logged if e["event"] == "systemd_notify_failed"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert warnings[0]["socket"] == str(tmp_path / "gone")


# The daemon in process ------------------------------------------------------------------------


async def test_ready_only_once_schema_checked_and_listener_connected_then_watchdog_then_stopping(
    db: Db, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # pings every 100ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    # Hold the listener's first connection back until the test lets it through.
    gate = asyncio.Event()
    connect = Listener._connect

    async def gated(self: Listener) -> asyncpg.Connection:
        await gate.wait()
        return await connect(self)

    monkeypatch.setattr(Listener, "_connect", gated)
    daemon = await RunningDaemon(Dispatcher(db.config)).ready()
    try:
        # The schema is checked and the pump is running, but the listener is not connected.
        await wait_until(lambda: daemon.dispatcher.database_ok, message="pump ran")
        assert not daemon.dispatcher.listener.connected
        assert notify_socket.drain() == []
        gate.set()
        await wait_until(lambda: notify_socket.received("READY"), message="READY=1")
        ready = next(f for _, f in notify_socket.messages if f.get("READY") == "1")
        assert daemon.dispatcher.listener.connected
        assert ready["STATUS"].startswith("Delivering")
        await wait_until(
            lambda: len(notify_socket.received("WATCHDOG")) >= 11, timeout=5, message="pings"
        )
        pings = notify_socket.received("WATCHDOG")
        span = pings[10] - pings[0]  # ten intervals of 100ms
        # Not faster than the period asks; that they keep coming, the wait above has shown
        # (no upper bound on time: a loaded machine may run late, and that is no failure).
        assert span > 0.7, span
        assert notify_socket.received("STOPPING") == []
    finally:
        await daemon.stop()
    stopping = notify_socket.received("STOPPING")
    assert len(stopping) == 1
    assert stopping[0] > notify_socket.received("READY")[0]
    assert not any("READY" in f for _, f in notify_socket.messages[1:])


def reload_messages(messages: list[dict[str, str]]) -> list[str]:
    """RELOADING and READY messages in order, as "RELOADING" / "READY"."""
    return [k for f in messages for k in ("RELOADING", "READY") if f.get(k) == "1"]


async def test_a_reload_says_reloading_with_the_monotonic_time_then_ready_even_when_refused(
    db: Db, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    configs: list[Config] = []

    def source() -> Config:
        if not configs:
            raise ConfigError(
                "dispatcher.toml: [delivery] concurrency: must be between 1 and 10000"
            )
        return configs.pop()

    dispatcher = Dispatcher(db.config, reload=source)
    # Before READY=1 a reload says nothing: systemd would take its READY=1 for the first one.
    dispatcher.reload_config()
    assert notify_socket.drain() == []
    daemon = await RunningDaemon(dispatcher).ready()
    try:
        await wait_until(lambda: notify_socket.received("READY"), message="READY=1")
        notify_socket.drain()
        for taken in (False, True):
            if taken:
                configs.append(replace(db.config, log=replace(db.config.log, summary_interval=2.0)))
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert dispatcher.reload_config() is taken
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            sent = notify_socket.drain()
            assert reload_messages(sent) == ["RELOADING", "READY"], sent
            assert before <= int(sent[0]["MONOTONIC_USEC"]) <= after
        assert dispatcher.sampler.interval == 2.0
    finally:
        await daemon.stop()


async def test_without_notify_socket_the_daemon_sends_nothing_and_runs(
    db: Db, notify_socket: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    daemon = await RunningDaemon(Dispatcher(db.config)).ready()
    await wait_until(lambda: daemon.dispatcher.listener.connected, message="listener")
    await daemon.stop()
    assert notify_socket.drain() == []


async def test_a_notify_socket_that_is_gone_does_not_stop_the_daemon(
    db: Db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    with structlog.testing.capture_logs() as logged:
        daemon = await RunningDaemon(Dispatcher(db.config)).ready()
        await wait_until(lambda: daemon.dispatcher.listener.connected, message="listener")
        await wait_until(
            lambda: any(e["event"] == "systemd_notify_failed" for e in logged), message="warning"
        )
        assert not daemon.task.done()
        await daemon.stop()
    assert sum(e["event"] == "systemd_notify_failed" for e in logged) == 1


# The daemon as systemd runs it ------------------------------------------------------------------


async def test_dispatcher_run_subprocess_sends_ready_and_stopping_on_sigterm(
    db: Db, abstract_notify_socket: NotifySocket
) -> None:
    proc = await start_daemon(
        db, NOTIFY_SOCKET=abstract_notify_socket.address, WATCHDOG_USEC="400000"
    )
    try:
        await wait_until(
            lambda: abstract_notify_socket.received("READY"), timeout=20, message="READY=1"
        )
        await wait_until(
            lambda: len(abstract_notify_socket.received("WATCHDOG")) >= 2, message="pings"
        )
        # SIGHUP (systemctl reload): RELOADING=1 stamped with CLOCK_MONOTONIC, then READY=1.
        abstract_notify_socket.drain()
        start = len(abstract_notify_socket.messages)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: len(abstract_notify_socket.received("READY")) >= 2, message="READY=1 again"
        )
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sent = [f for _, f in abstract_notify_socket.messages[start:]]
        assert reload_messages(sent) == ["RELOADING", "READY"], sent
        reloading = next(f for f in sent if f.get("RELOADING") == "1")
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert len(abstract_notify_socket.received("STOPPING")) == 1


# The database password --------------------------------------------------------------------------


def test_the_systemd_credential_is_the_password_file_unless_one_is_set(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-password").write_text("s3cret-from-systemd\n")
    own = tmp_path / "own"
    own.write_text("s3cret-of-our-own")
    c = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert c.database.password_file == str(creds / "db-password")
    assert connect_kwargs(c.database)["password"]() == "s3cret-from-systemd"
    assert "s3cret" not in repr(c)
    env = {"CREDENTIALS_DIRECTORY": str(creds), "DISPATCHER_DATABASE_PASSWORD_FILE": str(own)}
    c = load_config(None, environ=env)
    assert connect_kwargs(c.database)["password"]() == "s3cret-of-our-own"
    # No credential (the directory exists but holds none): the DSN, ~/.pgpass etc. as before.
    (creds / "db-password").unlink()
    c = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert "password" not in connect_kwargs(c.database)


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "cannot be read: No such file or directory"), ("", "on one line"), ("a\nb\n", "line")],
)
def test_a_bad_password_file_or_credential_is_one_config_error(
    tmp_path: Path, content: str | None, why: str
) -> None:
    path = tmp_path / "db-password"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=f"password_file: {path} .*{why}"):
        load_config(None, environ={"DISPATCHER_DATABASE_PASSWORD_FILE": str(path)})
    credential = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    if content is None:  # no credential by that name: none is used
        assert load_config(None, environ=credential).database.password_file == ""
    else:
        with pytest.raises(ConfigError, match=f"^systemd credential db-password: {path} .*{why}"):
            load_config(None, environ=credential)


def test_dispatcher_run_with_an_unreadable_password_file_prints_one_line_and_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DISPATCHER_DATABASE_PASSWORD_FILE", str(tmp_path / "missing"))
    assert cli.main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "dispatcher: error: environment variable DISPATCHER_DATABASE_PASSWORD_FILE:"
        " [database] password_file:"
    )


@pytest.fixture
async def password_cluster() -> AsyncIterator[tuple[EphemeralPostgres, str]]:
    """A PostgreSQL of its own where the role `dispatcher` must give its password (scram)."""
    cluster = EphemeralPostgres(durable=False)
    cluster.start()
    try:
        assert cluster.data_dir is not None
        hba = cluster.data_dir / "pg_hba.conf"
        hba.write_text("host all dispatcher 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        conn = await asyncpg.connect(cluster.dsn)
        await conn.execute("CREATE ROLE dispatcher LOGIN SUPERUSER PASSWORD 'pw-5f1c9e'")
        await conn.execute("SELECT pg_reload_conf()")
        await conn.close()
        yield cluster, cluster.dsn.replace("postgres@", "dispatcher@", 1)
    finally:
        cluster.cleanup()


async def test_the_credential_password_authenticates_and_a_wrong_one_is_not_echoed(
    password_cluster: tuple[EphemeralPostgres, str], tmp_path: Path
) -> None:
    _, dsn = password_cluster
    (tmp_path / "db-password").write_text("pw-5f1c9e\n")
    env = {"DISPATCHER_DATABASE_DSN": dsn, "CREDENTIALS_DIRECTORY": str(tmp_path)}
    config = load_config(None, environ=env)
    await migrate(config.database)
    conn = await connect(config.database)
    assert await conn.fetchval("SELECT current_user") == "dispatcher"
    await conn.close()
    # A daemon on it: the pool and the listener both authenticate with the file's password.
    test_config = replace(make_config(dsn, "webhooks"), database=config.database)
    daemon = await RunningDaemon(Dispatcher(test_config)).ready()
    await wait_until(lambda: daemon.dispatcher.listener.connected, message="listener")
    await daemon.stop()
    (tmp_path / "db-password").write_text("not-the-password\n")
    with pytest.raises(DatabaseError) as failed:
        await connect(config.database)
    assert "password authentication failed" in str(failed.value)
    assert "not-the-password" not in str(failed.value)
    bare = load_config(None, environ={"DISPATCHER_DATABASE_DSN": dsn})
    with pytest.raises(DatabaseError, match="password"):
        await connect(bare.database)
