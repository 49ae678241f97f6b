"""The `dispatcher` command: run, migrate, demo, and endpoint management.

Every failure an operator can cause (a bad option, config, URL or database) ends in one line on
stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

import asyncpg

from . import __version__, deliverylog, logs, probe, reencryption, retention, rotation
from .addresses import forbidden_address
from .catalog import catalog, check_filters
from .config import Config, ConfigError, format_duration, load_config, parse_duration
from .db import DatabaseError, Q, connect, migrate
from .endpoints import (
    InvalidEndpoint,
    validate_event_patterns,
    validate_headers,
    validate_profile,
    validate_url,
)
from .envelope import ENVELOPES, EnvelopeShape, InvalidEnvelope, shape_from_options
from .errors import CliError, DaemonCrashed, StartupError
from .secretbox import SecretBox, SecretKeyError, box_for
from .signing import (
    PROFILES,
    SigningError,
    SigningProfile,
    fingerprint,
    generate_secret,
    validate_secret,
)

EXIT_USAGE = 2
EXIT_FAILURE = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # Always the same prefix, whichever sub-command's parser found the problem.
        self.exit(EXIT_USAGE, f"dispatcher: error: {message} (see {self.prog} --help)\n")


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name.strip(), value


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the verb; the copy on each verb must not reset it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="TOML config file (default: $DISPATCHER_CONFIG; DISPATCHER_* variables override it)",
    )
    listing = _Parser(add_help=False)
    listing.add_argument("--json", action="store_true", help="print JSON")

    parser = _Parser(prog="dispatcher", description="Loyalty webhook dispatcher")
    parser.add_argument("--config", metavar="PATH", default=os.environ.get("DISPATCHER_CONFIG"))
    parser.add_argument("--version", action="version", version=f"dispatcher {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("run", parents=[common], help="run the daemon")
    sub.add_parser("migrate", parents=[common], help="create or upgrade the schema")
    demo = sub.add_parser(
        "demo", parents=[common], help="the whole thing on an embedded PostgreSQL"
    )
    demo.add_argument("--events", type=_positive_int, default=60, help="events to send (60)")

    sub.add_parser(
        "events",
        parents=[common, listing],
        help="the event types endpoints can subscribe to",
    )
    ep = sub.add_parser("endpoint", parents=[common], help="manage subscriptions")
    eps = ep.add_subparsers(dest="action", required=True, parser_class=_Parser)

    def endpoint_options(p: argparse.ArgumentParser, *, adding: bool) -> None:
        p.add_argument("--tenant", required=adding, help="merchant / shop code")
        p.add_argument("--url", required=adding, help="https:// URL to POST to")
        p.add_argument("--events", help="comma-separated event types or prefix.* (default: all)")
        p.add_argument("--description")
        if adding:
            p.add_argument("--secret", help="signing secret (default: a new random one)")
        p.add_argument("--profile", choices=PROFILES)
        p.add_argument("--signature-header", metavar="NAME")
        p.add_argument("--algorithm", choices=("sha1", "sha256", "sha512"))
        p.add_argument("--encoding", choices=("hex", "base64"))
        p.add_argument("--signed", choices=("body", "timestamp.body"))
        p.add_argument("--prefix", metavar="TEXT")
        p.add_argument("--timestamp-header", metavar="NAME")
        p.add_argument(
            "--header",
            type=_header,
            action="append",
            metavar="NAME=VALUE",
            help="extra header (repeatable)",
        )
        p.add_argument(
            "--ordered",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="deliver events sharing an ordering_key one at a time, in order",
        )
        p.add_argument("--max-in-flight", type=_positive_int, metavar="N")
        p.add_argument("--timeout", type=_duration, metavar="DURATION")
        p.add_argument(
            "--allow-unknown-events",
            action="store_true",
            help="accept --events entries that match nothing in `dispatcher events`",
        )
        p.add_argument(
            "--envelope",
            choices=ENVELOPES,
            help="full: the id/type/tenant/timestamp/data envelope (default); data: payload only",
        )
        p.add_argument(
            "--field",
            type=_field,
            action="append",
            metavar="FIELD=NAME",
            help="send an envelope field (id, type, tenant, timestamp, data) as NAME (repeatable)",
        )

    add = eps.add_parser("add", parents=[common, listing], help="add an endpoint")
    endpoint_options(add, adding=True)
    upd = eps.add_parser("update", parents=[common, listing], help="change an endpoint")
    upd.add_argument("id", type=_positive_int)
    endpoint_options(upd, adding=False)
    lst = eps.add_parser("list", parents=[common, listing], help="list endpoints")
    lst.add_argument("--tenant")
    show = eps.add_parser("show", parents=[common, listing], help="one endpoint")
    show.add_argument("id", type=_positive_int)
    for verb in ("enable", "disable"):
        p = eps.add_parser(verb, parents=[common, listing], help=f"{verb} an endpoint")
        p.add_argument("id", type=_positive_int)
        p.add_argument("--reason", default="")
    rotation.add_parser(eps, common, listing)
    reencryption.add_parser(eps, common, listing)
    probe.add_parser(eps, common, listing)
    deliverylog.add_parsers(sub, common, listing)
    retention.add_parser(sub, common, listing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config)
        logs.configure(config.log.format, config.log.level)
        key = (args.command, getattr(args, "action", None))
        if key == ("endpoint", "add"):
            # Bad input is reported as such, whatever state the database is in.
            args.checked = _check_new_endpoint(args, config)
        if key in _DB_HANDLERS:
            return _run_async(_on_connection(_DB_HANDLERS[key], args, config))
        return _HANDLERS[key](args, config)
    except (
        ConfigError,
        DatabaseError,
        CliError,
        InvalidEndpoint,
        StartupError,
        DaemonCrashed,
        SecretKeyError,
    ) as exc:
        print(f"dispatcher: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _run_async(coro: Awaitable[int]) -> int:
    import uvloop

    return uvloop.run(_guard(coro))


async def _on_connection(command: DbCommand, args: argparse.Namespace, config: Config) -> int:
    conn = await connect(config.database)
    try:
        return await command(args, config, conn)
    finally:
        await conn.close()


async def _guard(coro: Awaitable[int]) -> int:
    try:
        return await coro
    except asyncpg.PostgresConnectionError as exc:
        raise DatabaseError(f"database connection lost: {exc}") from None
    except asyncpg.PostgresError as exc:
        # Constraint violations and the like come back as the database's own clear message.
        raise CliError(_pg_message(exc)) from None
    except (
        OSError,
        TimeoutError,
        asyncpg.InterfaceError,
        asyncpg.exceptions.InternalClientError,
    ) as exc:
        # The connection went away mid-command: asyncpg's own errors say so, not a traceback.
        raise DatabaseError(f"database connection lost: {exc}") from None


def _pg_message(exc: asyncpg.PostgresError) -> str:
    # The message only: PostgreSQL's DETAIL may quote the whole row, secrets included.
    message = str(getattr(exc, "message", "") or type(exc).__name__).splitlines()[0]
    constraint = getattr(exc, "constraint_name", None)
    if constraint:
        return f"refused by the database: constraint {constraint} ({message})"
    return f"database: {message}"


# run / migrate ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    from .daemon import Dispatcher, tune_gc

    async def go() -> int:
        # SIGHUP reads the file and the environment again, as at start-up.
        d = Dispatcher(config, reload=lambda: load_config(args.config))
        d.install_signals()
        tune_gc()
        await d.run()
        return 0

    return _run_async(go())


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    async def go() -> int:
        applied = await migrate(config.database, max_payload_bytes=config.events.max_payload_bytes)
        if applied:
            for name in applied:
                print(f"applied {name}")
        else:
            print(f"schema {config.database.schema} is up to date")
        return 0

    return _run_async(go())


def cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from .demo import run_demo

    return _run_async(run_demo(events=args.events))


# endpoints ----------------------------------------------------------------------------------


def _profile_from(args: argparse.Namespace, base: SigningProfile | None = None) -> SigningProfile:
    b = base or SigningProfile()
    kind = args.profile or b.kind
    kind_changed = kind != b.kind

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name)
        if value is not None:
            return value
        return default if kind_changed else getattr(b, name)

    return SigningProfile(
        kind=kind,
        header=args.signature_header
        if args.signature_header is not None
        else (None if kind_changed else b.header),
        algorithm=pick("algorithm", "sha256"),
        encoding=pick("encoding", "hex"),
        signed=pick("signed", "body"),
        prefix=pick("prefix", ""),
        timestamp_header=pick("timestamp_header", None),
    )


def _check_url(url: str, config: Config) -> str:
    validate_url(url, allow_http=config.security.allow_http)
    if not config.security.allow_private_networks:
        from urllib.parse import urlsplit

        host = urlsplit(url).hostname or ""
        if host == "localhost" or host.endswith(".localhost"):
            raise InvalidEndpoint(
                "url: localhost is refused; set [security] allow_private_networks"
            )
        try:
            why = forbidden_address(host.strip("[]"))
        except ValueError:
            why = None  # a name, checked on its resolved address at connect time
        if why:
            raise InvalidEndpoint(
                f"url: {host} is a {why}; set [security] allow_private_networks to allow it"
            )
    return url


@dataclass(frozen=True, slots=True)
class _NewEndpoint:
    """`endpoint add` input, checked before any connection is made."""

    profile: SigningProfile
    url: str
    events: list[str]
    headers: dict[str, str]
    secret: str
    envelope: EnvelopeShape | None = None


def _check_new_endpoint(args: argparse.Namespace, config: Config) -> _NewEndpoint:
    profile = validate_profile(_profile_from(args))
    url = _check_url(args.url, config)
    events = _checked_events(args, config)
    headers = validate_headers(dict(args.header or []), profile)
    secret = args.secret or generate_secret(profile.kind)
    try:
        validate_secret(profile.kind, secret)
    except SigningError as exc:
        raise InvalidEndpoint(f"secret: {exc}") from None
    return _NewEndpoint(profile, url, events, headers, secret, _envelope_from(args, None))


async def cmd_endpoint_add(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    new: _NewEndpoint = args.checked
    profile, secret = new.profile, new.secret
    eid = await conn.fetchval(
        Q["insert_endpoint"],
        args.tenant,
        new.url,
        args.description or "",
        new.events,
        profile.kind,
        profile.header,
        profile.algorithm,
        profile.encoding,
        profile.signed,
        profile.prefix,
        profile.timestamp_header,
        box_for(config.security).seal(secret),
        json.dumps(new.headers),
        bool(args.ordered),
        args.max_in_flight,
        None if args.timeout is None else int(args.timeout * 1000),
        *_envelope_columns(new.envelope),
    )
    if args.json:
        print(json.dumps({"id": eid, "secret": secret, "fingerprint": fingerprint(secret)}))
    else:
        print(f"endpoint {eid} added for tenant {args.tenant}")
        print(f"secret: {secret}")
        print("(shown once: store it with the receiver now)")
    return 0


async def cmd_endpoint_update(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    row = await _fetch_endpoint(conn, args.id)
    base = SigningProfile(
        row["profile"],
        row["signature_header"],
        row["algorithm"],
        row["encoding"],
        row["signed"],
        row["prefix"],
        row["timestamp_header"],
    )
    profile = validate_profile(_profile_from(args, base))
    box = box_for(config.security)
    if profile.kind != base.kind:
        try:
            validate_secret(profile.kind, box.open(row["secret"]))
        except SigningError as exc:
            raise InvalidEndpoint(
                f"secret: the current secret does not suit profile {profile.kind} ({exc});"
                " rotate it after changing the profile"
            ) from None
    headers = dict(json.loads(row["headers"]))
    for name, value in args.header or []:
        # Header names are case-insensitive: a new value replaces the old one.
        for old in [k for k in headers if k.lower() == name.lower()]:
            del headers[old]
        headers[name] = value
    changes: dict[str, Any] = {
        "profile": profile.kind,
        "signature_header": profile.header,
        "algorithm": profile.algorithm,
        "encoding": profile.encoding,
        "signed": profile.signed,
        "prefix": profile.prefix,
        "timestamp_header": profile.timestamp_header,
        "headers": json.dumps(validate_headers(headers, profile)),
    }
    if args.url is not None:
        changes["url"] = _check_url(args.url, config)
    if args.tenant is not None:
        changes["tenant"] = args.tenant
    if args.events is not None:
        changes["event_types"] = _checked_events(args, config, keep=row["event_types"])
    if args.description is not None:
        changes["description"] = args.description
    if args.ordered is not None:
        changes["ordered"] = args.ordered
    if args.max_in_flight is not None:
        changes["max_in_flight"] = args.max_in_flight
    if args.timeout is not None:
        changes["timeout_ms"] = int(args.timeout * 1000)
    if args.envelope is not None or args.field:
        stored = EnvelopeShape.from_columns(row["envelope"], row["envelope_fields"])
        changes["envelope"], changes["envelope_fields"] = _envelope_columns(
            _envelope_from(args, stored)
        )
    sets = ", ".join(f"{k} = ${i}" for i, k in enumerate(changes, start=2))
    async with conn.transaction():
        await conn.execute(f"UPDATE endpoints SET {sets} WHERE id = $1", args.id, *changes.values())
        if args.ordered is not None and args.ordered != row["ordered"]:
            # Deliveries not yet sent follow the new rule too, not only events still to come.
            await conn.fetchval(Q["set_endpoint_ordering"], args.id, args.ordered)
    row = await _fetch_endpoint(conn, args.id)
    _print_endpoints([row], as_json=args.json, detail=True, box=box_for(config.security))
    return 0


async def _fetch_endpoint(conn: asyncpg.Connection, eid: int) -> asyncpg.Record:
    rows = await conn.fetch(Q["list_endpoints"], None, eid)
    if not rows:
        raise CliError(f"endpoint {eid} does not exist")
    return rows[0]


async def cmd_endpoint_list(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    rows = await conn.fetch(Q["list_endpoints"], args.tenant, None)
    _print_endpoints(rows, as_json=args.json, detail=False, box=box_for(config.security))
    return 0


async def cmd_endpoint_show(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    row = await _fetch_endpoint(conn, args.id)
    _print_endpoints([row], as_json=args.json, detail=True, box=box_for(config.security))
    return 0


async def cmd_endpoint_enable(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    result = await conn.fetchrow(Q["enable_endpoint"], args.id)
    assert result is not None
    if not result["found"]:
        raise CliError(f"endpoint {args.id} does not exist")
    if args.json:
        print(json.dumps({"id": args.id, "enabled": True, "resumed": result["resumed"]}))
    else:
        print(f"endpoint {args.id} enabled; {result['resumed']} paused deliveries resumed")
    return 0


async def cmd_endpoint_disable(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    await _fetch_endpoint(conn, args.id)
    row = await conn.fetchrow(
        Q["disable_endpoints"],
        [args.id],
        [args.reason or "disabled by operator"],
        os.environ.get("USER") or "operator",
        datetime.now().astimezone(),
    )
    paused = row["paused"] if row else 0
    if args.json:
        print(json.dumps({"id": args.id, "enabled": False, "paused": paused}))
    else:
        print(f"endpoint {args.id} disabled; {paused} pending deliveries paused")
    return 0


def _secret_fingerprint(box: SecretBox, stored: str) -> str:
    """The fingerprint of the secret a stored value holds, encrypted or not."""
    try:
        return fingerprint(box.open(stored))
    except SecretKeyError:
        return "unknown (encrypted with a key not configured here)"


def _endpoint_view(row: asyncpg.Record, detail: bool, box: SecretBox) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row["id"],
        "tenant": row["tenant"],
        "url": row["url"],
        "events": list(row["event_types"]),
        "profile": row["profile"],
        **_envelope_view(row),
        "enabled": row["enabled"],
        "secret_fingerprint": _secret_fingerprint(box, row["secret"]),
        "consecutive_failures": row["consecutive_failures"],
        "pending": row["pending"],
        "paused": row["paused"],
    }
    if detail:
        view.update(
            description=row["description"],
            signature_header=row["signature_header"],
            algorithm=row["algorithm"],
            encoding=row["encoding"],
            signed=row["signed"],
            prefix=row["prefix"],
            timestamp_header=row["timestamp_header"],
            old_secret_fingerprint=_secret_fingerprint(box, row["old_secret"])
            if row["old_secret"]
            else None,
            old_secret_expires_at=row["old_secret_expires_at"],
            headers=json.loads(row["headers"]),
            ordered=row["ordered"],
            max_in_flight=row["max_in_flight"],
            timeout=format_duration(row["timeout_ms"] / 1000) if row["timeout_ms"] else None,
            disabled_reason=row["disabled_reason"],
            disabled_at=row["disabled_at"],
            disabled_by=row["disabled_by"],
            failing_since=row["failing_since"],
            last_success_at=row["last_success_at"],
            last_failure_at=row["last_failure_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )
    return view


def _print_endpoints(
    rows: Sequence[asyncpg.Record], *, as_json: bool, detail: bool, box: SecretBox
) -> None:
    views = [_endpoint_view(r, detail, box) for r in rows]
    if as_json:
        print(json.dumps(views[0] if detail else views, default=_json_default, indent=None))
        return
    if detail:
        for key, value in views[0].items():
            print(f"{key:24} {_plain(value)}")
        return
    cols = (
        "id",
        "tenant",
        "url",
        "events",
        "profile",
        "envelope",
        "enabled",
        "pending",
        "paused",
        "consecutive_failures",
    )
    table = [[_plain(v[c]) for c in cols] for v in views]
    widths = [max([len(c), *(len(r[i]) for r in table)]) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)))


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value) or "*"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


# events and envelopes -------------------------------------------------------------------------


def cmd_events(args: argparse.Namespace, config: Config) -> int:
    """Print the catalog with the config's extra types; no database needed."""
    types = catalog(config.events.extra)
    if args.json:
        print(json.dumps([t.to_json() for t in types]))
        return 0
    width = max(len("NAME"), *(len(t.name) for t in types))
    print(f"{'NAME'.ljust(width)}  DESCRIPTION")
    for t in types:
        print(f"{t.name.ljust(width)}  {t.description}")
    return 0


def _field(text: str) -> tuple[str, str]:
    """--field FIELD=NAME as a pair; which fields and names are valid is envelope.py's to say."""
    field, sep, name = text.partition("=")
    if not sep or not field:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIELD=NAME (e.g. type=event)")
    return field.strip(), name


def _checked_events(
    args: argparse.Namespace, config: Config, keep: Sequence[str] = ()
) -> list[str]:
    """--events as a filter each entry of which matches a catalog type (unless allowed not to);
    entries in `keep`, already on the endpoint, pass so stored custom types need no new flag."""
    events = validate_event_patterns((args.events or "").split(","))
    if args.allow_unknown_events:
        return events
    return check_filters(events, (t.name for t in catalog(config.events.extra)), keep=keep)


def _envelope_from(args: argparse.Namespace, stored: EnvelopeShape | None) -> EnvelopeShape | None:
    """The stored shape changed by --envelope and --field; None is the contract's envelope."""
    try:
        return shape_from_options(stored, args.envelope, args.field or [])
    except InvalidEnvelope as exc:
        raise InvalidEndpoint(f"envelope: {exc}") from None


def _envelope_columns(shape: EnvelopeShape | None) -> tuple[str | None, str | None]:
    """The (envelope, envelope_fields) column values: NULLs for the contract's envelope."""
    return (None, None) if shape is None else shape.columns()


def _envelope_view(row: asyncpg.Record) -> dict[str, Any]:
    """The envelope as listings show it: "full" or "data", and the renamed fields."""
    shape = EnvelopeShape.from_columns(row["envelope"], row["envelope_fields"])
    return {
        "envelope": shape.kind if shape else "full",
        "envelope_fields": shape.renames() if shape else {},
    }


DbCommand = Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]]

_HANDLERS: dict[tuple[str, str | None], Callable[[argparse.Namespace, Config], int]] = {
    ("run", None): cmd_run,
    ("migrate", None): cmd_migrate,
    ("demo", None): cmd_demo,
    ("events", None): cmd_events,
}
# Commands that work on one connection to a migrated schema.
_DB_HANDLERS: dict[tuple[str, str | None], DbCommand] = {
    ("endpoint", "add"): cmd_endpoint_add,
    ("endpoint", "update"): cmd_endpoint_update,
    ("endpoint", "list"): cmd_endpoint_list,
    ("endpoint", "show"): cmd_endpoint_show,
    ("endpoint", "enable"): cmd_endpoint_enable,
    ("endpoint", "disable"): cmd_endpoint_disable,
    **deliverylog.DB_HANDLERS,
    **rotation.DB_HANDLERS,
    **reencryption.DB_HANDLERS,
    **probe.DB_HANDLERS,
    **retention.DB_HANDLERS,
}


if __name__ == "__main__":
    raise SystemExit(main())
