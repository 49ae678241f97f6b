"""Claiming: fan new outbox rows out to deliveries, and claim due deliveries under a lease.

Both only take as much as this process has free slots for, globally and per endpoint, so a
claimed job always starts at once; fresh events are claimed in the same statement that fans
them out, and only work that did not fit waits in `deliveries` as pending. On an ordered
endpoint only the head of each ordering key's queue is claimable (see queries.sql).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .db import Executor, Q

# A delivery waiting behind another of its ordering key is made due by the write-back of the
# one ahead; these bound how often it is looked at anyway, in case that write-back ran before
# this delivery existed: first after KEY_RECHECK_MIN, then after as long as it has waited,
# at most KEY_RECHECK_MAX, so a long queue behind a failing key costs few re-reads.
KEY_RECHECK_MIN = 1.0
KEY_RECHECK_MAX = 30.0


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
    # `attempts` when the delivery was last replayed: the retry policy counts from there.
    attempt_base: int = 0

    @property
    def retry_attempt(self) -> int:
        """This attempt's number in the current retry schedule (1-based; restarts on replay)."""
        return self.attempt - self.attempt_base


@dataclass(frozen=True, slots=True)
class Slots:
    """What this process can take on now: `free` in all; per endpoint, what is left of its cap
    for endpoints already busy here (others get their max_in_flight or `default_per_endpoint`)."""

    free: int
    by_endpoint: Mapping[int, int]
    default_per_endpoint: int

    @property
    def saturated(self) -> list[int]:
        """Endpoints with no free slot here."""
        return [eid for eid, n in self.by_endpoint.items() if n <= 0]

    def after(self, claimed: Claimed) -> Slots:
        """The slots left once the `claimed` jobs are running."""
        by_endpoint = dict(self.by_endpoint)
        for j in claimed.jobs:
            left = by_endpoint.get(j.endpoint_id, claimed.caps[j.endpoint_id])
            by_endpoint[j.endpoint_id] = left - 1
        return Slots(self.free - len(claimed.jobs), by_endpoint, self.default_per_endpoint)

    def _args(self) -> tuple[list[int], list[int], list[int]]:
        busy = [(eid, n) for eid, n in self.by_endpoint.items() if n > 0]
        return self.saturated, [eid for eid, _ in busy], [n for _, n in busy]


@dataclass(frozen=True, slots=True)
class FanOut:
    """What one fan-out did: events taken from the outbox, the deliveries it claimed, and the
    endpoints of those it left pending (no slot was free for them here)."""

    events: int
    deliveries: int
    jobs: list[Job]
    left_pending: frozenset[int]


async def fan_out(conn: Executor, slots: Slots, lease: float, first_delay: float) -> FanOut:
    """Fan out up to `slots.free` outbox rows, claiming the new deliveries that fit a slot."""
    saturated, busy_ids, busy_free = slots._args()
    rows = await conn.fetch(
        Q["fan_out"],
        slots.free,
        saturated,
        busy_ids,
        busy_free,
        slots.default_per_endpoint,
        lease,
        first_delay,
        KEY_RECHECK_MIN,
    )
    events = len({r["seq"] for r in rows})
    deliveries = sum(1 for r in rows if r["id"] is not None)
    jobs = [_job(r) for r in rows if r["status"] == "delivering"]
    pending = frozenset(r["endpoint_id"] for r in rows if r["status"] == "pending")
    return FanOut(events, deliveries, jobs, pending)


@dataclass(frozen=True, slots=True)
class Claimed:
    """Jobs claimed from the queue, and the in-flight cap of each of their endpoints."""

    jobs: list[Job]
    caps: Mapping[int, int]
    # Due rows passed over because something is ahead of them in their ordering key: they
    # filled part of the window scanned, so due work may lie just beyond it.
    held_back: int = 0


async def claim(conn: Executor, slots: Slots, lease: float) -> Claimed:
    """Claim up to `slots.free` due deliveries (retries, expired leases, work that waited)."""
    saturated, busy_ids, busy_free = slots._args()
    rows = await conn.fetch(
        Q["claim"],
        slots.free,
        saturated,
        busy_ids,
        busy_free,
        slots.default_per_endpoint,
        lease,
        KEY_RECHECK_MIN,
        KEY_RECHECK_MAX,
    )
    jobs = [_job(r, r["attempt_base"]) for r in rows if r["status"] == "delivering"]
    caps = {r["endpoint_id"]: r["endpoint_cap"] for r in rows if r["id"] is not None}
    return Claimed(jobs, caps, rows[0]["held_back"] if rows else 0)


def _job(r: Any, attempt_base: int = 0) -> Job:
    return Job(
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
        attempt_base=attempt_base,
    )


async def release(conn: Executor, jobs: Sequence[Job]) -> None:
    """Give claimed jobs that were never finished back to the queue, due now."""
    if jobs:
        await conn.execute(
            Q["release_claims"],
            [j.delivery_id for j in jobs],
            [j.attempt for j in jobs],
        )
