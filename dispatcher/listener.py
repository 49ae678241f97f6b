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
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    wait_random_exponential,
)

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

    async def run(self) -> None:
        """Run until cancelled. Connecting is retried with a growing random delay; the
        schedule starts over after every connection that got as far as LISTEN, so a drop after
        hours of service is retried at once, not after the longest delay an earlier outage
        reached."""
        while True:
            # Iterating starts the schedule afresh.
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(_RECONNECTABLE),
                wait=wait_random_exponential(multiplier=BACKOFF_FIRST, max=BACKOFF_MAX),
                before_sleep=self._before_sleep,
                reraise=True,
            ):
                with attempt:
                    conn = await self._connect()
            try:
                await self._serve(conn)
            except _RECONNECTABLE as exc:
                # Lost after it served: the first, short delay (random, so replicas cut off
                # together do not all come back in the same instant), then a fresh schedule.
                delay = random.uniform(0, BACKOFF_FIRST)
                self._log_disconnected(exc, failures=1, retry_in_s=delay)
                await asyncio.sleep(delay)

    def _before_sleep(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._log_disconnected(exc, failures=state.attempt_number, retry_in_s=delay)

    def _log_disconnected(
        self, exc: BaseException | None, *, failures: int, retry_in_s: float
    ) -> None:
        log.warning(
            "listener_disconnected",
            channel=self.channel,
            error=type(exc).__name__,
            detail=str(exc)[:200],
            failures=failures,
            retry_in_s=round(retry_in_s, 2),
        )

    async def _connect(self) -> asyncpg.Connection:
        """A connection LISTENing on the channel."""
        # The LISTEN too must not wait forever on a connection that went silent.
        conn: asyncpg.Connection = await asyncpg.connect(
            **connect_kwargs(self._config), command_timeout=PROBE_TIMEOUT
        )
        try:
            await conn.add_listener(self.channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _serve(self, conn: asyncpg.Connection) -> None:
        """Hear notifications on `conn` until it is lost (raised as a reconnectable error)."""
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _c: lost.set())
            self.connected = True
            if self._listened_before:
                self.reconnects += 1
                if self._on_reconnect:
                    self._on_reconnect()
            self._listened_before = True
            log.info("listener_connected", channel=self.channel)
            # Anything inserted while we were not listening sent no notification we could hear.
            self._wake()
            while not lost.is_set():
                # (asyncio.timeout: see monitoring.Sampler.run)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PROBE_INTERVAL):
                        await lost.wait()
                if not lost.is_set():
                    await conn.fetchval("SELECT 1", timeout=PROBE_TIMEOUT)
            raise ConnectionResetError("listener connection closed")
        finally:
            self.connected = False
            conn.terminate()

    def _on_notify(self, *_args: object) -> None:
        self._wake()
