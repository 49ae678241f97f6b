"""Retention: deleting finished deliveries, their attempts and their events after a set age.

A pass walks `deliveries` by primary key, then the outbox by seq, in statements of `batch` rows
(queries prune_* in queries.sql), each its own short transaction; an advisory lock lets one
process per schema prune at a time. Rows are created in key order, so a walk ends at the first
step that sees rows newer than the cut-off. The daemon's passes resume near where the previous
one ended and walk everything from the start only every FULL_WALK_EVERY seconds: rows that stay
behind the cut-off (failed but younger than their retention, paused, retried for long) are
looked at again only then.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import asyncpg.pool
import structlog

from .config import Config, RetentionConfig, format_duration, parse_duration
from .db import Executor, Q
from .errors import CliError
from .metrics import Metrics
from .recording import TRANSIENT_DB_ERRORS

log = structlog.get_logger("dispatcher")

# How often a daemon's pass walks from the first row instead of resuming: rows behind the
# resume point that became prunable since (a failed delivery reaching its age, a delivery that
# completed late) wait at most this long.
FULL_WALK_EVERY = 3600.0
# The attempt-log walk starts before any attempt; PostgreSQL's timestamptz reaches year 1.
_BEFORE_ANY_ATTEMPT = datetime(1, 1, 1, tzinfo=UTC)
LOCK_POLL = 0.5


def lock_key(schema: str) -> str:
    """The advisory lock name one schema's pruners share."""
    return f"dispatcher.prune.{schema}"


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """Rows that completed before these times go."""

    succeeded: datetime
    failed: datetime

    @property
    def newest(self) -> datetime:
        """The later cut-off: nothing created after it can be pruned, and an event with no
        delivery left goes once it was fanned out before it."""
        return max(self.succeeded, self.failed)


@dataclass(frozen=True, slots=True)
class Resume:
    """Where a daemon's next pass starts: at the last step of its previous one (0: the start)."""

    delivery_id: int = 0
    outbox_seq: int = 0


@dataclass(slots=True)
class Counts:
    """Rows deleted (or, in a dry run, that would be) so far, statements run and the longest
    one (each is a transaction: the longest time a deleted row was locked); `observe` hears
    each statement's deletions by table as they commit."""

    succeeded: int = 0
    failed: int = 0
    attempts: int = 0
    outbox: int = 0
    statements: int = 0
    slowest_s: float = 0.0
    observe: Callable[[str, int], None] | None = None

    @property
    def deliveries(self) -> int:
        return self.succeeded + self.failed

    def add(self, row: asyncpg.Record, seconds: float) -> None:
        """Add one step's counts (each query returns the columns of the tables it touches)."""
        self.statements += 1
        self.slowest_s = max(self.slowest_s, seconds)
        for name, table in _TABLES.items():
            value = row.get(name)
            if value:
                setattr(self, name, getattr(self, name) + int(value))
                if self.observe is not None:
                    self.observe(table, int(value))

    def by_table(self) -> dict[str, int]:
        return {"deliveries": self.deliveries, "attempts": self.attempts, "outbox": self.outbox}


_TABLES = {
    "succeeded": "deliveries",
    "failed": "deliveries",
    "attempts": "attempts",
    "outbox": "outbox",
}


@dataclass(frozen=True, slots=True)
class PassResult:
    """What one pass did."""

    counts: Counts
    cutoffs: Cutoffs
    resume: Resume
    seconds: float
    full: bool
    dry_run: bool
    interrupted: bool = False


@dataclass(frozen=True, slots=True)
class _Queries:
    deliveries: str
    outbox: str
    orphans: str


_PRUNE = _Queries("prune_deliveries", "prune_outbox", "prune_orphan_attempts")
_COUNT = _Queries("count_prunable_deliveries", "count_prunable_outbox", "count_orphan_attempts")


async def _lock(conn: Executor, schema: str, wait: float) -> bool:
    """Take the schema's pruning lock, polling for up to `wait` seconds while another holds it."""
    deadline = time.monotonic() + wait
    while True:
        if await conn.fetchval(Q["prune_try_lock"], lock_key(schema)):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(LOCK_POLL, left))


async def prune_pass(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    retention: RetentionConfig,
    schema: str,
    *,
    dry_run: bool = False,
    resume: Resume | None = None,
    counts: Counts | None = None,
    stopping: Callable[[], bool] = lambda: False,
    wait: float = 0.0,
) -> PassResult | None:
    """One pass: from `resume`, or from the start (with the orphaned-attempt sweep) if None.

    Returns None when another process kept the pruning lock for `wait` seconds. A dry run
    takes no lock and deletes nothing: it counts what a full pass would delete. `counts` (if
    given) is filled as statements commit, so a caller still knows what was deleted when a
    later statement fails.
    """
    started = time.monotonic()
    counts = counts if counts is not None else Counts()
    if not dry_run and not await _lock(conn, schema, wait):
        return None
    try:
        row = await conn.fetchrow(Q["prune_cutoffs"], retention.succeeded, retention.failed)
        assert row is not None
        cut = Cutoffs(row["succeeded"], row["failed"])
        q = _COUNT if dry_run else _PRUNE
        start = resume or Resume()
        deliveries_at, stopped = await _walk(
            conn,
            Q[q.deliveries],
            start.delivery_id,
            retention.batch,
            cut.newest,
            (cut.succeeded, cut.failed),
            counts,
            stopping,
        )
        outbox_at = start.outbox_seq
        if not stopped:
            outbox_args: tuple[datetime, ...] = (cut.newest,)
            if dry_run:
                outbox_args += (cut.succeeded, cut.failed)
            outbox_at, stopped = await _walk(
                conn,
                Q[q.outbox],
                start.outbox_seq,
                retention.batch,
                cut.newest,
                outbox_args,
                counts,
                stopping,
            )
        if resume is None and not stopped:
            stopped = await _sweep_orphans(
                conn,
                Q[q.orphans],
                retention.batch,
                min(cut.succeeded, cut.failed),
                counts,
                stopping,
            )
    finally:
        if not dry_run:
            await _unlock(conn, schema)
    return PassResult(
        counts=counts,
        cutoffs=cut,
        resume=Resume(deliveries_at, outbox_at),
        seconds=time.monotonic() - started,
        full=resume is None,
        dry_run=dry_run,
        interrupted=stopped,
    )


async def _unlock(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, schema: str) -> None:
    """Let go of the pruning lock. When that cannot be done on this connection (the pass was
    cancelled mid-statement, or the statement failed), the connection is closed, which lets go
    of it too: the daemon's pool does not reset connections it takes back (db.keep_session)."""
    task = asyncio.current_task()
    if task is None or task.cancelling() == 0:
        try:
            await conn.execute(Q["prune_unlock"], lock_key(schema))
            return
        except TRANSIENT_DB_ERRORS:
            pass
    conn.terminate()


async def _walk(
    conn: Executor,
    query: str,
    after: int,
    batch: int,
    until: datetime,
    args: tuple[datetime, ...],
    counts: Counts,
    stopping: Callable[[], bool],
) -> tuple[int, bool]:
    """Run a keyset step query from key `after` until a step comes back short or sees a row
    created at or after `until`. Returns the key the last step started from (where the next
    pass resumes: that step's rows may not all have been due yet) and whether it was stopped."""
    while True:
        started = time.monotonic()
        row = await conn.fetchrow(query, after, batch, *args)
        assert row is not None
        counts.add(row, time.monotonic() - started)
        if row["walked"] < batch or row["newest"] >= until:
            return after, False
        if stopping():
            return row["last"], True
        after = row["last"]


async def _sweep_orphans(
    conn: Executor,
    query: str,
    batch: int,
    before: datetime,
    counts: Counts,
    stopping: Callable[[], bool],
) -> bool:
    """Walk the attempt log made before `before` for attempts whose delivery is gone. Returns
    whether it was stopped."""
    after = _BEFORE_ANY_ATTEMPT
    while True:
        started = time.monotonic()
        row = await conn.fetchrow(query, after, batch, before)
        assert row is not None
        counts.add(row, time.monotonic() - started)
        if row["walked"] < batch:
            return False
        if stopping():
            return True
        after = row["last"]


@dataclass
class Pruner:
    """The daemon's retention task: a pass every `interval` (jittered), on a pooled connection.
    A lost database is logged and retried; the task never ends on its own."""

    pool: asyncpg.Pool
    retention: RetentionConfig
    schema: str
    metrics: Metrics
    stopping: Callable[[], bool] = lambda: False
    _resume: Resume | None = field(default=None, init=False)
    _next_full: float = field(default=0.0, init=False)

    async def run(self) -> None:
        interval = self.retention.interval
        # Replicas started together spread their passes.
        delay = interval * random.uniform(0.5, 1.0)
        failures = 0
        while True:
            await asyncio.sleep(delay)
            delay = interval * random.uniform(0.5, 1.0)
            if self.stopping():
                continue
            counts = Counts(observe=self._observe)
            try:
                await self.run_once(counts)
                failures = 0
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                delay = min(interval, 0.5 * 2**failures) * random.uniform(0.5, 1.0)
                self.metrics.prune_passes.labels("error").inc()
                log.warning(
                    "prune_failed",
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    deleted=counts.by_table(),
                    retry_in_s=round(delay, 2),
                )

    async def run_once(self, counts: Counts | None = None) -> PassResult | None:
        """One pass, unless another process is pruning this schema (None)."""
        counts = counts if counts is not None else Counts(observe=self._observe)
        now = time.monotonic()
        full = now >= self._next_full
        async with self.pool.acquire() as conn:
            result = await prune_pass(
                conn,
                self.retention,
                self.schema,
                resume=None if full else self._resume,
                counts=counts,
                stopping=self.stopping,
            )
        if result is None:
            self.metrics.prune_passes.labels("skipped").inc()
            log.debug("prune_skipped", reason="another process is pruning")
            return None
        self.metrics.prune_passes.labels("done").inc()
        if not result.interrupted:
            self._resume = result.resume
            if full:
                self._next_full = now + FULL_WALK_EVERY
        log.info(
            "prune_pass",
            full=result.full,
            succeeded=counts.succeeded,
            failed=counts.failed,
            attempts=counts.attempts,
            outbox=counts.outbox,
            statements=counts.statements,
            slowest_statement_s=round(counts.slowest_s, 3),
            duration_s=round(result.seconds, 3),
            interrupted=result.interrupted,
        )
        return result

    def _observe(self, table: str, deleted: int) -> None:
        self.metrics.pruned.labels(table).inc(deleted)


# The command ----------------------------------------------------------------------------------


def _wait(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    listing: argparse.ArgumentParser,
) -> None:
    """Add `prune` to the `dispatcher` parser."""
    p = sub.add_parser(
        "prune",
        parents=[common, listing],
        help="delete old finished deliveries, their attempts and events now",
        description="One retention pass, as the daemon runs every [retention] interval: succeeded"
        " deliveries older than [retention] succeeded and failed ones older than [retention]"
        " failed go with their attempts, then events with no delivery left. Pending, delivering"
        " and paused deliveries are never touched.",
    )
    p.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    p.add_argument(
        "--wait",
        type=_wait,
        default=60.0,
        metavar="DURATION",
        help="how long to wait while another process is pruning (1m)",
    )


async def cmd_prune(args: argparse.Namespace, config: Config, conn: asyncpg.Connection) -> int:
    schema = config.database.schema
    result = await prune_pass(conn, config.retention, schema, dry_run=args.dry_run, wait=args.wait)
    if result is None:
        raise CliError(
            f"another process has been pruning schema {schema} for over"
            f" {format_duration(args.wait)}; try again later or with a longer --wait"
        )
    c = result.counts
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": result.dry_run,
                    "deliveries": c.deliveries,
                    "succeeded": c.succeeded,
                    "failed": c.failed,
                    "attempts": c.attempts,
                    "outbox": c.outbox,
                    "statements": c.statements,
                    "seconds": round(result.seconds, 3),
                    "succeeded_before": result.cutoffs.succeeded.isoformat(),
                    "failed_before": result.cutoffs.failed.isoformat(),
                }
            )
        )
        return 0
    verb = "would delete" if result.dry_run else "deleted"
    print(
        f"{verb} {c.deliveries} deliveries ({c.succeeded} succeeded, {c.failed} failed),"
        f" {c.attempts} attempts and {c.outbox} events in {result.seconds:.2f}s"
    )
    print(
        f"cut-offs: succeeded before {result.cutoffs.succeeded.isoformat(timespec='seconds')},"
        f" failed before {result.cutoffs.failed.isoformat(timespec='seconds')}"
    )
    return 0


DB_HANDLERS: dict[
    tuple[str, str | None],
    Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]],
] = {("prune", None): cmd_prune}
