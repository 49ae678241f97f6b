"""Retention: old finished deliveries, their attempts and events are pruned; nothing else is."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest

from dispatcher.config import ConfigError, RetentionConfig, load_config
from dispatcher.db import connect_kwargs, keep_session
from dispatcher.metrics import Metrics
from dispatcher.retention import PassResult, Pruner, Resume, lock_key, prune_pass
from tests.conftest import Db, RunningDaemon, wait_until
from tests.test_cli import assert_one_error_line, cli, db_env

DAY = 86400.0
URL = "https://example.com/h"
# The defaults: succeeded deliveries go after 7 days, failed ones after 30.
RETENTION = RetentionConfig()


async def add_event(db: Db, days_ago: float = 40.0, *, fanned_out: bool = True) -> int:
    """An outbox row created `days_ago`, fanned out then too (or not at all)."""
    seq = await db.conn.fetchval(
        "INSERT INTO outbox (tenant, event_type, payload, created_at, fanned_out_at)"
        " VALUES ('shop-1', 'points.earned', '{}', now() - make_interval(secs => $1),"
        "         CASE WHEN $2 THEN now() - make_interval(secs => $1) END)"
        " RETURNING seq",
        days_ago * DAY,
        fanned_out,
    )
    return int(seq)


async def add_delivery(
    db: Db,
    seq: int,
    endpoint_id: int,
    status: str,
    completed_days_ago: float | None = None,
    *,
    created_days_ago: float = 40.0,
    attempts: int = 2,
) -> int:
    """A delivery of event `seq` with `attempts` logged attempts, completed `completed_days_ago`
    (None: not completed)."""
    did = await db.conn.fetchval(
        "INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, attempts, created_at,"
        "                        completed_at)"
        " SELECT seq, event_id, $2, $3, $4, now() - make_interval(secs => $5),"
        "        now() - make_interval(secs => $6)"
        " FROM outbox WHERE seq = $1"
        " RETURNING id",
        seq,
        endpoint_id,
        status,
        attempts,
        created_days_ago * DAY,
        None if completed_days_ago is None else completed_days_ago * DAY,
    )
    await db.conn.execute(
        "INSERT INTO attempts (delivery_id, event_id, endpoint_id, attempt, attempted_at,"
        "                      duration_ms, decision)"
        " SELECT d.id, d.event_id, d.endpoint_id, n, coalesce(d.completed_at, d.created_at), 5,"
        "        'retry'"
        " FROM deliveries d, generate_series(1, $2) AS n WHERE d.id = $1",
        did,
        attempts,
    )
    return int(did)


async def delivery_ids(db: Db) -> set[int]:
    return {r["id"] for r in await db.conn.fetch("SELECT id FROM deliveries")}


async def attempted(db: Db) -> dict[int, int]:
    """Logged attempts per delivery id."""
    rows = await db.conn.fetch("SELECT delivery_id, count(*) AS n FROM attempts GROUP BY 1")
    return {r["delivery_id"]: r["n"] for r in rows}


async def outbox_seqs(db: Db) -> set[int]:
    return {r["seq"] for r in await db.conn.fetch("SELECT seq FROM outbox")}


async def snapshot(db: Db) -> tuple[set[int], dict[int, int], set[int]]:
    return await delivery_ids(db), await attempted(db), await outbox_seqs(db)


async def one_pass(
    db: Db, retention: RetentionConfig = RETENTION, resume: Resume | None = None
) -> PassResult:
    """A pass that must not find the lock taken."""
    result = await prune_pass(db.conn, retention, db.schema, resume=resume)
    assert result is not None
    return result


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# What goes and what stays ---------------------------------------------------------------------


async def test_old_succeeded_deliveries_go_with_their_attempts_and_event_and_recent_ones_stay(
    db: Db,
) -> None:
    eid, _ = await db.add_endpoint(URL)
    old_event, recent_event = await add_event(db), await add_event(db, 2)
    old = await add_delivery(db, old_event, eid, "succeeded", 8, attempts=3)
    recent = await add_delivery(db, recent_event, eid, "succeeded", 1, created_days_ago=2)

    result = await prune_pass(db.conn, RETENTION, db.schema)

    assert result is not None
    assert (result.counts.succeeded, result.counts.attempts, result.counts.outbox) == (1, 3, 1)
    assert await snapshot(db) == ({recent}, {recent: 2}, {recent_event})
    assert old not in await delivery_ids(db)


async def test_pending_delivering_and_paused_deliveries_stay_however_old(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    kept = []
    for status in ("pending", "delivering", "paused"):
        kept.append(
            await add_delivery(db, await add_event(db, 90), eid, status, None, created_days_ago=90)
        )
        # Completed once and replayed: only the status says whether a row is finished.
        kept.append(
            await add_delivery(db, await add_event(db, 90), eid, status, 60, created_days_ago=90)
        )
    before = await snapshot(db)

    result = await prune_pass(db.conn, RETENTION, db.schema)

    assert result is not None
    assert result.counts.by_table() == {"deliveries": 0, "attempts": 0, "outbox": 0}
    assert await snapshot(db) == before
    assert await delivery_ids(db) == set(kept)


async def test_failed_deliveries_stay_until_their_longer_retention(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    week_old = await add_delivery(db, await add_event(db), eid, "failed", 8)
    month_old = await add_delivery(db, await add_event(db), eid, "failed", 31)

    result = await prune_pass(db.conn, RETENTION, db.schema)

    assert result is not None
    assert (result.counts.failed, result.counts.succeeded, result.counts.outbox) == (1, 0, 1)
    assert await delivery_ids(db) == {week_old}
    assert set(await attempted(db)) == {week_old}
    assert month_old not in await delivery_ids(db)


async def test_an_event_stays_until_every_one_of_its_deliveries_is_gone(db: Db) -> None:
    a, _ = await db.add_endpoint(URL)
    b, _ = await db.add_endpoint(URL)
    seq = await add_event(db)
    await add_delivery(db, seq, a, "succeeded", 8)
    failed = await add_delivery(db, seq, b, "failed", 8)

    await one_pass(db)
    assert await delivery_ids(db) == {failed}
    assert await outbox_seqs(db) == {seq}

    await db.conn.execute("UPDATE deliveries SET completed_at = now() - interval '31 days'")
    await one_pass(db)
    assert await snapshot(db) == (set(), {}, set())


async def test_an_event_no_endpoint_wanted_goes_once_fanned_out_longer_ago_than_the_retention(
    db: Db,
) -> None:
    old = await add_event(db, 8)
    recent = await add_event(db, 1)
    waiting = await add_event(db, 60, fanned_out=False)

    await one_pass(db)

    assert await outbox_seqs(db) == {recent, waiting}
    assert old not in await outbox_seqs(db)


async def test_old_attempts_whose_delivery_is_gone_are_swept_by_a_full_pass(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    old = await add_delivery(db, await add_event(db), eid, "pending", None, created_days_ago=40)
    recent = await add_delivery(db, await add_event(db), eid, "pending", None, created_days_ago=1)
    # Deleting deliveries (as deleting their endpoint does) leaves their attempts behind.
    await db.conn.execute("DELETE FROM deliveries")

    result = await prune_pass(db.conn, RETENTION, db.schema)

    assert result is not None
    assert result.counts.attempts == 2
    assert set(await attempted(db)) == {recent}
    assert old not in await attempted(db)


# How a pass goes about it ---------------------------------------------------------------------


async def test_a_pass_walks_in_batches_and_a_resumed_pass_starts_near_where_the_last_ended(
    db: Db,
) -> None:
    eid, _ = await db.add_endpoint(URL)
    # Ten old rows with a pending one among them, then rows too new to go: the walk ends there.
    doomed = [await add_delivery(db, await add_event(db), eid, "succeeded", 8) for _ in range(5)]
    pending = await add_delivery(db, await add_event(db), eid, "pending", None)
    doomed += [await add_delivery(db, await add_event(db), eid, "succeeded", 8) for _ in range(5)]
    fresh = [
        await add_delivery(db, await add_event(db, 1), eid, "succeeded", 1, created_days_ago=1)
        for _ in range(8)
    ]
    small = replace(RETENTION, batch=3)

    full = await one_pass(db, small)

    assert full.full
    assert full.counts.succeeded == 10
    assert full.counts.statements > 8  # deliveries, outbox and attempt-log walks, 3 rows a step
    assert await delivery_ids(db) == {pending, *fresh}
    assert 0 < full.resume.delivery_id < max(fresh)

    # A week later the fresh rows are old, and the pending one (behind the resume point) has
    # succeeded long ago: a resumed pass finds the former, only a full pass the latter.
    await db.conn.execute(
        "UPDATE deliveries SET created_at = created_at - interval '7 days',"
        " completed_at = completed_at - interval '7 days' WHERE id = ANY ($1::bigint[])",
        fresh,
    )
    await db.conn.execute(
        "UPDATE outbox SET created_at = created_at - interval '7 days',"
        " fanned_out_at = fanned_out_at - interval '7 days'"
        " WHERE seq IN (SELECT event_seq FROM deliveries WHERE id = ANY ($1::bigint[]))",
        fresh,
    )
    await db.conn.execute(
        "UPDATE deliveries SET status = 'succeeded', completed_at = now() - interval '8 days'"
        " WHERE id = $1",
        pending,
    )
    resumed = await one_pass(db, small, full.resume)
    assert not resumed.full
    assert resumed.counts.succeeded == 8
    assert await delivery_ids(db) == {pending}
    await one_pass(db, small)
    assert await snapshot(db) == (set(), {}, set())


async def test_a_pass_skips_rows_another_transaction_holds_instead_of_waiting(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    held = await add_delivery(db, await add_event(db), eid, "failed", 31)
    free = await add_delivery(db, await add_event(db), eid, "failed", 31)
    other = await asyncpg.connect(**connect_kwargs(db.config.database))
    try:
        async with other.transaction():
            # As a replay holding the row would; a pass that waited would time out here.
            await other.execute("SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE", held)
            result = await asyncio.wait_for(prune_pass(db.conn, RETENTION, db.schema), 5)
    finally:
        await other.close()
    assert result is not None
    assert result.counts.failed == 1
    assert await delivery_ids(db) == {held}
    assert free not in await delivery_ids(db)
    await one_pass(db)
    assert await delivery_ids(db) == set()


async def test_only_one_process_prunes_a_schema_at_a_time(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    await add_delivery(db, await add_event(db), eid, "succeeded", 8)
    other = await asyncpg.connect(**connect_kwargs(db.config.database))
    try:
        assert await other.fetchval(
            "SELECT pg_try_advisory_lock(hashtext($1))", lock_key(db.schema)
        )
        assert await prune_pass(db.conn, RETENTION, db.schema) is None
        assert len(await delivery_ids(db)) == 1
        run = await cli("prune", "--wait", "0s", env=db_env(db))
        assert_one_error_line(run, "another process", db.schema)
    finally:
        await other.close()
    assert await prune_pass(db.conn, RETENTION, db.schema) is not None
    assert await delivery_ids(db) == set()


async def test_a_pass_cancelled_mid_statement_lets_go_of_the_lock_on_a_pool_that_keeps_sessions(
    db: Db,
) -> None:
    eid, _ = await db.add_endpoint(URL)
    await add_delivery(db, await add_event(db), eid, "succeeded", 8)
    pool = await asyncpg.create_pool(
        **connect_kwargs(db.config.database), min_size=1, max_size=1, reset=keep_session
    )
    blocker = await asyncpg.connect(**connect_kwargs(db.config.database))
    try:
        async with blocker.transaction():
            # The pass's first delete waits behind this lock until it is cancelled.
            await blocker.execute(f'LOCK TABLE "{db.schema}".deliveries')

            async def prune() -> None:
                async with pool.acquire() as conn:
                    await prune_pass(conn, RETENTION, db.schema)

            task = asyncio.create_task(prune())
            await wait_until(
                lambda: _waiting_for_a_lock(db), timeout=10, message="the pass to wait"
            )
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # Another session can take the lock (its holder's connection was closed), and the
        # pool goes on with a new connection.
        async def taken_elsewhere() -> bool:
            key = lock_key(db.schema)
            if await blocker.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", key):
                await blocker.execute("SELECT pg_advisory_unlock(hashtext($1))", key)
                return True
            return False

        await wait_until(taken_elsewhere, timeout=5, message="the lock to be let go")
        async with pool.acquire() as conn:
            assert await prune_pass(conn, RETENTION, db.schema) is not None
        assert await delivery_ids(db) == set()
    finally:
        await blocker.close()
        await pool.close()


async def _waiting_for_a_lock(db: Db) -> bool:
    return bool(
        await db.count(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


# The command ----------------------------------------------------------------------------------


async def test_prune_dry_run_counts_what_prune_then_deletes_and_changes_nothing(db: Db) -> None:
    a, _ = await db.add_endpoint(URL)
    b, _ = await db.add_endpoint(URL)
    shared = await add_event(db)
    await add_delivery(db, shared, a, "succeeded", 8, attempts=1)
    await add_delivery(db, shared, b, "failed", 31, attempts=4)
    await add_delivery(db, await add_event(db), a, "failed", 8)
    await add_delivery(db, await add_event(db, 1), a, "succeeded", 1, created_days_ago=1)
    await add_delivery(db, await add_event(db), a, "paused", None)
    await add_event(db, 9)  # no delivery
    before = await snapshot(db)
    env = db_env(db)

    dry = (await cli("prune", "--dry-run", "--json", env=env)).json()
    assert await snapshot(db) == before
    done = (await cli("prune", "--json", env=env)).json()

    counts = ("deliveries", "succeeded", "failed", "attempts", "outbox")
    assert dry["dry_run"] is True
    assert done["dry_run"] is False
    assert {k: dry[k] for k in counts} == {
        "deliveries": 2,
        "succeeded": 1,
        "failed": 1,
        "attempts": 5,
        "outbox": 2,
    }
    assert {k: done[k] for k in counts} == {k: dry[k] for k in counts}
    assert len(await delivery_ids(db)) == 3


async def test_prune_prints_what_it_deleted_and_refuses_a_bad_option_in_one_line(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    await add_delivery(db, await add_event(db), eid, "succeeded", 8, attempts=2)
    env = db_env(db)
    plain, bad = await asyncio.gather(
        cli("prune", env=env), cli("prune", "--wait", "soon", env=env)
    )
    assert plain.rc == 0, plain
    assert "deleted 1 deliveries (1 succeeded, 0 failed), 2 attempts and 1 events" in plain.out
    assert "cut-offs:" in plain.out
    assert_one_error_line(bad, "--wait", "soon")


# The daemon -----------------------------------------------------------------------------------


async def test_the_daemon_prunes_in_the_background_every_interval(
    db: Db, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    eid, _ = await db.add_endpoint(URL)
    first = await add_delivery(db, await add_event(db), eid, "succeeded", 8)
    kept = await add_delivery(db, await add_event(db), eid, "pending", None)
    config = replace(db.config, retention=replace(RETENTION, interval=0.05))
    daemon = await daemon_factory(config)
    metrics = daemon.dispatcher.metrics

    async def gone(did: int) -> bool:
        return did not in await delivery_ids(db)

    await wait_until(lambda: gone(first), timeout=5, message="the first pass")
    # Later passes find rows that became prunable since. (Event and delivery in one
    # transaction: an old event alone is itself prunable, and the pruner is running.)
    async with db.conn.transaction():
        second = await add_delivery(db, await add_event(db), eid, "failed", 31)
    await wait_until(lambda: gone(second), timeout=5, message="a later pass")
    assert kept in await delivery_ids(db)
    await wait_until(
        lambda: sample(metrics, "webhook_pruned_rows_total", table="deliveries") == 2,
        timeout=5,
        message="the metric to count both deliveries",
    )
    # Rows are counted as each statement commits, a pass when it ends.
    await wait_until(
        lambda: sample(metrics, "webhook_prune_passes_total", outcome="done") >= 2,
        timeout=5,
        message="two passes done",
    )
    assert not daemon.task.done()


async def test_the_background_task_logs_and_retries_while_the_database_is_unreachable() -> None:
    pool = await asyncpg.create_pool("postgresql://x@127.0.0.1:1/x", min_size=0, timeout=1)
    metrics = Metrics()
    pruner = Pruner(pool, replace(RETENTION, interval=0.02), "webhooks", metrics)
    task = asyncio.create_task(pruner.run())
    try:
        await wait_until(
            lambda: sample(metrics, "webhook_prune_passes_total", outcome="error") >= 3,
            timeout=5,
            message="three failed passes",
        )
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pool.close()


async def test_the_daemons_pass_after_a_full_one_resumes_where_it_ended(db: Db) -> None:
    eid, _ = await db.add_endpoint(URL)
    await add_delivery(db, await add_event(db), eid, "succeeded", 8)
    pool = await asyncpg.create_pool(**connect_kwargs(db.config.database), min_size=1, max_size=2)
    try:
        pruner = Pruner(pool, RETENTION, db.schema, Metrics())
        first = await pruner.run_once()
        later = await add_delivery(db, await add_event(db), eid, "succeeded", 8)
        second = await pruner.run_once()
    finally:
        await pool.close()
    assert first is not None
    assert second is not None
    assert (first.full, second.full) == (True, False)
    assert (first.counts.succeeded, second.counts.succeeded) == (1, 1)
    assert later not in await delivery_ids(db)


# Configuration --------------------------------------------------------------------------------


def test_retention_keys_are_read_from_the_environment() -> None:
    config = load_config(
        environ={
            "DISPATCHER_RETENTION_SUCCEEDED": "2d",
            "DISPATCHER_RETENTION_FAILED": "90d",
            "DISPATCHER_RETENTION_INTERVAL": "0s",
            "DISPATCHER_RETENTION_BATCH": "1000",
        }
    )
    assert config.retention == RetentionConfig(2 * DAY, 90 * DAY, 0.0, 1000)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("SUCCEEDED", "30s", "at least 1m"),
        ("FAILED", "7", "duration"),
        ("INTERVAL", "2d", "interval"),
        ("BATCH", "0", "batch"),
    ],
)
def test_a_bad_retention_value_is_refused_naming_the_key(
    key: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(environ={f"DISPATCHER_RETENTION_{key}": value})
    assert f"DISPATCHER_RETENTION_{key}" in str(caught.value)
    assert fragment in str(caught.value)
