"""Ordered endpoints: deliveries sharing an ordering_key arrive one at a time, in outbox order,
across replicas and a kill -9; a failing head holds up only its own key; what happens when it
fails for good (move on, or block until skipped or replayed); replays re-send in order."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest
import structlog
from aiohttp import web

from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import cli, db_env
from tests.test_delivery_log import run
from tests.test_lifecycle import start_daemon

ReceiverFactory = Callable[..., Awaitable[Receiver]]
DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


class KeyWatch:
    """A receiver behaviour that tracks, per ordering key (the payload's `key`), the requests in
    flight at once and the order of successful answers; `fail` decides which to refuse."""

    def __init__(self, fail: Callable[[dict[str, Any]], bool] = lambda body: False) -> None:
        self.fail = fail
        self.in_flight: dict[str, int] = defaultdict(int)
        self.most_in_flight: dict[str, int] = defaultdict(int)
        self.succeeded: dict[str, list[str]] = defaultdict(list)
        self.delay = 0.0
        # While set and not open, requests are held in flight.
        self.gate: asyncio.Event | None = None

    async def __call__(self, request: web.Request, n: int) -> web.StreamResponse:
        body = json.loads(await request.read())
        key = body["data"].get("key", "")
        self.in_flight[key] += 1
        self.most_in_flight[key] = max(self.most_in_flight[key], self.in_flight[key])
        try:
            await asyncio.sleep(self.delay * random.random())
            if self.gate is not None:
                await self.gate.wait()
            if self.fail(body):
                return web.Response(status=500)
            self.succeeded[key].append(body["id"])
            return web.Response(status=200)
        finally:
            self.in_flight[key] -= 1

    def first_arrivals(self, key: str) -> list[str]:
        """The key's events in the order each first succeeded."""
        return list(dict.fromkeys(self.succeeded[key]))


async def insert_keyed(db: Db, keys: Sequence[str | None], tenant: str = "shop-1") -> list[str]:
    """One event per entry of `keys` (its ordering_key, also in the payload), in this order."""
    rows = await db.conn.fetch(
        "INSERT INTO outbox (tenant, event_type, payload, ordering_key)"
        " SELECT $1, 'points.earned', jsonb_build_object('key', coalesce(k, ''), 'n', i), k"
        " FROM unnest($2::text[]) WITH ORDINALITY AS u (k, i) ORDER BY i RETURNING event_id",
        tenant,
        keys,
    )
    return [r["event_id"] for r in rows]


async def outbox_order(db: Db) -> dict[str, list[str]]:
    """Each ordering key's events in outbox order."""
    order: dict[str, list[str]] = defaultdict(list)
    for r in await db.conn.fetch(
        "SELECT ordering_key, event_id FROM outbox WHERE ordering_key IS NOT NULL ORDER BY seq"
    ):
        order[r["ordering_key"]].append(r["event_id"])
    return order


async def all_succeeded(db: Db, n: int) -> bool:
    return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == n


async def test_two_replicas_and_a_kill_keep_every_key_in_outbox_order_despite_random_failures(
    db: Db, receiver_factory: ReceiverFactory
) -> None:
    rng = random.Random(7)
    watch = KeyWatch(fail=lambda body: rng.random() < 0.1)
    watch.delay = 0.004
    ordered = await receiver_factory(watch)
    plain = await receiver_factory()
    ordered_id, _ = await db.add_endpoint(ordered.url, ordered=True, max_in_flight=32)
    await db.add_endpoint(plain.url)
    keys = [f"cust_{rng.randrange(200)}" for _ in range(2000)]
    extra = {"DISPATCHER_DELIVERY_LEASE": "2s", "DISPATCHER_RETRY_SCHEDULE": "0s" + ",20ms" * 9}
    first = await start_daemon(db, **extra)
    second = await start_daemon(db, **extra)
    try:
        # In several commits, so both replicas fan out while the other is claiming.
        for i in range(0, len(keys), 400):
            await insert_keyed(db, keys[i : i + 400])
        await wait_until(
            lambda: sum(len(v) for v in watch.succeeded.values()) >= 700,
            timeout=30,
            message="a third delivered",
        )
        first.kill()
        await first.wait()
        await wait_until(
            lambda: all_succeeded(db, 4000), timeout=60, message="every delivery succeeded"
        )
    finally:
        for p in (first, second):
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                await asyncio.wait_for(p.wait(), 20)
    order = await outbox_order(db)
    assert len(order) > 150
    for key, events in order.items():
        assert watch.first_arrivals(key) == events, key
        assert watch.most_in_flight[key] == 1, key
    assert sum(1 for r in ordered.requests if r.headers.get("webhook-id")) > 2000  # failures
    # The unordered endpoint got everything too.
    assert set(plain.event_ids()) == {e for events in order.values() for e in events}
    assert await db.count(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = $1 AND ordering_key IS NOT NULL",
        ordered_id,
    ) == len(keys)


async def test_a_failing_head_holds_up_only_its_own_key_and_the_rest_show_what_they_wait_for(
    db: Db,
    receiver_factory: ReceiverFactory,
    daemon_factory: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stuck = True
    watch = KeyWatch(fail=lambda body: stuck and body["data"]["key"] == "stuck")
    r = await receiver_factory(watch)
    eid, _ = await db.add_endpoint(r.url, ordered=True)
    config = replace(db.config, retry=replace(db.config.retry, schedule=(0.0,) + (0.03,) * 200))
    await daemon_factory(config)
    ids = await insert_keyed(db, ["stuck", "a", "stuck", "b", "a", "stuck", "b", None])
    await wait_until(
        lambda: (
            len(watch.succeeded["a"]) == 2
            and len(watch.succeeded["b"]) == 2
            and len(watch.succeeded[""]) == 1
        ),
        message="the other keys and the unkeyed event delivered",
    )
    head = await db.count("SELECT id FROM deliveries WHERE event_id = $1", ids[0])
    await wait_until(
        lambda: db.count("SELECT attempts FROM deliveries WHERE id = $1", head),
        message="the head retried",
    )
    listed = await run(db, capsys, "delivery", "list", "--endpoint", str(eid), "--json")
    by_event = {v["event_id"]: v for v in listed}
    assert by_event[ids[2]]["waiting_behind"] == head
    assert by_event[ids[5]]["waiting_behind"] == head
    assert by_event[ids[2]]["status"] == "pending"
    assert by_event[ids[1]]["waiting_behind"] is None
    table = await run(db, capsys, "delivery", "list", "--endpoint", str(eid))
    assert f"waiting behind {head}" in table
    # Only the head was ever sent for the stuck key.
    sent = {json.loads(q.body)["id"] for q in r.requests if json.loads(q.body)["data"]["key"]}
    assert ids[2] not in sent
    assert ids[5] not in sent
    stuck = False
    await wait_until(lambda: len(watch.succeeded["stuck"]) == 3, message="the stuck key flowed")
    assert watch.first_arrivals("stuck") == [ids[0], ids[2], ids[5]]


async def test_a_head_that_fails_for_good_lets_its_key_move_on_by_default_and_says_so(
    db: Db, receiver_factory: ReceiverFactory, daemon_factory: DaemonFactory
) -> None:
    watch = KeyWatch(fail=lambda body: body["data"]["n"] == 1)
    r = await receiver_factory(watch)
    await db.add_endpoint(r.url, ordered=True)
    with structlog.testing.capture_logs() as logged:
        await daemon_factory()
        ids = await insert_keyed(db, ["k", "k", "k"])
        await wait_until(lambda: len(watch.succeeded["k"]) == 2, message="the rest of the key")
    assert watch.first_arrivals("k") == ids[1:]
    failed = await db.row("SELECT status, key_blocked FROM deliveries WHERE event_id = $1", ids[0])
    assert (failed["status"], failed["key_blocked"]) == ("failed", False)
    moved = [e for e in logged if e["event"] == "ordered_key_moved_on"]
    assert [(e["event_id"], e["ordering_key"]) for e in moved] == [(ids[0], "k")]
    assert moved[0]["log_level"] == "warning"


async def test_block_policy_holds_the_key_until_skipped_and_a_replay_resends_in_order(
    db: Db,
    receiver_factory: ReceiverFactory,
    daemon_factory: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    failing = True
    watch = KeyWatch(fail=lambda body: failing and body["data"] == {"key": "k", "n": 1})
    r = await receiver_factory(watch)
    eid, _ = await db.add_endpoint(r.url, ordered=True)
    config = replace(db.config, delivery=replace(db.config.delivery, ordered_after_failure="block"))
    with structlog.testing.capture_logs() as logged:
        await daemon_factory(config)
        ids = await insert_keyed(db, ["k", "k", "k"])
        await wait_until(
            lambda: db.count(
                "SELECT count(*) FROM deliveries WHERE event_id = $1 AND key_blocked", ids[0]
            ),
            message="the head failed for good and blocks its key",
        )
        # The daemon keeps going meanwhile: another key's event is delivered after the block...
        (other,) = await insert_keyed(db, ["other"])
        await wait_until(lambda: watch.succeeded["other"] == [other], message="another key")
    # ...while the blocked key's later events were never sent.
    assert watch.succeeded["k"] == []
    assert {json.loads(q.body)["id"] for q in r.requests} == {ids[0], other}
    blocked = [e for e in logged if e["event"] == "ordered_key_blocked"]
    assert [(e["event_id"], e["log_level"]) for e in blocked] == [(ids[0], "error")]
    head = await db.count("SELECT id FROM deliveries WHERE event_id = $1", ids[0])
    table = await run(db, capsys, "delivery", "list", "--endpoint", str(eid))
    assert "failed, blocking its key" in table
    assert f"waiting behind {head}" in table

    skipped = await cli("delivery", "skip", str(head), "--json", env=db_env(db))
    assert skipped.json() == {"skipped": head, "next": head + 1}
    await wait_until(lambda: len(watch.succeeded["k"]) == 2, message="the key moved on")
    assert watch.first_arrivals("k") == ids[1:]
    again = await cli("delivery", "skip", str(head), env=db_env(db))
    assert again.rc != 0
    assert "does not block an ordering key" in again.err

    # A replay of the whole key re-sends it in outbox order, the once-failed head first.
    failing = False
    watch.succeeded["k"].clear()
    watch.delay = 0.01
    replayed = await cli(
        "replay", "--endpoint", str(eid), "--status", "succeeded,failed", env=db_env(db)
    )
    assert replayed.rc == 0, replayed.err
    await wait_until(lambda: len(watch.succeeded["k"]) == 3, message="the replay")
    assert watch.succeeded["k"] == ids
    assert watch.most_in_flight["k"] == 1


async def test_events_without_a_key_and_unordered_endpoints_stay_concurrent(
    db: Db, receiver_factory: ReceiverFactory, daemon_factory: DaemonFactory
) -> None:
    ordered, unordered = KeyWatch(), KeyWatch()
    # Requests stay open until the gate opens, so concurrency shows as requests in flight.
    ordered.gate = unordered.gate = gate = asyncio.Event()
    r1 = await receiver_factory(ordered)
    r2 = await receiver_factory(unordered)
    await db.add_endpoint(r1.url, ordered=True, max_in_flight=8)
    await db.add_endpoint(r2.url, max_in_flight=8)
    await daemon_factory()
    await insert_keyed(db, [None] * 4 + ["same"] * 4)
    # The ordered endpoint: the 4 unkeyed events and the first of "same" at once; the
    # unordered one: all 8.
    await wait_until(lambda: len(r1.requests) == 5 and len(r2.requests) == 8, message="in flight")
    gate.set()
    await wait_until(lambda: len(ordered.succeeded["same"]) == 4, message="the keyed ones")
    await wait_until(lambda: len(unordered.succeeded["same"]) == 4, message="unordered")
    assert ordered.most_in_flight["same"] == 1
    assert unordered.most_in_flight["same"] == 4
    assert ordered.most_in_flight[""] == 4


async def test_making_an_endpoint_ordered_applies_to_deliveries_not_yet_sent(
    db: Db, receiver_factory: ReceiverFactory, daemon_factory: DaemonFactory
) -> None:
    watch = KeyWatch()
    watch.delay = 0.01
    r = await receiver_factory(watch)
    eid, _ = await db.add_endpoint(r.url, max_in_flight=8, enabled=False)
    await daemon_factory()
    ids = await insert_keyed(db, ["k"] * 6)
    await wait_until(
        lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'paused'"),
        message="paused deliveries",
    )
    env = db_env(db)
    run_update = await cli("endpoint", "update", str(eid), "--ordered", env=env)
    assert run_update.rc == 0, run_update.err
    assert await db.count("SELECT count(*) FROM deliveries WHERE ordering_key = 'k'") == 6
    assert (await cli("endpoint", "enable", str(eid), env=env)).rc == 0
    await wait_until(lambda: len(watch.succeeded["k"]) == 6, message="all delivered")
    assert watch.first_arrivals("k") == ids
    assert watch.most_in_flight["k"] == 1
