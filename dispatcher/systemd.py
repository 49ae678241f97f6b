"""systemd's notify protocol (sd_notify), without libsystemd: READY, WATCHDOG, STATUS, STOPPING,
and RELOADING around a SIGHUP reload (what Type=notify-reload expects).

Active only when systemd set NOTIFY_SOCKET (a path, or "@name" for an abstract socket). Every
message is one datagram of NAME=value lines. Sending never raises: a missing socket or a failed
send is logged once, at warning, and the daemon carries on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from .daemon import Dispatcher

log = structlog.get_logger("dispatcher")

# How often readiness is looked at while waiting for the listener's first connection.
READY_POLL = 0.02


class Notifier:
    """Sends notify messages to systemd's socket; does nothing when there is none."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address or None
        # Half the watchdog timeout, as sd_watchdog_enabled(3) advises; None: no watchdog.
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None
        self._sock: socket.socket | None = None
        self._warned = False
        # READY=1 has been sent (and STOPPING=1 not yet): a reload may say RELOADING=1.
        self.ready = False
        self._stopping_sent = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """NOTIFY_SOCKET, and WATCHDOG_USEC when WATCHDOG_PID is unset or names this process."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        pid = env.get("WATCHDOG_PID", "").strip()
        if not pid or pid == str(os.getpid()):
            text = env.get("WATCHDOG_USEC", "").strip()
            usec = int(text) if text.isdigit() and int(text) > 0 else None
        return cls(env.get("NOTIFY_SOCKET", "").strip() or None, usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send one message, e.g. notify(READY=1, STATUS="..."); whether it was sent."""
        if self.address is None:
            return False
        message = "\n".join(f"{name}={value}" for name, value in fields.items())
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                # Never block the event loop on a full socket queue: drop the message instead.
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "systemd_notify_failed",
                    socket=self.address,
                    message=message.splitlines()[0],
                    error=type(exc).__name__,
                    detail=exc.strerror or str(exc),
                )
            return False
        return True

    def reloading(self) -> None:
        """Before a reload: RELOADING=1 with CLOCK_MONOTONIC in µs, as sd_notify(3) asks.
        Nothing before READY=1 was sent (systemd would take the READY=1 after for the first)."""
        if self.ready:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notify(RELOADING=1, MONOTONIC_USEC=usec)

    def reloaded(self) -> None:
        """After a reload, taken or refused (the old config runs on): READY=1."""
        if self.ready:
            self.notify(READY=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def supervise(self, daemon: Dispatcher) -> None:
        """Run beside the daemon until cancelled: READY=1 once its schema is checked and its
        listener connected, WATCHDOG=1 every half watchdog period while the loop runs, a STATUS
        when readiness changes, and STOPPING=1 as soon as it is asked to stop."""
        stopped = asyncio.ensure_future(daemon.stop.wait())
        status = ""
        try:
            await daemon.ready.wait()
            # The listener says nothing when it connects: look every READY_POLL (or stop).
            while not daemon.listener.connected and not stopped.done():
                await asyncio.wait({stopped}, timeout=READY_POLL)
            if not stopped.done():
                status = _status(daemon)
                self.notify(READY=1, STATUS=status)
                self.ready = True
                log.info("systemd_ready", watchdog_interval_s=self.watchdog_interval)
            while not stopped.done():
                now = _status(daemon)
                fields: dict[str, str | int] = {}
                if self.watchdog_interval is not None:
                    fields["WATCHDOG"] = 1
                if now != status:
                    fields["STATUS"] = status = now
                if fields:
                    self.notify(**fields)
                await asyncio.wait({stopped}, timeout=self.watchdog_interval or 1.0)
            self._stopping(daemon)
            # Shutting down may take [delivery] shutdown_grace: keep the watchdog fed meanwhile.
            interval = self.watchdog_interval
            if interval is None:
                await asyncio.Future()  # until cancelled
            while interval is not None:
                await asyncio.sleep(interval)
                self.notify(WATCHDOG=1)
        finally:
            if daemon.stop.is_set():
                # A quick shutdown can end this task before it woke to the stop.
                self._stopping(daemon)
            stopped.cancel()
            self.close()

    def _stopping(self, daemon: Dispatcher) -> None:
        """STOPPING=1, once."""
        if self._stopping_sent:
            return
        self._stopping_sent = True
        self.ready = False
        self.notify(STOPPING=1, STATUS=f"Stopping: {daemon.in_flight} requests in flight")


def _status(daemon: Dispatcher) -> str:
    """A short human line for `systemctl status`."""
    failing = daemon.not_ready()
    if failing:
        return "Degraded: " + ", ".join(failing)
    return f"Delivering (replica {daemon.replica}, schema {daemon.config.database.schema})"
