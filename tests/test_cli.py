"""The `dispatcher` command run as a real subprocess: migrate, endpoint verbs, one-line errors."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

from dispatcher import claiming
from dispatcher.claiming import Slots
from dispatcher.db import connect_kwargs, migrations
from dispatcher.endpoints import Endpoint
from dispatcher.signing import fingerprint, generate_secret, validate_secret
from tests.conftest import Db

URL = "https://example.com/h"
# DSNs for a database nobody listens on: nothing answers on port 1.
UNREACHABLE = "postgresql://x@127.0.0.1:1/x"
UNREACHABLE_WITH_PASSWORD = "postgresql://x:hunter2secret@127.0.0.1:1/x"


@dataclass
class Run:
    """What one CLI invocation did."""

    args: tuple[str, ...]
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.rc == 0, self
        return json.loads(self.out)


def base_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any DISPATCHER_* setting of its own, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env.update(extra)
    return env


def db_env(db: Db, **extra: str) -> dict[str, str]:
    return base_env(
        DISPATCHER_DATABASE_DSN=db.config.database.dsn,
        DISPATCHER_DATABASE_SCHEMA=db.schema,
        **extra,
    )


async def cli(*args: str, env: Mapping[str, str], timeout: float = 30.0) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dispatcher",
        *args,
        env=dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(
            f"dispatcher {' '.join(args)} did not exit within {timeout}s"
        ) from None
    assert proc.returncode is not None
    return Run(args, proc.returncode, out.decode(), err.decode())


def assert_one_error_line(run: Run, *fragments: str, absent: tuple[str, ...] = ()) -> str:
    """A non-zero exit, nothing on stdout, one "dispatcher: error:" line on stderr, no traceback."""
    assert run.rc != 0, run
    assert "Traceback" not in run.err, run.err
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    line = lines[0]
    assert line.startswith("dispatcher: error:"), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    for text in absent:
        assert text not in run.err, (text, line)
    assert run.out == "", run.out
    return line


async def add_endpoint(db: Db, *options: str) -> Any:
    """`endpoint add --json` for tenant t and URL, plus `options`: the printed object."""
    run = await cli(
        "endpoint", "add", "--tenant", "t", "--url", URL, *options, "--json", env=db_env(db)
    )
    return run.json()


async def endpoint_row(db: Db, eid: int) -> asyncpg.Record:
    row = await db.conn.fetchrow("SELECT * FROM endpoints WHERE id = $1", eid)
    assert row is not None, f"endpoint {eid} is not in the table"
    return row


@pytest.fixture
async def fresh_schema(pg_dsn: str) -> AsyncIterator[str]:
    """A schema name nothing has created yet; dropped afterwards if something did."""
    schema = f"c_{uuid.uuid4().hex[:12]}"
    yield schema
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


# migrate ---------------------------------------------------------------------------------------


async def test_migrate_prints_the_migrations_it_applied_then_that_the_schema_is_up_to_date(
    pg_dsn: str, fresh_schema: str
) -> None:
    env = base_env(DISPATCHER_DATABASE_DSN=pg_dsn, DISPATCHER_DATABASE_SCHEMA=fresh_schema)
    first = await cli("migrate", env=env)
    assert first.rc == 0, first
    assert first.out.splitlines() == [f"applied {m.name}" for m in migrations()]
    second = await cli("migrate", env=env)
    assert second.rc == 0, second
    assert "up to date" in second.out
    assert fresh_schema in second.out
    assert "applied" not in second.out


# endpoint add ----------------------------------------------------------------------------------


async def test_endpoint_add_json_prints_id_and_secret_and_stores_the_subscription(db: Db) -> None:
    added = await add_endpoint(db, "--events", "points.earned,tier.*")
    assert isinstance(added["id"], int)
    secret = added["secret"]
    validate_secret("standard", secret)
    row = await endpoint_row(db, added["id"])
    assert row["tenant"] == "t"
    assert row["url"] == URL
    assert list(row["event_types"]) == ["points.earned", "tier.*"]
    assert row["profile"] == "standard"
    assert row["secret"] == secret
    assert row["enabled"] is True


async def test_endpoint_add_without_json_prints_the_id_and_the_secret_once(db: Db) -> None:
    run = await cli("endpoint", "add", "--tenant", "t", "--url", URL, env=db_env(db))
    assert run.rc == 0, run
    eid = await db.conn.fetchval("SELECT id FROM endpoints")
    secret = await db.conn.fetchval("SELECT secret FROM endpoints")
    assert str(eid) in run.out
    assert run.out.count(secret) == 1


STANDARD_SECRET = generate_secret("standard")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param(
            [
                "--profile",
                "hmac",
                "--algorithm",
                "sha1",
                "--encoding",
                "hex",
                "--signed",
                "body",
                "--signature-header",
                "X-CG-SIGNATURE",
            ],
            {
                "profile": "hmac",
                "algorithm": "sha1",
                "encoding": "hex",
                "signed": "body",
                "signature_header": "X-CG-SIGNATURE",
            },
            id="hmac-customerglu",
        ),
        pytest.param(
            [
                "--profile",
                "hmac",
                "--algorithm",
                "sha512",
                "--encoding",
                "base64",
                "--signed",
                "timestamp.body",
                "--timestamp-header",
                "X-Timestamp",
                "--prefix",
                "v1=",
                "--signature-header",
                "X-Sig",
            ],
            {
                "profile": "hmac",
                "algorithm": "sha512",
                "encoding": "base64",
                "signed": "timestamp.body",
                "timestamp_header": "X-Timestamp",
                "prefix": "v1=",
                "signature_header": "X-Sig",
            },
            id="hmac-timestamped",
        ),
        pytest.param(
            ["--profile", "stripe", "--signature-header", "X-Loyali-Signature"],
            {"profile": "stripe", "signature_header": "X-Loyali-Signature"},
            id="stripe-loyali",
        ),
        pytest.param(
            ["--profile", "github"],
            {"profile": "github", "signature_header": None, "event_types": [], "ordered": False},
            id="github-and-defaults",
        ),
        pytest.param(
            ["--profile", "shopify", "--signature-header", "X-Glow-Hmac-Sha256"],
            {"profile": "shopify", "signature_header": "X-Glow-Hmac-Sha256"},
            id="shopify-glow",
        ),
        pytest.param(
            ["--header", "X-A=1", "--header", "X-B=two=2"],
            {"headers": {"X-A": "1", "X-B": "two=2"}},
            id="headers",
        ),
        pytest.param(
            ["--ordered", "--max-in-flight", "4", "--timeout", "3s"],
            {"ordered": True, "max_in_flight": 4, "timeout_ms": 3000},
            id="limits",
        ),
        pytest.param(
            ["--secret", STANDARD_SECRET, "--description", "main store"],
            {"secret": STANDARD_SECRET, "description": "main store"},
            id="secret-and-description",
        ),
    ],
)
async def test_endpoint_add_accepts_every_documented_option_and_stores_it(
    db: Db, options: list[str], expected: dict[str, Any]
) -> None:
    added = await add_endpoint(db, *options)
    row = await endpoint_row(db, added["id"])
    actual = {k: json.loads(row[k]) if k == "headers" else row[k] for k in expected}
    if "event_types" in actual:
        actual["event_types"] = list(actual["event_types"])
    assert actual == expected
    assert row["secret"] == added["secret"]
    # What was stored is something the daemon can sign with.
    endpoint = Endpoint.from_row(row)
    endpoint.profile.validate()
    validate_secret(endpoint.profile.kind, endpoint.secret)


async def test_http_and_private_urls_are_accepted_when_the_config_allows_them(db: Db) -> None:
    env = db_env(
        db,
        DISPATCHER_SECURITY_ALLOW_HTTP="true",
        DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS="true",
    )
    run = await cli(
        "endpoint", "add", "--tenant", "t", "--url", "http://10.0.0.1:8080/h", "--json", env=env
    )
    row = await endpoint_row(db, run.json()["id"])
    assert row["url"] == "http://10.0.0.1:8080/h"


# endpoint list / show --------------------------------------------------------------------------


async def test_endpoint_list_and_show_never_print_the_secret_and_show_shows_its_fingerprint(
    db: Db,
) -> None:
    added = await add_endpoint(db, "--profile", "stripe")
    secret, eid = added["secret"], added["id"]
    env = db_env(db)
    listing = await cli("endpoint", "list", "--json", env=env)
    assert [e["id"] for e in listing.json()] == [eid]
    shown = await cli("endpoint", "show", str(eid), "--json", env=env)
    assert shown.json()["id"] == eid
    assert shown.json()["secret_fingerprint"] == fingerprint(secret)
    plain_list = await cli("endpoint", "list", env=env)
    plain_show = await cli("endpoint", "show", str(eid), env=env)
    for run in (listing, shown, plain_list, plain_show):
        assert run.rc == 0, run
        assert secret not in run.out
        assert secret not in run.err
    assert str(eid) in plain_list.out
    assert URL in plain_show.out
    assert fingerprint(secret) in plain_show.out


async def test_endpoint_list_prints_a_fingerprint_of_the_secret(db: Db) -> None:
    _, secret = await db.add_endpoint(URL)
    listing = (await cli("endpoint", "list", "--json", env=db_env(db))).json()
    assert listing[0]["secret_fingerprint"] == fingerprint(secret)


async def test_endpoint_list_filters_by_tenant(db: Db) -> None:
    await db.add_endpoint(URL, tenant="shop-a")
    b, _ = await db.add_endpoint(URL, tenant="shop-b")
    run = await cli("endpoint", "list", "--tenant", "shop-b", "--json", env=db_env(db))
    assert [e["id"] for e in run.json()] == [b]


# endpoint disable / enable ---------------------------------------------------------------------


async def test_disable_pauses_pending_deliveries_and_enable_resumes_them(db: Db) -> None:
    target, _ = await db.add_endpoint(URL, tenant="shop-1")
    other, _ = await db.add_endpoint(URL, tenant="shop-1")
    await db.insert_events(3, tenant="shop-1")
    # A first delay keeps the fanned-out deliveries pending rather than claimed.
    fanned = await claiming.fan_out(db.conn, Slots(100, {}, 8), lease=60, first_delay=0.5)
    assert (fanned.events, fanned.deliveries, fanned.jobs) == (3, 6, [])

    async def statuses(eid: int) -> dict[str, int]:
        rows = await db.conn.fetch(
            "SELECT status, count(*) AS n FROM deliveries WHERE endpoint_id = $1 GROUP BY 1", eid
        )
        return {r["status"]: r["n"] for r in rows}

    env = db_env(db)
    off = await cli("endpoint", "disable", str(target), "--reason", "x", "--json", env=env)
    assert off.json() == {"id": target, "enabled": False, "paused": 3}
    row = await endpoint_row(db, target)
    assert row["enabled"] is False
    assert row["disabled_reason"] == "x"
    assert row["disabled_at"] is not None
    assert row["disabled_by"]
    assert await statuses(target) == {"paused": 3}
    assert await statuses(other) == {"pending": 3}
    shown = (await cli("endpoint", "show", str(target), "--json", env=env)).json()
    assert (shown["enabled"], shown["disabled_reason"], shown["paused"]) == (False, "x", 3)

    on = await cli("endpoint", "enable", str(target), "--json", env=env)
    assert on.json() == {"id": target, "enabled": True, "resumed": 3}
    row = await endpoint_row(db, target)
    assert row["enabled"] is True
    assert row["disabled_reason"] is None
    assert row["disabled_at"] is None
    assert await statuses(target) == {"pending": 3}
    assert await statuses(other) == {"pending": 3}


# endpoint update -------------------------------------------------------------------------------


async def test_endpoint_update_changes_url_and_events_and_bumps_the_version(db: Db) -> None:
    added = await add_endpoint(db, "--events", "points.earned")
    eid = added["id"]
    before = await endpoint_row(db, eid)
    run = await cli(
        "endpoint",
        "update",
        str(eid),
        "--url",
        "https://example.org/new",
        "--events",
        "tier.*,referral.completed",
        "--json",
        env=db_env(db),
    )
    shown = run.json()
    assert shown["url"] == "https://example.org/new"
    assert shown["events"] == ["tier.*", "referral.completed"]
    assert added["secret"] not in run.out
    after = await endpoint_row(db, eid)
    assert after["url"] == "https://example.org/new"
    assert list(after["event_types"]) == ["tier.*", "referral.completed"]
    assert after["version"] > before["version"]
    assert after["secret"] == before["secret"]
    assert after["tenant"] == before["tenant"]


# Errors: one line, non-zero, no traceback ------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One invocation that must fail with one clear line."""

    args: tuple[str, ...]
    fragments: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    config: str | None = None  # written to a file passed as --config
    absent: tuple[str, ...] = ()


def add(*options: str, url: str = URL) -> tuple[str, ...]:
    return ("endpoint", "add", "--tenant", "t", "--url", url, *options)


ERRORS: dict[str, Case] = {
    "mistyped-option": Case(("endpoint", "add", "--tenantt", "x"), ("--tenant",)),
    "unrecognized-option": Case(("endpoint", "list", "--tenantt", "x"), ("--tenantt",)),
    "missing-required-option": Case(("endpoint", "add", "--tenant", "t"), ("--url",)),
    "bad-option-value": Case(add("--max-in-flight", "0"), ("--max-in-flight",)),
    "missing-config-file-after-verb": Case(
        ("migrate", "--config", "/nonexistent.toml"), ("/nonexistent.toml", "not exist")
    ),
    "missing-config-file-before-verb": Case(
        ("--config", "/nonexistent.toml", "endpoint", "list"), ("/nonexistent.toml",)
    ),
    "invalid-toml": Case(("endpoint", "list"), ("not valid TOML",), config="[database\ndsn =\n"),
    "unknown-config-key": Case(
        ("endpoint", "list"), ("unknown key", "port"), config="[database]\nport = 5432\n"
    ),
    "unknown-config-key-in-env": Case(
        ("endpoint", "list"),
        ("concurency", "DISPATCHER_DELIVERY_CONCURENCY"),
        env=(("DISPATCHER_DELIVERY_CONCURENCY", "5"),),
    ),
    "unreachable-database-list": Case(
        ("endpoint", "list"),
        ("cannot connect", "127.0.0.1:1"),
        env=(("DISPATCHER_DATABASE_DSN", UNREACHABLE),),
    ),
    "unreachable-database-migrate-hides-password": Case(
        ("migrate",),
        ("cannot connect", "127.0.0.1:1"),
        env=(("DISPATCHER_DATABASE_DSN", UNREACHABLE_WITH_PASSWORD),),
        absent=("hunter2secret",),
    ),
    "unreachable-database-hides-password-in-query": Case(
        ("endpoint", "list"),
        ("cannot connect", "127.0.0.1:1"),
        env=(("DISPATCHER_DATABASE_DSN", UNREACHABLE + "?password=hunter2secret"),),
        absent=("hunter2secret",),
    ),
    "unreachable-database-run": Case(
        ("run",),
        ("cannot connect", "127.0.0.1:1"),
        env=(("DISPATCHER_DATABASE_DSN", UNREACHABLE), ("DISPATCHER_HTTP_LISTEN", "")),
    ),
    "http-url-without-allow-http": Case(add(url="http://example.com/h"), ("allow_http",)),
    "private-address": Case(add(url="https://10.0.0.1/h"), ("10.0.0.1", "private")),
    "metadata-address": Case(add(url="https://169.254.169.254/"), ("169.254.169.254", "metadata")),
    "loopback": Case(add(url="https://127.0.0.1:8443/h"), ("127.0.0.1", "loopback")),
    "loopback-v6": Case(add(url="https://[::1]/h"), ("::1", "loopback")),
    "v4-mapped-private": Case(add(url="https://[::ffff:10.0.0.1]/h"), ("private",)),
    "localhost": Case(add(url="https://localhost/h"), ("localhost",)),
    "url-with-credentials": Case(
        add(url="https://user:p4ssw0rd@example.com/h"), ("credentials",), absent=("p4ssw0rd",)
    ),
    "url-without-scheme": Case(add(url="example.com/h"), ("scheme",)),
    "event-pattern-with-space": Case(add("--events", "points earned"), ("events", "points earned")),
    "event-pattern-inner-star": Case(add("--events", "tier.*.gold"), ("tier.*.gold",)),
    "standard-secret-without-prefix": Case(add("--secret", "nope"), ("secret",), absent=("nope",)),
    "standard-secret-bad-base64": Case(
        add("--secret", "whsec_not*base64*at+all"), ("secret",), absent=("not*base64",)
    ),
    "header-overrides-standard-signature": Case(
        add("--header", "webhook-signature=x"), ("webhook-signature",)
    ),
    "header-overrides-stripe-signature": Case(
        add("--profile", "stripe", "--header", "Stripe-Signature=x"), ("Stripe-Signature",)
    ),
    "header-overrides-timestamp-header": Case(
        add(
            "--profile",
            "hmac",
            "--signed",
            "timestamp.body",
            "--timestamp-header",
            "X-Ts",
            "--header",
            "x-ts=1",
        ),
        ("x-ts",),
    ),
    "header-reserved": Case(add("--header", "User-Agent=x"), ("User-Agent",)),
    "header-value-with-crlf": Case(
        add("--header", "X-A=1\r\nX-Injected: 1"), ("X-A", "line break")
    ),
    "header-value-with-lf": Case(add("--header", "X-A=1\nX-B: 2"), ("X-A", "line break")),
    "header-name-with-space": Case(add("--header", "X A=1"), ("X A",)),
    "hmac-option-on-standard-profile": Case(add("--algorithm", "sha1"), ("algorithm",)),
    "signature-header-on-standard-profile": Case(
        add("--signature-header", "X-Sig"), ("standard", "header")
    ),
    "timestamp-signing-without-timestamp-header": Case(
        add("--profile", "hmac", "--signed", "timestamp.body"), ("timestamp_header",)
    ),
}

ErrorRuns = dict[str, tuple[Run | AssertionError, tuple[str, ...]]]


@pytest.fixture(scope="module")
async def error_runs(pg_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> ErrorRuns:
    """Every case in ERRORS, run a few at a time (each is a fresh interpreter), by name."""
    tmp = tmp_path_factory.mktemp("cli-errors")
    # A reachable database whose schema was never migrated: input checks must come first.
    env = base_env(
        DISPATCHER_DATABASE_DSN=pg_dsn,
        DISPATCHER_DATABASE_SCHEMA=f"never_{uuid.uuid4().hex[:12]}",
        DISPATCHER_DATABASE_CONNECT_TIMEOUT="2s",
    )
    slots = asyncio.Semaphore(4)

    async def one(name: str, case: Case) -> tuple[Run | AssertionError, tuple[str, ...]]:
        args, fragments = case.args, case.fragments
        if case.config is not None:
            path = tmp / f"{name}.toml"
            path.write_text(case.config, encoding="utf-8")
            args, fragments = (*args, "--config", str(path)), (*fragments, str(path))
        async with slots:
            try:
                return await cli(*args, env={**env, **dict(case.env)}, timeout=20), fragments
            except AssertionError as exc:  # a hang fails its own case, not every case
                return exc, fragments

    runs = await asyncio.gather(*(one(name, case) for name, case in ERRORS.items()))
    return dict(zip(ERRORS, runs, strict=True))


@pytest.mark.parametrize("name", ERRORS)
def test_a_bad_invocation_fails_with_one_clear_line(name: str, error_runs: ErrorRuns) -> None:
    run, fragments = error_runs[name]
    if isinstance(run, AssertionError):
        raise run
    assert_one_error_line(run, *fragments, absent=ERRORS[name].absent)


async def test_endpoint_add_refuses_two_headers_whose_names_differ_only_in_case(db: Db) -> None:
    run = await cli(*add("--header", "X-A=1", "--header", "x-a=2"), env=db_env(db))
    assert_one_error_line(run, "x-a")


async def test_run_on_a_schema_never_migrated_exits_saying_to_run_migrate(
    pg_dsn: str, fresh_schema: str
) -> None:
    env = base_env(
        DISPATCHER_DATABASE_DSN=pg_dsn,
        DISPATCHER_DATABASE_SCHEMA=fresh_schema,
        DISPATCHER_HTTP_LISTEN="",
    )
    run = await cli("run", env=env, timeout=20)
    assert_one_error_line(run, "dispatcher migrate")


async def test_endpoint_commands_on_a_schema_never_migrated_say_to_run_migrate(
    pg_dsn: str, fresh_schema: str
) -> None:
    env = base_env(DISPATCHER_DATABASE_DSN=pg_dsn, DISPATCHER_DATABASE_SCHEMA=fresh_schema)
    run = await cli("endpoint", "list", env=env)
    assert_one_error_line(run, "dispatcher migrate")


@pytest.mark.parametrize(
    "args",
    [
        ["endpoint", "show", "999999"],
        ["endpoint", "enable", "999999"],
        ["endpoint", "disable", "999999"],
        ["endpoint", "update", "999999", "--url", URL],
    ],
    ids=lambda a: a[1],
)
async def test_a_verb_on_an_endpoint_that_does_not_exist_fails_with_one_clear_line(
    db: Db, args: list[str]
) -> None:
    run = await cli(*args, env=db_env(db))
    assert_one_error_line(run, "999999", "does not exist")


async def test_a_value_the_database_refuses_fails_with_one_line_that_hides_the_secret(
    db: Db,
) -> None:
    secret = generate_secret("standard")
    run = await cli(*add("--max-in-flight", "20000", "--secret", secret), env=db_env(db))
    assert_one_error_line(run, "endpoints_max_in_flight_1_to_10000", absent=(secret,))
    assert await db.count("SELECT count(*) FROM endpoints") == 0


async def test_a_connection_lost_mid_command_is_one_error_line_not_a_traceback(db: Db) -> None:
    from dispatcher.cli import _guard
    from dispatcher.db import DatabaseError

    conn = await asyncpg.connect(**connect_kwargs(db.config.database))
    pid = conn.get_server_pid()

    async def command() -> int:
        # Another session ends ours while the statement runs, as a restart or a failover would.
        await db.conn.execute("SELECT pg_terminate_backend($1)", pid)
        await conn.fetchval("SELECT 1")
        return 0

    with pytest.raises(DatabaseError, match="database connection lost"):
        await _guard(command())
    await conn.close()
