"""`dispatcher demo` end to end, as a user runs it: exit 0, a full report, nothing left running."""

from __future__ import annotations

import asyncio
import os
import pwd
import sys
from pathlib import Path

import pytest

from dispatcher.pgcluster import SERVER_USER, process_alive

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="finds leftover processes through /proc"
)

TIMEOUT = 90.0


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
    """The -D directory of the cluster a postgres process belongs to (it or its parent is the
    postmaster); None for an orphan, whose postmaster is gone."""
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
    return sorted(
        pid
        for pid, ppid in after.items()
        if pid not in before and ((d := _data_dir(pid, ppid)) is None or d.startswith(under))
    )


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


async def test_demo_runs_end_to_end_and_leaves_nothing_behind(tmp_path: Path) -> None:
    uid = _server_uid()
    before = _postgres_processes(uid)

    code, out, err = await _run_demo(tmp_path)

    assert code == 0, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    summary = out.partition("Per endpoint")[2]
    for name in ("healthy", "flaky", "dead"):
        assert f"\n  {name} " in summary, f"no {name} row in the summary:\n{out}"
    assert "healthy receiver: 20 Standard Webhooks signatures verified, 0 invalid" in out
    assert "Explore further" in out

    leftovers = _demo_leftovers(before, _postgres_processes(uid), tmp_path)
    assert leftovers == [], f"postgres processes of the demo still running: {leftovers}"
    assert os.listdir(tmp_path) == [], "the demo left files behind"
