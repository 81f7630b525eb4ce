"""Double HBONE through a network gateway (upstream §9.9), across three namespaces.

Node A (198.18.0.1, network `net-a`) runs the ztunnel of `default/client`; node B
(198.18.1.2, network `net-b`) runs the ztunnel of `default/server` and its echo server. The
gateway node sits between them (198.18.0.2 towards A, 198.18.1.1 towards B) and runs the
test's own east-west gateway (plain `ssl` + `h2`, not the product's HBONE core): an HBONE
server with a certificate for `istio-system/istio-eastwestgateway` that terminates the outer
tunnel and pipes each CONNECT stream's bytes to B's 15008. A cannot reach B at all (no
route): only the gateway's address 198.18.1.1 is routed from A, via the gateway node.

The service `echo.default.svc.cluster.local` has VIP 198.18.0.100 on `net-a` (inside A's
veth subnet, owned by nothing) and its only endpoint is the server workload on `net-b`,
whose `networkGateway` is `net-b/198.18.1.1:15008`. A's OUTPUT chain redirects the client's
connections to VIP:80 into A's 15001 (scripts/redirect); A's ztunnel then opens the outer
HBONE connection to the gateway and, inside it, the inner mTLS + HTTP/2 tunnel to B, whose
CONNECT carries `x-forwarded-network: net-a`. The gateway's upstream connections leave from
198.18.1.1, which is the gateway workload's address on `net-b`: B must not attribute the
tunnelled connection to it (the source came from another network).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hbone_gateway import HBONEGateway
from mesh import (
    IO_TIMEOUT,
    PROJECT_ROOT,
    EchoServer,
    LogKeeper,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    digest,
    issue,
    recv_exact,
    send_and_drain,
    spiffe,
)
from netns import Netns, Network, enter

from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(60)

NODE_A_IP = "198.18.0.1"
GATEWAY_A_SIDE_IP = "198.18.0.2"  # the gateway node's end of the A link
GATEWAY_IP = "198.18.1.1"  # the gateway workload (net-b), its end of the B link
NODE_B_IP = "198.18.1.2"
SERVICE_VIP = "198.18.0.100"  # in A's subnet, owned by nothing: routed, then REDIRECTed
SERVICE_HOST = "echo.default.svc.cluster.local"
SERVICE_PORT = 80
ECHO_PORT = 8081
HBONE_PORT = 15008
GATEWAY_PORT = 15008  # the gateway's hboneMtlsPort
NET_A, NET_B = "net-a", "net-b"
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")

CLIENT = WorkloadSpec("client", NODE_A_IP, "node-a")
SERVER = WorkloadSpec(
    "server", NODE_B_IP, "node-b", services={f"default/{SERVICE_HOST}": {SERVICE_PORT: ECHO_PORT}}
)
GATEWAY = WorkloadSpec("istio-eastwestgateway", GATEWAY_IP, "node-gw", namespace="istio-system")
SOMEONE_ELSE = spiffe("default", "someone-else")


# ---------------------------------------------------------------------------------------------
# Config and nodes


def write_config(path: Path, sans: list[str]) -> Path:
    """One LOCAL_XDS_PATH file for both ztunnels: three workloads on two networks, a service."""

    def on(spec: WorkloadSpec, network: str, **extra: object) -> dict[str, Any]:
        return {**spec.to_yaml(), "network": network, **extra}

    server = on(
        SERVER,
        NET_B,
        networkGateway={"destination": f"{NET_B}/{GATEWAY_IP}", "hboneMtlsPort": GATEWAY_PORT},
    )
    config = {
        "workloads": [on(CLIENT, NET_A), server, on(GATEWAY, NET_B)],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": SERVICE_HOST,
                "vips": [f"{NET_A}/{SERVICE_VIP}"],
                "ports": {str(SERVICE_PORT): ECHO_PORT},
                "subjectAltNames": sans,
            }
        ],
    }
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class ThreeNodes:
    a: Netns
    gw: Netns
    b: Netns
    za: NodeZtunnel
    zb: NodeZtunnel
    gateway: HBONEGateway
    echo: EchoServer

    def client(self) -> socket.socket:
        """A connection from A's client to the service VIP (captured by A's ztunnel)."""
        return connect(self.a, SERVICE_VIP, SERVICE_PORT)


def start_nodes(
    network: Network,
    ca_dir: str,
    ca: FakeCA,
    tmp_path: Path,
    logs: LogKeeper,
    sans: list[str],
    cleanups: list[Any],
) -> ThreeNodes:
    a, gw, b = network.node("a"), network.node("gw"), network.node("b")
    network.link(a, f"{NODE_A_IP}/24", gw, f"{GATEWAY_A_SIDE_IP}/24")
    network.link(gw, f"{GATEWAY_IP}/24", b, f"{NODE_B_IP}/24")
    # Only the gateway is reachable from A (its B-side address is local to the gateway node,
    # so no forwarding is needed); A has no route to B.
    a.run("ip", "route", "add", f"{GATEWAY_IP}/32", "via", GATEWAY_A_SIDE_IP)
    a.run(REDIRECT, "outbound", SERVICE_VIP, str(SERVICE_PORT))
    config = write_config(tmp_path / "local.yaml", sans)

    echo = EchoServer(b, NODE_B_IP, ECHO_PORT)
    cleanups.append(echo.close)
    gateway = HBONEGateway(
        issue(ca, GATEWAY.identity),
        listen=(GATEWAY_IP, GATEWAY_PORT),
        upstream=(NODE_B_IP, HBONE_PORT),
        prepare=lambda: enter(gw.name),
    )
    cleanups.append(gateway.close)
    # One worker on A: one connection pool, so "one outer connection" is exact.
    za = logs.add(
        "a",
        NodeZtunnel.dedicated(
            a, CLIENT, config, ca_dir, extra={"NETWORK": NET_A, "ZTUNNEL_WORKERS": "1"}
        ),
    )
    cleanups.append(za.kill)
    zb = logs.add("b", NodeZtunnel.dedicated(b, SERVER, config, ca_dir, extra={"NETWORK": NET_B}))
    cleanups.append(zb.kill)
    za.wait_ready()
    zb.wait_ready()
    return ThreeNodes(a, gw, b, za, zb, gateway, echo)


@pytest.fixture
def make_nodes(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[Any]:
    ca_dir, ca = fake_ca
    cleanups: list[Any] = []

    def make(sans: list[str]) -> ThreeNodes:
        return start_nodes(network, ca_dir, ca, tmp_path, ztunnel_logs, sans, cleanups)

    try:
        yield make
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def established(ns: Netns, *selector: str) -> int:
    out = ns.ss("-tnH", "state", "established", *selector)
    return len([line for line in out.splitlines() if line.strip()])


def until_closed(sock: socket.socket) -> tuple[str, bytes]:
    """Read until the connection ends: ("eof" | "reset", whatever arrived before)."""
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return "reset", bytes(received)
    return "eof", bytes(received)


# ---------------------------------------------------------------------------------------------
# Tests


def test_client_reaches_a_service_on_another_network_through_its_gateway(make_nodes: Any) -> None:
    nodes: ThreeNodes = make_nodes([SERVER.identity])
    payload = os.urandom(64 * 1024)
    with nodes.client() as sock:
        client_addr = "{}:{}".format(*sock.getsockname())
        received, clean_eof = send_and_drain(sock, payload)
    assert len(received) == len(payload)
    assert digest(received) == digest(payload)
    assert clean_eof
    assert nodes.echo.accepted == 1

    # The outer CONNECT named the service, without x-forwarded-network, from the client.
    (outer,) = nodes.gateway.requests
    assert outer[":method"] == "CONNECT"
    assert outer[":authority"] == f"{SERVICE_HOST}:{SERVICE_PORT}"
    assert "x-forwarded-network" not in outer
    assert nodes.gateway.accepted == 1
    sans = dict(nodes.gateway.peer_certs[0]["subjectAltName"])
    assert sans["URI"] == CLIENT.identity

    # B served the inner CONNECT by hostname and did not look the source up by IP: the
    # tunnel came from the gateway's address, which is the gateway workload on B's network.
    inbound = nodes.zb.wait_access(direction="inbound")
    assert inbound.fields["dst.hbone_addr"] == f"{SERVICE_HOST}:{SERVICE_PORT}"
    assert inbound.fields["src.addr"].startswith(f"{GATEWAY_IP}:")
    assert "src.workload" not in inbound.fields, inbound.fields
    assert inbound.fields["src.identity"] == CLIENT.identity
    assert inbound.fields["dst.workload"] == "server"
    assert "error" not in inbound.fields, inbound.fields

    ours: dict[str, Any] = {"direction": "outbound", "src.addr": client_addr}
    outbound = nodes.za.wait_access(**ours)
    assert outbound.fields["dst.addr"] == f"{GATEWAY_IP}:{GATEWAY_PORT}"
    assert outbound.fields["dst.hbone_addr"] == f"{SERVICE_HOST}:{SERVICE_PORT}"
    assert outbound.fields["src.identity"] == CLIENT.identity
    assert "error" not in outbound.fields, outbound.fields


def test_many_connections_share_one_outer_connection(make_nodes: Any) -> None:
    nodes: ThreeNodes = make_nodes([SERVER.identity])
    count = 10

    def open_one(i: int) -> socket.socket:
        sock = socket.create_connection((SERVICE_VIP, SERVICE_PORT), IO_TIMEOUT)
        sock.settimeout(IO_TIMEOUT)
        message = b"%04d" % i
        sock.sendall(message)
        assert recv_exact(sock, len(message)) == message
        return sock

    futures = [nodes.a.submit(open_one, i) for i in range(count)]
    deadline = time.monotonic() + 30
    socks: list[socket.socket] = []
    try:
        for future in futures:
            socks.append(future.result(max(0.0, deadline - time.monotonic())))
        # All open at once: one outer TLS connection from A, one inner per client on B.
        assert established(nodes.a, "dst", f"{GATEWAY_IP}:{GATEWAY_PORT}") == 1
        # Every client has echoed, so every inner tunnel is up by now.
        assert established(nodes.b, "src", f"{NODE_B_IP}:{HBONE_PORT}") == count
        for i, sock in enumerate(socks):
            sock.sendall(b"again %04d" % i)
        for i, sock in enumerate(socks):
            assert recv_exact(sock, 10) == b"again %04d" % i
    finally:
        for future in futures:
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().close()

    assert nodes.gateway.accepted == 1, f"{nodes.gateway.accepted} outer TLS connections"
    assert len(nodes.gateway.requests) == count
    assert {r[":authority"] for r in nodes.gateway.requests} == {f"{SERVICE_HOST}:{SERVICE_PORT}"}
    assert nodes.echo.accepted == count


def test_a_wrong_service_san_is_refused_inside_the_tunnel(make_nodes: Any) -> None:
    nodes: ThreeNodes = make_nodes([SOMEONE_ELSE])
    with nodes.client() as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"never echoed")  # may already be closed by A's ztunnel
        ended_by, received = until_closed(sock)
    assert received == b"", ended_by

    failed = nodes.za.wait_access(direction="outbound")
    assert "match none of" in str(failed.fields.get("error")), failed.fields
    assert SOMEONE_ELSE in str(failed.fields.get("error")), failed.fields
    # The outer tunnel reached the gateway; the inner handshake reached B, nothing beyond.
    assert [r[":authority"] for r in nodes.gateway.requests] == [f"{SERVICE_HOST}:{SERVICE_PORT}"]
    assert nodes.echo.accepted == 0
    assert not [line for line in nodes.zb.access_logs() if line.fields.get("dst.hbone_addr")]
