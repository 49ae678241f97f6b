"""Operational events: when the dispatcher disables an endpoint, when a failing endpoint
succeeds again and when a delivery runs out of retries, it inserts an event for the ops tenant
(`[ops] tenant`) into the outbox, so the backend can tell the merchant through its own webhook.

The writer builds these from what a batch's write-back returned and inserts them in one
statement per batch, only when there is something to say. Nothing is said about the ops
tenant's own endpoints or deliveries (the statement skips them), so its trouble never feeds on
itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from .db import Executor, Q

ENDPOINT_DISABLED = "endpoint.disabled"
ENDPOINT_RECOVERED = "endpoint.recovered"
DELIVERY_FAILED = "delivery.failed"

# What the ops tenant's endpoints can subscribe to, with what each means.
OPS_EVENT_TYPES: Mapping[str, str] = {
    ENDPOINT_DISABLED: "The dispatcher disabled an endpoint (failure policy or 410 Gone);"
    " its deliveries wait until it is enabled again",
    ENDPOINT_RECOVERED: "An endpoint that was failing accepted a delivery again",
    DELIVERY_FAILED: "A delivery ran out of retries and is failed (kept, replayable)",
}

# Error lines carried by endpoint.disabled: enough to see the pattern, not the whole log.
LAST_ERRORS = 3


@dataclass(frozen=True, slots=True)
class OpsEvent:
    """One operational event about an endpoint; the statement adds the endpoint's tenant, id,
    url and description to `details` to make the payload."""

    event_type: str
    endpoint_id: int
    details: Mapping[str, Any]


def endpoint_disabled(
    endpoint_id: int,
    *,
    reason: str,
    disabled_at: datetime,
    consecutive_failures: int | None,
    failing_since: datetime | None,
    last_errors: Sequence[str],
) -> OpsEvent:
    """The dispatcher disabled the endpoint (by the failure policy or on a 410)."""
    return OpsEvent(
        ENDPOINT_DISABLED,
        endpoint_id,
        {
            "reason": reason,
            "disabled_at": disabled_at,
            "consecutive_failures": consecutive_failures,
            "failing_since": failing_since,
            "last_errors": list(last_errors[-LAST_ERRORS:]),
        },
    )


def endpoint_recovered(
    endpoint_id: int, *, failures: int, failing_since: datetime | None, recovered_at: datetime
) -> OpsEvent:
    """A success ended the endpoint's failing streak of `failures` attempts."""
    return OpsEvent(
        ENDPOINT_RECOVERED,
        endpoint_id,
        {
            "failures": failures,
            "failing_since": failing_since,
            "recovered_at": recovered_at,
        },
    )


def delivery_failed(
    endpoint_id: int,
    *,
    delivery_id: int,
    event_id: str,
    event_type: str,
    attempts: int,
    status_code: int | None,
    error: str | None,
    failed_at: datetime,
) -> OpsEvent:
    """The delivery's last scheduled attempt failed; it stays `failed` until replayed."""
    return OpsEvent(
        DELIVERY_FAILED,
        endpoint_id,
        {
            "delivery_id": delivery_id,
            "event_id": event_id,
            "event_type": event_type,
            "attempts": attempts,
            "last_status_code": status_code,
            "last_error": error,
            "failed_at": failed_at,
        },
    )


async def insert(conn: Executor, tenant: str, events: Sequence[OpsEvent]) -> int:
    """Insert `events` for the ops `tenant` in one statement; returns how many were inserted
    (events about the ops tenant's own endpoints, or endpoints deleted meanwhile, are not)."""
    if not events:
        return 0
    rows = await conn.fetch(
        Q["insert_ops_events"],
        tenant,
        [e.event_type for e in events],
        [e.endpoint_id for e in events],
        [orjson.dumps(e.details).decode() for e in events],
    )
    return len(rows)
