"""`python -m bench`: one PostgreSQL, one receiver, every scenario, tables and a JSON file."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import asyncpg

from bench import report
from bench.backend_cost import BackendCostResult, run_backend_cost
from bench.ceiling import CeilingResult, run_ceiling, run_ceiling_again
from bench.drain import DrainResult, run_drain
from bench.fairness import FairnessResult, run_fairness
from bench.harness import DISPATCHER_CONCURRENCY, Context
from bench.latency import LatencyResult, run_latency
from bench.ordered import OrderedResult, run_ordered
from bench.peer import SETTINGS as PEER_SETTINGS
from bench.peer import SMOKE_SETTINGS as PEER_SMOKE_SETTINGS
from bench.peer import PeerResult, run_peer
from bench.receiver import Receiver, start_receiver
from bench.replicas import ReplicasResult, run_replicas
from bench.retention import RetentionResult, retention_table, run_retention
from bench.scale import ScaleResult, count_label, run_scale
from dispatcher.pgcluster import EphemeralPostgres

SCENARIOS = (
    "ceiling",
    "drain",
    "latency",
    "backend",
    "peer",
    "scale",
    "fairness",
    "replicas",
    "retention",
    "ordered",
)
RESULTS_DIR = Path(__file__).resolve().parent / "results"
CALIBRATION_EVENTS = 10_000
T = TypeVar("T")


@dataclass
class Settings:
    """Every option of a run; --smoke shrinks them so the whole run takes well under a minute."""

    events: int
    only: list[str]
    duration: float
    ceiling_seconds: float
    insert_seconds: float
    insert_rounds: int
    concurrency: list[int]
    loads: list[float]
    producers: list[int]
    drain_rate: float | None
    receiver: str
    install: bool
    profile: bool
    output: Path | None
    smoke: bool
    scale_events: list[int]
    fairness_events: int
    fairness_seconds: float
    fairness_load: float
    fairness_pairs: int
    replicas_events: int
    dispatcher_concurrency: int
    retention_rows: int = 1_000_000
    retention_batch: int = 5000
    ordered_events: int = 50_000
    live_loads: list[float] = field(default_factory=lambda: [0.5])


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of whole numbers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers of at least 1")
    return values


def _load_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of fractions") from None
    if not values or not all(0 < v <= 2 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give fractions in (0, 2], e.g. 0.5")
    return values


def _only(text: str) -> list[str]:
    names = [n.strip().replace("backend_cost", "backend") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown) or text!r}; choose from {', '.join(SCENARIOS)}"
        )
    return names


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be above 0")
    return value


def parse_args(argv: list[str] | None) -> Settings:
    """Options, with --smoke overriding sizes and durations."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--events", type=int, default=100_000, help="drain backlog (100000)")
    p.add_argument("--only", type=_only, default=list(SCENARIOS), help=",".join(SCENARIOS))
    p.add_argument("--duration", type=_positive, default=10.0, help="seconds per latency rate")
    p.add_argument("--ceiling-seconds", type=_positive, default=5.0, help="per concurrency")
    p.add_argument("--insert-seconds", type=_positive, default=4.0, help="per backend-cost run")
    p.add_argument("--insert-rounds", type=int, default=5, help="backend-cost runs per cell (5)")
    p.add_argument(
        "--concurrency", type=_int_list, default=[16, 64, 256], help="ceiling: 16,64,256"
    )
    p.add_argument("--loads", type=_load_list, default=[0.1, 0.5, 0.8], help="latency: 0.1,0.5,0.8")
    p.add_argument(
        "--live-loads",
        type=_load_list,
        default=[0.5],
        help="latency: fractions of the live capacity, offered after --loads (0.5)",
    )
    p.add_argument("--producers", type=_int_list, default=[1, 4, 16], help="backend: 1,4,16")
    p.add_argument(
        "--drain-rate", type=_positive, help="latency without drain: the rate to take fractions of"
    )
    p.add_argument("--receiver", choices=("auto", "nginx", "python"), default="auto")
    p.add_argument(
        "--no-install", action="store_true", help="do not apt-get install nginx when missing"
    )
    p.add_argument("--profile", action="store_true", help="py-spy the dispatcher during drain")
    p.add_argument("--output", type=Path, help="JSON path (default bench/results/<time>.json)")
    p.add_argument("--smoke", action="store_true", help="tiny run (CI): 2000 events, 1 s phases")
    p.add_argument(
        "--scale-events",
        type=_int_list,
        default=[10_000, 1_000_000],
        help="scale: backlog sizes, smallest and largest compared (10000,1000000)",
    )
    p.add_argument("--fairness-events", type=int, default=50_000, help="fairness backlog (50000)")
    p.add_argument("--fairness-seconds", type=_positive, default=10.0, help="fairness load phase")
    p.add_argument(
        "--fairness-load", type=_positive, default=0.5, help="fairness: of healthy drain rate"
    )
    p.add_argument(
        "--fairness-pairs", type=int, default=2, help="fairness: runs of each kind, mirrored (2)"
    )
    p.add_argument(
        "--dispatcher-concurrency",
        type=int,
        default=DISPATCHER_CONCURRENCY,
        help=f"the dispatcher's [delivery] concurrency ({DISPATCHER_CONCURRENCY})",
    )
    p.add_argument("--replicas-events", type=int, default=50_000, help="replicas backlog (50000)")
    p.add_argument(
        "--retention-rows",
        type=int,
        default=1_000_000,
        help="retention: old succeeded deliveries to prune (1000000)",
    )
    p.add_argument(
        "--retention-batch",
        type=int,
        default=5000,
        help="retention: [retention] batch, rows per statement (5000)",
    )
    p.add_argument(
        "--ordered-events",
        type=int,
        default=50_000,
        help="ordered: backlog of each of its five drains (50000)",
    )
    a = p.parse_args(argv)
    if len(set(a.scale_events)) < 2:
        p.error("--scale-events needs two different sizes, e.g. 10000,1000000")
    if a.fairness_events < 1 or a.replicas_events < 1 or a.ordered_events < 1:
        p.error("--fairness-events, --replicas-events and --ordered-events must be at least 1")
    if a.retention_rows < 1:
        p.error("--retention-rows must be at least 1")
    if not 1 <= a.retention_batch <= 100_000:
        p.error("--retention-batch must be between 1 and 100000")
    if not 1 <= a.dispatcher_concurrency <= 10_000:
        p.error("--dispatcher-concurrency must be between 1 and 10000")
    if a.events < 1:
        p.error("--events must be at least 1")
    settings = Settings(
        events=a.events,
        only=[n for n in SCENARIOS if n in a.only],
        duration=a.duration,
        ceiling_seconds=a.ceiling_seconds,
        insert_seconds=a.insert_seconds,
        insert_rounds=max(1, a.insert_rounds),
        concurrency=a.concurrency,
        loads=a.loads,
        producers=a.producers,
        drain_rate=a.drain_rate,
        receiver=a.receiver,
        install=not a.no_install,
        profile=a.profile,
        output=a.output,
        smoke=a.smoke,
        scale_events=a.scale_events,
        fairness_events=a.fairness_events,
        fairness_seconds=a.fairness_seconds,
        fairness_load=a.fairness_load,
        fairness_pairs=max(1, a.fairness_pairs),
        replicas_events=a.replicas_events,
        dispatcher_concurrency=a.dispatcher_concurrency,
        retention_rows=a.retention_rows,
        retention_batch=a.retention_batch,
        ordered_events=a.ordered_events,
        live_loads=a.live_loads,
    )
    if a.smoke:
        settings.events = min(settings.events, 2_000)
        settings.duration = settings.ceiling_seconds = settings.insert_seconds = 0.5
        # One cell per axis end is enough to prove the code runs; CI time is precious.
        settings.concurrency = settings.concurrency[-1:]
        settings.producers = [settings.producers[0], settings.producers[-1]]
        settings.insert_rounds = 1
        settings.install = False
        settings.scale_events = [1_000, 4_000]
        settings.fairness_events = min(settings.fairness_events, 1_000)
        settings.fairness_seconds = 1.0
        settings.fairness_pairs = 1
        settings.replicas_events = min(settings.replicas_events, 2_000)
        settings.retention_rows = min(settings.retention_rows, 5_000)
        settings.ordered_events = min(settings.ordered_events, 1_000)
    return settings


def _say(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def _show(text: str) -> None:
    print(f"\n{text}", flush=True)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every chosen scenario produced its numbers."""
    settings = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = settings.output or RESULTS_DIR / f"{stamp}.json"
    workdir = Path(tempfile.mkdtemp(prefix="dispatcher-bench-"))
    data: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "scenarios": {},
        "errors": {},
    }
    receiver: Receiver | None = None
    ok = False
    started = time.monotonic()
    try:
        _say("starting the receiver")
        receiver, note = start_receiver(settings.receiver, workdir, allow_install=settings.install)
        data["receiver"] = {"kind": receiver.kind, "description": receiver.description}
        if note:
            data["receiver"]["note"] = note
        _say("starting PostgreSQL (durable: default fsync and synchronous_commit)")
        with EphemeralPostgres(durable=True, settings={"max_connections": "200"}) as pg:
            ctx = Context(
                dsn=pg.dsn,
                postmaster_pid=pg.postmaster_pid,
                receiver=receiver,
                workdir=workdir,
                results_dir=RESULTS_DIR if settings.output is None else output.parent,
                stamp=stamp,
                concurrency=settings.dispatcher_concurrency,
            )
            ok = _run_loop(_run(settings, ctx, data, output))
    except (KeyboardInterrupt, SystemExit):
        data["errors"]["run"] = "interrupted"
        print("\ninterrupted", file=sys.stderr)
    except (RuntimeError, OSError) as exc:  # the receiver or PostgreSQL would not start
        data["errors"]["setup"] = f"{type(exc).__name__}: {exc}"
        print(f"bench: error: {data['errors']['setup']}", file=sys.stderr)
    finally:
        if receiver is not None:
            receiver.stop()
        data["seconds"] = round(time.monotonic() - started, 1)
        report.write_json(output, data)
        print(f"\nresults: {output} ({data['seconds']:.0f} s)", flush=True)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)
    return 0 if ok else 1


def _run_loop(coro: Coroutine[Any, Any, bool]) -> bool:
    try:
        import uvloop
    except ImportError:
        return bool(asyncio.run(coro))
    return bool(uvloop.run(coro))


async def _run(settings: Settings, ctx: Context, data: dict[str, Any], output: Path) -> bool:
    """Every chosen scenario in turn; one's failure is recorded and the others still run."""
    conn = await asyncpg.connect(ctx.dsn)
    try:
        version = "PostgreSQL " + str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()
    data["machine"] = report.machine_info(version)
    receiver_text = ctx.receiver.description
    if ctx.receiver.kind != "nginx":
        receiver_text += f" [fallback: {data['receiver'].get('note', 'chosen')}]"
    _show(report.machine_text(data["machine"], receiver_text))
    results = data["scenarios"]
    errors = data["errors"]

    async def scenario(name: str, job: Awaitable[T]) -> T | None:
        _say(f"{name} ...")
        try:
            result = await job
        except Exception as exc:  # noqa: BLE001 - recorded; the other scenarios still run
            errors[name] = f"{type(exc).__name__}: {exc}"
            print(f"\n{name} FAILED: {errors[name]}", file=sys.stderr, flush=True)
            return None
        results[name] = asdict(result)  # type: ignore[call-overload]
        report.write_json(output, data)
        return result

    s = settings
    ceiling: CeilingResult | None = None
    drain: DrainResult | None = None
    latency: LatencyResult | None = None
    backend: BackendCostResult | None = None
    if "ceiling" in s.only:
        ceiling = await scenario("ceiling", run_ceiling(ctx, s.concurrency, s.ceiling_seconds))
        if ceiling is not None:
            _show(report.ceiling_table(ceiling, ctx.receiver.description))
    if "drain" in s.only:
        drain = await scenario("drain", run_drain(ctx, s.events, profile=s.profile))
        if drain is not None:
            _show(report.drain_table(drain))
        if ceiling is not None and drain is not None:
            again = run_ceiling_again(ctx, ceiling, s.ceiling_seconds)
            ceiling = await scenario("ceiling", again) or ceiling
            _show(report.ceiling_table(ceiling, ctx.receiver.description))
    if "latency" in s.only:
        rate, source = await _drain_rate(s, ctx, drain)
        if rate is not None:
            latency = await scenario(
                "latency",
                run_latency(ctx, s.loads, s.duration, rate, source, s.live_loads),
            )
        else:
            errors["latency"] = "no drain rate to take fractions of (calibration failed)"
        if latency is not None:
            _show(report.latency_table(latency))
    if "backend" in s.only:
        backend = await scenario(
            "backend_cost", run_backend_cost(ctx, s.insert_seconds, s.producers, s.insert_rounds)
        )
        if backend is not None:
            _show(report.backend_cost_table(backend))
    peer: PeerResult | None = None
    if "peer" in s.only:
        peer_settings = PEER_SMOKE_SETTINGS if s.smoke else PEER_SETTINGS
        peer = await scenario("peer", run_peer(ctx, s.events, settings=peer_settings))
        if peer is not None:
            _show(report.peer_table(peer))
    scale: ScaleResult | None = None
    fairness: FairnessResult | None = None
    replicas: ReplicasResult | None = None
    if "scale" in s.only:
        scale = await scenario("scale", run_scale(ctx, s.scale_events))
        if scale is not None:
            _show(report.scale_table(scale))
    if "fairness" in s.only:
        job = run_fairness(
            ctx, s.fairness_events, s.fairness_seconds, s.fairness_load, s.fairness_pairs
        )
        fairness = await scenario("fairness", job)
        if fairness is not None:
            _show(report.fairness_table(fairness))
    if "replicas" in s.only:
        replicas = await scenario("replicas", run_replicas(ctx, s.replicas_events))
        if replicas is not None:
            _show(report.replicas_table(replicas))
    retention: RetentionResult | None = None
    if "retention" in s.only:
        retention = await scenario(
            "retention", run_retention(ctx, s.retention_rows, s.retention_batch)
        )
        if retention is not None:
            _show(retention_table(retention))
    ordered: OrderedResult | None = None
    if "ordered" in s.only:
        ordered = await scenario("ordered", run_ordered(ctx, s.ordered_events))
        if ordered is not None:
            _show(report.ordered_table(ordered))
    summary = _summary(ceiling, drain, latency, backend)
    summary.update(_more_summary(scale, fairness, replicas))
    summary.update(_peer_summary(peer, drain))
    summary.update(_retention_summary(retention))
    summary.update(_ordered_summary(ordered))
    data["summary"] = summary
    if ctx.notes:
        data["notes"] = ctx.notes
        _show("notes:\n" + "\n".join(f"- {n}" for n in ctx.notes))
    _show(report.summary_table(summary))
    return not errors


async def _drain_rate(
    s: Settings, ctx: Context, drain: DrainResult | None
) -> tuple[float | None, str]:
    if drain is not None:
        return drain.deliveries_per_s, "drain scenario"
    if s.drain_rate is not None:
        return s.drain_rate, "--drain-rate"
    n = min(s.events, CALIBRATION_EVENTS)
    _say(f"latency: calibrating with a drain of {n} events")
    try:
        calibration = await run_drain(ctx, n)
    except Exception as exc:  # noqa: BLE001 - reported as the latency scenario's error
        ctx.notes.append(f"calibration drain failed: {exc}")
        return None, ""
    return calibration.deliveries_per_s, f"calibration drain of {n:,} events"


def _summary(
    ceiling: CeilingResult | None,
    drain: DrainResult | None,
    latency: LatencyResult | None,
    backend: BackendCostResult | None,
) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    if ceiling is not None:
        out["ceiling requests/s"] = ceiling.bracketing_requests_per_s
    if drain is not None:
        out["drain deliveries/s"] = drain.deliveries_per_s
    if ceiling is not None and drain is not None:
        ceiling_rate = ceiling.bracketing_requests_per_s
        out["drain / ceiling"] = round(drain.deliveries_per_s / ceiling_rate, 3)
        if ceiling.sender_requests_per_s:
            out["drain / sender loop"] = round(
                drain.deliveries_per_s / ceiling.sender_requests_per_s, 3
            )
    if latency is not None:
        for p in latency.points:
            what = f"{p.label} capacity" if p.basis == "live" else f"{p.label} load"
            out[f"latency at {what}: p50 ms"] = p.p50_ms
            out[f"latency at {what}: p99 ms"] = p.p99_ms
            if p.machine_load is not None:
                out[f"machine share at {what} (estimated)"] = p.machine_load
    if backend is not None:
        top = max(c.producers for c in backend.cells)
        for c in backend.cells:
            if c.producers == top and c.mode != "no trigger":
                out[f"inserts/s at {top} producers, {c.mode} / no trigger"] = c.vs_no_trigger
    return out


def _peer_summary(peer: PeerResult | None, drain: DrainResult | None) -> dict[str, float | None]:
    """pgqueuer's rate on the same job, and the dispatcher's relative to it."""
    if peer is None:
        return {}
    out: dict[str, float | None] = {"peer deliveries/s": peer.deliveries_per_s}
    if drain is not None:
        out["drain / peer"] = round(drain.deliveries_per_s / peer.deliveries_per_s, 3)
    return out


def _more_summary(
    scale: ScaleResult | None, fairness: FairnessResult | None, replicas: ReplicasResult | None
) -> dict[str, float | None]:
    """Headline ratios of the scale, fairness and replicas scenarios."""
    out: dict[str, float | None] = {}
    if scale is not None:
        small, large = (count_label(n) for n in scale.small_and_large)
        out[f"scale: {large} / {small} rate"] = scale.rate_ratio
        out["scale: peak RSS MB"] = scale.large_peak_rss_mb
    if fairness is not None:
        out["fairness: healthy throughput with/without hanging"] = fairness.throughput_ratio
        out["fairness: healthy p99 with/without hanging"] = fairness.p99_ratio
        out["fairness: hanging attempts timed out"] = fairness.with_hanging.hanging_timeouts
    if replicas is not None:
        out["replicas: 2 / 1"] = replicas.ratio
        out["replicas: duplicate sends"] = replicas.duplicate_sends
    return out


def _retention_summary(r: RetentionResult | None) -> dict[str, float | None]:
    """The full pass's speed and the inserts' latency during it."""
    if r is None:
        return {}
    return {
        "retention: deliveries deleted/s": r.deliveries_per_s,
        "retention: slowest statement ms": r.full.slowest_statement_ms,
        "retention: insert p99 ms before": r.baseline.p99_ms,
        "retention: insert p99 ms during": r.during.p99_ms,
        "retention: insert max ms during": r.during.max_ms,
        "retention: inserts seen waiting on a lock during": r.during.lock_waits,
    }


def _ordered_summary(r: OrderedResult | None) -> dict[str, float | None]:
    """Ordered delivery's cost on one endpoint, and the other keys' rate beside a stuck key."""
    if r is None:
        return {}
    ordered_runs = [x.key_overlaps for x in r.runs if x.ordered]
    out_of_order = sum(ordered_runs) + r.without_stuck.key_overlaps + r.with_stuck.key_overlaps
    return {
        "ordered: many keys / unordered": r.many_keys_ratio,
        "ordered: few keys / unordered": r.few_keys_ratio,
        "ordered: other keys with / without a stuck key": r.stuck_ratio,
        "ordered: stuck key's later events sent": r.with_stuck.stuck_later_sent,
        "ordered: deliveries sent out of key order": out_of_order,
    }
