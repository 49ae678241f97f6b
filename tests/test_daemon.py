"""The daemon end to end: outbox rows arrive, signed, at exactly the endpoints subscribed."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import standardwebhooks

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
