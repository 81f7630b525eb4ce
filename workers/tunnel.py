"""HBONE glue: an HTTP/2 connection protocol over TLS, and the TCP legs of its streams.

`H2Protocol` feeds TLS bytes into the sans-IO core (`ztunnel.core.hbone`) and dispatches its
events to `TunnelLeg`s, the plain-TCP side of each CONNECT stream (the captured client on
outbound, the local application on inbound). One coalesced `transport.write` per input
event; flow-control credit is returned only for bytes the TCP side accepted, and withheld
while that side's write buffer is full, so a slow reader stalls its own stream, not the
connection. A full TLS write buffer pauses reading on every leg of the connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import cast

from ztunnel.core import hbone as core

log = logging.getLogger(__name__)

STREAM_HIGH_WATER = 1 << 20  # bytes buffered in h2 for one stream before its TCP side pauses
LEG_WRITE_HIGH_WATER = 256 * 1024


class TunnelLeg(asyncio.Protocol):
    """The TCP side of one HBONE stream."""

    __slots__ = (
        "_closed",
        "_peer_ended",
        "_pending",
        "_read_paused",
        "_sent_end",
        "_unacked",
        "_write_paused",
        "bytes_from_stream",
        "bytes_to_stream",
        "conn",
        "error",
        "on_done",
        "stream_id",
        "transport",
        "tunnel_error",
    )

    def __init__(self, on_done: Callable[[TunnelLeg], None]) -> None:
        self.conn: H2Protocol | None = None
        self.stream_id = 0
        self.transport: asyncio.Transport | None = None
        self.on_done = on_done
        self.bytes_to_stream = 0  # TCP -> h2
        self.bytes_from_stream = 0  # h2 -> TCP
        self.error: str | None = None
        self.tunnel_error: str | None = None  # the HTTP/2 side reset the stream or went away
        self._pending: list[bytes] = []  # stream bytes that arrived before the TCP side existed
        self._unacked = 0
        self._write_paused = False
        self._read_paused = False
        self._sent_end = False
        self._peer_ended = False
        self._closed = False

    # -- wiring ---------------------------------------------------------------------------------

    def bind_stream(self, conn: H2Protocol, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        conn.legs[stream_id] = self

    def attach(self, transport: asyncio.BaseTransport, early: bytes = b"") -> None:
        """Adopt an already-connected TCP transport (accepted earlier, or just connected)."""
        t = cast(asyncio.Transport, transport)
        self.transport = t
        t.set_write_buffer_limits(high=LEG_WRITE_HIGH_WATER)
        sock = t.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            t.write(data)
            self._credit(self._unacked)
        if early:
            self.data_received(early)
        if self._peer_ended:
            self._write_eof()

    def start_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- asyncio.Protocol (TCP side) ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.attach(transport)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self._sent_end:
            return
        self.bytes_to_stream += len(data)
        conn.send(self.stream_id, data)
        if conn.core.buffered(self.stream_id) > STREAM_HIGH_WATER and self.transport is not None:
            self._read_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.conn is not None and not self._sent_end:
            self._sent_end = True
            self.conn.end_stream(self.stream_id)
        self._maybe_finish()
        return True

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._unacked:
            self._credit(self._unacked)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self.conn
        if conn is not None and conn.legs.get(self.stream_id) is self:
            if exc is not None or not (self._sent_end and self._peer_ended):
                if exc is not None and self.error is None:
                    self.error = _describe(exc)
                conn.reset(self.stream_id) if exc is not None else conn.end_stream(self.stream_id)
            conn.forget(self.stream_id)
        self.on_done(self)

    # -- events from the HTTP/2 side --------------------------------------------------------------

    def on_data(self, data: bytes, flow_controlled: int) -> None:
        self.bytes_from_stream += len(data)
        t = self.transport
        if t is None:
            self._pending.append(data)
            self._unacked += flow_controlled
            return
        t.write(data)
        if self._write_paused:
            self._unacked += flow_controlled
        else:
            self._credit(flow_controlled)

    def on_end(self) -> None:
        self._peer_ended = True
        if self.transport is not None:
            self._write_eof()
        self._maybe_finish()

    def on_reset(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        if self.tunnel_error is None and not (self._sent_end and self._peer_ended):
            self.tunnel_error = reason
        self._peer_ended = True
        self._sent_end = True
        if self.transport is not None:
            self.transport.abort()
        else:
            self.connection_lost(None)

    def on_writable(self) -> None:
        if self._read_paused and self.transport is not None and not self.transport.is_closing():
            self._read_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        elif self.conn is not None:
            self.conn.reset(self.stream_id)

    # -- internals ----------------------------------------------------------------------------

    def _credit(self, n: int) -> None:
        self._unacked = 0
        if n and self.conn is not None:
            self.conn.acknowledge(self.stream_id, n)

    def _write_eof(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and t.can_write_eof():
            t.write_eof()

    def _maybe_finish(self) -> None:
        if self._sent_end and self._peer_ended and self.transport is not None:
            self.transport.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"io error: {exc.strerror} (os error {exc.errno})"
    return str(exc) or type(exc).__name__


class H2Protocol(asyncio.Protocol):
    """An HTTP/2 connection over an established TLS transport, shared by many TunnelLegs."""

    def __init__(self, hbone: core.HBONEConnection) -> None:
        self.core = hbone
        self.legs: dict[int, TunnelLeg] = {}
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._timer: asyncio.Handle | None = None
        self._timer_when: float | None = None
        self._dispatching = False
        self._loop = asyncio.get_running_loop()
        self._tls_paused = False

    # -- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.core.initiate(self._loop.time())
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._dispatching = True
        try:
            self._dispatch(self.core.receive_data(data, self._loop.time()))
        finally:
            self._dispatching = False
        self.flush()
        self._close_if_finished()

    def _close_if_finished(self) -> None:
        t = self.transport
        if self.core.is_finished() and t is not None and not t.is_closing():
            t.close()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        self._tls_paused = True
        for leg in self.legs.values():
            if leg.transport is not None and not leg.transport.is_closing():
                leg.transport.pause_reading()

    def resume_writing(self) -> None:
        self._tls_paused = False
        for leg in self.legs.values():
            if not leg._read_paused:
                leg.start_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        self.on_closed()  # first: waiters learn why before their legs report the close
        reason = _describe(exc) if exc is not None else "connection closed"
        for leg in tuple(self.legs.values()):
            leg.on_reset(reason)
        self.legs.clear()

    # -- used by legs ---------------------------------------------------------------------------

    def send(self, stream_id: int, data: bytes) -> None:
        self.core.send(stream_id, data)
        self.flush()

    def end_stream(self, stream_id: int) -> None:
        self.core.end_stream(stream_id)
        self.flush()

    def reset(self, stream_id: int) -> None:
        self.core.reset_stream(stream_id, 0x8)  # CANCEL
        self.flush()

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.core.acknowledge(stream_id, n)
        if not self._dispatching:  # inside data_received the final flush covers it
            self.flush()

    def forget(self, stream_id: int) -> None:
        self.legs.pop(stream_id, None)
        self.on_stream_closed()
        self._close_if_finished()

    # -- plumbing -------------------------------------------------------------------------------

    def flush(self) -> None:
        out = self.core.data_to_send()
        t = self.transport
        if out and t is not None and not t.is_closing():
            t.write(out)
        self._arm_timer()

    def close(self) -> None:
        self.core.close()
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _arm_timer(self) -> None:
        when = self.core.get_timer()
        if when == self._timer_when:
            return
        if when is not None and self._timer_when is not None and self._timer_when <= when:
            # The keepalive deadline moves with every read; keep the earlier timer instead
            # of re-arming per chunk. When it fires early `handle_timer` does nothing and
            # the timer is armed again for the real deadline.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_when = when
        if when is not None:
            # uvloop returns a plain Handle (no `.when()`) for a deadline already past,
            # so the deadline is remembered here rather than read back from the handle.
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = None
        if self.closed:
            return
        self._dispatch(self.core.handle_timer(self._loop.time()))
        self.flush()

    def _dispatch(self, events: list[core.Event]) -> None:
        for ev in events:
            if isinstance(ev, core.DataReceived):
                leg = self.legs.get(ev.stream_id)
                if leg is not None:
                    leg.on_data(ev.data, ev.flow_controlled_length)
                else:
                    self.core.acknowledge(ev.stream_id, ev.flow_controlled_length)
            elif isinstance(ev, core.StreamEnded):
                leg = self.legs.get(ev.stream_id)
                if leg is not None:
                    leg.on_end()
            elif isinstance(ev, core.StreamReset):
                leg = self.legs.pop(ev.stream_id, None)
                self.on_stream_reset(ev.stream_id)
                if leg is not None:
                    leg.on_reset("stream reset by peer" if ev.remote else "stream reset")
            elif isinstance(ev, core.StreamWritable):
                leg = self.legs.get(ev.stream_id)
                if leg is not None and not self._tls_paused:
                    leg.on_writable()
            elif isinstance(ev, core.ConnectionTerminated):
                self.on_terminated(ev)
            else:
                self.on_event(ev)

    # -- hooks for client/server subclasses --------------------------------------------------------

    def on_event(self, ev: core.Event) -> None:
        """Events the base does not handle (responses, requests, settings)."""

    def on_terminated(self, ev: core.ConnectionTerminated) -> None:
        """GOAWAY or a fatal error. After a graceful GOAWAY the open streams drain first."""
        log.debug("hbone connection terminated: %s", ev.reason)
        self.flush()
        if self.core.is_finished() and self.transport is not None:
            self.transport.close()

    def on_stream_closed(self) -> None:
        """A stream finished (capacity freed)."""

    def on_stream_reset(self, stream_id: int) -> None:
        """A stream was reset (possibly before its response)."""

    def on_closed(self) -> None:
        """The connection is gone."""
