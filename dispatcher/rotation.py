"""`dispatcher endpoint rotate-secret`: a new signing secret for an endpoint, with the current
one still signed with for a grace period, so a receiver can switch without a failed check.

The daemon signs with every secret still valid (`Endpoint.secrets`): standard and stripe
carry one signature per secret, hmac joins them; github and shopify have room for one
signature only, so they sign with the new secret at once and the grace period does not help.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .argtypes import record_id
from .config import Config, format_duration, parse_duration
from .db import Q
from .errors import CliError
from .secretbox import SecretBox, box_for
from .signing import fingerprint, generate_secret

DbCommand = Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]]

DEFAULT_GRACE = 24 * 3600.0
# As Stripe allows: a secret being rotated out is a secret that may have leaked.
MAX_GRACE = 7 * 86400.0
# Profiles whose requests carry a signature for every valid secret.
MULTI_SIGNATURE = frozenset({"standard", "stripe", "hmac"})


@dataclass(frozen=True, slots=True)
class Rotated:
    """The outcome of one rotation; `secret` is the new one, to show once."""

    endpoint_id: int
    profile: str
    secret: str
    old_secret_expires_at: datetime | None

    @property
    def signs_with_both(self) -> bool:
        """Whether requests during the grace period verify with the old secret too."""
        return self.old_secret_expires_at is not None and self.profile in MULTI_SIGNATURE


async def rotate_secret(
    conn: asyncpg.Connection, endpoint_id: int, grace: float, box: SecretBox | None = None
) -> Rotated:
    """Give the endpoint a new secret for its profile, stored sealed by `box`; keep the current
    one valid for `grace` seconds (0: drop it now). Any earlier rotated-out secret is dropped."""
    if not 0 <= grace <= MAX_GRACE:
        raise CliError(f"--grace must be between 0s and {format_duration(MAX_GRACE)}")
    async with conn.transaction():
        profile = await conn.fetchval(Q["lock_endpoint_for_rotation"], endpoint_id)
        if profile is None:
            raise CliError(f"endpoint {endpoint_id} does not exist")
        secret = generate_secret(profile)
        stored = (box or SecretBox()).seal(secret)
        expires = await conn.fetchval(Q["rotate_secret"], endpoint_id, stored, grace)
    return Rotated(endpoint_id, profile, secret, expires)


def _grace(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds > MAX_GRACE:
        raise argparse.ArgumentTypeError(f"{text!r} is longer than {format_duration(MAX_GRACE)}")
    return seconds


def add_parser(
    endpoint_verbs: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    listing: argparse.ArgumentParser,
) -> None:
    """`endpoint rotate-secret ID [--grace DURATION] [--json]`."""
    p = endpoint_verbs.add_parser(
        "rotate-secret",
        parents=[common, listing],
        help="give an endpoint a new secret; the old one stays valid for --grace",
        description="Generate a new signing secret and print it once. Requests keep a signature"
        " made with the previous secret until the grace period ends (standard, stripe and hmac"
        " profiles; github and shopify carry one signature, made with the new secret).",
    )
    p.add_argument("id", type=record_id)
    p.add_argument(
        "--grace",
        type=_grace,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help=f"how long the previous secret stays valid (default 24h, at most"
        f" {format_duration(MAX_GRACE)}; 0s drops it at once)",
    )


async def cmd_endpoint_rotate_secret(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    r = await rotate_secret(conn, args.id, args.grace, box_for(config.security))
    at = r.old_secret_expires_at
    expires, until = (at.isoformat(), at.isoformat(timespec="seconds")) if at else (None, None)
    if args.json:
        print(
            json.dumps(
                {
                    "id": r.endpoint_id,
                    "secret": r.secret,
                    "fingerprint": fingerprint(r.secret),
                    "old_secret_expires_at": expires,
                    "signs_with_both": r.signs_with_both,
                }
            )
        )
        return 0
    print(f"endpoint {r.endpoint_id}: new secret")
    print(f"secret: {r.secret}")
    print("(shown once: store it with the receiver now)")
    if until is None:
        print("the previous secret is no longer valid")
    elif r.signs_with_both:
        print(f"requests carry a signature made with the previous secret too until {until}")
    else:
        print(
            f"note: the {r.profile} profile carries one signature, made with the new secret:"
            " the receiver must switch now"
        )
    return 0


DB_HANDLERS: dict[tuple[str, str | None], DbCommand] = {
    ("endpoint", "rotate-secret"): cmd_endpoint_rotate_secret,
}
