"""`dispatcher demo`: the whole product on a private PostgreSQL and local receivers, no set-up.

It starts a throwaway cluster, three receivers (healthy, flaky, dead), a real Dispatcher, inserts
a burst of loyalty events into the outbox, shows delivery progress live, then prints what happened
per endpoint and how to do the same against your own database. Nothing outlives it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import random
import shutil
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from . import logs
from .config import (
    Config,
    DatabaseConfig,
    DeliveryConfig,
    HttpConfig,
    RetryConfig,
    SecurityConfig,
)
from .daemon import Dispatcher
from .db import Q, connect_kwargs, migrate
from .pgcluster import EphemeralPostgres
from .signing import generate_secret

TENANT = "demo-store"
SCHEMA = "webhooks"
HOST = "127.0.0.1"
DEADLINE = 45.0
"""Seconds the deliveries may take before the demo gives up."""
READY_TIMEOUT = 15.0
TICK = 0.25
"""Seconds between progress readings (one query each), and redraws on a terminal."""
PLAIN_EVERY = 1.0
"""Seconds between progress lines when stdout is not a terminal."""
SIGNATURE_TOLERANCE = 300
"""Seconds a webhook-timestamp may be off, as Standard Webhooks libraries allow."""
SEED = 20261123

TIERS = ("Bronze", "Silver", "Gold", "Platinum")
REWARDS = (
    ("rwd_coffee", "Free coffee", 150),
    ("rwd_shipping", "Free shipping", 300),
    ("rwd_10off", "10% off your next order", 500),
    ("rwd_birthday", "Birthday cupcake", 200),
    ("rwd_lounge", "VIP lounge pass", 2000),
)
FIRST_NAMES = ("Amara", "Bastian", "Chloe", "Dmitri", "Elif", "Farah", "Gustav", "Hana", "Ines")
LAST_NAMES = ("Okafor", "Lindqvist", "Moreau", "Ivanov", "Yilmaz", "Haddad", "Berg", "Sato")
CHANNELS = ("web", "ios", "android", "in-store")
# One round of the story: sign-ups, purchases, redemptions and the odd tier upgrade.
PATTERN = (
    "customer.created",
    "points.earned",
    "points.earned",
    "tier.upgraded",
    "points.redeemed",
    "points.earned",
    "reward.redeemed",
    "customer.created",
    "points.earned",
    "tier.upgraded",
)

Event = tuple[str, dict[str, Any], str | None]
"""(event_type, payload, ordering_key)"""


# --------------------------------------------------------------------------- the flow


async def run_demo(events: int = 60) -> int:
    """Run the demo end to end and return the exit code; the cluster goes even on Ctrl-C or a
    SIGTERM (`timeout 30 dispatcher demo`, a CI job cancelled), which unwind like Ctrl-C does."""
    daemon_log = DaemonLog()
    cluster = EphemeralPostgres(durable=False)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    terminated = asyncio.Event()

    def on_sigterm() -> None:
        terminated.set()
        main.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        print("Loyalty webhook dispatcher demo")
        cluster.start()  # blocking on purpose: nothing else runs yet, and a thread could outlive us
        print(f"  PostgreSQL  {HOST}:{cluster.port} in {cluster.root} (removed at exit)")
        return await _demo(cluster.dsn, events, daemon_log)
    except asyncio.CancelledError:
        if not terminated.is_set():
            raise
        print("\ndispatcher demo: stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    except Exception:
        sys.stderr.write(daemon_log.tail())  # the daemon's own account of what went wrong
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        cluster.cleanup()


async def _demo(dsn: str, events: int, daemon_log: DaemonLog) -> int:
    """Set up schema and receivers, run the daemon over a burst of events, report."""
    config = demo_config(dsn)
    await migrate(config.database)
    print(f"  schema      {SCHEMA} migrated")
    async with _receivers() as (healthy, flaky):
        conn = await asyncpg.connect(**connect_kwargs(config.database))
        try:
            names = await _add_endpoints(conn, healthy, flaky, _dead_url())
            progress = await _dispatch(config, conn, loyalty_events(events))
            rows = await _summary(conn)
        finally:
            await conn.close()
    _print_summary(rows, names, progress)
    _print_receivers(healthy, flaky)
    print(f"  {daemon_log.summary()}")
    _print_explore()
    code = _verdict(progress, rows, names, healthy, flaky)
    if code:
        print(f"\nLast lines of the daemon log:\n{daemon_log.tail()}", end="")
    return code


async def _dispatch(config: Config, conn: asyncpg.Connection, burst: list[Event]) -> Progress:
    """Run the daemon, insert the burst, watch until done or the deadline, stop gracefully."""
    dispatcher = Dispatcher(config)
    task = asyncio.create_task(dispatcher.run(), name="demo-dispatcher")
    try:
        await _wait_ready(dispatcher, task)
        await _insert_events(conn, burst)
        print(f"  inserted    {len(burst)} events for tenant {TENANT} into {SCHEMA}.outbox\n")
        progress = await _watch(conn, task)
    finally:
        await _stop(dispatcher, task, config.delivery.shutdown_grace + 10)
    if not task.cancelled():
        task.result()  # a daemon that died says why
    return progress


class DaemonLog:
    """The daemon's warnings, kept in memory and counted: failures are the demo's point."""

    def __init__(self) -> None:
        """Route every structlog line of this process into the buffer, as JSON."""
        self.stream = io.StringIO()
        logs.configure("json", "warning", stream=self.stream)

    def records(self) -> list[dict[str, Any]]:
        """The log lines so far, parsed."""
        return [json.loads(line) for line in self.stream.getvalue().splitlines() if line]

    def summary(self) -> str:
        """One line: how many of each warning and error the daemon logged."""
        counts = Counter(f"{r.get('event')} ({r.get('level')})" for r in self.records())
        if not counts:
            return "daemon log: no warnings or errors"
        listed = ", ".join(f"{n} {what}" for what, n in counts.most_common())
        return f"daemon log: {listed}; `dispatcher run` writes these as JSON lines to stderr"

    def tail(self, lines: int = 8) -> str:
        """The last few log lines, for when something went wrong."""
        last = self.stream.getvalue().splitlines()[-lines:]
        return "".join(f"{line}\n" for line in last)


def demo_config(dsn: str) -> Config:
    """Settings that show retries within seconds and allow receivers on 127.0.0.1."""
    return Config(
        database=DatabaseConfig(dsn=dsn, schema=SCHEMA),
        delivery=DeliveryConfig(poll_interval=0.1, timeout=2.0, lease=10.0, shutdown_grace=5.0),
        retry=RetryConfig(schedule=(0, 0.5, 1, 2), jitter=0.2),
        security=SecurityConfig(allow_http=True, allow_private_networks=True),
        http=HttpConfig(listen=""),
    )


# --------------------------------------------------------------------------- receivers


def verify_standard(key: bytes, headers: Mapping[str, str], body: bytes, now: float) -> bool:
    """Check a Standard Webhooks signature the way a merchant's receiver would."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    if not msg_id or not stamp.isdigit() or abs(now - int(stamp)) > SIGNATURE_TOLERANCE:
        return False
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac)
    for candidate in headers.get("webhook-signature", "").split():
        version, _, sig = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True
    return False


def fails_first_try(webhook_id: str) -> bool:
    """Whether the flaky receiver turns this event's first attempt away (about half, stable)."""
    return hashlib.sha256(webhook_id.encode()).digest()[0] % 2 == 0


@dataclass
class Receiver:
    """A local HTTP receiver that verifies every signature; a flaky one 503s some first tries."""

    name: str
    flaky: bool = False
    secret: str = field(default_factory=lambda: generate_secret("standard"))
    verified: int = 0
    invalid: int = 0
    turned_away: int = 0
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Listen on a random port of 127.0.0.1."""
        app = web.Application()
        app.router.add_post("/webhooks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, HOST, 0).start()
        self.url = f"http://{HOST}:{self._runner.addresses[0][1]}/webhooks"

    async def stop(self) -> None:
        """Close the listener and any open connections."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        """401 on a bad signature, 503 on a flaky first try, else 200."""
        body = await request.read()
        key = base64.b64decode(self.secret.removeprefix("whsec_"))
        if not verify_standard(key, request.headers, body, time.time()):
            self.invalid += 1
            return web.Response(status=401, text="invalid signature")
        self.verified += 1
        webhook_id = request.headers["webhook-id"]
        first_try = request.headers.get("webhook-attempt") == "1"
        if self.flaky and first_try and fails_first_try(webhook_id):
            self.turned_away += 1
            return web.Response(status=503, text="busy, try again")
        return web.Response(status=200, text="ok")


@asynccontextmanager
async def _receivers() -> AsyncIterator[tuple[Receiver, Receiver]]:
    """The healthy and the flaky receiver, listening for as long as the block runs."""
    healthy, flaky = Receiver("healthy"), Receiver("flaky", flaky=True)
    try:
        await healthy.start()
        await flaky.start()
        yield healthy, flaky
    finally:
        await flaky.stop()
        await healthy.stop()


def _dead_url() -> str:
    """A URL on a port where nothing listens: bind to get a free port, then let it go."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    return f"http://{HOST}:{port}/webhooks"


async def _add_endpoints(
    conn: asyncpg.Connection, healthy: Receiver, flaky: Receiver, dead_url: str
) -> dict[int, str]:
    """Subscribe the three receivers with plain SQL, as an admin UI would; returns id -> name."""
    plan: tuple[tuple[str, str, list[str], str, str], ...] = (
        ("healthy", healthy.url, [], healthy.secret, "all events, verifies every signature"),
        ("flaky", flaky.url, ["points.*"], flaky.secret, "points.*, 503 to ~half of 1st tries"),
        ("dead", dead_url, ["tier.*"], generate_secret("standard"), "tier.*, nothing listens"),
    )
    names: dict[int, str] = {}
    for name, url, events, secret, what in plan:
        eid = await conn.fetchval(
            "INSERT INTO endpoints (tenant, url, description, event_types, profile, secret)"
            " VALUES ($1, $2, $3, $4, 'standard', $5) RETURNING id",
            TENANT,
            url,
            f"demo: {name}",
            events,
            secret,
        )
        names[int(eid)] = name
        label = "receivers" if name == "healthy" else ""
        print(f"  {label:<11} {name:<8} {url:<38} {what}")
    return names


# --------------------------------------------------------------------------- events


def loyalty_events(n: int, seed: int = SEED) -> list[Event]:
    """A believable, reproducible story of sign-ups, points, rewards and tier upgrades."""
    rng = random.Random(seed)
    story = _Story(rng)
    return [story.next(PATTERN[i % len(PATTERN)]) for i in range(n)]


@dataclass
class _Customer:
    """One loyalty member's running state."""

    id: str
    balance: int = 0
    tier: int = 0


@dataclass
class _Story:
    """Customers whose balances and tiers stay consistent from one event to the next."""

    rng: random.Random
    customers: list[_Customer] = field(default_factory=list)

    def next(self, event_type: str) -> Event:
        """The next event of `event_type` (a sign-up if nobody has signed up yet)."""
        if event_type == "customer.created" or not self.customers:
            return self._created()
        c = self.rng.choice(self.customers)
        if event_type == "points.earned":
            return self._earned(c)
        if event_type == "points.redeemed":
            return self._redeemed(c)
        if event_type == "reward.redeemed":
            return self._reward(c)
        return self._upgraded(c)

    def _created(self) -> Event:
        """A new member signs up."""
        c = _Customer(f"cust_{self.rng.randrange(10_000, 100_000)}")
        self.customers.append(c)
        first, last = self.rng.choice(FIRST_NAMES), self.rng.choice(LAST_NAMES)
        payload = {
            "customer_id": c.id,
            "name": f"{first} {last}",
            "email": f"{first}.{last}@example.com".lower(),
            "tier": TIERS[0],
            "signup_channel": self.rng.choice(CHANNELS),
        }
        return "customer.created", payload, None

    def _earned(self, c: _Customer) -> Event:
        """Points for a purchase, more for higher tiers."""
        order_total = round(self.rng.uniform(8, 240), 2)
        amount = int(order_total * (1 + c.tier * 0.25))
        c.balance += amount
        payload = {
            "customer_id": c.id,
            "amount": amount,
            "new_balance": c.balance,
            "reason": "purchase",
            "order_id": f"ord_{self.rng.randrange(100_000, 1_000_000)}",
            "order_total": {"amount": order_total, "currency": "EUR"},
        }
        return "points.earned", payload, c.id

    def _redeemed(self, c: _Customer) -> Event:
        """Points spent as a checkout discount."""
        amount = min(c.balance, self.rng.choice((50, 100, 250)))
        c.balance -= amount
        payload = {
            "customer_id": c.id,
            "amount": amount,
            "new_balance": c.balance,
            "reason": "checkout discount",
        }
        return "points.redeemed", payload, c.id

    def _reward(self, c: _Customer) -> Event:
        """A reward claimed from the catalogue."""
        reward_id, name, cost = self.rng.choice(REWARDS)
        payload = {
            "customer_id": c.id,
            "reward_id": reward_id,
            "reward_name": name,
            "points_cost": cost,
            "voucher_code": f"LOYAL-{self.rng.randrange(16**6):06X}",
        }
        return "reward.redeemed", payload, c.id

    def _upgraded(self, c: _Customer) -> Event:
        """A move up to the next tier."""
        previous = TIERS[c.tier]
        c.tier = min(c.tier + 1, len(TIERS) - 1)
        payload = {
            "customer_id": c.id,
            "previous_tier": previous,
            "new_tier": TIERS[c.tier],
            "points_balance": c.balance,
        }
        return "tier.upgraded", payload, None


async def _insert_events(conn: asyncpg.Connection, burst: list[Event]) -> None:
    """One INSERT for the whole burst, as a backend's batch job would write it."""
    await conn.execute(
        "INSERT INTO outbox (tenant, event_type, payload, ordering_key)"
        " SELECT $1, t, p::jsonb, k FROM unnest($2::text[], $3::text[], $4::text[]) AS u (t, p, k)",
        TENANT,
        [e[0] for e in burst],
        [json.dumps(e[1], separators=(",", ":")) for e in burst],
        [e[2] for e in burst],
    )


# --------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class Progress:
    """One reading of the tables: deliveries by state, attempts begun, events not fanned out."""

    delivered: int
    retrying: int
    pending: int
    failed: int
    paused: int
    attempts: int
    unrouted: int
    elapsed: float
    rate: float = 0.0
    """Deliveries succeeded per second, over about the last second."""

    @property
    def total(self) -> int:
        """Deliveries fanned out so far, in any state."""
        return self.delivered + self.retrying + self.pending + self.failed + self.paused

    @property
    def settled(self) -> bool:
        """Every event fanned out and every delivery finished, one way or the other."""
        open_ = self.retrying + self.pending + self.paused
        return self.unrouted == 0 and open_ == 0 and self.total > 0

    def line(self) -> str:
        """One compact status line, the same on a terminal and in a log; the most telling first,
        as a narrow terminal cuts the end off."""
        paused = f"  paused {self.paused}" if self.paused else ""
        waiting = f"  events awaiting fan-out {self.unrouted}" if self.unrouted else ""
        return (
            f"{self.elapsed:4.1f}s  delivered {self.delivered} ({self.rate:.0f}/s)"
            f"  retrying {self.retrying}  failed {self.failed}  pending {self.pending}{paused}"
            f"  attempts {self.attempts}{waiting}"
        )

    def bar(self, width: int = 12) -> str:
        """Finished deliveries of those fanned out so far: # delivered, x failed."""
        if not self.total:
            return "[" + "." * width + "]"
        done = round(width * self.delivered / self.total)
        failed = min(width - done, round(width * self.failed / self.total))
        return "[" + "#" * done + "x" * failed + "." * (width - done - failed) + "]"


class _Rate:
    """A count's rate of change over about the last `window` seconds, from successive readings."""

    def __init__(self, window: float = 1.0) -> None:
        """No readings yet."""
        self.window = window
        self.samples: deque[tuple[float, int]] = deque()

    def update(self, at: float, count: int) -> float:
        """Add a reading; the rate since the newest reading at least `window` old (or the first)."""
        self.samples.append((at, count))
        while len(self.samples) > 1 and at - self.samples[1][0] >= self.window:
            self.samples.popleft()
        then, before = self.samples[0]
        return (count - before) / (at - then) if at > then else 0.0


async def _progress(conn: asyncpg.Connection, elapsed: float, rate: _Rate) -> Progress:
    """Read the counts straight from the tables the backend can read too: one query."""
    row = await conn.fetchrow(Q["demo_progress"])
    assert row is not None
    return Progress(**dict(row), elapsed=elapsed, rate=rate.update(elapsed, row["delivered"]))


async def _watch(conn: asyncpg.Connection, daemon: asyncio.Task[None]) -> Progress:
    """Show progress until everything settles, the daemon ends, or the deadline passes.

    On a terminal one line is redrawn in place every tick; otherwise (a pipe, a log, a test) a
    plain line is printed about every PLAIN_EVERY seconds, and a last one when it is over.
    """
    tty = sys.stdout.isatty()
    rate = _Rate()
    start = time.monotonic()
    shown_at = -PLAIN_EVERY
    try:
        while True:
            progress = await _progress(conn, time.monotonic() - start, rate)
            over = progress.settled or daemon.done() or progress.elapsed >= DEADLINE
            if tty:
                columns = shutil.get_terminal_size().columns - 1
                text = f"  {progress.bar()} {progress.line()}"[:columns]
                print(f"\r{text}\x1b[K", end="", flush=True)
            elif over or progress.elapsed - shown_at >= PLAIN_EVERY - TICK / 2:
                print(f"  {progress.line()}", flush=True)
                shown_at = progress.elapsed
            if over:
                return progress
            await asyncio.sleep(TICK)
    finally:
        if tty:
            print(flush=True)  # leave the last reading on screen, even after Ctrl-C


async def _wait_ready(dispatcher: Dispatcher, task: asyncio.Task[None]) -> None:
    """Wait until the daemon listens; if it dies first, surface its error."""
    ready = asyncio.ensure_future(dispatcher.ready.wait())
    try:
        await asyncio.wait({ready, task}, timeout=READY_TIMEOUT, return_when="FIRST_COMPLETED")
    finally:
        ready.cancel()
    if task.done():
        task.result()
    if not dispatcher.ready.is_set():
        raise TimeoutError(f"the dispatcher did not start within {READY_TIMEOUT:.0f}s")


async def _stop(dispatcher: Dispatcher, task: asyncio.Task[None], timeout: float) -> None:
    """Stop the daemon gracefully; cancel it only if it overstays `timeout`."""
    dispatcher.stop.set()
    _, pending = await asyncio.wait({task}, timeout=timeout)
    if pending:
        task.cancel()
        await asyncio.wait({task})


# --------------------------------------------------------------------------- the report


async def _summary(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Per-endpoint outcome and end-to-end latency (outbox insert to 2xx recorded), from SQL."""
    return list(await conn.fetch(Q["demo_summary"], TENANT))


def _ms(value: float | None) -> str:
    """Whole milliseconds; "-" when nothing was delivered."""
    return "-" if value is None else f"{value:.0f}"


def _print_summary(rows: list[asyncpg.Record], names: dict[int, str], progress: Progress) -> None:
    """The per-endpoint table."""
    print(
        f"\nDone in {progress.elapsed:.1f}s: {progress.delivered} of {progress.total} deliveries"
        f" delivered, {progress.failed} failed after every retry, {progress.attempts} attempts."
    )
    print(
        "Per endpoint; latency is end to end for delivered events, from the outbox insert to the"
        "\n2xx recorded (outbox.created_at to deliveries.completed_at):\n"
    )
    head = ("ENDPOINT", "URL", "DELIVERED", "RETRYING", "FAILED", "ATTEMPTS", "P50 ms", "P99 ms")
    table = [
        (
            names.get(r["id"], str(r["id"])),
            r["url"],
            str(r["delivered"]),
            str(r["retrying"]),
            str(r["failed"]),
            str(r["attempts"]),
            _ms(r["p50_ms"]),
            _ms(r["p99_ms"]),
        )
        for r in rows
    ]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(head)]
    for line in (head, *table):
        cells = [
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  " + "  ".join(cells))


def _print_receivers(healthy: Receiver, flaky: Receiver) -> None:
    """What the receivers saw, from their side of the wire."""
    print()
    for r in (healthy, flaky):
        print(
            f"  {r.name} receiver: {r.verified} Standard Webhooks signatures verified,"
            f" {r.invalid} invalid"
            + (f", {r.turned_away} first tries answered 503" if r.flaky else "")
        )


def _print_explore() -> None:
    """What to run next: the demo's database is gone, so against your own PostgreSQL."""
    print(
        "\nExplore further: the demo's database is gone, so against your own PostgreSQL"
        "\n(each command takes --config PATH, or set DISPATCHER_DATABASE_DSN):\n"
        "  dispatcher migrate                        create the webhooks schema\n"
        "  dispatcher endpoint add --tenant my-store --url https://example.com/webhooks \\\n"
        "      --events 'points.*'                   prints the endpoint's id and secret once\n"
        "  dispatcher run                            the daemon (systemd/dispatcher.service)\n"
        "  # then, from the loyalty backend, in the same transaction as the points change:\n"
        "  INSERT INTO webhooks.outbox (tenant, event_type, payload)\n"
        "  VALUES ('my-store', 'points.earned',\n"
        '          \'{"customer_id":"cust_123","amount":150,"new_balance":2350}\');\n'
        "  # and see what happened:\n"
        "  dispatcher status                         backlog, throughput, endpoints in trouble\n"
        "  dispatcher endpoint list                  endpoints and their failure streaks\n"
        "  dispatcher delivery list --endpoint ID --status failed\n"
        "  dispatcher delivery show DELIVERY_ID      the delivery and every attempt of it\n"
        "  dispatcher replay --endpoint ID --dry-run count; drop --dry-run to re-queue them\n"
        "  dispatcher demo --events 500              a bigger burst here"
    )


def _verdict(
    progress: Progress,
    rows: list[asyncpg.Record],
    names: dict[int, str],
    healthy: Receiver,
    flaky: Receiver,
) -> int:
    """0 if every live delivery succeeded and every dead one failed; else 1 and why on stderr."""
    problems: list[str] = []
    if not progress.settled:
        problems.append(f"work left after the {DEADLINE:.0f}s deadline")
    for r in rows:
        name = names.get(r["id"], "")
        want = "failed" if name == "dead" else "delivered"
        if r[want] != r["deliveries"]:
            problems.append(f"{name}: {r[want]} of {r['deliveries']} deliveries {want}")
    bad = healthy.invalid + flaky.invalid
    if bad:
        problems.append(f"{bad} requests carried an invalid signature")
    if problems:
        print(f"dispatcher demo: FAILED: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0
