"""The first protocol of every accepted TCP connection: hold it until it is routed.

Routing may need a lookup, a SOCKS5 negotiation or an HBONE stream first; meanwhile the
connection's early bytes and EOF are kept here. Once the route is known the transport is
handed to the protocol that will carry it (`transport.set_protocol`), with what was kept.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol, cast

from ztunnel import sockets
from ztunnel.core.socks5 import Socks5Error, Socks5Negotiation, Socks5Target

log = logging.getLogger(__name__)

MAX_EARLY = 256 * 1024  # bytes held before the route exists; reading pauses long before this


class Carrier(Protocol):
    """What takes over an accepted transport: a relay side or an HBONE stream leg."""

    def attach(self, transport: asyncio.BaseTransport, early: bytes = b"") -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...


class Accepted(asyncio.Protocol):
    __slots__ = (
        "_early",
        "eof",
        "lost",
        "negotiation",
        "on_finished",
        "on_lost",
        "on_target",
        "peer",
        "transport",
    )

    def __init__(
        self, on_target: Callable[[Accepted, Socks5Target | None], None], *, socks5: bool = False
    ) -> None:
        self.on_target = on_target
        self.on_lost: Callable[[Accepted], None] | None = None  # gone before it was handed off
        self.on_finished: Callable[[], None] | None = None  # its connection is fully accounted
        self.negotiation = Socks5Negotiation() if socks5 else None
        self.transport: asyncio.Transport | None = None
        self.peer: tuple[str, int] = ("", 0)
        self._early: list[bytes] = []
        self.eof = False
        self.lost = False

    @property
    def early_size(self) -> int:
        return sum(len(b) for b in self._early)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)
        self.transport = t
        peer = t.get_extra_info("peername")
        self.peer = (sockets.canonical_ip(peer[0]), peer[1])
        if self.negotiation is None:
            t.pause_reading()
            self.on_target(self, None)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.negotiation is not None:
            self._negotiate(data)
            return
        self._early.append(data)
        self.transport.pause_reading()  # uvloop reads once even after a pause in connection_made

    def _negotiate(self, data: bytes) -> None:
        assert self.transport is not None and self.negotiation is not None
        try:
            out, target = self.negotiation.feed(data)
        except Socks5Error as e:
            log.warning("failed to negotiate socks connection: %s", e)
            self.transport.write(e.reply())
            self.transport.close()
            self.negotiation = None
            return
        if out:
            self.transport.write(out)
        if target is not None:
            leftover = self.negotiation.leftover()
            self.negotiation = None
            if leftover:
                self._early.append(leftover)
            self.transport.pause_reading()
            self.on_target(self, target)

    def eof_received(self) -> bool:
        if self.negotiation is not None:
            return False  # closed mid-negotiation
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.on_lost is not None:
            self.on_lost(self)

    def handoff(self, carrier: Carrier) -> bool:
        """Give the transport to `carrier`; False if the client already went away."""
        t = self.transport
        if t is None or self.lost or t.is_closing():
            return False
        t.set_protocol(cast(asyncio.BaseProtocol, carrier))
        early = b"".join(self._early)
        self._early.clear()
        carrier.attach(t, early)
        if self.eof:
            carrier.eof_received()
        t.resume_reading()
        return True

    def reject(self, reply: bytes = b"") -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if reply:
            t.write(reply)
            t.close()
        else:
            t.abort()
