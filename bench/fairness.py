"""Fairness: do a few endpoints that never answer slow down the healthy ones beside them?

Two runs, each on a fresh schema with one tenant per endpoint (so every event goes to exactly
one endpoint): 100 healthy endpoints alone, then the same 100 plus 5 that accept the request and
never answer. Each run drains a backlog spread round-robin over every endpoint, then offers an
open-loop load; only the healthy endpoints' deliveries are measured.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import asyncpg

from bench.harness import (
    Context,
    CpuMeter,
    DaemonProcess,
    connect,
    drop_schema,
    fresh_schema,
    insert_backlog,
    poll_until,
    start_daemon,
)
from bench.latency import PRODUCERS, STATS, produce, wait_delivered
from dispatcher.config import DeliveryConfig
from dispatcher.signing import generate_secret

HEALTHY = 100
HANGING = 5
HOST = "127.0.0.1"
HOLD_MAX_S = 120.0  # the hanging server drops a connection after this (the client gives up first)
POLL_S = 0.5

_DONE = """
SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE fanned_out_at IS NULL)
   AND NOT EXISTS (SELECT 1 FROM deliveries
                   WHERE status IN ('pending', 'delivering') AND endpoint_id = ANY ($1::bigint[]))
"""
_HEALTHY_STATS = """
SELECT count(*) FILTER (WHERE status = 'succeeded' AND endpoint_id = ANY ($1::bigint[]))
           AS succeeded,
       extract(epoch FROM max(completed_at) FILTER (WHERE status = 'succeeded'
                                                     AND endpoint_id = ANY ($1::bigint[])))::float8
           AS last_success,
       extract(epoch FROM min(created_at))::float8 AS first_fan_out
FROM deliveries
"""
_ATTEMPTS = """
SELECT count(*) AS attempts,
       count(*) FILTER (WHERE error = 'timeout') AS timeouts,
       count(*) FILTER (WHERE decision <> 'succeeded') AS failed
FROM attempts WHERE endpoint_id = ANY ($1::bigint[])
"""


@dataclass
class FairnessRun:
    """One run: the healthy endpoints' backlog drain and latency, and what the hanging ones did."""

    hanging_endpoints: int
    events: int
    healthy_events: int
    healthy_per_s: float
    """Healthy deliveries/s from the first fan-out to the last healthy success."""
    healthy_per_s_from_start: float
    """The same from the dispatcher's process start (the drain scenario's headline)."""
    healthy_seconds: float
    healthy_failed_attempts: int
    healthy_offered_per_s: float
    """The open-loop load offered to the healthy endpoints (the same in both runs)."""
    achieved_per_s: float
    """Inserts/s the producer achieved, every endpoint's share included."""
    latency_events: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    p99_from_schedule_ms: float
    hanging_attempts: int
    hanging_timeouts: int
    hanging_connections: int
    """Connections the hanging server accepted (each held until the dispatcher gave up)."""
    cores: dict[str, float] = field(default_factory=dict)
    """During the backlog drain."""


@dataclass
class FairnessResult:
    """Both runs and how the healthy endpoints fared with the hanging ones beside them."""

    healthy_endpoints: int
    hanging_endpoints: int
    timeout_s: float
    load: float
    latency_seconds: float
    without: FairnessRun
    """The first run without the hanging endpoints (the latency columns' source)."""
    with_hanging: FairnessRun
    """The first run with them."""
    throughput_ratio: float
    """Healthy deliveries/s with the hanging endpoints / without (target at least 0.9), each the
    mean over its runs."""
    p99_ratio: float
    runs: list[FairnessRun] = field(default_factory=list)
    """Every run in the order made: without, with, with, without, ... (pairs, mirrored)."""


class HangServer:
    """A local HTTP endpoint that accepts connections, reads the requests and never answers."""

    def __init__(self) -> None:
        self.connections = 0
        self.url = ""
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        self._server = await asyncio.start_server(self._hold, HOST, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{port}"

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read until the client gives up (or HOLD_MAX_S passes); never write a byte."""
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self.connections += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HOLD_MAX_S
        try:
            while (left := deadline - loop.time()) > 0:
                try:
                    data = await asyncio.wait_for(reader.read(65536), left)
                except TimeoutError:
                    break
                if not data:
                    break
        except OSError:
            pass
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def close(self) -> None:
        """Stop listening and drop every held connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)


async def run_fairness(
    ctx: Context, events: int, seconds: float, load: float, pairs: int = 1
) -> FairnessResult:
    """Runs without and with the hanging endpoints, `pairs` of each, in the order without,
    with, with, without, ... so that a machine speeding up or slowing down over the scenario
    (this shared one does, by a fifth within minutes) weighs on both sides alike. Every run
    offers the healthy endpoints the same load: `load` times the first run's healthy drain rate.
    """
    hang = HangServer()
    await hang.start()
    runs: list[FairnessRun] = []
    try:
        offered: float | None = None
        for i in range(2 * pairs):
            hanging = i % 4 in (1, 2)
            run = await _run(ctx, events, seconds, load, hang if hanging else None, offered)
            offered = run.healthy_offered_per_s
            runs.append(run)
    finally:
        await hang.close()
    without = [r for r in runs if not r.hanging_endpoints]
    with_hanging = [r for r in runs if r.hanging_endpoints]
    return FairnessResult(
        healthy_endpoints=HEALTHY,
        hanging_endpoints=HANGING,
        timeout_s=DeliveryConfig().timeout,
        load=load,
        latency_seconds=seconds,
        without=without[0],
        with_hanging=with_hanging[0],
        throughput_ratio=round(
            _mean(with_hanging, "healthy_per_s") / _mean(without, "healthy_per_s"), 3
        ),
        p99_ratio=round(_mean(with_hanging, "p99_ms") / _mean(without, "p99_ms"), 3),
        runs=runs,
    )


def _mean(runs: list[FairnessRun], name: str) -> float:
    return sum(float(getattr(r, name)) for r in runs) / len(runs)


async def _add_endpoints(conn: asyncpg.Connection, urls: dict[str, str]) -> list[int]:
    """One endpoint per tenant (default settings: 8 in flight, the 5 s timeout); their ids."""
    rows = await conn.fetch(
        "INSERT INTO endpoints (tenant, url, secret)"
        " SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) RETURNING id",
        list(urls),
        list(urls.values()),
        [generate_secret("standard") for _ in urls],
    )
    return [int(r["id"]) for r in rows]


async def _run(
    ctx: Context,
    events: int,
    seconds: float,
    load: float,
    hang: HangServer | None,
    healthy_rate: float | None,
) -> FairnessRun:
    """One run on a fresh schema; `hang` adds the hanging endpoints, `healthy_rate` fixes the
    load offered to the healthy ones (None: `load` times this run's own healthy drain rate)."""
    config = await fresh_schema(ctx.dsn, "fairness")
    conn = await connect(config)
    producers: list[asyncpg.Connection] = []
    try:
        healthy_urls = {f"fair-h{n:03d}": f"{ctx.receiver.url}/ep/{n}" for n in range(HEALTHY)}
        healthy = await _add_endpoints(conn, healthy_urls)
        hanging: list[int] = []
        tenants = list(healthy_urls)
        if hang is not None:
            hanging_urls = {f"fair-x{n}": f"{hang.url}/ep/{n}" for n in range(HANGING)}
            hanging = await _add_endpoints(conn, hanging_urls)
            # Spread the hanging tenants through the rotation rather than bunching them.
            step = len(tenants) // HANGING
            for k, tenant in enumerate(hanging_urls):
                tenants.insert(k * (step + 1), tenant)
        await insert_backlog(conn, events, tenants=tenants)
        healthy_tenants = list(healthy_urls)
        healthy_events = int(
            await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE tenant = ANY ($1::text[])", healthy_tenants
            )
        )
        producers = [await connect(config) for _ in range(PRODUCERS)]
        connections_before = hang.connections if hang is not None else 0
        daemon = start_daemon(
            config, ctx.workdir, f"fairness-{len(hanging)}-hanging", concurrency=ctx.concurrency
        )
        try:
            meter = CpuMeter(ctx.cpu_sources(dispatcher=daemon.cpu_seconds))
            meter.start()
            await _wait_done(conn, daemon, healthy, events)
            cores = meter.cores()
            row = await conn.fetchrow(_HEALTHY_STATS, healthy)
            assert row is not None
            if row["succeeded"] != healthy_events:
                raise RuntimeError(f"{row['succeeded']} of {healthy_events} healthy succeeded")
            steady = row["last_success"] - row["first_fan_out"]
            from_start = row["last_success"] - daemon.started_at
            drain_rate = healthy_events / steady
            offered = load * drain_rate if healthy_rate is None else healthy_rate

            first = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox")
            total_rate = offered * len(tenants) / HEALTHY
            achieved, _ = await produce(producers, total_rate, seconds, tenants)
            last = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM outbox")
            expected = await conn.fetchval(
                "SELECT count(*) FROM outbox WHERE seq > $1 AND seq <= $2"
                " AND tenant = ANY ($3::text[])",
                first,
                last,
                healthy_tenants,
            )
            await wait_delivered(conn, daemon.check_alive, first, last, expected, drain_rate)
            latency = await conn.fetchrow(STATS, first, last)
            assert latency is not None
        finally:
            daemon.stop()  # graceful: in-flight hanging requests run into their timeout first
        healthy_attempts = await conn.fetchrow(_ATTEMPTS, healthy)
        hanging_attempts = await conn.fetchrow(_ATTEMPTS, hanging)
        assert healthy_attempts is not None
        assert hanging_attempts is not None
        return FairnessRun(
            hanging_endpoints=len(hanging),
            events=events,
            healthy_events=healthy_events,
            healthy_per_s=round(drain_rate, 1),
            healthy_per_s_from_start=round(healthy_events / from_start, 1),
            healthy_seconds=round(steady, 3),
            healthy_failed_attempts=int(healthy_attempts["failed"]),
            healthy_offered_per_s=round(offered, 1),
            achieved_per_s=round(achieved, 1),
            latency_events=int(latency["n"]),
            p50_ms=round(latency["p50"], 2),
            p99_ms=round(latency["p99"], 2),
            max_ms=round(latency["max"], 2),
            p99_from_schedule_ms=round(latency["scheduled_p99"], 2),
            hanging_attempts=int(hanging_attempts["attempts"]),
            hanging_timeouts=int(hanging_attempts["timeouts"]),
            hanging_connections=(hang.connections - connections_before) if hang else 0,
            cores=cores,
        )
    finally:
        for p in producers:
            await p.close()
        await drop_schema(conn, config)
        await conn.close()


async def _wait_done(
    conn: asyncpg.Connection, daemon: DaemonProcess, healthy: list[int], events: int
) -> None:
    """Poll until the backlog is fanned out and no healthy delivery is left (with a deadline)."""
    await poll_until(
        conn,
        daemon,
        _DONE,
        healthy,
        seconds=60 + events / 200,
        every=POLL_S,
        failure=f"healthy share of {events} events not delivered by the deadline",
    )
