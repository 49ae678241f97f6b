"""Which configuration keys a running daemon can take on at a reload (SIGHUP), and which need a
restart: the comparison and the merged config, pure functions with no I/O."""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Any

from .config import Config

# Keys read afresh for what starts next; every other key is fixed at start-up (connections,
# sockets, the lease behind claims already made, the sender's TLS and network rules).
LIVE: dict[str, frozenset[str] | None] = {
    "log": None,  # every key of the section
    "http": frozenset({"max_lag"}),
    "retry": None,
    "disable": None,
    "delivery": frozenset(
        {
            "concurrency",
            "per_endpoint_concurrency",
            "timeout",
            "poll_interval",
            "batch_size",
            "flush_interval",
            "shutdown_grace",
            "ordered_after_failure",
        }
    ),
}


def _is_live(section: str, key: str) -> bool:
    if section not in LIVE:
        return False
    keys = LIVE[section]
    return keys is None or key in keys


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose values differ, as "[section] key" (names only: values may be secrets)."""
    changed = []
    for sec in fields(Config):
        a, b = getattr(old, sec.name), getattr(new, sec.name)
        if a == b:
            continue
        for f in fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                changed.append(f"[{sec.name}] {f.name}")
    return changed


def merge(old: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """`old` with `new`'s live values; also the live keys applied and the keys left as they
    were until a restart."""
    applied: list[str] = []
    restart: list[str] = []
    sections: dict[str, Any] = {}
    for key in changed_keys(old, new):
        sec, name = key[1:].split("] ")
        if not _is_live(sec, name):
            restart.append(key)
            continue
        applied.append(key)
        section = sections.get(sec, getattr(old, sec))
        sections[sec] = replace(section, **{name: getattr(getattr(new, sec), name)})
    return replace(old, **sections), applied, restart
