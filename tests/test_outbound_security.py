"""Outbound security: the address classifier, the connect-time guard (a resolver that points a
public-looking name at loopback), URL and header checks for CLI input and for rows written in
SQL, and headers that could split a request or replace the dispatcher's own."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import replace
from typing import Any

import asyncpg
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.addresses import forbidden_address
from dispatcher.daemon import Dispatcher
from dispatcher.endpoints import Endpoint, InvalidEndpoint, validate_headers, validate_url
from dispatcher.signing import SigningProfile, generate_secret
from tests.conftest import Db, Receiver, RunningDaemon, wait_until
from tests.test_cli import assert_one_error_line, cli, db_env

# The address classifier ------------------------------------------------------------------------

BLOCKED: dict[str, str] = {
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "10.1.2.3": "private",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.168.1.1": "private",
    "169.254.1.1": "link-local",
    "169.254.169.254": "metadata",
    "100.64.0.1": "CGNAT",
    "100.127.255.255": "CGNAT",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "0.0.0.0": "unspecified",  # noqa: S104 (an address to refuse, not one to bind)
    "0.1.2.3": "private",
    "255.255.255.255": "private",
    "192.0.2.1": "private",
    "192.0.0.8": "private",
    "192.0.0.9": "private",
    "198.18.0.1": "private",
    "240.0.0.1": "private",
    "::1": "loopback",
    "::": "unspecified",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fc00::1": "private",
    "fd12:3456::1": "private",
    "fd00:ec2::254": "metadata",
    "ff02::1": "multicast",
    "fec0::1": "private",
    "2001:db8::1": "private",
    # IPv4-mapped, NAT64 (well-known and local-use), 6to4, SIIT and IPv4-compatible forms.
    "::ffff:127.0.0.1": "loopback",
    "::ffff:10.0.0.1": "private",
    "::ffff:169.254.169.254": "metadata",
    "::ffff:100.64.0.1": "CGNAT",
    "64:ff9b::7f00:1": "loopback",
    "64:ff9b::a9fe:a9fe": "metadata",
    "64:ff9b::c0a8:101": "private",
    "64:ff9b:1::a00:1": "private",
    "2002:7f00:1::": "loopback",
    "2002:a9fe:a9fe::1": "metadata",
    "::ffff:0:7f00:1": "loopback",
    "::7f00:1": "private",
    "::808:808": "private",
}
ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.0",
    "172.32.0.1",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",
    "2002:808:808::1",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
]


@pytest.mark.parametrize(("address", "why"), BLOCKED.items())
def test_the_classifier_blocks_every_non_public_form(address: str, why: str) -> None:
    reason = forbidden_address(address)
    assert reason is not None, address
    assert why in reason, (address, reason)


@pytest.mark.parametrize("address", ALLOWED)
def test_the_classifier_allows_public_addresses_in_every_form(address: str) -> None:
    assert forbidden_address(address) is None


BLOCKED_V4 = [
    ipaddress.IPv4Network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    )
]
BLOCKED_V6 = [
    ipaddress.IPv6Network(n)
    for n in (
        "::/96",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        "64:ff9b:1::/48",
        "2001:db8::/32",
    )
]


def _in(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> st.SearchStrategy[int]:
    return st.integers(int(net.network_address), int(net.broadcast_address))


def _v6_forms(v4: int) -> list[str]:
    """The IPv6 spellings that lead to IPv4 address `v4`."""
    return [
        str(ipaddress.IPv6Address((0xFFFF << 32) | v4)),  # ::ffff:a.b.c.d
        str(ipaddress.IPv6Address((0x64FF9B << 96) | v4)),  # 64:ff9b::a.b.c.d
        str(ipaddress.IPv6Address((0x2002 << 112) | (v4 << 80) | 1)),  # 2002:AABB:CCDD::1
        str(ipaddress.IPv6Address((0xFFFF << 48) | v4)),  # ::ffff:0:a.b.c.d
    ]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(BLOCKED_V4).flatmap(_in))
def test_a_blocked_ipv4_address_is_blocked_in_every_ipv6_form(v4: int) -> None:
    assert forbidden_address(str(ipaddress.IPv4Address(v4)))
    for form in _v6_forms(v4):
        assert forbidden_address(form), form


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_any_ipv4_address_is_judged_the_same_in_its_mapped_and_nat64_forms(v4: int) -> None:
    verdict = forbidden_address(str(ipaddress.IPv4Address(v4))) is None
    assert [forbidden_address(form) is None for form in _v6_forms(v4)] == [verdict] * 4


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(BLOCKED_V6).flatmap(_in))
def test_any_address_in_a_blocked_ipv6_network_is_blocked(v6: int) -> None:
    assert forbidden_address(str(ipaddress.IPv6Address(v6)))


# The connect-time guard ------------------------------------------------------------------------


class PinnedResolver(AbstractResolver):
    """DNS that answers `address` for every name: a rebinding attacker's resolver."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        return [
            ResolveResult(
                hostname=host,
                host=self.address,
                port=port,
                family=socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


async def test_a_public_name_resolving_to_loopback_is_blocked_on_every_attempt(
    db: Db, receiver: Receiver
) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    # A name: the URL check cannot judge it, only the address really connected to can.
    url = f"http://hooks.merchant.example:{port}/hook"
    validate_url(url, allow_http=True)
    await db.add_endpoint(url)
    resolver = PinnedResolver("127.0.0.1")
    strict = replace(db.config, security=replace(db.config.security, allow_private_networks=False))
    daemon = await RunningDaemon(Dispatcher(strict, resolver=resolver)).ready()
    try:
        await db.insert_events(1)
        await wait_until(
            lambda: db.count("SELECT count(*) FROM deliveries WHERE status = 'failed'"),
            message="delivery failed after every scheduled attempt",
        )
    finally:
        await daemon.stop()
    attempts = await db.conn.fetch("SELECT error, error_detail FROM attempts ORDER BY attempt")
    assert [a["error"] for a in attempts] == ["blocked_address"] * len(db.config.retry.schedule)
    assert all("127.0.0.1" in a["error_detail"] for a in attempts)
    assert "hooks.merchant.example" in resolver.asked
    assert receiver.requests == []

    # The same name and resolver with private networks allowed: delivered, so the block above
    # came from the policy on the resolved address and nothing else.
    daemon = await RunningDaemon(Dispatcher(db.config, resolver=resolver)).ready()
    try:
        await db.insert_events(1)
        await wait_until(lambda: len(receiver.requests) == 1, message="delivered when allowed")
    finally:
        await daemon.stop()


class FlakyResolver(PinnedResolver):
    """DNS that fails (name not known) while `down`, then answers `address`."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self.down = True

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self.down:
            self.asked.append(host)
            raise OSError(socket.EAI_NONAME, f"{host}: Name or service not known")
        return await super().resolve(host, port, family)


async def test_dns_that_fails_is_a_retried_dns_error_and_delivery_resumes_when_it_answers(
    db: Db, receiver: Receiver
) -> None:
    port = int(receiver.url.split(":")[2].split("/")[0])
    await db.add_endpoint(f"http://hooks.merchant.example:{port}/hook")
    healthy, _ = await db.add_endpoint(receiver.url.replace("/hook", "/other"))
    resolver = FlakyResolver("127.0.0.1")
    slow = replace(db.config, retry=replace(db.config.retry, schedule=(0.0,) + (0.2,) * 50))
    daemon = await RunningDaemon(Dispatcher(slow, resolver=resolver)).ready()
    try:
        await db.insert_events(2)

        async def lookups_failed() -> bool:
            return await db.count("SELECT count(*) FROM attempts WHERE error = 'dns_error'") >= 4

        await wait_until(lookups_failed, message="failed lookups recorded")
        # The other endpoint (an address, no lookup) was served all along.
        assert [r.path for r in receiver.requests] == ["/other", "/other"]
        resolver.down = False

        async def all_delivered() -> bool:
            return await db.count("SELECT count(*) FROM deliveries WHERE status = 'succeeded'") == 4

        await wait_until(all_delivered, message="delivered once the name resolves")
    finally:
        await daemon.stop()
    rows = await db.conn.fetch(
        "SELECT error, error_detail, decision FROM attempts WHERE endpoint_id <> $1", healthy
    )
    failed = [r for r in rows if r["error"] == "dns_error"]
    assert {r["decision"] for r in failed} == {"retry"}
    assert all("hooks.merchant.example" in r["error_detail"] for r in failed)


async def test_plain_http_written_in_sql_is_refused_at_send_time_unless_allowed(
    db: Db, receiver: Receiver
) -> None:
    await db.add_endpoint(receiver.url)
    no_http = replace(db.config, security=replace(db.config.security, allow_http=False))
    daemon = await RunningDaemon(Dispatcher(no_http)).ready()
    try:
        await db.insert_events(1)
        await wait_until(
            lambda: db.count("SELECT count(*) FROM attempts"), message="an attempt recorded"
        )
    finally:
        await daemon.stop()
    row = await db.row("SELECT error, error_detail FROM attempts LIMIT 1")
    assert (row["error"], row["error_detail"]) == ("blocked_address", "plain http is not allowed")
    assert receiver.requests == []


# URLs ------------------------------------------------------------------------------------------

BAD_URLS = {
    "ftp://example.com/h": "scheme",
    "example.com/h": "scheme",
    "javascript:alert(1)": "scheme",
    "http://example.com/h": "plain http",
    "https:///h": "no host",
    "https://:8443/h": "no host",
    "https://user:pw@example.com/h": "credentials",
    "https://user@example.com/h": "credentials",
    "https://@example.com/h": "credentials",
    "https://exa mple.com/h": "whitespace",
    "https://example.com/h\r\nX-Injected: 1": "whitespace",
    "https://example.com/\x01": "control",
    "https://example.com/h#frag": "fragment",
    "https://example.com:99999/h": "url",
    "https://example.com:0/h": "port 0",
    "https://[::1/h": "url",
    "https://example.com/" + "x" * 2048: "longer than 2048",
}


@pytest.mark.parametrize(
    ("url", "why"), BAD_URLS.items(), ids=[f"url{i}" for i in range(len(BAD_URLS))]
)
def test_validate_url_refuses_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        validate_url(url, allow_http=False)
    assert why in str(info.value)
    assert "\n" not in str(info.value)
    assert "pw@" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/h",
        "https://example.com:8443/hooks?x=1&y=%20",
        "https://[2001:db8::1]:8443/h",
        "https://bücher.example/h",
        "https://example.com/path/with@sign",
    ],
)
def test_validate_url_accepts_ordinary_urls(url: str) -> None:
    assert validate_url(url, allow_http=False) == url


URL_CHECK = "endpoints_url_http_or_https_no_credentials_max_2048"
URL_HOST_CHECK = "endpoints_url_names_a_host_no_control_chars"
HEADER_CHECK = "endpoints_headers_tokens_no_crlf_not_set_by_dispatcher"


@pytest.mark.parametrize(
    ("columns", "constraint"),
    [
        ({"url": "https://u:p@example.com/h"}, URL_CHECK),
        ({"url": "https://exa mple.com/h"}, URL_CHECK),
        ({"url": "https://example.com/h\r\nX: 1"}, URL_CHECK),
        ({"url": "https:///h"}, URL_CHECK),
        ({"url": "https://:8443/h"}, URL_HOST_CHECK),
        ({"url": "https://example.com/\x01"}, URL_HOST_CHECK),
        ({"url": "https://exa\x7fmple.com/h"}, URL_HOST_CHECK),
        ({"headers": '{"X-A": "1\\r\\nX-Injected: 1"}'}, HEADER_CHECK),
        ({"headers": '{"X-A": "1\\nX-B: 2"}'}, HEADER_CHECK),
        ({"headers": '{"X A": "1"}'}, HEADER_CHECK),
        ({"headers": '{"X-A\\r\\nX-B": "1"}'}, HEADER_CHECK),
        ({"headers": '{"X-N": 5}'}, HEADER_CHECK),
        ({"headers": '{"x-long": "' + "v" * 4097 + '"}'}, HEADER_CHECK),
        ({"headers": '{"Content-Type": "text/plain"}'}, HEADER_CHECK),
        ({"headers": '{"USER-AGENT": "curl"}'}, HEADER_CHECK),
        ({"headers": '{"Host": "internal"}'}, HEADER_CHECK),
        ({"headers": '{"webhook-signature": "v1,forged"}'}, HEADER_CHECK),
        ({"headers": '{"Webhook-Id": "evt_x"}'}, HEADER_CHECK),
        ({"headers": '{"webhook-timestamp": "1"}'}, HEADER_CHECK),
        ({"headers": '{"Stripe-Signature": "x"}', "profile": "stripe"}, HEADER_CHECK),
        (
            {
                "headers": '{"x-loyali-signature": "x"}',
                "profile": "stripe",
                "signature_header": "X-Loyali-Signature",
            },
            HEADER_CHECK,
        ),
        (
            {
                "headers": '{"x-ts": "1"}',
                "profile": "hmac",
                "signed": "timestamp.body",
                "timestamp_header": "X-Ts",
            },
            HEADER_CHECK,
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
async def test_a_row_written_in_sql_is_refused_naming_the_constraint(
    db: Db, columns: dict[str, Any], constraint: str
) -> None:
    values: dict[str, Any] = {"url": "https://example.com/h", "secret": "s" * 32, **columns}
    url = values.pop("url")
    with pytest.raises(asyncpg.CheckViolationError) as info:
        await db.add_endpoint(url, **values)
    assert info.value.constraint_name == constraint
    assert constraint in str(info.value)
    assert await db.count("SELECT count(*) FROM endpoints") == 0


async def test_sql_rows_with_ordinary_urls_and_headers_are_accepted(db: Db) -> None:
    for url in ("https://example.com:8443/h?x=1", "https://[2001:db8::1]/h", "https://h.example"):
        await db.add_endpoint(url, headers='{"Authorization": "Bearer abc", "X-Shop": "42"}')
    # Another profile's signature header is only a header.
    await db.add_endpoint("https://example.com/h", headers='{"Stripe-Signature": "x"}')
    assert await db.count("SELECT count(*) FROM endpoints") == 4


# Headers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "profile", "why"),
    [
        ({"X-A": "1\r\nX-Injected: 1"}, SigningProfile(), "line break"),
        ({"X-A": "1\x00"}, SigningProfile(), "NUL"),
        ({"X-A\r\n": "1"}, SigningProfile(), "not a valid header name"),
        ({"content-type": "text/plain"}, SigningProfile(), "cannot be overridden"),
        ({"User-Agent": "x"}, SigningProfile(), "cannot be overridden"),
        ({"Webhook-Id": "x"}, SigningProfile(), "cannot be overridden"),
        ({"webhook-timestamp": "1"}, SigningProfile(), "cannot be overridden"),
        ({"webhook-id": "x"}, SigningProfile(kind="stripe"), "cannot be overridden"),
        ({"stripe-signature": "x"}, SigningProfile(kind="stripe"), "cannot be overridden"),
        ({"X-A": "v" * 4097}, SigningProfile(), "longer than 4096"),
    ],
)
def test_validate_headers_refuses_injection_and_overrides(
    headers: dict[str, str], profile: SigningProfile, why: str
) -> None:
    with pytest.raises(InvalidEndpoint, match=why):
        validate_headers(headers, profile)


def _row(**columns: Any) -> dict[str, Any]:
    return {
        "id": 7,
        "tenant": "t",
        "url": "https://example.com/h",
        "profile": "standard",
        "signature_header": None,
        "algorithm": "sha256",
        "encoding": "hex",
        "signed": "body",
        "prefix": "",
        "timestamp_header": None,
        "secret": generate_secret("standard"),
        "old_secret": None,
        "old_secret_expires_at": None,
        "headers": {},
        "ordered": False,
        "max_in_flight": None,
        "timeout_ms": None,
        "enabled": True,
        "version": 1,
        **columns,
    }


def test_unsafe_stored_headers_are_dropped_and_the_dispatchers_own_win() -> None:
    from datetime import UTC, datetime

    stored = {
        "X-Ok": "fine",
        "X-Number": 5,
        "X-Split": "a\r\nX-Injected: 1",
        "X-Bad Name": "1",
        "content-type": "text/plain",
        "USER-AGENT": "evil",
        "Webhook-Signature": "v1,forged",
        "webhook-id": "evt_forged",
        "Webhook-Timestamp": "1",
        "x-null": None,
    }
    endpoint = Endpoint.from_row(_row(headers=stored))
    assert dict(endpoint.headers) == {"X-Number": "5", "X-Ok": "fine"}
    sent = endpoint.request_headers("evt_1", "points.earned", 1, b"{}", datetime.now(UTC))
    lowered = [name.lower() for name in sent]
    assert len(lowered) == len(set(lowered)), sent
    assert sent["Content-Type"] == "application/json"
    assert sent["webhook-id"] == "evt_1"
    assert sent["webhook-signature"].startswith("v1,")


async def test_unsafe_headers_in_a_pre_check_row_never_reach_the_receiver(
    db: Db, receiver: Receiver
) -> None:
    # A row from before migration 007 (or written around it): the daemon must still be safe.
    await db.conn.execute(f"ALTER TABLE endpoints DROP CONSTRAINT {HEADER_CHECK}")
    stored = (
        '{"X-Ok": "fine", "X-Split": "a\\r\\nX-Injected: 1", "content-type": "text/plain",'
        ' "user-agent": "evil", "webhook-signature": "v1,forged", "webhook-id": "forged"}'
    )
    await db.add_endpoint(receiver.url, headers=stored)
    daemon = await RunningDaemon(Dispatcher(db.config)).ready()
    try:
        (event_id,) = await db.insert_events(1)
        await wait_until(lambda: len(receiver.requests) == 1, message="delivered")
    finally:
        await daemon.stop()
    got = {k.lower(): v for k, v in receiver.requests[0].headers.items()}
    assert got["x-ok"] == "fine"
    assert "x-split" not in got
    assert "x-injected" not in got
    assert got["content-type"] == "application/json"
    assert got["user-agent"].startswith("loyalty-webhook-dispatcher/")
    assert got["webhook-id"] == event_id
    assert got["webhook-signature"] != "v1,forged"


# The command line ------------------------------------------------------------------------------


async def test_endpoint_update_refuses_bad_urls_and_headers_with_one_line(db: Db) -> None:
    # `endpoint add` is covered by test_cli's ERRORS table; the checks themselves above.
    eid, _ = await db.add_endpoint("https://example.com/h")
    cases = [
        (("--url", "https://user:pw@example.com/h"), ("credentials",)),
        (("--header", "X-A=1\r\nX-Injected: 1"), ("X-A", "line break")),
    ]
    runs = await asyncio.gather(
        *(cli("endpoint", "update", str(eid), *options, env=db_env(db)) for options, _ in cases)
    )
    for run, (_, fragments) in zip(runs, cases, strict=True):
        assert_one_error_line(run, *fragments, absent=("pw@",))
    assert await db.count("SELECT version FROM endpoints") == 1
