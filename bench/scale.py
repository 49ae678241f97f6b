"""Scale: the drain at a small and a large backlog, to show the rate and memory do not degrade."""

from __future__ import annotations

from dataclasses import dataclass

from bench.drain import DrainResult, run_drain
from bench.harness import Context


@dataclass
class ScaleResult:
    """One drain per backlog size, smallest first, and how the largest compares."""

    runs: list[DrainResult]
    rate_ratio: float
    """Largest backlog's after-start-up rate / smallest's (start-up would flatter the large one)."""
    headline_ratio: float
    """The same with each drain's headline rate (from process start)."""
    large_peak_rss_mb: float | None
    """The dispatcher's peak RSS while draining the largest backlog."""


async def run_scale(ctx: Context, sizes: list[int]) -> ScaleResult:
    """Run the drain scenario (bench.drain.run_drain, unchanged) once per backlog size."""
    runs = [await run_drain(ctx, n, label="scale") for n in sorted(set(sizes))]
    small, large = runs[0], runs[-1]
    return ScaleResult(
        runs=runs,
        rate_ratio=round(large.after_startup_per_s / small.after_startup_per_s, 3),
        headline_ratio=round(large.deliveries_per_s / small.deliveries_per_s, 3),
        large_peak_rss_mb=large.dispatcher_peak_rss_mb,
    )


def count_label(n: int) -> str:
    """10000 -> "10k", 1000000 -> "1M": short backlog sizes for summary lines."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"
