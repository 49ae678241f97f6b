"""The JSON body a receiver gets: a compact envelope, byte-identical on every retry.

The contract's envelope is the default; an endpoint may rename its fields or send the payload
alone (an `EnvelopeShape`), so receivers written for another platform's payloads work unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

# The contract's field names, in the order they are sent.
ENVELOPE_FIELDS = ("id", "type", "tenant", "timestamp", "data")
# "full": the envelope (field names as renamed); "data": the payload alone.
ENVELOPES = ("full", "data")
_MAX_NAME = 100
# C0, DEL and C1: what PostgreSQL's [[:cntrl:]] in the table's constraint refuses.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidEnvelope(ValueError):
    """An envelope setting that cannot be stored; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class EnvelopeShape:
    """How one endpoint's body is laid out, when it is not the contract's default envelope."""

    data_only: bool = False
    names: tuple[str, ...] = ENVELOPE_FIELDS

    @property
    def kind(self) -> str:
        return "data" if self.data_only else "full"

    def renames(self) -> dict[str, str]:
        """The renamed fields only, contract name to sent name."""
        return {f: n for f, n in zip(ENVELOPE_FIELDS, self.names, strict=True) if f != n}

    def columns(self) -> tuple[str | None, str | None]:
        """The endpoint row's (envelope, envelope_fields) values; NULLs mean the default."""
        renames = self.renames()
        return ("data" if self.data_only else None), (json.dumps(renames) if renames else None)

    @classmethod
    def from_columns(cls, envelope: str | None, fields: Any) -> EnvelopeShape | None:
        """The shape stored on an endpoint row, or None for the contract's envelope."""
        if isinstance(fields, str):
            fields = orjson.loads(fields)
        if envelope == "data":
            return cls(data_only=True)
        names = tuple(str(fields.get(f, f)) for f in ENVELOPE_FIELDS) if fields else ()
        return cls(names=names) if names and names != ENVELOPE_FIELDS else None


def shape_from_options(
    base: EnvelopeShape | None, envelope: str | None, fields: Iterable[tuple[str, str]]
) -> EnvelopeShape | None:
    """`base` changed by `--envelope` and `--field FIELD=NAME` options (None: the default).
    Switching to `data` drops renames; `--field f=f` restores one name."""
    fields = list(fields)
    shape = base or EnvelopeShape()
    if envelope is not None and envelope not in ENVELOPES:
        raise InvalidEnvelope(f"--envelope must be one of {', '.join(ENVELOPES)}")
    data_only = shape.data_only if envelope is None else envelope == "data"
    if data_only and fields:
        raise InvalidEnvelope(
            "--field renames envelope fields, which --envelope data does not send"
        )
    if data_only:
        return EnvelopeShape(data_only=True)
    names = dict(zip(ENVELOPE_FIELDS, shape.names, strict=True))
    for field, name in fields:
        if field not in names:
            raise InvalidEnvelope(
                f"--field {field}={name!r}: {field!r} is not an envelope field"
                f" ({', '.join(ENVELOPE_FIELDS)})"
            )
        names[field] = name
    validate_names(names)
    renamed = EnvelopeShape(names=tuple(names.values()))
    return renamed if renamed.renames() else None


def validate_names(names: Mapping[str, str]) -> None:
    """Sent names: non-empty, at most 100 characters, no control characters, all different."""
    for field, name in names.items():
        if not name or len(name) > _MAX_NAME or _CONTROL.search(name):
            raise InvalidEnvelope(
                f"--field {field}={name!r}: the name must be 1 to {_MAX_NAME} characters"
                " without control characters"
            )
    seen: dict[str, str] = {}
    for field, name in names.items():
        if name in seen:
            raise InvalidEnvelope(f"fields {seen[name]} and {field} would both be sent as {name!r}")
        seen[name] = field


def render_body(
    event_id: str,
    event_type: str,
    tenant: str,
    occurred_at: datetime,
    payload_json: str,
    shape: EnvelopeShape | None = None,
) -> bytes:
    """The endpoint's envelope around the payload; the same inputs always give the same bytes."""
    if shape is not None:
        return _render_shaped(event_id, event_type, tenant, occurred_at, payload_json, shape)
    envelope = {
        "id": event_id,
        "type": event_type,
        "tenant": tenant,
        "timestamp": format_timestamp(occurred_at),
        "data": _loads(payload_json),
    }
    try:
        return orjson.dumps(envelope)
    except TypeError:
        # orjson refuses integers beyond 64 bits, which jsonb allows; the stdlib handles them.
        return json.dumps(envelope, separators=(",", ":"), ensure_ascii=False).encode()


def _render_shaped(
    event_id: str,
    event_type: str,
    tenant: str,
    occurred_at: datetime,
    payload_json: str,
    shape: EnvelopeShape,
) -> bytes:
    if shape.data_only:
        # Re-encoded rather than sent as PostgreSQL's text, which has blanks after : and ,.
        return _dumps(_loads(payload_json))
    values = (event_id, event_type, tenant, format_timestamp(occurred_at), _loads(payload_json))
    return _dumps(dict(zip(shape.names, values, strict=True)))


def format_timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC to the second, e.g. 2026-11-23T10:00:00Z (the year always 4 digits)."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    # isoformat pads the year (strftime's %Y does not on glibc) and is several times faster;
    # in UTC it always ends in "+00:00".
    return moment.isoformat(timespec="seconds")[:-6] + "Z"


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# orjson reads an integer beyond 64 bits as a float, silently changing it (jsonb keeps every
# digit); a run of 19 digits sends the text to the stdlib, which keeps integers exact. Found by
# mapping every byte to "0" (a digit) or " " and searching: a seventh of a regex's cost.
_DIGITS_AS_ZEROS = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_LONG_DIGIT_RUN = b"0" * 19
_STRING_OR_BLANKS = re.compile(r'("(?:[^"\\]|\\.)*")|\s+')


def _loads(text: str) -> Any:
    if _LONG_DIGIT_RUN not in text.encode("utf-8", "surrogatepass").translate(_DIGITS_AS_ZEROS):
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # nested deeper than orjson goes, or not JSON: the stdlib says which
    try:
        return json.loads(text)
    except RecursionError:
        # Nested deeper than Python parses (jsonb allows it): sent as the text, compacted.
        return orjson.Fragment(_STRING_OR_BLANKS.sub(lambda m: m.group(1) or "", text))
