"""The daemon's periodic sample: the backlog by status and the lag, as gauges, for /readyz, and
as one `dispatcher_summary` log line per interval.

The lag is how long the oldest due work has waited: a delivery due for an attempt (pending, or
a lease run out) or an event not fanned out yet, whichever has waited longer, on the database's
clock. Work due later (a retry, a live lease) is no lag; paused deliveries are not due at all.
The counts since the last summary come from the in-process counters the writer keeps per batch,
so the line costs nothing per delivery; the backlog is one query (`sample_backlog`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg
import structlog
from prometheus_client import Counter

from .db import Executor, Q
from .metrics import Metrics
from .recording import TRANSIENT_DB_ERRORS

log = structlog.get_logger("dispatcher")

# The statuses counted; succeeded rows (most of the table) are not.
STATUSES = ("pending", "delivering", "paused", "failed")


@dataclass(frozen=True, slots=True)
class Backlog:
    """One sample: deliveries by status, events not fanned out, and the lag in seconds."""

    pending: int
    delivering: int
    paused: int
    failed: int
    outbox: int
    lag: float


async def sample_backlog(conn: Executor, timeout: float | None = None) -> Backlog:
    row = await conn.fetchrow(Q["sample_backlog"], timeout=timeout)
    assert row is not None
    return Backlog(
        row["pending"], row["delivering"], row["paused"], row["failed"], row["outbox"], row["lag_s"]
    )


def _total(counter: Counter, **labels: str) -> float:
    """A counter's total over its label sets, or over those matching `labels`."""
    return sum(
        s.value
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total") and labels.items() <= s.labels.items()
    )


class Sampler:
    """Samples every `interval` seconds until cancelled; `lag` is the last sample's (None
    before the first, or when the last one failed)."""

    def __init__(self, metrics: Metrics, interval: float, in_flight: Callable[[], int]) -> None:
        self.metrics = metrics
        self.interval = interval
        self.in_flight = in_flight
        self.last: Backlog | None = None
        self._retuned = asyncio.Event()
        self._seen = self._counts()

    @property
    def lag(self) -> float | None:
        return None if self.last is None else self.last.lag

    def lag_check(self, max_lag: float) -> str | None:
        """Why /readyz fails on lag ("lag 412s over 300s"), or None; max_lag 0: never."""
        lag = self.lag
        if max_lag <= 0 or lag is None or lag <= max_lag:
            return None
        return f"lag {lag:.0f}s over {max_lag:g}s"

    def retune(self, interval: float) -> None:
        """A reloaded interval: the next sample is due one new interval from now."""
        if interval != self.interval:
            self.interval = interval
            self._retuned.set()

    async def run(self, pool: asyncpg.Pool) -> None:
        """Sample now (gauges and lag from the start), then sample and log every interval."""
        await self.sample(pool)
        while True:
            self._retuned.clear()
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel
                # that arrives as the event is set, and this task would then never end.
                async with asyncio.timeout(self.interval):
                    await self._retuned.wait()
                continue  # a new interval: start waiting again
            except TimeoutError:
                pass
            await self.sample(pool)
            self.summarize()

    async def sample(self, pool: asyncpg.Pool) -> Backlog | None:
        """One sample into the gauges and `last`; a lost database is logged, not raised."""
        timeout = max(5.0, self.interval)
        try:
            async with pool.acquire(timeout=timeout) as conn:
                backlog = await sample_backlog(conn, timeout)
        except TRANSIENT_DB_ERRORS as exc:
            self.last = None
            log.warning("backlog_sample_failed", error=type(exc).__name__, detail=str(exc)[:200])
            return None
        self.last = backlog
        m = self.metrics
        for status in STATUSES:
            m.backlog.labels(status).set(getattr(backlog, status))
        m.outbox_backlog.set(backlog.outbox)
        m.lag.set(backlog.lag)
        return backlog

    def summarize(self) -> None:
        """The interval's one line: what the counters moved by since the last, and the sample."""
        now = self._counts()
        succeeded, attempts, ok = (a - b for a, b in zip(now, self._seen, strict=True))
        self._seen = now
        b = self.last
        log.info(
            "dispatcher_summary",
            deliveries=int(succeeded),
            failures=int(attempts - ok),
            backlog=None if b is None else b.pending,
            outbox=None if b is None else b.outbox,
            lag_seconds=None if b is None else round(b.lag, 3),
            in_flight=self.in_flight(),
        )

    def _counts(self) -> tuple[float, float, float]:
        """Deliveries succeeded, attempts, successful attempts: the counters' totals now."""
        m = self.metrics
        return (
            _total(m.deliveries, status="succeeded"),
            _total(m.attempts),
            _total(m.attempts, outcome="success"),
        )
