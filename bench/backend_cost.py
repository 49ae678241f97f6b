"""Backend cost: what the wake-up trigger costs the backend's single-row inserts, per mode."""

# Modes: idle (a listener waits, every insert notifies), busy (the recommended mode: the trigger
# only reads `listeners`) and no trigger (the baseline), each by 1, 4 and 16 producers.

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from bench.harness import (
    EVENT_TYPE,
    TENANT,
    Context,
    closed_loop_inserts,
    connect,
    drop_schema,
    fresh_schema,
)
from dispatcher.config import DatabaseConfig
from dispatcher.pgcluster import ClusterError, pg_bin

MODES = ("no trigger", "busy", "idle")
_PAYLOAD = '{"customer_id":"cust_00000123","amount":150,"new_balance":2350,"reason":"purchase"}'
_TPS = re.compile(r"^tps = ([0-9.]+)", re.MULTILINE)


@dataclass
class InsertCell:
    """One producer count in one trigger mode."""

    producers: int
    mode: str
    inserts_per_s: float
    """The median of the rounds."""
    vs_no_trigger: float | None
    """The median over rounds of this mode's rate / the no-trigger rate in the same round."""
    runs: list[float]


@dataclass
class BackendCostResult:
    """Every cell, which client produced the load, and how many NOTIFYs the idle mode sent."""

    client: str
    seconds_per_run: float
    rounds: int
    cells: list[InsertCell]
    idle_notifications: int


def _pgbench() -> Path | None:
    try:
        path = pg_bin("pgbench")
    except ClusterError:
        return None
    return path if path.exists() else None


async def run_backend_cost(
    ctx: Context, seconds: float, producer_counts: list[int], rounds: int
) -> BackendCostResult:
    """Measure each cell `rounds` times, interleaved, and keep medians: this VM is noisy."""
    # One schema per mode, emptied and checkpointed before every run so each starts alike.
    schemas = {
        mode: await fresh_schema(ctx.dsn, f"insert_{mode.replace(' ', '_')}") for mode in MODES
    }
    admin = await connect(schemas["no trigger"])
    conns = {mode: await connect(config) for mode, config in schemas.items()}
    received = [0]
    try:
        triggers = await conns["no trigger"].fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'outbox'::regclass AND NOT tgisinternal"
        )
        for t in triggers:
            await conns["no trigger"].execute(f'DROP TRIGGER "{t["tgname"]}" ON outbox')
        await conns["busy"].execute("INSERT INTO listeners (replica, idle) VALUES ('bench', false)")
        await conns["idle"].execute("INSERT INTO listeners (replica, idle) VALUES ('bench', true)")
        # An idle dispatcher LISTENs; this connection plays its part and counts what it hears.
        await conns["idle"].add_listener(
            f"{schemas['idle'].schema}.outbox",
            lambda *_: received.__setitem__(0, received[0] + 1),
        )
        pgbench = _pgbench()
        rates: dict[tuple[int, str], list[float]] = {}
        heard = 0
        for round_ in range(rounds):
            for producers in producer_counts:
                # Rotate the order each round, so no mode always runs first or last.
                for mode in MODES[round_ % 3 :] + MODES[: round_ % 3]:
                    await conns[mode].execute("TRUNCATE outbox")
                    await admin.execute("CHECKPOINT", timeout=120)
                    before = received[0]
                    if pgbench is not None:
                        rate = await asyncio.to_thread(
                            _run_pgbench, pgbench, schemas[mode], producers, seconds, ctx.workdir
                        )
                    else:
                        rate = await closed_loop_inserts(
                            schemas[mode], producers, seconds, [_PAYLOAD]
                        )
                    await asyncio.sleep(0.1)  # let the last notifications arrive
                    heard += received[0] - before
                    rates.setdefault((producers, mode), []).append(rate)
        cells = []
        for producers in producer_counts:
            base = rates[producers, "no trigger"]
            for mode in MODES:
                runs = rates[producers, mode]
                # Each round's modes ran back to back, so the ratio is taken within a round and
                # the median over rounds: the machine's drift between rounds then cancels.
                ratios = [r / b for r, b in zip(runs, base, strict=True) if b > 0]
                cells.append(
                    InsertCell(
                        producers=producers,
                        mode=mode,
                        inserts_per_s=round(statistics.median(runs), 1),
                        vs_no_trigger=round(statistics.median(ratios), 3) if ratios else None,
                        runs=[round(r, 1) for r in runs],
                    )
                )
        client = "pgbench -M prepared" if pgbench is not None else "asyncpg (pgbench not found)"
        return BackendCostResult(client, seconds, rounds, cells, heard)
    finally:
        for mode, c in conns.items():
            await drop_schema(c, schemas[mode])
            await c.close()
        await admin.close()


def _run_pgbench(
    pgbench: Path, config: DatabaseConfig, producers: int, seconds: float, workdir: Path
) -> float:
    """pgbench as the backend: C clients, so the client's own cost hardly counts."""
    script = workdir / f"insert-{config.schema}.sql"
    script.write_text(
        f'INSERT INTO "{config.schema}".outbox (tenant, event_type, payload)'
        f" VALUES ('{TENANT}', '{EVENT_TYPE}', '{_PAYLOAD}'::jsonb);\n"
    )
    url = urlparse(config.dsn)
    argv = [str(pgbench), "-n", "-M", "prepared", "-c", str(producers)]
    argv += ["-j", str(min(producers, os.cpu_count() or 1)), "-T", str(max(1, round(seconds)))]
    argv += ["-f", str(script), "-h", url.hostname or "127.0.0.1", "-p", str(url.port or 5432)]
    argv += ["-U", unquote(url.username or "postgres"), unquote(url.path.lstrip("/")) or "postgres"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if url.password:
        env["PGPASSWORD"] = unquote(url.password)
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=seconds + 120, check=False
    )
    found = _TPS.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return float(found.group(1))
