"""Latency: insert-to-2xx-recorded percentiles under an open-loop producer at fixed rates.

The rates are fractions of the drain rate, which is measured with the backlog inserted
beforehand: the producers' own cost (their single-row transactions, durable commits and the
Python client) never weighed on it. On a machine they share with the dispatcher they can take
as much again, so the scenario first measures the producers' own ceiling (closed loop, nothing
else running) and reports for each rate how much of the machine it should take, inserting and
delivering together (`machine_load`), and it also offers fractions of the *live capacity*, the
rate at which inserting and delivering together would fill the machine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import orjson

from bench import procs
from bench.harness import (
    EVENT_TYPE,
    TENANT,
    Context,
    CpuMeter,
    add_endpoint,
    closed_loop_inserts,
    connect,
    drop_schema,
    fresh_schema,
    payload,
    start_daemon,
    wait_idle_listener,
)

PRODUCERS = 16
SETTLE_S = 1.0
# How long the producers' closed-loop ceiling is measured (at most; never longer than a rate).
CAPACITY_SECONDS = 5.0
_START_DELAY_S = 0.05

_INSERT = (
    "INSERT INTO outbox (tenant, event_type, payload, occurred_at) VALUES ($1, $2, $3::jsonb, $4)"
)
# occurred_at holds the producer's schedule, so created_at - occurred_at is how late an insert
# started: the producer's own lag, reported to show whether the schedule was kept; p99 from the
# schedule (lag + latency) is the figure free of coordinated omission.
STATS = """
SELECT count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
       max(ms) AS max,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS lag_p99,
       max(lag) AS lag_max,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag + ms) AS scheduled_p99
FROM (SELECT extract(epoch FROM d.completed_at - o.created_at)::float8 * 1000 AS ms,
             extract(epoch FROM o.created_at - o.occurred_at)::float8 * 1000 AS lag
      FROM outbox o JOIN deliveries d ON d.event_seq = o.seq
      WHERE o.seq > $1 AND o.seq <= $2 AND d.status = 'succeeded') AS s
"""


# Where the time went, stage by stage: the insert's transaction start to the fan-out's (the
# producer's commit and the wait for the next claim), the fan-out's to the dispatcher's
# attempt start (the statement and the hand-over to a task), the HTTP exchange, and its end to
# the write-back's transaction start. PostgreSQL's now() and the dispatcher's clock, one host.
STAGES = """
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM d.created_at - o.created_at)::float8 * 1000) AS to_fan_out,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM a.attempted_at - d.created_at)::float8 * 1000)
           AS fan_out_to_send,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY a.duration_ms::float8) AS http,
       percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (
           ORDER BY extract(epoch FROM d.completed_at - a.attempted_at)::float8 * 1000
                    - a.duration_ms) AS to_recorded
FROM outbox o
JOIN deliveries d ON d.event_seq = o.seq
JOIN attempts a ON a.delivery_id = d.id AND a.decision = 'succeeded'
WHERE o.seq > $1 AND o.seq <= $2
"""
STAGE_NAMES = ("to_fan_out", "fan_out_to_send", "http", "to_recorded")


@dataclass
class LatencyPoint:
    """One offered rate: how long events took from insert to a recorded 2xx."""

    load: float
    """The offered rate as a fraction of `basis`'s rate."""
    target_per_s: float
    achieved_per_s: float
    events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    producer_lag_p99_ms: float
    producer_lag_max_ms: float
    p99_from_schedule_ms: float
    cores: dict[str, float] = field(default_factory=dict)
    stages_ms: dict[str, list[float]] = field(default_factory=dict)
    """p50 and p99 of each stage (STAGES), in ms."""
    basis: str = "drain"
    """What `load` is a fraction of: "drain" (the drain rate) or "live" (the live capacity)."""
    machine_load: float | None = None
    """The share of the machine this rate should take, inserting and delivering together:
    rate / producers' ceiling + rate / drain rate. A floor: both cost more per event at lower
    rates (smaller batches, less group commit)."""

    @property
    def label(self) -> str:
        """The load as the tables name it: "50%" of the drain rate, "50% of live" capacity."""
        return f"{self.load:.0%}" + (" of live" if self.basis == "live" else "")


@dataclass
class LatencyResult:
    """Every rate tried, and the drain rate they are fractions of."""

    drain_rate: float
    drain_rate_source: str
    seconds_per_rate: float
    producers: int
    points: list[LatencyPoint]
    insert_capacity: float | None = None
    """The producers' own ceiling: closed-loop single-row inserts/s, nothing else running."""
    insert_capacity_cores: dict[str, float] = field(default_factory=dict)
    live_capacity: float | None = None
    """1 / (1 / insert_capacity + 1 / drain_rate): the rate that inserting and delivering
    together would fill the machine with, if their costs simply add up."""


# PostgreSQL's CPU split by who asked for it: the producers' backends (the backend's inserts
# and their commits, which also write and flush the WAL of everything before them) and the
# dispatcher's. Backends are told apart by application_name (bench.harness and dispatcher.db
# set it); the rest (checkpointer, WAL writer, ...) is what remains of "pg".
_BACKENDS = (
    "SELECT pid, application_name FROM pg_stat_activity WHERE backend_type = 'client backend'"
)
_SPLIT = {"bench": "pg_inserts", "webhook-dispatcher": "pg_dispatcher"}


async def _pg_cpu_by_client(conn: asyncpg.Connection) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of every client backend whose application we know, by pid."""
    out: dict[int, tuple[str, float]] = {}
    for r in await conn.fetch(_BACKENDS):
        name = _SPLIT.get(r["application_name"])
        seconds = procs.cpu_seconds(r["pid"], tree=False) if name else None
        if name is not None and seconds is not None:
            out[r["pid"]] = (name, seconds)
    return out


def _pg_split(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], wall: float
) -> dict[str, float]:
    """Cores each client's backends used between two readings; a backend seen in only one of
    them counts nothing."""
    used = dict.fromkeys(_SPLIT.values(), 0.0)
    for pid, (name, seconds) in after.items():
        used[name] += seconds - before.get(pid, (name, seconds))[1]
    return {name: round(v / max(wall, 1e-9), 3) for name, v in used.items()}


async def run_latency(
    ctx: Context,
    fractions: list[float],
    seconds: float,
    drain_rate: float,
    source: str,
    live_fractions: Sequence[float] = (),
) -> LatencyResult:
    """Measure the producers' ceiling, start the dispatcher, then offer each rate (fractions of
    the drain rate, then of the live capacity) for `seconds` and measure its latencies."""
    capacity, capacity_cores = await insert_capacity(ctx, min(seconds, CAPACITY_SECONDS))
    live = 1 / (1 / capacity + 1 / drain_rate) if capacity > 0 else None
    offered = [("drain", f, f * drain_rate) for f in fractions]
    if live is not None:
        offered += [("live", f, f * live) for f in live_fractions]
    config = await fresh_schema(ctx.dsn, "latency")
    conn = await connect(config)
    producers: list[asyncpg.Connection] = []
    try:
        await add_endpoint(conn, ctx.receiver.url, ctx.concurrency)
        producers = [await connect(config) for _ in range(PRODUCERS)]
        daemon = start_daemon(config, ctx.workdir, "latency", concurrency=ctx.concurrency)
        try:
            await wait_idle_listener(conn, daemon)
            points = []
            for basis, fraction, offered_rate in offered:
                await asyncio.sleep(SETTLE_S)
                rate = max(1.0, offered_rate)
                meter = CpuMeter(ctx.cpu_sources(dispatcher=daemon.cpu_seconds))
                pg_before = await _pg_cpu_by_client(conn)
                started = time.monotonic()
                meter.start()
                first = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox")
                achieved, n = await produce(producers, rate, seconds)
                last = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox")
                await wait_delivered(conn, daemon.check_alive, first, last, n, drain_rate)
                cores = meter.cores()
                cores |= _pg_split(
                    pg_before, await _pg_cpu_by_client(conn), time.monotonic() - started
                )
                row = await conn.fetchrow(STATS, first, last)
                assert row is not None
                stages = await conn.fetchrow(STAGES, first, last)
                assert stages is not None
                points.append(
                    LatencyPoint(
                        load=fraction,
                        target_per_s=round(rate, 1),
                        achieved_per_s=round(achieved, 1),
                        events=int(row["n"]),
                        p50_ms=round(row["p50"], 2),
                        p99_ms=round(row["p99"], 2),
                        max_ms=round(row["max"], 2),
                        producer_lag_p99_ms=round(row["lag_p99"], 2),
                        producer_lag_max_ms=round(row["lag_max"], 2),
                        p99_from_schedule_ms=round(row["scheduled_p99"], 2),
                        cores=cores,
                        stages_ms={
                            name: [round(v, 2) for v in stages[name] or (0.0, 0.0)]
                            for name in STAGE_NAMES
                        },
                        basis=basis,
                        machine_load=(
                            round(rate / capacity + rate / drain_rate, 3) if capacity > 0 else None
                        ),
                    )
                )
        finally:
            daemon.stop()
        return LatencyResult(
            round(drain_rate, 1),
            source,
            seconds,
            PRODUCERS,
            points,
            insert_capacity=round(capacity, 1),
            insert_capacity_cores=capacity_cores,
            live_capacity=round(live, 1) if live is not None else None,
        )
    finally:
        for p in producers:
            await p.close()
        await drop_schema(conn, config)
        await conn.close()


async def insert_capacity(ctx: Context, seconds: float) -> tuple[float, dict[str, float]]:
    """The producers' own ceiling: as many connections and the same payloads as the latency
    runs, one event per transaction in a closed loop for `seconds`, into a schema of its own
    that no dispatcher watches. Returns inserts/s and the cores each process used meanwhile."""
    config = await fresh_schema(ctx.dsn, "capacity")
    texts = [orjson.dumps(payload(i)).decode() for i in range(1000)]
    meter = CpuMeter(ctx.cpu_sources())
    try:
        meter.start()
        rate = await closed_loop_inserts(config, PRODUCERS, seconds, texts)
        return rate, meter.cores()
    finally:
        conn = await connect(config)
        try:
            await drop_schema(conn, config)
        finally:
            await conn.close()


async def produce(
    conns: list[asyncpg.Connection],
    rate: float,
    seconds: float,
    tenants: Sequence[str] = (TENANT,),
) -> tuple[float, int]:
    """Insert events on the clock's schedule (open loop), round-robin over `tenants`; returns the
    rate achieved and the count."""
    # Several connections share the schedule, so one slow commit does not hold up the next.
    loop = asyncio.get_running_loop()
    n = max(1, round(rate * seconds))
    texts = [orjson.dumps(payload(i)).decode() for i in range(1000)]
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    t0 = loop.time() + _START_DELAY_S
    wall0 = time.time() + _START_DELAY_S

    async def insert(conn: asyncpg.Connection) -> None:
        while (item := await queue.get()) is not None:
            i, offset = item
            scheduled = datetime.fromtimestamp(wall0 + offset, UTC)
            tenant = tenants[i % len(tenants)]
            await conn.execute(_INSERT, tenant, EVENT_TYPE, texts[i % 1000], scheduled, timeout=30)

    workers = [asyncio.create_task(insert(c)) for c in conns]
    try:
        for i in range(n):
            offset = i / rate
            delay = t0 + offset - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait((i, offset))
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
    finally:
        for w in workers:
            w.cancel()
    elapsed = loop.time() - t0
    return (n / elapsed if elapsed > 0 else float(n)), n


async def wait_delivered(
    conn: asyncpg.Connection,
    check_alive: Callable[[], None],
    first: int,
    last: int,
    n: int,
    drain_rate: float,
) -> None:
    """Wait until `n` deliveries of outbox rows (first, last] have succeeded (bounded by a
    deadline that grows with n)."""
    deadline = time.monotonic() + 30 + 3 * n / max(drain_rate, 1.0)
    while True:
        done = await conn.fetchval(
            "SELECT count(*) FROM deliveries WHERE event_seq > $1 AND event_seq <= $2"
            " AND status = 'succeeded'",
            first,
            last,
        )
        if done >= n:
            return
        check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {n} events delivered by the deadline")
        await asyncio.sleep(0.1)
