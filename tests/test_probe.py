"""`dispatcher endpoint test`: a signed sample event sent now from the CLI to a real receiver,
shown, and recorded in the delivery log without any daemon sending it anywhere else."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

import standardwebhooks
from aiohttp import web

from dispatcher import claiming
from dispatcher.catalog import catalog
from dispatcher.claiming import Slots
from dispatcher.probe import SAMPLE_DATA, pick_event_type, send_test_event
from tests.conftest import Db, Receiver
from tests.test_cli import assert_one_error_line, cli, db_env

Factory = Callable[..., Awaitable[Receiver]]


def local_env(db: Db) -> dict[str, str]:
    """The CLI's environment for receivers on 127.0.0.1 over plain HTTP."""
    return db_env(
        db,
        DISPATCHER_SECURITY_ALLOW_HTTP="true",
        DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS="true",
    )


async def test_endpoint_test_sends_a_signed_sample_of_a_subscribed_type_and_records_it_alone(
    db: Db, receiver_factory: Factory
) -> None:
    target, bystander = await receiver_factory(), await receiver_factory()
    eid, secret = await db.add_endpoint(target.url, events=["tier.upgraded", "points.*"])
    await db.add_endpoint(bystander.url)  # same tenant, every event type
    run = await cli("endpoint", "test", str(eid), "--json", env=local_env(db))

    shown = run.json()
    assert (shown["id"], shown["ok"], shown["status_code"]) == (eid, True, 200)
    assert shown["event_type"] == "tier.upgraded"
    assert shown["event_id"].startswith("evt_test_")
    assert shown["response_excerpt"] == "ok"
    assert isinstance(shown["duration_ms"], int)
    assert secret not in run.out
    (request,) = target.requests
    body = standardwebhooks.Webhook(secret).verify(request.body, request.headers)
    assert body["id"] == shown["event_id"]
    assert (body["type"], body["tenant"], body["data"]) == ("tier.upgraded", "shop-1", SAMPLE_DATA)
    assert request.headers["webhook-attempt"] == "1"

    delivery = await db.row(
        "SELECT d.id, d.status, d.attempts, d.last_status_code, o.fanned_out_at IS NOT NULL AS out"
        " FROM deliveries d JOIN outbox o ON o.seq = d.event_seq WHERE o.event_id = $1",
        shown["event_id"],
    )
    assert tuple(delivery) == (shown["delivery_id"], "succeeded", 1, 200, True)
    attempt = await db.row("SELECT status_code, decision, response_excerpt FROM attempts")
    assert tuple(attempt) == (200, "succeeded", "ok")
    # Already fanned out: a daemon has nothing to send, to this endpoint or any other.
    fanned = await claiming.fan_out(db.conn, Slots(100, {}, 8), lease=60, first_delay=0)
    assert fanned.events == 0
    assert bystander.requests == []
    # A test is not live traffic: the endpoint's health is untouched.
    health = await db.row("SELECT consecutive_failures, last_success_at FROM endpoints LIMIT 1")
    assert tuple(health) == (0, None)


async def test_endpoint_test_of_a_failing_endpoint_shows_the_response_and_exits_1(
    db: Db, receiver_factory: Factory
) -> None:
    async def boom(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500, text="boom")

    r = await receiver_factory(boom)
    eid, _ = await db.add_endpoint(r.url, events=["points.earned"])
    run = await cli("endpoint", "test", str(eid), env=local_env(db))

    assert run.rc == 1, run
    assert run.err == ""
    assert "HTTP 500" in run.out
    assert "response: boom" in run.out
    assert r.url in run.out
    assert "points.earned evt_test_" in run.out
    attempt = await db.row("SELECT status_code, error, decision FROM attempts")
    assert tuple(attempt) == (500, "http_error", "failed")
    assert await db.statuses() == {"failed": 1}
    assert await db.count("SELECT consecutive_failures FROM endpoints") == 0


async def test_endpoint_test_refuses_an_unknown_endpoint_type_or_data_with_one_line(
    db: Db, receiver: Receiver
) -> None:
    eid, _ = await db.add_endpoint(receiver.url, events=["tier.upgraded"])
    cases = {
        ("999999",): ("999999", "does not exist"),
        (str(eid), "--type", "points.earned"): ("points.earned", "does not subscribe"),
        (str(eid), "--data", "{not json"): ("--data", "JSON"),
        (str(eid), "--type", "tier upgraded"): ("--type", "tier upgraded"),
    }
    env = local_env(db)
    runs = await asyncio.gather(*(cli("endpoint", "test", *a, env=env) for a in cases))
    for run, fragments in zip(runs, cases.values(), strict=True):
        assert_one_error_line(run, *fragments)
    assert receiver.requests == []
    assert await db.count("SELECT count(*) FROM outbox") == 0


async def test_endpoint_test_obeys_the_security_config_and_records_the_refusal(
    db: Db, receiver: Receiver
) -> None:
    eid, _ = await db.add_endpoint(receiver.url)
    strict = replace(db.config, security=replace(db.config.security, allow_private_networks=False))
    probe = await send_test_event(db.conn, strict, eid)
    assert (probe.outcome.ok, probe.outcome.error) == (False, "blocked_address")
    assert receiver.requests == []
    assert await db.count("SELECT count(*) FROM attempts WHERE error = 'blocked_address'") == 1


async def test_a_disabled_endpoint_can_be_tested_in_its_own_envelope_and_stays_disabled(
    db: Db, receiver: Receiver
) -> None:
    eid, _ = await db.add_endpoint(receiver.url, enabled=False, envelope="data")
    probe = await send_test_event(db.conn, db.config, eid, data={"points": 5})
    assert probe.outcome.ok
    assert json.loads(receiver.requests[0].body) == {"points": 5}
    assert await db.count("SELECT count(*) FROM endpoints WHERE NOT enabled") == 1


def test_the_sample_type_is_a_subscribed_one_preferring_exact_names_then_the_catalog() -> None:
    known = [t.name for t in catalog()]
    assert pick_event_type(["points.*", "tier.upgraded"], None, known) == "tier.upgraded"
    assert pick_event_type(["tier.*"], None, known) == "tier.upgraded"
    assert pick_event_type([], None, known) == known[0]
    assert pick_event_type(["acme.gift.*"], None, known) == "acme.gift.test"
    assert pick_event_type(["*"], None, []) == "webhook.test"
    assert pick_event_type(["tier.*"], "tier.downgraded", known) == "tier.downgraded"
