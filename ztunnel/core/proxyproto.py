"""PROXY protocol v2 header for application tunnels (upstream `src/proxy.rs::write_proxy_protocol`).

An inbound HBONE connection to a workload whose `application_tunnel` protocol is PROXY (a
"sandwiched" waypoint or gateway that speaks no HBONE) is handed over as plain TCP that
starts with this header: command PROXY, transport STREAM, the original client address as
source, the tunnel target (the CONNECT authority, or the service VIP for a hostname) as
destination, and TLV 0xD0 carrying the client's SPIFFE identity when it has one.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt §2.2.
"""

from __future__ import annotations

import ipaddress
import struct

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2_PROXY = 0x21  # version 2 << 4 | command PROXY
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21
AUTHORITY_TLV = 0xD0  # upstream PROXY_PROTOCOL_AUTHORITY_TLV: the source identity

Address = tuple[str, int]


def encode_v2(src: Address, dst: Address, identity: str | None = None) -> bytes:
    """The header for a connection from `src` to `dst`; IPv4 with IPv6 maps to IPv6."""
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if isinstance(s, ipaddress.IPv4Address) and isinstance(d, ipaddress.IPv4Address):
        family = TCP_OVER_IPV4
        addresses = s.packed + d.packed
    else:
        family = TCP_OVER_IPV6
        addresses = _v6(s).packed + _v6(d).packed
    body = addresses + struct.pack(">HH", src[1], dst[1])
    if identity:
        value = identity.encode()
        body += struct.pack(">BH", AUTHORITY_TLV, len(value)) + value
    return SIGNATURE + struct.pack(">BBH", VERSION_2_PROXY, family, len(body)) + body


def _v6(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
