"""PROXY protocol v2 headers (`ztunnel.core.proxyproto`) read back by a parser we did not write."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6
from proxyprotocol.v2 import ProxyProtocolV2

from ztunnel.core.proxyproto import AUTHORITY_TLV, SIGNATURE, encode_v2

pytestmark = pytest.mark.timeout(60)

ID = "spiffe://cluster.local/ns/default/sa/client"


def _parse(header: bytes) -> ProxyResultIPv4 | ProxyResultIPv6:
    result = ProxyProtocolV2().unpack(header)
    assert isinstance(result, ProxyResultIPv4 | ProxyResultIPv6)
    return result


def test_ipv4_with_identity() -> None:
    header = encode_v2(("10.0.0.1", 41000), ("10.96.0.10", 80), ID)
    assert header.startswith(SIGNATURE)
    assert header[12:14] == b"\x21\x11"  # v2 PROXY, TCP over IPv4
    result = _parse(header)
    assert result.source == (ip_address("10.0.0.1"), 41000)
    assert result.dest == (ip_address("10.96.0.10"), 80)
    assert result.tlv[AUTHORITY_TLV] == ID.encode()


def test_ipv6_and_no_identity() -> None:
    header = encode_v2(("fd00::1", 1), ("fd00::2", 65535), None)
    assert header[13] == 0x21  # TCP over IPv6
    result = _parse(header)
    assert result.dest == (ip_address("fd00::2"), 65535)
    assert AUTHORITY_TLV not in result.tlv
    assert len(header) == 16 + 36


def test_mixed_families_use_ipv4_mapped_ipv6() -> None:
    result = _parse(encode_v2(("10.0.0.1", 5), ("fd00::2", 6), ID))
    assert result.source == (ip_address("::ffff:10.0.0.1"), 5)
    assert result.dest == (ip_address("fd00::2"), 6)


@given(
    st.ip_addresses(v=4),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.text(min_size=0, max_size=300),
)
def test_any_ipv4_pair_round_trips(src, dst, sport, dport, identity) -> None:  # type: ignore[no-untyped-def]
    result = _parse(encode_v2((str(src), sport), (str(dst), dport), identity or None))
    assert (result.source, result.dest) == ((src, sport), (dst, dport))
    if identity:
        assert result.tlv[AUTHORITY_TLV] == identity.encode()
