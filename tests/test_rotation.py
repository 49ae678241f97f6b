"""Secret rotation: `endpoint rotate-secret` prints the new secret once, and while the grace
period lasts receivers verify deliveries with the old secret or the new one; after it, only
with the new one (time moved by an injected clock, not waited for)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import standardwebhooks
import stripe

from dispatcher.rotation import rotate_secret
from dispatcher.signing import fingerprint, validate_secret
from tests.clocks import FakeClock
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import assert_one_error_line, cli, db_env

URL = "https://example.com/h"


async def test_rotate_secret_prints_the_new_secret_once_and_keeps_the_old_one_for_the_grace(
    db: Db,
) -> None:
    first, old_first = await db.add_endpoint(URL)
    second, _ = await db.add_endpoint(URL, profile="stripe")
    before = await db.row("SELECT version FROM endpoints WHERE id = $1", first)
    env = db_env(db)
    as_json, plain = await asyncio.gather(
        cli("endpoint", "rotate-secret", str(first), "--json", env=env),
        cli("endpoint", "rotate-secret", str(second), "--grace", "0s", env=env),
    )

    rotated = as_json.json()
    assert rotated["id"] == first
    assert rotated["fingerprint"] == fingerprint(rotated["secret"])
    assert rotated["signs_with_both"] is True
    validate_secret("standard", rotated["secret"])
    row = await db.row("SELECT * FROM endpoints WHERE id = $1", first)
    assert (row["secret"], row["old_secret"]) == (rotated["secret"], old_first)
    # The default grace is a day.
    left = row["old_secret_expires_at"] - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
    assert datetime.fromisoformat(rotated["old_secret_expires_at"]) == row["old_secret_expires_at"]
    # Daemons cache endpoints by version: the rotation must move it.
    assert row["version"] > before["version"]
    assert old_first not in as_json.out

    assert plain.rc == 0, plain
    row = await db.row("SELECT * FROM endpoints WHERE id = $1", second)
    assert (row["old_secret"], row["old_secret_expires_at"]) == (None, None)
    validate_secret("stripe", row["secret"])
    assert plain.out.count(row["secret"]) == 1
    assert "no longer valid" in plain.out


async def test_rotate_secret_refuses_an_unknown_endpoint_or_a_bad_grace_with_one_line(
    db: Db,
) -> None:
    cases = {
        ("999999",): ("999999", "does not exist"),
        ("1", "--grace", "30 minutes"): ("--grace", "30 minutes"),
        ("1", "--grace", "8d"): ("--grace", "7d"),
    }
    env = db_env(db)
    runs = await asyncio.gather(*(cli("endpoint", "rotate-secret", *a, env=env) for a in cases))
    for run, fragments in zip(runs, cases.values(), strict=True):
        assert_one_error_line(run, *fragments)


def verifies(secret: str, profile: str, body: bytes, headers: dict[str, str]) -> bool:
    """Whether the receiver's own library accepts the request with `secret`."""
    try:
        if profile == "standard":
            standardwebhooks.Webhook(secret).verify(body, headers)
        else:
            stripe.WebhookSignature.verify_header(
                body.decode(), headers["Stripe-Signature"], secret, tolerance=300
            )
    except (standardwebhooks.WebhookVerificationError, stripe.SignatureVerificationError):
        return False
    return True


async def test_during_the_grace_period_both_secrets_verify_and_after_it_only_the_new_one(
    db: Db,
    receiver_factory: Callable[..., Awaitable[Receiver]],
    daemon_factory: Callable[..., Awaitable[RunningDaemon]],
) -> None:
    receivers = {"standard": await receiver_factory(), "stripe": await receiver_factory()}
    endpoints = {
        profile: await db.add_endpoint(r.url, tenant=profile, profile=profile)
        for profile, r in receivers.items()
    }
    clock = FakeClock()
    await daemon_factory(clock=clock)

    async def deliver_one() -> None:
        seen = {p: len(r.requests) for p, r in receivers.items()}
        for profile in receivers:
            await db.insert_events(1, tenant=profile)
        await wait_until(
            lambda: all(len(r.requests) == seen[p] + 1 for p, r in receivers.items()),
            message="one delivery to each endpoint",
        )

    def last_verifies(profile: str, secret: str) -> bool:
        req = receivers[profile].requests[-1]
        return verifies(secret, profile, req.body, req.headers)

    await deliver_one()
    rotated = {}
    for profile, (eid, old) in endpoints.items():
        assert last_verifies(profile, old)
        rotated[profile] = (await rotate_secret(db.conn, eid, 24 * 3600)).secret
        assert rotated[profile] != old

    await deliver_one()
    for profile, (_, old) in endpoints.items():
        assert last_verifies(profile, old), f"{profile}: old secret during the grace period"
        assert last_verifies(profile, rotated[profile]), f"{profile}: new secret"

    clock.advance(hours=24, seconds=1)
    await deliver_one()
    for profile, (_, old) in endpoints.items():
        assert not last_verifies(profile, old), f"{profile}: old secret after the grace period"
        assert last_verifies(profile, rotated[profile]), f"{profile}: new secret"
    assert " " not in receivers["standard"].requests[-1].headers["webhook-signature"]
