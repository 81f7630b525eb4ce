"""HBONE core under hostile peers: floods, oversized frames, garbage (hardening.md §4.2)."""

from __future__ import annotations

import hpack
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.core.hbone import (
    ConnectionTerminated,
    ConnectRequested,
    Event,
    H2Settings,
    HBONEClient,
    HBONEServer,
)
from ztunnel.core.hbone_frames import MAX_CONTINUATIONS, MAX_PEER_RESETS, PREFACE

pytestmark = pytest.mark.timeout(60)

CONNECT_HEADERS = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


class RawPeer:
    """A hand-driven client: exact frames, no h2 state machine in the way."""

    def __init__(self, server: HBONEServer | None = None) -> None:
        self.server = server or HBONEServer(H2Settings.server())
        self.server.initiate(0.0)
        self.encoder = hpack.Encoder()
        self.events: list[Event] = []
        self.sent_back = 0
        self.feed(PREFACE + SettingsFrame(0).serialize())

    def feed(self, data: bytes, now: float = 0.0) -> list[Event]:
        events = self.server.receive_data(data, now)
        self.events += events
        self.sent_back += len(self.server.data_to_send())
        return events

    def headers(self, sid: int, *, end_headers: bool = True, block: bytes | None = None) -> bytes:
        f = HeadersFrame(sid)
        f.data = self.encoder.encode(CONNECT_HEADERS) if block is None else block
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    def terminated(self) -> ConnectionTerminated | None:
        found = [e for e in self.events if isinstance(e, ConnectionTerminated)]
        return found[0] if found else None


def rst(sid: int) -> bytes:
    f = RstStreamFrame(sid)
    f.error_code = ErrorCodes.CANCEL
    return f.serialize()


def goaway_codes(data: bytes) -> list[int]:
    codes = []
    pos = 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        if isinstance(frame, GoAwayFrame):
            codes.append(frame.error_code)
        pos += 9 + length
    return codes


def server_output_after(peer: RawPeer, data: bytes) -> bytes:
    peer.server.receive_data(data, 0.0)
    return peer.server.data_to_send()


# --- rapid reset (CVE-2023-44487) -------------------------------------------------------------


def test_rapid_reset_in_one_read_is_cut_off_before_h2_sees_it() -> None:
    peer = RawPeer()
    flood = b"".join(peer.headers(sid) + rst(sid) for sid in range(1, 20_001, 2))  # 10k pairs
    out = server_output_after(peer, flood)
    assert goaway_codes(out) == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert len(out) < 100


def test_rapid_reset_pair_by_pair_ends_within_a_thousand_resets() -> None:
    peer = RawPeer()
    pairs = 0
    for sid in range(1, 20_001, 2):
        peer.feed(peer.headers(sid) + rst(sid))
        pairs += 1
        if peer.terminated():
            break
    ended = peer.terminated()
    assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert pairs <= MAX_PEER_RESETS
    # Streams reset within the read that opened them never reach the glue.
    assert not [e for e in peer.events if isinstance(e, ConnectRequested)]
    assert peer.sent_back < 64 * 1024  # nothing queued per abandoned stream


def test_slow_resets_end_at_the_lifetime_cap() -> None:
    peer = RawPeer()
    pairs = 0
    for i, sid in enumerate(range(1, 20_001, 2)):
        peer.feed(peer.headers(sid) + rst(sid), now=i * 0.05)  # 20 per second: under the rate
        pairs += 1
        if peer.terminated():
            break
    ended = peer.terminated()
    assert ended is not None and ended.reason == "too many stream resets"
    assert pairs == MAX_PEER_RESETS + 1


def test_resets_split_from_their_headers_still_count() -> None:
    peer = RawPeer()
    pairs = 0
    for sid in range(1, 4001, 2):
        peer.feed(peer.headers(sid))
        peer.feed(rst(sid))
        pairs += 1
        if peer.terminated():
            break
    ended = peer.terminated()
    assert ended is not None and ended.reason == "stream reset flood"
    assert pairs <= MAX_PEER_RESETS


def test_resets_of_answered_streams_are_ordinary_aborts() -> None:
    c = HBONEClient(H2Settings.client())
    s = HBONEServer(H2Settings.server())
    c.initiate(0.0)
    s.initiate(0.0)
    s.receive_data(c.data_to_send(), 0.0)
    c.receive_data(s.data_to_send(), 0.0)
    for _ in range(1500):  # more than the lifetime cap, all within one second
        sid = c.open_stream("10.0.0.1:80")
        s.receive_data(c.data_to_send(), 0.0)
        s.respond(sid, 200)
        c.receive_data(s.data_to_send(), 0.0)
        c.reset_stream(sid)
        assert not [
            e for e in s.receive_data(c.data_to_send(), 0.0) if isinstance(e, ConnectionTerminated)
        ]
    assert s.is_usable()


# --- header blocks ----------------------------------------------------------------------------


def test_continuation_flood_is_closed_after_the_limit() -> None:
    peer = RawPeer()
    block = peer.encoder.encode(CONNECT_HEADERS)
    peer.feed(peer.headers(1, end_headers=False, block=block[:1]))
    for i in range(MAX_CONTINUATIONS):
        frame = ContinuationFrame(1)
        frame.data = b"\x00"
        peer.feed(frame.serialize())
        assert peer.terminated() is None, f"closed after {i + 1} CONTINUATION frames"
    peer.feed(ContinuationFrame(1).serialize())
    ended = peer.terminated()
    assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM


def test_oversized_headers_frame_is_refused_from_its_header() -> None:
    peer = RawPeer()
    frame = peer.headers(1, block=bytes(16 * 1024 + 1))
    out = server_output_after(peer, frame[:9])  # the frame header alone is enough
    assert goaway_codes(out) == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_frame_claiming_16_mib_is_refused_before_buffering() -> None:
    peer = RawPeer()
    header = (1 << 24) - 1
    out = server_output_after(peer, header.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
    assert goaway_codes(out) == [ErrorCodes.FRAME_SIZE_ERROR]
    assert peer.server.is_finished()


def test_header_list_over_the_limit_ends_the_connection() -> None:
    peer = RawPeer()
    big = [*CONNECT_HEADERS, *((f"x-{i}", "v" * 1000) for i in range(80))]
    events = peer.feed(peer.headers(1, block=hpack.Encoder().encode(big)[: 16 * 1024]))
    assert events and isinstance(events[-1], ConnectionTerminated)


# --- control frame floods -----------------------------------------------------------------------


def test_ping_flood_gets_goaway() -> None:
    peer = RawPeer()
    for i in range(1001):
        peer.feed(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize())
    ended = peer.terminated()
    assert ended is not None and ended.error_code == ErrorCodes.ENHANCE_YOUR_CALM
    assert peer.sent_back < 1001 * 17 + 200  # PING ACKs stop at the limit


def test_ping_flood_in_one_read_gets_no_acks() -> None:
    peer = RawPeer()
    flood = b"".join(PingFrame(0).serialize() for _ in range(5000))
    out = server_output_after(peer, flood)
    assert goaway_codes(out) == [ErrorCodes.ENHANCE_YOUR_CALM]
    assert len(out) < 100


def test_settings_flood_gets_goaway() -> None:
    peer = RawPeer()
    out = server_output_after(peer, SettingsFrame(0).serialize() * 1001)
    assert goaway_codes(out) == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_empty_data_flood_gets_goaway() -> None:
    peer = RawPeer()
    peer.feed(peer.headers(1))
    out = server_output_after(peer, DataFrame(1).serialize() * 1001)
    assert goaway_codes(out)[-1:] == [ErrorCodes.ENHANCE_YOUR_CALM]


def test_control_frames_at_a_sane_rate_are_fine() -> None:
    peer = RawPeer()
    for i in range(3000):
        peer.feed(PingFrame(0).serialize(), now=i * 0.05)
    assert peer.terminated() is None


# --- protocol errors ----------------------------------------------------------------------------


def test_invalid_preface_terminates() -> None:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    events = s.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 0.0)
    assert events == [ConnectionTerminated(ErrorCodes.PROTOCOL_ERROR, 0, "invalid preface")]
    assert s.receive_data(PREFACE, 0.0) == []


def test_streams_beyond_max_concurrent_streams_are_refused() -> None:
    peer = RawPeer(HBONEServer(H2Settings(max_concurrent_streams=3)))
    peer.feed(b"".join(peer.headers(sid) for sid in (1, 3, 5, 7, 9)))
    opened = [e.stream_id for e in peer.events if isinstance(e, ConnectRequested)]
    assert opened == [1, 3, 5]
    assert peer.terminated() is None
    assert peer.server.open_streams == 3


def test_window_update_overflow_terminates() -> None:
    peer = RawPeer()
    events = peer.feed(WindowUpdateFrame(0, window_increment=(1 << 31) - 1).serialize())
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_data_on_unopened_stream_terminates() -> None:
    peer = RawPeer()
    frame = DataFrame(5)
    frame.data = b"x"
    events = peer.feed(frame.serialize())
    assert isinstance(events[-1], ConnectionTerminated)


def test_malformed_goaway_terminates() -> None:
    peer = RawPeer()
    events = peer.feed(b"\x00\x00\x04\x07\x00\x00\x00\x00\x00" + bytes(4))
    assert events == [ConnectionTerminated(ErrorCodes.PROTOCOL_ERROR, 0, "malformed GOAWAY")]


# --- garbage ------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512), st.booleans())
def test_random_bytes_never_raise(data: bytes, with_preface: bool) -> None:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    s.receive_data((PREFACE if with_preface else b"") + data, 0.0)
    s.data_to_send()
    c = HBONEClient(H2Settings.client())
    c.initiate(0.0)
    c.receive_data(data, 0.0)
    c.data_to_send()


frames = st.lists(
    st.tuples(
        st.integers(0, 12),  # type, including unknown extension frames
        st.integers(0, 255),  # flags
        st.sampled_from([0, 1, 2, 3, 5, 0x7FFFFFFF]),  # stream id
        st.binary(max_size=40),  # payload
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames, st.integers(1, 64))
def test_random_frames_never_raise(
    frame_list: list[tuple[int, int, int, bytes]], split: int
) -> None:
    wire = PREFACE + SettingsFrame(0).serialize()
    for ftype, flags, sid, payload in frame_list:
        wire += len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big")
        wire += payload
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    for i in range(0, len(wire), split):
        s.receive_data(wire[i : i + split], 0.0)
        s.data_to_send()
    for sid in (1, 3):  # glue calls on whatever state the garbage left behind
        s.respond(sid, 200)
        s.send(sid, b"x")
        s.acknowledge(sid, 1)
        s.end_stream(sid)
        s.reset_stream(sid)
    s.handle_timer(100.0)
    s.close()
    s.data_to_send()
