"""HBONE core: a client and a server core pumped in memory, plus the header codecs."""

from __future__ import annotations

import ipaddress
import random
import time
from collections.abc import Sequence

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from hypothesis import given, settings
from hypothesis import strategies as st

from ztunnel.core.hbone import (
    ConnectionTerminated,
    ConnectRequested,
    DataReceived,
    Event,
    H2Settings,
    HBONEClient,
    HBONEConnection,
    HBONEServer,
    RequestRejected,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamReset,
    StreamUnavailable,
    StreamWritable,
)
from ztunnel.core.hbone_headers import (
    Baggage,
    TraceParent,
    baggage_header,
    forwarded_header,
    parse_authority,
    parse_baggage,
    parse_connect_head,
    parse_forwarded_host,
)
from ztunnel.core.model import Locality, Workload

pytestmark = pytest.mark.timeout(60)

MiB = 1 << 20


def pump(
    a: HBONEConnection, b: HBONEConnection, now: float = 0.0
) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until both sides are quiet; the events each side emitted."""
    ea: list[Event] = []
    eb: list[Event] = []
    for _ in range(10_000):
        x, y = a.data_to_send(), b.data_to_send()
        if not x and not y:
            return ea, eb
        if x:
            eb += b.receive_data(x, now)
        if y:
            ea += a.receive_data(y, now)
    raise AssertionError("pump did not settle")


def connected(
    client_settings: H2Settings | None = None, server_settings: H2Settings | None = None
) -> tuple[HBONEClient, HBONEServer]:
    c = HBONEClient(client_settings or H2Settings.client())
    s = HBONEServer(server_settings or H2Settings.server())
    c.initiate(0.0)
    s.initiate(0.0)
    pump(c, s)
    return c, s


def tunnel(c: HBONEClient, s: HBONEServer, authority: str = "10.0.0.2:8080") -> int:
    sid = c.open_stream(authority, [("baggage", "k8s.namespace.name=ns")])
    _, es = pump(c, s)
    assert [type(e) for e in es] == [ConnectRequested]
    s.respond(sid, 200)
    ec, _ = pump(c, s)
    assert ec == [ResponseReceived(sid, 200, ())]
    return sid


def received(events: Sequence[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def ack_all(conn: HBONEConnection, events: Sequence[Event]) -> None:
    for e in events:
        if isinstance(e, DataReceived):
            conn.acknowledge(e.stream_id, len(e.data))


def of_type(events: Sequence[Event], kind: type) -> list[Event]:
    return [e for e in events if isinstance(e, kind)]


# --- CONNECT and data -------------------------------------------------------------------------


def test_connect_reaches_server_with_authority_and_headers() -> None:
    c, s = connected()
    headers = [
        ("baggage", "k8s.cluster.name=c1"),
        ("forwarded", 'for="10.0.0.1:5000"'),
        ("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-00"),
    ]
    sid = c.open_stream("10.0.0.2:8080", headers)
    _, es = pump(c, s)
    assert es == [ConnectRequested(sid, "10.0.0.2:8080", tuple(headers))]
    s.respond(sid, 200, [("baggage", "k8s.namespace.name=dst")])
    ec, _ = pump(c, s)
    assert ec == [ResponseReceived(sid, 200, (("baggage", "k8s.namespace.name=dst"),))]


def test_connect_carries_ipv6_and_hostname_authorities() -> None:
    c, s = connected()
    for authority in ("[fd00::2]:80", "reviews.default.svc.cluster.local:9080"):
        c.open_stream(authority)
        _, es = pump(c, s)
        assert isinstance(es[0], ConnectRequested) and es[0].authority == authority


def test_data_flows_both_ways_with_acknowledge() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    assert c.has_stream(sid) and s.has_stream(sid)
    c.send(sid, b"ping")
    _, es = pump(c, s)
    assert es == [DataReceived(sid, b"ping", 4)]
    s.acknowledge(sid, 4)
    s.send(sid, memoryview(bytearray(b"pong")))
    ec, _ = pump(c, s)
    assert ec == [DataReceived(sid, b"pong", 4)]


def test_half_close_from_client_keeps_server_direction_open() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.send(sid, b"request")
    c.end_stream(sid)
    _, es = pump(c, s)
    assert es == [DataReceived(sid, b"request", 7), StreamEnded(sid)]
    s.send(sid, b"response")
    ec, _ = pump(c, s)
    assert ec == [DataReceived(sid, b"response", 8)]
    s.end_stream(sid)
    ec, _ = pump(c, s)
    assert ec == [StreamEnded(sid)]
    assert c.open_streams == 0 and s.open_streams == 0


def test_half_close_from_server_keeps_client_direction_open() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    s.end_stream(sid)
    ec, _ = pump(c, s)
    assert ec == [StreamEnded(sid)]
    c.send(sid, b"still going")
    _, es = pump(c, s)
    assert received(es, sid) == b"still going"
    c.send(sid, b"x")  # nothing sent after END_STREAM is lost or raises
    c.end_stream(sid)
    _, es = pump(c, s)
    assert es == [DataReceived(sid, b"x", 1), StreamEnded(sid)]


@pytest.mark.parametrize("resetter", ["client", "server"])
def test_reset_is_seen_by_the_other_side(resetter: str) -> None:
    c, s = connected()
    sid = tunnel(c, s)
    (c if resetter == "client" else s).reset_stream(sid, ErrorCodes.CANCEL)
    ec, es = pump(c, s)
    assert not c.has_stream(sid) and not s.has_stream(sid)
    seen = es if resetter == "client" else ec
    assert seen == [StreamReset(sid, ErrorCodes.CANCEL, True)]
    assert c.open_streams == 0 and s.open_streams == 0


def test_non_200_response_ends_the_stream() -> None:
    c, s = connected()
    sid = c.open_stream("10.0.0.2:80")
    pump(c, s)
    s.respond(sid, 503)
    ec, _ = pump(c, s)
    assert ec[:2] == [ResponseReceived(sid, 503, ()), StreamEnded(sid)]
    assert s.open_streams == 0
    assert c.available_streams() == 100 - c.open_streams


# --- flow control -----------------------------------------------------------------------------


def test_flow_control_stalls_without_acknowledgement_and_resumes() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    payload = random.Random(1).randbytes(10 * MiB)
    c.send(sid, payload)
    assert c.buffered(sid) == 6 * MiB  # the stream window is 4 MiB
    _, es = pump(c, s)
    got = received(es, sid)
    assert len(got) == 4 * MiB
    assert pump(c, s) == ([], [])  # stalled: nothing acknowledged, nothing more passes
    assert c.buffered(sid) == 6 * MiB
    writable: list[Event] = []
    while len(got) < len(payload):
        ack_all(s, es)
        ec, es = pump(c, s)
        got += received(es, sid)
        writable += of_type(ec, StreamWritable)
    assert got == payload
    assert writable == [StreamWritable(sid)]
    assert c.buffered(sid) == 0


def test_stream_writable_fires_once_buffer_drains() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.send(sid, bytes(9 * MiB))  # 5 MiB buffered > 4 MiB high-water mark
    _, es = pump(c, s)
    writable: list[Event] = []
    for _ in range(10):
        ack_all(s, es)
        ec, es = pump(c, s)
        writable += of_type(ec, StreamWritable)
    assert writable == [StreamWritable(sid)]
    assert c.buffered(sid) == 0


def test_end_stream_waits_for_buffered_data() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.send(sid, bytes(5 * MiB))
    c.end_stream(sid)
    _, es = pump(c, s)
    assert not of_type(es, StreamEnded)
    ack_all(s, es)
    _, es = pump(c, s)
    assert received(es, sid) == bytes(MiB)
    assert es[-1] == StreamEnded(sid)


def test_acknowledgements_are_batched() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    for _ in range(100):
        c.send(sid, b"x")
        pump(c, s)
        s.acknowledge(sid, 1)
        assert s.data_to_send() == b""  # no WINDOW_UPDATE per message
    s.acknowledge(sid, 10**9)  # over-acknowledging credits nothing extra
    assert s.data_to_send() == b""


def test_connection_window_survives_unacknowledged_resets() -> None:
    c, s = connected()
    for _ in range(5):  # 5 x 4 MiB > 16 MiB connection window unless resets return credit
        sid = tunnel(c, s)
        c.send(sid, bytes(4 * MiB))
        _, es = pump(c, s)
        assert len(received(es, sid)) == 4 * MiB
        s.reset_stream(sid)
        pump(c, s)


def test_large_send_arrives_in_one_frame_with_1mib_frames() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.send(sid, bytes(MiB))
    _, es = pump(c, s)
    assert [e.flow_controlled_length for e in es if isinstance(e, DataReceived)] == [MiB]


def test_send_after_reset_in_the_same_read_is_harmless() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.send(sid, bytes(6 * MiB))  # 2 MiB buffered behind the stream window
    _, es = pump(c, s)
    ack_all(s, es)  # WINDOW_UPDATEs ...
    s.reset_stream(sid)  # ... and RST_STREAM, read by the client in one batch
    ec, _ = pump(c, s)
    assert StreamReset(sid, ErrorCodes.CANCEL, True) in ec
    c.send(sid, b"late")
    c.end_stream(sid)
    c.reset_stream(sid)
    assert c.buffered(sid) == 0


def test_server_bytes_before_the_response_wait_for_it() -> None:
    c, s = connected()
    sid = c.open_stream("10.0.0.2:25")
    pump(c, s)
    s.send(sid, b"220 smtp ready\r\n")  # a server-first upstream speaks before respond(200)
    assert s.buffered(sid) == 16
    assert pump(c, s) == ([], [])
    s.respond(sid, 200)
    ec, _ = pump(c, s)
    assert ec == [ResponseReceived(sid, 200, ()), DataReceived(sid, b"220 smtp ready\r\n", 16)]
    assert s.get_timer() == 0.0  # the StreamWritable for the drained buffer is due now
    assert s.handle_timer(0.0) == [StreamWritable(sid)]
    assert s.get_timer() == 10.0


def test_window_updates_do_not_release_data_before_the_response() -> None:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    raw = raw_client()
    raw.send_headers(1, [CONNECT, (":authority", "10.0.0.1:80")])
    s.receive_data(raw.data_to_send(), 0.0)
    raw.receive_data(s.data_to_send())
    s.send(1, b"early")
    raw.increment_flow_control_window(1000)  # connection WINDOW_UPDATE: flushes waiting streams
    raw.increment_flow_control_window(1000, stream_id=1)
    s.receive_data(raw.data_to_send(), 0.0)
    assert not [
        e for e in raw.receive_data(s.data_to_send()) if isinstance(e, h2.events.DataReceived)
    ]
    s.respond(1, 200)
    answer = raw.receive_data(s.data_to_send())
    assert [type(e) for e in answer] == [h2.events.ResponseReceived, h2.events.DataReceived]


def test_server_half_close_before_the_response_waits_for_it() -> None:
    c, s = connected()
    sid = c.open_stream("10.0.0.2:80")
    pump(c, s)
    s.end_stream(sid)  # the upstream closed before the glue answered
    assert pump(c, s) == ([], [])
    s.respond(sid, 200)
    ec, _ = pump(c, s)
    assert ec == [ResponseReceived(sid, 200, ()), StreamEnded(sid)]


def test_padding_is_credited_and_over_acknowledgement_clamped() -> None:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    raw = raw_client()
    raw.send_headers(1, [CONNECT, (":authority", "10.0.0.1:80")])
    s.receive_data(raw.data_to_send(), 0.0)
    raw.receive_data(s.data_to_send())
    s.respond(1, 200)
    raw.receive_data(s.data_to_send())
    s.receive_data(raw.data_to_send(), 0.0)  # SETTINGS ACK
    got = 0
    for _ in range(200):  # 200 x (16 KiB + 101 padding) > the 4 MiB stream window
        raw.send_data(1, bytes(16 * 1024), pad_length=100)
        for e in s.receive_data(raw.data_to_send(), 0.0):
            assert isinstance(e, DataReceived) and e.flow_controlled_length == 16 * 1024 + 101
            s.acknowledge(1, e.flow_controlled_length)  # as a glue might: clamped to the data
            got += len(e.data)
        raw.receive_data(s.data_to_send())  # raises FlowControlError on an over-credit
    assert got == 200 * 16 * 1024
    assert s.is_usable()


# --- many streams, limits, GOAWAY -------------------------------------------------------------


def test_hundred_concurrent_streams_keep_their_data_apart() -> None:
    c, s = connected()
    sids = [c.open_stream(f"10.0.{i}.1:80") for i in range(100)]
    _, es = pump(c, s)
    assert len(of_type(es, ConnectRequested)) == 100
    for sid in sids:
        s.respond(sid, 200)
    pump(c, s)
    for sid in sids:
        c.send(sid, b"stream-%d" % sid * 100)
        s.send(sid, b"back-%d" % sid * 50)
    ec, es = pump(c, s)
    for sid in sids:
        assert received(es, sid) == b"stream-%d" % sid * 100
        assert received(ec, sid) == b"back-%d" % sid * 50
    assert c.available_streams() == 0
    with pytest.raises(StreamUnavailable):
        c.open_stream("10.0.0.1:80")


def test_available_streams_honours_peer_max_concurrent_streams() -> None:
    c = HBONEClient(H2Settings.client())
    s = HBONEServer(H2Settings(max_concurrent_streams=3))
    c.initiate(0.0)
    s.initiate(0.0)
    ec, _ = pump(c, s)
    assert SettingsChanged(3) in ec
    assert c.available_streams() == 3
    sids = [tunnel(c, s) for _ in range(3)]
    assert c.available_streams() == 0
    with pytest.raises(StreamUnavailable):
        c.open_stream("10.0.0.1:80")
    c.reset_stream(sids[0])
    assert c.available_streams() == 1


def test_pool_limit_given_at_construction_caps_available_streams() -> None:
    c = HBONEClient(H2Settings.client(), max_streams=2)
    s = HBONEServer(H2Settings.server())
    c.initiate(0.0)
    s.initiate(0.0)
    pump(c, s)
    assert c.available_streams() == 2
    tunnel(c, s)
    assert c.available_streams() == 1


def test_graceful_goaway_drains_existing_streams() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    assert s.close() == []
    ec, _ = pump(c, s)
    assert ec == [ConnectionTerminated(0, sid, "GOAWAY received")]
    assert not c.is_usable() and not c.is_finished()
    with pytest.raises(StreamUnavailable):
        c.open_stream("10.0.0.1:80")
    c.send(sid, b"after goaway")
    _, es = pump(c, s)
    assert received(es, sid) == b"after goaway"
    c.end_stream(sid)
    s.end_stream(sid)
    pump(c, s)
    assert c.is_finished() and s.is_finished()


def test_goaway_refuses_streams_the_peer_never_saw() -> None:
    c, s = connected()
    sid = c.open_stream("10.0.0.1:80")  # HEADERS still queued on the client
    s.close()
    ec = c.receive_data(s.data_to_send(), 0.0)
    assert ec == [
        StreamReset(sid, ErrorCodes.REFUSED_STREAM, True),
        ConnectionTerminated(0, 0, "GOAWAY received"),
    ]
    _, es = pump(c, s)
    assert es == []  # the server refuses it too, silently
    assert c.is_finished() and s.is_finished()


def test_second_graceful_goaway_terminates_once() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    header = b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # GOAWAY, 8 bytes, stream 0
    first = header + (0x7FFFFFFF).to_bytes(4, "big") + bytes(4)  # RFC 9113 §6.8 two-step
    assert c.receive_data(first, 0.0) == [ConnectionTerminated(0, 0x7FFFFFFF, "GOAWAY received")]
    second = header + bytes(8)  # last_stream_id 0: our stream was never processed
    assert c.receive_data(second, 0.0) == [StreamReset(sid, ErrorCodes.REFUSED_STREAM, True)]


def test_goaway_with_error_resets_every_stream() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    es = s.close(ErrorCodes.INTERNAL_ERROR)
    assert es == [
        StreamReset(sid, ErrorCodes.INTERNAL_ERROR, False),
        ConnectionTerminated(ErrorCodes.INTERNAL_ERROR, sid, "closed locally"),
    ]
    ec, _ = pump(c, s)
    assert ec == [
        StreamReset(sid, ErrorCodes.INTERNAL_ERROR, True),
        ConnectionTerminated(ErrorCodes.INTERNAL_ERROR, sid, "GOAWAY received"),
    ]
    assert not c.is_usable() and c.is_finished()
    assert c.get_timer() is None


def test_connection_lost_resets_open_streams() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    assert c.connection_lost() == [
        StreamReset(sid, ErrorCodes.CANCEL, True),
        ConnectionTerminated(0, 0, "connection lost"),
    ]
    assert c.receive_data(b"anything", 1.0) == []


# --- bad requests -----------------------------------------------------------------------------


def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    conn.initiate_connection()
    return conn


def raw_request(headers: list[tuple[str, str]]) -> tuple[list[Event], list[h2.events.Event]]:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    raw = raw_client()
    raw.send_headers(1, headers)
    events = s.receive_data(raw.data_to_send(), 0.0)
    return events, raw.receive_data(s.data_to_send())


CONNECT = (":method", "CONNECT")


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "a:1")],
         "expected method CONNECT, got GET"),
        ([CONNECT], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "foo")], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "1.2.3.4:0")], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "1.2.3.4:99999")], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "::1:80")], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "user@host:1")], "no valid authority pseudo header"),
        ([CONNECT, ("host", "10.0.0.1:80")], "no valid authority pseudo header"),
        ([CONNECT, (":authority", "10.0.0.1:80"), (":path", "/")],
         "no valid authority pseudo header"),
        ([CONNECT, (":authority", "10.0.0.1:80"), ("Upper", "x")], "malformed request headers"),
        ([CONNECT, (":authority", "10.0.0.1:80"), ("connection", "close")],
         "malformed request headers"),
    ],
)  # fmt: skip
def test_bad_request_is_answered_400_by_the_core(
    headers: list[tuple[str, str]], reason: str
) -> None:
    events, answer = raw_request(headers)
    assert of_type(events, RequestRejected) == [RequestRejected(1, 400, reason)]
    assert not of_type(events, ConnectRequested)
    responses = [e for e in answer if isinstance(e, h2.events.ResponseReceived)]
    assert [dict(e.headers or ())[b":status"] for e in responses] == [b"400"]


def test_rejected_request_data_does_not_leak_connection_window() -> None:
    s = HBONEServer(H2Settings.server())
    s.initiate(0.0)
    raw = raw_client()
    s.receive_data(raw.data_to_send(), 0.0)
    raw.receive_data(s.data_to_send())
    for sid in range(1, 41, 2):  # 20 x 1 MiB on rejected streams: more than the 16 MiB window
        raw.send_headers(sid, [(":method", "GET"), (":authority", "a:1")])
        raw.send_data(sid, bytes(MiB))
        events = of_type(s.receive_data(raw.data_to_send(), 0.0), RequestRejected)
        assert events == [RequestRejected(sid, 400, "expected method CONNECT, got GET")]
        raw.receive_data(s.data_to_send())
    assert s.open_streams == 0 and s.is_usable()


# --- keepalive --------------------------------------------------------------------------------


def test_keepalive_ping_is_answered() -> None:
    c, s = connected()
    assert c.get_timer() == 10.0
    assert c.handle_timer(5.0) == [] and c.data_to_send() == b""
    assert c.handle_timer(10.0) == []
    assert c.get_timer() == 30.0  # waiting for the ACK
    pump(c, s, now=10.5)
    assert c.get_timer() == 20.5  # ACK seen: next ping after another idle interval
    assert c.handle_timer(31.0) == []
    assert c.is_usable()


def test_unanswered_ping_times_out() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    c.handle_timer(10.0)
    c.data_to_send()  # lost
    assert c.handle_timer(29.9) == []
    assert c.handle_timer(30.0) == [
        StreamReset(sid, ErrorCodes.CANCEL, False),
        ConnectionTerminated(0, 0, "ping timeout"),
    ]
    assert not c.is_usable() and c.get_timer() is None


def test_traffic_postpones_keepalive() -> None:
    c, s = connected()
    sid = tunnel(c, s)
    s.send(sid, b"x")
    pump(c, s, now=8.0)
    assert c.get_timer() == 18.0


# --- byte-level robustness --------------------------------------------------------------------


def test_frames_split_at_every_byte_boundary() -> None:
    c = HBONEClient(H2Settings.client())
    s = HBONEServer(H2Settings.server())
    c.initiate(0.0)
    s.initiate(0.0)
    sid = c.open_stream("10.0.0.2:80")
    c.send(sid, b"hello")
    c.end_stream(sid)
    s.close()  # a GOAWAY split byte by byte too
    wire, back = c.data_to_send(), s.data_to_send()
    es = [e for i in range(len(wire)) for e in s.receive_data(wire[i : i + 1], 0.0)]
    ec = [e for i in range(len(back)) for e in c.receive_data(back[i : i + 1], 0.0)]
    assert of_type(es, ConnectRequested) == []  # refused: the GOAWAY came first
    assert ConnectionTerminated(0, 0, "GOAWAY received") in ec


def test_frames_split_at_every_byte_boundary_deliver_data() -> None:
    c = HBONEClient(H2Settings.client())
    s = HBONEServer(H2Settings.server())
    c.initiate(0.0)
    s.initiate(0.0)
    sid = c.open_stream("10.0.0.2:80")
    c.send(sid, b"hello")
    c.end_stream(sid)
    wire = c.data_to_send()
    es = [e for i in range(len(wire)) for e in s.receive_data(memoryview(wire)[i : i + 1], 0.0)]
    assert [type(e) for e in es] == [ConnectRequested, DataReceived, StreamEnded]


# --- header codecs ----------------------------------------------------------------------------


def test_baggage_header_from_workload() -> None:
    w = Workload(
        namespace="ns",
        cluster_id="c1",
        workload_type="deployment",
        workload_name="reviews",
        canonical_name="reviews",
        canonical_revision="v1",
        locality=Locality(region="r", zone="z"),
    )
    assert baggage_header(w) == (
        "k8s.cluster.name=c1,k8s.namespace.name=ns,k8s.deployment.name=reviews,"
        "service.name=reviews,service.version=v1,cloud.region=r,cloud.availability_zone=z"
    )
    assert baggage_header(Workload(namespace="ns")) == "k8s.namespace.name=ns"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("k8s.cluster.name=K1,k8s.namespace.name=NS1,k8s.deployment.name=N1,"
         "service.name=N2,service.version=V1",
         Baggage("K1", "NS1", "N1", "N2", "V1")),
        ("k8s.cluster.name=,k8s.namespace.name=,k8s.deployment.name=,service.name=",
         Baggage()),
        ("k8s.pod.name=p", Baggage(workload_name="p")),
        ("k8s.cronjob.name=j,k8s.job.name=k", Baggage(workload_name="k")),
        ("cloud.region=r,cloud.availability_zone=z", Baggage(region="r", zone="z")),
        ("unknown=1,noequals,k8s.namespace.name=a=b", Baggage(namespace="a")),
        ("", Baggage()),
        ("k8s.namespace.name=caf\u00e9", Baggage()),  # not visible ASCII: upstream drops it
    ],
)  # fmt: skip
def test_parse_baggage(value: str, expected: Baggage) -> None:
    assert parse_baggage(value) == expected


def test_baggage_round_trips() -> None:
    b = Baggage("cluster", "default", "workload", "service")
    assert parse_baggage(b.header("deployment")) == b


def test_traceparent_new_and_parse() -> None:
    tp = TraceParent.new(random.Random(7))
    header = tp.header()
    assert len(header) == 55 and header.startswith("00-") and header.endswith("-00")
    assert TraceParent.parse(header) == tp
    assert str(tp) == header
    assert tp.trace_id_hex == header[3:35]


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-" + "1" * 32 + "-" + "2" * 16 + "-0",
        "00-" + "1" * 32 + "-" + "2" * 16 + "-000",
        "00-" + "g" * 32 + "-" + "2" * 16 + "-00",
        "00_" + "1" * 32 + "-" + "2" * 16 + "-00",
        "000" + "1" * 32 + "-" + "2" * 16 + "-00",
    ],
)
def test_traceparent_rejects_malformed(value: str) -> None:
    assert TraceParent.parse(value) is None


def test_traceparent_accepts_uppercase_hex_like_upstream() -> None:
    tp = TraceParent.parse("00-" + "A" * 32 + "-" + "b" * 16 + "-01")
    assert tp is not None and tp.flags == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("127.0.0.1", 80, None), 'for="127.0.0.1:80"'),
        (("::1", 80, None), 'for="[::1]:80"'),
        (("127.0.0.1", 80, "example.com"), 'for="127.0.0.1:80";host=example.com'),
    ],
)
def test_forwarded_header(args: tuple[str, int, str | None], expected: str) -> None:
    assert forwarded_header(*args) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("by=identifier;for=identifier;host=example.com;proto=https", "example.com"),
        ('by=identifier;for=identifier;host="example.com";proto=https', "example.com"),
        ("by=identifier;for=identifier;proto=https", None),
        ("by=identifier;for=identifier;host=;proto=https", None),
        ('for=for;by=by;host=host;proto="pr\u00f6to"', None),
        ('for="10.0.0.1:80"; host=svc.ns.svc.cluster.local', "svc.ns.svc.cluster.local"),
    ],
)
def test_parse_forwarded_host(value: str, expected: str | None) -> None:
    assert parse_forwarded_host(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.1:80", ("10.0.0.1", 80, True)),
        ("[fd00::1]:15008", ("fd00::1", 15008, True)),
        ("[FD00:0::1]:1", ("fd00::1", 1, True)),
        ("[::ffff:1.2.3.4]:65535", (str(ipaddress.ip_address("::ffff:1.2.3.4")), 65535, True)),
        ("reviews.ns.svc.cluster.local:9080", ("reviews.ns.svc.cluster.local", 9080, False)),
        ("localhost:080", ("localhost", 80, False)),
        ("foo", None),
        ("1.2.3.4:0", None),
        ("1.2.3.4:99999", None),
        ("1.2.3.4:", None),
        ("1.2.3.4:+80", None),
        ("::1:80", None),
        ("[::1]", None),
        ("[::1]80", None),
        ("[fe80::1%eth0]:80", None),
        ("[1.2.3.4]:80", None),
        ("user@host:1", None),
        ("host:1/path", None),
        ("1.2.3.256:80", None),
        ("01.2.3.4:80", None),
        (":80", None),
        ("", None),
        ("h\u00e9:80", None),
    ],
)  # fmt: skip
def test_parse_authority(value: str, expected: tuple[str, int, bool] | None) -> None:
    assert parse_authority(value) == expected


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_header_parsers_never_raise(value: str) -> None:
    parse_authority(value)
    parse_baggage(value)
    parse_forwarded_host(value)
    TraceParent.parse(value)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.binary(max_size=12)), max_size=6))
def test_connect_head_parser_never_raises(raw: list[tuple[bytes, bytes]]) -> None:
    result = parse_connect_head(raw)
    assert isinstance(result, str | tuple)


# --- micro-benchmark (printed, never asserted) ------------------------------------------------


def test_print_micro_benchmark(capsys: pytest.CaptureFixture[str]) -> None:
    c, s = connected()
    sid = tunnel(c, s)
    chunk = bytes(MiB)
    total = 64 * MiB
    start = time.perf_counter()
    moved = 0
    while moved < total:
        c.send(sid, chunk)
        for e in s.receive_data(c.data_to_send(), 0.0):
            if isinstance(e, DataReceived):
                moved += len(e.data)
                s.acknowledge(sid, len(e.data))
        c.receive_data(s.data_to_send(), 0.0)
    bulk = time.perf_counter() - start

    rounds = 10_000
    start = time.perf_counter()
    for _ in range(rounds):
        c.send(sid, b"x")
        for e in s.receive_data(c.data_to_send(), 0.0):
            if isinstance(e, DataReceived):
                s.acknowledge(sid, 1)
                s.send(sid, e.data)
        for e in c.receive_data(s.data_to_send(), 0.0):
            if isinstance(e, DataReceived):
                c.acknowledge(sid, 1)
    rr = time.perf_counter() - start
    with capsys.disabled():
        print(
            f"\nhbone core: bulk {total / bulk / MiB:.0f} MiB/s "
            f"({total * 8 / bulk / 1e9:.2f} Gbit/s, 1 MiB sends); "
            f"1-byte round trip {rr / rounds * 1e6:.1f} us "
            f"({rr / rounds / 2 * 1e6:.1f} us per message, both cores)"
        )
