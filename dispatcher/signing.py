"""Webhook signatures for every signing profile in SPEC section 2.2; pure and synchronous."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import re
import secrets as _secrets
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PROFILES",
    "SigningError",
    "SigningProfile",
    "fingerprint",
    "generate_secret",
    "sign",
    "validate_secret",
]

PROFILES = ("standard", "stripe", "github", "shopify", "hmac")

ALGORITHMS = ("sha1", "sha256", "sha512")
ENCODINGS = ("hex", "base64")
SIGNED_PARTS = ("body", "timestamp.body")

_STANDARD_PREFIX = "whsec_"
_STANDARD_HEADERS = frozenset({"webhook-id", "webhook-timestamp", "webhook-signature"})
_DEFAULT_HEADER = {
    "stripe": "Stripe-Signature",
    "github": "X-Hub-Signature-256",
    "shopify": "X-Shopify-Hmac-Sha256",
    "hmac": "X-Webhook-Signature",
}
# Headers the transport itself owns; a signature written there would corrupt the request.
_FORBIDDEN_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection"}
)
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SigningError(ValueError):
    """A signing profile, secret or input that cannot produce a valid signature."""


@dataclass(frozen=True, slots=True)
class SigningProfile:
    """How one endpoint's requests are signed; fields other than kind/header are hmac-only."""

    kind: str = "standard"
    header: str | None = None
    algorithm: str = "sha256"
    encoding: str = "hex"
    signed: str = "body"
    prefix: str = ""
    timestamp_header: str | None = None

    def validate(self) -> None:
        """Raise SigningError naming the first bad value or combination."""
        if self.kind not in PROFILES:
            raise SigningError(
                f"unknown signing profile {self.kind!r}; expected one of {', '.join(PROFILES)}"
            )
        if self.header is not None:
            if self.kind == "standard":
                raise SigningError(
                    "the standard profile's headers are fixed (webhook-id, webhook-timestamp, "
                    "webhook-signature); header must not be set"
                )
            _check_header_name("header", self.header)
        if self.kind != "hmac":
            # Silently ignoring these would sign differently from what the operator asked for.
            defaults = SigningProfile()
            for name in ("algorithm", "encoding", "signed", "prefix", "timestamp_header"):
                if getattr(self, name) != getattr(defaults, name):
                    raise SigningError(
                        f"{name} applies only to the hmac profile, not to {self.kind!r}"
                    )
            return
        if self.algorithm not in ALGORITHMS:
            raise SigningError(
                f"unknown algorithm {self.algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
            )
        if self.encoding not in ENCODINGS:
            raise SigningError(
                f"unknown encoding {self.encoding!r}; expected one of {', '.join(ENCODINGS)}"
            )
        if self.signed not in SIGNED_PARTS:
            raise SigningError(
                f"unknown signed part {self.signed!r}; expected one of {', '.join(SIGNED_PARTS)}"
            )
        if not _PRINTABLE_ASCII.fullmatch(self.prefix):
            raise SigningError(
                f"prefix {self.prefix!r} must be printable ASCII (no CR, LF or control characters)"
            )
        if self.timestamp_header is not None:
            _check_header_name("timestamp_header", self.timestamp_header)
            if self.timestamp_header.lower() == self._header().lower():
                raise SigningError(
                    f"timestamp_header {self.timestamp_header!r} must differ from the "
                    "signature header"
                )
        elif self.signed == "timestamp.body":
            # Without the timestamp on the wire a receiver cannot rebuild the signed bytes.
            raise SigningError("signed='timestamp.body' requires timestamp_header to be set")

    def signature_header_names(self) -> frozenset[str]:
        """Lower-cased names of every header sign() sets, so custom headers cannot replace them."""
        if self.kind == "standard":
            return _STANDARD_HEADERS
        names = {self._header().lower()}
        if self.kind == "hmac" and self.timestamp_header is not None:
            names.add(self.timestamp_header.lower())
        return frozenset(names)

    def _header(self) -> str:
        if self.header is not None:
            return self.header
        try:
            return _DEFAULT_HEADER[self.kind]
        except KeyError:
            raise SigningError(f"unknown signing profile {self.kind!r}") from None


def sign(
    profile: SigningProfile,
    secrets: Sequence[str],
    event_id: str,
    timestamp: int,
    body: bytes,
) -> dict[str, str]:
    """Headers that carry the signature(s) for one attempt.

    `profile` must have passed validate(). `secrets` are all currently valid secrets, newest
    first. standard and stripe carry one signature per secret; github and shopify have no
    multi-signature form and sign with the newest only; hmac joins one value per secret with
    ", " (each with its prefix), e.g. "sha1=ab12..., sha1=cd34...".
    """
    if not secrets:
        raise SigningError("at least one secret is required to sign")
    if timestamp < 0:
        raise SigningError(f"timestamp must be a non-negative Unix time, got {timestamp}")
    kind = profile.kind
    ts = str(timestamp)

    if kind == "standard":
        if not event_id or _CONTROL.search(event_id):
            raise SigningError("event id must be non-empty and free of control characters")
        msg = f"{event_id}.{ts}.".encode() + body
        signature = " ".join(
            "v1," + base64.b64encode(_standard_mac(s, msg)).decode() for s in secrets
        )
        return {"webhook-id": event_id, "webhook-timestamp": ts, "webhook-signature": signature}

    header = profile._header()
    if kind == "stripe":
        msg = f"{ts}.".encode() + body
        parts = [f"t={ts}"]
        parts.extend("v1=" + hmac.digest(s.encode(), msg, "sha256").hex() for s in secrets)
        return {header: ",".join(parts)}
    if kind == "github":
        return {header: "sha256=" + hmac.digest(secrets[0].encode(), body, "sha256").hex()}
    if kind == "shopify":
        digest = hmac.digest(secrets[0].encode(), body, "sha256")
        return {header: base64.b64encode(digest).decode("ascii")}
    if kind == "hmac":
        return _sign_hmac(profile, header, secrets, ts, body)
    raise SigningError(f"unknown signing profile {kind!r}")


def _sign_hmac(
    profile: SigningProfile, header: str, secrets: Sequence[str], ts: str, body: bytes
) -> dict[str, str]:
    if profile.algorithm not in ALGORITHMS:
        raise SigningError(f"unknown algorithm {profile.algorithm!r}")
    msg = f"{ts}.".encode() + body if profile.signed == "timestamp.body" else body
    values = []
    for s in secrets:
        digest = hmac.digest(s.encode(), msg, profile.algorithm)
        if profile.encoding == "base64":
            values.append(profile.prefix + base64.b64encode(digest).decode("ascii"))
        else:
            values.append(profile.prefix + digest.hex())
    headers = {header: ", ".join(values)}
    if profile.timestamp_header is not None:
        headers[profile.timestamp_header] = ts
    return headers


def generate_secret(kind: str) -> str:
    """A fresh random secret valid for `kind`: whsec_ plus 32 random bytes."""
    if kind not in PROFILES:
        raise SigningError(f"unknown signing profile {kind!r}")
    if kind == "standard":
        return _STANDARD_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")
    return _STANDARD_PREFIX + _secrets.token_urlsafe(32)


def validate_secret(kind: str, secret: str) -> None:
    """Raise SigningError if `secret` cannot be used with `kind`; the message never quotes it."""
    if kind not in PROFILES:
        raise SigningError(f"unknown signing profile {kind!r}")
    if kind == "standard":
        _decode_standard(secret)
        return
    if not 16 <= len(secret) <= 512:
        raise SigningError(f"{kind} secrets must be 16 to 512 characters, got {len(secret)}")
    if not _VISIBLE_ASCII.fullmatch(secret):
        raise SigningError(f"{kind} secrets must be printable ASCII without whitespace")


def fingerprint(secret: str) -> str:
    """Short non-reversible id for a secret, safe to show in listings and logs."""
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def _decode_standard(secret: str) -> bytes:
    if not secret.startswith(_STANDARD_PREFIX):
        raise SigningError("standard secrets must start with 'whsec_'")
    encoded = secret[len(_STANDARD_PREFIX) :]
    # Lenient base64 decoders (the standardwebhooks library's among them) drop characters outside
    # the alphabet, so e.g. a urlsafe secret would give receivers a different key: reject it.
    if not _BASE64.fullmatch(encoded):
        raise SigningError("standard secrets must be 'whsec_' followed by standard base64")
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise SigningError("standard secret is not valid base64") from None
    if not 24 <= len(key) <= 64:
        raise SigningError(f"standard secrets must decode to 24 to 64 bytes, got {len(key)}")
    return key


def _standard_mac(secret: str, msg: bytes) -> bytes:
    """HMAC-SHA256 of `msg` with a standard secret's key, from a keyed state made once per
    secret: copying it is half the cost of keying a new one for every attempt."""
    mac = _standard_keyed(secret).copy()
    mac.update(msg)
    return mac.digest()


@functools.lru_cache(maxsize=256)
def _standard_keyed(secret: str) -> hmac.HMAC:
    return hmac.new(_decode_standard(secret), digestmod=hashlib.sha256)


def _check_header_name(field: str, name: str) -> None:
    if not _TOKEN.fullmatch(name):
        raise SigningError(f"{field} {name!r} is not a valid HTTP header name")
    if name.lower() in _FORBIDDEN_HEADERS:
        raise SigningError(f"{field} {name!r} is reserved for the HTTP transport")
