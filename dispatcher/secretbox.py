"""Endpoint secrets at rest: AES-256-GCM under a key from a file or a systemd credential.

A stored value is either a plaintext secret (written before a key was set, or by SQL) or
`enc:v1:<key id>:<token>`, where the key id names the key that sealed it (a hash of the key,
not the key) and the token is base64url of a 96-bit nonce and the ciphertext with its tag. So
plaintext rows and rows under a rotated-out key are recognised, and `endpoint
reencrypt-secrets` moves them all under the current key. Secrets are decrypted only in memory;
no message here ever quotes a secret or a key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from .config import SecurityConfig

PREFIX = "enc:v1:"
# The systemd credential (LoadCredential=secrets-key:...) read when secrets_key_file is unset.
CREDENTIAL_NAME = "secrets-key"
_KEY_BYTES = 32
_NONCE_BYTES = 12
# Binds every token to its purpose: a token cannot be replayed as some other kind of value.
_AAD = b"loyalty-webhook-dispatcher:endpoint-secret:v1"


class SecretKeyError(Exception):
    """A key that cannot be used, or a stored secret that cannot be decrypted; one line."""


def read_key(path: str) -> bytes:
    """The 32-byte key a key file holds as base64 (standard or URL-safe) on one line, e.g.
    from `openssl rand -base64 32`. ValueError says what is wrong without quoting it."""
    try:
        text = Path(path).read_text("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError("does not hold a base64 key (not ASCII text)") from None
    try:
        key = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        raise ValueError("does not hold a base64 key") from None
    if len(key) != _KEY_BYTES:
        raise ValueError(f"must hold {_KEY_BYTES} random bytes in base64, got {len(key)} bytes")
    return key


def generate_key() -> str:
    """A new key in the key-file format."""
    return base64.b64encode(os.urandom(_KEY_BYTES)).decode("ascii")


def key_id(key: bytes) -> str:
    """A short public name for a key: a hash, from which the key cannot be found."""
    return hashlib.sha256(b"dispatcher-secret-key-id:" + key).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class _Key:
    id: str
    aead: AESGCM


def _key(material: bytes) -> _Key:
    return _Key(key_id(material), AESGCM(material))


class SecretBox:
    """Seals new secrets under the current key (none: stored as given) and opens values sealed
    under the current key or any old one; plaintext values pass through."""

    def __init__(self, current: bytes | None = None, old: Sequence[bytes] = ()) -> None:
        self.current = None if current is None else _key(current)
        self._keys = {k.id: k for k in (_key(m) for m in old)}
        if self.current is not None:
            self._keys[self.current.id] = self.current

    @classmethod
    def from_files(cls, current: str, old: Sequence[str] = ()) -> SecretBox:
        """The box for key files (current "" means none); SecretKeyError names a bad file."""

        def load(path: str, what: str) -> bytes:
            try:
                return read_key(path)
            except OSError as exc:
                raise SecretKeyError(f"{what} {path} cannot be read: {exc.strerror}") from None
            except ValueError as exc:
                raise SecretKeyError(f"{what} {path} {exc}") from None

        return cls(
            load(current, "secrets key file") if current else None,
            [load(p, "old secrets key file") for p in old],
        )

    @property
    def enabled(self) -> bool:
        return self.current is not None

    def seal(self, secret: str) -> str:
        """The value to store for `secret`: encrypted under the current key, if one is set."""
        if secret.startswith(PREFIX):
            raise SecretKeyError(f"a secret must not start with {PREFIX!r}")
        if self.current is None:
            return secret
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self.current.aead.encrypt(nonce, secret.encode("utf-8"), _AAD)
        token = base64.urlsafe_b64encode(nonce + sealed).decode("ascii").rstrip("=")
        return f"{PREFIX}{self.current.id}:{token}"

    def open(self, stored: str) -> str:
        """The secret a stored value holds; SecretKeyError if its key is not configured or it
        does not decrypt (another key under the same id is not possible; an altered value is)."""
        if not stored.startswith(PREFIX):
            return stored
        kid, sep, token = stored[len(PREFIX) :].partition(":")
        if not sep:
            raise SecretKeyError("an encrypted secret is malformed (no key id)")
        key = self._keys.get(kid)
        if key is None:
            if not self._keys:
                raise SecretKeyError(
                    f"a secret is encrypted (key {kid}) but no key is configured: set"
                    " [security] secrets_key_file or the systemd credential secrets-key"
                )
            raise SecretKeyError(
                f"a secret is encrypted with key {kid}, which is neither the current key nor"
                " one of [security] old_secrets_key_files"
            )
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            return key.aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD).decode()
        except (binascii.Error, ValueError, InvalidTag):
            raise SecretKeyError(
                f"a secret encrypted with key {kid} does not decrypt: the value was altered"
            ) from None

    def is_current(self, stored: str) -> bool:
        """Whether `stored` is already as `seal` would store it (under the current key, or
        plaintext when no key is set), so re-encrypting would change nothing."""
        if self.current is None:
            return not stored.startswith(PREFIX)
        return stored.startswith(f"{PREFIX}{self.current.id}:")

    def reseal(self, stored: str) -> str:
        """`stored` under the current key (opened first if sealed under another)."""
        return stored if self.is_current(stored) else self.seal(self.open(stored))


def box_for(security: SecurityConfig) -> SecretBox:
    """The box for the configured key files ([security] secrets_key_file and
    old_secrets_key_files; load_config has filled in the systemd credential)."""
    return SecretBox.from_files(security.secrets_key_file, security.old_secrets_key_files)
