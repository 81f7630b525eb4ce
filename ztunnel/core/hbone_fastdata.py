"""DATA frames on open streams, sent and received without h2's per-frame machinery.

For a 1-byte message h2 4.4.1 builds Frame objects, runs two state machines, parses flag sets
and formats debug-log arguments on each side. Measured: the in-memory client/server pair
(`test_hbone.py::test_print_micro_benchmark`) goes from 32 us to 10 us per 1-byte round trip
with this path, and B2 of `scripts/bench hbone` from ~275 us to ~180 us of CPU per round trip
through the ztunnel pair (docs/performance.md).

The frames that change no protocol state -- DATA without flags, on a stream h2 holds open,
inside both flow-control windows -- are handled here with exactly the bookkeeping h2 would
do: the same window counters moved, the same 9-byte header written or read. Everything else
(END_STREAM, padding, streams h2 closed, window violations, a frame split across reads,
anything while h2 buffers a partial frame) goes through h2 unchanged and keeps its error
handling. `test_hbone_fastdata.py` checks both paths produce the same bytes, events and
windows for random traffic.

The h2 internals this relies on are checked once at import (`SUPPORTED`); a release of h2
that moved them turns the fast path off rather than corrupting state.
"""

from __future__ import annotations

from typing import Any

from h2.connection import ConnectionState, H2Connection
from h2.stream import StreamState

_CONN_OPEN = (ConnectionState.CLIENT_OPEN, ConnectionState.SERVER_OPEN)
_SEND_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_REMOTE)
_RECV_STATES = (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL)


def _supported() -> bool:
    conn: Any = H2Connection()
    conn.initiate_connection()
    head = [(":method", "GET"), (":path", "/"), (":scheme", "h"), (":authority", "a")]
    conn.send_headers(1, head)
    stream: Any = conn.streams.get(1)
    buffer: Any = conn.incoming_buffer
    checks = (
        isinstance(conn._data_to_send, bytearray),
        isinstance(conn.outbound_flow_control_window, int),
        isinstance(conn._inbound_flow_control_window_manager.current_window_size, int),
        conn.state_machine.state is ConnectionState.CLIENT_OPEN,
        isinstance(buffer._data, bytearray),
        isinstance(buffer._preamble_len, int),
        isinstance(buffer._headers_buffer, list),
        stream is not None and stream.state_machine.state is StreamState.OPEN,
        isinstance(getattr(stream, "outbound_flow_control_window", None), int),
        isinstance(getattr(stream, "_actual_content_length", None), int),
        hasattr(stream, "_expected_content_length"),
        isinstance(stream._inbound_window_manager.current_window_size, int),
    )
    return all(checks)


try:
    SUPPORTED = _supported()
except Exception:  # any internal that moved: use h2's own path
    SUPPORTED = False


def try_send(
    h2: H2Connection, stream_id: int, data: bytes | bytearray | memoryview, n: int
) -> bool:
    """Queue one DATA frame (no flags) of `n` bytes; False if h2 must do it (or refuse)."""
    conn: Any = h2
    stream: Any = conn.streams.get(stream_id)
    if (
        stream is None
        or stream.state_machine.state not in _SEND_STATES
        or conn.state_machine.state not in _CONN_OPEN
        or n > conn.outbound_flow_control_window
        or n > stream.outbound_flow_control_window
        or n > conn.max_outbound_frame_size
    ):
        return False
    out: bytearray = conn._data_to_send
    out += n.to_bytes(3, "big")
    out += b"\x00\x00"  # type DATA, no flags
    out += stream_id.to_bytes(4, "big")
    out += data
    conn.outbound_flow_control_window -= n
    stream.outbound_flow_control_window -= n
    return True


Frames = list[tuple[int, int, int]]  # stream id, payload start, payload end


def try_receive(
    h2: H2Connection, buf: bytes | memoryview, frames: Frames | None = None
) -> list[tuple[int, bytes]] | None:
    """`buf` as (stream_id, payload) if it is only whole flag-less DATA frames h2 would accept.

    `frames` is that split of `buf` when the caller already walked it (the connection's
    FrameScanner does); otherwise `buf` is parsed here. On success h2's windows have been
    charged as its own receive path would; on None nothing changed and the caller hands
    `buf` to h2.
    """
    conn: Any = h2
    incoming: Any = conn.incoming_buffer
    if incoming._data or incoming._preamble_len or incoming._headers_buffer:
        return None
    if conn.state_machine.state not in _CONN_OPEN:
        return None
    if frames is None:
        frames = _data_frames(buf)
    if not frames:
        return None
    conn_window: Any = conn._inbound_flow_control_window_manager
    if len(frames) == 1:  # the common case, without the per-stream tally
        sid, start, end = frames[0]
        size = end - start
        stream: Any = conn.streams.get(sid)
        if (
            stream is None
            or stream.state_machine.state not in _RECV_STATES
            or stream._expected_content_length is not None
            or size > conn_window.current_window_size
            or size > stream._inbound_window_manager.current_window_size
        ):
            return None
        _charge(conn_window, stream, size)
        return [(sid, bytes(buf[start:end]))]
    tally: dict[int, int] = {}
    for sid, start, end in frames:
        tally[sid] = tally.get(sid, 0) + end - start
    if sum(tally.values()) > conn_window.current_window_size:
        return None
    streams = []
    for sid, size in tally.items():
        stream = conn.streams.get(sid)
        if (
            stream is None
            or stream.state_machine.state not in _RECV_STATES
            or stream._expected_content_length is not None
            or size > stream._inbound_window_manager.current_window_size
        ):
            return None
        streams.append((stream, size))
    for stream, size in streams:
        _charge(conn_window, stream, size)
    return [(sid, bytes(buf[start:end])) for sid, start, end in frames]


def _data_frames(buf: bytes | memoryview) -> Frames | None:
    n = len(buf)
    frames: Frames = []
    pos = 0
    while pos < n:
        if n - pos < 9 or buf[pos + 3] or buf[pos + 4]:  # partial header, not DATA, or flags
            return None
        start = pos + 9
        end = start + (buf[pos] << 16 | buf[pos + 1] << 8 | buf[pos + 2])
        if end > n:
            return None
        frames.append((int.from_bytes(buf[pos + 5 : start], "big") & 0x7FFFFFFF, start, end))
        pos = end
    return frames


def _charge(conn_window: Any, stream: Any, size: int) -> None:
    conn_window.current_window_size -= size
    stream._inbound_window_manager.current_window_size -= size
    stream._actual_content_length += size
