"""Endpoints (subscriptions): the value the daemon sends with, and validation of operator input."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import orjson
import structlog

from .clock import unix_now
from .envelope import EnvelopeShape
from .secretbox import SecretBox, SecretKeyError
from .signing import SigningError, SigningProfile, sign

log = structlog.get_logger("dispatcher")
_EVENT_PATTERN = re.compile(r"^(\*|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.\*)?)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the dispatcher owns; endpoint config may not set them. The Standard Webhooks trio is
# kept whatever the profile, so no configured header can pose as a webhook-id or signature.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "connection",
        "webhook-id",
        "webhook-timestamp",
        "webhook-signature",
        "webhook-event-type",
        "webhook-attempt",
    }
)


class InvalidEndpoint(ValueError):
    """Operator input that cannot make a valid endpoint; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """What the daemon needs to send to one endpoint, as of `version`."""

    id: int
    tenant: str
    url: str
    profile: SigningProfile
    secret: str
    old_secret: str | None
    old_secret_expires_at: datetime | None
    headers: tuple[tuple[str, str], ...]
    ordered: bool
    max_in_flight: int | None
    timeout: float | None
    enabled: bool
    version: int
    # None: the contract's envelope (render_body's fast path).
    envelope: EnvelopeShape | None = None
    # Why the stored secrets could not be decrypted: every attempt fails with this reason.
    secret_error: str | None = None

    def secrets(self, now: datetime) -> list[str]:
        """Secrets to sign with, newest first: the rotated-out one only until it expires."""
        if self.old_secret and self.old_secret_expires_at and self.old_secret_expires_at > now:
            return [self.secret, self.old_secret]
        return [self.secret]

    def request_headers(
        self, event_id: str, event_type: str, attempt: int, body: bytes, at: datetime
    ) -> dict[str, str]:
        """The headers of one attempt: the endpoint's own, content type, event type, attempt
        number and the signature(s) with every secret valid at `at`. SigningError if it cannot
        sign."""
        if self.secret_error is not None:
            raise SigningError(self.secret_error)
        headers = dict(self.headers)
        headers["Content-Type"] = "application/json"
        headers["webhook-event-type"] = event_type
        headers["webhook-attempt"] = str(attempt)
        headers.update(sign(self.profile, self.secrets(at), event_id, unix_now(), body))
        return headers

    @classmethod
    def from_row(
        cls, row: asyncpg.Record | Mapping[str, Any], box: SecretBox | None = None
    ) -> Endpoint:
        """The endpoint a row describes, its secrets decrypted with `box` (plaintext rows pass
        through); secrets that do not decrypt leave it unable to sign, saying why."""
        secret, old_secret, secret_error = row["secret"], row["old_secret"], None
        try:
            secret = (box or SecretBox()).open(secret)
            old_secret = None if old_secret is None else (box or SecretBox()).open(old_secret)
        except SecretKeyError as exc:
            secret, old_secret, secret_error = "", None, f"endpoint secret unusable: {exc}"
        headers = row["headers"]
        if isinstance(headers, str):
            headers = orjson.loads(headers)
        timeout_ms = row["timeout_ms"]
        profile = SigningProfile(
            kind=row["profile"],
            header=row["signature_header"],
            algorithm=row["algorithm"],
            encoding=row["encoding"],
            signed=row["signed"],
            prefix=row["prefix"],
            timestamp_header=row["timestamp_header"],
        )
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            url=row["url"],
            profile=profile,
            secret=secret,
            old_secret=old_secret,
            old_secret_expires_at=row["old_secret_expires_at"],
            headers=_usable_headers(row["id"], headers, profile),
            ordered=row["ordered"],
            max_in_flight=row["max_in_flight"],
            timeout=None if timeout_ms is None else timeout_ms / 1000.0,
            enabled=row["enabled"],
            version=row["version"],
            # .get: rows from queries written before migration 004 have no envelope columns.
            envelope=EnvelopeShape.from_columns(row.get("envelope"), row.get("envelope_fields")),
            secret_error=secret_error,
        )


def validate_url(url: str, *, allow_http: bool) -> str:
    """A URL fit to POST to: http(s), a host, no credentials, no fragment, at most 2048 chars."""
    if len(url) > 2048:
        raise InvalidEndpoint("url: longer than 2048 characters")
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise InvalidEndpoint("url: contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidEndpoint(f"url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidEndpoint(f"url: scheme must be https (got {parts.scheme or 'none'!r})")
    if parts.scheme == "http" and not allow_http:
        raise InvalidEndpoint("url: plain http is refused; use https or set [security] allow_http")
    if not parts.hostname:
        raise InvalidEndpoint("url: has no host")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidEndpoint("url: must not carry credentials (user:password@)")
    if parts.fragment:
        raise InvalidEndpoint("url: must not have a #fragment")
    if port == 0:
        raise InvalidEndpoint("url: port 0 is not valid")
    return url


def validate_event_patterns(patterns: Sequence[str]) -> list[str]:
    """Exact names, `prefix.*` wildcards or `*`; empty means every event."""
    cleaned = [p.strip() for p in patterns if p.strip()]
    for p in cleaned:
        if len(p) > 200 or not _EVENT_PATTERN.match(p):
            raise InvalidEndpoint(
                f"events: {p!r} is not an event type or a prefix.* wildcard"
                " (e.g. points.earned, tier.*)"
            )
    return cleaned


def validate_headers(headers: Mapping[str, str], profile: SigningProfile) -> dict[str, str]:
    """Extra headers: valid names, no CR/LF, none that would override signing or our own."""
    owned = RESERVED_HEADERS | profile.signature_header_names()
    seen: set[str] = set()
    for name, value in headers.items():
        if name.lower() in seen:
            raise InvalidEndpoint(f"header: {name.lower()} is given twice")
        seen.add(name.lower())
        problem = _header_problem(name, value, owned)
        if problem:
            raise InvalidEndpoint(f"header: {problem}")
    return dict(headers)


def _header_problem(name: str, value: str, owned: frozenset[str]) -> str | None:
    if not _HEADER_NAME.match(name):
        return f"{name!r} is not a valid header name"
    if name.lower() in owned:
        return f"{name} is set by the dispatcher and cannot be overridden"
    if any(c in value for c in "\r\n\0"):
        return f"the value of {name} contains a line break or NUL"
    if len(value) > 4096:
        return f"the value of {name} is longer than 4096 characters"
    return None


def _usable_headers(
    endpoint_id: int, headers: Mapping[str, Any], profile: SigningProfile
) -> tuple[tuple[str, str], ...]:
    """The stored extra headers that are safe to send. Rows written before the table's header
    check (or around it) may hold anything: a header that could split the request or replace
    one of ours is dropped and logged, never sent."""
    try:
        owned = RESERVED_HEADERS | profile.signature_header_names()
    except SigningError:
        owned = RESERVED_HEADERS  # the attempt fails to sign anyway
    usable: dict[str, tuple[str, str]] = {}
    for name, raw in sorted(headers.items()):
        value = raw if isinstance(raw, str) else str(raw)
        problem = _header_problem(str(name), value, owned)
        if problem is None and isinstance(raw, bool | dict | list | None):
            problem = f"the value of {name} is not a string"
        if problem is None and str(name).lower() in usable:
            problem = f"{name} is given twice"
        if problem:
            log.warning("endpoint_header_ignored", endpoint_id=endpoint_id, reason=problem[:200])
            continue
        usable[str(name).lower()] = (str(name), value)
    return tuple(usable.values())


def validate_profile(profile: SigningProfile) -> SigningProfile:
    try:
        profile.validate()
    except SigningError as exc:
        raise InvalidEndpoint(f"signing: {exc}") from None
    return profile
