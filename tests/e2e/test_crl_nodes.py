"""Certificate revocation lists (CRL_PATH) between two nodes, on both ends of the tunnel.

Node A (198.18.0.1) runs the ztunnel of `default/client`, node B (198.18.0.2) the ztunnel of
`default/server` and an echo server, as in test_hbone_nodes.py; A's OUTPUT chain redirects
the client's connections to B into A's 15001 (scripts/redirect). Both ztunnels use one
private FAKE_CA_DIR, whose root also signs the CRLs (`FakeCA.sign_crl`). The serial of the
workload certificate each ztunnel uses is read from its admin `config_dump`.

A CRL on B (destination) judges the client chain of every inbound mTLS connection; a CRL on
A (source) judges the server chain of every pooled HBONE connection. The file is polled
(about 1 s, plus one poll for the write to settle), so a change applies within a few
seconds: open HBONE connections whose peer is now revoked are torn down, their tunnelled
TCP connections die, and `istio_crl_policy_rejections_total{reporter=...}` counts it.
The file is replaced atomically (temp file + os.replace), as a ConfigMap update would.
Upstream's counterpart: the CRL cases of `tests/namespaced.rs` (`src/tls/crl.rs`); upstream
gives a change 10 s to take effect, and so do we.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from mesh import (
    IO_TIMEOUT,
    METRICS_TIMEOUT,
    PROJECT_ROOT,
    EchoServer,
    LogKeeper,
    LogLine,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    poll_until,
    recv_exact,
    write_local_config,
)
from netns import Netns, Network

from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(60)

NODE_A_IP = "198.18.0.1"
NODE_B_IP = "198.18.0.2"
ECHO_PORT = 8080  # plain echo
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")
HELLO = b"hello world"

CLIENT = WorkloadSpec("client", NODE_A_IP, "node-a")
SERVER = WorkloadSpec("server", NODE_B_IP, "node-b")

REJECTIONS = "istio_crl_policy_rejections_total"
CLOSED = "istio_tcp_connections_closed_total"
REVOKED_FLAG = "CERT_REVOKED"
REVOKED_ERROR = "connection closed due to certificate revocation"
CRL_DEADLINE = 10.0  # seconds from the file write to the revocation taking effect (upstream)
UNRELATED_SERIAL = 12345
QUIET_PERIOD = 4.0  # seconds a connection must survive a CRL that does not name its peer
CERT_TIMEOUT = 10.0  # seconds for a started ztunnel to hold its workload certificate


# ---------------------------------------------------------------------------------------------
# The CRL file


def write_atomically(path: Path, data: bytes) -> float:
    """Write next to `path`, fsync, rename over it; the monotonic time just before the rename."""
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    written = time.monotonic()
    os.replace(temp, path)
    return written


def crl_der(pem: bytes) -> bytes:
    return x509.load_pem_x509_crl(pem).public_bytes(Encoding.DER)


# ---------------------------------------------------------------------------------------------
# Two nodes whose ztunnels are started one at a time, each with its own CRL file


@dataclass
class TwoNodes:
    a: Netns
    b: Netns
    ca: FakeCA
    echo: EchoServer  # on B: `accepted` tells whether anything reached the backend
    start: Callable[[str, Path | None], NodeZtunnel]
    crl_files: dict[str, Path]
    ztunnels: dict[str, NodeZtunnel] = field(default_factory=dict)

    @property
    def za(self) -> NodeZtunnel:
        return self.ztunnels["a"]

    @property
    def zb(self) -> NodeZtunnel:
        return self.ztunnels["b"]

    def launch(self, node: str, crl: bytes | None = None) -> NodeZtunnel:
        """Start node `node`'s ztunnel (not waiting for it), with CRL_PATH holding `crl`.

        None: no CRL_PATH at all. b"": an empty file (no revocations).
        """
        path = None
        if crl is not None:
            path = self.crl_files[node]
            write_atomically(path, crl)
        zt = self.start(node, path)
        self.ztunnels[node] = zt
        return zt

    def set_crl(self, node: str, crl: bytes) -> float:
        """Replace node's CRL file; the monotonic time just before the file changed."""
        return write_atomically(self.crl_files[node], crl)

    def client(self) -> socket.socket:
        """A connection from node A's client to B's echo server (captured by A's ztunnel)."""
        return connect(self.a, NODE_B_IP, ECHO_PORT)


@pytest.fixture
def nodes(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[TwoNodes]:
    ca_dir, ca = fake_ca
    a, b = network.node("a"), network.node("b")
    network.link(a, f"{NODE_A_IP}/24", b, f"{NODE_B_IP}/24")
    config = write_local_config(tmp_path / "local.yaml", [CLIENT, SERVER])
    a.run(REDIRECT, "outbound", NODE_B_IP, str(ECHO_PORT))
    server = EchoServer(b, NODE_B_IP, ECHO_PORT)
    started: list[NodeZtunnel] = []
    namespaces = {"a": a, "b": b}
    workloads = {"a": CLIENT, "b": SERVER}

    def start(node: str, crl: Path | None) -> NodeZtunnel:
        extra = {} if crl is None else {"CRL_PATH": str(crl)}
        zt = NodeZtunnel.dedicated(namespaces[node], workloads[node], config, ca_dir, extra)
        started.append(zt)
        return ztunnel_logs.add(node, zt)

    crl_files = {"a": tmp_path / "crl-a.pem", "b": tmp_path / "crl-b.pem"}
    try:
        yield TwoNodes(a, b, ca, server, start, crl_files)
    finally:
        for zt in started:
            zt.kill()
        server.close()


# ---------------------------------------------------------------------------------------------
# Observations


def workload_serial(zt: NodeZtunnel, identity: str, timeout: float = CERT_TIMEOUT) -> int:
    """The serial of the leaf `zt` serves `identity` with, from its admin config_dump."""

    def probe() -> int | None:
        reply = zt.http_get(zt.ports.admin, "/config_dump")
        if reply.status != 200:
            return None
        dump: dict[str, Any] = json.loads(reply.body)
        for entry in dump.get("certificates", []):
            chain = entry.get("certChain") or []
            if entry.get("identity") == identity and chain and chain[0].get("serialNumber"):
                return int(chain[0]["serialNumber"])
        return None

    return poll_until(probe, timeout, f"a certificate for {identity} in {zt.ns.name}", 0.1)


def rejections(zt: NodeZtunnel, reporter: str) -> float:
    return zt.metric(REJECTIONS, reporter=reporter)


def wait_at_least(zt: NodeZtunnel, name: str, minimum: float, **labels: str) -> float:
    def probe() -> float | None:
        value = zt.metric(name, **labels)
        return value if value >= minimum else None

    return poll_until(probe, METRICS_TIMEOUT, f"{name}{labels} >= {minimum}", 0.2)


def wait_rejections(zt: NodeZtunnel, reporter: str, minimum: float = 1) -> float:
    return wait_at_least(zt, REJECTIONS, minimum, reporter=reporter)


def wait_access(zt: NodeZtunnel, fields: Mapping[str, str], timeout: float = IO_TIMEOUT) -> LogLine:
    """The first `connection complete` line whose fields include `fields`."""

    def match(line: LogLine) -> bool:
        return line.is_access("connection complete") and all(
            line.fields.get(k) == v for k, v in fields.items()
        )

    return zt.logs.wait_for(match, timeout, f"access log 'connection complete' with {fields}")


def revoked_lines(zt: NodeZtunnel) -> list[LogLine]:
    return [line for line in zt.access_logs() if line.fields.get("error") == REVOKED_ERROR]


def crl_log_lines(nodes: TwoNodes, node: str) -> list[LogLine]:
    """The worker log lines of `node` that name its CRL file (loads, reloads, read errors)."""
    path = str(nodes.crl_files[node])
    zt = nodes.ztunnels[node]
    return zt.logs.find(lambda line: line.process.startswith("worker") and path in line.message)


def echoes(sock: socket.socket, message: bytes = HELLO) -> bool:
    sock.sendall(message)
    return recv_exact(sock, len(message)) == message


def until_closed(sock: socket.socket, timeout: float) -> tuple[str, bytes]:
    """Read until the connection ends: ("eof" | error name, whatever arrived before).

    TimeoutError when it is still open after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    received = bytearray()
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return "eof", bytes(received)
            received += chunk
    except TimeoutError:
        raise
    except OSError as e:
        return type(e).__name__, bytes(received)


def assert_refused(nodes: TwoNodes, what: str) -> None:
    """A new client connection carries nothing: no echo, just EOF or an error."""
    try:
        sock = nodes.client()
    except OSError:
        return  # refused before it was even accepted: just as good
    with sock:
        with contextlib.suppress(OSError):
            sock.sendall(HELLO)  # may already be closed by A's ztunnel
        try:
            ended_by, received = until_closed(sock, IO_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"{what}: the connection was still open after {IO_TIMEOUT:.0f}s")
    assert received == b"", f"{what}: echoed {received!r} before {ended_by}"


def assert_torn_down(sock: socket.socket, written: float, what: str) -> None:
    """The held connection ends within CRL_DEADLINE of the file write, carrying nothing."""
    remaining = CRL_DEADLINE - (time.monotonic() - written)
    try:
        ended_by, received = until_closed(sock, remaining)
    except TimeoutError:
        pytest.fail(f"{what}: still open {CRL_DEADLINE:.0f}s after the CRL was written")
    elapsed = time.monotonic() - written
    print(f"{what}: ended ({ended_by}) {elapsed * 1000:.0f} ms after the CRL write")
    assert received == b"", f"{what}: received {received!r} before {ended_by}"


def start_both(nodes: TwoNodes, crl_a: bytes | None, crl_b: bytes | None) -> None:
    nodes.launch("a", crl_a)
    nodes.launch("b", crl_b)
    nodes.za.wait_ready()
    nodes.zb.wait_ready()


# ---------------------------------------------------------------------------------------------
# A CRL present at start-up


def test_inbound_rejects_a_revoked_client_certificate(nodes: TwoNodes) -> None:
    # A first, so that B can start with a CRL naming the certificate A's client will present.
    za = nodes.launch("a")
    za.wait_ready()
    client_serial = workload_serial(za, CLIENT.identity)
    zb = nodes.launch("b", nodes.ca.sign_crl([client_serial]))
    zb.wait_ready()

    assert_refused(nodes, "a client with a revoked certificate")
    wait_rejections(zb, "destination")
    assert nodes.echo.accepted == 0, "B's ztunnel connected a revoked client to the backend"
    assert rejections(za, "source") == 0  # A's own CRL checking is off
    assert workload_serial(za, CLIENT.identity) == client_serial  # still the revoked one


def test_outbound_rejects_a_revoked_server_certificate(nodes: TwoNodes) -> None:
    """A's CRL is raw DER, the file's other accepted form."""
    zb = nodes.launch("b")
    zb.wait_ready()
    server_serial = workload_serial(zb, SERVER.identity)
    za = nodes.launch("a", crl_der(nodes.ca.sign_crl([server_serial])))
    za.wait_ready()

    assert_refused(nodes, "a server with a revoked certificate")
    wait_rejections(za, "source")
    assert nodes.echo.accepted == 0, "A's ztunnel sent the client's stream to a revoked server"
    assert rejections(zb, "destination") == 0
    assert workload_serial(zb, SERVER.identity) == server_serial


# ---------------------------------------------------------------------------------------------
# A CRL change tears down live connections to the peer it revokes


def test_inbound_tears_down_a_live_connection_when_the_client_is_revoked(
    nodes: TwoNodes,
) -> None:
    start_both(nodes, crl_a=None, crl_b=b"")
    client_serial = workload_serial(nodes.za, CLIENT.identity)

    with nodes.client() as held:
        assert echoes(held), "the baseline round trip through the tunnel failed"
        written = nodes.set_crl("b", nodes.ca.sign_crl([client_serial]))
        assert_torn_down(held, written, "the held connection of a revoked client")

    wait_rejections(nodes.zb, "destination")
    assert_refused(nodes, "a new connection from the revoked client")
    assert nodes.echo.accepted == 1, "the new connection of a revoked client reached the backend"
    assert rejections(nodes.za, "source") == 0

    # B did the teardown: the tunnelled connection is counted and logged as revoked.
    wait_at_least(nodes.zb, CLOSED, 1, reporter="destination", response_flags=REVOKED_FLAG)
    torn = wait_access(
        nodes.zb,
        {"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"},
    )
    assert torn.fields.get("src.identity") == CLIENT.identity, torn.text
    # Upstream's access log has no response_flags field: the flag is in the metric labels
    # above, the reason in the line's error.
    assert torn.fields.get("error") == REVOKED_ERROR, torn.text
    # A, whose tunnel B cut, logs the broken tunnel as an error too.
    cut = wait_access(
        nodes.za,
        {"direction": "outbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"},
    )
    assert cut.fields.get("error"), cut.text


def test_outbound_tears_down_a_live_connection_when_the_server_is_revoked(
    nodes: TwoNodes,
) -> None:
    """A's new CRL file is PEM with a certificate block first and two CRLs from the root."""
    start_both(nodes, crl_a=b"", crl_b=None)
    server_serial = workload_serial(nodes.zb, SERVER.identity)

    with nodes.client() as held:
        assert echoes(held), "the baseline round trip through the tunnel failed"
        crl = (
            nodes.ca.root_pem.encode()
            + nodes.ca.sign_crl([UNRELATED_SERIAL])
            + nodes.ca.sign_crl([server_serial])
        )
        written = nodes.set_crl("a", crl)
        assert_torn_down(held, written, "the held connection to a revoked server")

    wait_rejections(nodes.za, "source")
    assert_refused(nodes, "a new connection to the revoked server")
    assert nodes.echo.accepted == 1, "a new connection reached the revoked server's backend"
    assert rejections(nodes.zb, "destination") == 0

    # A did the teardown: the tunnelled connection is counted and logged as revoked.
    wait_at_least(nodes.za, CLOSED, 1, reporter="source", response_flags=REVOKED_FLAG)
    torn = wait_access(
        nodes.za,
        {"direction": "outbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"},
    )
    assert torn.fields.get("dst.identity") == SERVER.identity, torn.text
    assert torn.fields.get("error") == REVOKED_ERROR, torn.text


# ---------------------------------------------------------------------------------------------
# What must not revoke


def _survives_a_crl_change(nodes: TwoNodes, crls: Mapping[str, bytes]) -> None:
    """With `crls` written on the nodes, a held connection and new ones keep working."""
    with nodes.client() as held:
        assert echoes(held), "the baseline round trip through the tunnel failed"
        before = {node: len(crl_log_lines(nodes, node)) for node in crls}
        for node, crl in crls.items():
            nodes.set_crl(node, crl)
        try:
            ended_by, received = until_closed(held, QUIET_PERIOD)
        except TimeoutError:
            pass  # still open, as it should be
        else:
            pytest.fail(f"the held connection ended ({ended_by}, {received!r}) after the CRL")
        # Not vacuous: by now every node has read its new file (its workers log each load).
        for node in crls:
            assert len(crl_log_lines(nodes, node)) > before[node], (
                f"node {node} logged nothing about its CRL file within {QUIET_PERIOD:.0f}s"
            )
        held.settimeout(IO_TIMEOUT)
        assert echoes(held, b"still here!"), "the held connection no longer echoes"

    with nodes.client() as fresh:
        assert echoes(fresh), "a new connection failed under the new CRL"

    assert rejections(nodes.za, "source") == 0
    assert rejections(nodes.zb, "destination") == 0
    assert rejections(nodes.za, "destination") == 0
    assert rejections(nodes.zb, "source") == 0
    for zt in (nodes.za, nodes.zb):
        assert zt.metric(CLOSED, response_flags=REVOKED_FLAG) == 0
    assert not revoked_lines(nodes.za) + revoked_lines(nodes.zb)


def test_a_crl_revoking_other_serials_leaves_connections_alone(nodes: TwoNodes) -> None:
    start_both(nodes, crl_a=b"", crl_b=b"")
    unrelated = nodes.ca.sign_crl([UNRELATED_SERIAL])
    _survives_a_crl_change(nodes, {"a": unrelated, "b": unrelated})


def test_a_crl_with_the_issuer_name_but_a_forged_signature_revokes_nothing(
    nodes: TwoNodes,
) -> None:
    """Another root with the same subject (O=cluster.local) lists the real serials.

    The CRL's issuer name matches the leaves' issuer, but it is not signed by that issuer's
    key, so it must not revoke anything.
    """
    start_both(nodes, crl_a=b"", crl_b=b"")
    serials = [
        workload_serial(nodes.za, CLIENT.identity),
        workload_serial(nodes.zb, SERVER.identity),
    ]
    forged = FakeCA.ephemeral().sign_crl(serials)
    assert (
        x509.load_pem_x509_crl(forged).issuer
        == x509.load_pem_x509_certificate(nodes.ca.root_pem.encode()).subject
    ), "the forged CRL should carry the real issuer name"
    _survives_a_crl_change(nodes, {"a": forged, "b": forged})
