"""Endpoint secrets at rest: encrypted under a configured key, decrypted only in memory,
re-encrypted by `endpoint reencrypt-secrets`; a missing or wrong key is one clear line."""

from __future__ import annotations

import base64
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import standardwebhooks
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.config import Config, ConfigError, load_config
from dispatcher.secretbox import PREFIX, SecretBox, SecretKeyError, generate_key, key_id, read_key
from dispatcher.signing import fingerprint, generate_secret
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import URL, assert_one_error_line, cli, db_env

Daemons = Callable[..., Awaitable[RunningDaemon]]


def key_file(tmp_path: Path, name: str = "secrets.key") -> Path:
    path = tmp_path / name
    path.write_text(generate_key() + "\n")
    return path


def with_key(config: Config, path: Path, *old: Path) -> Config:
    security = replace(
        config.security,
        secrets_key_file=str(path),
        old_secrets_key_files=tuple(str(p) for p in old),
    )
    return replace(config, security=security)


# The box -----------------------------------------------------------------------------------------


KEY_A, KEY_B = os.urandom(32), os.urandom(32)


@settings(max_examples=60, deadline=None)
@given(
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=600).filter(
        lambda s: not s.startswith(PREFIX)
    )
)
def test_a_sealed_secret_opens_to_itself_and_never_shows_it(secret: str) -> None:
    box = SecretBox(KEY_A)
    sealed = box.seal(secret)
    assert sealed.startswith(f"{PREFIX}{key_id(KEY_A)}:")
    assert len(sealed) >= 16  # endpoints_secret_not_empty still holds
    assert secret not in sealed or len(secret) < 4
    assert box.open(sealed) == secret
    assert box.seal(secret) != sealed  # a fresh nonce each time
    assert SecretBox(KEY_B, [KEY_A]).open(sealed) == secret


def test_plaintext_passes_through_and_reseal_moves_values_to_the_current_key() -> None:
    secret = generate_secret("standard")
    old_box, new_box = SecretBox(KEY_A), SecretBox(KEY_B, [KEY_A])
    assert old_box.open(secret) == secret
    sealed = old_box.seal(secret)
    assert not new_box.is_current(sealed)
    moved = new_box.reseal(sealed)
    assert moved.startswith(f"{PREFIX}{key_id(KEY_B)}:")
    assert new_box.is_current(moved)
    assert new_box.reseal(moved) == moved
    assert SecretBox(KEY_B).open(moved) == secret
    # No current key: reseal decrypts (with the old keys) back to plaintext.
    assert SecretBox(None, [KEY_B]).reseal(moved) == secret
    assert SecretBox().seal(secret) == secret


def test_a_wrong_missing_or_altered_key_is_a_clear_error_without_the_secret_or_key() -> None:
    secret = "plain-secret-0123456789"
    sealed = SecretBox(KEY_A).seal(secret)
    kid = key_id(KEY_A)
    cases = [
        (SecretBox(KEY_B), sealed, "neither the current key"),
        (SecretBox(), sealed, "no key is configured"),
        (
            SecretBox(KEY_A),
            sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB"),
            "altered",
        ),
        (SecretBox(KEY_A), f"{PREFIX}{kid}", "malformed"),
    ]
    for box, stored, fragment in cases:
        with pytest.raises(SecretKeyError, match=fragment) as info:
            box.open(stored)
        message = str(info.value)
        assert secret not in message
        assert "\n" not in message
        for key in (KEY_A, KEY_B):
            assert base64.b64encode(key).decode() not in message
    with pytest.raises(SecretKeyError, match="must not start"):
        SecretBox(KEY_A).seal(sealed)


def test_read_key_takes_base64_of_32_bytes_and_says_what_is_wrong_otherwise(
    tmp_path: Path,
) -> None:
    key = os.urandom(32)
    for text in (base64.b64encode(key).decode(), base64.urlsafe_b64encode(key).decode()):
        (tmp_path / "k").write_text(text + "\n")
        assert read_key(str(tmp_path / "k")) == key
    for content, fragment in [
        (base64.b64encode(os.urandom(16)), "32 random bytes"),
        (b"not base64 at all!", "base64"),
        (b"\xff\xfe", "base64"),
    ]:
        (tmp_path / "k").write_bytes(content)
        with pytest.raises(ValueError, match=fragment) as info:
            read_key(str(tmp_path / "k"))
        assert content.decode("latin-1") not in str(info.value)


# Configuration ---------------------------------------------------------------------------------


def test_the_key_files_come_from_the_config_or_the_systemd_credential(tmp_path: Path) -> None:
    path = key_file(tmp_path)
    old = key_file(tmp_path, "old.key")
    env = {
        "DISPATCHER_SECURITY_SECRETS_KEY_FILE": str(path),
        "DISPATCHER_SECURITY_OLD_SECRETS_KEY_FILES": f"{old}, ",
    }
    sec = load_config(None, environ=env).security
    assert (sec.secrets_key_file, sec.old_secrets_key_files) == (str(path), (str(old),))
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secrets-key").write_text(generate_key())
    sec = load_config(None, environ={"CREDENTIALS_DIRECTORY": str(creds)}).security
    assert sec.secrets_key_file == str(creds / "secrets-key")
    assert load_config(None, environ={}).security.secrets_key_file == ""


@pytest.mark.parametrize("content", [None, b"short", b"\x00" * 32])
def test_a_key_file_that_is_missing_or_holds_no_key_is_a_config_error(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "secrets.key"
    if content is not None:
        path.write_bytes(content)
    env = {"DISPATCHER_SECURITY_SECRETS_KEY_FILE": str(path)}
    with pytest.raises(ConfigError) as info:
        load_config(None, environ=env)
    message = str(info.value)
    assert "secrets_key_file" in message
    assert str(path) in message
    assert "DISPATCHER_SECURITY_SECRETS_KEY_FILE" in message


# The CLI and the daemon ------------------------------------------------------------------------


async def test_with_a_key_set_secrets_are_stored_encrypted_and_deliveries_still_verify(
    db: Db, tmp_path: Path, receiver: Receiver, daemon_factory: Daemons
) -> None:
    path = key_file(tmp_path)
    env = db_env(db, DISPATCHER_SECURITY_SECRETS_KEY_FILE=str(path))
    added = (
        await cli("endpoint", "add", "--tenant", "shop-1", "--url", URL, "--json", env=env)
    ).json()
    secret = added["secret"]
    stored = await db.conn.fetchval("SELECT secret FROM endpoints WHERE id = $1", added["id"])
    assert stored.startswith(f"{PREFIX}{key_id(read_key(str(path)))}:")
    assert secret not in stored
    listed = (await cli("endpoint", "list", "--json", env=env)).json()
    assert listed[0]["secret_fingerprint"] == fingerprint(secret)
    # The daemon decrypts in memory and signs with the plaintext secret.
    await db.conn.execute("UPDATE endpoints SET url = $1 WHERE id = $2", receiver.url, added["id"])
    await daemon_factory(with_key(db.config, path))
    [event] = await db.insert_events(1)
    await wait_until(lambda: receiver.requests, message="a delivery")
    request = receiver.requests[0]
    standardwebhooks.Webhook(secret).verify(request.body, request.headers, json_parse=False)
    assert request.headers["webhook-id"] == event
    # A rotation stores the new secret encrypted; the old one stays valid, as stored.
    rotated = (await cli("endpoint", "rotate-secret", str(added["id"]), "--json", env=env)).json()
    row = await db.row("SELECT secret, old_secret FROM endpoints WHERE id = $1", added["id"])
    assert row["secret"].startswith(PREFIX)
    assert rotated["secret"] not in row["secret"]
    assert row["old_secret"] == stored
    shown = (await cli("endpoint", "show", str(added["id"]), "--json", env=env)).json()
    assert shown["secret_fingerprint"] == fingerprint(rotated["secret"])
    assert shown["old_secret_fingerprint"] == fingerprint(secret)


async def test_reencrypt_converts_plaintext_rows_and_rotates_from_an_old_key(
    db: Db, tmp_path: Path
) -> None:
    old_key, new_key = key_file(tmp_path, "old.key"), key_file(tmp_path, "new.key")
    plain_id, plain = await db.add_endpoint(URL)
    old_box = SecretBox(read_key(str(old_key)))
    sealed_secret = generate_secret("standard")
    sealed_id, _ = await db.add_endpoint(URL, secret=old_box.seal(sealed_secret))
    env = db_env(db, DISPATCHER_SECURITY_SECRETS_KEY_FILE=str(old_key))
    first = (await cli("endpoint", "reencrypt-secrets", "--json", env=env)).json()
    assert first == {"endpoints": 2, "changed": 1, "key_id": key_id(read_key(str(old_key)))}
    # Rotation: the new key current, the old one still readable.
    env = db_env(
        db,
        DISPATCHER_SECURITY_SECRETS_KEY_FILE=str(new_key),
        DISPATCHER_SECURITY_OLD_SECRETS_KEY_FILES=str(old_key),
    )
    run = await cli("endpoint", "reencrypt-secrets", "--batch", "1", env=env)
    assert run.rc == 0, run
    assert run.out.startswith("2 of 2 endpoints changed")
    again = await cli("endpoint", "reencrypt-secrets", "--json", env=env)
    assert again.json()["changed"] == 0
    new_box = SecretBox(read_key(str(new_key)))
    rows = {r["id"]: r["secret"] for r in await db.conn.fetch("SELECT id, secret FROM endpoints")}
    assert all(new_box.is_current(v) for v in rows.values())
    assert new_box.open(rows[plain_id]) == plain
    assert new_box.open(rows[sealed_id]) == sealed_secret
    for text in (plain, sealed_secret):
        assert text not in run.out + run.err


async def test_a_wrong_or_missing_key_is_one_clear_error_line(
    db: Db, tmp_path: Path, receiver: Receiver
) -> None:
    right, wrong = key_file(tmp_path, "right.key"), key_file(tmp_path, "wrong.key")
    secret = generate_secret("standard")
    eid, _ = await db.add_endpoint(
        receiver.url, secret=SecretBox(read_key(str(right))).seal(secret)
    )
    env = db_env(db, DISPATCHER_SECURITY_SECRETS_KEY_FILE=str(wrong))
    run = await cli("endpoint", "reencrypt-secrets", env=env)
    line = assert_one_error_line(
        run,
        f"endpoint {eid}",
        "neither the current key",
        absent=(secret, wrong.read_text().strip()),
    )
    assert right.read_text().strip() not in line
    # The row is left as it was.
    assert (
        SecretBox(read_key(str(right))).open(
            await db.conn.fetchval("SELECT secret FROM endpoints WHERE id = $1", eid)
        )
        == secret
    )
    # `endpoint test` cannot sign: it says why, sends nothing, and records the failure.
    test = await cli("endpoint", "test", str(eid), env=env)
    assert test.rc == 1, test
    assert "secret unusable" in test.out
    assert not receiver.requests
    # A key file that is not there.
    gone = db_env(db, DISPATCHER_SECURITY_SECRETS_KEY_FILE=str(tmp_path / "nope.key"))
    assert_one_error_line(await cli("endpoint", "list", env=gone), "nope.key", "cannot be read")


async def test_the_daemon_with_a_wrong_key_parks_that_endpoints_deliveries_with_a_reason(
    db: Db, tmp_path: Path, receiver: Receiver, daemon_factory: Daemons
) -> None:
    right, wrong = key_file(tmp_path, "right.key"), key_file(tmp_path, "wrong.key")
    sealed = SecretBox(read_key(str(right))).seal(generate_secret("standard"))
    bad, _ = await db.add_endpoint(receiver.url, tenant="shop-2", secret=sealed)
    good, _ = await db.add_endpoint(receiver.url, tenant="shop-1")
    await daemon_factory(with_key(db.config, wrong))
    await db.insert_events(1, tenant="shop-2")
    await db.insert_events(2, tenant="shop-1")
    await wait_until(lambda: len(receiver.requests) == 2, message="the good endpoint's events")
    await wait_until(
        lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'failed'"),
        message="the bad endpoint's delivery failed",
    )
    error = await db.conn.fetchval("SELECT last_error FROM deliveries WHERE endpoint_id = $1", bad)
    assert "secret unusable" in error
    assert "neither the current key" in error
    assert sealed not in error
    assert good != bad
