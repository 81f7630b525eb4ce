"""HBONE connection core shared by both ends: h2 wrapped sans-IO, with our limits and GOAWAY.

Bytes in (`receive_data`), events out; `data_to_send()` returns everything queued since the
last call as one coalesced write; the clock is an argument (`get_timer` / `handle_timer`).
Upstream: `src/proxy/h2.rs`, `src/proxy/h2/{client,server}.rs`, `src/proxy/inbound.rs`.

Connection phases (one transition table, `PHASES`):

    OPEN      --close(0) / GOAWAY(NO_ERROR) received-->  DRAINING  (no new streams; existing
                                                                    ones run to completion)
    OPEN, DRAINING --limit broken / protocol error / ping timeout / close(code != 0) /
                     GOAWAY(error) received / connection_lost()-->  DEAD  (every stream reset)

Per-stream state, send buffers and flow-control credit live in `hbone_streams.StreamBook`.

Contract for the glue:
* after every call, write `data_to_send()` (one coalesced write) and re-arm `get_timer()`;
* ConnectionTerminated means no new streams. Streams that died with the connection got a
  StreamReset just before it; after a graceful GOAWAY (error_code 0) the others run on.
  Close the transport once `is_finished()` and the last write is flushed;
* acknowledge(stream_id, n) after writing DataReceived bytes onwards, withheld while that
  TCP side is paused; pause a TCP source while `buffered(stream_id)` is over its high-water
  mark (`settings.max_send_buffer`) and resume on StreamWritable.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from typing import Any, ClassVar

import h2.events as h2e
import hyperframe.frame
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import NoSuchStreamError, ProtocolError
from h2.settings import SettingCodes, Settings

from ztunnel.core import hbone_fastdata as fastdata
from ztunnel.core.hbone_events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    H2Settings,
    SettingsChanged,
    StreamEnded,
    StreamReset,
)
from ztunnel.core.hbone_frames import FrameScanner, FrameViolation
from ztunnel.core.hbone_streams import StreamBook


def _frame_repr(frame: hyperframe.frame.Frame) -> str:
    return type(frame).__name__


# h2 4.4.1 `H2Connection._receive_frame` builds `repr(frame)` for a trace-log call on every
# received frame, even with logging off, and hyperframe 6.1.0's `Frame.__repr__` serialises and
# hex-encodes the whole payload before truncating it: 63% of receive CPU with 1 MiB DATA frames
# (reference/performance.md: 1.6x bulk once replaced). Patched once, at import, for the process.
hyperframe.frame.Frame.__repr__ = _frame_repr  # type: ignore[method-assign]

_GOAWAY_HEADER = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # length 8, type GOAWAY, stream 0


class Phase(enum.Enum):
    """Connection phase; moves only through PHASES."""

    OPEN = "open"
    DRAINING = "draining"
    DEAD = "dead"


PHASES: dict[tuple[Phase, str], Phase] = {
    (Phase.OPEN, "goaway"): Phase.DRAINING,
    (Phase.DRAINING, "goaway"): Phase.DRAINING,
    (Phase.OPEN, "fail"): Phase.DEAD,
    (Phase.DRAINING, "fail"): Phase.DEAD,
}


class HBONEConnection:
    """Shared core of both ends; use `hbone.HBONEClient` or `hbone.HBONEServer`."""

    client_side: ClassVar[bool]

    def __init__(self, settings: H2Settings) -> None:
        self.settings = settings
        self._h2 = H2Connection(
            H2Configuration(
                client_side=self.client_side,
                header_encoding=None,
                # Our own checks in hbone_headers replace these (strict, stream-level, cheap).
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._scanner = FrameScanner(settings.frame_size, expect_preface=not self.client_side)
        self._book = StreamBook(self._h2, settings)
        self._phase = Phase.OPEN
        self._pre_out = b""  # our own frames that must precede h2's queued output
        self._last_rx = 0.0
        self._ping_sent_at: float | None = None
        self._ping_payload = b""
        self._ping_count = 0
        self._batch_new: set[int] = set()
        self._deferred: list[Event] = []  # from commands; out with the next input, timer due
        self._dispatch: dict[type, Callable[[Any, list[Event]], None]] = {
            h2e.DataReceived: self._on_data,
            h2e.StreamEnded: self._on_stream_ended,
            h2e.StreamReset: self._on_stream_reset,
            h2e.WindowUpdated: self._on_window_updated,
            h2e.RemoteSettingsChanged: self._on_settings,
            h2e.PingAckReceived: self._on_ping_ack,
            h2e.RequestReceived: self._on_request,
            h2e.ResponseReceived: self._on_response,
        }

    # --- connection ---------------------------------------------------------------------

    def initiate(self, now: float) -> None:
        """Queue the preface (client), SETTINGS and the connection WINDOW_UPDATE."""
        s = self.settings
        values = {
            SettingCodes.INITIAL_WINDOW_SIZE: s.stream_window,
            SettingCodes.MAX_FRAME_SIZE: s.frame_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
        }
        if self.client_side:
            values[SettingCodes.ENABLE_PUSH] = 0
        else:
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = s.max_concurrent_streams
        # In force at once rather than on the peer's ACK, so the first SETTINGS frame carries
        # everything (h2 sends local_settings as they stand). Safe: windows and frame size
        # only grow, and the peer reads this SETTINGS before anything it could answer.
        h2 = self._h2
        h2.local_settings = Settings(client=self.client_side, initial_values=values)
        h2.max_inbound_frame_size = s.frame_size
        h2.decoder.max_header_list_size = s.max_header_list_size
        h2.initiate_connection()
        if not self.client_side:
            # h2 4.4.1 turns a stream over its inbound limit into a connection error before
            # decoding the header block; RFC 9113 §5.1.2 wants a stream error. h2 gets a looser
            # copy of the settings it just sent, and _on_request refuses the excess streams.
            values[SettingCodes.MAX_CONCURRENT_STREAMS] = 2 * s.max_concurrent_streams + 100
            h2.local_settings = Settings(client=False, initial_values=values)
        if s.connection_window > 65535:
            h2.increment_flow_control_window(s.connection_window - 65535)
        self._last_rx = now

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Feed bytes read from the transport; never raises on anything the peer sends."""
        if self._phase is Phase.DEAD or not data:
            return []
        self._last_rx = now
        try:
            accepted = self._scanner.feed(data, now)
        except FrameViolation as v:
            return self._fail(v.error_code, v.reason)
        events = self._take_deferred()
        frames = self._scanner.data_frames
        fast = (
            fastdata.try_receive(self._h2, accepted, frames)
            if frames is not None and fastdata.SUPPORTED
            else None
        )
        if fast is not None:
            for stream_id, payload in fast:
                self._data(stream_id, payload, len(payload), events)
        elif accepted:
            try:
                h2_events = self._h2.receive_data(accepted)
            except ProtocolError as e:
                # h2 has queued its own GOAWAY already.
                return self._fail(e.error_code, f"protocol error: {e}", send_goaway=False)
            try:
                self._translate(h2_events, events)
            except FrameViolation as v:  # a premature reset over the limit
                return self._fail(v.error_code, v.reason)
        if self._scanner.goaways:
            self._on_goaways(events)
        return events

    def data_to_send(self) -> bytes:
        """Everything queued since the last call, as one write."""
        if self._pre_out:
            out, self._pre_out = self._pre_out + self._h2.data_to_send(), b""
            return out
        return self._h2.data_to_send()

    def get_timer(self) -> float | None:
        """When `handle_timer` must run next (keepalive PING or its timeout)."""
        if self._phase is Phase.DEAD:
            return None
        if self._deferred:
            return self._last_rx  # already due
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.settings.ping_timeout
        return self._last_rx + self.settings.ping_interval

    def handle_timer(self, now: float) -> list[Event]:
        """PING after ping_interval of silence; no ACK within ping_timeout kills the connection."""
        if self._phase is Phase.DEAD:
            return []
        events = self._take_deferred()
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self.settings.ping_timeout:
                # Upstream server: abrupt_shutdown(NO_ERROR); the client just drops it.
                return events + self._fail(ErrorCodes.NO_ERROR, "ping timeout")
        elif now >= self._last_rx + self.settings.ping_interval:
            self._ping_count += 1
            self._ping_payload = self._ping_count.to_bytes(8, "big")
            self._h2.ping(self._ping_payload)
            self._ping_sent_at = now
        return events

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> list[Event]:
        """GOAWAY. NO_ERROR drains (streams continue, none new); any other code kills all."""
        if self._phase is Phase.DEAD:
            return []
        if error_code != ErrorCodes.NO_ERROR:
            return self._fail(error_code, "closed locally")
        if self._phase is Phase.OPEN:
            self._send_graceful_goaway()
            self._phase = PHASES[(self._phase, "goaway")]
        return []

    def connection_lost(self) -> list[Event]:
        """The transport is gone: reset every stream."""
        return self._fail(ErrorCodes.NO_ERROR, "connection lost", send_goaway=False, remote=True)

    def is_usable(self) -> bool:
        """New streams allowed: no GOAWAY either way and not dead."""
        return self._phase is Phase.OPEN

    def is_finished(self) -> bool:
        """Dead, or draining with no stream left: flush `data_to_send()` and close."""
        return self._phase is Phase.DEAD or (self._phase is Phase.DRAINING and not self._book.open)

    @property
    def open_streams(self) -> int:
        """Streams not yet closed (what counts against MAX_CONCURRENT_STREAMS)."""
        return self._book.open

    # --- streams ------------------------------------------------------------------------

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Send what the windows allow now; copy and buffer the rest until WINDOW_UPDATE."""
        st = self._book.streams.get(stream_id)
        if st is None or st.local_ended or st.end_pending or not data:
            return
        try:
            self._book.send(st, data)
        except NoSuchStreamError:  # incl. StreamClosedError
            self._forget(stream_id)

    def has_stream(self, stream_id: int) -> bool:
        """The stream is still open (not reset, not ended both ways): e.g. after an async dial."""
        st = self._book.streams.get(stream_id)
        return st is not None and not st.closed

    def buffered(self, stream_id: int) -> int:
        """Bytes waiting for flow-control credit on this stream."""
        st = self._book.streams.get(stream_id)
        return st.out_len if st is not None else 0

    def end_stream(self, stream_id: int) -> None:
        """Half-close: END_STREAM once the buffered bytes are out."""
        st = self._book.streams.get(stream_id)
        if st is None or st.local_ended or st.end_pending:
            return
        try:
            self._book.end(st)
        except NoSuchStreamError:
            self._forget(stream_id)

    def reset_stream(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM and forget the stream; tolerates streams the peer already closed."""
        st = self._book.streams.get(stream_id)
        if st is None:
            return
        was_closed = st.closed
        self._book.pop(stream_id)
        if not was_closed and self._phase is not Phase.DEAD:
            with contextlib.suppress(NoSuchStreamError):  # incl. StreamClosedError: gone in h2
                self._h2.reset_stream(stream_id, error_code)

    def acknowledge(self, stream_id: int, n: int) -> None:
        """`n` received bytes of this stream were consumed; credit is returned in batches."""
        st = self._book.streams.get(stream_id)
        if st is not None and n > 0 and self._phase is not Phase.DEAD:
            self._book.acknowledge(st, n)

    # --- internals ----------------------------------------------------------------------

    def _take_deferred(self) -> list[Event]:
        if not self._deferred:
            return []
        events, self._deferred = self._deferred, []
        return events

    def _forget(self, stream_id: int) -> None:
        # Defensive: h2 closed the stream although no event said how. Every read is fully
        # translated before the glue acts, so the reset that did it has been seen already.
        self._book.pop(stream_id)

    def _send_graceful_goaway(self) -> None:
        # Written by hand: h2 4.4.1 turns CLOSED on any GOAWAY and would stop every stream.
        last = self._h2.highest_inbound_stream_id
        goaway = _GOAWAY_HEADER + last.to_bytes(4, "big") + bytes(4)
        self._pre_out = self._pre_out + self._h2.data_to_send() + goaway

    def _fail(
        self,
        error_code: int,
        reason: str,
        *,
        send_goaway: bool = True,
        remote: bool = False,
        last_stream_id: int | None = None,
    ) -> list[Event]:
        """Move to DEAD: GOAWAY(error_code), then a StreamReset per open stream."""
        if self._phase is Phase.DEAD:
            return []
        last = self._h2.highest_inbound_stream_id if last_stream_id is None else last_stream_id
        if send_goaway:
            self._h2.close_connection(error_code)  # h2 accepts SEND_GOAWAY in every state
        self._phase = PHASES[(self._phase, "fail")]
        self._ping_sent_at = None
        self._deferred.clear()
        error_code = int(error_code)
        stream_code = int(ErrorCodes.CANCEL) if error_code == ErrorCodes.NO_ERROR else error_code
        events: list[Event] = [
            StreamReset(st.stream_id, stream_code, remote) for st in self._book.clear()
        ]
        events.append(ConnectionTerminated(error_code, last, reason))
        return events

    # --- internals: h2 events -> ours -----------------------------------------------------

    def _translate(self, h2_events: list[h2e.Event], events: list[Event]) -> None:
        dispatch = self._dispatch
        for ev in h2_events:
            handler = dispatch.get(type(ev))
            if handler is not None:
                handler(ev, events)
        if self._batch_new:
            self._drop_reset_in_batch(events)

    def _drop_reset_in_batch(self, events: list[Event]) -> None:
        # Rapid reset (CVE-2023-44487): a CONNECT reset within the same read never reaches the
        # glue, so the peer cannot make us dial upstream for streams it already abandoned.
        gone = {sid for sid in self._batch_new if sid not in self._book.streams}
        self._batch_new.clear()
        if gone:
            events[:] = [e for e in events if getattr(e, "stream_id", None) not in gone]

    def _on_data(self, ev: h2e.DataReceived, events: list[Event]) -> None:
        self._data(ev.stream_id, ev.data, ev.flow_controlled_length, events)

    def _data(self, stream_id: int, data: bytes, flow_controlled: int, events: list[Event]) -> None:
        st = self._book.streams.get(stream_id)
        if st is None or st.closed:  # rejected or reset locally: nobody will consume it
            self._book.credit_connection(flow_controlled)
            return
        n = len(data)
        self._book.received(st, n, flow_controlled)
        if n:
            events.append(DataReceived(stream_id, data, flow_controlled))

    def _on_stream_ended(self, ev: h2e.StreamEnded, events: list[Event]) -> None:
        st = self._book.streams.get(ev.stream_id)
        if st is not None and not st.remote_ended:
            st.remote_ended = True
            events.append(StreamEnded(ev.stream_id))
            self._book.maybe_close(st)

    def _on_stream_reset(self, ev: h2e.StreamReset, events: list[Event]) -> None:
        st = self._book.streams.get(ev.stream_id)
        if st is None:
            return
        if not st.closed:
            events.append(StreamReset(ev.stream_id, int(ev.error_code or 0), ev.remote_reset))
        self._book.pop(ev.stream_id)
        if ev.remote_reset and not st.answered and not self.client_side:
            self._count_premature_reset(ev.stream_id)

    def _count_premature_reset(self, stream_id: int) -> None:
        scanner = self._scanner
        if stream_id not in scanner.reset_in_read:  # else already counted before h2 saw it
            scanner.count_premature_reset(self._last_rx)

    def _on_window_updated(self, ev: h2e.WindowUpdated, events: list[Event]) -> None:
        if not ev.stream_id:
            self._book.push_all(events)
        elif (st := self._book.waiting.get(ev.stream_id)) is not None:
            self._book.push(st, events)

    def _on_settings(self, ev: h2e.RemoteSettingsChanged, events: list[Event]) -> None:
        changed = ev.changed_settings
        mcs = changed.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if mcs is not None:
            events.append(SettingsChanged(mcs.new_value))
        if SettingCodes.INITIAL_WINDOW_SIZE in changed:
            self._book.push_all(events)

    def _on_ping_ack(self, ev: h2e.PingAckReceived, events: list[Event]) -> None:
        if ev.ping_data == self._ping_payload:
            self._ping_sent_at = None

    def _on_request(self, ev: h2e.RequestReceived, events: list[Event]) -> None:
        # Client: h2 accepts a server-opened (even) stream; HBONE servers never open one.
        with contextlib.suppress(NoSuchStreamError):
            self._h2.reset_stream(ev.stream_id, ErrorCodes.REFUSED_STREAM)

    def _on_response(self, ev: h2e.ResponseReceived, events: list[Event]) -> None:
        pass  # server: h2 never emits it

    def _on_goaways(self, events: list[Event]) -> None:
        for last_stream_id, error_code in self._scanner.goaways:
            self._on_goaway(last_stream_id & 0x7FFFFFFF, error_code, events)
        self._scanner.goaways.clear()

    def _on_goaway(self, last_stream_id: int, error_code: int, events: list[Event]) -> None:
        if self._phase is Phase.DEAD:
            return
        if error_code != ErrorCodes.NO_ERROR:
            events += self._fail(
                error_code,
                "GOAWAY received",
                send_goaway=False,
                remote=True,
                last_stream_id=last_stream_id,
            )
            return
        first = self._phase is Phase.OPEN
        self._phase = PHASES[(self._phase, "goaway")]
        # Streams we opened above last_stream_id were never processed by the peer.
        refused = [
            sid
            for sid, st in self._book.streams.items()
            if sid > last_stream_id and sid % 2 == self.client_side and not st.closed
        ]
        for sid in refused:
            self.reset_stream(sid, ErrorCodes.CANCEL)
            events.append(StreamReset(sid, ErrorCodes.REFUSED_STREAM, True))
        if first:  # a graceful shutdown may send a second GOAWAY with a lower last_stream_id
            events.append(ConnectionTerminated(error_code, last_stream_id, "GOAWAY received"))
