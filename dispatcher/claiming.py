"""Claiming: fan new outbox rows out to deliveries, and claim due deliveries under a lease."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from .db import Executor, Q


@dataclass(frozen=True, slots=True)
class Job:
    """One claimed delivery: what to send, and the claim (`attempt`) its write-back must name."""

    delivery_id: int
    attempt: int
    endpoint_id: int
    endpoint_version: int
    event_id: str
    tenant: str
    event_type: str
    payload: str
    occurred_at: datetime
    ordering_key: str | None


async def fan_out(conn: Executor, limit: int, first_delay: float) -> tuple[int, int]:
    """Fan out up to `limit` outbox rows; returns (events, deliveries created)."""
    row = await conn.fetchrow(Q["fan_out"], limit, first_delay)
    assert row is not None
    return int(row["events"]), int(row["deliveries"])


async def claim(
    conn: Executor,
    limit: int,
    free_by_endpoint: Mapping[int, int],
    default_per_endpoint: int,
    lease: float,
) -> list[Job]:
    """Claim up to `limit` due deliveries, respecting each endpoint's free slots here."""
    saturated = [eid for eid, free in free_by_endpoint.items() if free <= 0]
    busy = [(eid, free) for eid, free in free_by_endpoint.items() if free > 0]
    rows = await conn.fetch(
        Q["claim"],
        limit,
        saturated,
        [eid for eid, _ in busy],
        [free for _, free in busy],
        default_per_endpoint,
        lease,
    )
    return [
        Job(
            delivery_id=r["id"],
            attempt=r["attempts"],
            endpoint_id=r["endpoint_id"],
            endpoint_version=r["endpoint_version"],
            event_id=r["event_id"],
            tenant=r["tenant"],
            event_type=r["event_type"],
            payload=r["payload"],
            occurred_at=r["occurred_at"],
            ordering_key=r["ordering_key"],
        )
        for r in rows
        if r["status"] == "delivering"
    ]


async def release(conn: Executor, jobs: Sequence[Job]) -> None:
    """Give claimed jobs that were never finished back to the queue, due now."""
    if jobs:
        await conn.execute(
            Q["release_claims"],
            [j.delivery_id for j in jobs],
            [j.attempt for j in jobs],
        )
