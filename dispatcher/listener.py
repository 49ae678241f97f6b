"""The wake-up line: a dedicated LISTEN connection, probed, reconnected with jittered backoff.

A NOTIFY is only a latency hint: notifications sent while this connection is down are lost, so
every (re)connect wakes the claim loop at once, and the loop also polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from .config import DatabaseConfig
from .db import connect_kwargs

log = structlog.get_logger("dispatcher")

PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 5.0
_RECONNECTABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class Listener:
    """Keeps one connection LISTENing on `channel` and calls `wake` on every notification."""

    def __init__(
        self,
        config: DatabaseConfig,
        channel: str,
        wake: Callable[[], None],
        on_reconnect: Callable[[], None] | None = None,
    ) -> None:
        self._config = config
        self.channel = channel
        self._wake = wake
        self._on_reconnect = on_reconnect
        self.connected = False
        self.reconnects = 0

    async def run(self) -> None:
        """Run until cancelled."""
        first = True
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(_RECONNECTABLE),
            wait=wait_random_exponential(multiplier=0.2, max=10),
            before_sleep=self._before_sleep,
            reraise=True,
        ):
            with attempt:
                if not first:
                    self.reconnects += 1
                    if self._on_reconnect:
                        self._on_reconnect()
                first = False
                await self._listen_once()

    async def _listen_once(self) -> None:
        lost = asyncio.Event()
        conn = await asyncpg.connect(**connect_kwargs(self._config))
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(self.channel, self._on_notify)
            self.connected = True
            log.info("listener_connected", channel=self.channel)
            # Anything inserted while we were not listening sent no notification we could hear.
            self._wake()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), PROBE_INTERVAL)
                if not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
            raise ConnectionResetError("listener connection closed")
        finally:
            self.connected = False
            conn.terminate()

    def _on_notify(self, *_args: object) -> None:
        self._wake()

    def _before_sleep(self, state: object) -> None:
        outcome = getattr(state, "outcome", None)
        exc = outcome.exception() if outcome is not None else None
        next_sleep = getattr(getattr(state, "next_action", None), "sleep", None)
        log.warning(
            "listener_disconnected",
            channel=self.channel,
            error=type(exc).__name__ if exc else None,
            detail=str(exc)[:200] if exc else None,
            retry_in_s=round(next_sleep, 2) if isinstance(next_sleep, float) else None,
        )
