"""Crash safety and lifecycle: kill -9 mid-delivery, PostgreSQL restarting under the daemon,
two replicas on one database, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest
from aiohttp import web

from dispatcher.db import connect_kwargs, migrate
from dispatcher.pgcluster import EphemeralPostgres
from tests.conftest import Db, Receiver, RunningDaemon, make_config, wait_until

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]


def daemon_env(db: Db, **extra: str) -> dict[str, str]:
    return subprocess_env(db.config.database.dsn, db.schema, **extra)


def subprocess_env(dsn: str, schema: str, **extra: str) -> dict[str, str]:
    """The environment of a `dispatcher run` subprocess: test timings, local receivers allowed."""
    env = dict(os.environ)
    env.update(
        DISPATCHER_DATABASE_DSN=dsn,
        DISPATCHER_DATABASE_SCHEMA=schema,
        DISPATCHER_SECURITY_ALLOW_HTTP="true",
        DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS="true",
        DISPATCHER_DELIVERY_POLL_INTERVAL="50ms",
        DISPATCHER_DELIVERY_TIMEOUT="1s",
        DISPATCHER_DELIVERY_LEASE="2s",
        DISPATCHER_RETRY_SCHEDULE="0s,50ms,100ms,200ms,400ms,800ms",
        DISPATCHER_RETRY_JITTER="0",
        DISPATCHER_HTTP_LISTEN="",
        DISPATCHER_LOG_LEVEL="warning",
    )
    env.update(extra)
    return env


async def start_daemon(db: Db, **extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher", "run", env=daemon_env(db, **extra)
    )


async def count_status(db: Db, status: str) -> int:
    return await db.count("SELECT count(*) FROM deliveries WHERE status = $1", status)


def slow(seconds: float) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return handler


async def test_kill_9_mid_delivery_loses_nothing_and_only_in_flight_work_repeats(
    db: Db, receiver_factory: Factory
) -> None:
    r = await receiver_factory(slow(0.05))
    await db.add_endpoint(r.url, max_in_flight=8)
    ids = await db.insert_events(300)
    first = await start_daemon(db)
    await wait_until(lambda: len(r.requests) >= 60, timeout=20, message="deliveries under way")
    first.kill()
    await first.wait()
    # Whatever the dead process had claimed but not recorded may be sent again; nothing else.
    in_flight = {
        row["event_id"]
        for row in await db.conn.fetch(
            "SELECT event_id FROM deliveries WHERE status = 'delivering'"
        )
    }
    second = await start_daemon(db)
    try:

        async def all_done() -> bool:
            return await count_status(db, "succeeded") == 300

        await wait_until(all_done, timeout=40, message="every delivery succeeded")
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 20) == 0
    seen = Counter(r.event_ids())
    assert set(seen) == set(ids)
    repeated = {eid for eid, n in seen.items() if n > 1}
    assert repeated <= in_flight
    # Claimed and unrecorded: the endpoint's 8 requests in flight, up to 8 more claimed and
    # waiting for one of its slots (twice its cap in hand), and the results of the last round
    # or two still waiting for the batched write-back: a few dozen of 300.
    assert len(in_flight) <= 4 * 8


@pytest.fixture
async def own_cluster() -> AsyncIterator[EphemeralPostgres]:
    """A PostgreSQL of this test's own, so it can be restarted under the daemon."""
    cluster = EphemeralPostgres(durable=False)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


async def test_daemon_survives_postgres_restart_and_delivers_events_from_while_it_was_away(
    own_cluster: EphemeralPostgres, receiver: Receiver
) -> None:
    config = make_config(own_cluster.dsn, "webhooks")
    await migrate(config.database)
    conn = await asyncpg.connect(**connect_kwargs(config.database))
    await conn.execute(
        "INSERT INTO endpoints (tenant, url, secret) VALUES ('shop-1', $1, 'whsec_' || $2)",
        receiver.url,
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    await conn.execute(
        "INSERT INTO outbox (tenant, event_type, payload)"
        " SELECT 'shop-1', 'points.earned', '{}' FROM generate_series(1, 20)"
    )
    from dispatcher.daemon import Dispatcher

    daemon = await RunningDaemon(Dispatcher(config)).ready()
    try:
        await wait_until(lambda: len(receiver.requests) >= 20, message="first deliveries")
        await conn.close()
        await asyncio.to_thread(own_cluster.restart)
        conn = await asyncpg.connect(**connect_kwargs(config.database))
        # Inserted before the daemon's listener is back: no notification reaches it.
        await conn.execute(
            "INSERT INTO outbox (tenant, event_type, payload)"
            " SELECT 'shop-1', 'points.earned', '{}' FROM generate_series(1, 30)"
        )

        async def all_done() -> bool:
            n = await conn.fetchval("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")
            return bool(n == 50)

        await wait_until(all_done, timeout=30, message="all 50 delivered after the restart")
        await wait_until(lambda: daemon.dispatcher.listener.reconnects >= 1, message="relisten")
    finally:
        await daemon.stop()
        await conn.close()
    assert len(set(receiver.event_ids())) == 50


async def test_two_daemons_on_one_database_deliver_each_event_once(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint(receiver.url)
    await db.add_endpoint(receiver.url, tenant="shop-1", events=["points.*"])
    await daemon_factory()
    await daemon_factory(replace(db.config))
    ids = await db.insert_events(400)

    async def all_done() -> bool:
        return await count_status(db, "succeeded") == 800

    await wait_until(all_done, timeout=30, message="800 deliveries")
    per_event = Counter(receiver.event_ids())
    assert set(per_event) == set(ids)
    assert set(per_event.values()) == {2}  # two endpoints, once each


async def test_sigterm_lets_in_flight_requests_finish_records_them_and_exits_0(
    db: Db, receiver_factory: Factory
) -> None:
    r = await receiver_factory(slow(0.5))
    await db.add_endpoint(r.url, max_in_flight=5)
    await db.insert_events(20)
    proc = await start_daemon(db, DISPATCHER_DELIVERY_SHUTDOWN_GRACE="5s")
    await wait_until(lambda: len(r.requests) >= 5, timeout=20, message="requests in flight")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert await count_status(db, "delivering") == 0
    assert await count_status(db, "succeeded") == len(r.requests)
    assert await count_status(db, "pending") == 20 - len(r.requests)


async def test_sigterm_past_the_grace_period_releases_unfinished_work_and_exits_0(
    db: Db, receiver_factory: Factory
) -> None:
    r = await receiver_factory(slow(30))
    await db.add_endpoint(r.url, max_in_flight=4, timeout_ms=60000)
    await db.insert_events(10)
    proc = await start_daemon(
        db,
        DISPATCHER_DELIVERY_SHUTDOWN_GRACE="300ms",
        DISPATCHER_DELIVERY_TIMEOUT="30s",
        DISPATCHER_DELIVERY_LEASE="70s",
    )
    await wait_until(lambda: len(r.requests) >= 4, timeout=20, message="requests in flight")
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    assert await db.statuses() == {"pending": 10}
    assert await db.count("SELECT max(attempts) FROM deliveries") == 0


async def test_an_internal_error_stops_the_daemon_cleanly_and_says_so(
    db: Db, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatcher import claiming
    from dispatcher.daemon import Dispatcher
    from dispatcher.errors import DaemonCrashed

    async def broken(*args: object) -> tuple[int, int]:
        raise ValueError("a bug")

    monkeypatch.setattr(claiming, "fan_out", broken)
    with pytest.raises(DaemonCrashed, match="a bug"):
        await asyncio.wait_for(Dispatcher(db.config).run(), 10)
    assert await db.count("SELECT count(*) FROM listeners WHERE idle") == 0
