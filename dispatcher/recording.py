"""Recording results: finished attempts are buffered and written back in batches, one
statement per batch (delivery state, the attempt log, endpoint health), as soon as the
previous write is done, so batches grow with the load and a quiet system writes at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
import asyncpg.pool
import structlog

from . import ops
from .claiming import Job
from .clock import Clock
from .config import DisableConfig, OpsConfig
from .db import Q, acquire
from .health import Health, over_limit, streaks
from .metrics import Metrics
from .retry import Decision
from .sending import Outcome

log = structlog.get_logger("dispatcher")

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

# What a lost or restarting database raises. InternalClientError is asyncpg's "another operation
# is in progress", seen when the server goes away in the middle of a statement; the pool drops
# that connection when it is released.
TRANSIENT_DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    TimeoutError,
)


@dataclass(frozen=True, slots=True)
class Result:
    """One finished attempt and what the retry policy made of it."""

    job: Job
    outcome: Outcome
    decision: Decision
    attempted_at: datetime


# The writer's backoff after a failed write-back: doubling from BACKOFF_FIRST up to BACKOFF_MAX
# (seconds), jittered, and ended early by `database_back`.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class ResultWriter:
    """Buffers results and flushes them by size or after a short interval."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        disable: DisableConfig,
        clock: Clock,
        batch_size: int,
        flush_interval: float,
        metrics: Metrics | None = None,
        on_retry_recorded: Callable[[datetime], None] | None = None,
        ops: OpsConfig | None = None,
        ordered_after_failure: str = "move_on",
    ) -> None:
        self._pool = pool
        # Whether a delivery that failed for good keeps its ordering key blocked.
        self.block_failed_keys = ordered_after_failure == "block"
        # Operational events go to the ops tenant ("" = off); see dispatcher/ops.py.
        self._ops = ops or OpsConfig()
        self._ops_tenant = self._ops.tenant
        # Endpoints whose last recorded streak was failing: a success for one may end it, and
        # its recovery event should be written with the results, in one transaction.
        self._failing: set[int] = set()
        # The pump sleeps until the earliest due time it knows; a retry recorded after it went
        # to sleep may be due sooner, so it must be told.
        self._on_retry_recorded = on_retry_recorded
        self._metrics = metrics or Metrics()
        self.disable = disable
        self._clock = clock
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._buffer: list[Result] = []
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        # Set after each batch written: the pump waits on it while too much is unrecorded.
        self.progress = asyncio.Event()
        self._retry_now = asyncio.Event()
        self.recorded = 0
        self._lock = (
            asyncio.Lock()
        )  # the flusher and a shutdown drain must not write one batch twice

    @property
    def pending(self) -> int:
        """Results sent and not yet recorded (their rows still say `delivering`)."""
        return len(self._buffer)

    @property
    def failing(self) -> set[int]:
        """Endpoints whose last recorded attempts failed (their streak has not ended)."""
        return self._failing

    def retune(
        self,
        *,
        disable: DisableConfig,
        batch_size: int,
        flush_interval: float,
        ordered_after_failure: str,
    ) -> None:
        """Apply reloaded settings from the next flush on."""
        self.disable = disable
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self.block_failed_keys = ordered_after_failure == "block"

    def add(self, result: Result) -> None:
        self._buffer.append(result)
        self._has_items.set()
        if len(self._buffer) >= self._batch_size:
            self._full.set()

    async def run(self) -> None:
        """Flush forever; a database outage delays results, it does not lose them."""
        failures = 0
        while True:
            await self._has_items.wait()
            if self._flush_interval > 0:
                # (asyncio.timeout: see monitoring.Sampler.run)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._flush_interval):
                        await self._full.wait()
            # A signal that the database is back counts from the start of this attempt on.
            self._retry_now.clear()
            try:
                await self.flush()
                failures = 0
            except TRANSIENT_DB_ERRORS as exc:
                failures += 1
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**failures) * random.uniform(0.5, 1.0)
                log.warning(
                    "results_not_recorded",
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    pending_results=len(self._buffer),
                    retry_in_s=round(delay, 2),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), delay)

    def database_back(self) -> None:
        """Another connection reached the database again: end a backoff now, since the pump
        pauses while results wait, and would otherwise wait out the writer's (up to 5 s)."""
        self._retry_now.set()

    def hurry(self) -> None:
        """Write what waits now rather than after `flush_interval`: the pump has stopped
        claiming until it is written, so no fuller batch is coming."""
        self._full.set()

    async def drain(self, deadline: float) -> int:
        """Flush everything before `deadline` (monotonic); returns how many stayed unrecorded."""
        while self._buffer and time.monotonic() < deadline:
            try:
                await asyncio.wait_for(self.flush(), max(0.1, deadline - time.monotonic()))
            except (*TRANSIENT_DB_ERRORS, TimeoutError):
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return len(self._buffer)

    async def flush(self) -> None:
        async with self._lock:
            while self._buffer:
                batch = self._buffer[: self._batch_size]
                try:
                    await self._write(batch)
                except asyncpg.DataError:
                    # Something in the batch cannot be stored. Retrying it whole would stall
                    # every result behind it for good, so write them one by one instead.
                    await self._write_each(batch)
                del self._buffer[: len(batch)]
                self.recorded += len(batch)
                self.progress.set()
            self._has_items.clear()
            self._full.clear()

    async def _write_each(self, batch: list[Result]) -> None:
        """Write results one at a time, giving up only on those the database refuses: their
        deliveries stay claimed until the lease runs out and are then sent again, so the
        attempt goes unlogged but nothing is lost."""
        for r in batch:
            try:
                await self._write([r])
            except asyncpg.DataError as exc:
                log.error(
                    "result_not_recordable",
                    delivery_id=r.job.delivery_id,
                    event_id=r.job.event_id,
                    endpoint_id=r.job.endpoint_id,
                    attempt=r.job.attempt,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                )

    async def _write(self, batch: list[Result]) -> None:
        now = self._clock.now()
        by_endpoint = streaks((r.job.endpoint_id, r.outcome.ok) for r in batch)
        gone = {
            r.job.endpoint_id: r.decision.disable_reason for r in batch if r.decision.disable_reason
        }
        jobs = [r.job for r in batch]
        outcomes = [r.outcome for r in batch]
        decisions = [r.decision for r in batch]
        # With operational events on, a batch that may cause one (a failure, or a success for a
        # failing endpoint) is written in one transaction with its events, so a crash between
        # the two cannot lose them. Healthy batches stay one autocommit statement.
        atomic = bool(self._ops_tenant) and any(
            not r.outcome.ok or r.job.endpoint_id in self._failing for r in batch
        )
        # Columns a batch of successes leaves all NULL go as NULL arrays, which unnest pads
        # with NULLs: asyncpg encodes each array element in Python, a cost per delivery.
        retrying = any(d.status == "pending" for d in decisions)
        async with acquire(self._pool) as conn, _transaction(conn, atomic):
            row = await conn.fetchrow(
                Q["record_results"],
                [j.delivery_id for j in jobs],
                [j.attempt for j in jobs],
                [d.status for d in decisions],
                [o.status_code for o in outcomes],
                _unless_all_null([o.summary for o in outcomes]),
                [d.delay for d in decisions] if retrying else None,
                [j.event_id for j in jobs],
                [j.endpoint_id for j in jobs],
                [r.attempted_at for r in batch],
                [o.duration_ms for o in outcomes],
                _unless_all_null([o.error for o in outcomes]),
                _unless_all_null([o.detail for o in outcomes]),
                [o.excerpt for o in outcomes],
                [d.label for d in decisions],
                list(by_endpoint),
                [s.succeeded for s in by_endpoint.values()],
                [s.trailing_failures for s in by_endpoint.values()],
                now,
                self.block_failed_keys,
            )
            assert row is not None
            written = zip(row["statuses"] or (), row["next_attempts"] or (), strict=True)
            state = dict(zip(row["ids"] or (), written, strict=True))
            health = [
                Health(*h)
                for h in zip(
                    row["endpoint_ids"] or (),
                    row["endpoint_enabled"] or (),
                    row["endpoint_failures"] or (),
                    row["endpoint_failing_since"] or (),
                    strict=True,
                )
            ]
            # Streaks this batch ended: endpoint -> (failures, failing since).
            ended = {
                eid: (failures, since)
                for eid, failures, since in zip(
                    row["endpoint_ids"] or (),
                    row["endpoint_ended_failures"] or (),
                    row["endpoint_ended_since"] or (),
                    strict=True,
                )
                if failures
            }
            to_disable = dict(over_limit(health, self.disable, now))
            to_disable.update((eid, reason) for eid, reason in gone.items() if reason)
            disabled = None
            if to_disable:
                disabled = await conn.fetchval(
                    Q["disable_endpoints"],
                    list(to_disable),
                    list(to_disable.values()),
                    "dispatcher",
                    now,
                )
            if self._ops_tenant:
                events = self._ops_events(batch, state, health, ended, disabled, to_disable, now)
                if events:
                    await self._insert_ops_events(conn, events)
        for h in health:
            if h.consecutive_failures:
                self._failing.add(h.endpoint_id)
            else:
                self._failing.discard(h.endpoint_id)
        _log_batch(batch, state)
        _log_ordered_failures(batch, row["ordered_failed_ids"] or (), self.block_failed_keys)
        retries = [at for st, at in state.values() if st == "pending"]
        if row["released"]:
            # Ordered keys moved on: their next deliveries are due now.
            retries.append(datetime.now(UTC))
        if self._on_retry_recorded and retries:
            self._on_retry_recorded(min(retries))
        m = self._metrics
        m.write_batch.observe(len(batch))
        # Counted per batch: a labelled increment per delivery would cost more than the rest.
        for outcome, n in Counter(
            "success" if o.ok else o.error or "error" for o in outcomes
        ).items():
            m.attempts.labels(outcome).inc(n)
        for status, n in Counter(st for st, _ in state.values()).items():
            if status in ("succeeded", "failed"):
                m.deliveries.labels(status).inc(n)
        m.endpoints_disabled.inc(len(disabled or []))
        for eid in disabled or []:
            failures = [r.outcome.summary for r in batch if r.job.endpoint_id == eid][-3:]
            log.error(
                "endpoint_disabled",
                endpoint_id=eid,
                tenant=next(r.job.tenant for r in batch if r.job.endpoint_id == eid),
                reason=to_disable[eid],
                last_errors=failures,
            )
        for eid, (failures, since) in ended.items():
            log.info(
                "endpoint_recovered",
                endpoint_id=eid,
                tenant=next(r.job.tenant for r in batch if r.job.endpoint_id == eid),
                failures=failures,
                failing_since=since.isoformat() if since else None,
            )

    def _ops_events(
        self,
        batch: list[Result],
        state: dict[int, tuple[str, datetime]],
        health: list[Health],
        ended: dict[int, tuple[int, datetime | None]],
        disabled: list[int] | None,
        reasons: dict[int, str],
        now: datetime,
    ) -> list[ops.OpsEvent]:
        """What this batch tells the ops tenant: streaks ended, deliveries failed, endpoints
        disabled. The ops tenant's own deliveries are left out here already (and its endpoints
        by the insert)."""
        tenant = self._ops_tenant
        events = [
            ops.endpoint_recovered(eid, failures=n, failing_since=since, recovered_at=now)
            for eid, (n, since) in ended.items()
            if n >= self._ops.recovered_after_failures
        ]
        for r in batch:
            job, o = r.job, r.outcome
            if o.ok or job.tenant == tenant:
                continue
            if state.get(job.delivery_id, ("",))[0] == "failed":
                events.append(
                    ops.delivery_failed(
                        job.endpoint_id,
                        delivery_id=job.delivery_id,
                        event_id=job.event_id,
                        event_type=job.event_type,
                        attempts=job.attempt,
                        status_code=o.status_code,
                        error=o.summary,
                        failed_at=now,
                    )
                )
        streak = {h.endpoint_id: h for h in health}
        for eid in disabled or []:
            h = streak.get(eid)
            events.append(
                ops.endpoint_disabled(
                    eid,
                    reason=reasons[eid],
                    disabled_at=now,
                    consecutive_failures=h.consecutive_failures if h else None,
                    failing_since=h.failing_since if h else None,
                    last_errors=[
                        r.outcome.summary or ""
                        for r in batch
                        if r.job.endpoint_id == eid and not r.outcome.ok
                    ],
                )
            )
        return events

    async def _insert_ops_events(self, conn: Connection, events: list[ops.OpsEvent]) -> None:
        """Insert in a savepoint of its own: events the outbox refuses are logged and dropped;
        failing the batch for them would retry it forever, or log its attempts twice."""
        try:
            async with conn.transaction():
                inserted = await ops.insert(conn, self._ops_tenant, events)
        except asyncpg.PostgresError as exc:
            log.error(
                "ops_events_not_recorded",
                error=type(exc).__name__,
                detail=str(exc)[:200],
                ops_tenant=self._ops_tenant,
                events=len(events),
            )
            return
        log.debug("ops_events_recorded", ops_tenant=self._ops_tenant, events=inserted)


def _transaction(conn: Connection, atomic: bool) -> AbstractAsyncContextManager[object]:
    """A transaction when `atomic`, else nothing (each statement commits on its own)."""
    return conn.transaction() if atomic else contextlib.nullcontext()


def _log_ordered_failures(batch: list[Result], failed_ids: Sequence[int], blocked: bool) -> None:
    """Say what a delivery that failed for good did to its ordering key."""
    if not failed_ids:
        return  # the usual batch: no per-result work
    ids = set(failed_ids)
    for r in batch:
        job = r.job
        if job.delivery_id not in ids:
            continue
        fields = {
            "delivery_id": job.delivery_id,
            "event_id": job.event_id,
            "tenant": job.tenant,
            "endpoint_id": job.endpoint_id,
            "ordering_key": job.ordering_key,
        }
        if blocked:
            # Later events of this key wait for `delivery skip` or `replay`.
            log.error("ordered_key_blocked", **fields)
        else:
            log.warning("ordered_key_moved_on", **fields)


def _unless_all_null(values: list[str | None]) -> list[str | None] | None:
    """`values`, or None when every one is None (see ResultWriter._write)."""
    return values if any(v is not None for v in values) else None


def _log_batch(batch: list[Result], state: dict[int, tuple[str, datetime]]) -> None:
    # Successes are logged at debug only; skip building their fields when that is off.
    debug = log.is_enabled_for(logging.DEBUG)
    for r in batch:
        job, o = r.job, r.outcome
        if o.ok and not debug:
            continue
        fields = {
            "event_id": job.event_id,
            "tenant": job.tenant,
            "endpoint_id": job.endpoint_id,
            "delivery_id": job.delivery_id,
            "attempt": job.attempt,
            "status_code": o.status_code,
            "duration_ms": o.duration_ms,
        }
        if o.ok:
            log.debug("delivery_succeeded", **fields)
            continue
        status, next_at = state.get(job.delivery_id, ("superseded", None))
        if status == "failed":
            log.error("delivery_failed", error=o.summary, **fields)
        elif status == "paused":
            log.warning(
                "attempt_failed", error=o.summary, next_attempt_at=None, paused=True, **fields
            )
        else:
            log.warning(
                "attempt_failed",
                error=o.summary,
                next_attempt_at=next_at.isoformat() if next_at else None,
                **fields,
            )
