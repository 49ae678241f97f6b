"""Peer: pgqueuer doing the dispatcher's job (same events, same PostgreSQL, same receiver).

Like drain, the whole backlog is queued (pgqueuer's batch enqueue) before the worker process
(`python -m bench.pgq_worker`) starts. A few settings are tried on a smaller backlog first; the
best one then drains the full backlog. Each run gets a pgqueuer installation of its own, in a
fresh schema with its own NOTIFY channel, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING

import asyncpg
import orjson

from bench import procs
from bench.harness import Context, CpuMeter, payload
from dispatcher.signing import generate_secret

if TYPE_CHECKING:
    from pgqueuer import Queries

POLL_S = 0.5  # like drain: a cheap emptiness check; the rate comes from pgqueuer's log timestamps
ENQUEUE_CHUNK = 10_000
CALIBRATION_EVENTS = 10_000
ENTRYPOINT = "deliver"


@dataclass(frozen=True)
class PeerSetting:
    """One pgqueuer configuration: managers (one connection each) and their limits."""

    managers: int
    batch_size: int
    max_tasks: int
    """max_concurrent_tasks per manager (0: unlimited)."""
    concurrency_limit: int = 0
    """The entrypoint's concurrency_limit, enforced in SQL across workers (0: unlimited)."""

    @property
    def label(self) -> str:
        """A short description for tables."""
        text = f"{self.managers} mgr, batch {self.batch_size}"
        if self.max_tasks:
            text += f", max tasks {self.max_tasks}"
        if self.concurrency_limit:
            text += f", ep limit {self.concurrency_limit}"
        return text


# 256 in flight in total, like the drain endpoint's max_in_flight; pgqueuer's default batch is 10
# and it requires max_concurrent_tasks >= 2 x batch. Its own benchmark runs 5 managers.
SETTINGS = (
    PeerSetting(managers=1, batch_size=10, max_tasks=256),
    PeerSetting(managers=1, batch_size=64, max_tasks=256),
    PeerSetting(managers=1, batch_size=128, max_tasks=256),
    PeerSetting(managers=4, batch_size=32, max_tasks=64),
    PeerSetting(managers=1, batch_size=64, max_tasks=0, concurrency_limit=256),
)
SMOKE_SETTINGS = SETTINGS[:2]


@dataclass
class PeerRun:
    """One drain of a backlog by the pgqueuer worker with one setting."""

    setting: str
    managers: int
    batch_size: int
    max_tasks: int
    concurrency_limit: int
    events: int
    deliveries_per_s: float
    """From the worker's process start to pgqueuer's last logged success."""
    after_startup_per_s: float
    """From its first logged success to the last, without interpreter start-up."""
    seconds: float
    startup_s: float
    failed_jobs: int
    cores: dict[str, float] = field(default_factory=dict)
    worker_peak_rss_mb: float | None = None


@dataclass
class PeerResult:
    """The best setting on the full backlog, and every setting tried on the calibration one."""

    pgqueuer_version: str
    events: int
    deliveries_per_s: float
    best: PeerRun
    calibration_events: int
    calibration: list[PeerRun]


async def run_peer(
    ctx: Context, events: int, *, settings: tuple[PeerSetting, ...] = SETTINGS
) -> PeerResult:
    """Try every setting on a smaller backlog, then drain `events` with the fastest."""
    try:
        version = metadata.version("pgqueuer")
    except metadata.PackageNotFoundError:
        raise RuntimeError("pgqueuer is not installed (pip install -e '.[dev]')") from None
    calibration_events = min(CALIBRATION_EVENTS, max(1, events // 2))
    tried = [(s, await _drain(ctx, s, calibration_events)) for s in settings]
    choice, _ = max(tried, key=lambda pair: pair[1].deliveries_per_s)
    final = await _drain(ctx, choice, events)
    calibration = [run for _, run in tried]
    return PeerResult(
        version, events, final.deliveries_per_s, final, calibration_events, calibration
    )


def _queries(conn: asyncpg.Connection, schema: str, channel: str) -> Queries:
    from pgqueuer import AsyncpgDriver, Queries
    from pgqueuer.adapters.persistence.qb import (
        QueryBuilderEnvironment,
        QueryQueueBuilder,
        QuerySchedulerBuilder,
    )
    from pgqueuer.domain.settings import DBSettings
    from pgqueuer.domain.types import Channel

    db = DBSettings(db_schema=schema, channel=Channel(channel))
    return Queries(
        AsyncpgDriver(conn),
        qbe=QueryBuilderEnvironment(settings=db),
        qbq=QueryQueueBuilder(settings=db),
        qbs=QuerySchedulerBuilder(settings=db),
    )


async def _enqueue_backlog(conn: asyncpg.Connection, queries: Queries, schema: str, n: int) -> None:
    """The drain scenario's events as pgqueuer jobs, in bulk, then analyzed and checkpointed."""
    for start in range(1, n + 1, ENQUEUE_CHUNK):
        ids = range(start, min(n, start + ENQUEUE_CHUNK - 1) + 1)
        await queries.enqueue(
            [ENTRYPOINT] * len(ids), [orjson.dumps(payload(i)) for i in ids], [0] * len(ids)
        )
    await conn.execute(f"VACUUM (ANALYZE) {schema}.pgqueuer", timeout=600)
    await conn.execute("CHECKPOINT", timeout=600)


async def _drain(ctx: Context, setting: PeerSetting, events: int) -> PeerRun:
    """Install pgqueuer in a fresh schema, queue `events`, run the worker until none is left."""
    schema = f"bench_peer_{uuid.uuid4().hex[:6]}"
    channel = f"{schema}_ch"
    conn = await asyncpg.connect(ctx.dsn)
    try:
        queries = _queries(conn, schema, channel)
        await queries.install()
        await queries.optimize_autovacuum()  # pgqueuer's checklist: `pgq autovac` after install
        await _enqueue_backlog(conn, queries, schema, events)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGQUEUER_")}
        env.update(
            DSN=ctx.dsn,
            BENCH_PGQ_SECRET=generate_secret("standard"),
            PGQUEUER_SCHEMA=schema,
            PGQUEUER_CHANNEL=channel,
        )
        argv = [sys.executable, "-m", "bench.pgq_worker", "--url", ctx.receiver.url]
        argv += ["--managers", str(setting.managers), "--batch-size", str(setting.batch_size)]
        argv += ["--max-tasks", str(setting.max_tasks)]
        argv += ["--concurrency-limit", str(setting.concurrency_limit)]
        budget = 60 + events / 200
        argv += ["--max-seconds", str(budget + 30)]
        log_path = ctx.workdir / f"pgq-worker-{schema}.log"
        started_at = time.time()
        proc = procs.spawn(argv, log_path=log_path, env=env)
        meter = CpuMeter(ctx.cpu_sources(worker=lambda: procs.cpu_seconds(proc.pid)))
        meter.start()
        try:
            deadline = time.monotonic() + budget
            while await conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {schema}.pgqueuer)"):
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"the pgqueuer worker exited with {proc.returncode}:\n"
                        f"{procs.log_tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgqueuer drain of {events} events not done in time")
                await asyncio.sleep(POLL_S)
            cores = meter.cores()
            rss = procs.peak_rss_mb(proc.pid)
        finally:
            procs.stop(proc, timeout=30)
        row = await conn.fetchrow(
            "SELECT count(*) FILTER (WHERE status = 'successful') AS succeeded,"
            " count(*) FILTER (WHERE status = 'exception') AS failed,"
            " extract(epoch FROM min(created) FILTER (WHERE status = 'successful'))::float8"
            "   AS first_success,"
            " extract(epoch FROM max(created) FILTER (WHERE status = 'successful'))::float8"
            "   AS last_success"
            f" FROM {schema}.pgqueuer_log"
        )
        assert row is not None
        if row["succeeded"] != events:
            raise RuntimeError(
                f"pgqueuer: {row['succeeded']} of {events} jobs succeeded, {row['failed']} failed:"
                f"\n{procs.log_tail(log_path)}"
            )
        seconds = row["last_success"] - started_at
        steady = max(1e-6, row["last_success"] - row["first_success"])
        return PeerRun(
            setting=setting.label,
            managers=setting.managers,
            batch_size=setting.batch_size,
            max_tasks=setting.max_tasks,
            concurrency_limit=setting.concurrency_limit,
            events=events,
            deliveries_per_s=round(events / seconds, 1),
            after_startup_per_s=round(events / steady, 1),
            seconds=round(seconds, 3),
            startup_s=round(row["first_success"] - started_at, 3),
            failed_jobs=int(row["failed"]),
            cores=cores,
            worker_peak_rss_mb=None if rss is None else round(rss, 1),
        )
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
