"""Retry policy: what an attempt's outcome means for its delivery and its endpoint."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .config import RetryConfig
from .sending import Outcome


@dataclass(frozen=True, slots=True)
class Decision:
    """The delivery's next state: `succeeded`, `pending` (retry after `delay` s) or `failed`."""

    status: str
    delay: float = 0.0
    # Set when this outcome disables the endpoint at once (410 Gone).
    disable_reason: str | None = None

    @property
    def label(self) -> str:
        """The retry decision as the attempt log records it."""
        if self.disable_reason:
            return "paused"
        return {"pending": "retry"}.get(self.status, self.status)


# Every success decides the same: one shared value instead of one made per delivery.
SUCCEEDED = Decision("succeeded")


class RetryPolicy:
    """The configured schedule with jitter; Retry-After on 429/503 within bounds; 410 disables."""

    def __init__(self, config: RetryConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()

    @property
    def first_delay(self) -> float:
        """Delay before the first attempt (normally 0)."""
        return self.config.schedule[0]

    def decide(self, outcome: Outcome, attempt: int) -> Decision:
        """`attempt` is the 1-based number of the attempt just made, counted from the last
        replay (a replay starts a fresh schedule)."""
        if outcome.ok:
            return SUCCEEDED
        if outcome.status_code == 410:
            return Decision("pending", 0.0, disable_reason="410 Gone")
        schedule = self.config.schedule
        if attempt >= len(schedule):
            return Decision("failed")
        if outcome.status_code in (429, 503) and outcome.retry_after is not None:
            return Decision(
                "pending", min(max(outcome.retry_after, 0.0), self.config.retry_after_max)
            )
        return Decision("pending", self._jittered(schedule[attempt]))

    def _jittered(self, delay: float) -> float:
        j = self.config.jitter
        return delay * (1.0 + self._rng.uniform(-j, j)) if j else delay
