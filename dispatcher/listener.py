"""The wake-up line: a dedicated LISTEN connection, probed, reconnected with jittered backoff.

A NOTIFY is only a latency hint: notifications sent while this connection is down are lost, so
every (re)connect wakes the claim loop at once, and the loop also polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable

import asyncpg
import structlog

from .config import DatabaseConfig
from .db import connect_kwargs

log = structlog.get_logger("dispatcher")

PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 5.0
# Reconnect delays: random up to 0.2 s, 0.4 s, 0.8 s, ... at most 10 s ("full jitter").
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 10.0
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
        # Connections re-established after the first (failed attempts are not counted).
        self.reconnects = 0
        self._listened_before = False
        self._listening = False

    async def run(self) -> None:
        """Run until cancelled. The backoff starts over after every connection that got as far
        as LISTEN, so a drop after hours of service is retried at once, not after the longest
        delay an earlier outage reached."""
        failures = 0
        while True:
            self._listening = False
            try:
                await self._listen_once()
            except _RECONNECTABLE as exc:
                failures = 1 if self._listening else failures + 1
                delay = random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)))
                log.warning(
                    "listener_disconnected",
                    channel=self.channel,
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    failures=failures,
                    retry_in_s=round(delay, 2),
                )
                await asyncio.sleep(delay)

    async def _listen_once(self) -> None:
        lost = asyncio.Event()
        # The LISTEN too must not wait forever on a connection that went silent.
        conn = await asyncpg.connect(**connect_kwargs(self._config), command_timeout=PROBE_TIMEOUT)
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            await conn.add_listener(self.channel, self._on_notify)
            self.connected = self._listening = True
            if self._listened_before:
                self.reconnects += 1
                if self._on_reconnect:
                    self._on_reconnect()
            self._listened_before = True
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
