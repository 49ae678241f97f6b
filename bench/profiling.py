"""`--profile`: py-spy samples the dispatcher, to say where its time went, not only how fast."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs

_LINE = re.compile(r":\d+\)$")
_FILE = re.compile(r"\(([^():]+)[^()]*\)$")
# The frames every stack starts with (interpreter start-up, the CLI, the loop's run()): they
# carry no information about where the time went.
_BOILERPLATE = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "uvloop/__init__.py",
    "dispatcher/__main__.py",
    "dispatcher/cli.py",
)


@dataclass
class ProfileSummary:
    """The busiest functions: by own time (self) and with their callees (inclusive)."""

    samples: int
    raw_path: str
    top_self: list[tuple[str, float]] = field(default_factory=list)
    by_package: list[tuple[str, float]] = field(default_factory=list)
    top_inclusive: list[tuple[str, float]] = field(default_factory=list)


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the venv) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class PySpy:
    """py-spy record on one process, collapsed stacks to a file, stopped with SIGINT."""

    def __init__(self, pid: int, out: Path, *, log_path: Path, native: bool = False) -> None:
        self.pid = pid
        self.out = out
        self.log_path = log_path
        self.native = native
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        """Start sampling; False if py-spy is not installed."""
        exe = find_py_spy()
        if exe is None:
            return False
        argv = [exe, "record", "--pid", str(self.pid), "--format", "raw", "--rate", "250"]
        argv += ["--duration", "900", "--output", str(self.out)]
        # Without --native, sample without pausing the process (less disturbance); native
        # stacks need it paused.
        argv.append("--native" if self.native else "--nonblocking")
        self._proc = procs.spawn(argv, log_path=self.log_path)
        return True

    def stop(self) -> ProfileSummary | None:
        """Stop sampling, let py-spy write its file, and summarise it."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                procs.stop(self._proc, 5)
        if not self.out.exists():
            return None
        return summarize(self.out)


def summarize(path: Path, top: int = 15) -> ProfileSummary:
    """Read py-spy's collapsed stacks ("f1;f2;f3 count" per line) into the top functions."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        packages[_package(frames[-1])] += count
        for frame in set(frames):
            if not any(b in frame for b in _BOILERPLATE):
                inclusive[frame] += count
    if total == 0:
        return ProfileSummary(0, str(path))

    def pct(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return ProfileSummary(total, str(path), pct(own), pct(packages), pct(inclusive))


def _package(frame: str) -> str:
    """A frame's top-level package, to say which library the time went to."""
    # C code called from the loop's run() (uvloop, asyncpg's protocol) shows up as that frame.
    if "asyncio/runners.py" in frame:
        return "event loop internals (uvloop, asyncpg's C protocol)"
    found = _FILE.search(frame)
    if found is None:
        return "?"
    name = found.group(1).split("/")[0].removesuffix(".py")
    return name[len("<frozen ") : -1] if name.startswith("<frozen ") else name
