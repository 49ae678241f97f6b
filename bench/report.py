"""What a run prints and keeps: the machine, a table per scenario, a summary, and the JSON."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.backend_cost import MODES, BackendCostResult
from bench.ceiling import CeilingResult
from bench.drain import DrainResult
from bench.latency import LatencyResult

_SHORT = {"dispatcher": "disp", "postgres": "pg", "receiver": "recv", "bench": "bench"}
_PACKAGES = ("loyalty-webhook-dispatcher", "aiohttp", "asyncpg", "uvloop", "orjson")


def machine_info(postgres_version: str) -> dict[str, Any]:
    """Cores, CPU model, memory, kernel and the versions that shape the numbers."""
    cpu_model = "unknown"
    memory_gb: float | None = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "postgres": postgres_version}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "nproc": usable or os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "versions": versions,
    }


def machine_text(machine: dict[str, Any], receiver: str) -> str:
    """The header of a run's output."""
    v = machine["versions"]
    return (
        f"machine: {machine['nproc']} cores, {machine['cpu_model']}, "
        f"{machine['memory_gb']} GB, Linux {machine['kernel']}\n"
        f"versions: dispatcher {v['loyalty-webhook-dispatcher']}, Python {v['python']}, "
        f"{v['postgres']}, aiohttp {v['aiohttp']}, asyncpg {v['asyncpg']}, uvloop {v['uvloop']}\n"
        f"receiver: {receiver}"
    )


def table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = ()
) -> str:
    """A plain-text table: numbers right-aligned under their headers, `left` columns not."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([title, line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _cores(cores: dict[str, float]) -> str:
    return " ".join(f"{_SHORT.get(k, k)} {v:.2f}" for k, v in cores.items())


def ceiling_table(r: CeilingResult, receiver: str) -> str:
    """One row per concurrency level."""
    rows = [
        [str(x.concurrency), _n(x.requests_per_s), _n(x.requests), str(x.errors), _cores(x.cores)]
        for x in r.runs
    ]
    headers = ["concurrency", "requests/s", "requests", "errors", "cores used"]
    return table(f"ceiling: plain aiohttp client -> {receiver}", headers, rows, left=[4])


def drain_table(r: DrainResult) -> str:
    """The drain's one row, and the profile's top functions when there is one."""
    rows = [
        [
            _n(r.events),
            _n(r.deliveries_per_s),
            _n(r.after_startup_per_s),
            _n(r.seconds, 2),
            _n(r.startup_s, 2),
            str(r.failed_attempts),
            _n(r.dispatcher_peak_rss_mb, 1),
            _cores(r.cores),
        ]
    ]
    headers = ["events", "deliveries/s", "after start-up/s", "seconds", "start-up s"]
    headers += ["failed attempts", "peak RSS MB", "cores used"]
    text = table(
        "drain: backlog in the outbox, one endpoint, dispatcher process", headers, rows, left=[7]
    )
    if r.profile and r.profile.get("samples"):
        p = r.profile
        text += (
            f"\n\nprofile of the dispatcher (py-spy, {p['samples']} busy samples, {p['raw_path']})"
        )
        own = [[f"{pct:.1f}%", name] for name, pct in p["top_self"][:12]]
        text += "\n" + table("own time", ["share", "function"], own, left=[1])
        packages = [[f"{pct:.1f}%", name] for name, pct in p["by_package"][:10]]
        text += "\n\n" + table("own time by package", ["share", "package"], packages, left=[1])
        inclusive = [[f"{pct:.1f}%", name] for name, pct in p["top_inclusive"][:15]]
        text += "\n\n" + table("with callees", ["share", "function"], inclusive, left=[1])
    return text


def latency_table(r: LatencyResult) -> str:
    """One row per offered rate."""
    rows = [
        [
            f"{p.load:.0%}",
            _n(p.target_per_s),
            _n(p.achieved_per_s),
            _n(p.events),
            _n(p.p50_ms, 1),
            _n(p.p99_ms, 1),
            _n(p.max_ms, 1),
            f"{_n(p.producer_lag_p99_ms, 1)} / {_n(p.producer_lag_max_ms, 1)}",
            _n(p.p99_from_schedule_ms, 1),
            _cores(p.cores),
        ]
        for p in r.points
    ]
    headers = ["load", "target/s", "achieved/s", "events", "p50 ms", "p99 ms", "max ms"]
    headers += ["producer lag p99/max ms", "p99 from schedule ms", "cores used"]
    title = (
        f"latency: insert -> 2xx recorded, open loop, {r.producers} producer connections, "
        f"{r.seconds_per_rate:g} s per rate; "
        f"drain rate {_n(r.drain_rate)}/s ({r.drain_rate_source})"
    )
    return table(title, headers, rows, left=[9])


def backend_cost_table(r: BackendCostResult) -> str:
    """One row per producer count, one column per trigger mode, with its ratio to no trigger."""
    rows = []
    for producers in sorted({c.producers for c in r.cells}):
        row = [str(producers)]
        for mode in MODES:
            cell = next(c for c in r.cells if c.producers == producers and c.mode == mode)
            ratio = "" if mode == "no trigger" else f" ({_n(cell.vs_no_trigger, 2)})"
            row.append(_n(cell.inserts_per_s) + ratio)
        rows.append(row)
    headers = ["producers", "no trigger/s", "busy/s (ratio)", "idle, notifying/s (ratio)"]
    runs = (
        f"median of {r.rounds} interleaved runs of {r.seconds_per_run:g} s per cell"
        if r.rounds > 1
        else f"one run of {r.seconds_per_run:g} s per cell"
    )
    title = f"backend cost: single-row inserts, one per transaction, {r.client}; {runs}"
    return table(title, headers, rows)


def summary_table(summary: dict[str, float | None]) -> str:
    """The headline numbers and ratios of the run."""
    rows = [
        [name, "-" if v is None else f"{v:,.2f}" if v < 100 else f"{v:,.0f}"]
        for name, v in summary.items()
    ]
    return table("summary", ["what", "value"], rows, left=[0])


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write the run's results, creating the directory if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
