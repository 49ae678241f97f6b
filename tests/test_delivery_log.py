"""`dispatcher delivery list/show`, `replay` and `status` against the real tables, with the daemon
delivering to real receivers where attempts matter. Each command runs end to end as a subprocess
at least once; the many filter combinations run in this process (an interpreter start-up each
would cost the suite seconds)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp import web

from dispatcher import claiming, deliverylog
from dispatcher.claiming import Slots
from dispatcher.cli import build_parser
from dispatcher.db import Q
from dispatcher.errors import CliError
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import Run, assert_one_error_line, cli, db_env

URL = "https://example.com/h"
ReceiverFactory = Callable[..., Awaitable[Receiver]]
DaemonFactory = Callable[..., Awaitable[RunningDaemon]]


async def cli_all(db: Db, *invocations: tuple[str, ...]) -> list[Run]:
    """Run independent CLI invocations side by side (each is a fresh interpreter)."""
    return list(await asyncio.gather(*(cli(*args, env=db_env(db)) for args in invocations)))


async def run(db: Db, capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    """Parse `argv` as the CLI does and run the command in this process on the test's
    connection; returns what it printed (parsed, with --json)."""
    args = build_parser().parse_args(list(argv))
    await deliverylog.DB_HANDLERS[(args.command, getattr(args, "action", None))](
        args, db.config, db.conn
    )
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in argv else out


async def run_error(db: Db, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The message a command refuses `argv` with, from the parser or from the command."""
    try:
        await run(db, capsys, *argv)
    except CliError as exc:
        return str(exc)
    except SystemExit as exc:
        exit_code = exc.code
    else:
        raise AssertionError(f"{argv} was accepted")
    err = capsys.readouterr().err
    assert exit_code == 2, err
    assert err.count("\n") == 1, err
    return err


async def disable(db: Db, endpoint_id: int, reason: str) -> None:
    """Disable an endpoint as the daemon or `endpoint disable` does (pausing its pending work)."""
    await db.conn.execute(
        Q["disable_endpoints"], [endpoint_id], [reason], "test", datetime.now(UTC)
    )


async def fan_out_pending(db: Db) -> None:
    """Fan every outbox row out into pending deliveries, none claimed."""
    await claiming.fan_out(db.conn, Slots(1000, {}, 8), lease=60, first_delay=60)


async def ids(db: Db, where: str = "true", *args: Any) -> list[int]:
    """Delivery ids matching `where`, newest first (the listing order)."""
    rows = await db.conn.fetch(
        f"SELECT d.id FROM deliveries d JOIN outbox o ON o.seq = d.event_seq WHERE {where}"
        " ORDER BY d.id DESC",
        *args,
    )
    return [r["id"] for r in rows]


def fails_first(n: int, body: str = "boom") -> Callable[[web.Request, int], Any]:
    """A receiver behaviour: HTTP 500 with `body` for the first `n` requests, then 200."""

    async def behave(request: web.Request, count: int) -> web.StreamResponse:
        if count <= n:
            return web.Response(status=500, text=body)
        return web.Response(status=200, text="ok")

    return behave


# delivery list ---------------------------------------------------------------------------------


async def test_delivery_list_filters_by_each_option_newest_first(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = await db.add_endpoint(URL, tenant="shop-1")
    b, _ = await db.add_endpoint(URL, tenant="shop-1", events=["tier.*"])
    c, _ = await db.add_endpoint(URL, tenant="shop-2")
    await db.insert_events(2, tenant="shop-1", event_type="points.earned")
    [tier_event] = await db.insert_events(1, tenant="shop-1", event_type="tier.upgraded")
    await db.insert_events(2, tenant="shop-2", event_type="points.earned")
    await fan_out_pending(db)
    # Two deliveries are finished, and the oldest two were created three hours ago.
    await db.conn.execute(
        "UPDATE deliveries SET status = 'failed', completed_at = now(), attempts = 9"
        " WHERE id = (SELECT min(id) FROM deliveries WHERE endpoint_id = $1)",
        a,
    )
    await db.conn.execute(
        "UPDATE deliveries SET status = 'succeeded', completed_at = now(), attempts = 1"
        " WHERE id = (SELECT min(id) FROM deliveries WHERE endpoint_id = $1)",
        c,
    )
    await db.conn.execute(
        "UPDATE deliveries SET created_at = now() - interval '3 hours'"
        " WHERE id IN (SELECT id FROM deliveries ORDER BY id LIMIT 2)"
    )
    assert len(await ids(db)) == 6

    cases: dict[tuple[str, ...], list[int]] = {
        (): await ids(db),
        ("--tenant", "shop-1"): await ids(db, "o.tenant = 'shop-1'"),
        ("--endpoint", str(b)): await ids(db, "d.endpoint_id = $1", b),
        ("--event", tier_event): await ids(db, "d.event_id = $1", tier_event),
        ("--type", "tier.upgraded"): await ids(db, "o.event_type = 'tier.upgraded'"),
        ("--status", "failed"): await ids(db, "d.status = 'failed'"),
        ("--status", "failed,succeeded"): await ids(db, "d.status <> 'pending'"),
        ("--since", "1h"): await ids(db, "d.created_at > now() - interval '1 hour'"),
        ("--until", "1h"): await ids(db, "d.created_at < now() - interval '1 hour'"),
        ("--tenant", "shop-1", "--status", "pending"): await ids(
            db, "o.tenant = 'shop-1' AND d.status = 'pending'"
        ),
        ("--limit", "2"): (await ids(db))[:2],
        ("--tenant", "nobody"): [],
    }
    assert all(cases[k] for k in list(cases)[:-1]), "every filter should select something"
    for options, expected in cases.items():
        listed = await run(db, capsys, "delivery", "list", *options, "--json")
        assert [d["id"] for d in listed] == expected, options

    # A pending delivery says when it is next due; a finished one does not.
    listed = {d["id"]: d for d in await run(db, capsys, "delivery", "list", "--json")}
    failed = listed[(await ids(db, "d.status = 'failed'"))[0]]
    assert failed["status"] == "failed"
    assert failed["attempts"] == 9
    assert failed["next_attempt_at"] is None
    assert failed["completed_at"] is not None
    pending = listed[(await ids(db, "d.status = 'pending'"))[0]]
    assert pending["next_attempt_at"] is not None
    assert pending["completed_at"] is None
    event = await db.row(
        "SELECT o.event_type, o.tenant FROM deliveries d JOIN outbox o ON o.seq = d.event_seq"
        " WHERE d.id = $1",
        pending["id"],
    )
    assert (pending["event_type"], pending["tenant"]) == (event["event_type"], event["tenant"])

    table = await run(db, capsys, "delivery", "list", "--status", "pending")
    header, *lines = table.splitlines()
    assert header.split()[:3] == ["ID", "CREATED", "EVENT"]
    assert "NEXT ATTEMPT" in header
    assert len(lines) == len(await ids(db, "d.status = 'pending'"))
    assert all(line.split()[6] == "pending" for line in lines)


# delivery show ---------------------------------------------------------------------------------


async def test_delivery_show_lists_every_attempt_of_a_failing_then_succeeding_receiver(
    db: Db, receiver_factory: ReceiverFactory, daemon_factory: DaemonFactory
) -> None:
    # The failures answer with a terminal escape sequence, which the text view must not emit.
    receiver = await receiver_factory(fails_first(2, body="boom\x1b[2J"))
    await db.add_endpoint(receiver.url)
    [event] = await db.insert_events(1)
    await daemon_factory()
    await wait_until(
        lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'"),
        message="the delivery to succeed on its third attempt",
    )
    delivery = await db.row("SELECT id FROM deliveries")

    shown, text = await cli_all(
        db,
        ("delivery", "show", str(delivery["id"]), "--json"),
        ("delivery", "show", str(delivery["id"])),
    )
    view = shown.json()
    assert (view["event_id"], view["status"], view["attempts"]) == (event, "succeeded", 3)
    assert view["payload"] == {"customer_id": "cust_1", "amount": 1}
    assert view["endpoint_url"] == receiver.url
    assert view["next_attempt_at"] is None
    log = view["attempt_log"]
    assert [a["attempt"] for a in log] == [1, 2, 3]
    assert [a["status_code"] for a in log] == [500, 500, 200]
    assert [a["decision"] for a in log] == ["retry", "retry", "succeeded"]
    assert [a["error"] for a in log] == ["http_error", "http_error", None]
    assert [a["response_excerpt"] for a in log] == ["boom\x1b[2J", "boom\x1b[2J", "ok"]
    assert log[0]["next_attempt_at"]
    assert log[1]["next_attempt_at"]
    assert log[2]["next_attempt_at"] is None
    assert all(a["attempted_at"] and a["duration_ms"] >= 0 for a in log)
    assert log[0]["attempted_at"] < log[1]["attempted_at"] < log[2]["attempted_at"]

    assert "\x1b" not in text.out
    assert "boom\\x1b[2J" in text.out
    assert "3 attempts" in text.out
    assert [line.split()[0] for line in text.out.splitlines() if "  #" in line] == [
        "#1",
        "#2",
        "#3",
    ]


# replay ----------------------------------------------------------------------------------------


async def test_replay_of_a_failed_delivery_succeeds_on_a_fresh_schedule_keeping_old_attempts(
    db: Db,
    receiver_factory: ReceiverFactory,
    daemon_factory: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The schedule allows 4 attempts; the receiver fails 6 times, so only a schedule that starts
    # again at the replay (retry, retry, success) can get through, and only a NOTIFY wakes the
    # idle daemon in time: its poll interval is longer than the test waits.
    receiver = await receiver_factory(fails_first(6))
    await db.add_endpoint(receiver.url)
    await db.insert_events(1)
    config = replace(db.config, delivery=replace(db.config.delivery, poll_interval=30.0))
    await daemon_factory(config)
    await wait_until(
        lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'failed'"),
        message="the delivery to fail after the whole schedule",
    )
    did = (await db.row("SELECT id FROM deliveries"))["id"]
    before = await db.row("SELECT * FROM deliveries WHERE id = $1", did)
    assert before["attempts"] == 4
    assert before["completed_at"] is not None

    dry = await run(db, capsys, "replay", "--delivery", str(did), "--dry-run", "--json")
    assert dry == {"would_replay": 1, "paused": 0, "in_flight": 0}
    assert await db.row("SELECT * FROM deliveries WHERE id = $1", did) == before
    assert await db.count("SELECT count(*) FROM attempts") == 4

    await wait_until(
        lambda: db.count("SELECT count(*) FROM listeners WHERE idle"),
        message="the daemon to go idle",
    )
    replayed = await cli("replay", "--delivery", str(did), "--json", env=db_env(db))
    assert replayed.json() == {"replayed": 1, "paused": 0, "in_flight": 0}
    assert "deliveries_replayed" in replayed.err  # the structured log event
    await wait_until(
        lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'"),
        timeout=10,
        message="the replayed delivery to succeed",
    )
    after = await db.row("SELECT * FROM deliveries WHERE id = $1", did)
    assert (after["attempts"], after["attempt_base"]) == (7, 4)
    assert after["replayed_at"] is not None
    assert after["completed_at"] > before["completed_at"]
    decisions = await db.conn.fetch(
        "SELECT attempt, decision FROM attempts WHERE delivery_id = $1 ORDER BY attempt", did
    )
    assert [(r["attempt"], r["decision"]) for r in decisions] == [
        (1, "retry"),
        (2, "retry"),
        (3, "retry"),
        (4, "failed"),
        (5, "retry"),
        (6, "retry"),
        (7, "succeeded"),
    ]
    assert len(receiver.requests) == 7
    assert len({r.body for r in receiver.requests}) == 1  # the same bytes every time

    shown = await run(db, capsys, "delivery", "show", str(did), "--json")
    assert shown["attempts_since_replay"] == 3
    assert [a["before_replay"] for a in shown["attempt_log"]] == [True] * 4 + [False] * 3


async def test_replay_selects_by_endpoint_status_and_time_and_leaves_the_rest_alone(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = await db.add_endpoint(URL, tenant="shop-1")
    b, _ = await db.add_endpoint(URL, tenant="shop-1")
    await db.insert_events(4)
    await fan_out_pending(db)
    a_ids = await ids(db, "d.endpoint_id = $1", a)
    # Endpoint a: a success, one delivery in flight, a recent failure, an old failure.
    await db.conn.execute(
        "UPDATE deliveries SET status = 'failed', attempts = 3, completed_at = now()"
        " WHERE endpoint_id = $1",
        a,
    )
    await db.conn.execute(
        "UPDATE deliveries SET created_at = now() - interval '2 days' WHERE id = $1", a_ids[3]
    )
    await db.conn.execute("UPDATE deliveries SET status = 'succeeded' WHERE id = $1", a_ids[0])
    await db.conn.execute(
        "UPDATE deliveries SET status = 'delivering', completed_at = NULL WHERE id = $1", a_ids[1]
    )
    await db.conn.execute(
        "UPDATE deliveries SET status = 'failed', completed_at = now() WHERE endpoint_id = $1", b
    )
    snapshot = "SELECT id, status, attempts, attempt_base, completed_at FROM deliveries ORDER BY id"
    before = await db.conn.fetch(snapshot)

    recent_failures = ("replay", "--endpoint", str(a), "--since", "1d", "--json")
    assert await run(db, capsys, *recent_failures, "--dry-run") == {
        "would_replay": 1,
        "paused": 0,
        "in_flight": 0,
    }
    in_flight = ("replay", "--delivery", str(a_ids[1]), "--json")
    assert await run(db, capsys, *in_flight, "--dry-run") == {
        "would_replay": 0,
        "paused": 0,
        "in_flight": 1,
    }
    assert await db.conn.fetch(snapshot) == before

    # Only a's recent failure: not its old one, its success, its delivery in flight, nor b's.
    assert await run(db, capsys, *recent_failures) == {"replayed": 1, "paused": 0, "in_flight": 0}
    replayed = await db.row("SELECT *, now() AS now FROM deliveries WHERE id = $1", a_ids[2])
    assert (replayed["status"], replayed["attempts"], replayed["attempt_base"]) == ("pending", 3, 3)
    assert replayed["completed_at"] is None
    assert replayed["next_attempt_at"] <= replayed["now"]
    after = {r["id"]: r for r in await db.conn.fetch(snapshot)}
    unchanged = [r for r in before if r["id"] != a_ids[2]]
    assert unchanged == [after[r["id"]] for r in unchanged]

    # Named deliveries go whatever their state, except the one in flight; b is disabled, so its
    # failures are re-queued as paused, to resume when it is enabled.
    named = ("--delivery", str(a_ids[0]), "--delivery", str(a_ids[1]))
    assert await run(db, capsys, "replay", *named, "--json") == {
        "replayed": 1,
        "paused": 0,
        "in_flight": 1,
    }
    await disable(db, b, "maintenance")
    b_ids = await ids(db, "d.endpoint_id = $1", b)
    out = await run(db, capsys, "replay", "--endpoint", str(b), "--status", "failed")
    assert out == "replayed 4 deliveries (4 stay paused until their endpoint is enabled)\n"
    rows = await db.conn.fetch("SELECT id, status FROM deliveries")
    statuses = {r["id"]: r["status"] for r in rows}
    assert (statuses[a_ids[0]], statuses[a_ids[1]]) == ("pending", "delivering")
    assert {statuses[i] for i in b_ids} == {"paused"}


async def test_bad_delivery_log_and_replay_input_fails_with_one_clear_line(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    cases: dict[tuple[str, ...], tuple[str, ...]] = {
        ("delivery", "list", "--since", "yesterday"): ("--since", "RFC 3339", "1h"),
        ("delivery", "list", "--until", "2026-11-23T10:00:00"): ("--until", "UTC offset"),
        ("delivery", "list", "--since", "1h", "--until", "2h"): ("--since", "--until"),
        ("delivery", "list", "--status", "done"): ("--status", "'done'", "pending"),
        ("delivery", "list", "--limit", "0"): ("--limit",),
        ("delivery", "list", "--endpoint", "x"): ("--endpoint", "'x'"),
        ("delivery", "show", "999999"): ("delivery 999999 does not exist",),
        ("delivery", "show"): ("id",),
        ("replay",): ("say what to replay", "--status failed"),
        ("replay", "--status", "delivering"): ("delivering", "cannot be replayed"),
        ("replay", "--delivery", "999999", "--delivery", "999998"): ("999998, 999999",),
        ("status", "--bogus"): ("--bogus",),
    }
    for argv, fragments in cases.items():
        message = await run_error(db, capsys, *argv)
        for fragment in fragments:
            assert fragment in message, (argv, fragment, message)
    # And end to end: one line on stderr, no traceback, whether the parser or the command refuses.
    parsed, checked = await cli_all(
        db, ("delivery", "list", "--since", "yesterday"), ("delivery", "show", "999999")
    )
    assert_one_error_line(parsed, "--since")
    assert_one_error_line(checked, "delivery 999999 does not exist")


# status ----------------------------------------------------------------------------------------


async def test_status_json_counts_match_the_tables(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    healthy, _ = await db.add_endpoint(URL, tenant="shop-1")
    failing, _ = await db.add_endpoint(URL, tenant="shop-1")
    gone, _ = await db.add_endpoint(URL, tenant="shop-2")
    await db.insert_events(5, tenant="shop-1")
    await db.insert_events(2, tenant="shop-2")
    await fan_out_pending(db)
    await db.insert_events(3, tenant="shop-1")  # not fanned out yet
    h = await ids(db, "d.endpoint_id = $1", healthy)
    f = await ids(db, "d.endpoint_id = $1", failing)
    # healthy: 2 succeeded, 1 delivering, 2 pending (one due now, created 10 minutes ago);
    # failing: 1 failed, 4 pending; gone: disabled, its 2 deliveries paused.
    await db.conn.execute(
        "UPDATE deliveries SET status = 'succeeded', completed_at = now() WHERE id = ANY ($1)",
        h[:2],
    )
    await db.conn.execute("UPDATE deliveries SET status = 'delivering' WHERE id = $1", h[2])
    await db.conn.execute(
        "UPDATE deliveries SET next_attempt_at = now() - interval '1 s',"
        " created_at = now() - interval '10 minutes' WHERE id = $1",
        h[3],
    )
    await db.conn.execute(
        "UPDATE deliveries SET status = 'failed', completed_at = now() WHERE id = $1", f[0]
    )
    await db.conn.execute(
        "UPDATE endpoints SET consecutive_failures = 7, failing_since = now() - interval '1 h'"
        " WHERE id = $1",
        failing,
    )
    await disable(db, gone, "410 Gone")
    # The attempt log of the last minute: 3 final successes, 1 final failure, 2 retries; and one
    # success two minutes ago, outside the window.
    await db.conn.execute(
        "INSERT INTO attempts (delivery_id, event_id, endpoint_id, attempt, attempted_at,"
        " duration_ms, decision)"
        " SELECT 1, 'evt', 1, n::int, now() - make_interval(secs => s), 5, d"
        " FROM unnest($1::text[], $2::float8[]) WITH ORDINALITY AS x (d, s, n)",
        ["succeeded", "succeeded", "succeeded", "failed", "retry", "retry", "succeeded"],
        [1, 10, 50, 20, 30, 40, 120],
    )

    status = (await cli("status", "--json", env=db_env(db))).json()
    statuses = await db.statuses()
    assert statuses == {"succeeded": 2, "delivering": 1, "pending": 6, "failed": 1, "paused": 2}
    assert status["backlog"] == {
        "outbox": 3,
        "pending": 6,
        "pending_due": 1,
        "delivering": 1,
        "paused": 2,
        "failed": 1,
    }
    oldest = await db.conn.fetchval(
        "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM deliveries"
        " WHERE status IN ('pending', 'delivering')"
    )
    assert 600 <= status["oldest_pending_age_s"] <= oldest
    assert status["last_minute"] == {
        "succeeded_per_s": 0.05,
        "failed_per_s": round(1 / 60, 3),
        "attempts_per_s": 0.1,
    }
    assert status["endpoints"] == {"total": 3, "disabled": 1, "failing": 1}
    troubled = {e["id"]: e for e in status["troubled_endpoints"]}
    assert set(troubled) == {failing, gone}
    assert (troubled[gone]["enabled"], troubled[gone]["disabled_reason"]) == (False, "410 Gone")
    assert troubled[gone]["paused"] == 2
    assert (troubled[failing]["consecutive_failures"], troubled[failing]["pending"]) == (7, 4)
    assert troubled[failing]["failing_since"] is not None

    text = await run(db, capsys, "status")
    assert "pending                  6 (1 due now)" in text
    assert "410 Gone" in text
    assert "3 (1 disabled, 1 failing)" in text
