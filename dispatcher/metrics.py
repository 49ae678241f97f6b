"""Metrics and health: Prometheus counters, and /metrics, /healthz, /readyz over HTTP."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    """One registry per daemon, so several daemons in one test process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.attempts = Counter(
            "webhook_attempts", "HTTP attempts by outcome", ["outcome"], registry=r
        )
        self.deliveries = Counter(
            "webhook_deliveries_finished",
            "Deliveries that reached a final state",
            ["status"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "webhook_attempt_duration_seconds",
            "Time of one HTTP attempt",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge("webhook_requests_in_flight", "Requests in flight", registry=r)
        self.unrecorded = Gauge(
            "webhook_results_unrecorded", "Attempts sent, waiting to be recorded", registry=r
        )
        self.endpoints_disabled = Counter(
            "webhook_endpoints_disabled", "Endpoints disabled by the dispatcher", registry=r
        )
        self.listener_reconnects = Counter(
            "webhook_listener_reconnects", "LISTEN connection re-established", registry=r
        )
        self.claim_batch = Histogram(
            "webhook_claim_batch_size",
            "Deliveries per claim",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.write_batch = Histogram(
            "webhook_write_batch_size",
            "Results per write-back",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.pruned = Counter(
            "webhook_pruned_rows", "Rows deleted by retention", ["table"], registry=r
        )
        self.prune_passes = Counter(
            "webhook_prune_passes",
            "Retention passes: done, skipped (another process was pruning) or error",
            ["outcome"],
            registry=r,
        )
        # Sampled every [log] summary_interval (dispatcher.monitoring), not kept live.
        self.backlog = Gauge(
            "webhook_deliveries_backlog",
            "Deliveries by status (pending, delivering, paused, failed; succeeded not counted)",
            ["status"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "webhook_outbox_backlog", "Events not fanned out yet", registry=r
        )
        self.lag = Gauge(
            "webhook_lag_seconds",
            "How long the oldest due delivery or event not fanned out has waited",
            registry=r,
        )


async def start_http(
    listen: str, metrics: Metrics, readiness: Callable[[], list[str]]
) -> web.AppRunner | None:
    """Serve /metrics, /healthz and /readyz on HOST:PORT; "" serves nothing."""
    if not listen:
        return None

    async def metrics_view(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        failed = readiness()
        if failed:
            return web.Response(status=503, text="not ready: " + "; ".join(failed) + "\n")
        return web.Response(text="ready\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host.strip("[]"), int(port)).start()
    return runner
