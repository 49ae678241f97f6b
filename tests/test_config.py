"""Configuration: documented defaults, the TOML file, DISPATCHER_* overrides, and clear errors."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import fields
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dispatcher.config import (
    Config,
    ConfigError,
    format_duration,
    load_config,
    parse_duration,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"
SECTIONS = {f.name: f.type for f in fields(Config)}

# The duration grammar as the docs state it: a number and a unit, with optional blanks around.
# \d also takes non-ASCII digits here because parse_duration accepts them (reported).
DURATION = re.compile(r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)\s*$")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dispatcher.toml"
    path.write_text(text, encoding="utf-8")
    return path


def section_keys(section: str) -> set[str]:
    return {f.name for f in fields(getattr(Config(), section))}


# Defaults ------------------------------------------------------------------------------------


def test_defaults_without_file_or_environment_are_the_documented_defaults() -> None:
    c = load_config(None, environ={})
    assert c == Config()
    assert c.database.dsn == "postgresql://dispatcher@localhost/loyalty"
    assert c.database.schema == "webhooks"
    assert c.delivery.concurrency == 256
    assert c.delivery.per_endpoint_concurrency == 8
    assert c.delivery.timeout == 5.0
    assert c.retry.schedule == (0, 5, 60, 300, 1800, 7200, 18000, 36000, 36000)
    assert c.retry.jitter == 0.2
    assert c.disable.after_failures == 20
    assert c.disable.after == 24 * 3600
    assert c.security.allow_http is False
    assert c.security.allow_private_networks is False
    assert c.http.listen == "127.0.0.1:9464"
    assert c.log.format == "json"
    assert c.log.level == "info"


def test_dispatcher_variables_that_name_no_section_are_not_taken_as_keys() -> None:
    # DISPATCHER_CONFIG names the file itself; it must not be read as a [config] section.
    env = {"DISPATCHER_CONFIG": "/etc/dispatcher.toml", "PATH": "/usr/bin"}
    assert load_config(None, environ=env) == Config()


# The file --------------------------------------------------------------------------------------


def test_a_toml_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[database]
dsn = "postgresql://app@db.internal/loyalty"
schema = "hooks_v2"
pool_size = 4
connect_timeout = "3s"

[delivery]
concurrency = 64
per_endpoint_concurrency = 2
timeout = "250ms"
lease = "2m"

[retry]
schedule = ["0s", "10s", "2h"]
jitter = 0.1

[disable]
after_failures = 5
after = "1d"

[security]
allow_http = true
allow_private_networks = true

[http]
listen = ""

[log]
format = "console"
level = "debug"
""",
    )
    c = load_config(path, environ={})
    assert c.database.dsn == "postgresql://app@db.internal/loyalty"
    assert c.database.schema == "hooks_v2"
    assert c.database.pool_size == 4
    assert c.database.connect_timeout == 3.0
    assert c.delivery.concurrency == 64
    assert c.delivery.per_endpoint_concurrency == 2
    assert c.delivery.timeout == 0.25
    assert c.delivery.lease == 120.0
    assert c.retry.schedule == (0.0, 10.0, 7200.0)
    assert c.retry.jitter == 0.1
    assert c.disable.after_failures == 5
    assert c.disable.after == 86400.0
    assert c.security.allow_http is True
    assert c.security.allow_private_networks is True
    assert c.http.listen == ""
    assert c.log.format == "console"
    assert c.log.level == "debug"
    # Keys the file does not mention keep their defaults.
    assert c.delivery.batch_size == Config().delivery.batch_size


def test_a_path_given_as_str_or_path_is_read_the_same(tmp_path: Path) -> None:
    path = write(tmp_path, '[log]\nlevel = "warning"\n')
    assert load_config(str(path), environ={}) == load_config(path, environ={})
    assert load_config(path, environ={}).log.level == "warning"


# Environment overrides -------------------------------------------------------------------------


def test_environment_variables_override_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[database]\nschema = "from_file"\n[delivery]\ntimeout = "5s"\nconcurrency = 10\n'
        "[security]\nallow_http = true\n",
    )
    env = {
        "DISPATCHER_DATABASE_SCHEMA": "from_env",
        "DISPATCHER_DELIVERY_TIMEOUT": "250ms",
        "DISPATCHER_DELIVERY_CONCURRENCY": "512",
        "DISPATCHER_SECURITY_ALLOW_HTTP": "false",
    }
    c = load_config(path, environ=env)
    assert c.database.schema == "from_env"
    assert c.delivery.timeout == 0.25
    assert c.delivery.concurrency == 512
    assert c.security.allow_http is False


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("30m", 1800.0), ("2h", 7200.0), ("1d", 86400.0)],
)
def test_duration_environment_values_take_every_unit(text: str, seconds: float) -> None:
    env = {"DISPATCHER_DISABLE_AFTER": text, "DISPATCHER_DELIVERY_SHUTDOWN_GRACE": text}
    c = load_config(None, environ=env)
    assert c.disable.after == seconds
    assert c.delivery.shutdown_grace == seconds


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
    ],
)
def test_boolean_environment_values_accept_the_usual_spellings(text: str, value: bool) -> None:
    c = load_config(None, environ={"DISPATCHER_SECURITY_ALLOW_PRIVATE_NETWORKS": text})
    assert c.security.allow_private_networks is value


def test_integer_and_float_environment_values_are_converted() -> None:
    env = {
        "DISPATCHER_DATABASE_POOL_SIZE": "12",
        "DISPATCHER_DISABLE_AFTER_FAILURES": "3",
        "DISPATCHER_RETRY_JITTER": "0.5",
    }
    c = load_config(None, environ=env)
    assert c.database.pool_size == 12
    assert c.disable.after_failures == 3
    assert c.retry.jitter == 0.5


def test_retry_schedule_from_the_environment_is_comma_separated(tmp_path: Path) -> None:
    path = write(tmp_path, '[retry]\nschedule = ["1s", "2s"]\n')
    env = {"DISPATCHER_RETRY_SCHEDULE": "0s, 250ms,1m ,2h"}
    assert load_config(path, environ=env).retry.schedule == (0.0, 0.25, 60.0, 7200.0)


def test_an_empty_environment_value_turns_the_http_listener_off() -> None:
    assert load_config(None, environ={"DISPATCHER_HTTP_LISTEN": ""}).http.listen == ""


# Errors ----------------------------------------------------------------------------------------

FILE = "<file>"  # stands for the config file's path in the expectations below


@pytest.mark.parametrize(
    ("toml", "env", "key", "source"),
    [
        pytest.param('[databse]\ndsn = "x"\n', {}, "[databse]", FILE, id="unknown-section"),
        pytest.param("[database]\nport = 5432\n", {}, "port", FILE, id="unknown-key-in-file"),
        pytest.param(
            None,
            {"DISPATCHER_DATABASE_PORT": "5432"},
            "port",
            "DISPATCHER_DATABASE_PORT",
            id="unknown-key-in-env",
        ),
        pytest.param(
            '[delivery]\ntimeout = "5 seconds"\n', {}, "timeout", FILE, id="bad-duration-in-file"
        ),
        pytest.param(
            None,
            {"DISPATCHER_DELIVERY_TIMEOUT": "5"},
            "timeout",
            "DISPATCHER_DELIVERY_TIMEOUT",
            id="duration-without-unit-in-env",
        ),
        pytest.param(
            None,
            {"DISPATCHER_RETRY_SCHEDULE": "0s,5x"},
            "schedule",
            "DISPATCHER_RETRY_SCHEDULE",
            id="bad-schedule-entry-in-env",
        ),
        pytest.param("[retry]\nschedule = []\n", {}, "schedule", FILE, id="empty-schedule"),
        pytest.param(
            '[delivery]\nconcurrency = "many"\n', {}, "concurrency", FILE, id="string-for-int"
        ),
        pytest.param(
            "[delivery]\nconcurrency = 1.5\n", {}, "concurrency", FILE, id="float-for-int"
        ),
        pytest.param("[security]\nallow_http = 1\n", {}, "allow_http", FILE, id="int-for-bool"),
        pytest.param("[delivery]\ntimeout = true\n", {}, "timeout", FILE, id="bool-for-duration"),
        pytest.param("[database]\ndsn = 5\n", {}, "dsn", FILE, id="int-for-string"),
        pytest.param('database = "x"\n', {}, "[database]", FILE, id="section-not-a-table"),
        pytest.param(
            None,
            {"DISPATCHER_SECURITY_ALLOW_HTTP": "maybe"},
            "allow_http",
            "DISPATCHER_SECURITY_ALLOW_HTTP",
            id="bad-bool-in-env",
        ),
        pytest.param(
            None,
            {"DISPATCHER_DELIVERY_CONCURRENCY": "lots"},
            "concurrency",
            "DISPATCHER_DELIVERY_CONCURRENCY",
            id="bad-int-in-env",
        ),
        pytest.param(
            None,
            {"DISPATCHER_RETRY_JITTER": "a bit"},
            "jitter",
            "DISPATCHER_RETRY_JITTER",
            id="bad-float-in-env",
        ),
    ],
)
def test_a_bad_key_or_value_is_a_config_error_naming_the_key_and_its_source(
    tmp_path: Path, toml: str | None, env: dict[str, str], key: str, source: str
) -> None:
    path = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    message = str(info.value)
    assert key in message
    assert (str(path) if source == FILE else source) in message
    assert "\n" not in message


def test_a_missing_file_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


def test_a_file_that_cannot_be_read_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as info:
        load_config(tmp_path, environ={})  # a directory
    assert str(tmp_path) in str(info.value)


def test_invalid_toml_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[database\ndsn = \n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)


# Values that convert but do not make a working configuration.
INVALID_SETTINGS: list[Any] = [
    pytest.param('[delivery]\ntimeout = "5s"\nlease = "9s"\n', {}, "lease", id="lease-lt-2x"),
    pytest.param(None, {"DISPATCHER_DATABASE_SCHEMA": 'web"hooks'}, "schema", id="schema-quote"),
    pytest.param(None, {"DISPATCHER_DATABASE_SCHEMA": "Webhooks"}, "schema", id="schema-upper"),
    pytest.param(None, {"DISPATCHER_DATABASE_SCHEMA": "1hooks"}, "schema", id="schema-digit"),
    pytest.param(None, {"DISPATCHER_DATABASE_SCHEMA": ""}, "schema", id="schema-empty"),
    pytest.param(None, {"DISPATCHER_DATABASE_SCHEMA": "a" * 64}, "schema", id="schema-64-chars"),
    pytest.param(None, {"DISPATCHER_DATABASE_DSN": "mysql://x/y"}, "dsn", id="dsn-not-pg"),
    pytest.param('[log]\nlevel = "loud"\n', {}, "level", id="log-level"),
    pytest.param(
        '[log]\nsummary_interval = "2h"\n', {}, "summary_interval", id="summary-interval-2h"
    ),
    pytest.param(None, {"DISPATCHER_HTTP_MAX_LAG": "500ms"}, "max_lag", id="max-lag-500ms"),
]


@pytest.mark.parametrize(("toml", "env", "key"), INVALID_SETTINGS)
def test_an_unworkable_setting_is_a_config_error_naming_the_key(
    tmp_path: Path, toml: str | None, env: dict[str, str], key: str
) -> None:
    path = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert key in str(info.value)


@pytest.mark.parametrize(("toml", "env", "key"), INVALID_SETTINGS)
def test_an_unworkable_setting_is_a_config_error_naming_its_source(
    tmp_path: Path, toml: str | None, env: dict[str, str], key: str
) -> None:
    path = write(tmp_path, toml) if toml is not None else None
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert (str(path) if path is not None else next(iter(env))) in str(info.value)


def test_a_lease_of_exactly_twice_the_timeout_is_accepted() -> None:
    env = {"DISPATCHER_DELIVERY_TIMEOUT": "5s", "DISPATCHER_DELIVERY_LEASE": "10s"}
    assert load_config(None, environ=env).delivery.lease == 10.0


def test_a_lease_shorter_than_twice_the_timeout_is_refused() -> None:
    env = {"DISPATCHER_DELIVERY_TIMEOUT": "5s", "DISPATCHER_DELIVERY_LEASE": "9s"}
    with pytest.raises(ConfigError, match="lease"):
        load_config(None, environ=env)


def test_a_lease_too_short_for_a_timeout_from_the_environment_names_that_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, environ={"DISPATCHER_DELIVERY_TIMEOUT": "40s"})
    assert "DISPATCHER_DELIVERY_TIMEOUT" in str(info.value)


@pytest.mark.parametrize(
    "toml",
    [
        "[delivery]\nshutdown_grace = -5\n",
        "[database]\nconnect_timeout = -1\n",
        "[retry]\nretry_after_max = -1\n",
        "[disable]\nafter = -10\n",
    ],
    ids=["shutdown_grace", "connect_timeout", "retry_after_max", "disable-after"],
)
def test_a_negative_duration_in_the_file_is_refused(tmp_path: Path, toml: str) -> None:
    with pytest.raises(ConfigError):
        load_config(write(tmp_path, toml), environ={})


# config.example.toml ---------------------------------------------------------------------------


def example_file() -> Path:
    if not EXAMPLE.exists():
        pytest.skip("config.example.toml is not written yet")
    return EXAMPLE


def test_config_example_loads_and_states_exactly_the_defaults() -> None:
    assert load_config(example_file(), environ={}) == Config()


def test_config_example_documents_every_key_of_every_section() -> None:
    with example_file().open("rb") as fh:
        data = tomllib.load(fh)
    assert set(data) == set(SECTIONS)
    for section, values in data.items():
        assert set(values) == section_keys(section), f"[{section}]"


# Durations -------------------------------------------------------------------------------------


TEN_YEARS_MS = 10 * 365 * 86400 * 1000


@given(st.integers(min_value=0, max_value=TEN_YEARS_MS))
@example(9)
def test_format_then_parse_duration_round_trips_whole_milliseconds(ms: int) -> None:
    seconds = ms / 1000
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=TEN_YEARS_MS))
def test_format_duration_output_is_always_a_valid_duration(ms: int) -> None:
    text = format_duration(ms / 1000)
    assert DURATION.match(text), text


NEAR_MISSES = st.from_regex(r"\A[ +-]?[0-9]{0,4}([.,][0-9]{0,3})?[ ]?[a-zA-Zµ]{0,4}[ ]?\Z")


def _seconds(text: str) -> Decimal:
    """A well-formed duration's length, computed independently of parse_duration."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", text)
    assert m is not None, text
    scale = {"ms": "0.001", "s": "1", "m": "60", "h": "3600", "d": "86400"}[m.group(2)]
    return Decimal(m.group(1)) * Decimal(scale)


@given(st.one_of(st.text(), NEAR_MISSES))
@example("")
@example("5")
@example("-5s")
@example("5 sec")
@example("5S")
@example(".5s")
@example("5.s")
@example("1e3s")
@example("5s5s")
def test_parse_duration_refuses_a_non_duration_with_value_error_only(text: str) -> None:
    if DURATION.match(text):
        if _seconds(text) > 10 * 366 * 86400:
            with pytest.raises(ValueError, match="longer than ten years"):
                parse_duration(text)
        else:
            assert parse_duration(text) >= 0
        return
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + "s", "4000d"])
def test_parse_duration_refuses_a_duration_too_large_to_use(text: str) -> None:
    with pytest.raises(ValueError, match=text[:4]):
        parse_duration(text)


def test_max_lag_zero_turns_the_lag_check_off_and_the_bounds_are_named() -> None:
    c = load_config(None, environ={"DISPATCHER_HTTP_MAX_LAG": "0s"})
    assert c.http.max_lag == 0
    with pytest.raises(ConfigError, match=r'\[http\] max_lag: must be at least 1s, or "0s"'):
        load_config(None, environ={"DISPATCHER_HTTP_MAX_LAG": "0.5s"})
    with pytest.raises(ConfigError, match=r"\[log\] summary_interval: must be between 10ms and 1h"):
        load_config(None, environ={"DISPATCHER_LOG_SUMMARY_INTERVAL": "0s"})


def test_a_user_agent_that_could_split_a_request_is_refused() -> None:
    ok = load_config(None, environ={"DISPATCHER_DELIVERY_USER_AGENT": "acme-loyalty/2.1"})
    assert ok.delivery.user_agent == "acme-loyalty/2.1"
    for bad in ("acme\r\nX-Forged: 1", "x" * 201):
        with pytest.raises(
            ConfigError, match=r"\[delivery\] user_agent: must be at most 200 printable ASCII"
        ):
            load_config(None, environ={"DISPATCHER_DELIVERY_USER_AGENT": bad})


# Arbitrary input -------------------------------------------------------------------------------

_KNOWN_KEYS = sorted({(s, f.name) for s in SECTIONS for f in fields(getattr(Config(), s))})
_SCALARS = (
    st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["5s", "0s", "1h", "-1s", "250ms", "", "json", "true", "1e9d", "."])
)
_TOML_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


def _toml(value: Any) -> str:
    """A TOML literal for a value (strings via JSON escapes, which TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if value != value
            else ("inf" if value > 0 else "-inf")
            if abs(value) == float("inf")
            else repr(value)
        )
    if isinstance(value, int | str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


_ENTRIES = st.one_of(
    st.sampled_from(_KNOWN_KEYS),
    st.tuples(st.sampled_from(sorted(SECTIONS)), st.text(max_size=10)),
    st.tuples(st.text(max_size=10), st.text(max_size=10)),
)


@settings(max_examples=100, deadline=None)
@given(
    entries=st.lists(st.tuples(_ENTRIES, _TOML_VALUES), max_size=6),
    env=st.lists(st.tuples(st.sampled_from(_KNOWN_KEYS), st.text(max_size=20)), max_size=3),
    garbage=st.one_of(st.just(b""), st.text(max_size=40).map(str.encode), st.binary(max_size=8)),
)
def test_any_toml_or_environment_gives_a_config_or_a_config_error_and_nothing_else(
    tmp_path_factory: pytest.TempPathFactory,
    entries: list[tuple[tuple[str, str], Any]],
    env: list[tuple[tuple[str, str], str]],
    garbage: bytes,
) -> None:
    tables: dict[str, dict[str, Any]] = {}
    for (section, key), value in entries:
        tables.setdefault(section, {})[key] = value
    text = "".join(
        f"[{json.dumps(section)}]\n"
        + "".join(f"{json.dumps(k)} = {_toml(v)}\n" for k, v in keys.items())
        for section, keys in tables.items()
    )
    path = tmp_path_factory.mktemp("fuzz") / "dispatcher.toml"
    path.write_bytes(text.encode() + garbage)
    environ = {
        f"DISPATCHER_{section.upper()}_{key.upper()}": value.replace("\x00", "")
        for (section, key), value in env
    }
    try:
        config = load_config(path, environ=environ)
    except ConfigError:
        return  # the only exception allowed
    assert isinstance(config, Config)


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.toml"
    path.write_bytes(b'[log]\nlevel = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)
