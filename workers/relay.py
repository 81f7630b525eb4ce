"""Plain TCP relay between two transports: backpressure, half-close and resets both ways.

Two `asyncio.Protocol` sides forward `data_received` straight into the other side's
transport; a full write buffer pauses reading on the other side (`pause_writing` ->
`pause_reading`). EOF becomes `write_eof` on the other side (FIN <-> FIN); a reset or error
on one side aborts the other. No coroutine and no log line per chunk.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import cast

WRITE_HIGH_WATER = 256 * 1024


class RelaySide(asyncio.Protocol):
    """One TCP leg of a relay."""

    __slots__ = ("_closed_read", "_lost", "_pending", "bytes_in", "peer", "relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.peer: RelaySide | None = None
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0
        self._closed_read = False
        self._lost = False
        self._pending: list[bytes] = []  # read before the other leg was connected

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def attach(self, transport: asyncio.BaseTransport, early: bytes = b"") -> None:
        """Adopt a connected transport (also one accepted earlier under another protocol)."""
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if early:
            self.data_received(early)
        peer = self.peer
        if peer is not None and peer._pending:
            # The other leg was connected first and already read (a server greeting): its
            # bytes waited for this transport, and its reading was paused meanwhile.
            peer.flush_pending()
            if peer.transport is not None:
                _resume(peer.transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
            return
        # uvloop starts reading right after connection_made, even when it paused reading;
        # hold early bytes (and stop reading) until the other leg exists.
        self._pending.append(data)
        if self.transport is not None:
            _pause(self.transport)

    def flush_pending(self) -> None:
        peer = self.peer
        if self._pending and peer is not None and peer.transport is not None:
            peer.transport.write(b"".join(self._pending))
            self._pending.clear()

    def eof_received(self) -> bool:
        self._closed_read = True
        peer = self.peer
        if peer is None or peer.transport is None:
            return True  # forwarded by Relay.start once the other leg is connected
        if not peer._lost and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer is not None and peer._closed_read:
            self.relay.finish()
        return True  # keep our write half open until the other direction ends

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            _pause(self.peer.transport)

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            _resume(self.peer.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        peer = self.peer
        if peer is not None and not peer._lost and peer.transport is not None:
            if exc is not None:
                peer.transport.abort()  # propagate a reset as a reset
            else:
                peer.transport.close()  # flushes what is queued, then FIN
        self.relay.side_lost(self, exc)


def _pause(t: asyncio.Transport) -> None:
    if not t.is_closing():
        t.pause_reading()


def _resume(t: asyncio.Transport) -> None:
    if not t.is_closing():
        t.resume_reading()


class Relay:
    """Both legs of one proxied TCP connection and the accounting around them."""

    __slots__ = ("_done", "_lost", "downstream", "error", "on_done", "tracked", "upstream")

    def __init__(
        self, on_done: Callable[[Relay], None], downstream: Callable[[Relay], RelaySide] = RelaySide
    ) -> None:
        """`downstream` builds the accepted leg, usually a RelaySide subclass that routes."""
        self.upstream = RelaySide(self)
        self.downstream = downstream(self)
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.on_done = on_done
        self.error: Exception | None = None
        self._lost = 0
        self._done = False
        self.tracked: object | None = None  # the accounting record (workers.tracking.Tracked)

    @property
    def received(self) -> int:
        """Bytes from the downstream client (upstream's `received_bytes`)."""
        return self.downstream.bytes_in

    @property
    def sent(self) -> int:
        """Bytes from the upstream server back to the client (`sent_bytes`)."""
        return self.upstream.bytes_in

    def start(self) -> None:
        """Both legs connected: forward what arrived early, then start moving bytes."""
        down = self.downstream
        down.flush_pending()
        if down._closed_read:
            down.eof_received()
        t = down.transport
        if t is not None and not t.is_closing():
            t.resume_reading()

    def finish(self) -> None:
        """Both directions saw EOF: close both legs once their buffers drain."""
        for side in (self.downstream, self.upstream):
            if side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        for side in (self.downstream, self.upstream):
            if side.transport is not None:
                side.transport.abort()

    def side_lost(self, side: RelaySide, exc: Exception | None) -> None:
        if exc is not None and self.error is None and not isinstance(exc, _NORMAL_CLOSE):
            self.error = exc
        self._lost += 1
        # Done when both legs are gone, or when downstream is gone and upstream never came.
        if self._done:
            return
        if self._lost == 2 or (side is self.downstream and self.upstream.transport is None):
            self._done = True
            self.on_done(self)

    @property
    def done(self) -> bool:
        return self._done


# Resets and broken pipes are ordinary ends of a TCP conversation (upstream copy.rs).
_NORMAL_CLOSE = (ConnectionResetError, BrokenPipeError)
