"""Configuration: a TOML file, overridden by DISPATCHER_<SECTION>_<KEY> environment variables.

Every key has a default (documented in config.example.toml); a bad value is a ConfigError that
names the key and where it came from, so the CLI can print one line and exit non-zero.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_UNIT_DECIMAL = {unit: Decimal(str(v)) for unit, v in _UNIT_SECONDS.items()}
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# The outbox's rule for event_type (outbox_event_type_dotted_name_max_200).
_EVENT_TYPE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key and its source."""


def parse_duration(text: str) -> float:
    """Seconds in a duration string with a unit: "250ms", "5s", "30m", "2h", "1d"."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(
            f"{text!r} is not a duration (use a number and a unit: 250ms, 5s, 30m, 2h)"
        )
    # Decimal arithmetic, so "9ms" is exactly 0.009 and formats back to "9ms".
    seconds = float(Decimal(m.group(1)) * _UNIT_DECIMAL[m.group(2)])
    if not math.isfinite(seconds) or seconds > 10 * 365 * 86400:
        raise ValueError(f"{text!r} is longer than ten years")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact duration string for a number of seconds."""
    for unit in ("d", "h", "m", "s"):
        n = seconds / _UNIT_SECONDS[unit]
        if n >= 1 and n == int(n):
            return f"{int(n)}{unit}"
    return f"{round(seconds * 1000)}ms"


# PostgreSQL's own values for the setting, weakest first.
SYNCHRONOUS_COMMIT = ("off", "local", "remote_write", "on", "remote_apply")


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    dsn: str = "postgresql://dispatcher@localhost/loyalty"
    schema: str = "webhooks"
    pool_size: int = 8
    connect_timeout: float = 10.0
    synchronous_commit: str = "off"
    # Read at every connect, so a rotated password is picked up; when unset, load_config fills
    # in the systemd credential $CREDENTIALS_DIRECTORY/db-password if there is one.
    password_file: str = ""


# What a delivery that failed for good does to the rest of its key on an ordered endpoint.
ORDERED_AFTER_FAILURE = ("move_on", "block")


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    concurrency: int = 256
    per_endpoint_concurrency: int = 8
    timeout: float = 5.0
    lease: float = 60.0
    max_response_bytes: int = 65536
    response_excerpt_bytes: int = 1024
    batch_size: int = 500
    flush_interval: float = 0.0
    poll_interval: float = 1.0
    shutdown_grace: float = 20.0
    user_agent: str = ""
    # On an ordered endpoint, what a delivery that failed for good does to the later events of
    # its ordering key: "move_on" (they go) or "block" (they wait for a replay or a skip).
    ordered_after_failure: str = "move_on"


@dataclass(frozen=True, slots=True)
class RetryConfig:
    schedule: tuple[float, ...] = (0, 5, 60, 300, 1800, 7200, 18000, 36000, 36000)
    jitter: float = 0.2
    retry_after_max: float = 3600.0


@dataclass(frozen=True, slots=True)
class DisableConfig:
    after_failures: int = 20
    after: float = 86400.0


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    allow_http: bool = False
    allow_private_networks: bool = False
    # Endpoint secrets are stored encrypted under this key (dispatcher.secretbox); when unset,
    # load_config fills in the systemd credential $CREDENTIALS_DIRECTORY/secrets-key if any.
    secrets_key_file: str = ""
    # Keys rotated out, still used to decrypt until `endpoint reencrypt-secrets` has run.
    old_secrets_key_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    # /readyz fails while the lag (dispatcher.monitoring) is over this; 0: no lag check.
    max_lag: float = 300.0


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "json"
    level: str = "info"
    # The backlog sample (gauges, the lag /readyz checks) and its one summary line.
    summary_interval: float = 15.0


@dataclass(frozen=True, slots=True)
class EventsConfig:
    """Event types added to the default catalog (dispatcher.catalog) for this deployment, and
    the outbox's payload size limit (a constraint `dispatcher migrate` sets)."""

    extra: tuple[str, ...] = ()
    max_payload_bytes: int = 1048576


@dataclass(frozen=True, slots=True)
class OpsConfig:
    """Operational events (endpoint disabled or recovered, delivery failed) go to this tenant's
    endpoints through the outbox, so the backend can tell merchants; "" turns them off."""

    tenant: str = ""
    # endpoint.recovered only for failing streaks at least this long (1: any).
    recovered_after_failures: int = 1


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """How long finished deliveries (and their attempts and events) are kept, and how the
    daemon prunes them: every `interval` ("0s": never), `batch` rows per statement."""

    succeeded: float = 7 * 86400.0
    failed: float = 30 * 86400.0
    interval: float = 60.0
    batch: int = 5000


@dataclass(frozen=True, slots=True)
class Config:
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    disable: DisableConfig = field(default_factory=DisableConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    log: LogConfig = field(default_factory=LogConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseConfig,
    "delivery": DeliveryConfig,
    "retry": RetryConfig,
    "disable": DisableConfig,
    "security": SecurityConfig,
    "http": HttpConfig,
    "log": LogConfig,
    "events": EventsConfig,
    "ops": OpsConfig,
    "retention": RetentionConfig,
}
# Keys whose values are durations in the file ("5s") and seconds in the dataclass.
_DURATIONS = {
    ("database", "connect_timeout"),
    ("delivery", "timeout"),
    ("delivery", "lease"),
    ("delivery", "flush_interval"),
    ("delivery", "poll_interval"),
    ("delivery", "shutdown_grace"),
    ("retry", "retry_after_max"),
    ("disable", "after"),
    ("retention", "succeeded"),
    ("retention", "failed"),
    ("retention", "interval"),
    ("http", "max_lag"),
    ("log", "summary_interval"),
}


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read the file (if any), apply environment overrides, convert and validate every key."""
    env = os.environ if environ is None else environ
    raw: dict[str, dict[str, tuple[Any, str]]] = {name: {} for name in _SECTIONS}
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"config file {source} cannot be read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {source} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {source} is not UTF-8 text (byte {exc.start})"
            ) from None
        for section, values in data.items():
            if section not in _SECTIONS:
                raise ConfigError(f"{source}: unknown section [{section}]")
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: [{section}] must be a table")
            for key, value in values.items():
                raw[section][key] = (value, source)
    for name, value in env.items():
        if not name.startswith("DISPATCHER_"):
            continue
        rest = name[len("DISPATCHER_") :].lower()
        section, _, key = rest.partition("_")
        if section in _SECTIONS and key:
            raw[section][key] = (value, f"environment variable {name}")
    built = {section: _build_section(section, raw[section]) for section in _SECTIONS}
    built["database"] = _password_file(built["database"], raw["database"], env)
    built["security"] = _secrets_key_files(built["security"], raw["security"], env)
    config = Config(**built)
    sources = {f"[{sec}] {key}": src for sec, keys in raw.items() for key, (_, src) in keys.items()}
    try:
        _validate(config)
    except _Invalid as exc:
        # A rule between two keys names every place either was set.
        where = list(dict.fromkeys(sources[k] for k in exc.keys if k in sources))
        raise ConfigError(
            f"{', '.join(where) or 'the defaults'}: {exc.keys[0]}: {exc.why}"
        ) from None
    return config


def _build_section(section: str, values: dict[str, tuple[Any, str]]) -> Any:
    cls = _SECTIONS[section]
    known = {f.name: f for f in fields(cls)}
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for key, (value, source) in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key [{section}] {key}")
        try:
            kwargs[key] = _convert(section, key, value, getattr(defaults, key))
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{source}: [{section}] {key}: {exc}") from None
    return cls(**kwargs)


# The systemd credential (LoadCredential=db-password:...) read when password_file is not set.
CREDENTIAL_NAME = "db-password"


def _password_file(
    db: DatabaseConfig, raw: dict[str, tuple[Any, str]], env: Mapping[str, str]
) -> DatabaseConfig:
    """[database] password_file, else the systemd credential db-password if it exists; checked
    to hold a password now, so a bad one is a ConfigError rather than a failed connection."""
    if db.password_file:
        path = Path(db.password_file)
        where = f"{raw['password_file'][1]}: [database] password_file"
    else:
        directory = env.get("CREDENTIALS_DIRECTORY", "")
        path = Path(directory) / CREDENTIAL_NAME
        if not directory or not path.exists():
            return db
        where = f"systemd credential {CREDENTIAL_NAME}"
    try:
        read_password(str(path))
    except OSError as exc:
        raise ConfigError(f"{where}: {path} cannot be read: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {path} {exc}") from None
    return replace(db, password_file=str(path))


def _secrets_key_files(
    sec: SecurityConfig, raw: dict[str, tuple[Any, str]], env: Mapping[str, str]
) -> SecurityConfig:
    """[security] secrets_key_file, else the systemd credential secrets-key if it exists; every
    key file checked to hold a key now. Messages name files, never their contents."""
    from .secretbox import CREDENTIAL_NAME as KEY_CREDENTIAL
    from .secretbox import read_key

    def check(path: Path, where: str) -> None:
        try:
            read_key(str(path))
        except OSError as exc:
            raise ConfigError(f"{where}: {path} cannot be read: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"{where}: {path} {exc}") from None

    for old in sec.old_secrets_key_files:
        check(Path(old), f"{raw['old_secrets_key_files'][1]}: [security] old_secrets_key_files")
    if sec.secrets_key_file:
        path = Path(sec.secrets_key_file)
        check(path, f"{raw['secrets_key_file'][1]}: [security] secrets_key_file")
        return sec
    directory = env.get("CREDENTIALS_DIRECTORY", "")
    path = Path(directory) / KEY_CREDENTIAL
    if not directory or not path.exists():
        return sec
    check(path, f"systemd credential {KEY_CREDENTIAL}")
    return replace(sec, secrets_key_file=str(path))


def read_password(path: str) -> str:
    """The password a password file holds: its one line, without the line break."""
    try:
        password = Path(path).read_text("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    if not password or "\n" in password:
        raise ValueError("must hold the password on one line")
    return password


def _convert(section: str, key: str, value: Any, default: Any) -> Any:
    from_env = isinstance(value, str)
    if section == "retry" and key == "schedule":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ValueError("must be a non-empty list of durations")
        return tuple(parse_duration(str(v)) for v in items)
    if section == "security" and key == "old_secrets_key_files":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("must be a list of file paths")
        return tuple(v.strip() for v in items if v.strip())
    if section == "events" and key == "extra":
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("must be a list of event type names")
        return tuple(v.strip() for v in items if v.strip())
    if (section, key) in _DURATIONS:
        if not isinstance(value, str):
            raise ValueError('must be a duration string with a unit, such as "5s"')
        return parse_duration(value)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if from_env and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError("must be true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ValueError("must be a whole number")
        if isinstance(value, int):
            return value
        if from_env and value.strip().lstrip("-").isdigit():
            return int(value)
        raise ValueError("must be a whole number")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError("must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if from_env:
            return float(value)
        raise ValueError("must be a number")
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


class _Invalid(Exception):
    def __init__(self, keys: tuple[str, ...], why: str) -> None:
        self.keys, self.why = keys, why


def _validate(c: Config) -> None:
    def bad(key: str, why: str, *related: str) -> _Invalid:
        return _Invalid((key, *related), why)

    if not c.database.dsn.startswith(("postgresql://", "postgres://")):
        raise bad("[database] dsn", "must be a postgresql:// URL")
    if not _IDENT.match(c.database.schema):
        raise bad("[database] schema", "must be a lower-case SQL identifier")
    if not 0 < c.database.connect_timeout <= 300:
        raise bad("[database] connect_timeout", "must be between 1ms and 5m")
    if not 2 <= c.database.pool_size <= 100:
        raise bad("[database] pool_size", "must be between 2 and 100")
    if c.database.synchronous_commit not in SYNCHRONOUS_COMMIT:
        raise bad(
            "[database] synchronous_commit", f"must be one of {', '.join(SYNCHRONOUS_COMMIT)}"
        )
    d = c.delivery
    if not 1 <= d.concurrency <= 10000:
        raise bad("[delivery] concurrency", "must be between 1 and 10000")
    if not 1 <= d.per_endpoint_concurrency <= d.concurrency:
        raise bad(
            "[delivery] per_endpoint_concurrency",
            "must be between 1 and concurrency",
            "[delivery] concurrency",
        )
    if not 0 < d.timeout <= 300:
        raise bad("[delivery] timeout", "must be between 1ms and 5m")
    if d.lease < max(1.0, 2 * d.timeout):
        raise bad(
            "[delivery] lease",
            "must be at least twice the timeout (and at least 1s)",
            "[delivery] timeout",
        )
    if not 1 <= d.batch_size <= 10000:
        raise bad("[delivery] batch_size", "must be between 1 and 10000")
    if d.max_response_bytes < d.response_excerpt_bytes:
        raise bad(
            "[delivery] max_response_bytes",
            "must be at least response_excerpt_bytes",
            "[delivery] response_excerpt_bytes",
        )
    if not 0 < d.poll_interval <= 60:
        raise bad("[delivery] poll_interval", "must be between 1ms and 60s")
    if not 0 <= d.flush_interval <= 5:
        raise bad("[delivery] flush_interval", "must be between 0s and 5s")
    if len(d.user_agent) > 200 or not all(" " <= ch <= "~" for ch in d.user_agent):
        # It goes into every request's head as it is.
        raise bad("[delivery] user_agent", "must be at most 200 printable ASCII characters")
    if d.ordered_after_failure not in ORDERED_AFTER_FAILURE:
        raise bad("[delivery] ordered_after_failure", "must be move_on or block")
    if not 0 <= c.retry.jitter < 1:
        raise bad("[retry] jitter", "must be at least 0 and below 1")
    if c.disable.after_failures < 1:
        raise bad("[disable] after_failures", "must be at least 1")
    if c.http.listen:
        host, sep, port = c.http.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise bad("[http] listen", "must be HOST:PORT or empty")
    if c.log.format not in ("json", "console"):
        raise bad("[log] format", "must be json or console")
    if c.log.level not in ("debug", "info", "warning", "error"):
        raise bad("[log] level", "must be debug, info, warning or error")
    if not 0.01 <= c.log.summary_interval <= 3600:
        raise bad("[log] summary_interval", "must be between 10ms and 1h")
    if c.http.max_lag != 0 and c.http.max_lag < 1:
        raise bad("[http] max_lag", 'must be at least 1s, or "0s" (no lag check)')
    r = c.retention
    for key, value in (("succeeded", r.succeeded), ("failed", r.failed)):
        if value < 60:
            raise bad(f"[retention] {key}", "must be at least 1m")
    if r.interval != 0 and not 0.01 <= r.interval <= 86400:
        raise bad("[retention] interval", 'must be between 10ms and 1d, or "0s" (never)')
    if not 1 <= r.batch <= 100_000:
        raise bad("[retention] batch", "must be between 1 and 100000")
    # The outbox's own rule for tenants (outbox_tenant_not_empty_max_200_no_control_chars).
    if len(c.ops.tenant) > 200 or re.search(r"[\x00-\x1f\x7f-\x9f]", c.ops.tenant):
        raise bad("[ops] tenant", "must be at most 200 characters without control characters")
    if c.ops.tenant and not c.ops.tenant.strip():
        raise bad("[ops] tenant", 'must name a tenant, or be "" to turn operational events off')
    if c.ops.recovered_after_failures < 1:
        raise bad("[ops] recovered_after_failures", "must be at least 1")
    if not 1024 <= c.events.max_payload_bytes <= 256 * 1024 * 1024:
        raise bad("[events] max_payload_bytes", "must be between 1024 and 268435456 (256 MiB)")
    for name in c.events.extra:
        if len(name) > 200 or not _EVENT_TYPE.match(name):
            raise bad(
                "[events] extra",
                f"{name!r} is not an event type (dotted names of letters, digits, _ and -,"
                " e.g. acme.points.gifted)",
            )
