"""Ordered delivery: what one-at-a-time per ordering_key costs, and what a stuck key costs others.

Throughput: the same backlog (events round-robin over ordering keys) drained to one endpoint
three times, each on a fresh schema with the dispatcher started after: the endpoint unordered
(the keys are ignored), ordered with many keys, ordered with few keys. Same max_in_flight in all
three (the dispatcher's concurrency, as in the drain scenario).

Stuck key: an ordered endpoint and a backlog over many keys, one of which (key 0) is answered
500 every time by a receiver in this process that looks for the key in the body. Drained once
with that receiver answering 200 to everything, then once with the key failing: the other keys'
deliveries/s should not change (the failing head blocks only its own key), and none of the stuck
key's later events may be sent.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import asyncpg
import orjson

from bench.harness import (
    BACKLOG_BATCH,
    EVENT_TYPE,
    PAYLOAD_SQL,
    TENANT,
    Context,
    CpuMeter,
    DaemonProcess,
    connect,
    drop_schema,
    fresh_schema,
    poll_until,
    start_daemon,
)
from bench.receiver import RequestProtocol
from dispatcher.signing import generate_secret

MANY_KEYS = 10_000
FEW_KEYS = 100
STUCK_MANY_KEYS = 1_000
"""Keys in the stuck-key runs (fewer than MANY_KEYS so the stuck key has a queue behind it)."""
STUCK_MIN_EVENTS_PER_KEY = 10
STUCK_KEY = "acct_stuck"
HOST = "127.0.0.1"
POLL_S = 0.5

# Events round-robin over `$5` keys, key k named acct_<k> (key 0 named $6 when given); the key
# goes into the payload too, which is how the receiver recognises the stuck key's events.
_INSERT = f"""
INSERT INTO outbox (tenant, event_type, payload, ordering_key)
SELECT $1, $2, {PAYLOAD_SQL} || jsonb_build_object('account', k.key), k.key
FROM generate_series($3::bigint, $4::bigint) AS i,
     LATERAL (SELECT coalesce(CASE WHEN (i - 1) % $5::bigint = 0 THEN $6::text END,
                              'acct_' || lpad(((i - 1) % $5::bigint)::text, 6, '0')) AS key) AS k
"""
_DONE = """
SELECT NOT EXISTS (SELECT 1 FROM outbox WHERE fanned_out_at IS NULL)
   AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
                   WHERE d.status IN ('pending', 'delivering')
                     AND o.ordering_key IS DISTINCT FROM $1::text)
"""
# Deliveries of keys other than $1 (every key when $1 is NULL).
_STATS = """
SELECT count(*) FILTER (WHERE d.status = 'succeeded') AS succeeded,
       extract(epoch FROM max(d.completed_at) FILTER (WHERE d.status = 'succeeded'))::float8
           AS last_success,
       (SELECT extract(epoch FROM min(created_at))::float8 FROM deliveries) AS first_fan_out
FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
WHERE o.ordering_key IS DISTINCT FROM $1::text
"""
_ATTEMPTS = """
SELECT count(*) FILTER (WHERE a.decision <> 'succeeded') AS failed,
       count(*) - count(DISTINCT a.delivery_id) AS extra
FROM attempts a
JOIN deliveries d ON d.id = a.delivery_id
JOIN outbox o ON o.seq = d.event_seq
WHERE o.ordering_key IS DISTINCT FROM $1::text
"""
# Overlaps: deliveries first sent before the delivery of the previous event of their key was
# recorded as done (on an ordered endpoint 0; on an unordered one, what ordering stops).
# Hand-over, over deliveries that already existed (were queued behind their key) when the one
# ahead was recorded done: from that record to their first send, the wait a key's turn costs.
_KEY_ORDER = """
WITH firsts AS (
    SELECT d.event_seq, o.ordering_key AS key, d.created_at, d.completed_at,
           min(a.attempted_at) AS first_try
    FROM deliveries d
    JOIN outbox o ON o.seq = d.event_seq
    JOIN attempts a ON a.delivery_id = d.id
    WHERE o.ordering_key IS NOT NULL
    GROUP BY d.id, d.event_seq, o.ordering_key, d.created_at, d.completed_at
), chained AS (
    SELECT created_at, first_try,
           lag(completed_at) OVER (PARTITION BY key ORDER BY event_seq) AS before
    FROM firsts
), waited AS (
    SELECT extract(epoch FROM first_try - before) * 1000 AS ms
    FROM chained WHERE created_at < before AND first_try >= before
)
SELECT (SELECT count(*) FROM chained WHERE first_try < before) AS overlaps,
       (SELECT count(*) FROM waited) AS handovers,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) FROM waited) AS handover_p50_ms,
       (SELECT percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) FROM waited) AS handover_p99_ms
"""
# The stuck key's deliveries: how many, succeeded, tried at all beyond the head, head's tries.
_STUCK = """
WITH s AS (
    SELECT d.id, d.status, d.attempts,
           row_number() OVER (ORDER BY d.event_seq) AS place
    FROM deliveries d JOIN outbox o ON o.seq = d.event_seq
    WHERE o.ordering_key = $1::text
)
SELECT count(*) AS events,
       count(*) FILTER (WHERE status = 'succeeded') AS succeeded,
       count(*) FILTER (WHERE place > 1 AND attempts > 0) AS later_sent,
       coalesce(max(attempts) FILTER (WHERE place = 1), 0) AS head_attempts
FROM s
"""


@dataclass
class OrderedRun:
    """One drain of the throughput part."""

    mode: str
    """"unordered", "many keys" or "few keys"."""
    ordered: bool
    keys: int
    events: int
    deliveries_per_s: float
    """From the dispatcher's process start to the last success (the drain scenario's headline)."""
    after_startup_per_s: float
    """From its first fan-out to the last success: what the ratios compare."""
    seconds: float
    failed_attempts: int
    extra_attempts: int
    key_overlaps: int
    """Deliveries first sent before the previous event of their key was done (ordered: 0)."""
    handovers: int
    """Deliveries that waited queued behind the previous event of their key."""
    handover_p50_ms: float | None
    """For those, from the one ahead recorded done to their first send (ordered runs only)."""
    handover_p99_ms: float | None
    cores: dict[str, float] = field(default_factory=dict)
    cpu_us_per_delivery: dict[str, float] = field(default_factory=dict)


@dataclass
class StuckRun:
    """One drain of the stuck-key part; "other" is every key but the stuck one."""

    stuck: bool
    """Whether the receiver failed the stuck key's requests in this run."""
    keys: int
    events: int
    other_events: int
    other_per_s: float
    """Other keys' deliveries/s from the first fan-out to their last success."""
    other_per_s_from_start: float
    other_seconds: float
    other_failed_attempts: int
    key_overlaps: int
    stuck_events: int
    stuck_succeeded: int
    stuck_head_attempts: int
    stuck_later_sent: int
    """The stuck key's events after its head that were sent at all (with it failing: 0)."""
    stuck_seen_by_receiver: int
    """Distinct stuck-key events the receiver was sent."""
    receiver_requests: int
    receiver_errors: int
    """Requests the receiver answered 500."""
    cores: dict[str, float] = field(default_factory=dict)


@dataclass
class OrderedResult:
    """Both parts, and the ratios they are for."""

    events: int
    concurrency: int
    """The dispatcher's [delivery] concurrency and the endpoint's max_in_flight."""
    runs: list[OrderedRun]
    many_keys_ratio: float
    """Ordered, many keys / unordered, after start-up deliveries/s."""
    few_keys_ratio: float
    without_stuck: StuckRun
    with_stuck: StuckRun
    stuck_ratio: float
    """Other keys' deliveries/s with the stuck key failing / without (target about 1.0)."""


class KeyReceiver:
    """An HTTP/1.1 keep-alive receiver in this process: 200 "ok" to every request, or 500 to
    those whose body holds `marker` while `failing` is set. Counts what it answered."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.failing = False
        self.requests = 0
        self.errors = 0
        self.marked_ids: set[str] = set()
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen on a free port of 127.0.0.1."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: RequestProtocol(self.answer), HOST, 0, backlog=4096
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://{HOST}:{port}/hook"

    def reset(self, *, failing: bool) -> None:
        """Zero the counters for a new run."""
        self.failing = failing
        self.requests = self.errors = 0
        self.marked_ids.clear()

    def answer(self, body: bytes) -> bytes:
        """The response to one request body."""
        self.requests += 1
        if self.marker in body:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                self.marked_ids.add(str(orjson.loads(body).get("id")))
            if self.failing:
                self.errors += 1
                return _ERROR
        return _OK

    async def close(self) -> None:
        """Stop listening (connections the client keeps open close with it)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)


_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 4\r\n\r\nfail"
)


async def run_ordered(ctx: Context, events: int) -> OrderedResult:
    """The three throughput drains on the benchmark's receiver, then the two stuck-key drains
    on a receiver in this process."""
    many = min(MANY_KEYS, events)
    few = min(FEW_KEYS, events)
    runs = [
        await _throughput(ctx, "unordered", events, many, ordered=False),
        await _throughput(ctx, "many keys", events, many, ordered=True),
        await _throughput(ctx, "few keys", events, few, ordered=True),
    ]
    stuck_keys = max(2, min(STUCK_MANY_KEYS, events // STUCK_MIN_EVENTS_PER_KEY))
    receiver = KeyReceiver(STUCK_KEY)
    await receiver.start()
    try:
        without = await _stuck(ctx, receiver, events, stuck_keys, failing=False)
        with_stuck = await _stuck(ctx, receiver, events, stuck_keys, failing=True)
    finally:
        await receiver.close()
    base = runs[0].after_startup_per_s
    return OrderedResult(
        events=events,
        concurrency=ctx.concurrency,
        runs=runs,
        many_keys_ratio=round(runs[1].after_startup_per_s / base, 3),
        few_keys_ratio=round(runs[2].after_startup_per_s / base, 3),
        without_stuck=without,
        with_stuck=with_stuck,
        stuck_ratio=round(with_stuck.other_per_s / without.other_per_s, 3),
    )


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


async def _prepare(
    conn: asyncpg.Connection,
    url: str,
    *,
    ordered: bool,
    max_in_flight: int,
    events: int,
    keys: int,
    key0: str | None,
) -> None:
    """The one endpoint, then the backlog over `keys` keys, analyzed and checkpointed."""
    await conn.execute(
        "INSERT INTO endpoints (tenant, url, secret, max_in_flight, ordered)"
        " VALUES ($1, $2, $3, $4, $5)",
        TENANT,
        url,
        generate_secret("standard"),
        max_in_flight,
        ordered,
    )
    for first in range(1, events + 1, BACKLOG_BATCH):
        last = min(events, first + BACKLOG_BATCH - 1)
        await conn.execute(_INSERT, TENANT, EVENT_TYPE, first, last, keys, key0, timeout=600)
    await conn.execute("VACUUM (ANALYZE) outbox", timeout=600)
    await conn.execute("CHECKPOINT", timeout=600)


async def _wait_done(
    conn: asyncpg.Connection, daemon: DaemonProcess, events: int, skip_key: str | None
) -> None:
    """Poll until every event is fanned out and only `skip_key`'s deliveries may be left."""
    await poll_until(
        conn,
        daemon,
        _DONE,
        skip_key,
        seconds=60 + events / 100,
        every=POLL_S,
        failure=f"{events} ordered-scenario events not delivered by the deadline",
    )


async def _throughput(
    ctx: Context, mode: str, events: int, keys: int, *, ordered: bool
) -> OrderedRun:
    config = await fresh_schema(ctx.dsn, "ordered")
    conn = await connect(config)
    try:
        await _prepare(
            conn,
            ctx.receiver.url,
            ordered=ordered,
            max_in_flight=ctx.concurrency,
            events=events,
            keys=keys,
            key0=None,
        )
        daemon = start_daemon(
            config, ctx.workdir, f"ordered-{mode.replace(' ', '-')}", concurrency=ctx.concurrency
        )
        try:
            meter = CpuMeter(ctx.cpu_sources(dispatcher=daemon.cpu_seconds))
            meter.start()
            await _wait_done(conn, daemon, events, None)
            cores = meter.cores()
        finally:
            daemon.stop()
        row = await conn.fetchrow(_STATS, None)
        attempts = await conn.fetchrow(_ATTEMPTS, None)
        order = await conn.fetchrow(_KEY_ORDER, timeout=300)
        assert row is not None
        assert attempts is not None
        assert order is not None
        if row["succeeded"] != events:
            raise RuntimeError(f"{mode}: {row['succeeded']} of {events} deliveries succeeded")
        seconds = row["last_success"] - daemon.started_at
        steady = row["last_success"] - row["first_fan_out"]
        return OrderedRun(
            mode=mode,
            ordered=ordered,
            keys=keys,
            events=events,
            deliveries_per_s=round(events / seconds, 1),
            after_startup_per_s=round(events / steady, 1),
            seconds=round(seconds, 3),
            failed_attempts=int(attempts["failed"]),
            extra_attempts=int(attempts["extra"]),
            key_overlaps=int(order["overlaps"]),
            handovers=int(order["handovers"]) if ordered else 0,
            handover_p50_ms=_ms(order["handover_p50_ms"]) if ordered else None,
            handover_p99_ms=_ms(order["handover_p99_ms"]) if ordered else None,
            cores=cores,
            cpu_us_per_delivery={
                name: round(c * seconds / events * 1e6, 1) for name, c in cores.items()
            },
        )
    finally:
        await drop_schema(conn, config)
        await conn.close()


async def _stuck(
    ctx: Context, receiver: KeyReceiver, events: int, keys: int, *, failing: bool
) -> StuckRun:
    config = await fresh_schema(ctx.dsn, "ordered_stuck")
    conn = await connect(config)
    try:
        await _prepare(
            conn,
            receiver.url,
            ordered=True,
            max_in_flight=ctx.concurrency,
            events=events,
            keys=keys,
            key0=STUCK_KEY,
        )
        receiver.reset(failing=failing)
        name = "ordered-stuck" if failing else "ordered-no-stuck"
        daemon = start_daemon(config, ctx.workdir, name, concurrency=ctx.concurrency)
        try:
            meter = CpuMeter(ctx.cpu_sources(dispatcher=daemon.cpu_seconds))
            meter.start()
            # Without the failing key every delivery must finish; with it, all but that key's.
            await _wait_done(conn, daemon, events, STUCK_KEY if failing else None)
            cores = meter.cores()
        finally:
            daemon.stop()
        row = await conn.fetchrow(_STATS, STUCK_KEY)
        attempts = await conn.fetchrow(_ATTEMPTS, STUCK_KEY)
        stuck = await conn.fetchrow(_STUCK, STUCK_KEY)
        assert row is not None
        assert attempts is not None
        assert stuck is not None
        other = events - int(stuck["events"])
        if row["succeeded"] != other:
            raise RuntimeError(f"stuck key: {row['succeeded']} of {other} other keys' succeeded")
        steady = row["last_success"] - row["first_fan_out"]
        from_start = row["last_success"] - daemon.started_at
        return StuckRun(
            stuck=failing,
            keys=keys,
            events=events,
            other_events=other,
            other_per_s=round(other / steady, 1),
            other_per_s_from_start=round(other / from_start, 1),
            other_seconds=round(steady, 3),
            other_failed_attempts=int(attempts["failed"]),
            key_overlaps=int(await conn.fetchval(_KEY_ORDER, timeout=300)),
            stuck_events=int(stuck["events"]),
            stuck_succeeded=int(stuck["succeeded"]),
            stuck_head_attempts=int(stuck["head_attempts"]),
            stuck_later_sent=int(stuck["later_sent"]),
            stuck_seen_by_receiver=len(receiver.marked_ids),
            receiver_requests=receiver.requests,
            receiver_errors=receiver.errors,
            cores=cores,
        )
    finally:
        await drop_schema(conn, config)
        await conn.close()
