"""The result writer: one bad result cannot stall the write-back of the others."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import asyncpg
import pytest
import structlog

from dispatcher import claiming, recording
from dispatcher.claiming import Slots
from dispatcher.clock import SystemClock
from dispatcher.config import DisableConfig
from dispatcher.db import connect_kwargs
from dispatcher.recording import Result, ResultWriter
from dispatcher.retry import Decision
from dispatcher.sending import Outcome
from tests.conftest import Db, wait_until


async def test_a_result_the_database_refuses_is_logged_and_the_rest_of_its_batch_is_recorded(
    db: Db,
) -> None:
    await db.add_endpoint("https://example.com/h")
    await db.insert_events(3)
    fanned = await claiming.fan_out(db.conn, Slots(10, {}, 8), lease=60.0, first_delay=0.0)
    assert len(fanned.jobs) == 3
    now = datetime.now(UTC)
    ok = Outcome(200, None, None, None, 5)
    # Text no UTF-8 encoder accepts (a lone surrogate), as if it had slipped past the sender.
    poisoned = Outcome(500, "http_error", "HTTP 500 \udcff", None, 5)
    results = [
        Result(fanned.jobs[0], ok, Decision("succeeded"), now),
        Result(fanned.jobs[1], poisoned, Decision("pending", 1.0), now),
        Result(fanned.jobs[2], ok, Decision("succeeded"), now),
    ]
    pool = await asyncpg.create_pool(**connect_kwargs(db.config.database), min_size=1, max_size=2)
    try:
        writer = ResultWriter(
            pool, disable=DisableConfig(), clock=SystemClock(), batch_size=10, flush_interval=0
        )
        for r in results:
            writer.add(r)
        with structlog.testing.capture_logs() as logged:
            await writer.flush()
    finally:
        await pool.close()
    rows = await db.conn.fetch("SELECT id, status FROM deliveries ORDER BY id")
    by_id = {r["id"]: r["status"] for r in rows}
    assert by_id[fanned.jobs[0].delivery_id] == "succeeded"
    assert by_id[fanned.jobs[2].delivery_id] == "succeeded"
    # Left claimed: sent again once its lease runs out, so nothing is lost.
    assert by_id[fanned.jobs[1].delivery_id] == "delivering"
    refused = [e for e in logged if e["event"] == "result_not_recordable"]
    assert [e["delivery_id"] for e in refused] == [fanned.jobs[1].delivery_id]
    assert refused[0]["log_level"] == "error"
    assert await db.count("SELECT count(*) FROM attempts") == 2


async def test_a_writer_backing_off_retries_at_once_when_told_the_database_is_back(
    db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump pauses while results wait, so the writer must not sit out a long backoff once
    another connection (the pump's, the listener's) has found the database again."""
    monkeypatch.setattr(recording, "BACKOFF_FIRST", 60.0)
    monkeypatch.setattr(recording, "BACKOFF_MAX", 120.0)
    await db.add_endpoint("https://example.com/h")
    await db.insert_events(1)
    fanned = await claiming.fan_out(db.conn, Slots(10, {}, 8), lease=60.0, first_delay=0.0)
    result = Result(
        fanned.jobs[0], Outcome(200, None, None, None, 5), Decision("succeeded"), datetime.now(UTC)
    )
    # Statements time out while the attempt log is locked: a transient failure, as in an outage.
    pool = await asyncpg.create_pool(
        **connect_kwargs(db.config.database), min_size=1, max_size=2, command_timeout=0.2
    )
    blocker = await asyncpg.connect(**connect_kwargs(db.config.database))
    writer = ResultWriter(
        pool, disable=DisableConfig(), clock=SystemClock(), batch_size=10, flush_interval=0
    )
    task = asyncio.create_task(writer.run())
    try:
        with structlog.testing.capture_logs() as logged:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE attempts IN SHARE MODE")
            writer.add(result)
            await wait_until(
                lambda: any(e["event"] == "results_not_recorded" for e in logged),
                message="the write-back failed",
            )
        warning = next(e for e in logged if e["event"] == "results_not_recorded")
        assert warning["retry_in_s"] >= 30  # on its own, the writer would wait that long
        await tx.rollback()
        writer.database_back()
        await wait_until(lambda: writer.pending == 0, timeout=10, message="recorded at once")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await blocker.close()
        await pool.close()
    assert await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == 1
