"""SOCKS5 negotiation (RFC 1928 subset, as upstream `src/proxy/socks5.rs`), sans-IO.

Only unauthenticated CONNECT with IPv4, IPv6 or domain targets. Feed bytes in; get bytes to
send back and, once complete, the requested target. Any protocol violation is answered
with reply code 7 (command not supported), as upstream does.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ztunnel.core.errors import ZtunnelError

VERSION = 0x05
NO_AUTH = 0x00
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REPLY_GENERAL = 1
REPLY_NOT_ALLOWED = 2
REPLY_NETWORK_UNREACHABLE = 3
REPLY_HOST_UNREACHABLE = 4
REPLY_CONNECTION_REFUSED = 5
REPLY_COMMAND_NOT_SUPPORTED = 7

METHOD_SELECTED = bytes((VERSION, NO_AUTH))
SUCCESS_REPLY = bytes((VERSION, 0, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0))


def error_reply(code: int) -> bytes:
    """`05 <code> 00 01 0.0.0.0:0`: upstream answers every error with an IPv4 zero address."""
    return bytes((VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0))


class Socks5Error(ZtunnelError):
    reason = "socks5"

    def __init__(self, message: str, code: int = REPLY_COMMAND_NOT_SUPPORTED) -> None:
        super().__init__(message)
        self.code = code

    def reply(self) -> bytes:
        return error_reply(self.code)


@dataclass(frozen=True, slots=True)
class Socks5Target:
    host: str  # canonical IP string, or a domain name when `is_domain`
    port: int
    is_domain: bool = False


class Socks5Negotiation:
    """Incremental negotiator: `feed()` until it returns a target."""

    __slots__ = ("_buf", "_greeted")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._greeted = False

    def feed(self, data: bytes) -> tuple[bytes, Socks5Target | None]:
        """Consume bytes; returns (bytes to send, target once the request is complete)."""
        self._buf += data
        out = b""
        if not self._greeted:
            if not self._parse_greeting():
                return b"", None
            self._greeted = True
            out = METHOD_SELECTED
        target = self._parse_request()
        return out, target

    def leftover(self) -> bytes:
        """Bytes the client sent after the request (early payload), to forward upstream."""
        return bytes(self._buf)

    def _parse_greeting(self) -> bool:
        buf = self._buf
        if len(buf) < 2:
            return False
        if buf[0] != VERSION:
            raise Socks5Error(f"unsupported version {buf[0]}")
        nmethods = buf[1]
        if nmethods == 0:
            raise Socks5Error("methods cannot be zero")
        if len(buf) < 2 + nmethods:
            return False
        if NO_AUTH not in buf[2 : 2 + nmethods]:
            raise Socks5Error("only unauthenticated is supported")
        del buf[: 2 + nmethods]
        return True

    def _parse_request(self) -> Socks5Target | None:
        buf = self._buf
        if len(buf) < 2:
            return None
        if buf[0] != VERSION:
            raise Socks5Error(f"unsupported version {buf[0]}")
        if buf[1] != CMD_CONNECT:
            raise Socks5Error(f"unsupported command {buf[1]}")
        if len(buf) < 4:
            return None
        parsed = _parse_address(buf, buf[3])
        if parsed is None:
            return None
        target, used = parsed
        del buf[:used]
        return target


def _parse_address(buf: bytearray, atyp: int) -> tuple[Socks5Target, int] | None:
    """Parse ATYP/address/port starting at offset 4; None if incomplete."""
    if atyp == ATYP_IPV4:
        end = 4 + 4
        host = str(ipaddress.IPv4Address(bytes(buf[4:end]))) if len(buf) >= end else None
        is_domain = False
    elif atyp == ATYP_IPV6:
        end = 4 + 16
        host = str(ipaddress.IPv6Address(bytes(buf[4:end]))) if len(buf) >= end else None
        is_domain = False
    elif atyp == ATYP_DOMAIN:
        if len(buf) < 5:
            return None
        end = 5 + buf[4]
        host = _domain(buf[5:end]) if len(buf) >= end else None
        is_domain = True
    else:
        raise Socks5Error(f"unsupported address type {atyp}")
    if host is None or len(buf) < end + 2:
        return None
    port = int.from_bytes(buf[end : end + 2], "big")
    return Socks5Target(host, port, is_domain), end + 2


def _domain(raw: bytearray) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Socks5Error(f"domain is not a valid utf8 string: {bytes(raw)!r}") from None
    if not name:
        raise Socks5Error("empty domain")
    return name
