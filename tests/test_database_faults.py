"""A failing database under a running daemon: its listener connection killed, the server gone
for seconds, a pool too small for the load, a transaction holding back vacuum, and connections
that go silent (a network path dropping packets, a failover). Each time the daemon says what is
wrong, keeps trying, and ends with every event delivered; asked to stop, it stops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest
import structlog
from aiohttp import web

from dispatcher import daemon as daemon_module
from dispatcher.config import Config, HttpConfig, RetentionConfig
from dispatcher.daemon import Dispatcher
from dispatcher.db import connect_kwargs, migrate
from dispatcher.pgcluster import EphemeralPostgres
from tests.conftest import Db, Receiver, RunningDaemon, make_config, wait_until

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reconnects(daemon: RunningDaemon) -> float:
    """The daemon's listener-reconnect counter, as /metrics reports it."""
    value = daemon.dispatcher.metrics.registry.get_sample_value("webhook_listener_reconnects_total")
    return value or 0.0


async def listener_pid(conn: asyncpg.Connection, schema: str) -> int | None:
    """The backend holding the daemon's LISTEN: its last statement is the LISTEN, or the probe
    (no other connection of the daemon runs a bare SELECT 1)."""
    pid = await conn.fetchval(
        "SELECT pid FROM pg_stat_activity WHERE query IN ($1, 'SELECT 1')"
        " AND application_name = 'webhook-dispatcher' AND pid <> pg_backend_pid()",
        f'LISTEN "{schema}.outbox"',
    )
    return None if pid is None else int(pid)


async def succeeded(db: Db) -> int:
    return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'")


async def test_a_terminated_listener_is_back_at_once_every_time_and_misses_no_event(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint(receiver.url)
    # A long poll: events inserted while the listener is down reach the daemon only because
    # every reconnect wakes the pump, not because it polls.
    daemon = await daemon_factory(
        replace(db.config, delivery=replace(db.config.delivery, poll_interval=30.0))
    )
    listener = daemon.dispatcher.listener
    with structlog.testing.capture_logs() as logged:
        expected = 0
        # More cuts than the reconnect backoff has steps: a backoff that kept growing across
        # connections would, by the last ones, wait up to its 10 s cap.
        cuts = 8
        for cut in range(1, cuts + 1):
            await wait_until(
                lambda: db.count("SELECT count(*) FROM listeners WHERE idle"),
                message="the daemon idle, waiting for notifications",
            )
            pid = await listener_pid(db.conn, db.schema)
            assert pid is not None, "no LISTEN connection"
            assert await db.conn.fetchval("SELECT pg_terminate_backend($1)", pid)
            # The listener noticed (it may be back already: it reconnects within 0.2 s).
            await wait_until(
                lambda n=cut: sum(e["event"] == "listener_disconnected" for e in logged) == n,
                message="listener down",
            )
            await db.insert_events(25)
            expected += 25
            started = time.monotonic()

            async def all_delivered(n: int = expected) -> bool:
                return await succeeded(db) == n

            await wait_until(all_delivered, timeout=3, message=f"delivery after cut {cut}")
            await wait_until(lambda: listener.connected, timeout=3, message="listener back")
            assert time.monotonic() - started < 3
            await wait_until(
                lambda n=cut: reconnects(daemon) == n,
                message=f"{cut} reconnects counted",
            )
    warnings = [e for e in logged if e["event"] == "listener_disconnected"]
    assert len(warnings) == cuts
    assert all(w["log_level"] == "warning" for w in warnings)
    assert {w["error"] for w in warnings} == {"ConnectionResetError"}
    assert all(0 <= w["retry_in_s"] <= 1 for w in warnings), warnings
    assert listener.reconnects == cuts
    assert Counter(receiver.event_ids()).most_common(1)[0][1] == 1
    assert len(receiver.requests) == expected


def slow(seconds: float) -> Callable[[web.Request, int], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request, n: int) -> web.StreamResponse:
        await asyncio.sleep(seconds)
        return web.Response(status=200)

    return handler


async def readyz(http: aiohttp.ClientSession) -> tuple[int, str]:
    async with http.get("/readyz") as resp:
        return resp.status, await resp.text()


async def insert_events(conn: asyncpg.Connection, n: int) -> list[str]:
    rows = await conn.fetch(
        "INSERT INTO outbox (tenant, event_type, payload)"
        " SELECT 'shop-1', 'points.earned', jsonb_build_object('n', i)"
        " FROM generate_series(1, $1) AS i RETURNING event_id",
        n,
    )
    return [r["event_id"] for r in rows]


async def test_a_database_gone_for_seconds_is_retried_with_backoff_reported_and_loses_nothing(
    own_cluster: EphemeralPostgres, receiver_factory: Factory
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    config = replace(make_config(own_cluster.dsn, "webhooks"), http=HttpConfig(listen=listen))
    await migrate(config.database)
    # Slow enough that requests are in flight when the server goes, and a backlog is left.
    r = await receiver_factory(slow(0.05))
    conn = await asyncpg.connect(**connect_kwargs(config.database))
    await conn.execute(
        "INSERT INTO endpoints (tenant, url, secret) VALUES ('shop-1', $1, $2)",
        r.url,
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    )
    ids = await insert_events(conn, 400)
    await conn.close()
    daemon = await RunningDaemon(Dispatcher(config)).ready()
    http = aiohttp.ClientSession(f"http://{listen}")
    try:

        async def ready() -> bool:
            return (await readyz(http))[0] == 200

        await wait_until(ready, message="/readyz 200")
        await wait_until(lambda: len(r.requests) >= 50, message="deliveries under way")
        with structlog.testing.capture_logs() as logged:
            down_at = time.monotonic()
            await asyncio.to_thread(own_cluster.stop, "fast")

            def pump_warnings() -> list[MutableMapping[str, Any]]:
                return [e for e in logged if e["event"] == "database_unavailable"]

            async def reported_down() -> bool:
                status, text = await readyz(http)
                return (
                    status == 503
                    and "database unreachable" in text
                    and "listener not connected" in text
                )

            await wait_until(reported_down, message="/readyz 503 naming the failing checks")
            # Down for at least 5 s, and long enough for the backoff to have grown.
            await wait_until(
                lambda: time.monotonic() - down_at >= 5 and len(pump_warnings()) >= 4,
                timeout=20,
                message="5 s of outage",
            )
            during = pump_warnings()
            await asyncio.to_thread(own_cluster.start)
            conn = await asyncpg.connect(**connect_kwargs(config.database))
            # Inserted before the daemon is back: its listener hears no notification of them.
            ids += await insert_events(conn, 100)
            await wait_until(ready, timeout=15, message="/readyz 200 after the outage")

            async def all_done() -> bool:
                n = await conn.fetchval(
                    "SELECT count(*) FROM deliveries WHERE status = 'succeeded'"
                )
                return bool(n == 500)

            await wait_until(all_done, timeout=30, message="every event delivered")
    finally:
        await http.close()
        await daemon.stop()
    await conn.close()
    # Backoff, not a busy loop: a handful of tries, each waiting longer than the first.
    assert 4 <= len(during) <= 15, [e["retry_in_s"] for e in during]
    for e in during:
        assert e["log_level"] == "warning"
        assert e["error"], e
        assert e["detail"], e
        assert e["retry_in_s"] > 0, e
    assert max(e["retry_in_s"] for e in during) > 2 * during[0]["retry_in_s"]
    listener_warnings = [e for e in logged if e["event"] == "listener_disconnected"]
    assert listener_warnings
    assert all(e["retry_in_s"] <= 10 for e in listener_warnings)
    # Requests in flight when the server went finished meanwhile; their results waited.
    unrecorded = [e for e in logged if e["event"] == "results_not_recorded"]
    assert unrecorded
    assert unrecorded[0]["pending_results"] > 0
    # One connection re-established, however many attempts it took.
    assert daemon.dispatcher.listener.reconnects == 1
    assert reconnects(daemon) == 1
    # Nothing lost, and with the outage shorter than the lease nothing sent twice either.
    assert Counter(r.event_ids()) == Counter(ids)


async def produce(dsn: str, schema: str, events: int, chunk: int) -> list[str]:
    """One backend session inserting `events` in `chunk`-row transactions, as the backend does."""
    conn = await asyncpg.connect(
        dsn, server_settings={"search_path": f'"{schema}"', "application_name": "producer"}
    )
    ids: list[str] = []
    try:
        for _ in range(events // chunk):
            ids += await insert_events(conn, chunk)
    finally:
        await conn.close()
    return ids


async def test_a_burst_through_a_pool_of_two_connections_completes_without_deadlock(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    a, b = await receiver_factory(), await receiver_factory()
    await db.add_endpoint(a.url)
    await db.add_endpoint(b.url)
    base = db.config
    # Two connections for the pump, the writer, endpoint refreshes, and a pruner and a backlog
    # sampler that each want one every 20 ms: every one of them waits for the pool in turn.
    config = replace(
        base,
        database=replace(base.database, pool_size=2),
        delivery=replace(base.delivery, concurrency=256, per_endpoint_concurrency=64),
        retention=RetentionConfig(interval=0.02),
        log=replace(base.log, summary_interval=0.02),
    )
    daemon = await daemon_factory(config)
    most = 0

    async def watch_connections() -> None:
        nonlocal most
        conn = await asyncpg.connect(base.database.dsn)
        try:
            while True:
                n = await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'webhook-dispatcher' AND pid <> $1",
                    db.conn.get_server_pid(),
                )
                most = max(most, n)
                await asyncio.sleep(0.02)
        finally:
            await conn.close()

    watcher = asyncio.create_task(watch_connections())
    with structlog.testing.capture_logs() as logged:
        batches = await asyncio.gather(
            *(produce(base.database.dsn, db.schema, 500, 50) for _ in range(4))
        )
        ids = [i for batch in batches for i in batch]

        async def all_done() -> bool:
            return await succeeded(db) == 2 * len(ids)

        await wait_until(all_done, timeout=45, message="4,000 deliveries through 2 connections")
    watcher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await watcher
    assert len(ids) == 2000
    assert Counter(a.event_ids()) == Counter(ids)
    assert Counter(b.event_ids()) == Counter(ids)
    # The pool stayed at two, plus the listener's own connection.
    assert most <= 3, most
    assert not [e for e in logged if e["log_level"] in ("error", "critical")]
    assert daemon.dispatcher.database_ok


async def test_while_results_cannot_be_recorded_the_daemon_stops_claiming_after_one_round(
    db: Db, receiver: Receiver, daemon_factory: Daemons, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer held up (here by a lock on the attempt log) must not let the pump claim and send
    on: every result unrecorded is a request a crash would send again."""
    monkeypatch.setattr(daemon_module, "PAUSE_WARN_AFTER", 0.05)
    await db.add_endpoint(receiver.url)
    concurrency = 8
    config = replace(
        db.config, delivery=replace(db.config.delivery, concurrency=concurrency, batch_size=4)
    )
    blocker = await asyncpg.connect(db.config.database.dsn)
    try:
        with structlog.testing.capture_logs() as logged:
            daemon = await daemon_factory(config)
            d = daemon.dispatcher
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(f'LOCK TABLE "{db.schema}".attempts IN SHARE MODE')
            ids = await db.insert_events(200)
            await wait_until(
                lambda: any(e["event"] == "claims_paused" for e in logged),
                message="claims paused",
            )
            await wait_until(lambda: d.in_flight == 0, message="requests in flight finished")
            # The results waiting (under twice the concurrency) and what was claimed before the
            # pause, running or waiting for a slot (twice the cap in hand), at most: the rest
            # stay unsent.
            assert len(receiver.requests) <= 4 * concurrency, len(receiver.requests)
            delivering = await db.count(
                "SELECT count(*) FROM deliveries WHERE status = 'delivering'"
            )
            assert delivering <= 4 * concurrency, delivering
            gauge = d.metrics.registry.get_sample_value("webhook_results_unrecorded")
            assert gauge is not None
            assert gauge >= 2 * concurrency
            await tx.rollback()

            async def all_done() -> bool:
                return await succeeded(db) == len(ids)

            await wait_until(all_done, timeout=20, message="every delivery once the lock is gone")
    finally:
        await blocker.close()
    assert sorted(set(receiver.event_ids())) == sorted(ids)


async def test_a_snapshot_held_open_elsewhere_does_not_stop_deliveries(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint(receiver.url)
    await daemon_factory()
    # A reporting job's REPEATABLE READ transaction, left open: its snapshot keeps every row
    # version the daemon obsoletes from here on, so vacuum can remove none of them.
    holder = await asyncpg.connect(**connect_kwargs(db.config.database))
    tx = holder.transaction(isolation="repeatable_read")
    await tx.start()
    try:
        await holder.fetchval("SELECT count(*) FROM deliveries")
        horizon = await db.conn.fetchval(
            "SELECT backend_xmin FROM pg_stat_activity WHERE pid = $1", holder.get_server_pid()
        )
        assert horizon is not None
        ids: list[str] = []
        for wave in range(2):
            ids += await db.insert_events(1000)

            async def all_done(n: int = len(ids)) -> bool:
                return await succeeded(db) == n

            await wait_until(all_done, timeout=30, message=f"wave {wave + 1} delivered")
        # The horizon never moved, and vacuum found dead rows it was not allowed to remove.
        assert horizon == await db.conn.fetchval(
            "SELECT backend_xmin FROM pg_stat_activity WHERE pid = $1", holder.get_server_pid()
        )
        notices: list[str] = []

        def hear(_conn: object, message: object) -> None:
            notices.append(str(message))

        db.conn.add_log_listener(hear)
        try:
            await db.conn.execute("VACUUM (VERBOSE) deliveries")
        finally:
            db.conn.remove_log_listener(hear)
        kept = [m for n in notices if (m := re.search(r"(\d+) are dead but not yet removable", n))]
        assert kept, notices
        assert int(kept[0][1]) > 0, notices
    finally:
        await tx.rollback()
        await holder.close()
    assert Counter(receiver.event_ids()) == Counter(ids)


class Proxy:
    """A TCP relay in front of PostgreSQL that can black-hole traffic: bytes stop flowing both
    ways but no socket is closed, as when a network path or a failed-over primary's address
    goes silent. `heal()` lets new connections through again; old ones stay silent."""

    def __init__(self, port: int) -> None:
        self.target_port = port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._generation = 0
        self._silenced: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        # Messages that went into the hole.
        self.swallowed = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def blackhole(self) -> None:
        """Silence every connection open now, and every one opened until `heal()`."""
        self._silenced.add(self._generation)
        self._generation += 1
        self._silenced.add(self._generation)

    def heal(self) -> None:
        """New connections work again; those silenced stay silent."""
        self._generation += 1

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        generation = self._generation
        self._writers.append(writer)
        if generation in self._silenced:
            return  # accepted, and never a byte in reply
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst, generation))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, generation: int
    ) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                if generation in self._silenced:
                    self.swallowed += 1
                    await asyncio.Event().wait()  # swallow it, forever
                dst.write(data)
                await dst.drain()
        dst.close()


LEASE = 2.0


@pytest.fixture
async def proxied(db: Db) -> AsyncIterator[tuple[Proxy, Config]]:
    """A Proxy in front of the test's PostgreSQL, and the test's config reaching it through
    the proxy, with short timeouts: a 1 s connect timeout and a 2 s lease (so statements on
    the daemon's pool give up after 2 s)."""
    host_port = db.config.database.dsn.rsplit("@", 1)[1].split("/", 1)[0]
    proxy = await Proxy(int(host_port.rsplit(":", 1)[1])).start()
    dsn = db.config.database.dsn.replace(host_port, f"127.0.0.1:{proxy.port}")
    config = replace(
        db.config,
        database=replace(db.config.database, dsn=dsn, connect_timeout=1.0),
        delivery=replace(db.config.delivery, lease=LEASE, timeout=1.0, shutdown_grace=1.0),
    )
    try:
        yield proxy, config
    finally:
        await proxy.close()
        # The connections given up on are garbage now; collect them here, not at some later
        # moment inside another test (or pytest's own compile(), which CPython 3.11 does not
        # survive when a finalizer runs in the middle of it).
        gc.collect()


async def test_a_database_connection_gone_silent_does_not_hang_the_daemon(
    db: Db, receiver: Receiver, daemon_factory: Daemons, proxied: tuple[Proxy, Config]
) -> None:
    proxy, config = proxied
    await db.add_endpoint(receiver.url)
    daemon = await daemon_factory(config)
    with structlog.testing.capture_logs() as logged:
        ids = await db.insert_events(50)

        async def done(n: int) -> bool:
            return await succeeded(db) == n

        await wait_until(lambda: done(50), message="deliveries before")
        # The path to the server goes silent until a statement has gone into the hole; then
        # a failover: new connections reach the server again, the daemon's old ones never
        # answer. Events inserted meanwhile must not wait for TCP to give up.
        proxy.blackhole()
        ids += await db.insert_events(50)
        await wait_until(lambda: proxy.swallowed > 0, message="a statement lost")
        proxy.heal()
        healed = time.monotonic()
        ids += await db.insert_events(50)
        await wait_until(lambda: done(150), timeout=15, message="deliveries after failover")
        recovered_in = time.monotonic() - healed
    await daemon.stop()
    # About one statement timeout (a lease), then a retry on a new connection; without a
    # timeout the daemon waited for as long as the old connections stayed silent.
    assert recovered_in < 2 * LEASE + 2, recovered_in
    assert any(
        e["event"] == "database_unavailable" and e["error"] == "TimeoutError" for e in logged
    )
    # Nothing was claimed through the hole, so nothing was sent twice.
    assert Counter(receiver.event_ids()) == Counter(ids)


async def test_a_stop_while_the_database_is_silent_still_exits_in_bounded_time(
    db: Db, receiver: Receiver, daemon_factory: Daemons, proxied: tuple[Proxy, Config]
) -> None:
    proxy, config = proxied
    await db.add_endpoint(receiver.url)
    daemon = await daemon_factory(config)
    await db.insert_events(20)

    async def done() -> bool:
        return await succeeded(db) == 20

    await wait_until(done, message="deliveries before")
    # Every connection of the pool open (idle ones too) when the path goes silent.
    pool = daemon.dispatcher.pool
    await asyncio.gather(*(pool.execute("SELECT pg_sleep(0.05)") for _ in range(6)))
    proxy.blackhole()
    await wait_until(lambda: proxy.swallowed > 0, message="a statement lost")
    stopping = time.monotonic()
    daemon.dispatcher.stop.set()
    await asyncio.wait_for(daemon.task, 30)
    took = time.monotonic() - stopping
    # The statement in progress gives up after a lease; then a few bounded steps (grace,
    # handing claims back, deregistering, closing the pool), never an unbounded wait.
    assert took < LEASE + 1.0 + 5 + 2 + 5, took
