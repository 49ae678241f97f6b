"""What every scenario shares: schemas, endpoint, events, the dispatcher process, CPU meters."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench import procs
from bench.receiver import Receiver
from dispatcher.config import DatabaseConfig
from dispatcher.db import connect_kwargs, migrate
from dispatcher.signing import generate_secret

TENANT = "shop-1"
EVENT_TYPE = "points.earned"
# The dispatcher's [delivery] concurrency in every scenario (--dispatcher-concurrency), and the
# one endpoint's max_in_flight in drain and latency: the product's default.
DISPATCHER_CONCURRENCY = 256
BACKLOG_BATCH = 100_000  # rows per INSERT of a backlog

# A loyalty event of realistic size (about 250 bytes of JSON), the same in SQL and Python.
PAYLOAD_SQL = """jsonb_build_object(
    'customer_id', 'cust_' || lpad(i::text, 8, '0'),
    'amount', 10 + i % 490,
    'new_balance', 1000 + (i * 37) % 100000,
    'currency', 'EUR',
    'reason', 'purchase',
    'order_id', 'ord_' || lpad(((i * 7919) % 1000000007)::text, 12, '0'),
    'store_id', 'store_' || i % 40,
    'tier', (ARRAY['bronze', 'silver', 'gold', 'platinum'])[1 + i % 4],
    'channel', 'pos',
    'campaign', NULL)"""


def payload(i: int) -> dict[str, Any]:
    """The Python twin of PAYLOAD_SQL for event number `i`."""
    return {
        "customer_id": f"cust_{i:08d}",
        "amount": 10 + i % 490,
        "new_balance": 1000 + (i * 37) % 100000,
        "currency": "EUR",
        "reason": "purchase",
        "order_id": f"ord_{(i * 7919) % 1000000007:012d}",
        "store_id": f"store_{i % 40}",
        "tier": ("bronze", "silver", "gold", "platinum")[i % 4],
        "channel": "pos",
        "campaign": None,
    }


@dataclass
class Context:
    """One benchmark run: the database, the receiver, a scratch directory, the CPU sources."""

    dsn: str
    postmaster_pid: int | None
    receiver: Receiver
    workdir: Path
    results_dir: Path
    stamp: str
    """The run's timestamp, which names its files in results_dir."""
    drain_rate: float | None = None
    notes: list[str] = field(default_factory=list)
    concurrency: int = DISPATCHER_CONCURRENCY
    """The dispatcher's [delivery] concurrency, and the drain endpoint's max_in_flight."""

    def cpu_sources(
        self, **extra: Callable[[], float | None]
    ) -> dict[str, Callable[[], float | None]]:
        """CPU readers for postgres, the receiver and this process, plus `extra` ones."""
        pid = self.postmaster_pid
        return {
            **extra,
            "postgres": lambda: procs.cpu_seconds(pid),
            "receiver": self.receiver.cpu_seconds,
            "bench": procs.own_cpu_seconds,
        }


class CpuMeter:
    """CPU used by named processes between start() and cores(), in cores (1.0 = one full core)."""

    def __init__(self, sources: Mapping[str, Callable[[], float | None]]) -> None:
        self._sources = dict(sources)
        self._start: dict[str, float | None] = {}
        self._t0 = 0.0

    def start(self) -> None:
        """Take the first reading."""
        self._start = {name: read() for name, read in self._sources.items()}
        self._t0 = time.monotonic()

    def cores(self) -> dict[str, float]:
        """Average cores used by each process since start(); unreadable ones are left out."""
        wall = max(1e-9, time.monotonic() - self._t0)
        out: dict[str, float] = {}
        for name, read in self._sources.items():
            before, now = self._start.get(name), read()
            if before is not None and now is not None:
                out[name] = round((now - before) / wall, 3)
        return out


async def fresh_schema(dsn: str, label: str) -> DatabaseConfig:
    """A new, migrated schema for one scenario, so scenarios never see each other's rows."""
    config = DatabaseConfig(dsn=dsn, schema=f"bench_{label}_{uuid.uuid4().hex[:6]}")
    await migrate(config)
    return config


async def connect(config: DatabaseConfig) -> asyncpg.Connection:
    """A connection with the scenario's schema on the search path."""
    kwargs = connect_kwargs(config)
    kwargs["server_settings"] = {**kwargs["server_settings"], "application_name": "bench"}
    conn: asyncpg.Connection = await asyncpg.connect(**kwargs)
    return conn


async def closed_loop_inserts(
    config: DatabaseConfig, producers: int, seconds: float, payloads: Sequence[str]
) -> float:
    """Single-row inserts, one event per transaction, on `producers` connections of their
    own, each inserting again as soon as its last commit returns, for `seconds`; payloads
    round-robin. Returns inserts/s."""
    conns: list[asyncpg.Connection] = [await connect(config) for _ in range(producers)]
    counts = [0] * producers
    deadline = time.monotonic() + seconds

    async def produce(k: int) -> None:
        while time.monotonic() < deadline:
            text = payloads[(k + producers * counts[k]) % len(payloads)]
            await conns[k].execute(_CLOSED_LOOP_INSERT, TENANT, EVENT_TYPE, text, timeout=30)
            counts[k] += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(produce(k) for k in range(producers)))
    finally:
        for c in conns:
            await c.close()
    return sum(counts) / (time.monotonic() - started)


_CLOSED_LOOP_INSERT = "INSERT INTO outbox (tenant, event_type, payload) VALUES ($1, $2, $3::jsonb)"


async def drop_schema(conn: asyncpg.Connection, config: DatabaseConfig) -> None:
    """Drop a scenario's schema once it is measured, to keep the cluster small."""
    await conn.execute(f'DROP SCHEMA IF EXISTS "{config.schema}" CASCADE')


async def add_endpoint(conn: asyncpg.Connection, url: str, max_in_flight: int) -> int:
    """The one subscribed endpoint, Standard Webhooks signing."""
    eid = await conn.fetchval(
        "INSERT INTO endpoints (tenant, url, secret, max_in_flight) VALUES ($1, $2, $3, $4)"
        " RETURNING id",
        TENANT,
        url,
        generate_secret("standard"),
        max_in_flight,
    )
    return int(eid)


async def insert_backlog(
    conn: asyncpg.Connection, n: int, *, tenants: Sequence[str] = (TENANT,)
) -> None:
    """N events (round-robin over `tenants`) in multi-row INSERTs of at most BACKLOG_BATCH rows,
    so a million-row backlog is a series of bounded statements; then analyzed and checkpointed
    like a settled table. `i` is bigint: PAYLOAD_SQL's i * 7919 overflows int4 past 271,000."""
    for first in range(1, n + 1, BACKLOG_BATCH):
        await conn.execute(
            "INSERT INTO outbox (tenant, event_type, payload)"
            f" SELECT ($1::text[])[1 + (i - 1) % cardinality($1::text[])], $2, {PAYLOAD_SQL}"
            " FROM generate_series($3::bigint, $4::bigint) AS i",
            list(tenants),
            EVENT_TYPE,
            first,
            min(n, first + BACKLOG_BATCH - 1),
            timeout=600,
        )
    await conn.execute("VACUUM (ANALYZE) outbox", timeout=600)
    await conn.execute("CHECKPOINT", timeout=600)


@dataclass
class DaemonProcess:
    """`python -m dispatcher run` in a process of its own, as ops would run it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    started_at: float
    """time.time() just before the process was spawned."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float | None:
        """CPU used by the dispatcher so far."""
        return procs.cpu_seconds(self.pid)

    def peak_rss_mb(self) -> float | None:
        """Its peak resident memory so far."""
        return procs.peak_rss_mb(self.pid)

    def check_alive(self) -> None:
        """Raise with the end of its log if it has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"the dispatcher exited with {self.proc.returncode}:\n"
                f"{procs.log_tail(self.log_path)}"
            )

    def stop(self) -> int:
        """SIGTERM (graceful stop), SIGKILL if it takes over 30 s; returns the exit code."""
        return procs.stop(self.proc, timeout=30)


def start_daemon(
    config: DatabaseConfig, workdir: Path, name: str, *, concurrency: int
) -> DaemonProcess:
    """Start the dispatcher on `config`'s schema with default settings but `concurrency`,
    local HTTP allowed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(
        DISPATCHER_DATABASE_DSN=config.dsn,
        DISPATCHER_DATABASE_SCHEMA=config.schema,
        DISPATCHER_SECURITY_ALLOW_HTTP="true",
        DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS="true",
        DISPATCHER_LOG_LEVEL="warning",
        DISPATCHER_HTTP_LISTEN="",
        DISPATCHER_DELIVERY_CONCURRENCY=str(concurrency),
    )
    log_path = workdir / f"dispatcher-{name}.log"
    started_at = time.time()
    proc = procs.spawn([sys.executable, "-m", "dispatcher", "run"], log_path=log_path, env=env)
    return DaemonProcess(proc, log_path, started_at)


def stop_all(daemons: Sequence[DaemonProcess]) -> None:
    """Stop every daemon, even when stopping one of them fails (the first failure is raised)."""
    failures: list[BaseException] = []
    for daemon in daemons:
        try:
            daemon.stop()
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(exc)
    if failures:
        raise failures[0]


async def poll_until(
    conn: asyncpg.Connection,
    daemon: DaemonProcess,
    query: str,
    *args: object,
    seconds: float,
    every: float,
    failure: str,
) -> None:
    """Run `query` (one boolean) every `every` seconds until it is true; raise with the
    daemon's log if it exits meanwhile, or RuntimeError(`failure`) after `seconds`."""
    deadline = time.monotonic() + seconds
    while not await conn.fetchval(query, *args):
        daemon.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(failure)
        await asyncio.sleep(every)


async def wait_idle_listener(conn: asyncpg.Connection, daemon: DaemonProcess) -> None:
    """Wait until the dispatcher has registered as an idle listener (it is up and waiting)."""
    await poll_until(
        conn,
        daemon,
        "SELECT EXISTS (SELECT 1 FROM listeners WHERE idle)",
        seconds=30,
        every=0.05,
        failure="the dispatcher did not become idle within 30 s",
    )
