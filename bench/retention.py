"""Retention: one full prune pass over a million old deliveries, and what it costs the backend's
concurrent single-row inserts into the outbox meanwhile."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import asyncpg

from bench.harness import (
    BACKLOG_BATCH,
    EVENT_TYPE,
    PAYLOAD_SQL,
    TENANT,
    Context,
    CpuMeter,
    add_endpoint,
    connect,
    drop_schema,
    fresh_schema,
)
from bench.report import _cores, _n, table
from dispatcher.config import DatabaseConfig, RetentionConfig
from dispatcher.db import connect_kwargs
from dispatcher.retention import PassResult, prune_pass

# One event in KEPT_EVERY gets a failed delivery, younger than the failed retention: it stays,
# with its attempts and event, and every pass walks past it.
KEPT_EVERY = 21
PRODUCERS = 4
INSERT_PERIOD_S = 0.008  # per producer: 125 inserts/s each, 500/s in all
BASELINE_S = 5.0
SLOW_MS = 10.0
SAMPLE_EVERY_S = 0.003
PRODUCER_APP = "bench-producer"
# What the producers' backends are waiting on while an insert runs, sampled: a row or relation
# lock ("Lock:...") would mean the pass holds them up; WAL flushes mean they share the disk.
_WAITS = """
SELECT coalesce(wait_event_type || ':' || wait_event, 'running') AS what
FROM pg_stat_activity
WHERE application_name = $1 AND state = 'active'
"""

_SEED_EVENTS = f"""
INSERT INTO outbox (tenant, event_type, payload, created_at, fanned_out_at)
SELECT $1, $2, {PAYLOAD_SQL}, t, t
FROM generate_series($3::bigint, $4::bigint) AS i,
     LATERAL (SELECT now() - interval '10 days' + i * interval '1 ms') AS at (t)
"""
# Every event gets one delivery: succeeded 10 days ago (pruned), or every KEPT_EVERY-th failed
# 8 days ago (kept); one attempt each.
_SEED_DELIVERIES = """
INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, attempts, next_attempt_at,
                        last_attempt_at, last_status_code, created_at, completed_at)
SELECT o.seq, o.event_id, $1, s.status, 1, o.fanned_out_at, o.fanned_out_at,
       CASE WHEN s.status = 'succeeded' THEN 200 ELSE 500 END, o.fanned_out_at,
       CASE WHEN s.status = 'succeeded' THEN o.fanned_out_at + interval '50 ms'
            ELSE now() - interval '8 days' END
FROM outbox o,
     LATERAL (SELECT CASE WHEN o.seq % $4 = 0 THEN 'failed' ELSE 'succeeded' END) AS s (status)
WHERE o.seq BETWEEN $2 AND $3
"""
_SEED_ATTEMPTS = """
INSERT INTO attempts (delivery_id, event_id, endpoint_id, attempt, attempted_at, duration_ms,
                      status_code, response_excerpt, decision)
SELECT d.id, d.event_id, d.endpoint_id, 1, d.completed_at - interval '20 ms', 20,
       d.last_status_code, 'ok', d.status
FROM deliveries d
WHERE d.event_seq BETWEEN $1 AND $2
"""
_INSERT = "INSERT INTO outbox (tenant, event_type, payload) VALUES ($1, $2, $3)"
_COUNTS = """
SELECT (SELECT count(*) FROM deliveries) AS deliveries,
       (SELECT count(*) FROM attempts) AS attempts,
       (SELECT count(*) FROM outbox WHERE fanned_out_at IS NOT NULL) AS outbox
"""


@dataclass
class InsertLatency:
    """Single-row outbox inserts by PRODUCERS connections, each its own transaction."""

    inserts: int
    per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    over_10ms: int
    waits: dict[str, int] = field(default_factory=dict)
    """Samples of the producers' backends in the middle of an insert, by what they waited on."""
    lock_waits: int = 0
    """Of those, samples waiting on a lock (of any kind but lightweight ones)."""


@dataclass
class PassTiming:
    """One prune pass: how long, how many statements, the slowest of them, what it deleted."""

    seconds: float
    statements: int
    slowest_statement_ms: float
    deliveries: int
    attempts: int
    outbox: int


@dataclass
class RetentionResult:
    """A full pass over `succeeded` old deliveries (with `kept` failed ones among them)."""

    succeeded: int
    kept: int
    batch: int
    seed_s: float
    full: PassTiming
    deliveries_per_s: float
    """Deliveries deleted per second by the full pass (with their attempts and events)."""
    resumed: PassTiming
    """A pass right after, resuming where the full one ended: the daemon's usual pass."""
    full_again: PassTiming
    """A full pass with nothing left to delete: the walk past the kept rows, hourly."""
    baseline: InsertLatency
    during: InsertLatency
    vacuum_s: float
    wal_mb: float
    """WAL the full pass wrote: what the inserts' commits queue behind."""
    """A plain VACUUM of the three tables afterwards: the work the deletes leave to autovacuum
    (index entries and dead rows), which runs in the background, throttled."""
    cores: dict[str, float] = field(default_factory=dict)


class _Producers:
    """PRODUCERS connections inserting one event each INSERT_PERIOD_S, recording latencies."""

    def __init__(self, config: DatabaseConfig) -> None:
        self._config = config
        self._conns: list[asyncpg.Connection] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.latencies: list[float] = []
        self.waits: dict[str, int] = {}
        self._stop = asyncio.Event()

    async def start(self) -> None:
        kwargs = connect_kwargs(self._config)
        kwargs["server_settings"] = {**kwargs["server_settings"], "application_name": PRODUCER_APP}
        self._conns = [await asyncpg.connect(**kwargs) for _ in range(PRODUCERS + 1)]
        self._tasks = [asyncio.create_task(self._run(c)) for c in self._conns[:PRODUCERS]]
        self._tasks.append(asyncio.create_task(self._sample(self._conns[-1])))

    async def _sample(self, conn: asyncpg.Connection) -> None:
        await conn.execute("SET application_name = 'bench-sampler'")
        while not self._stop.is_set():
            for row in await conn.fetch(_WAITS, PRODUCER_APP):
                self.waits[row["what"]] = self.waits.get(row["what"], 0) + 1
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def _run(self, conn: asyncpg.Connection) -> None:
        payload = '{"customer_id":"cust_1","amount":150,"new_balance":2350}'
        next_at = time.monotonic()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            await conn.execute(_INSERT, TENANT, EVENT_TYPE, payload)
            self.latencies.append((time.perf_counter() - t0) * 1000)
            next_at += INSERT_PERIOD_S
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def take(self, seconds: float) -> InsertLatency:
        """The latencies recorded since the last take, over `seconds` of wall time."""
        got, self.latencies = sorted(self.latencies), []
        waits, self.waits = self.waits, {}
        if not got:
            return InsertLatency(0, 0.0, 0.0, 0.0, 0.0, 0)
        return InsertLatency(
            waits=dict(sorted(waits.items(), key=lambda kv: -kv[1])),
            lock_waits=sum(n for what, n in waits.items() if what.startswith("Lock:")),
            inserts=len(got),
            per_s=round(len(got) / seconds, 1),
            p50_ms=round(got[len(got) // 2], 2),
            p99_ms=round(got[min(len(got) - 1, int(len(got) * 0.99))], 2),
            max_ms=round(got[-1], 2),
            over_10ms=sum(1 for x in got if x > SLOW_MS),
        )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for c in self._conns:
            await c.close()


async def _seed(conn: asyncpg.Connection, endpoint_id: int, events: int) -> None:
    for first in range(1, events + 1, BACKLOG_BATCH):
        last = min(events, first + BACKLOG_BATCH - 1)
        await conn.execute(_SEED_EVENTS, TENANT, EVENT_TYPE, first, last, timeout=600)
        await conn.execute(_SEED_DELIVERIES, endpoint_id, first, last, KEPT_EVERY, timeout=600)
        await conn.execute(_SEED_ATTEMPTS, first, last, timeout=600)
    for name in ("outbox", "deliveries", "attempts"):
        await conn.execute(f"VACUUM (ANALYZE) {name}", timeout=600)
    await conn.execute("CHECKPOINT", timeout=600)


def _checked(result: PassResult | None) -> PassResult:
    if result is None:
        raise RuntimeError("the pruning lock was taken: another process is pruning this schema")
    return result


def _timing(result: PassResult) -> PassTiming:
    c = result.counts
    return PassTiming(
        round(result.seconds, 3),
        c.statements,
        round(c.slowest_s * 1000, 1),
        c.deliveries,
        c.attempts,
        c.outbox,
    )


async def run_retention(ctx: Context, succeeded: int, batch: int = 5000) -> RetentionResult:
    """Seed `succeeded` old succeeded deliveries (and a few kept failed ones), then time a full
    pass as the daemon runs it (synchronous_commit off) while producers insert events."""
    config = await fresh_schema(ctx.dsn, "retention")
    # The event number i is 1-based: every KEPT_EVERY-th is kept, so this many events give
    # `succeeded` succeeded deliveries.
    events = succeeded + succeeded // (KEPT_EVERY - 1)
    retention = RetentionConfig(batch=batch)
    conn = await connect(config)
    pruner = await connect(config)
    producers = _Producers(config)
    try:
        await pruner.execute("SET synchronous_commit = off")
        endpoint_id = await add_endpoint(conn, ctx.receiver.url, 8)
        t0 = time.monotonic()
        await _seed(conn, endpoint_id, events)
        seed_s = time.monotonic() - t0
        seeded = await conn.fetchrow(_COUNTS)
        assert seeded is not None
        if tuple(seeded.values()) != (events, events, events):
            raise RuntimeError(f"seeding made {dict(seeded)}, expected {events} of each")
        await producers.start()
        await asyncio.sleep(BASELINE_S)
        baseline = producers.take(BASELINE_S)
        meter = CpuMeter(ctx.cpu_sources())
        meter.start()
        t0 = time.monotonic()
        wal_at = await pruner.fetchval("SELECT pg_current_wal_lsn()")
        full = _checked(await prune_pass(pruner, retention, config.schema))
        wal_mb = (
            float(await pruner.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", wal_at)) / 1e6
        )
        during = producers.take(time.monotonic() - t0)
        cores = meter.cores()
        await producers.stop()
        resumed = _checked(await prune_pass(pruner, retention, config.schema, resume=full.resume))
        full_again = _checked(await prune_pass(pruner, retention, config.schema))
        t0 = time.monotonic()
        await conn.execute("VACUUM outbox, deliveries, attempts", timeout=600)
        vacuum_s = time.monotonic() - t0
        after = await conn.fetchrow(_COUNTS)
        assert after is not None
        kept = int(after["deliveries"])
        if kept != events - succeeded:
            raise RuntimeError(f"{kept} deliveries left, expected {events - succeeded}")
        timing = _timing(full)
        return RetentionResult(
            succeeded=succeeded,
            kept=kept,
            batch=batch,
            seed_s=round(seed_s, 1),
            full=timing,
            deliveries_per_s=round(timing.deliveries / max(timing.seconds, 1e-6)),
            resumed=_timing(resumed),
            full_again=_timing(full_again),
            baseline=baseline,
            during=during,
            vacuum_s=round(vacuum_s, 2),
            wal_mb=round(wal_mb),
            cores=cores,
        )
    finally:
        await producers.stop()
        await pruner.close()
        await drop_schema(conn, config)
        await conn.close()


def retention_table(r: RetentionResult) -> str:
    """The three passes, then insert latency before and during the full one."""
    passes = [
        [
            what,
            _n(x.seconds, 2),
            _n(x.statements),
            _n(x.slowest_statement_ms, 1),
            _n(x.deliveries),
            _n(x.attempts),
            _n(x.outbox),
        ]
        for what, x in (
            ("full pass", r.full),
            ("resumed pass right after", r.resumed),
            ("full pass, nothing to delete", r.full_again),
        )
    ]
    title = (
        f"retention: {r.succeeded:,} succeeded deliveries 10 days old (1 attempt and 1 event each)"
        f" and {r.kept:,} failed 8 days old (kept), [retention] batch {r.batch}"
    )
    headers = ["pass", "seconds", "statements", "slowest ms", "deliveries", "attempts", "events"]
    text = table(title, headers, passes, left=[0])
    inserts = [
        [
            what,
            _n(x.inserts),
            _n(x.per_s),
            _n(x.p50_ms, 2),
            _n(x.p99_ms, 2),
            _n(x.max_ms, 2),
            _n(x.over_10ms),
            _n(sum(x.waits.values())),
            _n(x.lock_waits),
        ]
        for what, x in (("before", r.baseline), ("during the full pass", r.during))
    ]
    headers = ["single-row outbox inserts", "inserts", "per s", "p50 ms", "p99 ms", "max ms"]
    headers += [f"over {SLOW_MS:.0f} ms", "samples", "waiting on a lock"]
    text += "\n\n" + table(
        f"{PRODUCERS} producers, one insert each {INSERT_PERIOD_S * 1000:.0f} ms",
        headers,
        inserts,
        left=[0],
    )
    for what, x in (("before", r.baseline), ("during", r.during)):
        top = ", ".join(f"{k} {v}" for k, v in list(x.waits.items())[:6])
        text += f"\nproducers' backends mid-insert, {what}: {top or 'no samples'}"
    return text + (
        f"\nfull pass: {_n(r.deliveries_per_s)} deliveries/s deleted, {_n(r.wal_mb)} MB of WAL; "
        f"cores used {_cores(r.cores)}; VACUUM of the tables afterwards {r.vacuum_s:.1f} s;"
        f" seeding took {r.seed_s:.0f} s"
    )
