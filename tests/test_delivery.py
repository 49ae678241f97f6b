"""Delivery behaviour against real receivers: routing, retries, Retry-After, 410, redirects,
timeouts, refused connections, blocked addresses and oversized responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta

from aiohttp import web

from dispatcher import __version__
from dispatcher.config import OpsConfig
from dispatcher.daemon import FAILING_CAP
from dispatcher.db import Q
from tests.conftest import Db, Receiver, RunningDaemon, wait_until

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]


async def settled(db: Db, total: int) -> bool:
    """Every delivery has left the queue (succeeded, failed or paused)."""
    done = await db.count(
        "SELECT count(*) FROM deliveries WHERE status IN ('succeeded', 'failed', 'paused')"
    )
    return done >= total


async def succeeded(db: Db, total: int) -> bool:
    return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == total


async def test_each_event_reaches_exactly_the_tenants_matching_enabled_endpoints(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    every, points, tier, other, off = [await receiver_factory() for _ in range(5)]
    await db.add_endpoint(every.url, tenant="shop-a")
    await db.add_endpoint(points.url, tenant="shop-a", events=["points.*"])
    await db.add_endpoint(tier.url, tenant="shop-a", events=["tier.upgraded"])
    await db.add_endpoint(other.url, tenant="shop-b")
    await db.add_endpoint(off.url, tenant="shop-a", enabled=False)
    await daemon_factory()
    a_points = await db.insert_events(3, tenant="shop-a", event_type="points.earned")
    a_tier = await db.insert_events(2, tenant="shop-a", event_type="tier.upgraded")
    a_reward = await db.insert_events(1, tenant="shop-a", event_type="reward.redeemed")
    b_points = await db.insert_events(1, tenant="shop-b", event_type="points.earned")
    await wait_until(lambda: settled(db, 6 + 3 + 2 + 1 + 6), message="all deliveries settled")

    assert sorted(every.event_ids()) == sorted(a_points + a_tier + a_reward)
    assert sorted(points.event_ids()) == sorted(a_points)
    assert sorted(tier.event_ids()) == sorted(a_tier)
    assert other.event_ids() == b_points
    assert off.requests == []
    assert await db.count("SELECT count(*) FROM deliveries WHERE status = 'paused'") == 6


async def test_requests_name_the_dispatcher_and_never_send_back_a_receivers_cookie(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def set_cookie(request: web.Request, n: int) -> web.StreamResponse:
        response = web.Response(status=200, text="ok")
        response.set_cookie("session", f"s{n}")
        return response

    r = await receiver_factory(set_cookie)
    await db.add_endpoint(r.url, max_in_flight=1, headers='{"X-Shop": "42"}')
    await daemon_factory()
    ids = await db.insert_events(3)
    await wait_until(lambda: succeeded(db, 3), message="all delivered")

    assert sorted(r.event_ids()) == sorted(ids)
    for req in r.requests:
        assert req.headers["User-Agent"] == f"loyalty-webhook-dispatcher/{__version__}"
        assert req.headers["Content-Type"] == "application/json"
        assert req.headers["Content-Length"] == str(len(req.body))
        assert req.headers["Host"] == r.url.split("/")[2]
        assert req.headers["X-Shop"] == "42"
        assert req.headers["webhook-event-type"] == "points.earned"
        assert "Cookie" not in req.headers
        assert "Accept-Encoding" not in req.headers


async def test_retries_resend_identical_bytes_and_id_on_the_configured_schedule(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def fail_three_times(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500 if n <= 3 else 200)

    r = await receiver_factory(fail_three_times)
    await db.add_endpoint(r.url)
    # A poll far longer than the test's deadline: retries must fire when due, not when polled.
    await daemon_factory(replace(db.config, delivery=replace(db.config.delivery, poll_interval=60)))
    (event_id,) = await db.insert_events(1)
    await wait_until(lambda: settled(db, 1), message="delivery settled")

    assert len(r.requests) == 4
    assert {req.body for req in r.requests} == {r.requests[0].body}
    assert {req.headers["webhook-id"] for req in r.requests} == {event_id}
    assert [req.headers["webhook-attempt"] for req in r.requests] == ["1", "2", "3", "4"]
    gaps = [b.at - a.at for a, b in zip(r.requests, r.requests[1:], strict=False)]
    for gap, scheduled in zip(gaps, (0.05, 0.1, 0.15), strict=True):
        assert gap >= scheduled * 0.95
    attempts = await db.conn.fetch(
        "SELECT attempt, status_code, decision, next_attempt_at FROM attempts ORDER BY attempt"
    )
    assert [(a["attempt"], a["status_code"], a["decision"]) for a in attempts] == [
        (1, 500, "retry"),
        (2, 500, "retry"),
        (3, 500, "retry"),
        (4, 200, "succeeded"),
    ]
    row = await db.row("SELECT status, attempts, last_status_code FROM deliveries")
    assert tuple(row) == ("succeeded", 4, 200)


async def test_delivery_is_failed_after_the_last_scheduled_attempt(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def always_500(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    r = await receiver_factory(always_500)
    await db.add_endpoint(r.url)
    await daemon_factory()
    await db.insert_events(1)
    await wait_until(lambda: settled(db, 1), message="delivery failed")
    row = await db.row("SELECT status, attempts, last_error FROM deliveries")
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "failed",
        4,
        "http_error: HTTP 500",
    )
    assert len(r.requests) == 4
    excerpts = await db.conn.fetch(
        "SELECT response_excerpt, decision FROM attempts ORDER BY attempt"
    )
    assert [e["response_excerpt"] for e in excerpts] == ["boom"] * 4
    assert excerpts[-1]["decision"] == "failed"


async def test_429_with_retry_after_waits_as_long_as_the_receiver_asks(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def slow_down(request: web.Request, n: int) -> web.StreamResponse:
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(status=200)

    r = await receiver_factory(slow_down)
    await db.add_endpoint(r.url)
    await daemon_factory()
    await db.insert_events(1)
    await wait_until(lambda: settled(db, 1), message="delivery settled")
    assert len(r.requests) == 2
    # The schedule says 50 ms; the receiver asked for a second.
    assert r.requests[1].at - r.requests[0].at >= 0.95


async def test_410_disables_the_endpoint_at_once_tells_the_ops_tenant_and_pauses_until_enabled(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    gone = True

    async def maybe_gone(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=410 if gone else 200)

    r = await receiver_factory(maybe_gone)
    eid, _ = await db.add_endpoint(r.url, max_in_flight=1)
    await daemon_factory(replace(db.config, ops=OpsConfig(tenant="ops")))
    await db.insert_events(5)
    await wait_until(lambda: settled(db, 5), message="deliveries paused")
    endpoint = await db.row("SELECT enabled, disabled_reason FROM endpoints")
    assert (endpoint["enabled"], endpoint["disabled_reason"]) == (False, "410 Gone")
    assert await db.statuses() == {"paused": 5}
    assert len(r.requests) == 1
    # Written with the disable, in one transaction: there once the deliveries are paused.
    ops = await db.row("SELECT event_type, payload FROM outbox WHERE tenant = 'ops'")
    payload = json.loads(ops["payload"])
    assert ops["event_type"] == "endpoint.disabled"
    assert (payload["endpoint_id"], payload["tenant"], payload["reason"]) == (
        eid,
        "shop-1",
        "410 Gone",
    )
    assert (payload["last_errors"], payload["held_deliveries"]) == (["http_error: HTTP 410"], 5)

    gone = False
    await db.conn.fetchrow(Q["enable_endpoint"], eid)
    await wait_until(lambda: succeeded(db, 5), message="all delivered after enable")
    assert len(r.requests) == 6


async def test_redirects_are_failures_that_name_the_location_and_are_not_followed(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    target = await receiver_factory()

    async def redirect(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": target.url})

    r = await receiver_factory(redirect)
    await db.add_endpoint(r.url)
    await daemon_factory()
    await db.insert_events(1)
    await wait_until(lambda: settled(db, 1), message="delivery failed")
    assert target.requests == []
    error = await db.conn.fetchval("SELECT error_detail FROM attempts LIMIT 1")
    assert error == f"HTTP 302 to {target.url}"


async def test_a_hanging_receiver_times_out_without_slowing_a_healthy_endpoint(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def hang(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(status=200)

    stuck = await receiver_factory(hang)
    healthy = await receiver_factory()
    await db.add_endpoint(stuck.url, timeout_ms=300)
    await db.add_endpoint(healthy.url, events=["points.*"])
    await daemon_factory()
    ids = await db.insert_events(50)
    await wait_until(lambda: len(healthy.requests) >= 50, timeout=5, message="healthy deliveries")
    assert sorted(healthy.event_ids()) == sorted(ids)
    await wait_until(
        lambda: db.count("SELECT count(*) FROM attempts WHERE error = 'timeout'"),
        message="a timeout recorded",
    )


async def test_loopback_destinations_are_blocked_at_connect_time_unless_allowed(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint("http://127.0.0.1:9/refused", tenant="refused")
    await db.add_endpoint(receiver.url, tenant="private")
    strict = replace(db.config, security=replace(db.config.security, allow_private_networks=False))
    await daemon_factory(strict)
    await db.insert_events(1, tenant="refused")
    await db.insert_events(1, tenant="private")

    async def both_recorded() -> bool:
        return await db.count("SELECT count(DISTINCT endpoint_id) FROM attempts") == 2

    await wait_until(both_recorded, message="both attempts recorded")
    rows = await db.conn.fetch(
        "SELECT e.tenant, a.error FROM attempts a JOIN endpoints e ON e.id = a.endpoint_id"
    )
    errors = {row["tenant"]: row["error"] for row in rows}
    assert errors == {"refused": "blocked_address", "private": "blocked_address"}
    assert receiver.requests == []


async def test_a_closed_port_is_a_connect_error_and_the_daemon_carries_on(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint("http://127.0.0.1:9/refused", tenant="refused")
    await db.add_endpoint(receiver.url)
    await daemon_factory()
    await db.insert_events(1, tenant="refused")
    await db.insert_events(3)
    await wait_until(lambda: len(receiver.requests) == 3, message="healthy deliveries")
    await wait_until(
        lambda: db.count("SELECT count(*) FROM attempts WHERE error = 'connect_error'"),
        message="connect error recorded",
    )


async def test_a_50mb_response_is_read_only_up_to_the_cap(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    big = b"x" * (50 * 1024 * 1024)

    async def huge(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=200, body=big)

    r = await receiver_factory(huge)
    await db.add_endpoint(r.url)
    await daemon_factory()
    await db.insert_events(2)
    await wait_until(lambda: settled(db, 2), message="deliveries settled")
    assert await db.statuses() == {"succeeded": 2}
    lengths = await db.conn.fetch("SELECT length(response_excerpt) AS n FROM attempts")
    assert {row["n"] for row in lengths} == {db.config.delivery.response_excerpt_bytes}


async def test_an_endpoint_that_keeps_failing_gets_two_requests_at_a_time_until_one_succeeds(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    answering = asyncio.Event()

    async def hang_then_slow_ok(request: web.Request, n: int) -> web.StreamResponse:
        if not answering.is_set():
            await asyncio.sleep(30)  # the dispatcher gives up first
        await asyncio.sleep(0.2)
        return web.Response(status=200)

    receiver = await receiver_factory(hang_then_slow_ok)
    await db.add_endpoint(receiver.url, timeout_ms=300)  # max_in_flight: 8 (the default)
    await daemon_factory()
    await db.insert_events(24)
    # The first round (before any failure is recorded) may use the whole cap; once failures
    # are on record, at most FAILING_CAP at a time.
    first = await _first_attempt_end(db, "timeout")
    await wait_until(
        lambda: db.count("SELECT count(*) FROM attempts WHERE attempted_at > $1", first + ONE_S),
        timeout=10,
        message="attempts after the failures were recorded",
    )
    later = await _overlaps(db, "attempted_at > $1", first + ONE_S)
    assert max(later) <= FAILING_CAP, later
    # A success ends the streak: the full cap again.
    answering.set()
    await db.insert_events(16)
    await wait_until(lambda: _successes_at_least(db, 16), timeout=20, message="successes")
    assert max(await _overlaps(db, "status_code = 200", None)) > FAILING_CAP


ONE_S = timedelta(seconds=1)


async def _successes_at_least(db: Db, n: int) -> bool:
    return await db.count("SELECT count(*) FROM attempts WHERE status_code = 200") >= n


async def _first_attempt_end(db: Db, error: str) -> datetime:
    await wait_until(
        lambda: db.count("SELECT count(*) FROM attempts WHERE error = $1", error),
        message=f"a {error} recorded",
    )
    row = await db.row(
        "SELECT min(attempted_at + duration_ms * interval '1 ms') AS t FROM attempts"
        " WHERE error = $1",
        error,
    )
    return row["t"]  # type: ignore[no-any-return]


async def _overlaps(db: Db, where: str, arg: datetime | None) -> list[int]:
    """For each attempt matching `where`, how many matching attempts were under way as it
    started (itself included)."""
    rows = await db.conn.fetch(
        f"SELECT attempted_at AS s, attempted_at + duration_ms * interval '1 ms' AS e"
        f" FROM attempts WHERE {where}",
        *([] if arg is None else [arg]),
    )
    return [sum(1 for o in rows if o["s"] <= r["s"] < o["e"]) for r in rows]
