"""SOCKS5 negotiation tables (upstream src/proxy/socks5.rs semantics)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.core.socks5 import (
    METHOD_SELECTED,
    Socks5Error,
    Socks5Negotiation,
    Socks5Target,
    error_reply,
)

GREETING = bytes([5, 1, 0])


def _request(atyp: int, addr: bytes, port: int = 8080) -> bytes:
    return bytes([5, 1, 0, atyp]) + addr + port.to_bytes(2, "big")


@pytest.mark.parametrize(
    ("request_bytes", "target"),
    [
        (_request(1, bytes([127, 0, 0, 1])), Socks5Target("127.0.0.1", 8080)),
        (_request(4, bytes(15) + b"\x01", 443), Socks5Target("::1", 443)),
        (_request(3, bytes([11]) + b"example.com", 80), Socks5Target("example.com", 80, True)),
    ],
)
def test_connect_request_parsed(request_bytes: bytes, target: Socks5Target) -> None:
    n = Socks5Negotiation()
    out, got = n.feed(GREETING + request_bytes)
    assert out == METHOD_SELECTED
    assert got == target


def test_byte_at_a_time_is_the_same_as_all_at_once() -> None:
    data = GREETING + _request(1, bytes([10, 0, 0, 7]), 1234)
    n = Socks5Negotiation()
    sent, target = b"", None
    for i in range(len(data)):
        out, target = n.feed(data[i : i + 1])
        sent += out
    assert sent == METHOD_SELECTED
    assert target == Socks5Target("10.0.0.7", 1234)


def test_payload_sent_with_the_request_is_kept_for_upstream() -> None:
    n = Socks5Negotiation()
    _, target = n.feed(GREETING + _request(1, bytes([10, 0, 0, 7])) + b"early")
    assert target is not None
    assert n.leftover() == b"early"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bytes([4, 1, 0]), "unsupported version 4"),
        (bytes([5, 0]), "methods cannot be zero"),
        (bytes([5, 1, 2]), "only unauthenticated is supported"),
        (GREETING + bytes([4, 1, 0, 1]), "unsupported version 4"),
        (GREETING + bytes([5, 2, 0, 1]), "unsupported command 2"),
        (GREETING + bytes([5, 1, 0, 9]), "unsupported address type 9"),
        (GREETING + bytes([5, 1, 0, 3, 2, 0xFF, 0xFE, 0, 80]), "domain is not a valid utf8 string"),
        (GREETING + bytes([5, 1, 0, 3, 0, 0, 80]), "empty domain"),
    ],
)
def test_protocol_violations_answer_command_not_supported(data: bytes, message: str) -> None:
    with pytest.raises(Socks5Error, match=message) as info:
        Socks5Negotiation().feed(data)
    assert info.value.reply() == error_reply(7) == bytes([5, 7, 0, 1, 0, 0, 0, 0, 0, 0])


@given(st.binary(max_size=64))
def test_random_input_is_parsed_or_rejected_never_crashes(data: bytes) -> None:
    with contextlib.suppress(Socks5Error):
        Socks5Negotiation().feed(data)
