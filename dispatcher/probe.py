"""`dispatcher endpoint test`: one sample event sent to an endpoint now, from the CLI, rendered,
signed and sent as the daemon sends it (the endpoint's envelope, headers, secrets and timeout,
and the `[security]` policy), then recorded in the delivery log like any attempt.

What is recorded: an outbox row (event id `evt_test_…`, already marked fanned out, so no daemon
sends it to anyone), one delivery to this endpoint in its final state (`succeeded` or `failed`,
one attempt; a replay sends it again) and its attempt row. The endpoint's failure streak and
enabled state are left alone: a test says nothing about live traffic. Disabled endpoints can be
tested, which is how an operator checks one before enabling it.
"""

from __future__ import annotations

import argparse
import json
import re
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from .argtypes import record_id
from .catalog import catalog
from .config import Config
from .db import Q
from .endpoints import Endpoint
from .envelope import render_body
from .errors import CliError
from .secretbox import box_for
from .sending import Outcome, Sender
from .signing import SigningError

DbCommand = Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]]

SAMPLE_DATA: dict[str, Any] = {
    "test": True,
    "note": "sample event sent by `dispatcher endpoint test`",
}
# When the filter names no exact type and nothing in the catalog matches it.
FALLBACK_TYPE = "webhook.test"
# A sample, not a bulk load: refused before anything is sent rather than by the outbox after.
MAX_DATA_BYTES = 64 * 1024
# The outbox's rule for event types (outbox_event_type_dotted_name_max_200).
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def subscribed(patterns: Sequence[str], event_type: str) -> bool:
    """The SQL function event_matches, in Python: empty means all, `*`, exact, `prefix.*`."""
    if not patterns:
        return True
    return any(
        p in ("*", event_type) or (p.endswith(".*") and event_type.startswith(p[:-1]))
        for p in patterns
    )


def pick_event_type(patterns: Sequence[str], requested: str | None, known: Iterable[str]) -> str:
    """The type to test with: `requested` if subscribed, else the filter's first exact name,
    else the first catalog type it matches, else `<prefix>.test` for its first wildcard."""
    if requested is not None:
        if not subscribed(patterns, requested):
            raise CliError(
                f"--type {requested}: the endpoint does not subscribe to it"
                f" (its events: {', '.join(patterns)})"
            )
        return requested
    exact = [p for p in patterns if p != "*" and not p.endswith(".*")]
    if exact:
        return exact[0]
    for name in known:
        if subscribed(patterns, name):
            return name
    wildcard = next((p for p in patterns if p.endswith(".*")), None)
    return f"{wildcard[:-2]}.test" if wildcard else FALLBACK_TYPE


@dataclass(frozen=True, slots=True)
class Probe:
    """What one test send did, and the delivery that records it."""

    endpoint: Endpoint
    event_id: str
    event_type: str
    delivery_id: int
    outcome: Outcome

    def view(self) -> dict[str, Any]:
        o = self.outcome
        return {
            "id": self.endpoint.id,
            "url": self.endpoint.url,
            "enabled": self.endpoint.enabled,
            "event_id": self.event_id,
            "event_type": self.event_type,
            "delivery_id": self.delivery_id,
            "ok": o.ok,
            "status_code": o.status_code,
            "duration_ms": o.duration_ms,
            "error": o.summary,
            "response_excerpt": o.excerpt,
        }


async def send_test_event(
    conn: asyncpg.Connection,
    config: Config,
    endpoint_id: int,
    *,
    event_type: str | None = None,
    data: Any = None,
) -> Probe:
    """Send one sample event to the endpoint now and record it; CliError if it does not exist
    or `event_type` is not one it subscribes to. No transaction spans the request."""
    row = await conn.fetchrow(Q["endpoints_by_id"], [endpoint_id])
    if row is None:
        raise CliError(f"endpoint {endpoint_id} does not exist")
    endpoint = Endpoint.from_row(row, box_for(config.security))
    known = (t.name for t in catalog(config.events.extra))
    chosen = pick_event_type(list(row["event_types"]), event_type, known)
    event_id = f"evt_test_{uuid.uuid4().hex}"
    payload = orjson.dumps(SAMPLE_DATA if data is None else data).decode()
    occurred_at = attempted_at = datetime.now(UTC)
    body = render_body(event_id, chosen, endpoint.tenant, occurred_at, payload, endpoint.envelope)
    d = config.delivery
    try:
        headers = endpoint.request_headers(event_id, chosen, 1, body, attempted_at)
    except SigningError as exc:
        outcome = Outcome(None, "signing_error", str(exc), None, 0)
    else:
        sender = Sender(
            concurrency=1,
            max_response_bytes=d.max_response_bytes,
            excerpt_bytes=d.response_excerpt_bytes,
            allow_http=config.security.allow_http,
            allow_private_networks=config.security.allow_private_networks,
            user_agent=d.user_agent,
        )
        try:
            timeout = min(endpoint.timeout or d.timeout, d.lease / 2)
            outcome = await sender.send(endpoint.url, body, headers, timeout)
        finally:
            await sender.close()
    delivery_id = await conn.fetchval(
        Q["record_test_delivery"],
        event_id,
        endpoint.tenant,
        chosen,
        payload,
        occurred_at,
        endpoint.id,
        "succeeded" if outcome.ok else "failed",
        attempted_at,
        outcome.status_code,
        outcome.summary,
        outcome.duration_ms,
        outcome.error,
        outcome.detail,
        outcome.excerpt,
    )
    return Probe(endpoint, event_id, chosen, delivery_id, outcome)


def _data(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if value is None:
        raise argparse.ArgumentTypeError("must be a JSON value other than null")
    if len(orjson.dumps(value)) > MAX_DATA_BYTES:
        raise argparse.ArgumentTypeError(f"longer than {MAX_DATA_BYTES // 1024} KiB")
    return value


def _event_type(text: str) -> str:
    if len(text) > 200 or not _EVENT_TYPE.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an event type (a dotted name, e.g. points.earned)"
        )
    return text


def add_parser(
    endpoint_verbs: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    listing: argparse.ArgumentParser,
) -> None:
    """`endpoint test ID [--type TYPE] [--data JSON] [--json]`."""
    p = endpoint_verbs.add_parser(
        "test",
        parents=[common, listing],
        help="send a sample event to an endpoint now and show the response",
        description="Send one signed sample event to the endpoint now, as the daemon would, and"
        " record it in the delivery log (event id evt_test_...). Exits 1 if the endpoint does"
        " not answer 2xx.",
    )
    p.add_argument("id", type=record_id)
    p.add_argument(
        "--type",
        type=_event_type,
        metavar="EVENT_TYPE",
        help="event type to send, one the endpoint subscribes to (default: its first)",
    )
    p.add_argument(
        "--data", type=_data, metavar="JSON", help="the event's data (default: a sample)"
    )


async def cmd_endpoint_test(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    probe = await send_test_event(conn, config, args.id, event_type=args.type, data=args.data)
    o = probe.outcome
    if args.json:
        print(json.dumps(probe.view()))
    else:
        ep = probe.endpoint
        disabled = "" if ep.enabled else " (disabled)"
        if o.ok:
            print(f"endpoint {ep.id}{disabled}: HTTP {o.status_code} in {o.duration_ms} ms")
        else:
            print(f"endpoint {ep.id}{disabled}: failed after {o.duration_ms} ms: {o.summary}")
        print(f"url: {ep.url}")
        print(f"event: {probe.event_type} {probe.event_id} (delivery {probe.delivery_id})")
        if o.excerpt:
            print(f"response: {o.excerpt}")
    return 0 if o.ok else 1


DB_HANDLERS: dict[tuple[str, str | None], DbCommand] = {
    ("endpoint", "test"): cmd_endpoint_test,
}
