"""Daemon lifecycle and the path of one event: wake, fan out, claim, sign, send, record.

One claim loop (the pump) runs beside the listener and the result writer. The pump only claims
as many deliveries as there are free slots, globally and per endpoint, so every claimed job
starts at once and a slow endpoint can only ever hold its own slots. Nor does it claim while
twice as many results as there are slots wait to be recorded, so what a crash sends twice stays
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from aiohttp.abc import AbstractResolver

from . import claiming, systemd
from .claiming import Job, Slots
from .clock import Clock, SystemClock
from .config import Config, ConfigError
from .db import Executor, Q, acquire, check_schema, create_pool, keep_session
from .endpoints import Endpoint
from .envelope import render_body
from .errors import DaemonCrashed, StartupError
from .listener import Listener
from .logs import configure as configure_logs
from .metrics import Metrics, start_http
from .monitoring import Sampler
from .recording import TRANSIENT_DB_ERRORS, Result, ResultWriter
from .reloading import merge
from .retention import Pruner
from .retry import RetryPolicy
from .scheduling import Scheduler
from .secretbox import box_for
from .sending import Outcome, Sender
from .signing import SigningError

log = structlog.get_logger("dispatcher")

# While work keeps coming the pump polls every BUSY_POLL seconds and asks for no notifications,
# which cost the backend's commits a cluster-wide lock; only after IDLE_AFTER seconds without
# any work does it register as idle and sleep until notified (or the poll interval).
BUSY_POLL = 0.002
IDLE_AFTER = 0.5
STALE_LISTENER_AFTER = 600.0
# How often the pump refreshes its own `listeners` row and removes stale ones (seconds).
HOUSEKEEPING_EVERY = 60.0
# The pump claims nothing while this many times `concurrency` results wait to be written back:
# what a crash sends twice stays bounded when the database slows or goes away. One times is
# too few: the writer records a batch while the next one fills, and a drain measured 25 %
# slower; at two the drain rate was that of no limit (bench, interleaved pairs).
UNRECORDED_LIMIT = 2
# A pause in claiming for want of write-backs longer than this is logged (seconds).
PAUSE_WARN_AFTER = 1.0
# Requests at a time to an endpoint whose last recorded attempts failed, until one succeeds:
# one that hangs would otherwise hold its whole cap of the global slots for a timeout at a
# time, and failing faster with more requests helps nobody.
FAILING_CAP = 2


class Dispatcher:
    """One daemon: call `run()`; set `stop` (or send SIGTERM via `install_signals`) to end it."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        reload: Callable[[], Config] | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.config = config
        # Reads the config again (file and environment) for SIGHUP; None: no reloading.
        self._reload = reload
        # DNS for deliveries; None: aiohttp's default. Tests use it to play a rebinding resolver.
        self._resolver = resolver
        self.clock: Clock = clock or SystemClock()
        self.policy = RetryPolicy(config.retry, rng)
        self.replica = f"{uuid.uuid4().hex[:12]}"
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._wake = asyncio.Event()
        # Room to claim again: globally (`_room`), or for an endpoint that was at its cap.
        self._room = asyncio.Event()
        self._endpoint_room = asyncio.Event()
        self._endpoints: dict[int, Endpoint] = {}
        # Opens endpoint secrets stored encrypted; keys are read once, at start.
        self.secrets = box_for(config.security)
        self._scheduler = Scheduler(
            config.delivery.concurrency, config.delivery.per_endpoint_concurrency, self._cap
        )
        self._running: dict[asyncio.Task[None], Job] = {}
        # Claimed jobs that will not be sent after all (their endpoint answered 410): to release.
        self._unsent: list[Job] = []
        # Whether `deliveries` may hold due rows this process has not seen (a retry it recorded,
        # work that did not fit at fan-out). While only fresh events flow, the pump skips the
        # claim query; it still runs it every poll interval for what other processes leave.
        self._queue_dirty = True
        self._last_claim = 0.0
        # Endpoints this process left rows pending for (no slot free at fan-out): a finished
        # request to one of them is the moment to claim again. And when the earliest retry
        # this process recorded falls due (monotonic), if sooner than the poll.
        self._backlogged: set[int] = set()
        self._retry_due = float("inf")
        # Since when the pump has waited for the writer (monotonic), and whether it said so.
        self._paused_at: float | None = None
        self._paused_warned = False
        # Endpoints this process saw answer 410, by config version, until the disable is
        # recorded and the version moves on: nothing more is sent to them meanwhile.
        self._gone: dict[int, int] = {}
        self.metrics = Metrics()
        self.metrics.in_flight.set_function(lambda: len(self._running))
        self.metrics.unrecorded.set_function(
            lambda: self.writer.pending if hasattr(self, "writer") else 0
        )
        self.sampler = Sampler(self.metrics, config.log.summary_interval, lambda: self.in_flight)
        self.notifier = systemd.Notifier.from_env()
        self.listener = Listener(
            config.database,
            f"{config.database.schema}.outbox",
            self._wake.set,
            on_reconnect=self._listener_back,
        )
        self.database_ok = False

    def _listener_back(self) -> None:
        """The LISTEN connection is up again: the database is back, so the writer need not
        sit out the rest of its backoff (the pump, paused while results wait, cannot tell it)."""
        self.metrics.listener_reconnects.inc()
        if hasattr(self, "writer"):
            self.writer.database_back()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def not_ready(self) -> list[str]:
        """Which readiness checks fail (empty: ready)."""
        failed = []
        if not self.database_ok:
            failed.append("database unreachable")
        if not self.listener.connected:
            failed.append("listener not connected")
        if lag := self.sampler.lag_check(self.config.http.max_lag):
            failed.append(lag)
        return failed

    def install_signals(self) -> None:
        """SIGTERM/SIGINT stop gracefully; a second one stops at once."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self._reload is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload_config)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            log.warning("hard_stop", signal=sig.name)
            self._hard_stop.set()
        else:
            log.info("stopping", signal=sig.name, in_flight=self.in_flight)
            self.stop.set()

    def reload_config(self) -> bool:
        """Read the config again and apply what can change live (SIGHUP); an invalid one is
        refused and the old one kept. Returns whether the new config was taken."""
        if self._reload is None:
            return False
        self.notifier.reloading()
        try:
            new = self._reload()
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc))
            self.notifier.reloaded()
            return False
        old = self.config
        merged, applied, restart = merge(old, new)
        self.config = merged
        d = merged.delivery
        self.policy.config = merged.retry
        self._scheduler.resize(d.concurrency, d.per_endpoint_concurrency)
        if hasattr(self, "writer"):
            self.writer.retune(
                disable=merged.disable,
                batch_size=d.batch_size,
                flush_interval=d.flush_interval,
                ordered_after_failure=d.ordered_after_failure,
            )
        if hasattr(self, "sender"):
            self.sender.resize(d.concurrency)
        self.sampler.retune(merged.log.summary_interval)
        if (merged.log.format, merged.log.level) != (old.log.format, old.log.level):
            configure_logs(merged.log.format, merged.log.level)
        if restart:
            log.warning("config_reload_partial", restart_required=restart, applied=applied)
        log.info("config_reloaded", changed=applied)
        # Raised limits: start what waits, claim more, and look again at once.
        if not self.stop.is_set():
            self._launch()
        self._room.set()
        self._wake.set()
        self.notifier.reloaded()
        return True

    async def run(self) -> None:
        """Run until `stop` is set, then finish or release in-flight work and return."""
        cfg = self.config
        self.pool = await create_pool(
            cfg.database,
            max_inactive_connection_lifetime=60,
            settings={"synchronous_commit": cfg.database.synchronous_commit},
            # A connection gone silent (a network path dropping packets, a failed-over
            # primary's old address) would otherwise hold a statement until TCP gives up,
            # many minutes; a claim or write-back older than a lease is stale anyway.
            command_timeout=cfg.delivery.lease,
            reset=keep_session,
        )
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
                resolver=self._resolver,
            )
            self.writer = ResultWriter(
                self.pool,
                disable=cfg.disable,
                clock=self.clock,
                batch_size=d.batch_size,
                flush_interval=d.flush_interval,
                metrics=self.metrics,
                on_retry_recorded=self._retry_recorded,
                ops=cfg.ops,
                ordered_after_failure=d.ordered_after_failure,
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
            if cfg.retention.interval > 0:
                pruner = Pruner(
                    self.pool, cfg.retention, cfg.database.schema, self.metrics, self.stop.is_set
                )
                side_tasks.append(asyncio.create_task(pruner.run(), name="pruner"))
            side_tasks.append(asyncio.create_task(self.sampler.run(self.pool), name="sampler"))
            notifier = self.notifier
            if notifier.enabled:
                side_tasks.append(asyncio.create_task(notifier.supervise(self), name="systemd"))
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
            try:
                await asyncio.wait_for(self.pool.close(), 5)
            except TRANSIENT_DB_ERRORS:
                # A connection that stopped answering cannot be closed politely.
                self.pool.terminate()

    # The pump -------------------------------------------------------------------------------

    async def _pump(self) -> None:
        idle_marked = False
        db_failures = 0
        last_housekeeping = 0.0
        last_work = time.monotonic()
        while not self.stop.is_set():
            self._wake.clear()
            self._room.clear()
            self._endpoint_room.clear()
            if await self._writer_behind():
                continue
            slots = self._scheduler.claimable(self._failing())
            jobs: list[Job] = []
            try:
                async with acquire(self.pool) as conn:
                    if self._unsent:
                        unsent, self._unsent = self._unsent, []
                        await claiming.release(conn, unsent)
                    if idle_marked:
                        self._queue_dirty = True  # woken by a due time, a retry or the poll
                    jobs, events, more = await self._take(conn, slots)
                    now = time.monotonic()
                    if events or jobs:
                        last_work = now
                        if idle_marked:
                            await conn.execute(Q["set_listener_idle"], self.replica, False)
                            idle_marked = False
                    if now - last_housekeeping > HOUSEKEEPING_EVERY:
                        if idle_marked:
                            # Still waiting: say so again, or the cleanup (ours or another
                            # replica's) takes this row for a dead replica's.
                            await conn.execute(Q["set_listener_idle"], self.replica, True)
                        await conn.execute(Q["remove_stale_listeners"], STALE_LISTENER_AFTER)
                        last_housekeeping = now
                    full = len(jobs) >= slots.free
                    if more or full:
                        wait_for = 0.0
                    elif not idle_marked and now - last_work < IDLE_AFTER:
                        wait_for = BUSY_POLL
                    elif not idle_marked:
                        # Ask to be notified, then look once more: a row committed between our
                        # last look and this flag would otherwise wait for the poll.
                        await conn.execute(Q["set_listener_idle"], self.replica, True)
                        idle_marked = True
                        wait_for = 0.0
                    else:
                        # At least every HOUSEKEEPING_EVERY, however long the poll interval.
                        wait_for = min(await self._seconds_until_due(conn), HOUSEKEEPING_EVERY)
                if db_failures:
                    self.writer.database_back()
                db_failures = 0
                self.database_ok = True
            except TRANSIENT_DB_ERRORS as exc:
                db_failures += 1
                self.database_ok = False
                wait_for = min(5.0, 0.05 * 2**db_failures) * random.uniform(0.5, 1.0)
                sqlstate = getattr(exc, "sqlstate", None)
                if sqlstate and not sqlstate.startswith(SERVER_GONE_SQLSTATE_CLASSES):
                    # The server answered and refused the statement: not an outage but a
                    # schema or permission problem (or a bug) that retrying will not cure.
                    log.error(
                        "database_statement_failed",
                        error=type(exc).__name__,
                        sqlstate=sqlstate,
                        detail=str(exc)[:200],
                        retry_in_s=round(wait_for, 2),
                    )
                else:
                    log.warning(
                        "database_unavailable",
                        error=type(exc).__name__,
                        detail=str(exc)[:200],
                        retry_in_s=round(wait_for, 2),
                    )
                full = False
            if jobs:
                await self._start(jobs)
            if full or not self._scheduler.hungry():
                # Enough is claimed: wait until running jobs have made room for a batch.
                if not self._scheduler.hungry():
                    await self._sleep(self.config.delivery.poll_interval, self._room)
            elif wait_for > 0:
                # An endpoint at its cap may have work waiting that only its own slots release.
                saturated = bool(self._scheduler.claimable(self._failing()).saturated)
                await self._sleep(
                    wait_for, self._wake, *([self._endpoint_room] if saturated else [])
                )
            else:
                await asyncio.sleep(0)

    async def _writer_behind(self) -> bool:
        """While too many results wait to be written back (the database slow or away), wait
        for the writer to record a batch and say so: every claim now would only add to what a
        crash sends twice. A pause past PAUSE_WARN_AFTER is logged, and its end."""
        now = time.monotonic()
        if self.writer.pending >= UNRECORDED_LIMIT * self.config.delivery.concurrency:
            if self._paused_at is None:
                self._paused_at, self._paused_warned = now, False
            elif not self._paused_warned and now - self._paused_at >= PAUSE_WARN_AFTER:
                # Brief pauses are the writer catching up under load; a long one is news.
                self._paused_warned = True
                log.warning(
                    "claims_paused",
                    unrecorded=self.writer.pending,
                    paused_ms=round((now - self._paused_at) * 1000),
                )
            self.writer.progress.clear()
            self.writer.hurry()
            # Woken also by `_wake`: a reload may have raised the limit.
            await self._sleep(PAUSE_WARN_AFTER, self.writer.progress, self._wake)
            return True
        if self._paused_at is not None and self._paused_warned:
            log.info(
                "claims_resumed",
                unrecorded=self.writer.pending,
                paused_ms=round((now - self._paused_at) * 1000),
            )
        self._paused_at = None
        return False

    async def _take(self, conn: Executor, slots: Slots) -> tuple[list[Job], int, bool]:
        """Claim due deliveries, then fan out new events into the slots still free.

        Returns the jobs, the events fanned out, and whether more work is probably waiting.
        """
        d = self.config.delivery
        if slots.free <= 0:
            return [], 0, False
        jobs: list[Job] = []
        more = False
        left = slots
        now = time.monotonic()
        if now >= self._retry_due:
            self._queue_dirty, self._retry_due = True, float("inf")
        if self._queue_dirty or now - self._last_claim >= d.poll_interval:
            self._queue_dirty = False
            self._last_claim = now
            claimed = await claiming.claim(conn, slots, d.lease)
            jobs = claimed.jobs
            more = self._queue_dirty = len(jobs) >= slots.free or claimed.held_back > 0
            if not more:
                self._forget_drained(slots, claimed)
            left = slots.after(claimed)
        events = 0
        if left.free > 0:
            fanned = await claiming.fan_out(conn, left, d.lease, self.policy.first_delay)
            jobs = jobs + fanned.jobs
            events = fanned.events
            more = more or events >= left.free
            self._backlogged |= fanned.left_pending
            if fanned.left_pending and len(fanned.jobs) >= left.free:
                # Some did not fit for want of a global slot: claim them once one frees. (Had
                # only endpoints' own caps held them back, those endpoints say when they have
                # room, and scanning past their queued rows meanwhile would be wasted work.)
                self._queue_dirty = True
        if jobs:
            self.metrics.claim_batch.observe(len(jobs))
        return jobs, events, more

    def _forget_drained(self, slots: Slots, claimed: claiming.Claimed) -> None:
        """After a claim that was not cut short: endpoints that got less than their room have no
        more due rows, so they are no longer backlogged."""
        got: dict[int, int] = {}
        for j in claimed.jobs:
            got[j.endpoint_id] = got.get(j.endpoint_id, 0) + 1
        saturated = set(slots.saturated)
        for eid in list(self._backlogged):
            room = slots.by_endpoint.get(eid, claimed.caps.get(eid, 1))
            if eid not in saturated and got.get(eid, 0) < room:
                self._backlogged.discard(eid)

    def _retry_recorded(self, due_at: datetime) -> None:
        """The writer scheduled a retry: claim again when it falls due, even while busy."""
        delay = (due_at - datetime.now(UTC)).total_seconds()
        self._retry_due = min(self._retry_due, time.monotonic() + max(0.0, delay))
        self._wake.set()

    def _cap(self, endpoint_id: int) -> int:
        ep = self._endpoints.get(endpoint_id)
        cap = self.config.delivery.per_endpoint_concurrency
        if ep is not None and ep.max_in_flight:
            cap = ep.max_in_flight
        if endpoint_id in self._failing():
            return min(cap, FAILING_CAP)
        return cap

    def _failing(self) -> set[int]:
        return self.writer.failing if hasattr(self, "writer") else set()

    async def _seconds_until_due(self, conn: Executor) -> float:
        saturated = self._scheduler.claimable(self._failing()).saturated
        due = await conn.fetchval(Q["seconds_until_due"], saturated)
        poll = self.config.delivery.poll_interval
        return poll if due is None else max(0.001, min(poll, float(due)))

    async def _sleep(self, seconds: float, *events: asyncio.Event) -> None:
        """Sleep until `seconds` pass, stop, or one of `events` is set."""
        tasks = [asyncio.ensure_future(e.wait()) for e in (self.stop, *events)]
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
                self._endpoints[row["id"]] = Endpoint.from_row(row, self.secrets)
        for job in jobs:
            if job.endpoint_id in self._endpoints:
                self._scheduler.add(job)
            # else: the endpoint was deleted meanwhile, and its deliveries with it
        self._launch()

    def _launch(self) -> None:
        """Start waiting jobs while slots allow."""
        while (job := self._scheduler.next()) is not None:
            endpoint = self._endpoints[job.endpoint_id]
            if self._gone.get(job.endpoint_id) == job.endpoint_version:
                # It answered 410: nothing more goes there until the disable is recorded.
                self._scheduler.done(job.endpoint_id)
                self._unsent.append(job)
                self._wake.set()
                continue
            task = asyncio.create_task(self._deliver(job, endpoint))
            self._running[task] = job
            task.add_done_callback(self._finished)

    def _needs_refresh(self, job: Job) -> bool:
        ep = self._endpoints.get(job.endpoint_id)
        return ep is None or ep.version != job.endpoint_version

    def _finished(self, task: asyncio.Task[None]) -> None:
        job = self._running.pop(task)
        self._scheduler.done(job.endpoint_id)
        if job.endpoint_id in self._backlogged:
            self._queue_dirty = True  # its pending rows can be claimed now
            self._endpoint_room.set()
        if not self.stop.is_set():
            self._launch()
        if self._scheduler.hungry():
            self._room.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery_crashed", delivery_id=job.delivery_id, error=repr(task.exception()))

    async def _deliver(self, job: Job, endpoint: Endpoint) -> None:
        # The injected clock: which secrets are still valid is a policy spanning hours.
        attempted_at = self.clock.now()
        body = render_body(
            job.event_id,
            job.event_type,
            job.tenant,
            job.occurred_at,
            job.payload,
            endpoint.envelope,
        )
        try:
            headers = endpoint.request_headers(
                job.event_id, job.event_type, job.attempt, body, attempted_at
            )
        except SigningError as exc:
            outcome = Outcome(None, "signing_error", str(exc), None, 0)
        else:
            timeout = min(
                endpoint.timeout or self.config.delivery.timeout, self.config.delivery.lease / 2
            )
            outcome = await self.sender.send(endpoint.url, body, headers, timeout)
        decision = self.policy.decide(outcome, job.retry_attempt)
        self.metrics.attempt_seconds.observe(outcome.duration_ms / 1000)
        if decision.disable_reason:
            self._gone[job.endpoint_id] = job.endpoint_version
        self.writer.add(Result(job, outcome, decision, attempted_at))

    # Stopping -------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        """Let in-flight requests finish within the grace period, record them, release the rest."""
        grace = self.config.delivery.shutdown_grace
        deadline = time.monotonic() + grace
        unfinished = self._scheduler.take_waiting() + self._unsent
        if self._running:
            finishing = asyncio.ensure_future(asyncio.wait(set(self._running), timeout=grace))
            hard = asyncio.ensure_future(self._hard_stop.wait())
            await asyncio.wait({finishing, hard}, return_when=asyncio.FIRST_COMPLETED)
            finishing.cancel()
            hard.cancel()
        unfinished += [job for t, job in self._running.items() if not t.done()]
        tasks = list(self._running)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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


# SQLSTATE classes of a server going away or too busy for now: connection exceptions,
# insufficient resources, operator intervention (shutdown, restart, cancel), transaction
# rollbacks (serialization, deadlock) and a read-only server (a failover in progress).
SERVER_GONE_SQLSTATE_CLASSES = ("08", "53", "57", "40", "25006")


def tune_gc() -> None:
    """For the daemon's process: collect garbage less often. Each delivery leaves short-lived
    cycles (aiohttp's request and response objects), and with the default thresholds the
    collector runs thousands of times a second under load; much higher thresholds make each
    collection a pause that shows in latency. What exists at start-up (modules, config) is
    frozen out of every scan."""
    gc.freeze()
    gc.set_threshold(5_000, 20, 20)


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
