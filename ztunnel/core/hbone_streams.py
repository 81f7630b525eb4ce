"""Per-stream send buffers and flow-control credit for the HBONE core, over one h2 connection.

Send side: h2 4.4.1 does no buffering (`send_data` raises past the window), so bytes the
windows do not allow yet wait here, per stream, and leave when WINDOW_UPDATE or a larger
INITIAL_WINDOW_SIZE arrives. The caller pauses a stream's source while `buffered` is over its
high-water mark (`max_send_buffer`); once the queue drains to a quarter of that, the stream
gets one StreamWritable.

Receive side: the glue acknowledges bytes once it has written them onwards; credit goes back
in WINDOW_UPDATEs of at least a quarter window (reference/performance.md: batched acks,
withheld while the TCP side is paused). Bytes nobody will consume (a reset stream, a
rejected request) are credited to the connection at once, so its window never leaks.
"""

from __future__ import annotations

import contextlib
from collections import deque

from h2.connection import H2Connection
from h2.exceptions import NoSuchStreamError

from ztunnel.core import hbone_fastdata as fastdata
from ztunnel.core.hbone_events import Event, H2Settings, StreamWritable


class Stream:
    """Our bookkeeping beside h2's own stream state."""

    __slots__ = (
        "ack_pending",
        "answered",
        "blocked",
        "closed",
        "end_pending",
        "local_ended",
        "out",
        "out_len",
        "remote_ended",
        "stream_id",
        "unacked",
    )

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.out: deque[memoryview] = deque()  # flow-control-blocked bytes, owned copies
        self.out_len = 0
        self.blocked = False  # bytes were queued; StreamWritable once drained to low water
        self.end_pending = False  # END_STREAM requested behind buffered bytes
        self.local_ended = False
        self.remote_ended = False
        self.closed = False  # both sides ended or reset; only lingers for acknowledgements
        self.unacked = 0  # received bytes the glue has not acknowledged yet
        self.ack_pending = 0  # acknowledged bytes not yet returned in a WINDOW_UPDATE
        self.answered = False  # response head sent (server) or not needed (client): DATA may go


class StreamBook:
    """The streams of one connection; `open` counts those not yet closed.

    A stream stays in `streams` from CONNECT until both sides ended or a reset. One that
    ended with received bytes still unacknowledged lingers, closed, until they are.
    Methods that call h2 raise NoSuchStreamError (StreamClosedError included) when h2 has
    closed a stream behind our back; callers decide what that means where they are.
    """

    def __init__(self, h2: H2Connection, settings: H2Settings) -> None:
        self.h2 = h2
        self.streams: dict[int, Stream] = {}
        self.waiting: dict[int, Stream] = {}  # streams holding flow-control-blocked bytes
        self.open = 0
        self.live = True  # False once the connection is dead: no more frames of any kind
        self._low_water = settings.max_send_buffer // 4
        self._stream_step = settings.stream_window // 4
        self._conn_step = min(settings.stream_window, settings.connection_window) // 4
        self._conn_pending = 0

    # --- lifecycle ------------------------------------------------------------------------

    def add(self, stream_id: int, *, answered: bool) -> Stream:
        st = Stream(stream_id)
        st.answered = answered
        self.streams[stream_id] = st
        self.open += 1
        return st

    def maybe_close(self, st: Stream) -> None:
        """Both sides ended: closed, and gone unless received bytes await acknowledgement."""
        if st.local_ended and st.remote_ended and not st.closed:
            st.closed = True
            self.open -= 1
            self.waiting.pop(st.stream_id, None)
            if not st.unacked:
                del self.streams[st.stream_id]

    def pop(self, stream_id: int) -> Stream | None:
        """Remove a stream that was reset; its unconsumed bytes go back to the connection."""
        st = self.streams.pop(stream_id, None)
        if st is None:
            return None
        if not st.closed:
            st.closed = True
            self.open -= 1
        self.waiting.pop(stream_id, None)
        st.out.clear()
        st.out_len = 0
        if st.unacked:
            self.credit_connection(st.unacked)
            st.unacked = 0
        return st

    def clear(self) -> list[Stream]:
        """Drop every stream (the connection died); the ones that were still open."""
        still_open = [st for st in self.streams.values() if not st.closed]
        self.streams.clear()
        self.waiting.clear()
        self.open = 0
        self.live = False
        return still_open

    # --- sending --------------------------------------------------------------------------

    def send(self, st: Stream, data: bytes | bytearray | memoryview) -> None:
        """Send what the windows allow now; copy and queue the rest.

        Before the response head (server), everything is queued: a server-first upstream can
        speak before the glue has called respond(200), and DATA must not precede HEADERS.
        """
        if st.out or not st.answered:
            self._enqueue(st, data)
            return
        h2 = self.h2
        sid = st.stream_id
        n = len(data)
        if fastdata.SUPPORTED and fastdata.try_send(h2, sid, data, n):
            return
        window = h2.local_flow_control_window(sid)
        max_frame = h2.max_outbound_frame_size
        if n <= window and n <= max_frame:  # one frame, no slicing
            h2.send_data(sid, data if isinstance(data, bytes | memoryview) else bytes(data))
            return
        view = memoryview(data).cast("B")
        pos = 0
        while pos < n and window > 0:
            k = min(n - pos, window, max_frame)
            h2.send_data(sid, view[pos : pos + k])
            pos += k
            window -= k
        if pos < n:
            self._enqueue(st, view[pos:])

    def _enqueue(self, st: Stream, data: bytes | bytearray | memoryview) -> None:
        # The caller may reuse its buffer (BufferedProtocol): keep a copy unless immutable.
        owned = data if isinstance(data, bytes) else bytes(data)
        st.out.append(memoryview(owned))
        st.out_len += len(owned)
        self.waiting[st.stream_id] = st
        # Any queued byte arms StreamWritable, whatever high-water mark the caller pauses at,
        # so a paused source always hears when the buffer drains.
        st.blocked = True

    def end(self, st: Stream) -> None:
        """END_STREAM now, or after the queued bytes (and the response head)."""
        if st.out or not st.answered:
            st.end_pending = True
            return
        st.end_pending = False
        self.h2.end_stream(st.stream_id)
        st.local_ended = True
        self.maybe_close(st)

    def push(self, st: Stream, events: list[Event]) -> None:
        """Send queued bytes as far as the windows allow now (after a window grew)."""
        if not st.answered:
            return  # still waiting for respond(200)
        try:
            self._push(st, events)
        except NoSuchStreamError:
            # h2 applies a whole read before we see its events: a RST_STREAM later in this
            # read already closed the stream. Its StreamReset event follows; drop the bytes.
            self.waiting.pop(st.stream_id, None)
            st.out.clear()
            st.out_len = 0
            st.end_pending = False

    def push_all(self, events: list[Event]) -> None:
        for st in list(self.waiting.values()):
            self.push(st, events)

    def _push(self, st: Stream, events: list[Event]) -> None:
        h2 = self.h2
        sid = st.stream_id
        out = st.out
        max_frame = h2.max_outbound_frame_size
        window = h2.local_flow_control_window(sid)
        while out and window > 0:
            chunk = out[0]
            k = min(len(chunk), window, max_frame)
            if k == len(chunk):
                out.popleft()
            else:
                out[0] = chunk[k:]
                chunk = chunk[:k]
            h2.send_data(sid, chunk)
            st.out_len -= k
            window -= k
        if st.blocked and st.out_len <= self._low_water:
            st.blocked = False
            events.append(StreamWritable(sid))
        if not out:
            self.waiting.pop(sid, None)
            if st.end_pending:
                self.end(st)

    # --- receiving: credit ----------------------------------------------------------------

    def received(self, st: Stream, n: int, flow_controlled_length: int) -> None:
        """DATA arrived for the glue; padding is consumed on arrival."""
        st.unacked += n
        if flow_controlled_length > n:
            self._credit(st, flow_controlled_length - n)

    def acknowledge(self, st: Stream, n: int) -> None:
        n = min(n, st.unacked)  # over-acknowledging would overflow the peer's window
        st.unacked -= n
        if not st.closed:
            self._credit(st, n)
            return
        if not st.unacked:
            del self.streams[st.stream_id]
        self.credit_connection(n)

    def _credit(self, st: Stream, n: int) -> None:
        self.credit_connection(n)
        if st.remote_ended:
            return  # the peer sends nothing more: no stream window to reopen
        st.ack_pending += n
        if st.ack_pending >= self._stream_step:
            # KeyError / StreamClosedError: closed by a frame later in the read being handled.
            with contextlib.suppress(NoSuchStreamError, KeyError):
                self.h2.increment_flow_control_window(st.ack_pending, st.stream_id)
            st.ack_pending = 0

    def credit_connection(self, n: int) -> None:
        self._conn_pending += n
        if self._conn_pending >= self._conn_step and self.live:
            self.h2.increment_flow_control_window(self._conn_pending)
            self._conn_pending = 0
