"""Envelope shapes per endpoint: the contract's envelope by default, renamed fields or the payload
alone on request; stored with constraints, managed by the CLI, sent and signed by the daemon."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import standardwebhooks
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.db import migrations
from dispatcher.envelope import (
    ENVELOPE_FIELDS,
    EnvelopeShape,
    InvalidEnvelope,
    format_timestamp,
    render_body,
    shape_from_options,
)
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import URL, add_endpoint, assert_one_error_line, cli, db_env, endpoint_row

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]

# What PostgreSQL text and jsonb can hold: no surrogates, no NUL.
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()  # beyond 64 bits too, which takes the stdlib fallback
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(9998, 12, 30),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))]),
)
EVENT_IDS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1)
EVENT_TYPES = st.from_regex(r"\A[a-z0-9_-]+(\.[a-z0-9_-]+){0,3}\Z")
NAMES = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=20)


# render_body ------------------------------------------------------------------------------------


@given(EVENT_IDS, EVENT_TYPES, TEXT, MOMENTS, JSON_VALUES)
def test_the_default_body_parses_back_to_the_same_values(
    event_id: str, event_type: str, tenant: str, moment: datetime, payload: Any
) -> None:
    body = render_body(event_id, event_type, tenant, moment, json.dumps(payload))
    assert json.loads(body) == {
        "id": event_id,
        "type": event_type,
        "tenant": tenant,
        "timestamp": format_timestamp(moment),
        "data": payload,
    }
    assert list(json.loads(body)) == list(ENVELOPE_FIELDS)


@given(
    EVENT_IDS,
    TEXT,
    MOMENTS,
    JSON_VALUES,
    st.lists(NAMES, min_size=5, max_size=5, unique=True),
)
def test_a_renamed_envelope_carries_the_same_values_under_the_new_names_in_the_same_order(
    event_id: str, tenant: str, moment: datetime, payload: Any, names: list[str]
) -> None:
    payload_json = json.dumps(payload)
    shape = EnvelopeShape(names=tuple(names))
    body = render_body(event_id, "points.earned", tenant, moment, payload_json, shape)
    default = json.loads(render_body(event_id, "points.earned", tenant, moment, payload_json))
    assert list(json.loads(body).items()) == list(zip(names, default.values(), strict=True))
    data_only = EnvelopeShape(data_only=True)
    assert json.loads(render_body(event_id, "t", tenant, moment, payload_json, data_only)) == (
        payload
    )


def test_a_data_only_body_is_compact_json_not_postgresqls_spaced_text() -> None:
    shape = EnvelopeShape(data_only=True)
    moment = datetime(2026, 11, 23, 10, tzinfo=UTC)
    body = render_body("evt_1", "points.earned", "s", moment, '{"a": 1, "b": [1, 2]}', shape)
    assert body == b'{"a":1,"b":[1,2]}'


# Options ----------------------------------------------------------------------------------------


def test_envelope_options_build_the_shape_and_refuse_what_cannot_be_sent() -> None:
    renamed = shape_from_options(None, None, [("id", "uuid"), ("type", "event")])
    assert renamed is not None
    assert renamed.names == ("uuid", "event", "tenant", "timestamp", "data")
    assert renamed.columns() == (None, '{"id": "uuid", "type": "event"}')
    # Renaming a field back to its own name restores the default: nothing left to store.
    assert shape_from_options(renamed, None, [("id", "id"), ("type", "type")]) is None
    assert shape_from_options(renamed, "data", []) == EnvelopeShape(data_only=True)
    assert shape_from_options(EnvelopeShape(data_only=True), "full", []) is None
    for stored, envelope, fields, fragment in [
        (None, None, [("colour", "x")], "not an envelope field"),
        (None, None, [("type", "id")], "both be sent as 'id'"),
        (renamed, None, [("tenant", "uuid")], "both be sent as 'uuid'"),
        (None, None, [("id", "")], "1 to 100 characters"),
        (None, None, [("id", "a\tb")], "control characters"),
        (None, None, [("id", "a\x85b")], "control characters"),
        (None, "data", [("id", "uuid")], "--envelope data"),
        (EnvelopeShape(data_only=True), None, [("id", "uuid")], "--envelope data"),
    ]:
        with pytest.raises(InvalidEnvelope, match=fragment):
            shape_from_options(stored, envelope, fields)


# The table --------------------------------------------------------------------------------------


async def test_the_table_refuses_an_invalid_envelope_with_a_named_constraint(db: Db) -> None:
    cases = [
        ("envelope", "xml", "endpoints_envelope_full_or_data"),
        ("envelope_fields", "[]", "endpoints_envelope_fields_object_of_id_type_tenant_timestamp"),
        (
            "envelope_fields",
            '{"colour": "x"}',
            "endpoints_envelope_fields_object_of_id_type_tenant_timestamp",
        ),
        ("envelope_fields", '{"id": 1}', "endpoints_envelope_fields_distinct_names_1_to_100"),
        ("envelope_fields", '{"id": ""}', "endpoints_envelope_fields_distinct_names_1_to_100"),
        ("envelope_fields", '{"id": "a\\u0085b"}', "endpoints_envelope_fields_distinct_names"),
        ("envelope_fields", '{"id": "type"}', "endpoints_envelope_fields_distinct_names_1_to_100"),
        ("envelope_fields", json.dumps({"id": "x" * 101}), "endpoints_envelope_fields_distinct"),
    ]
    for column, value, constraint in cases:
        columns: dict[str, Any] = {column: value}
        with pytest.raises(asyncpg.CheckViolationError) as info:
            await db.add_endpoint("https://example.com/h", **columns)
        assert (info.value.constraint_name or "").startswith(constraint), (column, value)
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.add_endpoint(
            "https://example.com/h", envelope="data", envelope_fields='{"id": "uuid"}'
        )
    assert info.value.constraint_name == "endpoints_envelope_fields_only_with_full_envelope"
    eid, _ = await db.add_endpoint(
        "https://example.com/h", envelope="full", envelope_fields='{"id": "uuid", "type": "id"}'
    )
    assert eid > 0


async def test_migration_004_can_run_again_on_a_migrated_schema(db: Db) -> None:
    (m,) = [m for m in migrations() if m.version == 4]
    eid, _ = await db.add_endpoint("https://example.com/h", envelope="data")
    await db.conn.execute(m.sql)
    row = await db.row("SELECT envelope, version FROM endpoints WHERE id = $1", eid)
    assert (row["envelope"], row["version"]) == ("data", 1)
    await db.conn.execute("UPDATE endpoints SET envelope = NULL WHERE id = $1", eid)
    # One trigger bumps the version once, however often the migration ran.
    assert await db.count("SELECT version FROM endpoints WHERE id = $1", eid) == 2


# The CLI ----------------------------------------------------------------------------------------


async def test_endpoint_add_show_and_update_manage_the_envelope(db: Db) -> None:
    added = await add_endpoint(
        db, "--field", "id=uuid", "--field", "type=event", "--field", "tenant=shop"
    )
    eid = str(added["id"])
    env = db_env(db)
    show, listed = await asyncio.gather(
        cli("endpoint", "show", eid, "--json", env=env), cli("endpoint", "list", env=env)
    )
    assert show.json()["envelope"] == "full"
    assert show.json()["envelope_fields"] == {"id": "uuid", "type": "event", "tenant": "shop"}
    assert "ENVELOPE" in listed.out.splitlines()[0]
    before = await endpoint_row(db, added["id"])

    renamed = await cli(
        "endpoint",
        "update",
        eid,
        "--field",
        "timestamp=created_at",
        "--field",
        "id=id",
        "--json",
        env=env,
    )
    assert renamed.json()["envelope_fields"] == {
        "type": "event",
        "tenant": "shop",
        "timestamp": "created_at",
    }
    data = await cli("endpoint", "update", eid, "--envelope", "data", "--json", env=env)
    assert (data.json()["envelope"], data.json()["envelope_fields"]) == ("data", {})
    after = await endpoint_row(db, added["id"])
    assert (after["envelope"], after["envelope_fields"]) == ("data", None)
    assert after["version"] == before["version"] + 2

    refused, clash, unknown = await asyncio.gather(
        cli("endpoint", "update", eid, "--field", "id=uuid", env=env),
        cli("endpoint", "add", "--tenant", "t", "--url", URL, "--field", "type=id", env=env),
        cli("endpoint", "update", eid, "--envelope", "xml", env=env),
    )
    assert_one_error_line(refused, "envelope:", "--envelope data")
    assert_one_error_line(clash, "envelope:", "'id'")
    assert_one_error_line(unknown, "--envelope")
    assert await endpoint_row(db, added["id"]) == after


# End to end -------------------------------------------------------------------------------------


async def test_a_renamed_envelope_is_sent_signed_over_its_own_bytes_and_identical_on_retry(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    async def fail_once(request: web.Request, n: int) -> web.StreamResponse:
        return web.Response(status=500 if n == 1 else 200)

    r = await receiver_factory(fail_once)
    fields = {"id": "uuid", "type": "event", "tenant": "shop", "timestamp": "created_at"}
    _, secret = await db.add_endpoint(r.url, envelope_fields=json.dumps(fields))
    await daemon_factory()
    (event_id,) = await db.insert_events(1, tenant="shop-1", event_type="points.earned")
    await wait_until(lambda: len(r.requests) == 2, message="a failed try and its retry")

    first, retry = r.requests
    assert first.body == retry.body
    body = first.json()
    assert list(body) == ["uuid", "event", "shop", "created_at", "data"]
    assert (body["uuid"], body["event"], body["shop"]) == (event_id, "points.earned", "shop-1")
    assert body["data"] == {"customer_id": "cust_1", "amount": 1}
    for req in (first, retry):
        assert standardwebhooks.Webhook(secret).verify(req.body, req.headers) == body


async def test_a_running_daemon_switches_an_endpoint_to_data_only_bodies_when_it_changes(
    db: Db, receiver_factory: Factory, daemon_factory: Daemons
) -> None:
    r = await receiver_factory()
    eid, secret = await db.add_endpoint(r.url)
    await daemon_factory()
    (first_id,) = await db.insert_events(1)
    await wait_until(lambda: len(r.requests) == 1, message="the default envelope delivered")
    await db.conn.execute("UPDATE endpoints SET envelope = 'data' WHERE id = $1", eid)
    (second_id,) = await db.insert_events(1)
    await wait_until(lambda: len(r.requests) == 2, message="the data-only body delivered")

    default, data_only = r.requests
    assert default.json()["id"] == first_id
    assert data_only.headers["webhook-id"] == second_id
    # jsonb keeps keys shortest first; the body is that order, compact.
    assert data_only.body == b'{"amount":1,"customer_id":"cust_1"}'
    verified = standardwebhooks.Webhook(secret).verify(data_only.body, data_only.headers)
    assert verified == {"customer_id": "cust_1", "amount": 1}


# Compact and exact -----------------------------------------------------------------------------

# What jsonb holds that plain floats do not: integers of any size, nesting of any depth.
BIG_INTS = st.integers(min_value=-(10**40), max_value=10**40)
EXACT_JSON = st.recursive(
    st.none() | st.booleans() | BIG_INTS | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')


def outside_strings(body: bytes) -> str:
    return _STRINGS.sub("", body.decode())


@settings(max_examples=100, deadline=None)
@given(EXACT_JSON, st.integers(min_value=0, max_value=3000), st.booleans())
def test_every_body_is_compact_json_carrying_the_payload_exactly(
    payload: Any, depth: int, data_only: bool
) -> None:
    # PostgreSQL's text for jsonb spaces after ':' and ',', as json.dumps does by default.
    nested = "[" * depth + json.dumps(payload) + "]" * depth
    shape = EnvelopeShape(data_only=True) if data_only else None
    moment = datetime(2026, 11, 23, 10, tzinfo=UTC)
    body = render_body("evt_1", "points.earned", "shop", moment, nested, shape)
    assert not re.search(r"\s", outside_strings(body)), body[:200]
    data = body if data_only else body[body.index(b'"data":') + 7 : -1]
    text = data.decode()
    assert text[:depth] == "[" * depth
    assert text[len(text) - depth :] == "]" * depth
    # Deeper than Python's json parses, so compared inside the brackets.
    assert json.loads(text[depth : len(text) - depth]) == payload


def test_timestamps_are_utc_to_the_second_with_a_four_digit_year() -> None:
    assert format_timestamp(datetime(1, 2, 3, 4, 5, 6, 999_999, tzinfo=UTC)) == (
        "0001-02-03T04:05:06Z"
    )
    plus_two = timezone(timedelta(hours=2))
    assert format_timestamp(datetime(2026, 11, 23, 10, 0, 0, tzinfo=plus_two)) == (
        "2026-11-23T08:00:00Z"
    )
