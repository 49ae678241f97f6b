"""`dispatcher demo` end to end, as a user runs it: exit 0, a full report, nothing left running."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispatcher.demo import Progress, _Rate
from dispatcher.pgcluster import SERVER_USER, process_alive

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds leftover processes through /proc"
)

TIMEOUT = 90.0


@pytest.fixture
def demo_tmp() -> Iterator[Path]:
    """The demo's TMPDIR, outside pytest's basetemp: a pytest session starting meanwhile (others
    share this host) tightens pytest-of-<user> to 0700, cutting the server account off (initdb)."""
    path = Path(tempfile.mkdtemp(prefix="dispatcher-demo-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _server_uid() -> int:
    """The uid PostgreSQL runs as: the dispatcher_pg system user when we are root, else us."""
    if os.geteuid() != 0:
        return os.geteuid()
    return pwd.getpwnam(SERVER_USER).pw_uid


def _postgres_processes(uid: int) -> dict[int, int]:
    """Live `postgres` processes owned by `uid`, as pid -> parent pid."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid or (entry / "comm").read_text().strip() != "postgres":
                continue
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        pid = int(entry.name)
        if process_alive(pid):
            found[pid] = int(stat.rpartition(")")[2].split()[1])
    return found


def _argv(pid: int | None) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")]


def _data_dir(pid: int, ppid: int) -> str | None:
    """The data directory of the cluster a postgres process belongs to: its working directory
    (every server process, initdb's bootstrap ones too, runs in it; " (deleted)" once removed),
    else the -D of it or its parent, the postmaster; None if neither can be read."""
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/cwd")
    for argv in (_argv(pid), _argv(ppid)):
        if "-D" in argv[:-1]:
            return argv[argv.index("-D") + 1]
    return None


def _demo_leftovers(before: dict[int, int], after: dict[int, int], tmp: Path) -> list[int]:
    """New postgres processes not shown to belong to someone else's cluster.

    Other tests, and other test sessions on this host, start and stop clusters of their own
    meanwhile; those are told apart by their data directory, which is not under `tmp`.
    """
    under = f"{tmp.resolve()}{os.sep}"

    def ours(pid: int, ppid: int) -> bool:
        data_dir = _data_dir(pid, ppid)
        if data_dir is None:
            return process_alive(pid)  # unreadable: only a process that is gone is excused
        return data_dir.startswith(under)

    return sorted(pid for pid, ppid in after.items() if pid not in before and ours(pid, ppid))


async def _run_demo(tmp: Path) -> tuple[int, str, str]:
    """Run `python -m dispatcher demo --events 20` with its temporary files under `tmp`."""
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "demo",
        "--events",
        "20",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


PROGRESS_LINE = re.compile(
    r"^  +\d+\.\ds  delivered \d+ \(\d+/s\)  retrying \d+  failed \d+  pending \d+"
)


def _summary_rows(out: str) -> dict[str, list[str]]:
    """The per-endpoint table's rows, by endpoint name: the cells after the header line."""
    lines = out.partition("Per endpoint")[2].splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["ENDPOINT", "URL"])
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        rows[cells[0]] = cells
    return rows


async def test_demo_runs_end_to_end_and_leaves_nothing_behind(demo_tmp: Path) -> None:
    uid = _server_uid()
    before = _postgres_processes(uid)

    code, out, err = await _run_demo(demo_tmp)

    assert code == 0, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    # Not a terminal: plain progress lines, no carriage returns or escape codes.
    progress = [line for line in out.splitlines() if PROGRESS_LINE.match(line)]
    assert progress, f"no progress lines:\n{out}"
    assert not {"\r", "\x1b"} & set(out), "control codes in non-terminal output"
    rows = _summary_rows(out)
    assert sorted(rows) == ["dead", "flaky", "healthy"], f"summary rows:\n{out}"
    for name, cells in rows.items():
        # ENDPOINT URL DELIVERED RETRYING FAILED ATTEMPTS P50 P99
        assert len(cells) == 8, cells
        delivered, retrying, failed, attempts = map(int, cells[2:6])
        assert retrying == 0, cells
        assert attempts >= delivered + failed, cells
        if name == "dead":
            # Nothing delivered, so no latency to show; every delivery failed after its retries.
            assert (delivered, cells[6:]) == (0, ["-", "-"]), cells
            assert failed > 0, cells
        else:
            assert (delivered > 0, failed) == (True, 0), cells
            p50, p99 = map(float, cells[6:])
            assert 0 < p50 <= p99, cells
    assert int(rows["healthy"][2]) == 20
    assert "healthy receiver: 20 Standard Webhooks signatures verified, 0 invalid" in out
    assert "Explore further" in out
    assert "dispatcher delivery list --endpoint" in out

    leftovers = _demo_leftovers(before, _postgres_processes(uid), demo_tmp)
    assert leftovers == [], f"postgres processes of the demo still running: {leftovers}"
    assert os.listdir(demo_tmp) == [], "the demo left files behind"


async def test_sigterm_mid_run_cleans_up_like_ctrl_c(demo_tmp: Path) -> None:
    uid = _server_uid()
    before = _postgres_processes(uid)
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "dispatcher", "demo", "--events", "2000"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TMPDIR": str(demo_tmp)},
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(TIMEOUT):
            while not PROGRESS_LINE.match((await proc.stdout.readline()).decode()):
                pass  # the daemon is delivering: stop it mid-run
            proc.terminate()
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "stopped by SIGTERM" in err.decode()
    leftovers = _demo_leftovers(before, _postgres_processes(uid), demo_tmp)
    assert leftovers == [], f"postgres processes of the demo still running: {leftovers}"
    assert os.listdir(demo_tmp) == [], "the demo left files behind"


def test_progress_rate_is_over_the_last_second() -> None:
    rate = _Rate(window=1.0)
    assert rate.update(0.0, 0) == 0.0
    assert rate.update(0.5, 50) == 100.0
    assert rate.update(1.0, 100) == 100.0
    assert rate.update(1.5, 100) == 50.0  # 50 since the reading at 0.5
    assert rate.update(2.5, 100) == 0.0


def test_progress_settles_only_when_every_delivery_is_finished() -> None:
    def reading(**counts: int) -> Progress:
        zero = dict.fromkeys(("delivered", "retrying", "pending", "failed", "paused"), 0)
        return Progress(**{**zero, **counts}, attempts=0, unrouted=0, elapsed=1.0)

    assert not reading().settled  # nothing fanned out yet
    assert not reading(delivered=3, retrying=1).settled
    assert not reading(delivered=3, paused=1).settled
    assert reading(delivered=3, failed=1).settled
    assert reading(delivered=3, failed=1).bar(width=4) == "[###x]"
