"""Ceiling: a plain aiohttp loop POSTing signed bodies, the HTTP rate with no database work.

Beside it, the same loop through the dispatcher's own sender (`dispatcher.sending.Sender`,
which writes requests on aiohttp's connections rather than `ClientSession.post`): how much of the
drain's distance to the ceiling is the HTTP client, and how much the dispatcher's other work."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import aiohttp
import orjson

from bench.harness import EVENT_TYPE, TENANT, Context, CpuMeter, payload
from dispatcher.config import DeliveryConfig
from dispatcher.envelope import render_body
from dispatcher.sending import USER_AGENT, Sender
from dispatcher.signing import SigningProfile, generate_secret, sign

WARMUP_S = 0.5
DISTINCT_BODIES = 1000


@dataclass
class CeilingRun:
    """One concurrency level: completed requests per second in the measured window."""

    concurrency: int
    seconds: float
    requests: int
    requests_per_s: float
    errors: int
    cores: dict[str, float] = field(default_factory=dict)
    client: str = "session"
    """"session": ClientSession.post (the ceiling; "session after drain" when run again after
    the drain); "sender": the dispatcher's Sender."""


@dataclass
class CeilingResult:
    """Every level tried; the best plain one is the ceiling."""

    runs: list[CeilingRun]
    requests_per_s: float
    concurrency: int
    sender_requests_per_s: float | None = None
    """The dispatcher's Sender in the same loop, at the ceiling's best concurrency."""
    after_drain_requests_per_s: float | None = None
    """The best level again, right after the drain: this machine's speed drifts by a fifth
    within minutes, so the drain is compared with the mean of the runs either side of it."""

    @property
    def bracketing_requests_per_s(self) -> float:
        """The ceiling to compare the drain with: the mean of before and after, if both ran."""
        if self.after_drain_requests_per_s is None:
            return self.requests_per_s
        return round((self.requests_per_s + self.after_drain_requests_per_s) / 2, 1)


async def run_ceiling(ctx: Context, concurrencies: list[int], seconds: float) -> CeilingResult:
    """Measure each concurrency level for `seconds` after a short warm-up, then the
    dispatcher's sender at the best one."""
    runs = [await _level(ctx, c, seconds) for c in concurrencies]
    best = max(runs, key=lambda r: r.requests_per_s)
    sender = await _level(ctx, best.concurrency, seconds, client="sender")
    return CeilingResult(
        [*runs, sender], best.requests_per_s, best.concurrency, sender.requests_per_s
    )


async def run_ceiling_again(ctx: Context, result: CeilingResult, seconds: float) -> CeilingResult:
    """The best plain level once more (after the drain), added to `result`."""
    again = await _level(ctx, result.concurrency, seconds, client="session after drain")
    return replace(
        result, runs=[*result.runs, again], after_drain_requests_per_s=again.requests_per_s
    )


def _bodies() -> list[tuple[str, bytes]]:
    occurred = datetime.now(UTC)
    out = []
    for i in range(DISTINCT_BODIES):
        event_id = f"evt_{i:032x}"
        body = render_body(
            event_id, EVENT_TYPE, TENANT, occurred, orjson.dumps(payload(i)).decode()
        )
        out.append((event_id, body))
    return out


async def _level(
    ctx: Context, concurrency: int, seconds: float, client: str = "session"
) -> CeilingRun:
    loop = asyncio.get_running_loop()
    bodies = _bodies()
    secrets = [generate_secret("standard")]
    profile = SigningProfile()
    url = ctx.receiver.url
    timeout = aiohttp.ClientTimeout(total=5)
    counts = {"done": 0, "errors": 0}
    stop_at = loop.time() + WARMUP_S + seconds + 60  # a hard bound, should the window stall

    async def worker(k: int, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        i = k
        while not stop.is_set() and loop.time() < stop_at:
            event_id, body = bodies[i % DISTINCT_BODIES]
            i += concurrency
            # The same headers the dispatcher sends, signed per request as it signs them.
            headers = {
                "Content-Type": "application/json",
                "webhook-event-type": EVENT_TYPE,
                "webhook-attempt": "1",
            }
            headers.update(sign(profile, secrets, event_id, int(time.time()), body))
            if sender is not None:
                ok = (await sender.send(url, body, headers, 5.0)).ok
                counts["done" if ok else "errors"] += 1
                continue
            try:
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False, timeout=timeout
                ) as resp:
                    await resp.read()
                    ok = 200 <= resp.status < 300
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            counts["done" if ok else "errors"] += 1

    sender = None
    if client == "sender":  # any other client is the plain session
        defaults = DeliveryConfig()
        sender = Sender(
            concurrency=concurrency,
            max_response_bytes=defaults.max_response_bytes,
            excerpt_bytes=defaults.response_excerpt_bytes,
            allow_http=True,
            allow_private_networks=True,
        )
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0)
    async with aiohttp.ClientSession(
        connector=connector,
        headers={"User-Agent": USER_AGENT},
        auto_decompress=False,
        skip_auto_headers=("Accept-Encoding",),
    ) as session:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(worker(k, session, stop)) for k in range(concurrency)]
        try:
            await asyncio.sleep(WARMUP_S)
            meter = CpuMeter(ctx.cpu_sources())
            meter.start()
            done0, t0 = counts["done"], time.perf_counter()
            errors0 = counts["errors"]
            await asyncio.sleep(seconds)
            done1, t1 = counts["done"], time.perf_counter()
            errors1 = counts["errors"]
            cores = meter.cores()
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if sender is not None:
                await sender.close()
    elapsed = t1 - t0
    n = done1 - done0
    return CeilingRun(
        concurrency, round(elapsed, 3), n, round(n / elapsed, 1), errors1 - errors0, cores, client
    )
