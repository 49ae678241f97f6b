"""Endpoint health over time and the operational events it causes: the disable policy driven by
an injected clock (a day of failures in milliseconds), recovery, deliveries that run out of
retries, and the ops tenant never hearing about itself."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import structlog
from aiohttp import web
from structlog.testing import LogCapture

from dispatcher.config import ConfigError, DisableConfig, OpsConfig, RetryConfig, load_config
from dispatcher.db import Q, connect_kwargs
from tests.clocks import FakeClock
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import cli, db_env

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]
OPS = "ops"


async def ops_events(db: Db) -> list[tuple[str, dict[str, Any]]]:
    """The operational events in the outbox, oldest first: (type, payload)."""
    rows = await db.conn.fetch(
        "SELECT event_type, payload::text AS payload FROM outbox WHERE tenant = $1 ORDER BY seq",
        OPS,
    )
    return [(r["event_type"], json.loads(r["payload"])) for r in rows]


async def count(db: Db, status: str, endpoint_id: int) -> int:
    return await db.count(
        "SELECT count(*) FROM deliveries WHERE status = $1 AND endpoint_id = $2",
        status,
        endpoint_id,
    )


async def count_is(db: Db, status: str, endpoint_id: int, n: int) -> bool:
    return await count(db, status, endpoint_id) == n


@contextmanager
def captured_logs() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every log event from info up, as dicts, while the block runs."""
    saved = structlog.get_config()
    capture = LogCapture()
    structlog.configure(
        processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(logging.INFO)
    )
    try:
        yield capture.entries
    finally:
        structlog.configure(**saved)


async def test_failures_disable_an_endpoint_only_once_they_span_the_policy_and_enable_resumes_them(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    healthy = False

    async def down_until_fixed(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=200 if healthy else 500, text="ok" if healthy else "down")

    r = await receiver_factory(down_until_fixed)
    eid, _ = await db.add_endpoint(r.url, max_in_flight=1)
    clock = FakeClock()
    start = clock.now()
    config = replace(
        db.config,
        # 5 failures spanning a day; retries every 20 ms, far more of them than the test needs.
        disable=DisableConfig(after_failures=5, after=86400.0),
        retry=RetryConfig(schedule=(0.0, *[0.02] * 300), jitter=0.0),
        ops=OpsConfig(tenant=OPS),
    )
    await daemon_factory(config, clock=clock)
    first = await db.insert_events(3)

    async def failures() -> int:
        return await db.count("SELECT consecutive_failures FROM endpoints WHERE id = $1", eid)

    await wait_until(lambda: failures_at_least(failures, 6), message="6 failures")
    row = await db.row("SELECT enabled, failing_since FROM endpoints WHERE id = $1", eid)
    assert (row["enabled"], row["failing_since"]) == (True, start)

    # A minute short of the span: more failures, still enabled.
    clock.advance(hours=23, minutes=59)
    seen = await failures()
    await wait_until(lambda: failures_at_least(failures, seen + 3), message="3 more failures")
    assert await db.count("SELECT count(*) FROM endpoints WHERE enabled") == 1

    # The span reached: the next failure disables it, and its deliveries wait as paused.
    disabled_at = clock.advance(minutes=1)
    await wait_until(lambda: count_is(db, "paused", eid, 3), message="deliveries paused")
    row = await db.row("SELECT * FROM endpoints WHERE id = $1", eid)
    assert row["enabled"] is False
    assert (row["disabled_at"], row["disabled_by"]) == (disabled_at, "dispatcher")
    assert "consecutive failures" in row["disabled_reason"]
    events = await ops_events(db)
    assert [t for t, _ in events] == ["endpoint.disabled"]
    payload = events[0][1]
    assert payload["tenant"] == "shop-1"
    assert (payload["endpoint_id"], payload["url"]) == (eid, r.url)
    assert payload["reason"] == row["disabled_reason"]
    assert payload["consecutive_failures"] >= 5
    assert datetime.fromisoformat(payload["failing_since"]) == start
    assert datetime.fromisoformat(payload["disabled_at"]) == disabled_at
    assert payload["last_errors"]
    assert set(payload["last_errors"]) == {"http_error: HTTP 500"}
    assert payload["held_deliveries"] == 3

    # Events keep arriving while it is disabled: they wait too.
    later = await db.insert_events(2)
    await wait_until(lambda: count_is(db, "paused", eid, 5), message="new deliveries paused")
    healthy, sent_before = True, len(r.requests)
    enabled = await cli("endpoint", "enable", str(eid), "--json", env=db_env(db))
    assert enabled.json() == {"id": eid, "enabled": True, "resumed": 5}
    await wait_until(lambda: count_is(db, "succeeded", eid, 5), message="all 5 delivered")
    # One at a time (max_in_flight 1), in outbox order, nothing lost or sent twice.
    assert [q.headers["webhook-id"] for q in r.requests[sent_before:]] == first + later
    # Enabling cleared the streak, so the successes that followed are no recovery to report.
    assert [t for t, _ in await ops_events(db)] == ["endpoint.disabled"]


async def failures_at_least(failures: Callable[[], Awaitable[int]], n: int) -> bool:
    return await failures() >= n


async def test_a_success_after_failures_reports_endpoint_recovered_once_to_the_ops_endpoint(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def fail_twice(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=503 if n <= 2 else 200)

    shop = await receiver_factory(fail_twice)
    ops = await receiver_factory()
    eid, _ = await db.add_endpoint(shop.url, max_in_flight=1)
    await db.add_endpoint(ops.url, tenant=OPS, events=["endpoint.*"])
    with captured_logs() as logged:
        await daemon_factory(replace(db.config, ops=OpsConfig(tenant=OPS)))
        await db.insert_events(2)
        await wait_until(lambda: len(ops.requests) == 1, message="the ops event delivered")
        await wait_until(lambda: count_is(db, "succeeded", eid, 2), message="both delivered")

    event = ops.requests[0].json()
    assert (event["type"], event["tenant"]) == ("endpoint.recovered", OPS)
    data = event["data"]
    assert (data["tenant"], data["endpoint_id"], data["url"]) == ("shop-1", eid, shop.url)
    assert data["failures"] == 2
    assert data["failing_since"] is not None
    recovered = [e for e in logged if e["event"] == "endpoint_recovered"]
    assert len(recovered) == 1
    assert (recovered[0]["log_level"], recovered[0]["endpoint_id"]) == ("info", eid)
    assert recovered[0]["failures"] == 2
    row = await db.row(
        "SELECT consecutive_failures, failing_since FROM endpoints WHERE id = $1", eid
    )
    assert tuple(row) == (0, None)
    assert [t for t, _ in await ops_events(db)] == ["endpoint.recovered"]


async def test_short_failing_streaks_are_not_reported_below_the_configured_length(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def fail_twice(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500 if n <= 2 else 200)

    shop = await receiver_factory(fail_twice)
    eid, _ = await db.add_endpoint(shop.url)
    await daemon_factory(replace(db.config, ops=OpsConfig(tenant=OPS, recovered_after_failures=3)))
    await db.insert_events(1)
    await wait_until(lambda: count_is(db, "succeeded", eid, 1), message="delivered")
    assert await ops_events(db) == []


async def test_a_delivery_out_of_retries_reports_delivery_failed_to_the_ops_endpoint(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def always_500(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    shop = await receiver_factory(always_500)
    ops = await receiver_factory()
    eid, _ = await db.add_endpoint(shop.url)
    await db.add_endpoint(ops.url, tenant=OPS, events=["delivery.failed"])
    await daemon_factory(replace(db.config, ops=OpsConfig(tenant=OPS)))
    (event_id,) = await db.insert_events(1, event_type="tier.upgraded")
    await wait_until(lambda: len(ops.requests) == 1, message="the ops event delivered")

    event = ops.requests[0].json()
    assert (event["type"], event["tenant"]) == ("delivery.failed", OPS)
    data = event["data"]
    delivery = await db.row(
        "SELECT id, status, attempts FROM deliveries WHERE endpoint_id = $1", eid
    )
    assert tuple(delivery) == (data["delivery_id"], "failed", 4)
    assert (data["tenant"], data["endpoint_id"], data["url"]) == ("shop-1", eid, shop.url)
    assert (data["event_id"], data["event_type"]) == (event_id, "tier.upgraded")
    assert (data["attempts"], data["last_status_code"]) == (4, 500)
    assert data["last_error"] == "http_error: HTTP 500"


async def test_the_ops_tenant_hears_nothing_about_its_own_endpoints_or_deliveries(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def gone(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=410)

    async def always_500(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500)

    gone_r, failing_r = await receiver_factory(gone), await receiver_factory(always_500)
    gone_id, _ = await db.add_endpoint(gone_r.url, tenant=OPS)
    failing_id, _ = await db.add_endpoint(failing_r.url, tenant=OPS)
    await daemon_factory(replace(db.config, ops=OpsConfig(tenant=OPS)))
    await db.insert_events(1, tenant=OPS, event_type="endpoint.disabled")

    await wait_until(lambda: count_is(db, "failed", failing_id, 1), message="ops delivery failed")
    await wait_until(lambda: count_is(db, "paused", gone_id, 1), message="ops endpoint disabled")
    # Events are written in the same transaction as the results that cause them: none came.
    assert await db.count("SELECT count(*) FROM outbox WHERE tenant = $1", OPS) == 1


async def test_two_processes_recording_a_success_at_once_report_the_recovery_once(db: Db) -> None:
    eid, _ = await db.add_endpoint("https://example.com/h")
    await db.conn.execute(
        "UPDATE endpoints SET consecutive_failures = 3, failing_since = now() WHERE id = $1", eid
    )
    # No deliveries, only the endpoint's streak: each batch saw a success; the second one also a
    # failure after it, so it writes the row even once the first has cleared the streak.
    no_deliveries: list[Any] = [[]] * 14
    now = datetime.now(UTC)
    other = await asyncpg.connect(**connect_kwargs(db.config.database))
    try:
        async with db.conn.transaction():
            first = await db.conn.fetchrow(
                Q["record_results"], *no_deliveries, [eid], [True], [0], now, False
            )
            second = asyncio.create_task(
                other.fetchrow(Q["record_results"], *no_deliveries, [eid], [True], [1], now, False)
            )

            async def second_waits_for_the_row_lock() -> bool:
                # pg_locks is read live; pg_stat_activity would be frozen for this transaction.
                return bool(
                    await db.conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE pid = $1 AND NOT granted",
                        other.get_server_pid(),
                    )
                )

            await wait_until(second_waits_for_the_row_lock, message="the second write to wait")
        later = await second
    finally:
        await other.close()
    assert first is not None
    assert later is not None
    assert (first["endpoint_ended_failures"], later["endpoint_ended_failures"]) == ([3], [None])


def test_the_ops_tenant_is_read_from_the_environment_and_checked() -> None:
    assert load_config(None, environ={"DISPATCHER_OPS_TENANT": "ops"}).ops.tenant == "ops"
    assert load_config(None, environ={}).ops == OpsConfig(tenant="", recovered_after_failures=1)
    for bad in ("ops\x01", "  ", "x" * 201):
        with pytest.raises(ConfigError, match=r"DISPATCHER_OPS_TENANT: \[ops\] tenant"):
            load_config(None, environ={"DISPATCHER_OPS_TENANT": bad})
    with pytest.raises(ConfigError, match=r"\[ops\] recovered_after_failures"):
        load_config(None, environ={"DISPATCHER_OPS_RECOVERED_AFTER_FAILURES": "0"})
