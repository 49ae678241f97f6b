"""Drain: a backlog already in the outbox, the dispatcher started after; deliveries per second."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bench import procs
from bench.harness import (
    Context,
    CpuMeter,
    DaemonProcess,
    add_endpoint,
    connect,
    drop_schema,
    fresh_schema,
    insert_backlog,
    start_daemon,
    stop_all,
)
from bench.profiling import PySpy

POLL_S = 0.5  # each check costs PostgreSQL a few ms of scanning; the rate comes from timestamps

_DONE = """
SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE fanned_out_at IS NULL)
   AND NOT EXISTS (SELECT 1 FROM deliveries WHERE status IN ('pending', 'delivering'))
"""
# Sends beyond one per delivery: successes recorded twice, and any attempt past the first.
_EXTRA = """
SELECT count(*) FILTER (WHERE decision = 'succeeded')
         - count(DISTINCT delivery_id) FILTER (WHERE decision = 'succeeded') AS duplicates,
       count(*) - count(DISTINCT delivery_id) AS extra
FROM attempts
"""
_STATS = """
SELECT count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) AS deliveries,
       extract(epoch FROM max(completed_at))::float8 AS last_success,
       extract(epoch FROM min(created_at))::float8 AS first_fan_out
FROM deliveries
"""


@dataclass
class DrainResult:
    """How fast a backlog of `events` went out, and what it cost each process."""

    events: int
    deliveries_per_s: float
    """From the dispatcher's process start to the last success recorded (the headline)."""
    after_startup_per_s: float
    """From its first fan-out to the last success: the rate without interpreter start-up."""
    seconds: float
    startup_s: float
    failed_attempts: int
    cores: dict[str, float] = field(default_factory=dict)
    dispatcher_peak_rss_mb: float | None = None
    """The highest of the dispatcher processes' peaks."""
    profile: dict[str, Any] | None = None
    processes: int = 1
    duplicate_successes: int = 0
    """Attempts recorded as 'succeeded' beyond one per delivery (should be 0)."""
    extra_attempts: int = 0
    """Attempts beyond one per delivery, whatever their decision."""
    concurrency: int = 0
    """The dispatcher's [delivery] concurrency (and the endpoint's max_in_flight)."""
    cpu_us_per_delivery: dict[str, float] = field(default_factory=dict)
    """CPU each process spent per delivery, in microseconds: cost, not speed, so it varies
    less than the rate when the machine is shared."""


async def run_drain(
    ctx: Context, events: int, *, profile: bool = False, label: str = "drain", processes: int = 1
) -> DrainResult:
    """Queue `events` events, start the dispatcher (`processes` of them on the same schema, for
    the replicas scenario), wait until every event has succeeded."""
    config = await fresh_schema(ctx.dsn, label)
    conn = await connect(config)
    try:
        await add_endpoint(conn, ctx.receiver.url, ctx.concurrency)
        await insert_backlog(conn, events)
        daemons: list[DaemonProcess] = []
        spy: PySpy | None = None
        try:
            for k in range(processes):
                name = label if processes == 1 else f"{label}-{k + 1}"
                daemon = start_daemon(config, ctx.workdir, name, concurrency=ctx.concurrency)
                daemons.append(daemon)
            daemon = daemons[0]
            if processes == 1:
                sources = {"dispatcher": daemon.cpu_seconds}
            else:
                sources = {f"disp{k + 1}": d.cpu_seconds for k, d in enumerate(daemons)}
            meter = CpuMeter(ctx.cpu_sources(**sources))
            meter.start()
            deadline = time.monotonic() + 60 + events / 200
            while not await conn.fetchval(_DONE):
                for d in daemons:
                    d.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"drain of {events} events not finished by the deadline")
                if (
                    profile
                    and spy is None
                    and await conn.fetchval("SELECT EXISTS (SELECT 1 FROM deliveries)")
                ):
                    ctx.results_dir.mkdir(parents=True, exist_ok=True)
                    out = ctx.results_dir / f"{ctx.stamp}-drain-profile.txt"
                    spy = PySpy(daemon.pid, out, log_path=ctx.workdir / "py-spy.log")
                    if not spy.start():
                        ctx.notes.append("--profile: py-spy is not installed (pip install py-spy)")
                await asyncio.sleep(POLL_S)
            cores = meter.cores()
            peaks = [r for d in daemons if (r := d.peak_rss_mb()) is not None]
            rss = max(peaks) if peaks else None
            summary = spy.stop() if spy is not None else None
            if spy is not None and summary is None:
                ctx.notes.append(f"py-spy wrote no profile: {procs.log_tail(spy.log_path, 3)}")
        finally:
            stop_all(daemons)
        row = await conn.fetchrow(_STATS)
        extra = await conn.fetchrow(_EXTRA)
        assert row is not None
        assert extra is not None
        failed = await conn.fetchval("SELECT count(*) FROM attempts WHERE decision <> 'succeeded'")
        if row["succeeded"] != events:
            raise RuntimeError(f"{row['succeeded']} of {events} deliveries succeeded")
        seconds = row["last_success"] - daemon.started_at
        steady = row["last_success"] - row["first_fan_out"]
        return DrainResult(
            events=events,
            deliveries_per_s=round(events / seconds, 1),
            after_startup_per_s=round(events / steady, 1),
            seconds=round(seconds, 3),
            startup_s=round(row["first_fan_out"] - daemon.started_at, 3),
            failed_attempts=int(failed),
            cores=cores,
            dispatcher_peak_rss_mb=None if rss is None else round(rss, 1),
            profile=None if summary is None else asdict(summary),
            processes=processes,
            duplicate_successes=int(extra["duplicates"]),
            extra_attempts=int(extra["extra"]),
            concurrency=ctx.concurrency,
            cpu_us_per_delivery={
                name: round(c * seconds / events * 1e6, 1) for name, c in cores.items()
            },
        )
    finally:
        await drop_schema(conn, config)
        await conn.close()
