"""Node.js `http2` (nghttp2) as HBONE peer of ztunnel: client of its 15008, server for its 15001.

Client half: node A (198.18.0.1) runs only Node (hbone_client.js); node B (198.18.0.2) runs
the dedicated ztunnel of `default/server` and a plain echo server on 8080. Node presents a
client certificate minted from the same FAKE_CA root for `default/client`, verifies the
server against that root (SPIFFE URI SAN, no DNS name) and speaks CONNECT (inventory §9).

Server half: node A runs the ztunnel of `default/client` with capture; node B runs Node
(hbone_server.js) on 15008 with a `default/server` certificate in place of a ztunnel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mesh import (
    PROJECT_ROOT,
    CertFiles,
    EchoServer,
    LogBuffer,
    LogKeeper,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    digest,
    issue,
    recv_until_eof,
    write_cert,
    write_local_config,
)
from netns import Netns, Network

from ztunnel.fakeca import FakeCA

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js (`node` on PATH)"),
]

CLIENT_IP = "198.18.0.1"
SERVER_IP = "198.18.0.2"
ECHO_PORT = 8080
HBONE_PORT = 15008
SCRIPT = Path(__file__).resolve().parent / "hbone_client.js"
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")

CLIENT = WorkloadSpec("client", CLIENT_IP, "node-a")
SERVER = WorkloadSpec("server", SERVER_IP, "node-b")


@dataclass
class NodeClient:
    ns: Netns
    cert: CertFiles
    ztunnel: NodeZtunnel

    def request(
        self,
        method: str,
        authority: str,
        size: int = 0,
        *,
        early: bool = False,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Run the Node client inside the client node; its JSON report."""
        out = self.ns.run(
            *("node", str(SCRIPT), SERVER_IP, str(HBONE_PORT), method, authority),
            *(str(self.cert.ca), str(self.cert.cert), str(self.cert.key), str(size)),
            *(["early"] if early else []),
            timeout=timeout + 10,
            env={"HBONE_CLIENT_TIMEOUT_MS": str(int(timeout * 1000))},
        )
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return result


@pytest.fixture
def node_client(
    network: Network, fake_ca: tuple[str, FakeCA], tmp_path: Path, ztunnel_logs: LogKeeper
) -> Iterator[NodeClient]:
    ca_dir, ca = fake_ca
    a, b = network.node("node"), network.node("zt")
    network.link(a, f"{CLIENT_IP}/24", b, f"{SERVER_IP}/24")
    config = write_local_config(tmp_path / "local.yaml", [CLIENT, SERVER])
    echo = EchoServer(b, SERVER_IP, ECHO_PORT)
    zt = ztunnel_logs.add("server", NodeZtunnel.dedicated(b, SERVER, config, ca_dir))
    try:
        zt.wait_ready()
        cert = write_cert(tmp_path / "certs", "client", issue(ca, CLIENT.identity))
        yield NodeClient(a, cert, zt)
    finally:
        zt.kill()
        echo.close()


def test_node_connect_gets_200_and_its_bytes_echoed_back(node_client: NodeClient) -> None:
    result = node_client.request("CONNECT", f"{SERVER_IP}:{ECHO_PORT}", size=256 * 1024)

    assert result["error"] is None, result
    assert result["status"] == 200
    assert result["alpn"] == "h2"
    assert result["peer_san"] == f"URI:{SERVER.identity}"
    assert result["received_bytes"] == result["sent_bytes"] == 256 * 1024
    assert result["received_sha256"] == result["sent_sha256"]
    inbound = node_client.ztunnel.wait_access(direction="inbound")
    assert inbound.fields["src.identity"] == CLIENT.identity
    assert inbound.fields["dst.hbone_addr"] == f"{SERVER_IP}:{ECHO_PORT}"
    assert (inbound.fields["bytes_sent"], inbound.fields["bytes_recv"]) == ("262144",) * 2


@pytest.mark.parametrize("size", [11, 256 * 1024])
def test_node_connect_with_data_sent_before_the_response_gets_every_byte_echoed(
    node_client: NodeClient, size: int
) -> None:
    """RFC 9113 §8.5: after its HEADERS a client's DATA is tunnel data, 200 or not yet."""
    result = node_client.request("CONNECT", f"{SERVER_IP}:{ECHO_PORT}", size, early=True, timeout=3)

    assert result["error"] is None, result
    assert result["status"] == 200
    assert result["received_bytes"] == result["sent_bytes"] == size
    assert result["received_sha256"] == result["sent_sha256"]


def test_node_get_instead_of_connect_is_answered_400(node_client: NodeClient) -> None:
    result = node_client.request("GET", f"{SERVER_IP}:{ECHO_PORT}")

    assert result["error"] is None, result
    assert result["status"] == 400


def test_node_connect_to_another_ip_than_the_connection_is_answered_400(
    node_client: NodeClient,
) -> None:
    """The authority must name the IP the TLS connection went to (upstream hbone_ip_mismatch)."""
    result = node_client.request("CONNECT", f"{CLIENT_IP}:{ECHO_PORT}", size=11)

    assert result["error"] is None, result
    assert result["status"] == 400
    failed = node_client.ztunnel.wait_access(message="connection failed", direction="inbound")
    assert failed.fields["error"] == f"ip mismatch: {SERVER_IP} != {CLIENT_IP}"


# ---------------------------------------------------------------------------------------------
# Node as the HBONE server a ztunnel's outbound talks to


SERVER_SCRIPT = Path(__file__).resolve().parent / "hbone_server.js"
AFTER_EOF_PORT = 8082


@dataclass
class NodeServer:
    a: Netns
    za: NodeZtunnel
    events: LogBuffer

    def connects(self) -> list[dict[str, Any]]:
        lines = [json.loads(line.text) for line in self.events.lines() if line.text[:1] == "{"]
        return [e for e in lines if e.get("event") == "connect"]


@pytest.fixture
def node_server(
    network: Network, fake_ca: tuple[str, FakeCA], tmp_path: Path, ztunnel_logs: LogKeeper
) -> Iterator[NodeServer]:
    ca_dir, ca = fake_ca
    a, b = network.node("a"), network.node("node")
    network.link(a, f"{CLIENT_IP}/24", b, f"{SERVER_IP}/24")
    config = write_local_config(tmp_path / "local.yaml", [CLIENT, SERVER])
    a.run(REDIRECT, "outbound", SERVER_IP, f"{ECHO_PORT}:{AFTER_EOF_PORT}")
    servers = [
        EchoServer(b, SERVER_IP, ECHO_PORT, double=True),
        EchoServer(b, SERVER_IP, AFTER_EOF_PORT, reply_after_eof=True),
    ]
    cert = write_cert(tmp_path / "certs", "server", issue(ca, SERVER.identity))
    proc = b.popen(
        [
            *("node", str(SERVER_SCRIPT), SERVER_IP, str(HBONE_PORT)),
            *(str(cert.ca), str(cert.cert), str(cert.key)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    events = LogBuffer()
    events.follow(proc.stdout, "node")
    za = ztunnel_logs.add("client", NodeZtunnel.dedicated(a, CLIENT, config, ca_dir))
    try:
        events.wait_for(lambda line: '"listening"' in line.text, 10.0, "node to listen")
        za.wait_ready()
        yield NodeServer(a, za, events)
    finally:
        za.kill()
        for server in servers:
            server.close()


def test_ztunnel_outbound_tunnels_through_a_node_http2_server_with_its_headers(
    node_server: NodeServer,
) -> None:
    with connect(node_server.a, SERVER_IP, ECHO_PORT) as sock:
        sock.sendall(b"hello world")
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b"hello world" * 2
        client_port = sock.getsockname()[1]

    (event,) = node_server.connects()
    assert event["authority"] == f"{SERVER_IP}:{ECHO_PORT}"
    assert event["peer_san"] == f"URI:{CLIENT.identity}"
    headers = event["headers"]
    # Upstream always sends these three (inventory §9.2).
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", headers["traceparent"])
    assert headers["forwarded"] == f'for="{CLIENT_IP}:{client_port}"'
    assert "baggage" in headers
    outbound = node_server.za.wait_access(direction="outbound")
    assert outbound.fields["dst.identity"] == SERVER.identity
    assert (outbound.fields["bytes_sent"], outbound.fields["bytes_recv"]) == ("11", "22")


def test_half_close_crosses_ztunnel_and_a_node_http2_server_both_ways(
    node_server: NodeServer,
) -> None:
    """The echo answers only after FIN: END_STREAM out, then data, END_STREAM and FIN back."""
    payload = os.urandom(300 * 1024)
    with connect(node_server.a, SERVER_IP, AFTER_EOF_PORT) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        received = recv_until_eof(sock)
    assert len(received) == len(payload)
    assert digest(received) == digest(payload)
