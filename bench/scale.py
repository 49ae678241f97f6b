"""Scale: the drain at a small and a large backlog, to show the rate and memory do not degrade."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench.drain import DrainResult, run_drain
from bench.harness import Context


@dataclass
class ScaleResult:
    """The drains of each backlog size (the smallest several times) and how the largest
    compares."""

    runs: list[DrainResult]
    """In the order run: the smallest backlog twice, each larger one, the smallest again."""
    rate_ratio: float
    """Largest backlog's after-start-up rate / the median of the smallest's (start-up would
    flatter the large one)."""
    headline_ratio: float
    """The same with each drain's headline rate (from process start)."""
    large_peak_rss_mb: float | None
    """The dispatcher's peak RSS while draining the largest backlog."""

    @property
    def small_and_large(self) -> tuple[int, int]:
        """The smallest and the largest backlog drained, in events."""
        sizes = [r.events for r in self.runs]
        return min(sizes), max(sizes)


# The small backlog drains in about a second, short enough for this machine's drift to move
# one run by a tenth either way: it runs SMALL_RUNS times, before and after the large one, and
# the large is compared with their median.
SMALL_RUNS = 3


async def run_scale(ctx: Context, sizes: list[int]) -> ScaleResult:
    """Run the drain scenario (bench.drain.run_drain, unchanged) per backlog size: the smallest
    twice first and once after the others, the others once each, largest last."""
    ordered = sorted(set(sizes))
    smallest = ordered[0]
    runs = [await run_drain(ctx, smallest, label="scale") for _ in range(SMALL_RUNS - 1)]
    runs += [await run_drain(ctx, n, label="scale") for n in ordered[1:]]
    large = runs[-1]
    runs.append(await run_drain(ctx, smallest, label="scale"))
    small = [r for r in runs if r.events == smallest]
    return ScaleResult(
        runs=runs,
        rate_ratio=round(
            large.after_startup_per_s / statistics.median(r.after_startup_per_s for r in small), 3
        ),
        headline_ratio=round(
            large.deliveries_per_s / statistics.median(r.deliveries_per_s for r in small), 3
        ),
        large_peak_rss_mb=large.dispatcher_peak_rss_mb,
    )


def count_label(n: int) -> str:
    """10000 -> "10k", 1000000 -> "1M": short backlog sizes for summary lines."""
    for unit, size in (("M", 1_000_000), ("k", 1_000)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n:,}"
