"""The daemon end to end: outbox rows arrive, signed, at exactly the endpoints subscribed."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
import standardwebhooks
import stripe
import structlog

from dispatcher import daemon as daemon_module
from tests.conftest import Db, Receiver, RunningDaemon, wait_until


async def test_inserted_events_arrive_signed_at_the_subscribed_endpoint(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    _, secret = await db.add_endpoint(receiver.url)
    await daemon_factory()
    ids = await db.insert_events(20)
    await wait_until(lambda: len(receiver.requests) >= 20, message="20 deliveries")

    async def recorded() -> bool:
        return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == 20

    await wait_until(recorded, message="results recorded")
    assert sorted(receiver.event_ids()) == sorted(ids)
    wh = standardwebhooks.Webhook(secret)
    for r in receiver.requests:
        payload = wh.verify(r.body, r.headers)
        assert payload["type"] == "points.earned"
        assert payload["tenant"] == "shop-1"


async def test_a_dispatcher_idle_for_longer_than_the_stale_limit_is_still_woken_by_an_insert(
    db: Db,
    receiver: Receiver,
    daemon_factory: Callable[..., Awaitable[RunningDaemon]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(daemon_module, "HOUSEKEEPING_EVERY", 0.05)
    await db.add_endpoint(receiver.url)
    # A long poll: only a notification can bring the event in time.
    await daemon_factory(
        replace(db.config, delivery=replace(db.config.delivery, poll_interval=30.0))
    )
    await wait_until(
        lambda: db.count("SELECT count(*) FROM listeners WHERE idle"), message="the daemon idle"
    )
    # As if it had waited an hour: the stale-listener cleanup must not take it for dead.
    await db.conn.execute("UPDATE listeners SET seen_at = now() - interval '1 hour'")
    await wait_until(
        lambda: db.count(
            "SELECT count(*) FROM listeners WHERE seen_at > now() - interval '1 minute'"
        ),
        message="the idle daemon's row refreshed",
    )
    await db.insert_events(1)
    await wait_until(lambda: len(receiver.requests) == 1, timeout=3, message="the event sent")


async def test_every_signing_profile_arrives_verifiable_by_the_receivers_own_recipe(
    db: Db,
    receiver_factory: Callable[..., Awaitable[Receiver]],
    daemon_factory: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    stripe_r, github_r, shopify_r, cg_r = [await receiver_factory() for _ in range(4)]
    secret = "a-merchant-chosen-secret-1234"
    await db.add_endpoint(
        stripe_r.url, profile="stripe", secret=secret, signature_header="X-Loyali-Signature"
    )
    await db.add_endpoint(github_r.url, profile="github", secret=secret)
    await db.add_endpoint(
        shopify_r.url, profile="shopify", secret=secret, signature_header="X-Glow-Hmac-Sha256"
    )
    await db.add_endpoint(
        cg_r.url, profile="hmac", secret=secret, algorithm="sha1", signature_header="X-CG-SIGNATURE"
    )
    await daemon_factory()
    await db.insert_events(3)
    receivers = (stripe_r, github_r, shopify_r, cg_r)
    await wait_until(lambda: all(len(r.requests) == 3 for r in receivers), message="deliveries")
    key = secret.encode()
    for req in stripe_r.requests:
        header = req.headers["X-Loyali-Signature"]
        stripe.WebhookSignature.verify_header(req.body.decode(), header, secret, tolerance=300)
    for req in github_r.requests:
        digest = hmac.new(key, req.body, hashlib.sha256).hexdigest()
        assert req.headers["X-Hub-Signature-256"] == f"sha256={digest}"
    for req in shopify_r.requests:
        digest = base64.b64encode(hmac.new(key, req.body, hashlib.sha256).digest()).decode()
        assert req.headers["X-Glow-Hmac-Sha256"] == digest
    for req in cg_r.requests:
        assert req.headers["X-CG-SIGNATURE"] == hmac.new(key, req.body, hashlib.sha1).hexdigest()


async def test_a_statement_the_database_refuses_is_an_error_line_and_the_daemon_resumes_after_a_fix(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    await db.add_endpoint(receiver.url)
    with structlog.testing.capture_logs() as logged:
        await daemon_factory()
        # A broken schema (say, a half-applied manual change): fan-out's function is missing.
        await db.conn.execute("ALTER FUNCTION event_matches(text[], text) RENAME TO gone")
        ids = await db.insert_events(3)
        await wait_until(
            lambda: any(e["event"] == "database_statement_failed" for e in logged),
            message="the refused statement logged",
        )
        await db.conn.execute("ALTER FUNCTION gone(text[], text) RENAME TO event_matches")
        await wait_until(lambda: len(receiver.requests) == 3, message="deliveries after the fix")
    assert sorted(receiver.event_ids()) == sorted(ids)
    refused = next(e for e in logged if e["event"] == "database_statement_failed")
    assert refused["log_level"] == "error"
    assert refused["sqlstate"] == "42883"  # undefined function
    assert not any(e["event"] == "database_unavailable" for e in logged)


async def test_a_paused_pump_has_the_writer_flush_at_once_rather_than_after_its_interval(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    """With batches larger than the limit on unrecorded results, the writer would wait out
    `flush_interval` for a batch that never fills while the pump waits on the writer."""
    await db.add_endpoint(receiver.url)
    delivery = replace(db.config.delivery, concurrency=2, batch_size=100, flush_interval=2.0)
    await daemon_factory(replace(db.config, delivery=delivery))
    await db.insert_events(40)

    async def all_recorded() -> bool:
        return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == 40

    # Ten rounds of four results: 20 s if each waited out the interval; the last may.
    await wait_until(all_recorded, timeout=8, message="40 deliveries recorded")
