"""Schema and queries: connecting, the named queries in queries.sql, and migrations from sql/."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import asyncpg.pool

from .config import DatabaseConfig, read_password

# Anything that runs a statement: a connection, a pooled connection, or the pool itself.
Executor = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
# The numbered migrations: sql/ at the repository top; dispatcher/sql links to it, so an
# installed wheel carries a copy.
_SQL_DIR = Path(__file__).resolve().parent / "sql"


class DatabaseError(RuntimeError):
    """The database cannot be reached or used; the message is one line fit for an operator."""


def _load_queries() -> dict[str, str]:
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


Q = _load_queries()


def connect_kwargs(config: DatabaseConfig) -> dict[str, Any]:
    """Settings shared by every connection: the schema on the search path, a connect timeout,
    and the password from [database] password_file if set (it overrides the DSN's)."""
    kwargs: dict[str, Any] = {
        "dsn": config.dsn,
        "timeout": config.connect_timeout,
        "server_settings": {
            "search_path": f'"{config.schema}"',
            "application_name": "webhook-dispatcher",
            # Every statement is written for READ COMMITTED (a fresh snapshot per statement,
            # SKIP LOCKED claims, the idle count's recount after its lock), whatever the
            # database's or role's default isolation.
            "default_transaction_isolation": "read committed",
        },
    }
    if config.password_file:
        # Read at each connect (pools reconnect too), so a rotated password is picked up.
        kwargs["password"] = functools.partial(_file_password, config.password_file)
    return kwargs


def _file_password(path: str) -> str:
    """The password in `path`; OSError (a failed connection like any other) if it is gone."""
    try:
        return read_password(path)
    except ValueError as exc:
        raise OSError(f"password file {path} {exc}") from None


def describe_connect_error(config: DatabaseConfig, exc: BaseException) -> str:
    """One line saying which database could not be used and why, without the password."""
    where = redact_dsn(config.dsn)
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot connect to PostgreSQL at {where}: {reason}"


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced, for logs and error lines."""
    dsn = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", dsn)


async def connect(config: DatabaseConfig, *, check: bool = True) -> asyncpg.Connection:
    """One connection to a migrated schema (unless `check` is off), or a clear DatabaseError."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(**connect_kwargs(config))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(describe_connect_error(config, exc)) from None
    if check:
        try:
            await check_schema(conn)
        except BaseException:
            await conn.close()
            raise
    return conn


async def create_pool(
    config: DatabaseConfig, *, settings: Mapping[str, str] | None = None, **kwargs: Any
) -> asyncpg.Pool:
    """A connection pool for the daemon or the CLI, or DatabaseError with a clear line.
    `settings` adds server settings for every connection of the pool."""
    options = connect_kwargs(config)
    options["server_settings"].update(settings or {})
    try:
        pool = await asyncpg.create_pool(min_size=1, max_size=config.pool_size, **options, **kwargs)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseError(describe_connect_error(config, exc)) from None
    assert pool is not None
    return pool


async def keep_session(conn: asyncpg.Connection) -> None:
    """A pool `reset` that sends nothing. asyncpg's default sends a reset query (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL) on every release, a round trip and four statements
    for each claim and write-back. The daemon's pooled connections keep no session state: no
    LISTEN (the listener has its own connection), no SET outside a transaction, no cursors, and
    the pruner lets go of its lock or closes the connection. asyncpg still rolls back an open
    transaction before calling this."""


@contextlib.asynccontextmanager
async def acquire(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
    """A pooled connection, dropped if a statement on it times out, and the pool's others then
    replaced as they are next taken: a connection that stopped answering (a network path
    dropping packets, a failed-over primary's old address) is seldom the only one, and handing
    it back would cost another timeout on the pool's reset query."""
    async with pool.acquire() as conn:
        try:
            yield conn
        except TimeoutError:
            await pool.expire_connections()
            conn.terminate()
            raise


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The numbered SQL files, in order."""
    found = [
        Migration(int(path.name[:3]), path.stem, path.read_text("utf-8"))
        for path in sorted(_SQL_DIR.glob("[0-9][0-9][0-9]_*.sql"))
    ]
    if not found:
        raise DatabaseError(f"no migrations found in {_SQL_DIR}")
    return found


# How long a migration waits for a table lock before giving up (ms).
MIGRATION_LOCK_TIMEOUT_MS = 3000


async def migrate(config: DatabaseConfig, *, max_payload_bytes: int | None = None) -> list[str]:
    """Apply every migration not yet recorded, then set the outbox's payload limit if given
    (None leaves it as it is); safe to run twice and from two hosts at once."""
    conn = await connect(config, check=False)
    schema = config.schema
    applied: list[str] = []
    try:
        # One advisory lock per schema serializes concurrent migrators; the loser then sees the
        # winner's rows in schema_migrations and has nothing left to do.
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", f"dispatcher.migrate.{schema}")
        try:
            # A migration that must lock a table another transaction holds (a backend's long
            # one) gives up after this, rather than wait for it with every insert queued
            # behind the lock it waits for. (Set after the advisory lock, which may be waited
            # for as long as another migrator takes.)
            await conn.execute(f"SET lock_timeout = '{MIGRATION_LOCK_TIMEOUT_MS}ms'")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations ('
                " version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {
                r["version"]
                for r in await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations')
            }
            for m in migrations():
                if m.version in done:
                    continue
                try:
                    async with conn.transaction():
                        await conn.execute(f'SET LOCAL search_path TO "{schema}", pg_catalog')
                        await conn.execute(m.sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            m.version,
                            m.name,
                        )
                except asyncpg.LockNotAvailableError:
                    raise DatabaseError(
                        f"migration {m.name} waited {MIGRATION_LOCK_TIMEOUT_MS / 1000:g}s for a"
                        " table another transaction holds (a long-running one?); nothing of it"
                        " was applied: run migrate again"
                    ) from None
                applied.append(m.name)
            if max_payload_bytes is not None:
                changed = await _set_payload_limit(conn, schema, max_payload_bytes)
                applied.extend([changed] if changed else [])
        finally:
            await conn.execute(
                "SELECT pg_advisory_unlock(hashtext($1))", f"dispatcher.migrate.{schema}"
            )
    except asyncpg.PostgresError as exc:
        raise DatabaseError(f"migration failed: {exc}") from None
    finally:
        await conn.close()
    return applied


async def _set_payload_limit(conn: asyncpg.Connection, schema: str, limit: int) -> str | None:
    """Make the outbox's payload check `outbox_payload_max_<limit>_bytes` (see
    sql/006_hostile_rows.sql); the new constraint's name if it changed anything. NOT VALID:
    rows already in the outbox were accepted under the old limit."""
    name = f"outbox_payload_max_{int(limit)}_bytes"
    found = {
        r["conname"]
        for r in await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass"
            " AND contype = 'c' AND conname LIKE 'outbox\\_payload\\_max\\_%'",
            f'"{schema}".outbox',
        )
    }
    if found == {name}:
        return None
    changes = [f'DROP CONSTRAINT "{old}"' for old in sorted(found - {name})]
    if name not in found:
        changes.append(
            f'ADD CONSTRAINT "{name}" CHECK (fanned_out_at IS NOT NULL'
            f" OR pg_column_size(payload) <= {int(limit)}) NOT VALID"
        )
    await conn.execute(f'ALTER TABLE "{schema}".outbox {", ".join(changes)}')
    return name


async def check_schema(conn: Executor) -> None:
    """Refuse to run against a schema that is missing or behind this version's migrations."""
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        raise DatabaseError("the schema is not set up: run `dispatcher migrate` first") from None
    have = {r["version"] for r in rows}
    missing = [m.name for m in migrations() if m.version not in have]
    if missing:
        raise DatabaseError(
            f"the schema is behind: run `dispatcher migrate` (missing {', '.join(missing)})"
        )
