"""The operator's view of deliveries: `delivery list/show`, `replay` and `status`.

Everything here reads or re-queues rows with a few set-based statements; nothing runs on the
daemon's hot path. A replay hands work to the daemons through the table (and one NOTIFY).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog

from .argtypes import record_id
from .config import Config, parse_duration
from .db import Q
from .errors import CliError

log = structlog.get_logger("dispatcher")

STATUSES = ("pending", "delivering", "succeeded", "failed", "paused")
# A claim holds these rows: replaying one would send a second copy beside the one in flight.
NOT_REPLAYABLE = "delivering"
REPLAY_BATCH = 5_000
# `status` reports throughput over this window.
RATE_WINDOW_S = 60.0

DbCommand = Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]]


# Options --------------------------------------------------------------------------------------


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100_000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 100000")
    return int(text)


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time, or a duration back from `now` ("90s", "1h", "2d")."""
    try:
        return (now or datetime.now(UTC)) - timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an RFC 3339 time (2026-11-23T10:00:00Z)"
            " nor a duration back from now (90s, 1h, 2d)"
        ) from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} has no UTC offset: add Z or one like +01:00 (RFC 3339)"
        )
    return when


def _statuses(text: str) -> tuple[str, ...]:
    wanted = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in wanted if s not in STATUSES]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a status or comma-separated list of them ({', '.join(STATUSES)})"
        )
    return wanted


def add_parsers(
    sub: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    listing: argparse.ArgumentParser,
) -> None:
    """Add `delivery list/show`, `replay` and `status` to the `dispatcher` parser."""
    delivery = sub.add_parser("delivery", parents=[common], help="the delivery log")
    verbs = delivery.add_subparsers(dest="action", required=True, parser_class=type(delivery))

    lst = verbs.add_parser(
        "list",
        parents=[common, listing],
        help="deliveries, newest first",
        description="Deliveries, newest first. --since and --until bound when the delivery was"
        " created (its event fanned out): an RFC 3339 time or a duration back from now (1h).",
    )
    _selection_options(lst)
    lst.add_argument("--status", type=_statuses, help="status, or a comma-separated list")
    lst.add_argument("--limit", type=_limit, default=50, metavar="N", help="rows (50)")

    show = verbs.add_parser("show", parents=[common, listing], help="one delivery and its attempts")
    show.add_argument("id", type=record_id)

    skip = verbs.add_parser(
        "skip",
        parents=[common, listing],
        help="let an ordered key move on past a failed delivery that blocks it",
        description='On an ordered endpoint with [delivery] ordered_after_failure = "block", a'
        " delivery that failed for good keeps the later events of its ordering key waiting."
        " This leaves it failed (replay it later if you like) and sends the next one.",
    )
    skip.add_argument("id", type=record_id)

    replay = sub.add_parser(
        "replay",
        parents=[common, listing],
        help="re-queue failed (or any) deliveries",
        description="Make the selected deliveries due now with a fresh retry schedule; past"
        " attempts stay in the log. Deliveries being delivered are skipped (the attempt in flight"
        " settles them); those of a disabled endpoint stay paused until it is enabled.",
    )
    replay.add_argument(
        "--delivery",
        type=record_id,
        action="append",
        metavar="ID",
        help="a delivery id (repeatable)",
    )
    _selection_options(replay)
    replay.add_argument(
        "--status",
        type=_statuses,
        help="status, or a comma-separated list (default: failed; with --delivery: any)",
    )
    replay.add_argument("--dry-run", action="store_true", help="count, change nothing")

    sub.add_parser(
        "status",
        parents=[common, listing],
        help="backlog, oldest pending age, throughput, endpoints failing or disabled",
        description="The backlog by status (and events not fanned out yet), the age of the oldest"
        " event not yet delivered (paused ones aside), deliveries succeeded and failed per second"
        " over the last minute (from the attempt log), and endpoints failing or disabled.",
    )


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant", help="the endpoint's tenant")
    p.add_argument("--endpoint", type=record_id, metavar="ID", help="the endpoint's id")
    p.add_argument("--event", metavar="EVENT_ID", help="the event's id (evt_...)")
    p.add_argument("--type", metavar="EVENT_TYPE", help="the event's type, e.g. points.earned")
    p.add_argument(
        "--since",
        type=parse_time,
        metavar="TIME",
        help="created (fanned out) at or after: RFC 3339, or a duration back from now (1h)",
    )
    p.add_argument("--until", type=parse_time, metavar="TIME", help="created before (as --since)")


@dataclass(frozen=True, slots=True)
class Selection:
    """Which deliveries a listing or a replay is about; None means any."""

    ids: Sequence[int] | None = None
    tenant: str | None = None
    endpoint_id: int | None = None
    event_id: str | None = None
    event_type: str | None = None
    statuses: Sequence[str] | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> tuple[Any, ...]:
        """The filter parameters $1 to $8 of the queries that select deliveries."""
        return (
            None if self.ids is None else list(self.ids),
            self.tenant,
            self.endpoint_id,
            self.event_id,
            self.event_type,
            None if self.statuses is None else list(self.statuses),
            self.since,
            self.until,
        )

    def described(self) -> dict[str, Any]:
        """The filters that are set, for the log."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _selection(args: argparse.Namespace, statuses: Sequence[str] | None) -> Selection:
    if args.since and args.until and args.since >= args.until:
        raise CliError("--since must be earlier than --until")
    return Selection(
        ids=getattr(args, "delivery", None),
        tenant=args.tenant,
        endpoint_id=args.endpoint,
        event_id=args.event,
        event_type=args.type,
        statuses=statuses,
        since=args.since,
        until=args.until,
    )


async def _custom_plans(conn: asyncpg.Connection) -> None:
    # The selections use "$n IS NULL OR ..." filters: a generic plan (which PostgreSQL may pick
    # after a statement's fifth run, as a long replay does) could use no index for any of them.
    await conn.execute("SET plan_cache_mode = force_custom_plan")


# delivery list / show -------------------------------------------------------------------------


async def cmd_delivery_list(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    """Print the deliveries matching the filters, newest first."""
    selection = _selection(args, args.status)
    await _custom_plans(conn)
    rows = await conn.fetch(Q["list_deliveries"], *selection.params(), args.limit)
    views = [dict(r) for r in rows]
    for v in views:
        if v["waiting_behind"] is not None:
            # Its due time only paces re-checks: it goes when the one ahead of it finishes.
            v["next_attempt_at"] = None
    if args.json:
        _print_json(views)
        return 0
    if not views:
        print("no deliveries match")
        return 0
    _print_table(
        views,
        [
            ("id", "ID"),
            ("created_at", "CREATED"),
            ("event_id", "EVENT"),
            ("event_type", "TYPE"),
            ("tenant", "TENANT"),
            ("endpoint_id", "ENDPOINT"),
            ("state", "STATUS"),
            ("attempts", "ATTEMPTS"),
            ("last", "LAST"),
            ("next_attempt_at", "NEXT ATTEMPT"),
        ],
        last=lambda v: _last_result(v["last_status_code"], v["last_error"]),
        state=_state,
    )
    return 0


def _state(view: dict[str, Any]) -> str:
    """The status, with what an ordered delivery waits behind or holds up."""
    if view["waiting_behind"] is not None:
        return f"waiting behind {view['waiting_behind']}"
    if view["key_blocked"]:
        return "failed, blocking its key"
    return str(view["status"])


async def cmd_delivery_show(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    """Print one delivery, its event and every attempt in order."""
    row = await conn.fetchrow(Q["show_delivery"], args.id)
    if row is None:
        raise CliError(f"delivery {args.id} does not exist")
    attempts = [dict(a) for a in await conn.fetch(Q["delivery_attempts"], args.id)]
    view = dict(row)
    base = view.pop("attempt_base")
    view["payload"] = None if view["payload"] is None else json.loads(view["payload"])
    if view["status"] != "pending":
        # While delivering this is the claim's lease; when finished, a stale due time.
        view["next_attempt_at"] = None
    # Attempts up to `attempt_base` were made before the last replay.
    view["attempts_since_replay"] = view["attempts"] - base if view["replayed_at"] else None
    for a in attempts:
        a["before_replay"] = a["attempt"] <= base
    view["attempt_log"] = attempts
    if args.json:
        _print_json(view)
        return 0
    for key, value in view.items():
        if key not in ("attempt_log", "payload"):
            print(f"{key:22} {_text(value, ms=True)}")
    print(f"{'payload':22} {_text(json.dumps(view['payload'], separators=(',', ':')))}")
    if not attempts:
        print("\nno attempts yet")
    else:
        print(f"\n{len(attempts)} attempts")
    replay_mark = f"  -- replayed {_text(view['replayed_at'], ms=True)} --"
    replay_at = len(attempts) if view["replayed_at"] else -1
    for i, a in enumerate(attempts):
        if not a["before_replay"] and replay_at == len(attempts):
            replay_at = i
        if i == replay_at:
            print(replay_mark)
        next_at = f"  next {_text(a['next_attempt_at'], ms=True)}" if a["next_attempt_at"] else ""
        print(
            f"  #{a['attempt']:<3} {_text(a['attempted_at'], ms=True)}  {a['duration_ms']:>6} ms  "
            f"{_last_result(a['status_code'], a['error'])}  {a['decision']}{next_at}"
        )
        if a["error_detail"]:
            print(f"       detail:   {_text(a['error_detail'])}")
        if a["response_excerpt"]:
            print(f"       response: {_text(a['response_excerpt'])}")
    if replay_at == len(attempts):
        print(replay_mark)
    return 0


async def cmd_delivery_skip(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    """Release the ordering key a failed delivery blocks; the next event of the key goes."""
    row = await conn.fetchrow(Q["skip_blocked_delivery"], args.id)
    if row is None:
        found = await conn.fetchrow(Q["show_delivery"], args.id)
        if found is None:
            raise CliError(f"delivery {args.id} does not exist")
        raise CliError(
            f"delivery {args.id} is {found['status']} and does not block an ordering key"
            " (only a failed delivery on an ordered endpoint with"
            ' ordered_after_failure = "block" does)'
        )
    log.warning(
        "ordered_key_skipped",
        delivery_id=row["id"],
        event_id=row["event_id"],
        endpoint_id=row["endpoint_id"],
        ordering_key=row["ordering_key"],
        next_delivery_id=row["released"],
    )
    if args.json:
        _print_json({"skipped": row["id"], "next": row["released"]})
    else:
        nxt = f"; delivery {row['released']} is next" if row["released"] else ""
        print(f"skipped delivery {row['id']}: its ordering key moves on{nxt}")
    return 0


def _last_result(status_code: int | None, error: str | None) -> str:
    """An attempt's result in a few characters: the status code, else the error class."""
    if status_code is not None:
        return str(status_code)
    if error:
        return error.split(":", 1)[0]
    return "-"


# replay ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReplayCount:
    """What a replay did (or, dry, would do): re-queued, of which paused, and passed over."""

    replayed: int
    paused: int
    in_flight: int


async def replay(
    conn: asyncpg.Connection, selection: Selection, *, dry_run: bool = False
) -> ReplayCount:
    """Re-queue the selected deliveries in batches of short statements (see replay_deliveries)."""
    await _custom_plans(conn)
    params = selection.params()
    if dry_run:
        row = await conn.fetchrow(Q["count_replayable"], *params)
        assert row is not None
        return ReplayCount(row["replayable"], row["paused"], row["in_flight"])
    replayed = paused = passed_over = 0
    after = 0
    while True:
        row = await conn.fetchrow(Q["replay_deliveries"], *params, after, REPLAY_BATCH)
        assert row is not None
        replayed += row["replayed"]
        paused += row["paused"]
        passed_over += row["picked"] - row["replayed"]
        if row["picked"] < REPLAY_BATCH:
            return ReplayCount(replayed, paused, passed_over)
        after = row["last_id"]


async def cmd_replay(args: argparse.Namespace, config: Config, conn: asyncpg.Connection) -> int:
    """Re-queue deliveries by id, endpoint, status and time range; count only with --dry-run."""
    if args.status is not None and NOT_REPLAYABLE in args.status:
        raise CliError(
            "--status delivering: those deliveries are being sent now and cannot be replayed"
            " (the attempt in flight settles them)"
        )
    named = args.delivery is not None
    if not named and not any(
        getattr(args, k) is not None
        for k in ("tenant", "endpoint", "event", "type", "since", "until", "status")
    ):
        raise CliError(
            "say what to replay: --delivery, --endpoint, --tenant, --event, --type, --since,"
            " --until or --status (--status failed replays every failed delivery)"
        )
    # Named deliveries are replayed whatever their state, unless a status is given too (those in
    # flight are selected only to be counted as skipped).
    statuses = args.status or (STATUSES if named else ("failed",))
    selection = _selection(args, statuses)
    if named:
        missing = await conn.fetchval(Q["missing_deliveries"], args.delivery)
        if missing:
            listed = ", ".join(str(i) for i in missing)
            raise CliError(f"no such delivery: {listed} (nothing was replayed)")
    count = await replay(conn, selection, dry_run=args.dry_run)
    if not args.dry_run:
        log.info(
            "deliveries_replayed",
            replayed=count.replayed,
            paused=count.paused,
            skipped_in_flight=count.in_flight,
            by=os.environ.get("USER") or "operator",
            **selection.described(),
        )
        if count.replayed > count.paused:
            # Wakes an idle daemon at once; a busy one claims them within its poll interval.
            await conn.execute("SELECT pg_notify($1, '')", f"{config.database.schema}.outbox")
    if args.json:
        key = "would_replay" if args.dry_run else "replayed"
        _print_json({key: count.replayed, "paused": count.paused, "in_flight": count.in_flight})
        return 0
    verb = "would replay" if args.dry_run else "replayed"
    notes = []
    if count.paused:
        notes.append(f"{count.paused} stay paused until their endpoint is enabled")
    if count.in_flight:
        notes.append(f"{count.in_flight} skipped: being delivered now")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    nothing = "; nothing was changed" if args.dry_run else ""
    print(f"{verb} {count.replayed} {_plural(count.replayed, 'delivery')}{suffix}{nothing}")
    return 0


def _plural(n: int, word: str) -> str:
    return word if n == 1 else (word[:-1] + "ies" if word.endswith("y") else word + "s")


# status ---------------------------------------------------------------------------------------


async def cmd_status(args: argparse.Namespace, config: Config, conn: asyncpg.Connection) -> int:
    """Print the backlog, the oldest pending age, throughput and endpoints in trouble."""
    row = await conn.fetchrow(Q["delivery_status"], RATE_WINDOW_S)
    assert row is not None
    endpoints = [dict(r) for r in await conn.fetch(Q["troubled_endpoints"])]
    age = row["oldest_pending_age_s"]
    view: dict[str, Any] = {
        "backlog": {
            "outbox": row["outbox"],
            "pending": row["pending"],
            "pending_due": row["due"],
            "delivering": row["delivering"],
            "paused": row["paused"],
            "failed": row["failed"],
        },
        "oldest_pending_age_s": None if age is None else round(max(age, 0.0), 3),
        "last_minute": {
            "succeeded_per_s": round(row["succeeded"] / RATE_WINDOW_S, 3),
            "failed_per_s": round(row["failed_recently"] / RATE_WINDOW_S, 3),
            "attempts_per_s": round(row["attempts"] / RATE_WINDOW_S, 3),
        },
        "endpoints": {
            "total": row["endpoints"],
            "disabled": row["endpoints_disabled"],
            "failing": sum(1 for e in endpoints if e["enabled"]),
        },
        "troubled_endpoints": endpoints,
    }
    if args.json:
        _print_json(view)
        return 0
    b = view["backlog"]
    print("backlog")
    print(f"  {'outbox (not fanned out)':24} {b['outbox']}")
    print(f"  {'pending':24} {b['pending']} ({b['pending_due']} due now)")
    for key in ("delivering", "paused", "failed"):
        print(f"  {key:24} {b[key]}")
    print(f"{'oldest pending':26} {_age(view['oldest_pending_age_s'])}")
    m = view["last_minute"]
    print(
        f"{'last minute, per second':26} succeeded {m['succeeded_per_s']:g}"
        f"  failed {m['failed_per_s']:g}  attempts {m['attempts_per_s']:g}"
    )
    e = view["endpoints"]
    print(f"{'endpoints':26} {e['total']} ({e['disabled']} disabled, {e['failing']} failing)")
    if endpoints:
        print()
        _print_table(
            endpoints,
            [
                ("id", "ID"),
                ("tenant", "TENANT"),
                ("url", "URL"),
                ("enabled", "ENABLED"),
                ("consecutive_failures", "FAILURES"),
                ("failing_since", "FAILING SINCE"),
                ("pending", "PENDING"),
                ("paused", "PAUSED"),
                ("disabled_reason", "DISABLED BECAUSE"),
            ],
        )
    return 0


def _age(seconds: float | None) -> str:
    """An age for people: "4.2s", "3m 12s", "2h 5m", "1d 3h"."""
    if seconds is None:
        return "- (nothing pending)"
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:.1f}s"
    parts = [(whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m")]
    shown = [f"{n}{unit}" for n, unit in parts if n]
    return " ".join([*shown, f"{whole % 60}s"][:2])


# Output ---------------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _text(value: Any, *, ms: bool = False) -> str:
    """A value for a terminal: control characters escaped, since a receiver's response or an
    error it caused could otherwise move the cursor or recolour the operator's screen."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        spec = "milliseconds" if ms else "seconds"
        return value.astimezone(UTC).isoformat(timespec=spec).replace("+00:00", "Z")
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _print_table(
    rows: Sequence[dict[str, Any]],
    columns: Sequence[tuple[str, str]],
    **computed: Callable[[dict[str, Any]], Any],
) -> None:
    """An aligned table of `columns` (key, title); `computed` derives a key's cell from a row."""
    cells = [[_text(computed[k](r) if k in computed else r[k]) for k, _ in columns] for r in rows]
    widths = [
        max([len(title), *(len(c[i]) for c in cells)]) for i, (_, title) in enumerate(columns)
    ]
    lines = [[title for _, title in columns], *cells]
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


DB_HANDLERS: dict[tuple[str, str | None], DbCommand] = {
    ("delivery", "list"): cmd_delivery_list,
    ("delivery", "show"): cmd_delivery_show,
    ("delivery", "skip"): cmd_delivery_skip,
    ("replay", None): cmd_replay,
    ("status", None): cmd_status,
}
