"""The address policy: which destinations a webhook may never reach (no SSRF)."""

from __future__ import annotations

import ipaddress

# Networks that are never a merchant's server, beyond what ipaddress calls non-global.
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
# IETF protocol assignments: Python 3.11 calls only parts of it private (not 192.0.0.8, a dummy
# address, nor the PCP and TURN anycast addresses, which are services, not receivers).
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")
_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
# IPv6 forms that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052) and SIIT's
# IPv4-translated form. Judged by the IPv4 address they lead to.
_EMBEDDING_V4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))
# IPv4-compatible (::a.b.c.d, deprecated; Linux may tunnel it), local-use NAT64 (RFC 8215) and
# site-local (deprecated): none is a public server, and older Pythons call them global.
_NOT_PUBLIC_V6 = (
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("fec0::/10"),
)


def forbidden_address(text: str) -> str | None:
    """Why an IP address may not be connected to under the default policy, or None."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(text.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and any(ip in net for net in _EMBEDDING_V4):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            ip = embedded
    if ip in _METADATA:
        return "cloud metadata address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_unspecified:
        return "unspecified address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "shared (CGNAT) address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _IETF_V4:
        return "private address"
    if isinstance(ip, ipaddress.IPv6Address) and any(ip in net for net in _NOT_PUBLIC_V6):
        return "private address"
    if ip.is_private or not ip.is_global:
        return "private address"
    return None
