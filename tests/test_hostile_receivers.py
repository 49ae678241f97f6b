"""Hostile and broken receivers, all served by one daemon run next to a healthy endpoint: each
fault must end as a recorded failed attempt with a clear error class and the right retry
decision, and must not slow the healthy endpoint or stop the daemon."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from aiohttp import web

from dispatcher.config import RetryConfig
from dispatcher.sending import Sender
from tests.conftest import Db, Receiver, RunningDaemon, wait_until

Factory = Callable[..., Awaitable[Receiver]]
Daemons = Callable[..., Awaitable[RunningDaemon]]
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

BIG = 50 * 1024 * 1024
SLOW_TIMEOUT_MS = 400


@dataclass
class RawServers:
    """Plain TCP servers on 127.0.0.1 that speak (or fail to speak) HTTP by hand."""

    servers: list[asyncio.Server] = field(default_factory=list)
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self, handler: Handler) -> str:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.handlers.add(task)
            try:
                await read_request(reader)
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the dispatcher gave up on us: what these servers are for
            finally:
                writer.transport.abort()
                self.handlers.discard(task)

        server = await asyncio.start_server(run, "127.0.0.1", 0)
        self.servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)


async def read_head(reader: asyncio.StreamReader) -> int:
    """A request's head, up to its blank line; returns its Content-Length (0 without one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def read_request(reader: asyncio.StreamReader) -> None:
    """The whole request, so closing never turns into a reset for unread bytes."""
    await reader.readexactly(await read_head(reader))


@pytest.fixture
async def raw() -> AsyncIterator[RawServers]:
    servers = RawServers()
    yield servers
    await servers.close()


# The faults ------------------------------------------------------------------------------------


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read()  # until the dispatcher hangs up


async def trickle_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    while True:
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.1)


async def trickle_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 10_000:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.1)


async def close_after_partial_headers(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    await writer.drain()
    writer.close()


async def reset_mid_response(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Half")
    await writer.drain()
    # Linger 0: close() sends an RST, not a FIN.
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"\x00\xff\xfe\x16\x03\x01 GARBAGE NOT HTTP\r\n\r\n")
    await writer.drain()
    writer.close()


async def huge_header_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"h" * 100_000 + b"\r\n\r\n")
    await writer.drain()
    writer.close()


async def redirect_to_bad_bytes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    # A Location that is not UTF-8: its text reaches the attempt log.
    writer.write(b"HTTP/1.1 301 Moved\r\nLocation: http://x.example/\xff\xfe\r\n")
    writer.write(b"Content-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


@dataclass
class BigBody:
    """Answers 200 with a 50 MB body and records how much of it it managed to send."""

    sent: list[int] = field(default_factory=list)
    dropped: list[bool] = field(default_factory=list)

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n".encode())
        chunk = b"x" * 65536
        sent = 0
        try:
            while sent < BIG:
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except ConnectionError:
            self.dropped.append(True)
            raise
        finally:
            self.sent.append(sent)


def self_signed_context(tmp: Path) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 that no trust store knows."""
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve_tls(context: ssl.SSLContext) -> tuple[web.AppRunner, str]:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context).start()
    return runner, f"https://127.0.0.1:{runner.addresses[0][1]}/hook"


def answer(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> Callable[..., Awaitable[web.Response]]:
    async def respond(request: web.Request, n: int) -> web.Response:
        return web.Response(status=status, body=body, headers=headers)

    return respond


# The run ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    error: str | None
    status_code: int | None
    decision: str
    detail: str = ""


async def test_hostile_receivers_each_fail_one_attempt_cleanly_beside_a_healthy_endpoint(
    db: Db,
    raw: RawServers,
    receiver_factory: Factory,
    daemon_factory: Daemons,
    tmp_path: Path,
) -> None:
    healthy = await receiver_factory()
    redirect_target = await receiver_factory()
    big = BigBody()
    tls_runner, tls_url = await serve_tls(self_signed_context(tmp_path))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        refused_port = s.getsockname()[1]

    urls = {
        "healthy": healthy.url,
        "hang": await raw.start(hang),
        "trickle_body": await raw.start(trickle_body),
        "trickle_headers": await raw.start(trickle_headers),
        "close_after_partial_headers": await raw.start(close_after_partial_headers),
        "reset_mid_response": await raw.start(reset_mid_response),
        "garbage": await raw.start(garbage),
        "huge_header_line": await raw.start(huge_header_line),
        "body_50mb": await raw.start(big),
        "http_500": (await receiver_factory(answer(500, b"boom"))).url,
        "http_500_nul_body": (await receiver_factory(answer(500, b"bad\x00\xffbytes"))).url,
        "http_503": (await receiver_factory(answer(503, headers={"Retry-After": "120"}))).url,
        "http_429": (await receiver_factory(answer(429, headers={"Retry-After": "2"}))).url,
        "http_410": (await receiver_factory(answer(410))).url,
        "http_301": (
            await receiver_factory(answer(301, headers={"Location": redirect_target.url}))
        ).url,
        "redirect_to_bad_bytes": await raw.start(redirect_to_bad_bytes),
        "refused": f"http://127.0.0.1:{refused_port}/hook",
        "tls_self_signed": tls_url,
    }
    expected = {
        "healthy": Expect(None, 200, "succeeded"),
        "hang": Expect("timeout", None, "retry", "no complete response"),
        "trickle_body": Expect("timeout", None, "retry", "no complete response"),
        "trickle_headers": Expect("timeout", None, "retry", "no complete response"),
        "close_after_partial_headers": Expect("connection_reset", None, "retry", "closed"),
        "reset_mid_response": Expect("connection_reset", None, "retry", "reset"),
        "garbage": Expect("invalid_response", None, "retry", "Bad status line"),
        "huge_header_line": Expect("invalid_response", None, "retry", "8190"),
        "body_50mb": Expect(None, 200, "succeeded"),
        "http_500": Expect("http_error", 500, "retry", "HTTP 500"),
        "http_500_nul_body": Expect("http_error", 500, "retry", "HTTP 500"),
        "http_503": Expect("http_error", 503, "retry", "HTTP 503"),
        "http_429": Expect("http_error", 429, "retry", "HTTP 429"),
        "http_410": Expect("http_error", 410, "paused", "HTTP 410"),
        "http_301": Expect("redirect", 301, "retry", f"HTTP 301 to {redirect_target.url}"),
        "redirect_to_bad_bytes": Expect("redirect", 301, "retry", "HTTP 301 to http://x.example/"),
        "refused": Expect("connect_error", None, "retry", "Connect call failed"),
        "tls_self_signed": Expect("tls_error", None, "retry", "certificate verify failed"),
    }
    slow = {"hang", "trickle_body", "trickle_headers"}
    ids: dict[str, int] = {}
    for name, url in urls.items():
        ids[name], _ = await db.add_endpoint(
            url,
            description=name,
            timeout_ms=SLOW_TIMEOUT_MS if name in slow else None,
            # One at a time, so the 410 disables before the second delivery is sent.
            max_in_flight=1 if name == "http_410" else None,
        )
    names = {v: k for k, v in ids.items()}

    # A second attempt only after 30 s (the test is long over by then), unless Retry-After says
    # otherwise: 503 asks for 120 s and gets the 5 s cap, 429 asks for 2 s and gets it.
    retry = RetryConfig(schedule=(0.0, 30.0), jitter=0.0, retry_after_max=5.0)
    daemon = await daemon_factory(replace(db.config, retry=retry))
    events = await db.insert_events(2)

    await wait_until(lambda: len(healthy.requests) == 2, timeout=5, message="healthy delivered")
    # Every delivery attempted once, except the 410 endpoint's second (paused, not sent).
    total = 2 * len(urls) - 1
    await wait_until(
        lambda: _attempt_count_reaches(db, total), timeout=15, message=f"{total} attempts"
    )
    try:
        rows = await db.conn.fetch(
            "SELECT endpoint_id, status_code, error, error_detail, decision, duration_ms,"
            " response_excerpt, extract(epoch FROM next_attempt_at - attempted_at)::float8 AS delay"
            " FROM attempts ORDER BY endpoint_id, attempted_at"
        )
        report = {
            names[r["endpoint_id"]]: (r["error"], r["status_code"], r["decision"]) for r in rows
        }
        assert report == {n: (e.error, e.status_code, e.decision) for n, e in expected.items()}
        for r in rows:
            name, expect = names[r["endpoint_id"]], expected[names[r["endpoint_id"]]]
            assert expect.detail in (r["error_detail"] or ""), (name, r["error_detail"])
            if name in slow:
                # Cut off by the total timeout, however steadily the bytes trickle in.
                assert SLOW_TIMEOUT_MS <= r["duration_ms"] < SLOW_TIMEOUT_MS + 1000, name
            if name == "http_503":
                assert r["delay"] == pytest.approx(5.0, abs=0.5)
            if name == "http_429":
                assert r["delay"] == pytest.approx(2.0, abs=0.5)
            if name == "http_500_nul_body":
                assert r["response_excerpt"] == "bad\ufffd\ufffdbytes"
            if name == "body_50mb":
                assert len(r["response_excerpt"]) == db.config.delivery.response_excerpt_bytes
        assert len([r for r in rows if names[r["endpoint_id"]] != "http_410"]) == total - 1

        # The healthy endpoint: both events, quickly, no failures counted against it.
        assert sorted(healthy.event_ids()) == sorted(events)
        healthy_ms = [r["duration_ms"] for r in rows if names[r["endpoint_id"]] == "healthy"]
        assert max(healthy_ms) < SLOW_TIMEOUT_MS
        states = {
            names[r["id"]]: (r["enabled"], r["disabled_reason"])
            for r in await db.conn.fetch("SELECT id, enabled, disabled_reason FROM endpoints")
        }
        assert states == {
            name: (False, "410 Gone") if name == "http_410" else (True, None) for name in urls
        }
        statuses = await db.conn.fetch(
            "SELECT endpoint_id, array_agg(status ORDER BY status) AS s FROM deliveries GROUP BY 1"
        )
        by_name = {names[r["endpoint_id"]]: r["s"] for r in statuses}
        assert by_name["healthy"] == by_name["body_50mb"] == ["succeeded", "succeeded"]
        assert by_name["http_410"] == ["paused", "paused"]
        assert all(s == ["pending", "pending"] for n, s in by_name.items() if n in slow)

        # Redirects are not followed; the 50 MB body was cut off, not drained.
        assert redirect_target.requests == []
        await wait_until(lambda: len(big.sent) == 2, message="big-body connections ended")
        assert big.dropped == [True, True]
        assert max(big.sent) < BIG // 2, big.sent
        assert not daemon.task.done(), "the daemon stopped"
    finally:
        await tls_runner.cleanup()


async def _attempt_count_reaches(db: Db, total: int) -> bool:
    return await db.count("SELECT count(*) FROM attempts") >= total


# The sender's own deadlines ------------------------------------------------------------------


def _sender() -> Sender:
    return Sender(
        concurrency=8,
        max_response_bytes=1024,
        excerpt_bytes=64,
        allow_http=True,
        allow_private_networks=True,
    )


async def test_requests_past_their_deadline_time_out_each_on_its_own_and_the_sender_goes_on(
    hang_server: str,
) -> None:
    sender = _sender()
    try:
        tasks = [
            asyncio.create_task(sender.send(hang_server, b"{}", {}, seconds))
            for seconds in (0.2, 0.6)
        ]
        short, long_ = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert (short.error, short.detail) == ("timeout", "no complete response within 0.2s")
        assert (long_.error, long_.detail) == ("timeout", "no complete response within 0.6s")
        assert 150 <= short.duration_ms < long_.duration_ms
        assert long_.duration_ms >= 550
        # Nothing of the timeout is left on the tasks that sent: they are not "being cancelled".
        assert [t.cancelling() for t in tasks] == [0, 0]
        # The sender goes on: a later request gets its own deadline.
        again = await sender.send(hang_server, b"{}", {}, 0.2)
        assert again.error == "timeout"
    finally:
        await sender.close()


async def test_cancelling_a_request_from_outside_still_cancels_it(
    hang_server: str, hang_servers: RawServers
) -> None:
    sender = _sender()
    try:
        task = asyncio.create_task(sender.send(hang_server, b"{}", {}, 30))
        await wait_until(lambda: hang_servers.handlers, message="the request under way")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        await sender.close()


async def test_a_header_holding_a_line_break_is_refused_and_nothing_is_sent(
    raw: RawServers,
) -> None:
    arrived: list[bool] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append(True)

    url = await raw.start(record)
    sender = _sender()
    try:
        outcome = await sender.send(url, b"{}", {"X-Shop": "42\r\nX-Forged: 1"}, 5)
        assert outcome.error == "connect_error"
        assert outcome.detail == "a header name or value holds a line break"
        # The server counts each request it reads; the next one is the first it sees.
        await sender.send(url, b"{}", {"X-Shop": "42"}, 5)
    finally:
        await sender.close()
    assert arrived == [True]


async def test_a_body_larger_than_the_socket_buffers_reaches_a_slow_reader_whole() -> None:
    received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        length = await read_head(reader)
        body = bytearray()
        while len(body) < length:
            # A reader slower than the sender, so the request outgrows the socket's buffers.
            body += await reader.read(65536)
            await asyncio.sleep(0.001)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        received.set_result(bytes(body))
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    sender = _sender()
    body = bytes(range(256)) * (32 * 1024)  # 8 MiB
    try:
        outcome = await asyncio.wait_for(sender.send(url, body, {}, 30), 30)
        assert (outcome.status_code, outcome.error) == (200, None)
        assert await asyncio.wait_for(received, 5) == body
    finally:
        await sender.close()
        server.close()


@pytest.mark.parametrize("then_close", [False, True], ids=["then-stops-reading", "then-closes"])
async def test_an_answer_sent_before_a_large_body_is_read_is_the_outcome_and_the_next_request_works(
    then_close: bool,
) -> None:
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            length = await read_head(reader)
            if length <= 1024:
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                continue
            # Refused on its headers alone; the body is never read.
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
            await writer.drain()
            if then_close:
                writer.close()
                return
            await asyncio.Event().wait()

    server = await asyncio.start_server(early, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"
    sender = _sender()
    try:
        big = await asyncio.wait_for(sender.send(url, b"x" * (16 * 1024 * 1024), {}, 30), 30)
        assert (big.status_code, big.error, big.excerpt) == (413, "http_error", "big")
        small = await asyncio.wait_for(sender.send(url, b"{}", {}, 5), 10)
        assert (small.status_code, small.error) == (200, None)
    finally:
        await sender.close()
        server.close()


@pytest.fixture
async def hang_servers() -> AsyncIterator[RawServers]:
    servers = RawServers()
    try:
        yield servers
    finally:
        await servers.close()


@pytest.fixture
async def hang_server(hang_servers: RawServers) -> str:
    """The URL of a server that reads the request and never answers."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    return await hang_servers.start(hang)
