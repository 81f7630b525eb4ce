"""L4 authorization between two nodes: policies from the local config, enforced by B's ztunnel.

Node A (198.18.0.1) runs the ztunnel of `default/client`, node B (198.18.0.2) the ztunnel of
`default/server` and its echo servers, as in test_hbone_nodes.py. Both read one LOCAL_XDS_PATH
file; its `policies` are Namespace-scoped to `default`, so they select the server workload and
B judges every HBONE CONNECT it receives (401 when denied). The file is rewritten atomically
(temp file + os.replace) and ztunnel's watcher (0.25 s poll) applies the difference; a policy
change re-checks the open inbound connections and closes those no longer allowed.
Upstream's counterparts: `tests/namespaced.rs::test_policy` and the PolicyWatcher of
`src/proxy/connection_manager.rs` (inventory §12).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from mesh import (
    IO_TIMEOUT,
    METRICS_TIMEOUT,
    PROJECT_ROOT,
    EchoServer,
    LogKeeper,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    issue,
    poll_until,
    recv_exact,
    spiffe,
    write_cert,
)
from netns import Netns, Network

from ztunnel.fakeca import FakeCA

NODE_A_IP = "198.18.0.1"
NODE_B_IP = "198.18.0.2"
DOUBLE_PORT = 8080  # ReadDoubleWrite: 11 bytes in, 22 out
ECHO_PORT = 8081  # plain echo
HBONE_PORT = 15008
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")
HELLO = b"hello world"

CLIENT = WorkloadSpec("client", NODE_A_IP, "node-a")
SERVER = WorkloadSpec("server", NODE_B_IP, "node-b")
INTRUDER_IDENTITY = spiffe("default", "intruder")

REJECTED = "connection closed due to policy rejection"
POLICY_CHANGE = "connection closed due to policy change"
CLOSE_DEADLINE = 1.0  # seconds from the file write to the client seeing its connection end

Policy = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Policies in the local config


def principal(identity: str) -> str:
    """A policy principal: the identity without `spiffe://`."""
    return identity.removeprefix("spiffe://")


def deny_ports(name: str, *ports: int) -> Policy:
    return _policy(name, "Deny", {"destinationPorts": list(ports)})


def allow_principals(name: str, *identities: str) -> Policy:
    return _policy(name, "Allow", {"principals": [{"Exact": principal(i)} for i in identities]})


def _policy(name: str, action: str, match: Mapping[str, Any]) -> Policy:
    return {
        "name": name,
        "namespace": "default",
        "scope": "Namespace",
        "action": action,
        "dryRun": False,
        "rules": [[[dict(match)]]],
    }


def write_config_atomically(
    path: Path, workloads: Sequence[WorkloadSpec], policies: Sequence[Policy]
) -> None:
    """Write the whole file next to `path`, then rename it over: never half a file."""
    text = json.dumps(
        {"workloads": [w.to_yaml() for w in workloads], "policies": list(policies)}, indent=2
    )
    temp = path.with_name(f".{path.name}.tmp")
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


# ---------------------------------------------------------------------------------------------
# Two nodes


@dataclass
class TwoNodes:
    a: Netns
    b: Netns
    za: NodeZtunnel
    zb: NodeZtunnel
    config: Path

    def client(self, port: int) -> socket.socket:
        """A connection from node A's client to B (captured by A's ztunnel)."""
        return connect(self.a, NODE_B_IP, port)

    def set_policies(self, policies: Sequence[Policy]) -> float:
        """Replace the policies; returns the monotonic time just before the file changed."""
        start = time.monotonic()
        write_config_atomically(self.config, [CLIENT, SERVER], policies)
        return start


StartNodes = Callable[[Sequence[Policy]], TwoNodes]


@pytest.fixture
def start_nodes(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[StartNodes]:
    """Starts A and B (two workers each) with the given policies in the local config."""
    ca_dir, _ = fake_ca
    started: list[NodeZtunnel] = []
    servers: list[EchoServer] = []

    def start(policies: Sequence[Policy]) -> TwoNodes:
        a, b = network.node("a"), network.node("b")
        network.link(a, f"{NODE_A_IP}/24", b, f"{NODE_B_IP}/24")
        config = tmp_path / "local.yaml"
        write_config_atomically(config, [CLIENT, SERVER], policies)
        a.run(REDIRECT, "outbound", NODE_B_IP, f"{DOUBLE_PORT}:{ECHO_PORT}")
        servers.append(EchoServer(b, NODE_B_IP, DOUBLE_PORT, double=True))
        servers.append(EchoServer(b, NODE_B_IP, ECHO_PORT))
        za = ztunnel_logs.add("a", NodeZtunnel.dedicated(a, CLIENT, config, ca_dir))
        started.append(za)
        zb = ztunnel_logs.add("b", NodeZtunnel.dedicated(b, SERVER, config, ca_dir))
        started.append(zb)
        za.wait_ready()
        zb.wait_ready()
        return TwoNodes(a, b, za, zb, config)

    try:
        yield start
    finally:
        for zt in started:
            zt.kill()
        for server in servers:
            server.close()


def until_closed(sock: socket.socket) -> tuple[str, bytes]:
    """Read until the connection ends: ("eof" | "reset", whatever arrived before)."""
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return "reset", bytes(received)
    return "eof", bytes(received)


def send_to_a_denied_port(nodes: TwoNodes, port: int) -> tuple[str, bytes]:
    """Send from A's client and read until the connection ends (see `until_closed`)."""
    with nodes.client(port) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(HELLO)  # may already be closed by A's ztunnel: just as good
        return until_closed(sock)


def echoes(sock: socket.socket, port: int, message: bytes = HELLO) -> bool:
    sock.sendall(message)
    expected = message * 2 if port == DOUBLE_PORT else message
    return recv_exact(sock, len(expected)) == expected


def wait_counter_at_least(zt: NodeZtunnel, name: str, minimum: float, **labels: str) -> float:
    def probe() -> float | None:
        value = zt.metric(name, **labels)
        return value if value >= minimum else None

    return poll_until(probe, METRICS_TIMEOUT, f"{name}{labels} >= {minimum}", interval=0.2)


# ---------------------------------------------------------------------------------------------
# A raw HBONE client (mTLS + HTTP/2 CONNECT), run inside node A with a minted certificate


@dataclass(frozen=True, slots=True)
class Exchange:
    """What a raw HBONE client saw: CONNECT status and the bytes the stream carried back."""

    local: str
    status: int | None
    received: bytes
    ended_by: str


def hbone_exchange(ctx: ssl.SSLContext, ip: str, authority: str, payload: bytes) -> Exchange:
    """CONNECT to ip:15008; when admitted, send `payload` with END_STREAM and read to the end."""
    raw = socket.create_connection((ip, HBONE_PORT), IO_TIMEOUT)
    raw.settimeout(IO_TIMEOUT)
    local = "{}:{}".format(*raw.getsockname())
    with ctx.wrap_socket(raw, server_hostname=None) as tls:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [(":method", "CONNECT"), (":authority", authority)])
        tls.sendall(conn.data_to_send())
        status: int | None = None
        received = bytearray()
        while True:
            data = tls.recv(65536)
            if not data:
                return Exchange(local, status, bytes(received), "eof")
            for ev in conn.receive_data(data):
                if getattr(ev, "stream_id", stream) != stream:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                    if status != 200:
                        return Exchange(local, status, bytes(received), "response")
                    conn.send_data(stream, payload, end_stream=True)
                elif isinstance(ev, h2.events.DataReceived):
                    received += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, stream)
                elif isinstance(ev, h2.events.StreamEnded):
                    conn.close_connection()
                    tls.sendall(conn.data_to_send())
                    return Exchange(local, status, bytes(received), "end_stream")
                elif isinstance(ev, h2.events.StreamReset):
                    return Exchange(local, status, bytes(received), f"reset {ev.error_code!r}")
            tls.sendall(conn.data_to_send())


def client_context(tmp: Path, ca: FakeCA, identity: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # SPIFFE URI SANs, no DNS names
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    ctx.load_verify_locations(cadata=ca.root_pem)
    files = write_cert(tmp, identity.rsplit("/", 1)[-1], issue(ca, identity))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.timeout(60)
def test_deny_policy_on_a_port_blocks_only_that_port(start_nodes: StartNodes) -> None:
    nodes = start_nodes([deny_ports("deny-8081", ECHO_PORT)])

    ended_by, received = send_to_a_denied_port(nodes, ECHO_PORT)
    assert received == b"", f"denied connection echoed {received!r} ({ended_by})"

    rejected = nodes.zb.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"}
    )
    assert rejected.fields["error"] == f"{REJECTED}: explicitly denied by: default/deny-8081", (
        rejected.text
    )
    assert rejected.fields["src.identity"] == CLIENT.identity, rejected.text
    wait_counter_at_least(
        nodes.zb,
        "istio_tcp_connections_closed_total",
        1,
        reporter="destination",
        response_flags="DENY",
    )

    # The policy names one port; the other still works, through the same tunnel.
    with nodes.client(DOUBLE_PORT) as sock:
        assert echoes(sock, DOUBLE_PORT)
    allowed = nodes.zb.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{DOUBLE_PORT}"}
    )
    assert "error" not in allowed.fields, allowed.text


@pytest.mark.timeout(60)
def test_allow_list_by_principal_admits_one_identity_and_rejects_another(
    start_nodes: StartNodes, fake_ca: tuple[str, FakeCA], tmp_path: Path
) -> None:
    _, ca = fake_ca
    nodes = start_nodes([allow_principals("only-client", CLIENT.identity)])
    authority = f"{NODE_B_IP}:{ECHO_PORT}"
    payload = os.urandom(4096)

    admitted = nodes.a.call(
        hbone_exchange, client_context(tmp_path, ca, CLIENT.identity), NODE_B_IP, authority, payload
    )
    assert admitted.status == 200, admitted
    assert admitted.received == payload, admitted
    assert admitted.ended_by == "end_stream", admitted

    refused = nodes.a.call(
        hbone_exchange,
        client_context(tmp_path, ca, INTRUDER_IDENTITY),
        NODE_B_IP,
        authority,
        payload,
    )
    assert refused.status == 401, refused
    assert refused.received == b"", refused

    rejected = nodes.zb.wait_access(**{"direction": "inbound", "src.identity": INTRUDER_IDENTITY})
    assert rejected.fields["error"] == f"{REJECTED}: allow policies exist, but none allowed", (
        rejected.text
    )
    assert rejected.fields["dst.hbone_addr"] == authority, rejected.text
    accepted = nodes.zb.wait_access(**{"direction": "inbound", "src.identity": CLIENT.identity})
    assert "error" not in accepted.fields, accepted.text
    assert accepted.fields["bytes_recv"] == str(len(payload)), accepted.text


@pytest.mark.timeout(60)
def test_policy_update_closes_a_denied_long_lived_connection_within_a_second(
    start_nodes: StartNodes,
) -> None:
    nodes = start_nodes([])
    with nodes.client(DOUBLE_PORT) as kept, nodes.client(ECHO_PORT) as doomed:
        assert echoes(kept, DOUBLE_PORT)
        assert echoes(doomed, ECHO_PORT)

        written = nodes.set_policies([deny_ports("deny-8081", ECHO_PORT)])
        doomed.settimeout(5.0)
        try:
            ended_by, received = until_closed(doomed)
        except TimeoutError:
            pytest.fail("the denied connection was still open 5 s after the policy change")
        elapsed = time.monotonic() - written
        print(f"denied connection closed {elapsed * 1000:.0f} ms after the file write")
        assert received == b"", received
        assert elapsed < CLOSE_DEADLINE, (
            f"closed ({ended_by}) {elapsed:.3f}s after the file write, not < {CLOSE_DEADLINE}s"
        )

        # The connection to the port the policy does not name stays up and keeps working.
        assert echoes(kept, DOUBLE_PORT, b"still here!")

    closed = nodes.zb.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"}
    )
    assert closed.fields["error"] == POLICY_CHANGE, closed.text
    kept_log = nodes.zb.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{DOUBLE_PORT}"}
    )
    assert "error" not in kept_log.fields, kept_log.text
    wait_counter_at_least(
        nodes.zb,
        "istio_tcp_connections_closed_total",
        1,
        reporter="destination",
        response_flags="DENY",
    )


@pytest.mark.timeout(60)
def test_source_node_logs_the_401_of_a_denied_connect_as_a_failure(
    start_nodes: StartNodes,
) -> None:
    """A's outbound side of a denied CONNECT is a failed connection, not a clean one.

    Upstream treats any CONNECT status other than 200 as `HttpStatus` (inventory §9.2): the
    outbound access log carries the error and `closed`/`failed` count it with a flag.
    """
    nodes = start_nodes([deny_ports("deny-8081", ECHO_PORT)])
    assert send_to_a_denied_port(nodes, ECHO_PORT)[1] == b""
    nodes.zb.wait_access(**{"direction": "inbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"})

    outbound = nodes.za.wait_access(
        **{"direction": "outbound", "dst.hbone_addr": f"{NODE_B_IP}:{ECHO_PORT}"}
    )
    assert outbound.fields.get("error", "").startswith("http status: 401"), outbound.text
    nodes.za.wait_metric(
        "istio_tcp_connections_closed_total", 1, reporter="source", response_flags="CONNECT"
    )
    nodes.za.wait_metric("istio_tcp_connections_failed_total", 1, reporter="source")
