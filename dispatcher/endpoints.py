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

from .clock import unix_now
from .envelope import EnvelopeShape
from .signing import SigningError, SigningProfile, sign

_EVENT_PATTERN = re.compile(r"^(\*|[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*(\.\*)?)$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Headers the dispatcher owns; endpoint config may not set them.
RESERVED_HEADERS = frozenset(
    {
        "content-type",
        "content-length",
        "host",
        "user-agent",
        "transfer-encoding",
        "connection",
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
        headers = dict(self.headers)
        headers["Content-Type"] = "application/json"
        headers["webhook-event-type"] = event_type
        headers["webhook-attempt"] = str(attempt)
        headers.update(sign(self.profile, self.secrets(at), event_id, unix_now(), body))
        return headers

    @classmethod
    def from_row(cls, row: asyncpg.Record | Mapping[str, Any]) -> Endpoint:
        headers = row["headers"]
        if isinstance(headers, str):
            headers = orjson.loads(headers)
        timeout_ms = row["timeout_ms"]
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            url=row["url"],
            profile=SigningProfile(
                kind=row["profile"],
                header=row["signature_header"],
                algorithm=row["algorithm"],
                encoding=row["encoding"],
                signed=row["signed"],
                prefix=row["prefix"],
                timestamp_header=row["timestamp_header"],
            ),
            secret=row["secret"],
            old_secret=row["old_secret"],
            old_secret_expires_at=row["old_secret_expires_at"],
            headers=tuple((str(k), str(v)) for k, v in sorted(headers.items())),
            ordered=row["ordered"],
            max_in_flight=row["max_in_flight"],
            timeout=None if timeout_ms is None else timeout_ms / 1000.0,
            enabled=row["enabled"],
            version=row["version"],
            # .get: rows from queries written before migration 004 have no envelope columns.
            envelope=EnvelopeShape.from_columns(row.get("envelope"), row.get("envelope_fields")),
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
        if not _HEADER_NAME.match(name):
            raise InvalidEndpoint(f"header: {name!r} is not a valid header name")
        if name.lower() in owned:
            raise InvalidEndpoint(
                f"header: {name} is set by the dispatcher and cannot be overridden"
            )
        if any(c in value for c in "\r\n\0"):
            raise InvalidEndpoint(f"header: the value of {name} contains a line break or NUL")
        if len(value) > 4096:
            raise InvalidEndpoint(f"header: the value of {name} is longer than 4096 characters")
    return dict(headers)


def validate_profile(profile: SigningProfile) -> SigningProfile:
    try:
        profile.validate()
    except SigningError as exc:
        raise InvalidEndpoint(f"signing: {exc}") from None
    return profile
