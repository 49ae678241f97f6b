"""Hostile or broken rows: refused at insert by a named constraint, or parked with a reason the
delivery log shows; never a crash, never good rows stalled behind a bad one."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from dispatcher.db import migrate
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import cli, db_env

Daemons = Callable[..., Awaitable[RunningDaemon]]

GOOD_EVENT = {"tenant": "shop-1", "event_type": "points.earned", "payload": '{"amount": 1}'}


async def insert_event(db: Db, **values: Any) -> str:
    row = {**GOOD_EVENT, **values}
    names = ", ".join(row)
    params = ", ".join(
        f"${i}::text::timestamptz" if name == "occurred_at" else f"${i}"
        for i, name in enumerate(row, start=1)
    )
    return str(
        await db.conn.fetchval(
            f"INSERT INTO outbox ({names}) VALUES ({params}) RETURNING event_id", *row.values()
        )
    )


# The outbox ------------------------------------------------------------------------------------

OVER_1_MIB = json.dumps({"blob": "x" * (1024 * 1024 + 10)})

OUTBOX_CHECKS: list[tuple[dict[str, Any], str]] = [
    ({"tenant": ""}, "outbox_tenant_not_empty_max_200_no_control_chars"),
    ({"tenant": "shop\x07"}, "outbox_tenant_not_empty_max_200_no_control_chars"),
    ({"tenant": "s" * 10_000}, "outbox_tenant_not_empty_max_200_no_control_chars"),
    ({"tenant": "shop\n1"}, "outbox_tenant_not_empty_max_200_no_control_chars"),
    ({"tenant": "s" * 201}, "outbox_tenant_not_empty_max_200_no_control_chars"),
    ({"event_type": "points earned"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points.\x01earned"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points.earned\n"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": ""}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points..earned"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points.*"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_id": ""}, "outbox_event_id_printable_ascii_max_200"),
    ({"event_type": "points\x1b[31m.earned"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points.earned\r\nX-Injected: 1"}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "a" * 201}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": ".".join(["a"] * 5000)}, "outbox_event_type_dotted_name_max_200"),
    ({"event_type": "points.\u00e9arned"}, "outbox_event_type_dotted_name_max_200"),
    ({"payload": "null"}, "outbox_payload_not_json_null"),
    ({"payload": OVER_1_MIB}, "outbox_payload_max_1048576_bytes"),
    ({"occurred_at": "infinity"}, "outbox_occurred_at_between_years_1_and_9999"),
    ({"occurred_at": "-infinity"}, "outbox_occurred_at_between_years_1_and_9999"),
    ({"occurred_at": "20000-01-01 00:00:00+00"}, "outbox_occurred_at_between_years_1_and_9999"),
    ({"occurred_at": "0044-03-15 00:00:00+00 BC"}, "outbox_occurred_at_between_years_1_and_9999"),
    ({"event_id": "evt 1\n"}, "outbox_event_id_printable_ascii_max_200"),
    ({"event_id": "e" * 201}, "outbox_event_id_printable_ascii_max_200"),
    ({"ordering_key": "k" * 201}, "outbox_ordering_key_max_200"),
]


@pytest.mark.parametrize(
    ("values", "constraint"),
    OUTBOX_CHECKS,
    ids=[f"{next(iter(v))}-{i}" for i, (v, _) in enumerate(OUTBOX_CHECKS)],
)
async def test_a_bad_outbox_row_is_refused_by_a_named_constraint(
    db: Db, values: dict[str, Any], constraint: str
) -> None:
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_event(db, **values)
    assert info.value.constraint_name == constraint
    assert constraint in str(info.value)


@pytest.mark.parametrize("column", ["tenant", "event_type", "payload"])
async def test_a_missing_required_outbox_value_is_refused_naming_the_column(
    db: Db, column: str
) -> None:
    with pytest.raises(asyncpg.NotNullViolationError) as info:
        await insert_event(db, **{column: None})
    assert info.value.column_name == column


async def test_a_payload_that_is_not_json_or_holds_a_nul_is_refused_by_the_jsonb_type(
    db: Db,
) -> None:
    for text in ['{"a": ', '"\\u0000"', '{"a": "\\ud83d"}']:
        with pytest.raises(asyncpg.DataError):
            await insert_event(db, payload=text)


async def test_a_repeated_event_id_is_refused_by_the_unique_constraint(db: Db) -> None:
    await insert_event(db, event_id="order-1")
    with pytest.raises(asyncpg.UniqueViolationError) as info:
        await insert_event(db, event_id="order-1")
    assert info.value.constraint_name == "outbox_event_id_unique"


# The payload limit -----------------------------------------------------------------------------


def payload_of(size: int) -> str:
    """A JSON object whose jsonb datum is about `size` bytes."""
    return json.dumps({"blob": "x" * (size - 20)})


async def test_the_payload_limit_follows_the_config_each_time_migrate_runs(db: Db) -> None:
    dbc = db.config.database
    assert await migrate(dbc, max_payload_bytes=1048576) == []  # the default: nothing to do
    assert await migrate(dbc, max_payload_bytes=2048) == ["outbox_payload_max_2048_bytes"]
    assert await migrate(dbc, max_payload_bytes=2048) == []
    await insert_event(db, payload=payload_of(1500))
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_event(db, payload=payload_of(3000))
    assert info.value.constraint_name == "outbox_payload_max_2048_bytes"
    assert "outbox_payload_max_2048_bytes" in str(info.value)
    # Raised again: what was refused is accepted, and only one limit is left on the table.
    assert await migrate(dbc, max_payload_bytes=4096) == ["outbox_payload_max_4096_bytes"]
    await insert_event(db, payload=payload_of(3000))
    names = await db.conn.fetch(
        "SELECT conname FROM pg_constraint WHERE conrelid = 'outbox'::regclass"
        " AND conname LIKE 'outbox_payload_max%'"
    )
    assert [r["conname"] for r in names] == ["outbox_payload_max_4096_bytes"]


async def test_the_payload_limit_counts_the_payload_before_compression(db: Db) -> None:
    await migrate(db.config.database, max_payload_bytes=4096)
    with pytest.raises(asyncpg.CheckViolationError):
        await insert_event(db, payload=json.dumps({"blob": "a" * 100_000}))  # compresses well


async def test_dispatcher_migrate_applies_max_payload_bytes_from_the_config(db: Db) -> None:
    env = db_env(db, DISPATCHER_EVENTS_MAX_PAYLOAD_BYTES="65536")
    run = await cli("migrate", env=env)
    assert run.rc == 0, run
    assert run.out.splitlines() == ["applied outbox_payload_max_65536_bytes"]
    again = await cli("migrate", env=env)
    assert again.rc == 0, again
    assert "up to date" in again.out
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await insert_event(db, payload=payload_of(70_000))
    assert info.value.constraint_name == "outbox_payload_max_65536_bytes"


async def test_a_row_accepted_under_a_higher_limit_is_still_delivered_after_lowering_it(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    await db.add_endpoint(receiver.url)
    await migrate(db.config.database, max_payload_bytes=8192)
    big = await insert_event(db, payload=payload_of(6000))
    await migrate(db.config.database, max_payload_bytes=2048)
    small = await insert_event(db)
    await daemon_factory()
    await wait_until(lambda: len(receiver.requests) == 2, message="both events delivered")
    assert sorted(receiver.event_ids()) == sorted([big, small])


# Endpoints written by SQL ----------------------------------------------------------------------

ENDPOINT_CHECKS: list[tuple[dict[str, Any], str]] = [
    ({"url": "ftp://example.com/h"}, "endpoints_url_"),
    ({"url": "example.com/h"}, "endpoints_url_"),
    ({"url": "https://user:pw@example.com/h"}, "endpoints_url_"),
    ({"url": "https://u@example.com/h"}, "endpoints_url_"),
    ({"url": "https://exa mple.com/h"}, "endpoints_url_"),
    ({"url": "https://example.com/h\x01"}, "endpoints_url_"),
    ({"url": "https://example.com/" + "a" * 3000}, "endpoints_url_"),
    ({"url": ""}, "endpoints_url_"),
    ({"profile": "svix"}, "endpoints_profile_known"),
    ({"profile": "Standard"}, "endpoints_profile_known"),
    ({"algorithm": "md5"}, "endpoints_algorithm_known"),
    ({"encoding": "base32"}, "endpoints_encoding_known"),
    ({"signed": "timestamp"}, "endpoints_signed_known"),
    ({"secret": "short"}, "endpoints_secret_not_empty"),
    ({"tenant": ""}, "endpoints_tenant_not_empty_max_200_no_control_chars"),
    ({"event_types": ["points earned"]}, "endpoints_event_types_valid_patterns"),
    ({"event_types": ["tier.*.gold"]}, "endpoints_event_types_valid_patterns"),
    ({"event_types": ["points.earned", ""]}, "endpoints_event_types_valid_patterns"),
    ({"headers": "[]"}, "endpoints_headers_object"),
    ({"max_in_flight": 0}, "endpoints_max_in_flight_1_to_10000"),
    ({"timeout_ms": -1}, "endpoints_timeout_ms_1_to_300000"),
    ({"timeout_ms": 0}, "endpoints_timeout_ms_1_to_300000"),
]


@pytest.mark.parametrize(
    ("columns", "constraint"),
    ENDPOINT_CHECKS,
    ids=[f"{next(iter(c))}-{i}" for i, (c, _) in enumerate(ENDPOINT_CHECKS)],
)
async def test_an_endpoint_row_written_by_sql_with_a_bad_value_is_refused_by_a_constraint(
    db: Db, columns: dict[str, Any], constraint: str
) -> None:
    values: dict[str, Any] = {
        "url": "https://example.com/h",
        "secret": "whsec_" + "A" * 43 + "=",
        **columns,
    }
    url = values.pop("url")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.add_endpoint(url, **values)
    assert info.value.constraint_name is not None
    assert info.value.constraint_name.startswith(constraint), info.value.constraint_name


# The daemon ------------------------------------------------------------------------------------


async def test_bad_rows_stall_nothing_and_what_cannot_be_sent_is_parked_with_a_reason(
    db: Db, receiver: Receiver, daemon_factory: Daemons
) -> None:
    good_ep, _ = await db.add_endpoint(receiver.url, tenant="shop-1")
    # A secret the standard profile cannot sign with (no whsec_), written around the CLI.
    bad_ep, _ = await db.add_endpoint(receiver.url, tenant="shop-2", secret="not-a-standard-secret")
    # An event for a tenant nobody subscribes to, then refused rows, then good ones.
    ghost = await insert_event(db, tenant="nobody-listens")
    for values, _constraint in OUTBOX_CHECKS[:6]:
        with pytest.raises(asyncpg.CheckViolationError):
            await insert_event(db, **values)
    deep = "[" * 3000 + "1" + "]" * 3000
    hostile_but_valid = [
        await insert_event(db, payload='{"id": 123456789012345678901234567890}'),
        await insert_event(db, payload=deep),
        await insert_event(db, payload='{"text": "\\u0001\\u2028</script>", "": {}}'),
    ]
    parked = await insert_event(db, tenant="shop-2")
    good = await db.insert_events(3)
    await daemon_factory()
    wanted = {*hostile_but_valid, *good}
    await wait_until(
        lambda: set(receiver.event_ids()) >= wanted, message="every deliverable event sent"
    )
    bodies = {r.headers["webhook-id"]: r.body for r in receiver.requests}
    assert b'"data":{"id":123456789012345678901234567890}' in bodies[hostile_but_valid[0]]
    # Deeper than Python's json parses: sent as the stored text, compacted.
    assert bodies[hostile_but_valid[1]].endswith(b'"data":' + deep.encode() + b"}")
    # The event nobody wanted was fanned out to nothing; it holds nothing up.
    row = await db.row("SELECT fanned_out_at FROM outbox WHERE event_id = $1", ghost)
    assert row["fanned_out_at"] is not None
    assert await db.count("SELECT count(*) FROM deliveries WHERE event_id = $1", ghost) == 0
    # The one that cannot be signed runs out of retries, with the reason in the delivery log.
    await wait_until(
        lambda: db.count(
            "SELECT count(*) FROM deliveries WHERE event_id = $1 AND status = 'failed'", parked
        ),
        message="the unsignable delivery failed",
    )
    run = await cli("delivery", "list", "--endpoint", str(bad_ep), "--json", env=db_env(db))
    [view] = run.json()
    assert view["status"] == "failed"
    assert "signing_error" in view["last_error"]
    assert "whsec_" in view["last_error"]
    assert "not-a-standard-secret" not in run.out
    assert await db.count(
        "SELECT count(*) FROM deliveries WHERE endpoint_id = $1 AND status = 'succeeded'", good_ep
    ) == len(wanted)
