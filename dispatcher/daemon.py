"""Daemon lifecycle and the path of one event: wake, fan out, claim, sign, send, record.

One claim loop (the pump) runs beside the listener and the result writer. The pump only claims
as many deliveries as there are free slots, globally and per endpoint, so every claimed job
starts at once and a slow endpoint can only ever hold its own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime

import structlog

from . import claiming
from .claiming import Job
from .clock import Clock, SystemClock, unix_now
from .config import Config
from .db import Executor, Q, check_schema, create_pool
from .endpoints import Endpoint
from .envelope import render_body
from .errors import DaemonCrashed, StartupError
from .listener import Listener
from .metrics import Metrics, start_http
from .recording import TRANSIENT_DB_ERRORS, Result, ResultWriter
from .retry import RetryPolicy
from .sending import Outcome, Sender
from .signing import SigningError, sign

log = structlog.get_logger("dispatcher")

# Below this many new events per fan-out the pump counts as idle and asks to be notified.
BUSY_EVENTS = 8
STALE_LISTENER_AFTER = 600.0


class Dispatcher:
    """One daemon: call `run()`; set `stop` (or send SIGTERM via `install_signals`) to end it."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.policy = RetryPolicy(config.retry, rng)
        self.replica = f"{uuid.uuid4().hex[:12]}"
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight: dict[int, int] = defaultdict(int)
        self._running_jobs: dict[asyncio.Task[None], Job] = {}
        self._endpoints: dict[int, Endpoint] = {}
        # Endpoints this process saw answer 410, by config version, until the disable is
        # recorded and the version moves on: nothing more is sent to them meanwhile.
        self._gone: dict[int, int] = {}
        self.metrics = Metrics()
        self.listener = Listener(
            config.database,
            f"{config.database.schema}.outbox",
            self._wake.set,
            on_reconnect=self.metrics.listener_reconnects.inc,
        )
        self.database_ok = False

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def not_ready(self) -> list[str]:
        """Which readiness checks fail (empty: ready)."""
        failed = []
        if not self.database_ok:
            failed.append("database unreachable")
        if not self.listener.connected:
            failed.append("listener not connected")
        return failed

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop gracefully; a second one stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("hard_stop", signal=sig.name)
            self._hard_stop.set()
        else:
            log.info("stopping", signal=sig.name, in_flight=self.in_flight)
            self.stop.set()

    async def run(self) -> None:
        """Run until `stop` is set, then finish or release in-flight work and return."""
        cfg = self.config
        self.pool = await create_pool(cfg.database, max_inactive_connection_lifetime=60)
        try:
            async with self.pool.acquire() as conn:
                await check_schema(conn)
            d = cfg.delivery
            self.sender = Sender(
                concurrency=d.concurrency,
                max_response_bytes=d.max_response_bytes,
                excerpt_bytes=d.response_excerpt_bytes,
                allow_http=cfg.security.allow_http,
                allow_private_networks=cfg.security.allow_private_networks,
                user_agent=d.user_agent,
            )
            self.writer = ResultWriter(
                self.pool,
                disable=cfg.disable,
                clock=self.clock,
                batch_size=d.batch_size,
                flush_interval=d.flush_interval,
                metrics=self.metrics,
                on_retry_recorded=self._wake.set,
            )
            try:
                http = await start_http(cfg.http.listen, self.metrics, self.not_ready)
            except OSError as exc:
                await self.sender.close()
                raise StartupError(
                    f"cannot serve [http] listen {cfg.http.listen}: {exc.strerror}"
                ) from None
            side_tasks = [
                asyncio.create_task(self.listener.run(), name="listener"),
                asyncio.create_task(self.writer.run(), name="writer"),
            ]
            try:
                log.info(
                    "dispatcher_started",
                    replica=self.replica,
                    schema=cfg.database.schema,
                    concurrency=d.concurrency,
                )
                self.ready.set()
                pump = asyncio.create_task(self._pump(), name="pump")
                crash = await _first_done(pump, *side_tasks)
                if crash is not None:
                    log.error("dispatcher_crashed", error=repr(crash), exc_info=crash)
                    self.stop.set()
                    pump.cancel()
                await self._shutdown()
                if crash is not None:
                    raise DaemonCrashed(f"the daemon stopped after an internal error: {crash!r}")
            finally:
                for t in side_tasks:
                    t.cancel()
                await asyncio.gather(*side_tasks, return_exceptions=True)
                await self.sender.close()
                if http is not None:
                    await http.cleanup()
        finally:
            with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                await asyncio.wait_for(self.pool.execute(Q["remove_listener"], self.replica), 2)
            await self.pool.close()

    # The pump -------------------------------------------------------------------------------

    async def _pump(self) -> None:
        d = self.config.delivery
        idle_marked = False
        db_failures = 0
        last_housekeeping = 0.0
        while not self.stop.is_set():
            self._wake.clear()
            self._slot_freed.clear()
            try:
                async with self.pool.acquire() as conn:
                    events, _ = await claiming.fan_out(conn, d.batch_size, self.policy.first_delay)
                    jobs, starved = await self._claim(conn)
                    if events >= BUSY_EVENTS and idle_marked:
                        await conn.execute(Q["set_listener_idle"], self.replica, False)
                        idle_marked = False
                    if time.monotonic() - last_housekeeping > 60:
                        await conn.execute(Q["remove_stale_listeners"], STALE_LISTENER_AFTER)
                        last_housekeeping = time.monotonic()
                    more = events >= d.batch_size or (jobs and not starved)
                    if not more and not idle_marked:
                        # Ask to be notified, then look once more: a row committed between our
                        # last look and this flag would otherwise wait for the poll.
                        await conn.execute(Q["set_listener_idle"], self.replica, True)
                        idle_marked = True
                        more = True
                    wait_for = 0.0 if more else await self._seconds_until_due(conn)
                db_failures = 0
                self.database_ok = True
            except TRANSIENT_DB_ERRORS as exc:
                db_failures += 1
                self.database_ok = False
                wait_for = min(5.0, 0.05 * 2**db_failures) * random.uniform(0.5, 1.0)
                log.warning(
                    "database_unavailable",
                    error=type(exc).__name__,
                    detail=str(exc)[:200],
                    retry_in_s=round(wait_for, 2),
                )
                jobs, starved = [], False
            if jobs:
                await self._start(jobs)
            if wait_for > 0:
                await self._sleep(wait_for, starved)
            else:
                await asyncio.sleep(0)

    async def _claim(self, conn: Executor) -> tuple[list[Job], bool]:
        """Claim what fits in the free slots; `starved` means slots, not work, ran out."""
        d = self.config.delivery
        free = d.concurrency - len(self._tasks)
        if free <= 0:
            return [], True
        per_endpoint = {}
        for eid, n in self._in_flight.items():
            cap = self._endpoint_cap(eid)
            per_endpoint[eid] = cap - n
        jobs = await claiming.claim(conn, free, per_endpoint, d.per_endpoint_concurrency, d.lease)
        if jobs:
            self.metrics.claim_batch.observe(len(jobs))
        starved = len(jobs) >= free or any(v <= 0 for v in per_endpoint.values())
        return jobs, starved

    def _endpoint_cap(self, endpoint_id: int) -> int:
        ep = self._endpoints.get(endpoint_id)
        if ep is not None and ep.max_in_flight:
            return ep.max_in_flight
        return self.config.delivery.per_endpoint_concurrency

    async def _seconds_until_due(self, conn: Executor) -> float:
        due = await conn.fetchval(Q["seconds_until_due"])
        poll = self.config.delivery.poll_interval
        return poll if due is None else max(0.001, min(poll, float(due)))

    async def _sleep(self, seconds: float, starved: bool) -> None:
        waits = [self._wake.wait(), self.stop.wait()]
        if starved:
            waits.append(self._slot_freed.wait())
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    # One delivery ---------------------------------------------------------------------------

    async def _start(self, jobs: list[Job]) -> None:
        stale = {j.endpoint_id for j in jobs if self._needs_refresh(j)}
        if stale:
            try:
                rows = await self.pool.fetch(Q["endpoints_by_id"], list(stale))
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("endpoint_refresh_failed", error=type(exc).__name__)
                # Not sent, so not an attempt: hand them back (or let their lease run out).
                with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                    await claiming.release(self.pool, jobs)
                return
            for row in rows:
                self._endpoints[row["id"]] = Endpoint.from_row(row)
        held_back = [j for j in jobs if self._gone.get(j.endpoint_id) == j.endpoint_version]
        if held_back:
            with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                await claiming.release(self.pool, held_back)
        for job in jobs:
            endpoint = self._endpoints.get(job.endpoint_id)
            if endpoint is None or self._gone.get(job.endpoint_id) == job.endpoint_version:
                continue  # deleted meanwhile (its deliveries went with it), or gone (released)
            self._in_flight[job.endpoint_id] += 1
            task = asyncio.create_task(self._deliver(job, endpoint))
            self._tasks.add(task)
            self._running_jobs[task] = job
            task.add_done_callback(self._finished)
        self.metrics.in_flight.set(len(self._tasks))

    def _needs_refresh(self, job: Job) -> bool:
        ep = self._endpoints.get(job.endpoint_id)
        return ep is None or ep.version != job.endpoint_version

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        job = self._running_jobs.pop(task)
        self._in_flight[job.endpoint_id] -= 1
        if self._in_flight[job.endpoint_id] <= 0:
            del self._in_flight[job.endpoint_id]
        self._slot_freed.set()
        self.metrics.in_flight.set(len(self._tasks))
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_crashed", delivery_id=job.delivery_id, error=repr(task.exception()))

    async def _deliver(self, job: Job, endpoint: Endpoint) -> None:
        attempted_at = datetime.now(UTC)
        body = render_body(job.event_id, job.event_type, job.tenant, job.occurred_at, job.payload)
        headers = dict(endpoint.headers)
        headers["Content-Type"] = "application/json"
        headers["webhook-event-type"] = job.event_type
        headers["webhook-attempt"] = str(job.attempt)
        try:
            headers.update(
                sign(
                    endpoint.profile, endpoint.secrets(attempted_at), job.event_id, unix_now(), body
                )
            )
        except SigningError as exc:
            outcome = Outcome(None, "signing_error", str(exc), None, 0)
        else:
            timeout = min(
                endpoint.timeout or self.config.delivery.timeout, self.config.delivery.lease / 2
            )
            outcome = await self.sender.send(endpoint.url, body, headers, timeout)
        decision = self.policy.decide(outcome, job.attempt)
        self.metrics.attempts.labels("success" if outcome.ok else outcome.error or "error").inc()
        self.metrics.attempt_seconds.observe(outcome.duration_ms / 1000)
        if decision.disable_reason:
            self._gone[job.endpoint_id] = job.endpoint_version
        self.writer.add(Result(job, outcome, decision, attempted_at))

    # Stopping -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Let in-flight requests finish within the grace period, record them, release the rest."""
        grace = self.config.delivery.shutdown_grace
        deadline = time.monotonic() + grace
        if self._tasks:
            finishing = asyncio.ensure_future(asyncio.wait(set(self._tasks), timeout=grace))
            hard = asyncio.ensure_future(self._hard_stop.wait())
            await asyncio.wait({finishing, hard}, return_when=asyncio.FIRST_COMPLETED)
            finishing.cancel()
            hard.cancel()
        unfinished = [self._running_jobs[t] for t in self._tasks if t in self._running_jobs]
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        left = await self.writer.drain(max(deadline, time.monotonic() + 5))
        released = 0
        if unfinished:
            with contextlib.suppress(*TRANSIENT_DB_ERRORS):
                await asyncio.wait_for(claiming.release(self.pool, unfinished), 5)
                released = len(unfinished)
        log.info(
            "dispatcher_stopped",
            recorded=self.writer.recorded,
            released=released,
            unrecorded=left,
        )


async def _first_done(*tasks: asyncio.Task[None]) -> BaseException | None:
    """Wait for the first task to end; return what killed it, if anything did. Only the pump
    ends on its own (at stop); any other ending is a crash, not something to limp past."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        exc = None if t.cancelled() else t.exception()
        if exc is not None:
            return exc
        if t.get_name() != "pump":
            return RuntimeError(f"{t.get_name()} ended unexpectedly")
    return None
