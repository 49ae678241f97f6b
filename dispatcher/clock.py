"""The injectable clock: policies that span a day are tested in milliseconds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    """Wall-clock time in UTC."""

    def now(self) -> datetime:
        return datetime.now(UTC)


def unix_now() -> int:
    """This attempt's Unix time, for signature timestamps (the process clock, by design)."""
    return int(time.time())
