"""Metrics and health endpoints served by a running daemon."""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiohttp

from dispatcher.config import HttpConfig
from tests.conftest import Db, Receiver, RunningDaemon, wait_until


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_metrics_healthz_and_readyz_report_a_working_daemon(
    db: Db, receiver: Receiver, daemon_factory: Callable[..., Awaitable[RunningDaemon]]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    await db.add_endpoint(receiver.url)
    await daemon_factory(replace(db.config, http=HttpConfig(listen=listen)))
    await db.insert_events(3)
    await wait_until(lambda: len(receiver.requests) == 3, message="deliveries")
    async with aiohttp.ClientSession(f"http://{listen}") as http:

        async def ready() -> bool:
            async with http.get("/readyz") as resp:
                return resp.status == 200

        await wait_until(ready, message="readyz 200")
        async with http.get("/healthz") as resp:
            assert resp.status == 200

        async def counted() -> bool:
            async with http.get("/metrics") as resp:
                text = await resp.text()
            return 'webhook_deliveries_finished_total{status="succeeded"} 3.0' in text

        await wait_until(counted, message="metrics count 3 deliveries")
        async with http.get("/metrics") as resp:
            text = await resp.text()
        assert 'webhook_attempts_total{outcome="success"} 3.0' in text
        assert "webhook_attempt_duration_seconds_bucket" in text
