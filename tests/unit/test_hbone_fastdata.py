"""The DATA fast path (`hbone_fastdata`) against h2's own path: same bytes, events, windows."""

from __future__ import annotations

from typing import Any
from unittest.mock import patch

import h2
import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_hbone import connected, pump, tunnel
from test_hbone_abuse import RawPeer

from ztunnel.core import hbone_fastdata as fastdata
from ztunnel.core.hbone import (
    ConnectionTerminated,
    DataReceived,
    Event,
    H2Settings,
    HBONEClient,
    HBONEConnection,
    HBONEServer,
    StreamEnded,
)
from ztunnel.core.hbone_frames import PREFACE

pytestmark = pytest.mark.timeout(60)

SMALL = {"stream_window": 65535, "connection_window": 100_000, "frame_size": 16384}


def test_fast_path_is_on_with_the_supported_h2() -> None:
    # Off would cost a third of the CPU per small message (docs/performance.md): make an h2
    # upgrade that moved its internals fail here rather than quietly get slower.
    assert h2.__version__.startswith("4.")
    assert fastdata.SUPPORTED


def _windows(conn: HBONEConnection) -> tuple[Any, ...]:
    h: Any = conn._h2
    streams = sorted(
        (sid, s.outbound_flow_control_window, s._inbound_window_manager.current_window_size)
        for sid, s in h.streams.items()
    )
    return (
        h.outbound_flow_control_window,
        h._inbound_flow_control_window_manager.current_window_size,
        streams,
    )


Op = tuple[str, int, int, int]  # kind, side (0 client / 1 server), stream index, size or split

ops = st.lists(
    st.one_of(
        st.tuples(st.just("send"), st.integers(0, 1), st.integers(0, 1), st.integers(1, 40_000)),
        st.tuples(st.just("ack"), st.integers(0, 1), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("end"), st.integers(0, 1), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("pump"), st.just(0), st.just(0), st.integers(1, 70_000)),
    ),
    max_size=30,
)


def _run(script: list[Op], fast: bool) -> tuple[list[bytes], list[Any], list[Any]]:
    with patch.object(fastdata, "SUPPORTED", fast):
        c, s = connected(H2Settings.client(**SMALL), H2Settings.server(**SMALL))
        sids = [tunnel(c, s, "10.0.0.2:80"), tunnel(c, s, "10.0.0.2:81")]
        sides: tuple[HBONEConnection, HBONEConnection] = (c, s)
        unacked: list[dict[int, int]] = [{}, {}]
        wire: list[bytes] = []
        seen: list[Any] = []
        windows: list[Any] = []

        def deliver(split: int) -> None:
            for _ in range(100):
                moved = False
                for i, (a, b) in enumerate(((c, s), (s, c))):
                    out = a.data_to_send()
                    if not out:
                        continue
                    moved = True
                    wire.append(out)
                    for k in range(0, len(out), split):
                        events: list[Event] = b.receive_data(out[k : k + split], 0.0)
                        for e in events:
                            if isinstance(e, DataReceived):
                                got = unacked[1 - i]
                                got[e.stream_id] = got.get(e.stream_id, 0) + len(e.data)
                        seen.extend((1 - i, e) for e in events)
                if not moved:
                    return

        for kind, side, index, size in script:
            conn, sid = sides[side], sids[index]
            if kind == "send":
                conn.send(sid, bytes([size % 251]) * size)
            elif kind == "ack":
                conn.acknowledge(sid, unacked[side].pop(sid, 0))
            elif kind == "end":
                conn.end_stream(sid)
            else:
                deliver(size)
            windows.append((_windows(c), _windows(s)))
        deliver(1 << 20)
        windows.append((_windows(c), _windows(s)))
        return wire, seen, windows


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_fast_path_matches_h2_byte_for_byte(script: list[Op]) -> None:
    assert _run(script, fast=True) == _run(script, fast=False)


def test_small_messages_take_the_fast_path() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    sent: list[bool] = []
    received: list[Any] = []
    real_send, real_receive = fastdata.try_send, fastdata.try_receive

    def send_spy(*args: Any) -> bool:
        sent.append(real_send(*args))
        return sent[-1]

    def receive_spy(*args: Any) -> Any:
        received.append(real_receive(*args))
        return received[-1]

    with (
        patch.object(fastdata, "try_send", send_spy),
        patch.object(fastdata, "try_receive", receive_spy),
    ):
        c.send(sid, b"ping")
        out = c.data_to_send()
        assert out == b"\x00\x00\x04\x00\x00" + sid.to_bytes(4, "big") + b"ping"
        assert s.receive_data(out, 0.0) == [DataReceived(sid, b"ping", 4)]
    assert sent == [True]
    assert received == [[(sid, b"ping")]]


def _data_frame(sid: int, payload: bytes, *flags: str, pad: int = 0) -> bytes:
    f = DataFrame(sid)
    f.data = payload
    for flag in flags:
        f.flags.add(flag)
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    return f.serialize()


def test_end_stream_and_padding_go_through_h2() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    frames = _data_frame(sid, b"ab", pad=5) + _data_frame(sid, b"cd", "END_STREAM")
    assert fastdata.try_receive(s._h2, frames) is None
    events = s.receive_data(frames, 0.0)
    assert events == [DataReceived(sid, b"ab", 8), DataReceived(sid, b"cd", 2), StreamEnded(sid)]


def test_data_over_the_stream_window_is_a_flow_control_error() -> None:
    peer = RawPeer(HBONEServer(H2Settings.server(**SMALL)))
    peer.feed(peer.headers(1))
    chunk = _data_frame(1, bytes(16384))
    for _ in range(3):
        peer.feed(chunk)
    assert peer.terminated() is None
    events = peer.feed(chunk + chunk)  # 80 KiB in all, over the 64 KiB stream window
    assert isinstance(events[-1], ConnectionTerminated)
    assert events[-1].error_code == ErrorCodes.FLOW_CONTROL_ERROR


def test_data_on_a_locally_reset_stream_credits_the_connection_only() -> None:
    c, s = connected(H2Settings.client(**SMALL), H2Settings.server(**SMALL))
    sid = tunnel(c, s)
    s.reset_stream(sid)
    before = _windows(s)[1]
    events = s.receive_data(_data_frame(sid, bytes(1000)), 0.0)
    assert not [e for e in events if isinstance(e, DataReceived)]
    assert _windows(s)[1] <= before  # h2 charged it; our book gives it back in batches
    c2, s2 = connected()
    sid2 = tunnel(c2, s2)
    s2.send(sid2, b"x")
    c2.reset_stream(sid2)
    ec, _ = pump(c2, s2)
    assert not [e for e in ec if isinstance(e, DataReceived)]


def test_data_before_the_preface_is_left_to_the_checks() -> None:
    server = HBONEServer(H2Settings.server())
    server.initiate(0.0)
    events = server.receive_data(PREFACE[:10], 0.0)
    assert events == []
    assert fastdata.try_receive(server._h2, _data_frame(1, b"x")) is None
    client = HBONEClient(H2Settings.client())
    client.initiate(0.0)
    assert fastdata.try_receive(client._h2, _data_frame(1, b"x")) is None  # no such stream
