"""Plain TCP through the data plane: SOCKS5 (15080), captured outbound (15001), accounting."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
from harness import (
    LOCALHOST,
    EchoServer,
    LogLine,
    Ports,
    StartZtunnel,
    can_redirect,
    connection_ended,
    digest,
    echo_once,
    poll_until,
    recv_exact,
    redirect_to_outbound,
    send_and_drain,
    socket_owners,
    socks5_connect,
    sum_samples,
)

MIB = 1 << 20
MARK = 1337
COUNTERS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_received_bytes_total",
    "istio_tcp_sent_bytes_total",
)


def access_line(line: LogLine, dst: str) -> bool:
    return line.is_access() and line.fields.get("dst.addr") == dst


# ---------------------------------------------------------------------------------------------
# SOCKS5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reply_after_eof", [False, True], ids=["streaming", "reply-after-eof"])
def test_socks5_carries_1mib_intact_both_ways_and_half_close(
    ztunnel: StartZtunnel, reply_after_eof: bool
) -> None:
    zt = ztunnel()
    payload = os.urandom(MIB)
    with EchoServer(reply_after_eof=reply_after_eof) as echo:
        conn = socks5_connect(LOCALHOST, zt.ports.socks5, echo.host, echo.port)
        with conn:
            received, clean_eof = send_and_drain(conn, payload)
    assert clean_eof, "expected EOF after the echo, not a reset or a timeout"
    assert len(received) == MIB
    assert digest(received) == digest(payload)


@pytest.mark.timeout(60)
def test_closed_connection_is_counted_in_metrics_and_access_log(ztunnel: StartZtunnel) -> None:
    zt = ztunnel({"LOG_FORMAT": "json"})
    greeting = b"hello from upstream\n"
    payload = os.urandom(50_000)
    before = {name: zt.metric_value(name, reporter="source") for name in COUNTERS}

    with EchoServer(greeting=greeting) as echo:
        conn = socks5_connect(LOCALHOST, zt.ports.socks5, echo.host, echo.port)
        with conn:
            client = "{}:{}".format(*conn.getsockname())
            assert recv_exact(conn, len(greeting)) == greeting
            received, clean_eof = send_and_drain(conn, payload)
        assert clean_eof and received == payload

    sent_by_client, sent_to_client = len(payload), len(greeting) + len(payload)
    expected = {
        "istio_tcp_connections_opened_total": 1,
        "istio_tcp_connections_closed_total": 1,
        "istio_tcp_received_bytes_total": sent_by_client,  # from the client
        "istio_tcp_sent_bytes_total": sent_to_client,  # back to the client
    }

    def counted() -> dict[str, float] | None:
        text = zt.metrics()
        delta = {n: sum_samples(text, n, reporter="source") - before[n] for n in COUNTERS}
        return delta if delta == expected else None

    try:
        poll_until(counted, 3.0, "metrics of the closed connection", interval=0.1)
    except AssertionError:
        now = {n: zt.metric_value(n, reporter="source") - before[n] for n in COUNTERS}
        raise AssertionError(f"metric deltas {now}, expected {expected}") from None

    line = zt.wait_for_log(lambda ln: access_line(ln, f"{echo.host}:{echo.port}"), 1.0)
    assert line.level == "info"
    assert line.fields["src.addr"] == client
    assert line.fields["direction"] == "outbound"
    # Access logs are unflipped: bytes_sent is what the client sent.
    assert line.fields["bytes_sent"] == str(sent_by_client)
    assert line.fields["bytes_recv"] == str(sent_to_client)
    assert line.fields["duration"].endswith("ms")


# ---------------------------------------------------------------------------------------------
# Captured outbound (15001)


@pytest.fixture
def capture_allowed() -> None:
    reason = can_redirect()
    if reason is not None:
        pytest.skip(f"outbound capture test {reason}")


@pytest.fixture
def captured_echo(capture_allowed: None) -> Iterator[EchoServer]:
    """An echo server whose port this host's TCP is redirected to 15001 for."""
    with EchoServer() as echo, redirect_to_outbound(echo.host, echo.port, Ports().outbound, MARK):
        yield echo


@pytest.mark.timeout(60)
def test_captured_connection_reaches_original_destination_intact(
    ztunnel: StartZtunnel, captured_echo: EchoServer
) -> None:
    zt = ztunnel({"PACKET_MARK": str(MARK)})
    dst = f"{captured_echo.host}:{captured_echo.port}"
    payload = os.urandom(MIB)

    with socket.create_connection((captured_echo.host, captured_echo.port), timeout=5.0) as conn:
        client_ip, client_port = conn.getsockname()
        assert echo_once(conn, b"captured?") == b"captured?"
        # The echo server's peer is a worker's marked upstream socket, not this client.
        ((_, peer_port),) = captured_echo.wait_for_peers(1)
        assert peer_port != client_port
        owners = socket_owners(zt.worker_pids(), peer_port)
        assert owners.get(captured_echo.port) in zt.worker_pids()
        received, clean_eof = send_and_drain(conn, payload)

    assert clean_eof
    assert digest(received) == digest(payload)
    line = zt.wait_for_log(lambda ln: access_line(ln, dst), 3.0, f"access log to {dst}")
    assert line.fields["src.addr"] == f"{client_ip}:{client_port}"
    assert line.fields["direction"] == "outbound"
    assert line.fields["bytes_sent"] == str(len(b"captured?") + MIB)
    assert line.fields["bytes_recv"] == str(len(b"captured?") + MIB)


@pytest.mark.timeout(60)
def test_direct_connection_to_outbound_port_is_dropped_as_recursive(
    ztunnel: StartZtunnel,
) -> None:
    zt = ztunnel()
    with socket.create_connection((LOCALHOST, zt.ports.outbound), timeout=5.0) as conn:
        assert connection_ended(conn, 3.0)
    line = zt.wait_for_log(
        lambda ln: (
            ln.is_access("connection failed")
            and ln.fields.get("dst.addr") == f"{LOCALHOST}:{zt.ports.outbound}"
        ),
        3.0,
    )
    assert line.fields["error"] == "attempted recursive call to ourselves"
    assert line.fields["direction"] == "outbound"
