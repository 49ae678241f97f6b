"""The JSON body a receiver gets: a compact envelope, byte-identical on every retry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson


def render_body(
    event_id: str, event_type: str, tenant: str, occurred_at: datetime, payload_json: str
) -> bytes:
    """The contract's envelope around the payload; the same inputs always give the same bytes."""
    envelope = {
        "id": event_id,
        "type": event_type,
        "tenant": tenant,
        "timestamp": format_timestamp(occurred_at),
        "data": _loads(payload_json),
    }
    try:
        return orjson.dumps(envelope)
    except TypeError:
        # orjson refuses integers beyond 64 bits, which jsonb allows; the stdlib handles them.
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC to the second, e.g. 2026-11-23T10:00:00Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _loads(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
