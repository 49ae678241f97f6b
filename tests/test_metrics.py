"""Metrics and health endpoints served by a running daemon."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from dispatcher.config import Config, HttpConfig
from dispatcher.db import connect_kwargs
from dispatcher.metrics import Metrics
from dispatcher.monitoring import Backlog, Sampler
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_endpoint_health import captured_logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_healthz_and_readyz_report_a_working_daemon(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    await db.add_endpoint(receiver.url)
    await daemon_factory(replace(db.config, http=HttpConfig(listen=listen)))
    await db.insert_events(3)
    await wait_until(lambda: len(receiver.requests) == 3, message="deliveries")
    async with aiohttp.ClientSession(f"http://{listen}") as http:

        async def ready() -> bool:
            async with http.get("/readyz") as resp:
                return resp.status == 200

        await wait_until(ready, message="readyz 200")
        async with http.get("/healthz") as resp:
            assert resp.status == 200

        async def counted() -> bool:
            async with http.get("/metrics") as resp:
                text = await resp.text()
            return 'webhook_deliveries_finished_total{status="succeeded"} 3.0' in text

        await wait_until(counted, message="metrics count 3 deliveries")
        async with http.get("/metrics") as resp:
            text = await resp.text()
        assert 'webhook_attempts_total{outcome="success"} 3.0' in text
        assert "webhook_attempt_duration_seconds_bucket" in text


# The backlog sample: gauges, the summary line, the lag /readyz checks ---------------------------


def sampled(config: Config, listen: str = "", max_lag: float = 300.0) -> Config:
    """`config` sampling every 50ms, serving HTTP on `listen`."""
    return replace(
        config,
        http=HttpConfig(listen=listen, max_lag=max_lag),
        log=replace(config.log, summary_interval=0.05),
    )


async def add_deliveries(db: Db, endpoint_id: int, status: str, n: int, due_in: str) -> None:
    """`n` deliveries in `status` for events already fanned out, due (or leased) in `due_in`."""
    await db.conn.execute(
        "WITH events AS ("
        "  INSERT INTO outbox (tenant, event_type, payload, fanned_out_at)"
        "  SELECT 'shop-1', 'points.earned', '{}', now() FROM generate_series(1, $3)"
        "  RETURNING seq, event_id)"
        " INSERT INTO deliveries (event_seq, event_id, endpoint_id, status, next_attempt_at)"
        " SELECT seq, event_id, $1, $2, now() + $4::text::interval FROM events",
        endpoint_id,
        status,
        n,
        due_in,
    )


async def scrape(listen: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://{listen}/metrics") as resp:
        return await resp.text()


async def test_the_backlog_gauges_count_each_status_and_the_lag_is_zero_with_nothing_due(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    live, _ = await db.add_endpoint(receiver.url)
    disabled, _ = await db.add_endpoint(receiver.url, enabled=False)
    # Nothing here is due: retries an hour out, leases an hour long (a live claim elsewhere).
    await add_deliveries(db, live, "pending", 3, "1 hour")
    await add_deliveries(db, live, "delivering", 2, "1 hour")
    await add_deliveries(db, live, "failed", 5, "-1 day")
    await add_deliveries(db, live, "succeeded", 6, "-1 day")
    await add_deliveries(db, disabled, "paused", 4, "-1 day")
    listen = f"127.0.0.1:{free_port()}"
    daemon = await daemon_factory(sampled(db.config, listen))
    expected = [
        'webhook_deliveries_backlog{status="pending"} 3.0',
        'webhook_deliveries_backlog{status="delivering"} 2.0',
        'webhook_deliveries_backlog{status="paused"} 4.0',
        'webhook_deliveries_backlog{status="failed"} 5.0',
        "webhook_outbox_backlog 0.0",
        "webhook_lag_seconds 0.0",
    ]

    async def gauges_set() -> bool:
        text = await scrape(listen)
        return all(line in text.splitlines() for line in expected)

    await wait_until(gauges_set, message=f"gauges {expected}")
    backlog = [
        x
        for x in (await scrape(listen)).splitlines()
        if x.startswith("webhook_deliveries_backlog{")
    ]
    assert not [x for x in backlog if 'status="succeeded"' in x]
    last = daemon.dispatcher.sampler.last
    assert last is not None
    assert (last.pending, last.delivering, last.paused, last.failed) == (3, 2, 4, 5)
    await wait_until(lambda: daemon.dispatcher.not_ready() == [], message="ready")


async def test_readyz_names_the_lag_while_the_oldest_event_waits_longer_than_max_lag(
    db: Db, daemon_factory: Callable[..., Awaitable[RunningDaemon]], pg_dsn: str
) -> None:
    # An event created 400s ago, held by another transaction's row lock: fan-out skips locked
    # rows, so it waits (as behind a stuck or overloaded dispatcher) until the lock goes.
    seq = await db.conn.fetchval(
        "INSERT INTO outbox (tenant, event_type, payload, created_at)"
        " VALUES ('shop-1', 'points.earned', '{}', now() - interval '400 seconds')"
        " RETURNING seq"
    )
    holder = await asyncpg.connect(**connect_kwargs(db.config.database))
    lock = holder.transaction()
    await lock.start()
    try:
        await holder.execute("SELECT 1 FROM outbox WHERE seq = $1 FOR UPDATE", seq)
        listen = f"127.0.0.1:{free_port()}"
        await daemon_factory(sampled(db.config, listen, max_lag=60.0))
        async with aiohttp.ClientSession(f"http://{listen}") as http:

            async def readyz() -> tuple[int, str]:
                async with http.get("/readyz") as resp:
                    return resp.status, await resp.text()

            async def lagging() -> bool:
                return bool(re.fullmatch(r"not ready: lag 4\d\ds over 60s\n", (await readyz())[1]))

            await wait_until(lagging, message="readyz failing on lag")
            assert (await readyz())[0] == 503
            lag = re.search(r"^webhook_lag_seconds (\S+)$", await scrape(listen), re.M)
            assert lag is not None
            assert 400 <= float(lag.group(1)) < 500
            assert re.search(r"^webhook_outbox_backlog 1\.0$", await scrape(listen), re.M)
            await lock.rollback()

            async def ready() -> bool:
                return await readyz() == (200, "ready\n")

            await wait_until(ready, message="ready once the event is fanned out")
            assert re.search(r"^webhook_lag_seconds 0\.0$", await scrape(listen), re.M)
    finally:
        await holder.close()


def test_the_lag_check_names_lag_and_bound_and_zero_turns_it_off() -> None:
    sampler = Sampler(Metrics(), 15.0, lambda: 0)
    assert sampler.lag_check(300.0) is None  # nothing sampled yet
    sampler.last = Backlog(pending=0, delivering=0, paused=0, failed=0, outbox=0, lag=412.4)
    assert sampler.lag_check(300.0) == "lag 412s over 300s"
    assert sampler.lag_check(412.4) is None
    assert sampler.lag_check(0.0) is None


async def test_one_summary_line_per_interval_counts_what_happened_since_the_last(
    db: Db, receiver_factory: Callable[..., Awaitable[Receiver]], daemon_factory: Any
) -> None:
    async def failing(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500)

    ok = await receiver_factory()
    down = await receiver_factory(failing)
    await db.add_endpoint(ok.url, events=["points.earned"])
    await db.add_endpoint(down.url, events=["tier.upgraded"])
    with captured_logs() as logged:
        daemon = await daemon_factory(sampled(db.config))
        await db.insert_events(3)
        await db.insert_events(1, event_type="tier.upgraded")  # 4 attempts (the schedule), failed

        def summaries() -> list[MutableMapping[str, Any]]:
            return [e for e in logged if e["event"] == "dispatcher_summary"]

        # Each line counts since the one before, so the lines add up to the totals.
        def totals() -> tuple[int, int]:
            lines = summaries()
            return sum(e["deliveries"] for e in lines), sum(e["failures"] for e in lines)

        await wait_until(lambda: totals() == (3, 4), message="summaries adding up to 3 and 4")
        await wait_until(lambda: summaries()[-1]["backlog"] == 0, message="an empty backlog")
        await daemon.stop()
    lines = summaries()
    assert len(lines) >= 2
    for e in lines:
        assert e["log_level"] == "info"
        assert set(e) == {
            "event",
            "log_level",
            "deliveries",
            "failures",
            "backlog",
            "outbox",
            "lag_seconds",
            "in_flight",
        }
        assert e["in_flight"] >= 0
        assert e["lag_seconds"] >= 0
    assert await db.statuses() == {"succeeded": 3, "failed": 1}


@pytest.mark.parametrize("yields_between", [0, 1, 2, 3])
async def test_the_sampler_ends_when_cancelled_just_as_its_interval_is_changed(
    db: Db, yields_between: int
) -> None:
    pool = await asyncpg.create_pool(**connect_kwargs(db.config.database), min_size=1)
    sampler = Sampler(Metrics(), 60.0, lambda: 0)
    task = asyncio.create_task(sampler.run(pool))
    try:
        # Once the first sample is in, the sampler waits out its interval.
        await wait_until(lambda: sampler.last is not None, message="the first sample")
        sampler.retune(30.0)
        for _ in range(yields_between):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the sampler swallowed its cancellation"
        assert task.cancelled()
    finally:
        task.cancel()
        await pool.close()
