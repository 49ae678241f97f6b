"""Shared fixtures: a real PostgreSQL, a fresh schema per test, real HTTP receivers on 127.0.0.1,
and the daemon running in the test's event loop (or as a subprocess where a test kills it)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from dispatcher import logs
from dispatcher.clock import Clock
from dispatcher.config import (
    Config,
    DatabaseConfig,
    DeliveryConfig,
    HttpConfig,
    RetryConfig,
    SecurityConfig,
)
from dispatcher.daemon import Dispatcher
from dispatcher.db import connect_kwargs, migrate
from dispatcher.pgcluster import EphemeralPostgres
from dispatcher.signing import generate_secret

logs.configure("console", os.environ.get("DISPATCHER_TEST_LOG_LEVEL", "warning"))


async def wait_until(
    condition: Callable[[], Awaitable[object]] | Callable[[], object],
    timeout: float = 10.0,
    message: str = "condition",
) -> None:
    """Poll `condition` until it holds; fail with `message` when `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DISPATCHER_TEST_DSN, or a throwaway cluster started for this test session."""
    dsn = os.environ.get("DISPATCHER_TEST_DSN")
    if dsn:
        yield dsn
        return
    with EphemeralPostgres(durable=False) as cluster:
        yield cluster.dsn


def make_config(dsn: str, schema: str, **delivery: Any) -> Config:
    """Test settings: local receivers allowed, millisecond polling and a millisecond schedule."""
    return Config(
        database=DatabaseConfig(dsn=dsn, schema=schema, pool_size=6),
        delivery=replace(
            DeliveryConfig(
                poll_interval=0.05,
                flush_interval=0.005,
                shutdown_grace=5.0,
                lease=30.0,
                timeout=2.0,
            ),
            **delivery,
        ),
        retry=RetryConfig(schedule=(0.0, 0.05, 0.1, 0.15), jitter=0.0, retry_after_max=5.0),
        security=SecurityConfig(allow_http=True, allow_private_networks=True),
        http=HttpConfig(listen=""),
    )


@dataclass
class Db:
    """One test's schema: its config, a connection, and helpers to write rows the way users do."""

    config: Config
    conn: asyncpg.Connection

    @property
    def schema(self) -> str:
        return self.config.database.schema

    async def add_endpoint(
        self,
        url: str,
        tenant: str = "shop-1",
        events: list[str] | None = None,
        profile: str = "standard",
        secret: str | None = None,
        enabled: bool = True,
        **columns: Any,
    ) -> tuple[int, str]:
        secret = secret or generate_secret(profile)
        values = {
            "tenant": tenant,
            "url": url,
            "event_types": events or [],
            "profile": profile,
            "secret": secret,
            "enabled": enabled,
            **columns,
        }
        names = ", ".join(values)
        params = ", ".join(f"${i}" for i in range(1, len(values) + 1))
        eid = await self.conn.fetchval(
            f"INSERT INTO endpoints ({names}) VALUES ({params}) RETURNING id", *values.values()
        )
        return int(eid), secret

    async def insert_events(
        self,
        n: int,
        tenant: str = "shop-1",
        event_type: str = "points.earned",
        ordering_key: str | None = None,
    ) -> list[str]:
        rows = await self.conn.fetch(
            "INSERT INTO outbox (tenant, event_type, payload, ordering_key)"
            " SELECT $1, $2, jsonb_build_object('customer_id', 'cust_' || i, 'amount', i), $3"
            " FROM generate_series(1, $4) AS i RETURNING event_id",
            tenant,
            event_type,
            ordering_key,
            n,
        )
        return [r["event_id"] for r in rows]

    async def statuses(self) -> dict[str, int]:
        rows = await self.conn.fetch("SELECT status, count(*) AS n FROM deliveries GROUP BY 1")
        return {r["status"]: r["n"] for r in rows}

    async def row(self, sql: str, *args: Any) -> asyncpg.Record:
        """The one row a query must return."""
        found = await self.conn.fetchrow(sql, *args)
        assert found is not None, sql
        return found

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.conn.fetchval(sql, *args))


@pytest.fixture
async def own_cluster() -> AsyncIterator[EphemeralPostgres]:
    """A PostgreSQL of the test's own, so it can be stopped or restarted under the daemon."""
    cluster = EphemeralPostgres(durable=False)
    await asyncio.to_thread(cluster.start)
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.cleanup)


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Db]:
    """A fresh, migrated schema for one test, dropped afterwards."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    config = make_config(pg_dsn, schema)
    await migrate(config.database)
    conn = await asyncpg.connect(**connect_kwargs(config.database))
    try:
        yield Db(config, conn)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


@dataclass
class Received:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


Behaviour = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


@dataclass
class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request and answers per `behaviour`."""

    behaviour: Behaviour | None = None
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic()))
        if self.behaviour is None:
            return web.Response(status=200, text="ok")
        return await self.behaviour(request, len(self.requests))

    def event_ids(self) -> list[str]:
        return [r.headers["webhook-id"] for r in self.requests if "webhook-id" in r.headers]


@pytest.fixture
async def receiver_factory() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    started: list[Receiver] = []

    async def make(behaviour: Behaviour | None = None) -> Receiver:
        r = await Receiver(behaviour).start()
        started.append(r)
        return r

    yield make
    for r in started:
        await r.stop()


@pytest.fixture
async def receiver(receiver_factory: Callable[..., Awaitable[Receiver]]) -> Receiver:
    return await receiver_factory()


class RunningDaemon:
    """A Dispatcher running as a task in the test's loop."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.task: asyncio.Task[None] = asyncio.create_task(dispatcher.run())

    async def ready(self) -> RunningDaemon:
        waiter = asyncio.ensure_future(self.dispatcher.ready.wait())
        done, _ = await asyncio.wait({waiter, self.task}, timeout=15, return_when="FIRST_COMPLETED")
        if self.task in done:
            waiter.cancel()
            self.task.result()
        assert waiter in done, "daemon did not become ready"
        return self

    async def stop(self) -> None:
        self.dispatcher.stop.set()
        await asyncio.wait_for(self.task, 30)


@pytest.fixture
async def daemon_factory(db: Db) -> AsyncIterator[Callable[..., Awaitable[RunningDaemon]]]:
    running: list[RunningDaemon] = []

    async def make(config: Config | None = None, clock: Clock | None = None) -> RunningDaemon:
        d = await RunningDaemon(Dispatcher(config or db.config, clock=clock)).ready()
        running.append(d)
        return d

    yield make
    for d in running:
        if not d.task.done():
            await d.stop()
