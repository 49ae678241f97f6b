"""`dispatcher endpoint reencrypt-secrets`: every endpoint's stored secrets moved under the
current key: plaintext rows (written before a key was set, or by SQL) are encrypted, rows under
an old key (`[security] old_secrets_key_files`) are re-encrypted. With no current key set, it
decrypts them back to plaintext instead. Batches of rows in key order, each one transaction
(the rows locked, then one UPDATE); running it again changes nothing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .config import Config
from .db import Q
from .secretbox import SecretBox, SecretKeyError, box_for

DbCommand = Callable[[argparse.Namespace, Config, asyncpg.Connection], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Reencrypted:
    endpoints: int
    changed: int


async def reencrypt_secrets(
    conn: asyncpg.Connection, box: SecretBox, batch: int = 500
) -> Reencrypted:
    """Store every endpoint's secret and old secret as `box` seals them now; SecretKeyError
    (naming the endpoint, never the secret) leaves the batch it met untouched."""
    after, seen, changed = 0, 0, 0
    while True:
        async with conn.transaction():
            rows = await conn.fetch(Q["lock_endpoint_secrets"], after, batch)
            if not rows:
                return Reencrypted(seen, changed)
            after = rows[-1]["id"]
            seen += len(rows)
            ids: list[int] = []
            secrets: list[str] = []
            olds: list[str | None] = []
            for r in rows:
                try:
                    secret = box.reseal(r["secret"])
                    old = None if r["old_secret"] is None else box.reseal(r["old_secret"])
                except SecretKeyError as exc:
                    raise SecretKeyError(f"endpoint {r['id']}: {exc}") from None
                if (secret, old) != (r["secret"], r["old_secret"]):
                    ids.append(r["id"])
                    secrets.append(secret)
                    olds.append(old)
            if ids:
                changed += await conn.fetchval(Q["reencrypt_secrets"], ids, secrets, olds)


def _batch(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10000:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from 1 to 10000")
    return int(text)


def add_parser(
    endpoint_verbs: argparse._SubParsersAction[Any],
    common: argparse.ArgumentParser,
    listing: argparse.ArgumentParser,
) -> None:
    """`endpoint reencrypt-secrets [--batch N] [--json]`."""
    p = endpoint_verbs.add_parser(
        "reencrypt-secrets",
        parents=[common, listing],
        help="store every endpoint secret encrypted under the current key",
        description="Encrypt plaintext endpoint secrets and re-encrypt those under an old key"
        " ([security] old_secrets_key_files) with the current key ([security]"
        " secrets_key_file); with no current key, decrypt them to plaintext. Safe to run"
        " again: rows already stored as they should be are left alone.",
    )
    p.add_argument(
        "--batch", type=_batch, default=500, metavar="N", help="rows per transaction (500)"
    )


async def cmd_endpoint_reencrypt_secrets(
    args: argparse.Namespace, config: Config, conn: asyncpg.Connection
) -> int:
    box = box_for(config.security)
    r = await reencrypt_secrets(conn, box, args.batch)
    key_id = box.current.id if box.current else None
    if args.json:
        print(json.dumps({"endpoints": r.endpoints, "changed": r.changed, "key_id": key_id}))
        return 0
    how = f"encrypted under key {key_id}" if key_id else "stored as plaintext (no key is set)"
    print(f"{r.changed} of {r.endpoints} endpoints changed; every secret is now {how}")
    return 0


DB_HANDLERS: dict[tuple[str, str | None], DbCommand] = {
    ("endpoint", "reencrypt-secrets"): cmd_endpoint_reencrypt_secrets,
}
