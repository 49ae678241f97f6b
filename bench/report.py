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
from bench.fairness import FairnessResult, FairnessRun
from bench.latency import STAGE_NAMES, LatencyResult
from bench.ordered import OrderedResult, StuckRun
from bench.peer import PeerResult, PeerRun
from bench.replicas import ReplicasResult
from bench.scale import ScaleResult

_SHORT = {"dispatcher": "disp", "postgres": "pg", "receiver": "recv", "bench": "bench"}
# PostgreSQL's CPU split by client (the latency scenario): shown inside the "pg" figure.
_PG_SPLIT = {"pg_inserts": "inserts", "pg_dispatcher": "dispatcher"}
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
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([title, line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _n(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _cores(cores: dict[str, float]) -> str:
    split = " + ".join(f"{name} {cores[k]:.2f}" for k, name in _PG_SPLIT.items() if k in cores)
    parts = [
        f"{_SHORT.get(k, k)} {v:.2f}" + (f" ({split})" if k == "postgres" and split else "")
        for k, v in cores.items()
        if k not in _PG_SPLIT
    ]
    return " ".join(parts)


def ceiling_table(r: CeilingResult, receiver: str) -> str:
    """One row per concurrency level, then the dispatcher's sender at the best one."""
    clients = {
        "session": "ClientSession.post",
        "session after drain": "ClientSession.post, after the drain",
        "sender": "dispatcher Sender",
    }
    rows = [
        [
            clients.get(x.client, x.client),
            str(x.concurrency),
            _n(x.requests_per_s),
            _n(x.requests),
            str(x.errors),
            _cores(x.cores),
        ]
        for x in r.runs
    ]
    headers = ["client", "concurrency", "requests/s", "requests", "errors", "cores used"]
    return table(f"ceiling: plain aiohttp client -> {receiver}", headers, rows, left=[0, 5])


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
            _n(r.cpu_us_per_delivery.get("dispatcher"), 0),
            _n(r.cpu_us_per_delivery.get("postgres"), 0),
            _cores(r.cores),
        ]
    ]
    headers = ["events", "deliveries/s", "after start-up/s", "seconds", "start-up s"]
    headers += ["failed attempts", "peak RSS MB", "disp CPU us/dlv", "pg CPU us/dlv", "cores used"]
    title = (
        "drain: backlog in the outbox, one endpoint, dispatcher process"
        f" ([delivery] concurrency {r.concurrency}, endpoint max_in_flight {r.concurrency})"
    )
    text = table(title, headers, rows, left=[9])
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
            p.label,
            _n(p.target_per_s),
            _n(p.achieved_per_s),
            "" if p.machine_load is None else f"{p.machine_load:.0%}",
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
    headers = ["load", "target/s", "achieved/s", "machine", "events", "p50 ms", "p99 ms"]
    headers += ["max ms", "producer lag p99/max ms", "p99 from schedule ms", "cores used"]
    title = (
        f"latency: insert -> 2xx recorded, open loop, {r.producers} producer connections, "
        f"{r.seconds_per_rate:g} s per rate; "
        f"drain rate {_n(r.drain_rate)}/s ({r.drain_rate_source})"
    )
    if r.insert_capacity is not None:
        title += (
            f"\nthe producers' own ceiling (closed loop, no dispatcher): {_n(r.insert_capacity)}"
            f" inserts/s, {_cores(r.insert_capacity_cores)}; live capacity"
            f" 1 / (1 / ceiling + 1 / drain) = {_n(r.live_capacity)}/s; machine = the share of"
            " the machine a rate should take at those costs (rate / ceiling + rate / drain)"
        )
    stage_rows = [
        [p.label]
        + [f"{_n(p.stages_ms[name][0], 1)} / {_n(p.stages_ms[name][1], 1)}" for name in STAGE_NAMES]
        for p in r.points
        if p.stages_ms
    ]
    stages = table(
        "latency by stage, p50 / p99 ms: insert to fan-out (commit, wait for a claim), fan-out to"
        " send, HTTP, response to write-back",
        ["load", "to fan-out", "fan-out to send", "http", "to recorded"],
        stage_rows,
    )
    return table(title, headers, rows, left=[10]) + "\n\n" + stages


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
        f"median of {r.rounds} interleaved runs of {r.seconds_per_run:g} s per cell; each ratio"
        " the median of its rounds' ratios"
        if r.rounds > 1
        else f"one run of {r.seconds_per_run:g} s per cell"
    )
    title = f"backend cost: single-row inserts, one per transaction, {r.client}; {runs}"
    return table(title, headers, rows)


def peer_table(r: PeerResult) -> str:
    """One row per pgqueuer setting tried on the calibration backlog, then the full run."""

    def row(what: str, x: PeerRun) -> list[str]:
        return [
            what,
            x.setting,
            _n(x.events),
            _n(x.deliveries_per_s),
            _n(x.after_startup_per_s),
            _n(x.seconds, 2),
            _n(x.startup_s, 2),
            str(x.failed_jobs),
            _n(x.worker_peak_rss_mb, 1),
            _cores(x.cores),
        ]

    rows = [row("calibration", x) for x in r.calibration] + [row("full (best)", r.best)]
    headers = ["run", "setting", "events", "deliveries/s", "after start-up/s", "seconds"]
    headers += ["start-up s", "failed jobs", "peak RSS MB", "cores used"]
    title = (
        f"peer: pgqueuer {r.pgqueuer_version} worker process (envelope, Standard Webhooks, "
        "aiohttp), backlog queued first"
    )
    return table(title, headers, rows, left=[0, 1, 9])


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


def scale_table(r: ScaleResult) -> str:
    """One drain per backlog size, then the large/small ratios and the large run's peak RSS."""
    rows = [
        [
            _n(x.events),
            _n(x.deliveries_per_s),
            _n(x.after_startup_per_s),
            _n(x.seconds, 2),
            _n(x.startup_s, 2),
            str(x.failed_attempts),
            _n(x.dispatcher_peak_rss_mb, 1),
            _cores(x.cores),
        ]
        for x in r.runs
    ]
    headers = ["events", "deliveries/s", "after start-up/s", "seconds", "start-up s"]
    headers += ["failed attempts", "peak RSS MB", "cores used"]
    text = table("scale: the drain at each backlog size", headers, rows, left=[7])
    small, large = r.small_and_large
    return text + (
        f"\n{large:,} / {small:,} events (the median of its runs): {_n(r.rate_ratio, 3)}"
        " after start-up "
        f"({_n(r.headline_ratio, 3)} from process start; target >= 0.9); "
        f"peak RSS at {large:,}: {_n(r.large_peak_rss_mb, 1)} MB (target < 150)"
    )


def fairness_table(r: FairnessResult) -> str:
    """The run without and the run with hanging endpoints; only healthy deliveries measured."""

    def row(x: FairnessRun) -> list[str]:
        return [
            str(x.hanging_endpoints),
            _n(x.events),
            _n(x.healthy_events),
            _n(x.healthy_per_s),
            _n(x.healthy_per_s_from_start),
            str(x.healthy_failed_attempts),
            _n(x.healthy_offered_per_s),
            _n(x.p50_ms, 1),
            _n(x.p99_ms, 1),
            _n(x.max_ms, 1),
            f"{x.hanging_timeouts:,} / {x.hanging_attempts:,}",
            _cores(x.cores),
        ]

    headers = ["hanging", "events", "healthy", "healthy/s", "from start/s", "healthy failed"]
    headers += ["offered/s", "p50 ms", "p99 ms", "max ms", "hanging timed out / tries"]
    headers += ["cores used (drain)"]
    title = (
        f"fairness: {r.healthy_endpoints} healthy endpoints, alone and beside "
        f"{r.hanging_endpoints} that never answer (timeout {r.timeout_s:g} s); one tenant each, "
        f"backlog drain then {r.load:.0%} load for {r.latency_seconds:g} s"
    )
    runs = r.runs or [r.without, r.with_hanging]
    text = table(title, headers, [row(x) for x in runs], left=[11])
    w = r.with_hanging
    means = " (means over the runs of each kind, made in mirrored order)" if len(runs) > 2 else ""
    return text + (
        f"\nhealthy throughput with / without hanging: {_n(r.throughput_ratio, 3)} "
        f"(target >= 0.9); healthy p99 with / without: {_n(r.p99_ratio, 2)}{means}; "
        f"{w.hanging_timeouts:,} of {w.hanging_attempts:,} hanging attempts timed out "
        f"({w.hanging_connections:,} connections held)"
    )


def replicas_table(r: ReplicasResult) -> str:
    """One and two processes on the same backlog, their CPU each, and any duplicate sends."""
    rows = [
        [
            str(x.processes),
            _n(x.events),
            _n(x.deliveries_per_s),
            _n(x.after_startup_per_s),
            _n(x.seconds, 2),
            str(x.duplicate_successes),
            str(x.extra_attempts),
            _n(x.dispatcher_peak_rss_mb, 1),
            _cores(x.cores),
        ]
        for x in (r.one, r.two)
    ]
    headers = ["processes", "events", "deliveries/s", "after start-up/s", "seconds"]
    headers += ["duplicate sends", "extra attempts", "peak RSS MB", "cores used"]
    text = table("replicas: dispatcher processes sharing one schema", headers, rows, left=[8])
    return text + (
        f"\n2 / 1 processes: {_n(r.ratio, 3)} ({_n(r.after_startup_ratio, 3)} after start-up); "
        f"duplicate sends: {r.duplicate_sends}"
    )


def ordered_table(r: OrderedResult) -> str:
    """The three throughput drains with their ratio to unordered, then the stuck-key pair."""
    base = r.runs[0].after_startup_per_s
    rows = [
        [
            x.mode,
            "yes" if x.ordered else "no",
            _n(x.keys),
            _n(x.events),
            _n(x.deliveries_per_s),
            _n(x.after_startup_per_s),
            _n(x.after_startup_per_s / base, 3),
            _n(x.seconds, 2),
            str(x.failed_attempts),
            _n(x.key_overlaps),
            f"{_n(x.handovers)}: {_n(x.handover_p50_ms, 1)} / {_n(x.handover_p99_ms, 1)}",
            _n(x.cpu_us_per_delivery.get("dispatcher"), 0),
            _n(x.cpu_us_per_delivery.get("postgres"), 0),
            _cores(x.cores),
        ]
        for x in r.runs
    ]
    headers = ["run", "ordered", "keys", "events", "deliveries/s", "after start-up/s"]
    headers += ["vs unordered", "seconds", "failed attempts", "sent out of key order"]
    headers += ["key hand-overs: p50/p99 ms", "disp CPU us/dlv", "pg CPU us/dlv", "cores used"]
    title = (
        "ordered: one endpoint, backlog round-robin over ordering keys, dispatcher process"
        f" ([delivery] concurrency {r.concurrency}, endpoint max_in_flight {r.concurrency})"
    )
    text = table(title, headers, rows, left=[0, 13])

    def row(x: StuckRun) -> list[str]:
        return [
            "yes" if x.stuck else "no",
            _n(x.keys),
            _n(x.other_events),
            _n(x.other_per_s),
            _n(x.other_per_s_from_start),
            str(x.other_failed_attempts),
            _n(x.key_overlaps),
            _n(x.stuck_events),
            str(x.stuck_succeeded),
            str(x.stuck_head_attempts),
            str(x.stuck_later_sent),
            str(x.stuck_seen_by_receiver),
            _cores(x.cores),
        ]

    headers = ["key 0 failing", "keys", "other events", "other/s", "from start/s"]
    headers += ["other failed", "out of key order", "key 0 events", "key 0 succeeded"]
    headers += ["key 0 head tries", "key 0 later sent", "key 0 seen by receiver", "cores used"]
    title = (
        "ordered, stuck key: ordered endpoint, receiver in the benchmark process answering 500 to"
        " key 0's requests (second run) or 200 to all (first run)"
    )
    text += "\n\n" + table(title, headers, [row(r.without_stuck), row(r.with_stuck)], left=[12])
    w = r.with_stuck
    return text + (
        f"\nordered / unordered: {_n(r.many_keys_ratio, 3)} with {_n(r.runs[1].keys)} keys, "
        f"{_n(r.few_keys_ratio, 3)} with {_n(r.runs[2].keys)} keys (after start-up); "
        f"other keys with / without key 0 failing: {_n(r.stuck_ratio, 3)} (target about 1.0); "
        f"key 0: head tried {w.stuck_head_attempts}, {w.stuck_later_sent} of "
        f"{max(0, w.stuck_events - 1)} later events sent (should be 0)"
    )
