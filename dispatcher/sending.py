"""Delivery over HTTP: one shared aiohttp session, redirects never followed, bodies read to a cap,
and every connection checked against the address policy at connect time (no SSRF)."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import aiohttp
from aiohappyeyeballs import AddrInfoType
from aiohttp.abc import AbstractResolver
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from . import __version__
from .addresses import forbidden_address

USER_AGENT = f"loyalty-webhook-dispatcher/{__version__}"

# aiohttp's own timeouts cost a timer, a timeout context and task lookups on every request
# (5 % of a plain aiohttp loop's instructions per request, measured with callgrind); requests
# go without them, and one sweeper cancels those past their deadline instead. It looks at
# least this often (seconds), so a deadline shorter than every other pending one is late by
# at most this much.
_SWEEP_EVERY = 0.1
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None)
# Parsed URLs by their text; endpoints are few and their URLs change rarely.
_URL_CACHE_MAX = 10_000
_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Written:
    """What aiohttp's response asks of the request's writer once the request is out."""

    output_size = 0


_WRITTEN = _Written()


@dataclass(frozen=True, slots=True)
class _Target:
    """A parsed endpoint URL: the connector's request, the request head's fixed lines, and
    what aiohttp's errors say about the request."""

    url: URL
    request: aiohttp.ClientRequest
    head: str
    info: aiohttp.RequestInfo


class BlockedAddressError(OSError):
    """The destination resolved to an address the policy forbids."""


def guarded_socket_factory(addr_info: AddrInfoType) -> socket.socket:
    """Open a socket only for an allowed destination: the check sees the address really used."""
    family, type_, proto, _, sockaddr = addr_info
    why = forbidden_address(str(sockaddr[0]))
    if why:
        raise BlockedAddressError(f"blocked {why} {sockaddr[0]}")
    sock = socket.socket(family=family, type=type_, proto=proto)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one HTTP attempt came to."""

    status_code: int | None
    error: str | None  # error class: timeout, dns_error, tls_error, connect_error, ...
    detail: str | None
    excerpt: str | None
    duration_ms: int
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.status_code is not None and 200 <= self.status_code < 300

    @property
    def summary(self) -> str | None:
        """A short error line for deliveries.last_error (None on success)."""
        if self.ok:
            return None
        if self.detail:
            return f"{self.error}: {self.detail}"[:500]
        return self.error


class Sender:
    """A bounded pool of connections shared by every delivery of this process."""

    def __init__(
        self,
        *,
        concurrency: int,
        max_response_bytes: int,
        excerpt_bytes: int,
        allow_http: bool,
        allow_private_networks: bool,
        user_agent: str = "",
        ssl_context: ssl.SSLContext | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.max_response_bytes = max_response_bytes
        self.excerpt_bytes = excerpt_bytes
        self.allow_http = allow_http
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._connector = aiohttp.TCPConnector(
            limit=concurrency,
            limit_per_host=0,
            ttl_dns_cache=10,
            resolver=resolver,
            ssl=self._ssl,
            socket_factory=None if allow_private_networks else guarded_socket_factory,
        )
        if any(c in (user_agent or "") for c in "\r\n"):
            raise ValueError("the user agent holds a line break")
        self.user_agent = user_agent or USER_AGENT
        # Owns the connector; requests are written on its connections directly (`_post`),
        # never from a cookie jar, so a receiver's cookies are never sent back.
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._targets: dict[str, _Target] = {}
        # Requests under way and their deadlines (loop time); those the sweeper cancelled.
        self._deadlines: dict[asyncio.Task[object], float] = {}
        self._timed_out: set[asyncio.Task[object]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self._session.close()

    def resize(self, concurrency: int) -> None:
        """A new connection limit (a config reload); requests under way keep theirs."""
        # aiohttp has no public setter; the limit is read afresh at each connection acquire.
        self._connector._limit = concurrency

    async def send(self, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Outcome:
        """POST once; never raises for anything the network or the receiver does."""
        started = time.perf_counter()

        def done(
            status: int | None,
            error: str | None,
            detail: str | None = None,
            excerpt: str | None = None,
            retry_after: float | None = None,
        ) -> Outcome:
            ms = int((time.perf_counter() - started) * 1000)
            return Outcome(status, error, _text(detail), _text(excerpt), ms, retry_after)

        if not self.allow_http and url[:8].lower() != "https://":
            return done(None, "blocked_address", "plain http is not allowed")
        task = asyncio.current_task()
        assert task is not None
        self._deadlines[task] = asyncio.get_running_loop().time() + timeout
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="http-timeouts")
        try:
            async with await self._post(url, body, headers) as resp:
                raw = await self._read_capped(resp)
                excerpt = raw[: self.excerpt_bytes].decode("utf-8", "replace")
                status = resp.status
                if 200 <= status < 300:
                    return done(status, None, None, excerpt)
                if 300 <= status < 400:
                    where = resp.headers.get("Location", "(no Location)")
                    return done(status, "redirect", f"HTTP {status} to {where[:300]}", excerpt)
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                return done(status, "http_error", f"HTTP {status}", excerpt, retry_after)
        except asyncio.CancelledError:
            if task not in self._timed_out:
                raise  # stopping: not ours to swallow
            return done(None, "timeout", f"no complete response within {timeout:g}s")
        except (TimeoutError, aiohttp.ServerTimeoutError):
            return done(None, "timeout", f"no complete response within {timeout:g}s")
        except aiohttp.ClientConnectorDNSError as exc:
            return done(None, "dns_error", _first_line(exc.os_error))
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError) as exc:
            return done(None, "tls_error", _first_line(exc))
        except aiohttp.ClientConnectorError as exc:
            if "blocked" in str(exc.os_error):
                return done(None, "blocked_address", _first_line(exc.os_error))
            return done(None, "connect_error", _first_line(exc.os_error))
        except aiohttp.ServerDisconnectedError:
            return done(None, "connection_reset", "closed before the response was complete")
        except ConnectionResetError as exc:
            return done(None, "connection_reset", _first_line(exc))
        except aiohttp.ClientOSError as exc:
            # Connected, then the connection broke (an RST mid-response, a broken pipe).
            if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED):
                return done(None, "connection_reset", _first_line(exc))
            return done(None, "connect_error", _first_line(exc))
        except aiohttp.ClientResponseError as exc:
            # Not HTTP, or HTTP past the parser's limits (garbage bytes, an 8 KB header line).
            return done(None, "invalid_response", _first_line(exc.message).rstrip(":"))
        except aiohttp.ClientPayloadError as exc:
            return done(None, "invalid_response", _first_line(exc))
        except ssl.SSLError as exc:
            return done(None, "tls_error", _first_line(exc))
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            return done(None, "connect_error", _first_line(exc))
        finally:
            del self._deadlines[task]
            if task in self._timed_out:
                # Withdraw the sweeper's cancel, whatever became of it on the way out, so the
                # task is not left "being cancelled".
                self._timed_out.discard(task)
                task.uncancel()

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """One POST on a connection from aiohttp's connector, its response read by aiohttp's
        parser, the request itself handed to the transport at once. The connector still opens,
        checks (the address policy) and reuses every connection. aiohttp's request layer does work a
        webhook never needs: the session's redirects, cookies, proxies, traces and timers were a
        third of the client's CPU per request, and ClientRequest's header and body writers
        (with a task per request for the body) half of what was left."""
        target = self._targets.get(url)
        if target is None:
            target = self._target(url)
        block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if block.count("\n") != len(headers) or block.count("\r") != len(headers):
            # Endpoints' headers are checked where they are loaded; this keeps any other
            # caller from splitting a request.
            raise ValueError("a header name or value holds a line break")
        head = f"{target.head}{block}Content-Length: {len(body)}\r\n\r\n".encode()
        conn = await self._connector.connect(target.request, [], _NO_TIMEOUT)
        try:
            protocol = conn.protocol
            assert protocol is not None
            transport = protocol.transport
            if transport is None or transport.is_closing():
                raise aiohttp.ClientConnectionResetError("the connection closed before the request")
            protocol.set_response_params(read_until_eof=True, auto_decompress=False)
            transport.writelines((head, body))
            if transport.get_write_buffer_size():
                # The socket did not take it all: the transport sends the rest while the answer
                # is read, since a receiver may answer (413, 410) before it reads the whole
                # body. Such a connection is not used again: bytes of this request may still
                # be queued on it when the answer is complete.
                protocol.force_close()
            resp = aiohttp.ClientResponse(
                "POST",
                target.url,
                writer=None,
                continue100=None,
                timer=None,  # type: ignore[arg-type]  # aiohttp takes None for "no timer"
                request_info=target.info,
                traces=[],
                loop=asyncio.get_running_loop(),
                session=self._session,
                stream_writer=_WRITTEN,  # type: ignore[arg-type]  # only output_size is read
            )
            try:
                await resp.start(conn)
            except BaseException:
                resp.close()
                raise
        except BaseException:
            conn.close()
            raise
        return resp

    def _target(self, url: str) -> _Target:
        """Parse and remember a URL: endpoints are few and their URLs change rarely."""
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise aiohttp.InvalidUrlClientError(url)
        # Only for the connector: the key of the connection pool and what to connect to.
        request = aiohttp.ClientRequest(
            "POST",
            parsed,
            loop=asyncio.get_running_loop(),
            session=self._session,
            ssl=self._ssl,
        )
        head = (
            f"POST {parsed.raw_path_qs} HTTP/1.1\r\n"
            f"Host: {parsed.host_port_subcomponent}\r\n"
            f"User-Agent: {self.user_agent}\r\n"
        )
        info = aiohttp.RequestInfo(parsed, "POST", _NO_HEADERS, parsed)
        if len(self._targets) >= _URL_CACHE_MAX:
            self._targets.clear()
        target = self._targets[url] = _Target(parsed, request, head, info)
        return target

    async def _sweep(self) -> None:
        """Cancel requests past their deadline; `send` turns that into a timeout outcome. Runs
        while requests are under way, waking at the nearest deadline or every _SWEEP_EVERY."""
        loop = asyncio.get_running_loop()
        try:
            while self._deadlines:
                now = loop.time()
                wake = now + _SWEEP_EVERY
                for task, deadline in self._deadlines.items():
                    if deadline <= now:
                        if task not in self._timed_out:
                            self._timed_out.add(task)
                            task.cancel()
                    elif deadline < wake:
                        wake = deadline
                await asyncio.sleep(wake - now)
        finally:
            self._sweeper = None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """Read the body up to the cap; beyond it drop the connection rather than drain it."""
        length = resp.content_length
        if length is not None and length <= self.max_response_bytes:
            # The usual small answer of a declared length: the parser stops at that length, so
            # reading it whole is bounded, and cheaper than reading it in capped chunks.
            return await resp.read()
        chunks: list[bytes] = []
        total = 0
        while total < self.max_response_bytes:
            chunk = await resp.content.read(self.max_response_bytes - total)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
        if not resp.content.at_eof():
            resp.close()
        return b"".join(chunks)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _text(value: str | None) -> str | None:
    """Receiver-chosen text as PostgreSQL can store it: text columns refuse NUL, and UTF-8
    has no lone surrogates (aiohttp decodes header bytes that are not UTF-8 into them)."""
    if value is None:
        return None
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.replace("\x00", "\ufffd")


def _first_line(exc: BaseException | str | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    if not text:
        return "" if isinstance(exc, str) else type(exc).__name__
    return text.splitlines()[0][:300]
