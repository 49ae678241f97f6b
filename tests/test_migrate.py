"""Migrations: the contract's tables and columns, safe reruns, constraints, the wake-up NOTIFY."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from dispatcher.config import DatabaseConfig
from dispatcher.db import DatabaseError, Q, check_schema, connect_kwargs, migrate, migrations
from tests.conftest import Db, wait_until

# SPEC section 1: the names the backend relies on (more columns may exist).
CONTRACT: dict[str, set[str]] = {
    "outbox": {"tenant", "event_type", "payload", "event_id", "ordering_key", "occurred_at"},
    "endpoints": {
        "id",
        "tenant",
        "url",
        "enabled",
        "consecutive_failures",
        "failing_since",
        "disabled_reason",
    },
    "deliveries": {
        "event_id",
        "endpoint_id",
        "status",
        "attempts",
        "next_attempt_at",
        "last_status_code",
        "last_error",
    },
    "attempts": {"event_id", "endpoint_id", "attempted_at", "duration_ms", "status_code", "error"},
}


@pytest.fixture
async def fresh(pg_dsn: str) -> AsyncIterator[DatabaseConfig]:
    """Settings for a schema that does not exist yet; dropped (with anything in it) afterwards."""
    config = DatabaseConfig(dsn=pg_dsn, schema=f"m_{uuid.uuid4().hex[:12]}")
    yield config
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{config.schema}" CASCADE')
    finally:
        await conn.close()


async def columns(conn: asyncpg.Connection, schema: str, table: str) -> dict[str, dict[str, Any]]:
    rows = await conn.fetch(
        "SELECT column_name, data_type, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
        schema,
        table,
    )
    return {r["column_name"]: dict(r) for r in rows}


# Creating and upgrading -------------------------------------------------------------------------


async def test_migrate_creates_the_contract_tables_with_the_contract_columns(
    fresh: DatabaseConfig,
) -> None:
    await migrate(fresh)
    conn = await asyncpg.connect(fresh.dsn)
    try:
        for table, names in CONTRACT.items():
            have = await columns(conn, fresh.schema, table)
            assert names <= set(have), f"{table} lacks {names - set(have)}"
        outbox = await columns(conn, fresh.schema, "outbox")
    finally:
        await conn.close()
    types = {name: col["data_type"] for name, col in outbox.items()}
    assert types["tenant"] == "text"
    assert types["event_type"] == "text"
    assert types["payload"] == "jsonb"
    assert types["event_id"] == "text"
    assert types["ordering_key"] == "text"
    assert types["occurred_at"] == "timestamp with time zone"
    # Required columns refuse NULL; optional ones have a default or allow NULL.
    for required in ("tenant", "event_type", "payload"):
        assert outbox[required]["is_nullable"] == "NO"
        assert outbox[required]["column_default"] is None
    assert outbox["event_id"]["column_default"] is not None
    assert "now()" in outbox["occurred_at"]["column_default"]
    assert outbox["ordering_key"]["is_nullable"] == "YES"


async def test_migrate_returns_the_names_it_applied_and_records_them(
    fresh: DatabaseConfig,
) -> None:
    applied = await migrate(fresh)
    assert applied == [m.name for m in migrations()]
    assert applied[0] == "001_init"
    conn = await asyncpg.connect(**connect_kwargs(fresh))
    try:
        await check_schema(conn)
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    assert [(r["version"], r["name"]) for r in rows] == [(m.version, m.name) for m in migrations()]


async def test_running_migrate_twice_applies_nothing_the_second_time(
    fresh: DatabaseConfig,
) -> None:
    assert await migrate(fresh)
    assert await migrate(fresh) == []
    conn = await asyncpg.connect(**connect_kwargs(fresh))
    try:
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(migrations())
    finally:
        await conn.close()


async def test_two_concurrent_migrations_both_succeed_and_each_step_is_recorded_once(
    fresh: DatabaseConfig,
) -> None:
    first, second = await asyncio.gather(migrate(fresh), migrate(fresh))
    names = [m.name for m in migrations()]
    assert sorted(first + second) == sorted(names)
    conn = await asyncpg.connect(**connect_kwargs(fresh))
    try:
        rows = await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")
        await check_schema(conn)
    finally:
        await conn.close()
    assert [r["name"] for r in rows] == names


async def test_the_backend_can_insert_with_the_documented_statement_and_no_search_path(
    db: Db, pg_dsn: str
) -> None:
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true)")
    backend = await asyncpg.connect(pg_dsn)  # the backend's own connection: default search_path
    try:
        await backend.execute(
            f"INSERT INTO {db.schema}.outbox (tenant, event_type, payload)"
            " VALUES ('my-store', 'points.earned',"
            """ '{"customer_id":"cust_123","amount":150,"new_balance":2350}')"""
        )
    finally:
        await backend.close()
    row = await db.conn.fetchrow("SELECT event_id, occurred_at, payload FROM outbox")
    assert row is not None
    assert row["occurred_at"] is not None
    assert json.loads(row["payload"])["amount"] == 150


async def test_the_default_event_id_is_evt_and_32_hex_digits_and_unique(db: Db) -> None:
    ids = await db.insert_events(50)
    assert all(re.fullmatch(r"evt_[0-9a-f]{32}", i) for i in ids), ids[:3]
    assert len(set(ids)) == 50


async def test_default_event_ids_begin_with_the_insert_time_so_they_sort_in_insert_order(
    db: Db,
) -> None:
    # In insert order, new ids go to the right edge of the event_id index, not all over it.
    ms = "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
    before = await db.count(ms)
    for _ in range(5):
        await db.insert_events(3)
    after = await db.count(ms)
    ids = [r["event_id"] for r in await db.conn.fetch("SELECT event_id FROM outbox ORDER BY seq")]
    stamps = [int(i[4:16], 16) for i in ids]
    assert before <= stamps[0]
    assert stamps == sorted(stamps)
    assert stamps[-1] <= after


# Constraints ------------------------------------------------------------------------------------


async def insert_event(db: Db, **values: Any) -> None:
    row = {"tenant": "shop-1", "event_type": "points.earned", "payload": "{}", **values}
    names = ", ".join(row)
    params = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await db.conn.execute(f"INSERT INTO outbox ({names}) VALUES ({params})", *row.values())


# Each constraint refusing a bad row, by name: tests/test_bad_rows.py.


async def test_endpoints_accept_a_valid_row_written_directly_in_sql(db: Db) -> None:
    eid, _ = await db.add_endpoint(
        "https://example.com/hooks?x=1", events=["points.earned", "tier.*", "*"], profile="github"
    )
    row = await db.conn.fetchrow("SELECT * FROM endpoints WHERE id = $1", eid)
    assert row is not None
    assert row["enabled"] is True
    assert row["consecutive_failures"] == 0
    assert row["version"] == 1


# The wake-up NOTIFY -------------------------------------------------------------------------------


class Notifications:
    """A second connection LISTENing on the schema's outbox channel."""

    def __init__(self, conn: asyncpg.Connection, channel: str) -> None:
        self.conn = conn
        self.channel = channel
        self.payloads: list[str] = []

    def _on(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        assert channel == self.channel
        self.payloads.append(str(payload))

    async def settle(self, sender: asyncpg.Connection) -> list[str]:
        """Every notification committed so far: a marker sent after them arrives after them."""
        marker = f"marker-{uuid.uuid4().hex}"
        await sender.execute("SELECT pg_notify($1, $2)", self.channel, marker)
        await wait_until(lambda: marker in self.payloads, timeout=5, message="the marker")
        await asyncio.sleep(0.3)  # a bounded grace in which nothing more may arrive
        return [p for p in self.payloads if p != marker]


@pytest.fixture
async def notifications(db: Db, pg_dsn: str) -> AsyncIterator[Notifications]:
    conn = await asyncpg.connect(pg_dsn)
    n = Notifications(conn, f"{db.schema}.outbox")
    await conn.add_listener(n.channel, n._on)
    try:
        yield n
    finally:
        await conn.close()


async def test_an_insert_sends_no_notification_while_no_dispatcher_is_idle(
    db: Db, notifications: Notifications
) -> None:
    await db.insert_events(10)
    await insert_event(db)
    assert await notifications.settle(db.conn) == []


async def test_an_insert_sends_no_notification_while_every_dispatcher_is_busy(
    db: Db, notifications: Notifications
) -> None:
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', false)")
    await db.insert_events(10)
    assert await notifications.settle(db.conn) == []


async def test_a_1000_row_insert_sends_exactly_one_notification_while_a_dispatcher_is_idle(
    db: Db, notifications: Notifications
) -> None:
    await db.conn.execute(
        "INSERT INTO listeners (replica, idle) VALUES ('r1', true), ('r2', true), ('r3', false)"
    )
    await db.insert_events(1000)
    assert await db.count("SELECT count(*) FROM outbox") == 1000
    assert await notifications.settle(db.conn) == [""]
    # PostgreSQL folds equal notifications of one transaction, so the count alone cannot tell a
    # per-row trigger (1,000 pg_notify calls) from a per-statement one: check the trigger too.
    per_row = await db.conn.fetch(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = 'outbox'::regclass"
        " AND NOT tgisinternal AND tgtype & 1 = 1"
    )
    assert per_row == []


async def test_each_committed_insert_statement_wakes_an_idle_dispatcher(
    db: Db, notifications: Notifications
) -> None:
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true)")
    await db.insert_events(1)
    await db.insert_events(1)
    assert await notifications.settle(db.conn) == ["", ""]


async def test_an_insert_refused_or_rolled_back_wakes_nobody(
    db: Db, notifications: Notifications
) -> None:
    # The trigger fires before the statement: its notification must still depend on the commit.
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true)")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.conn.execute(
            "INSERT INTO outbox (tenant, event_type, payload) VALUES ('shop-1', 'bad type!', '{}')"
        )
    tx = db.conn.transaction()
    await tx.start()
    await db.insert_events(1)
    await tx.rollback()
    assert await db.count("SELECT count(*) FROM outbox") == 0
    assert await notifications.settle(db.conn) == []


IDLE_COUNT = "SELECT coalesce(pg_sequence_last_value('idle_listeners'), 0)"


async def test_the_idle_count_the_insert_trigger_reads_follows_the_listeners_table(db: Db) -> None:
    assert await db.count(IDLE_COUNT) == 0
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true), ('r2', true)")
    assert await db.count(IDLE_COUNT) == 2
    await db.conn.execute("UPDATE listeners SET idle = false WHERE replica = 'r1'")
    assert await db.count(IDLE_COUNT) == 1
    await db.conn.execute("DELETE FROM listeners WHERE replica = 'r2'")
    assert await db.count(IDLE_COUNT) == 0
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r3', true)")
    await db.conn.execute("TRUNCATE listeners")
    assert await db.count(IDLE_COUNT) == 0


async def test_a_wrong_idle_count_is_put_right_by_the_next_stale_listener_cleanup(db: Db) -> None:
    # As after a transaction that set the count and then rolled back.
    await db.conn.execute("SELECT setval('idle_listeners', 5)")
    await db.conn.execute(Q["remove_stale_listeners"], 600.0)
    assert await db.count(IDLE_COUNT) == 0


async def test_two_replicas_going_idle_at_once_are_both_counted(db: Db, pg_dsn: str) -> None:
    # The second to commit must count the first's flag, not the snapshot it started with.
    first, second = [await asyncpg.connect(pg_dsn) for _ in range(2)]
    try:
        for c in (first, second):
            await c.execute(f'SET search_path TO "{db.schema}"')
        tx = first.transaction()
        await tx.start()
        await first.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true)")
        other = asyncio.ensure_future(
            second.execute("INSERT INTO listeners (replica, idle) VALUES ('r2', true)")
        )
        pid = second.get_server_pid()

        async def waiting_or_done() -> bool:
            state = await db.conn.fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
            )
            return other.done() or state == "Lock"

        await wait_until(waiting_or_done, message="the second replica's flag written")
        await tx.commit()
        await asyncio.wait_for(other, 5)
        assert await db.count(IDLE_COUNT) == 2
    finally:
        for c in (first, second):
            await c.close()


@pytest.fixture
async def role(db: Db) -> AsyncIterator[str]:
    """A new role allowed to use the test's schema and nothing more; dropped afterwards."""
    name = f"role_{uuid.uuid4().hex[:8]}"
    await db.conn.execute(f'CREATE ROLE "{name}"')
    await db.conn.execute(f'GRANT USAGE ON SCHEMA "{db.schema}" TO "{name}"')
    try:
        yield name
    finally:
        await db.conn.execute("RESET ROLE")
        await db.conn.execute(f'DROP OWNED BY "{name}"')
        await db.conn.execute(f'DROP ROLE "{name}"')


async def test_a_backend_role_allowed_only_to_insert_wakes_an_idle_dispatcher(
    db: Db, notifications: Notifications, role: str
) -> None:
    await db.conn.execute(f'GRANT INSERT ON outbox TO "{role}"')
    insert = (
        f'SET ROLE "{role}";'
        " INSERT INTO outbox (tenant, event_type, payload)"
        " VALUES ('shop-1', 'points.earned', '{}');"
        " RESET ROLE"
    )
    await db.conn.execute(insert)
    await db.conn.execute("INSERT INTO listeners (replica, idle) VALUES ('r1', true)")
    await db.conn.execute(insert)
    assert await notifications.settle(db.conn) == [""]


async def test_the_dispatchers_connections_read_committed_whatever_the_roles_default(
    db: Db, pg_dsn: str
) -> None:
    role = f"daemon_{uuid.uuid4().hex[:8]}"
    await db.conn.execute(f'CREATE ROLE "{role}" LOGIN SUPERUSER')
    await db.conn.execute(
        f"ALTER ROLE \"{role}\" SET default_transaction_isolation = 'repeatable read'"
    )
    try:
        ours = await asyncpg.connect(**connect_kwargs(db.config.database), user=role)
        plain = await asyncpg.connect(pg_dsn, user=role)
        try:
            assert await ours.fetchval("SHOW transaction_isolation") == "read committed"
            assert await plain.fetchval("SHOW transaction_isolation") == "repeatable read"
        finally:
            await ours.close()
            await plain.close()
    finally:
        await db.conn.execute(f'DROP ROLE "{role}"')


async def test_no_other_role_can_attach_the_idle_counter_which_runs_as_its_owner(
    db: Db, role: str
) -> None:
    try:
        await db.conn.execute(f'SET ROLE "{role}"')
        await db.conn.execute("CREATE TEMP TABLE mine (idle boolean)")
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await db.conn.execute(
                "CREATE TRIGGER t AFTER INSERT ON mine"
                f' FOR EACH STATEMENT EXECUTE FUNCTION "{db.schema}".count_idle_listeners()'
            )
        await db.conn.execute("RESET ROLE")
        # Nor does it do anything for a table other than listeners, whoever attaches it.
        await db.conn.execute("CREATE TEMP TABLE theirs (idle boolean)")
        await db.conn.execute(
            "CREATE TRIGGER t AFTER INSERT ON theirs"
            " FOR EACH STATEMENT EXECUTE FUNCTION count_idle_listeners()"
        )
        with pytest.raises(asyncpg.RaiseError, match=r"serves .*listeners only"):
            await db.conn.execute("INSERT INTO theirs VALUES (true)")
    finally:
        await db.conn.execute("RESET ROLE")
        await db.conn.execute("DROP TABLE IF EXISTS pg_temp.theirs, pg_temp.mine")


async def test_a_daemon_role_granted_only_the_listeners_table_can_still_register_idle(
    db: Db, role: str
) -> None:
    await db.conn.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON listeners TO "{role}"')
    await db.conn.execute(
        f"SET ROLE \"{role}\"; INSERT INTO listeners (replica, idle) VALUES ('r1', true);"
        " RESET ROLE"
    )
    assert await db.count(IDLE_COUNT) == 1


async def test_a_migration_that_cannot_get_its_lock_gives_up_and_lets_the_backend_insert(
    db: Db, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispatcher import db as db_module

    monkeypatch.setattr(db_module, "MIGRATION_LOCK_TIMEOUT_MS", 300)
    # As if 012 (which alters the outbox) were still to apply, while a backend's long
    # transaction has an insert open.
    await db.conn.execute("DELETE FROM schema_migrations WHERE version = 12")
    backend, other = [await asyncpg.connect(**connect_kwargs(db.config.database)) for _ in "ab"]
    try:
        tx = backend.transaction()
        await tx.start()
        await backend.execute(
            "INSERT INTO outbox (tenant, event_type, payload)"
            " VALUES ('shop-1', 'points.earned', '{}')"
        )
        with pytest.raises(DatabaseError, match=r"012_time_ordered_event_ids waited 0\.3s"):
            await asyncio.wait_for(migrate(db.config.database), 10)
        # Nothing is left queued on the outbox: another insert goes through.
        await asyncio.wait_for(
            other.execute(
                "INSERT INTO outbox (tenant, event_type, payload)"
                " VALUES ('shop-1', 'points.earned', '{}')"
            ),
            5,
        )
        await tx.commit()
        assert await migrate(db.config.database) == ["012_time_ordered_event_ids"]
    finally:
        await backend.close()
        await other.close()
