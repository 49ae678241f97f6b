"""Replicas: one and two dispatcher processes draining the same backlog on one schema."""

from __future__ import annotations

from dataclasses import dataclass

from bench.drain import DrainResult, run_drain
from bench.harness import Context


@dataclass
class ReplicasResult:
    """The same drain with one process and with two; two should be faster and send nothing twice."""

    one: DrainResult
    two: DrainResult
    ratio: float
    """Two processes' deliveries/s (from the first one's start) / one process's."""
    after_startup_ratio: float
    duplicate_sends: int
    """In the two-process run: 'succeeded' attempts beyond one per delivery (should be 0)."""


async def run_replicas(ctx: Context, events: int) -> ReplicasResult:
    """Drain `events` with one dispatcher, then the same backlog on a fresh schema with two."""
    one = await run_drain(ctx, events, label="replicas", processes=1)
    two = await run_drain(ctx, events, label="replicas", processes=2)
    return ReplicasResult(
        one=one,
        two=two,
        ratio=round(two.deliveries_per_s / one.deliveries_per_s, 3),
        after_startup_ratio=round(two.after_startup_per_s / one.after_startup_per_s, 3),
        duplicate_sends=two.duplicate_successes,
    )
