"""Two nodes, two dedicated ztunnels, real captured traffic between them over HBONE.

Node A (198.18.0.1) runs the ztunnel of `default/client`; node B (198.18.0.2) runs the
ztunnel of `default/server` and the echo servers. A's OUTPUT chain redirects the client's
connections to B into A's 15001 (scripts/redirect), except packets carrying PACKET_MARK,
i.e. ztunnel's own upstream sockets. Upstream's counterpart is `tests/namespaced.rs`
(`cross_node_captured_dedicated`, `trust_domain_mismatch_rejected`; inventory §17.2).
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from mesh import (
    IO_TIMEOUT,
    PROJECT_ROOT,
    WORKERS,
    EchoServer,
    LogKeeper,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    digest,
    issue,
    recv_exact,
    recv_until_eof,
    send_and_drain,
    spiffe,
    write_cert,
    write_local_config,
)
from netns import Netns, Network

from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(90)

NODE_A_IP = "198.18.0.1"
NODE_B_IP = "198.18.0.2"
TCP_WORKLOAD_IP = "198.18.0.3"  # a TCP-protocol workload living on node B
DOUBLE_PORT = 8080  # ReadDoubleWrite: 11 bytes in, 22 out
ECHO_PORT = 8081  # plain echo
AFTER_EOF_PORT = 8082  # replies only once the client has half-closed
HBONE_PORT = 15008
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")
HELLO = b"hello world"  # 11 bytes, as upstream's namespaced tests send

CLIENT = WorkloadSpec(
    "client", NODE_A_IP, "node-a", canonical_name="sleep", canonical_revision="v1"
)
SERVER = WorkloadSpec("server", NODE_B_IP, "node-b", canonical_name="echo", canonical_revision="v2")
TCP_SERVER = WorkloadSpec("tcp-echo", TCP_WORKLOAD_IP, "node-b", protocol="TCP")


@dataclass
class TwoNodes:
    a: Netns
    b: Netns
    za: NodeZtunnel
    zb: NodeZtunnel

    def client(self, ip: str = NODE_B_IP, port: int = DOUBLE_PORT) -> socket.socket:
        """A connection from node A's client (captured by A's ztunnel)."""
        return connect(self.a, ip, port)


@pytest.fixture
def nodes(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[TwoNodes]:
    ca_dir, _ = fake_ca
    a, b = network.node("a"), network.node("b")
    _, b_if = network.link(a, f"{NODE_A_IP}/24", b, f"{NODE_B_IP}/24")
    b.add_address(b_if, f"{TCP_WORKLOAD_IP}/24")
    config = write_local_config(tmp_path / "local.yaml", [CLIENT, SERVER, TCP_SERVER])
    a.run(REDIRECT, "outbound", NODE_B_IP, f"{DOUBLE_PORT}:{AFTER_EOF_PORT}")
    a.run(REDIRECT, "outbound", TCP_WORKLOAD_IP, str(DOUBLE_PORT))
    b.run(REDIRECT, "inbound", TCP_WORKLOAD_IP, str(DOUBLE_PORT))
    servers = [
        EchoServer(b, NODE_B_IP, DOUBLE_PORT, double=True),
        EchoServer(b, NODE_B_IP, ECHO_PORT),
        EchoServer(b, NODE_B_IP, AFTER_EOF_PORT, reply_after_eof=True),
        EchoServer(b, TCP_WORKLOAD_IP, DOUBLE_PORT, double=True),
    ]
    za = ztunnel_logs.add("a", NodeZtunnel.dedicated(a, CLIENT, config, ca_dir))
    zb = ztunnel_logs.add("b", NodeZtunnel.dedicated(b, SERVER, config, ca_dir))
    try:
        za.wait_ready()
        zb.wait_ready()
        yield TwoNodes(a, b, za, zb)
    finally:
        za.kill()
        zb.kill()
        for server in servers:
            server.close()


# ---------------------------------------------------------------------------------------------
# Captured traffic


def test_captured_connection_is_tunnelled_over_hbone_with_both_identities(
    nodes: TwoNodes,
) -> None:
    with nodes.client() as sock:
        sock.sendall(HELLO)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == HELLO * 2
        client_addr = "{}:{}".format(*sock.getsockname())

    outbound = nodes.za.wait_access(**{"src.addr": client_addr, "direction": "outbound"})
    assert outbound.fields["dst.addr"] == f"{NODE_B_IP}:{HBONE_PORT}"
    assert outbound.fields["dst.hbone_addr"] == f"{NODE_B_IP}:{DOUBLE_PORT}"
    assert outbound.fields["src.identity"] == CLIENT.identity
    assert outbound.fields["dst.identity"] == SERVER.identity

    # B sees the tunnel from A's node address; the app connection is one of its streams.
    inbound = nodes.zb.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{DOUBLE_PORT}"}
    )
    assert inbound.fields["src.identity"] == spiffe("default", "client")
    assert inbound.fields["dst.identity"] == SERVER.identity
    assert inbound.fields["dst.addr"] == f"{NODE_B_IP}:{HBONE_PORT}"
    assert inbound.fields["src.addr"].startswith(f"{NODE_A_IP}:")
    assert inbound.fields["src.workload"] == "client"
    assert inbound.fields["dst.workload"] == "server"


def test_one_mebibyte_of_random_bytes_echoes_back_intact(nodes: TwoNodes) -> None:
    payload = os.urandom(1 << 20)
    with nodes.client(port=ECHO_PORT) as sock:
        received, clean_eof = send_and_drain(sock, payload)
    assert len(received) == len(payload)
    assert digest(received) == digest(payload)
    assert clean_eof


def test_half_closed_client_still_receives_every_byte_then_eof(nodes: TwoNodes) -> None:
    """The server answers only after the client's FIN crossed both ztunnels (END_STREAM)."""
    payload = os.urandom(64 * 1024)
    with nodes.client(port=AFTER_EOF_PORT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = recv_until_eof(sock)
    assert digest(received) == digest(payload)


# ---------------------------------------------------------------------------------------------
# Metrics and access logs (upstream tests/namespaced.rs: 11 bytes out, 22 back)


def test_metrics_and_access_logs_count_eleven_bytes_out_and_twenty_two_back_on_both_nodes(
    nodes: TwoNodes,
) -> None:
    with nodes.client() as sock:
        sock.sendall(HELLO)
        assert recv_exact(sock, 22) == HELLO * 2
    nodes.za.wait_access(direction="outbound")
    nodes.zb.wait_access(direction="inbound")

    common = {
        "connection_security_policy": "mutual_tls",
        "source_workload": "client",
        "source_workload_namespace": "default",
        "source_principal": CLIENT.identity,
        "source_canonical_service": "sleep",
        "source_canonical_revision": "v1",
        "source_app": "sleep",
        "source_version": "v1",
        "destination_workload": "server",
        "destination_canonical_service": "echo",
        "destination_canonical_revision": "v2",
        "destination_app": "echo",
        "destination_version": "v2",
        "destination_workload_namespace": "default",
        "destination_principal": SERVER.identity,
        "request_protocol": "tcp",
        "response_flags": "-",
    }
    for zt, reporter in ((nodes.za, "source"), (nodes.zb, "destination")):
        labels = {"reporter": reporter, **common}
        zt.wait_metric("istio_tcp_connections_opened_total", 1, **labels)
        zt.wait_metric("istio_tcp_connections_closed_total", 1, **labels)
        zt.wait_metric("istio_tcp_received_bytes_total", 11, **labels)
        zt.wait_metric("istio_tcp_sent_bytes_total", 22, **labels)
        # Nothing else was opened on either node, under any labels.
        assert zt.metric("istio_tcp_connections_opened_total") == 1

    outbound = nodes.za.wait_access(direction="outbound")
    assert (outbound.fields["bytes_sent"], outbound.fields["bytes_recv"]) == ("11", "22")
    inbound = nodes.zb.wait_access(direction="inbound")
    assert (inbound.fields["bytes_sent"], inbound.fields["bytes_recv"]) == ("22", "11")


# ---------------------------------------------------------------------------------------------
# Pooling


def test_two_hundred_concurrent_connections_share_a_few_pooled_tls_connections(
    nodes: TwoNodes,
) -> None:
    count = 200

    def open_one(i: int) -> socket.socket:
        sock = socket.create_connection((NODE_B_IP, DOUBLE_PORT), IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        message = b"%04d" % i
        sock.sendall(message)
        assert recv_exact(sock, 8) == message * 2
        return sock

    # Opened from 16 threads inside node A: concurrent first use of one pool key per worker.
    futures = [nodes.a.submit(open_one, i) for i in range(count)]
    deadline = time.monotonic() + 60
    socks = [f.result(max(0.0, deadline - time.monotonic())) for f in futures]
    try:
        tunnels = _established(nodes.a, NODE_B_IP, HBONE_PORT)
        # Each worker has its own pool; 100 streams per connection (POOL_MAX_STREAMS_PER_
        # CONNECTION) means at most ceil(200 / 100) connections in any one worker.
        assert 0 < tunnels <= 2 * WORKERS, f"{tunnels} TLS connections for {count} streams"
        for i, sock in enumerate(socks):
            sock.sendall(b"%04d" % i)
        for i, sock in enumerate(socks):
            assert recv_exact(sock, 8) == (b"%04d" % i) * 2
    finally:
        for sock in socks:
            sock.close()
    nodes.za.wait_metric("istio_tcp_connections_closed_total", count, reporter="source", timeout=20)
    # Closing the streams keeps the pooled connections for reuse (POOL_UNUSED_RELEASE_TIMEOUT).
    assert 0 < _established(nodes.a, NODE_B_IP, HBONE_PORT) <= 2 * WORKERS


def _established(ns: Netns, ip: str, port: int) -> int:
    out = ns.ss("-tnH", "state", "established", "dst", f"{ip}:{port}")
    return len([line for line in out.splitlines() if line.strip()])


# ---------------------------------------------------------------------------------------------
# A TCP-protocol destination: plain TCP from A, B's inbound plaintext (15006)


def test_tcp_protocol_destination_travels_as_plaintext_into_inbound_passthrough(
    nodes: TwoNodes,
) -> None:
    with nodes.client(ip=TCP_WORKLOAD_IP) as sock:
        sock.sendall(HELLO)
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == HELLO * 2

    outbound = nodes.za.wait_access(direction="outbound")
    assert outbound.fields["dst.addr"] == f"{TCP_WORKLOAD_IP}:{DOUBLE_PORT}"
    assert outbound.fields["dst.workload"] == "tcp-echo"
    assert "dst.hbone_addr" not in outbound.fields
    assert "src.identity" not in outbound.fields  # identities only with mutual_tls
    assert (outbound.fields["bytes_sent"], outbound.fields["bytes_recv"]) == ("11", "22")
    inbound = nodes.zb.wait_access(direction="inbound")
    assert inbound.fields["dst.addr"] == f"{TCP_WORKLOAD_IP}:{DOUBLE_PORT}"
    assert inbound.fields["src.addr"].startswith(f"{NODE_A_IP}:")
    assert "src.identity" not in inbound.fields
    assert (inbound.fields["bytes_sent"], inbound.fields["bytes_recv"]) == ("22", "11")

    source = {
        "reporter": "source",
        "connection_security_policy": "unknown",
        "source_workload": "client",
        "destination_workload": "tcp-echo",
        # Upstream labels the xDS identity even for plaintext (inventory §4.3).
        "destination_principal": TCP_SERVER.identity,
    }
    # Inbound plaintext in dedicated mode labels the proxy's own workload as destination
    # (upstream src/proxy/inbound_passthrough.rs, inventory §11.1) and the source by IP.
    destination = {
        "reporter": "destination",
        "connection_security_policy": "unknown",
        "source_workload": "client",
        "source_principal": "unknown",
    }
    for zt, labels in ((nodes.za, source), (nodes.zb, destination)):
        zt.wait_metric("istio_tcp_connections_opened_total", 1, **labels)
        zt.wait_metric("istio_tcp_connections_closed_total", 1, **labels)
        zt.wait_metric("istio_tcp_received_bytes_total", 11, **labels)
        zt.wait_metric("istio_tcp_sent_bytes_total", 22, **labels)
    tunnelled = [line for line in nodes.zb.access_logs() if "dst.hbone_addr" in line.fields]
    assert not tunnelled, "a TCP-protocol destination must not be reached over HBONE"


# ---------------------------------------------------------------------------------------------
# Who may open a tunnel to B's 15008


@dataclass(frozen=True, slots=True)
class Probe:
    """What a raw HBONE client saw: handshake result, HTTP/2 bytes, CONNECT status."""

    local: str
    handshake_error: str | None
    h2_bytes: int
    status: int | None
    ended_by: str


def _probe_hbone(ctx: ssl.SSLContext, ip: str, authority: str) -> Probe:
    """mTLS to ip:15008, HTTP/2 preface + CONNECT, read until a response or the end."""
    raw = socket.create_connection((ip, HBONE_PORT), IO_TIMEOUT)
    local = "{}:{}".format(*raw.getsockname())
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)
    except (ssl.SSLError, OSError) as e:
        raw.close()
        return Probe(local, f"{type(e).__name__}: {e}", 0, None, "handshake")
    with tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "CONNECT"), (":authority", authority)])
        received = 0
        try:
            tls.sendall(conn.data_to_send())
            while True:
                data = tls.recv(65536)
                if not data:
                    return Probe(local, None, received, None, "eof")
                received += len(data)
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        status = int(dict(ev.headers)[b":status"])
                        return Probe(local, None, received, status, "response")
                tls.sendall(conn.data_to_send())
        except (ssl.SSLError, OSError) as e:
            return Probe(local, None, received, None, f"{type(e).__name__}: {e}")


def _client_context(tmp: Path, cert_pem: object, roots_pem: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE URI SANs, no DNS names
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    if roots_pem is not None:
        ctx.load_verify_locations(cadata=roots_pem)
    if cert_pem is not None:
        files = write_cert(tmp, "client", cert_pem)  # type: ignore[arg-type]
        ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def test_raw_client_with_a_mesh_certificate_gets_200_for_connect(
    nodes: TwoNodes, fake_ca: tuple[str, FakeCA], tmp_path: Path
) -> None:
    """The control for the rejections below: the same raw client, correctly credentialed."""
    _, ca = fake_ca
    ctx = _client_context(tmp_path, issue(ca, CLIENT.identity), ca.root_pem)
    probe = nodes.a.call(_probe_hbone, ctx, NODE_B_IP, f"{NODE_B_IP}:{DOUBLE_PORT}")
    assert probe.status == 200, probe


@pytest.mark.parametrize(
    ("credential", "expected_error"),
    [
        ("no client certificate", "certificate"),
        ("certificate from another root", "certificate verify failed"),
        ("another trust domain", "other.local"),
    ],
)
def test_hbone_port_closes_connections_without_a_valid_mesh_client_certificate(
    nodes: TwoNodes,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    credential: str,
    expected_error: str,
) -> None:
    _, ca = fake_ca
    cert = {
        "no client certificate": None,
        "certificate from another root": issue(FakeCA.ephemeral(), CLIENT.identity),
        "another trust domain": issue(ca, spiffe("default", "client", "other.local")),
    }[credential]
    ctx = _client_context(tmp_path, cert, ca.root_pem)
    probe = nodes.a.call(_probe_hbone, ctx, NODE_B_IP, f"{NODE_B_IP}:{DOUBLE_PORT}")

    assert probe.status is None, probe
    assert probe.h2_bytes == 0, f"HTTP/2 bytes before rejection: {probe}"
    failed = nodes.zb.wait_access(
        message="connection failed", **{"src.addr": probe.local, "direction": "inbound"}
    )
    assert failed.fields["error"].startswith("tls handshake failed"), failed.text
    assert expected_error in failed.fields["error"], failed.text
