"""`python -m bench.pgq_worker`: a pgqueuer consumer doing the dispatcher's job, for `peer`.

Each job's payload is one event's JSON; the worker wraps it in the dispatcher's envelope, signs it
(Standard Webhooks), POSTs it with one shared aiohttp session and raises on anything but a 2xx so
pgqueuer logs the job as an exception. The parent passes the database and pgqueuer's schema and
channel in the environment (DSN, BENCH_PGQ_SECRET, PGQUEUER_SCHEMA, PGQUEUER_CHANNEL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aiohttp
import asyncpg
from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager

from bench.harness import EVENT_TYPE, TENANT
from bench.peer import ENTRYPOINT
from dispatcher.envelope import render_body
from dispatcher.sending import USER_AGENT
from dispatcher.signing import SigningProfile, sign

HTTP_TIMEOUT_S = 10.0


class DeliveryFailedError(RuntimeError):
    """The receiver answered with something other than a 2xx (pgqueuer records an exception)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Tuning knobs: queue managers (one connection each), batch size and concurrency caps."""
    p = argparse.ArgumentParser(prog="python -m bench.pgq_worker", description=__doc__)
    p.add_argument("--url", required=True, help="receiver URL")
    p.add_argument("--managers", type=int, default=1, help="QueueManagers, one connection each")
    p.add_argument("--batch-size", type=int, default=10, help="jobs per dequeue (pgqueuer: 10)")
    p.add_argument(
        "--max-tasks", type=int, default=0, help="per-manager max_concurrent_tasks (0: none)"
    )
    p.add_argument(
        "--concurrency-limit", type=int, default=0, help="entrypoint concurrency_limit (0: none)"
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop on our own after this")
    return p.parse_args(argv)


def make_handler(
    session: aiohttp.ClientSession, url: str, secrets: list[str]
) -> Callable[[Job], Awaitable[None]]:
    """The entrypoint: envelope, signature and POST for one job, as the dispatcher does it."""
    profile = SigningProfile()
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)

    async def deliver(job: Job) -> None:
        event_id = f"evt_{job.id:032x}"
        payload = (job.payload or b"null").decode()
        body = render_body(event_id, EVENT_TYPE, TENANT, job.created, payload)
        headers = {
            "Content-Type": "application/json",
            "webhook-event-type": EVENT_TYPE,
            "webhook-attempt": str(job.attempts + 1),
        }
        headers.update(sign(profile, secrets, event_id, int(time.time()), body))
        async with session.post(
            url, data=body, headers=headers, allow_redirects=False, timeout=timeout
        ) as resp:
            await resp.read()
            if not 200 <= resp.status < 300:
                raise DeliveryFailedError(f"HTTP {resp.status}")

    return deliver


async def run(opts: argparse.Namespace) -> None:
    """Start the managers on one shared HTTP session; stop on SIGTERM or after --max-seconds."""
    dsn = os.environ["DSN"]
    secrets = [os.environ["BENCH_PGQ_SECRET"]]
    in_flight = opts.managers * opts.max_tasks or opts.concurrency_limit or 256
    connector = aiohttp.TCPConnector(limit=in_flight, limit_per_host=0)
    conns: list[asyncpg.Connection] = []
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        try:
            managers = []
            deliver = make_handler(session, opts.url, secrets)
            for _ in range(opts.managers):
                conn = await asyncpg.connect(dsn)
                conns.append(conn)
                qm = QueueManager(Queries(AsyncpgDriver(conn)))
                qm.entrypoint(
                    ENTRYPOINT, concurrency_limit=opts.concurrency_limit, accepts_context=False
                )(deliver)
                managers.append(qm)

            def stop() -> None:
                for qm in managers:
                    qm.shutdown.set()

            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop)
            loop.call_later(opts.max_seconds, stop)
            print(f"ready {time.time():.6f}", flush=True)
            await asyncio.gather(
                *(
                    qm.run(
                        batch_size=opts.batch_size,
                        max_concurrent_tasks=opts.max_tasks or None,
                        dequeue_timeout=timedelta(seconds=5),
                    )
                    for qm in managers
                )
            )
        finally:
            for conn in conns:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)


def main(argv: list[str] | None = None) -> int:
    """Run the worker under uvloop (as `pgq run` does) until stopped."""
    opts = parse_args(argv)
    try:
        import uvloop
    except ImportError:
        asyncio.run(run(opts))
    else:
        uvloop.run(run(opts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
