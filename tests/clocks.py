"""A clock the test moves by hand (the dispatcher's `Clock` protocol), so policies that span a
day run in milliseconds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """Stands still at `start` (default: the real now) until `advance` moves it."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime.now(UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> datetime:
        """Move forward by a timedelta's keyword arguments (hours=24, seconds=1, ...)."""
        self.current += timedelta(**delta)
        return self.current
