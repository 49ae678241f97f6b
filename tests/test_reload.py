"""SIGHUP reloads the config: live limits, retry schedule and log settings change for what
starts next, in-flight requests finish, an invalid config is refused and the old one kept."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web

from dispatcher.config import Config, load_config
from dispatcher.daemon import Dispatcher
from tests.conftest import Db, Receiver, RunningDaemon, make_config, wait_until
from tests.test_endpoint_health import captured_logs
from tests.test_lifecycle import daemon_env

Factory = Callable[..., Awaitable[Receiver]]


class Reloadable:
    """The config a test's daemon reads at each reload: a value, or a file and environment."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.file: tuple[Path, dict[str, str]] | None = None

    def __call__(self) -> Config:
        if self.file is not None:
            return load_config(*self.file)
        return self.config

    def delivery(self, **changes: Any) -> None:
        self.config = replace(self.config, delivery=replace(self.config.delivery, **changes))


@pytest.fixture
async def reloadable_daemon(
    db: Db,
) -> AsyncIterator[Callable[[Config], Awaitable[tuple[RunningDaemon, Reloadable]]]]:
    running: list[RunningDaemon] = []

    async def make(config: Config) -> tuple[RunningDaemon, Reloadable]:
        source = Reloadable(config)
        d = await RunningDaemon(Dispatcher(config, reload=source)).ready()
        running.append(d)
        return d, source

    yield make
    for d in running:
        if not d.task.done():
            await d.stop()


class Gated:
    """A receiver behaviour: each request waits until it is let through (or the gate is open),
    and the number of requests in progress at each arrival is recorded."""

    def __init__(self) -> None:
        self.is_open = False
        self.held: list[asyncio.Event] = []
        self.active = 0
        self.at_arrival: list[int] = []

    async def __call__(self, request: web.Request, n: int) -> web.StreamResponse:
        self.active += 1
        self.at_arrival.append(self.active)
        through = asyncio.Event()
        self.held.append(through)
        try:
            if not self.is_open:
                await through.wait()
        finally:
            self.active -= 1
        return web.Response(status=200)

    def open(self) -> None:
        self.is_open = True
        for e in self.held:
            e.set()


async def count(db: Db, status: str) -> int:
    return await db.count("SELECT count(*) FROM deliveries WHERE status = $1", status)


async def test_new_limits_apply_to_what_starts_next_while_in_flight_requests_finish(
    db: Db, receiver_factory: Factory, reloadable_daemon: Any
) -> None:
    gated = Gated()
    r = await receiver_factory(gated)
    await db.add_endpoint(r.url)
    config = make_config(
        db.config.database.dsn,
        db.schema,
        concurrency=8,
        per_endpoint_concurrency=4,
        timeout=10.0,  # requests wait for the test to let them through
    )
    daemon, source = await reloadable_daemon(config)
    d: Dispatcher = daemon.dispatcher
    await db.insert_events(20)

    async def four_running_four_waiting() -> bool:
        return len(r.requests) == 4 and await count(db, "delivering") == 8

    await wait_until(four_running_four_waiting, message="4 requests in flight, 4 claimed")
    in_flight = set(r.event_ids())

    source.delivery(concurrency=2, per_endpoint_concurrency=1)
    assert d.reload_config()
    assert d.config.delivery.per_endpoint_concurrency == 1
    assert d.in_flight == 4  # nothing more started, nothing dropped

    # Running jobs finish one by one; none starts until the endpoint is below its new cap.
    for k in range(1, 4):
        gated.held[k - 1].set()

        async def recorded(k: int = k) -> bool:
            return await count(db, "succeeded") == k

        await wait_until(recorded, message=f"{k} recorded")
        # The finished task leaves the running set in its done-callback, maybe a beat later.
        await wait_until(lambda k=k: d.in_flight == 4 - k, message=f"{4 - k} in flight")
        assert len(r.requests) == 4
    gated.open()

    async def all_succeeded() -> bool:
        return await count(db, "succeeded") == 20

    await wait_until(all_succeeded, message="20 deliveries recorded")
    rows = await db.conn.fetch(
        "SELECT o.event_id FROM deliveries d JOIN outbox o ON o.seq = d.event_seq"
        " WHERE d.status = 'succeeded' AND d.attempts = 1"
    )
    assert in_flight <= {row["event_id"] for row in rows}
    # After the 4 that were under way, one request at a time.
    assert gated.at_arrival[:4] == [1, 2, 3, 4]
    assert set(gated.at_arrival[4:]) == {1}

    # Raising the limits starts the job that waited for a slot at once.
    gated.is_open = False
    await db.insert_events(2)

    async def one_running_one_waiting() -> bool:
        return gated.active == 1 and await count(db, "delivering") == 2

    await wait_until(one_running_one_waiting, message="one in flight, one claimed")
    source.delivery(concurrency=8, per_endpoint_concurrency=4)
    assert d.reload_config()
    # The first request is still held, so no slot frees up: only the raised limits can start
    # the second (the pump may still be handing it over when the reload lands).
    await wait_until(lambda: d.in_flight == 2, message="the waiting job started")
    await wait_until(lambda: gated.active == 2, message="2 requests in flight")
    gated.open()

    async def all_recorded() -> bool:
        return await count(db, "succeeded") == 22

    await wait_until(all_recorded, message="22 deliveries recorded")


async def test_a_changed_retry_schedule_applies_to_the_next_failure(
    db: Db, receiver_factory: Factory, reloadable_daemon: Any
) -> None:
    async def failing(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500)

    r = await receiver_factory(failing)
    await db.add_endpoint(r.url)
    config = make_config(db.config.database.dsn, db.schema)
    config = replace(config, retry=replace(config.retry, schedule=(0.0, 3600.0, 3600.0)))
    daemon, source = await reloadable_daemon(config)
    [first] = await db.insert_events(1)

    async def first_waits_an_hour() -> bool:
        return (
            await db.count(
                "SELECT count(*) FROM deliveries WHERE status = 'pending' AND attempts = 1"
                " AND next_attempt_at > now() + interval '50 minutes'"
            )
            == 1
        )

    await wait_until(first_waits_an_hour, message="first failure scheduled an hour out")

    source.config = replace(config, retry=replace(config.retry, schedule=(0.0, 0.05, 0.05)))
    assert daemon.dispatcher.reload_config()
    assert daemon.dispatcher.policy.config.schedule == (0.0, 0.05, 0.05)
    [second] = await db.insert_events(1)

    async def second_failed() -> bool:
        return await count(db, "failed") == 1

    await wait_until(second_failed, message="the second event's schedule ran out")
    row = await db.row(
        "SELECT o.event_id, d.attempts FROM deliveries d JOIN outbox o ON o.seq = d.event_seq"
        " WHERE d.status = 'failed'"
    )
    assert (row["event_id"], row["attempts"]) == (second, 3)
    assert await count(db, "pending") == 1  # the first one still waits its hour
    assert r.event_ids().count(first) == 1


async def test_an_invalid_config_is_refused_and_the_old_one_kept(
    db: Db, receiver: Receiver, reloadable_daemon: Any, tmp_path: Path
) -> None:
    await db.add_endpoint(receiver.url)
    config = make_config(db.config.database.dsn, db.schema, concurrency=16)
    daemon, source = await reloadable_daemon(config)
    path = tmp_path / "dispatcher.toml"
    path.write_text("[delivery]\nconcurrency = 4\nper_endpoint_concurrency = 8\n")
    source.file = (path, {"DISPATCHER_DATABASE_DSN": db.config.database.dsn})
    with structlog.testing.capture_logs() as logged:
        assert not daemon.dispatcher.reload_config()
    assert logged == [
        {
            "event": "config_reload_refused",
            "log_level": "error",
            "error": f"{path}: [delivery] per_endpoint_concurrency: must be between 1 and"
            " concurrency",
        }
    ]
    assert daemon.dispatcher.config == config
    await db.insert_events(5)

    async def delivered() -> bool:
        return await count(db, "succeeded") == 5

    await wait_until(delivered, message="still delivering")


async def test_keys_that_need_a_restart_are_named_and_the_rest_applied(
    db: Db, reloadable_daemon: Any
) -> None:
    config = make_config(db.config.database.dsn, db.schema)
    daemon, source = await reloadable_daemon(config)
    source.config = replace(
        config,
        database=replace(config.database, pool_size=3, dsn=config.database.dsn + "?x=secret"),
        delivery=replace(config.delivery, lease=40.0, batch_size=7),
        disable=replace(config.disable, after_failures=3),
    )
    with structlog.testing.capture_logs() as logged:
        assert daemon.dispatcher.reload_config()
    partial = [e for e in logged if e["event"] == "config_reload_partial"]
    assert partial == [
        {
            "event": "config_reload_partial",
            "log_level": "warning",
            "restart_required": ["[database] dsn", "[database] pool_size", "[delivery] lease"],
            "applied": ["[delivery] batch_size", "[disable] after_failures"],
        }
    ]
    assert "secret" not in repr(logged)
    applied = daemon.dispatcher.config
    assert applied.database == config.database
    assert applied.delivery == replace(config.delivery, batch_size=7)
    assert daemon.dispatcher.writer.disable.after_failures == 3


async def test_sighup_to_the_daemon_process_reloads_its_config_file(db: Db, tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.toml"
    path.write_text('[log]\nlevel = "info"\n\n[delivery]\nconcurrency = 16\n')
    env = daemon_env(db)
    del env["DISPATCHER_LOG_LEVEL"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        "run",
        "--config",
        str(path),
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    stderr = proc.stderr

    async def next_event(name: str) -> dict[str, Any]:
        while True:
            line = await asyncio.wait_for(stderr.readline(), 20)
            assert line, f"the daemon exited before logging {name}"
            entry: dict[str, Any] = json.loads(line)
            if entry["event"] == name:
                return entry

    try:
        await next_event("dispatcher_started")
        path.write_text('[log]\nlevel = "info"\n\n[delivery]\nconcurrency = 32\n')
        proc.send_signal(signal.SIGHUP)
        reloaded = await next_event("config_reloaded")
        assert reloaded["changed"] == ["[delivery] concurrency"]
        assert reloaded["level"] == "info"

        path.write_text("[delivery]\nconcurrency = 0\n")
        proc.send_signal(signal.SIGHUP)
        refused = await next_event("config_reload_refused")
        assert refused["level"] == "error"
        assert refused["error"] == f"{path}: [delivery] concurrency: must be between 1 and 10000"
    finally:
        proc.send_signal(signal.SIGTERM)
        await next_event("dispatcher_stopped")
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_the_summary_interval_and_max_lag_apply_at_a_reload(
    db: Db, reloadable_daemon: Any
) -> None:
    config = make_config(db.config.database.dsn, db.schema)
    daemon, source = await reloadable_daemon(config)
    d: Dispatcher = daemon.dispatcher
    source.config = replace(
        config,
        http=replace(config.http, max_lag=1.0),
        log=replace(config.log, summary_interval=0.05),
    )
    with structlog.testing.capture_logs() as logged:
        assert d.reload_config()
    assert not [e for e in logged if e["event"] == "config_reload_partial"]
    assert d.config.http.max_lag == 1.0
    assert d.sampler.interval == 0.05
    # The shorter interval takes effect at once, not after the old 15s: lines follow quickly.
    with captured_logs() as lines:
        await wait_until(
            lambda: sum(e["event"] == "dispatcher_summary" for e in lines) >= 3,
            message="summaries every 50ms",
        )
