"""Endpoint health: failure streaks per endpoint, and when a streak disables one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from .config import DisableConfig


@dataclass(frozen=True, slots=True)
class Streak:
    """A batch's outcomes for one endpoint, in order: was there a success, and failures after it."""

    succeeded: bool
    trailing_failures: int


def streaks(outcomes: Iterable[tuple[int, bool]]) -> dict[int, Streak]:
    """Fold (endpoint_id, ok) pairs, in the order they happened, into one streak per endpoint."""
    result: dict[int, Streak] = {}
    for endpoint_id, ok in outcomes:
        prev = result.get(endpoint_id, Streak(False, 0))
        result[endpoint_id] = (
            Streak(True, 0) if ok else Streak(prev.succeeded, prev.trailing_failures + 1)
        )
    return result


@dataclass(frozen=True, slots=True)
class Health:
    """An endpoint's state after a batch changed its streak."""

    endpoint_id: int
    enabled: bool
    consecutive_failures: int
    failing_since: datetime | None


def over_limit(
    endpoints: Iterable[Health], policy: DisableConfig, now: datetime
) -> list[tuple[int, str]]:
    """Enabled endpoints whose streak meets the policy: N failures spanning at least T."""
    span = timedelta(seconds=policy.after)
    found = []
    for h in endpoints:
        since, failures = h.failing_since, h.consecutive_failures
        if h.enabled and since and failures >= policy.after_failures and now - since >= span:
            found.append(
                (h.endpoint_id, f"{failures} consecutive failures since {since.isoformat()}")
            )
    return found
