"""Metrics over HBONE: ztunnel as a workload of its own, scraped through its "self" listener.

Node `zt` (198.18.0.1) runs a shared-mode ztunnel with POD_NAME / POD_NAMESPACE /
SERVICE_ACCOUNT set, and the local config holds a workload for it (istio-system/ztunnel-abc,
service account `ztunnel`, the node's IP, HBONE, on this node). ztunnel then holds its own
certificate and serves HBONE on 15008 in its own netns; a CONNECT to <node ip>:15020 there
reaches the metrics server. Node `mon` (198.18.0.2) plays a Prometheus outside the mesh: a
raw HBONE client with a minted FAKE_CA identity. A Namespace-scoped ALLOW policy in
istio-system admits only `cluster.local/ns/monitoring/sa/prometheus`.

The fake istio-cni serves ZDS with no pods, so ztunnel turns ready. Upstream's counterpart
is `tests/namespaced.rs::test_hbone_metrics_access` (inventory §17.2).
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest
from mesh import (
    IO_TIMEOUT,
    WORKERS,
    LogKeeper,
    LoopThread,
    NodeZtunnel,
    WorkloadSpec,
    issue,
    poll_until,
    spiffe,
    write_cert,
)
from netns import PREFIX, Netns, Network

from controlplane.cni import FakeCNI
from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(90)

NODE_NAME = "node-zt"
NODE_IP = "198.18.0.1"
MONITOR_IP = "198.18.0.2"
HBONE_PORT = 15008
STATS_PORT = 15020

ZTUNNEL = WorkloadSpec(
    "ztunnel-abc", NODE_IP, NODE_NAME, namespace="istio-system", service_account="ztunnel"
)
PROMETHEUS_IDENTITY = spiffe("monitoring", "prometheus")
INTRUDER_IDENTITY = spiffe("default", "intruder")
SCRAPE = (
    f"GET /metrics HTTP/1.1\r\nHost: {NODE_IP}:{STATS_PORT}\r\n"
    "User-Agent: Prometheus/2\r\nConnection: close\r\n\r\n"
).encode()
REJECTED = "connection closed due to policy rejection: allow policies exist, but none allowed"


def _config(path: Path) -> Path:
    policy = {
        "name": "only-prometheus",
        "namespace": "istio-system",
        "scope": "Namespace",
        "action": "Allow",
        "dryRun": False,
        "rules": [[[{"principals": [{"Exact": PROMETHEUS_IDENTITY.removeprefix("spiffe://")}]}]]],
    }
    path.write_text(json.dumps({"workloads": [ZTUNNEL.to_yaml()], "policies": [policy]}, indent=2))
    return path


@dataclass
class MetricsNode:
    node: Netns
    monitor: Netns
    zt: NodeZtunnel
    ca: FakeCA
    tmp: Path

    def scrape_as(self, identity: str) -> Exchange:
        """From the monitor node: CONNECT <node ip>:15020 over HBONE, then GET /metrics."""
        ctx = client_context(self.tmp, self.ca, identity)
        return self.monitor.call(scrape_over_hbone, ctx, NODE_IP, f"{NODE_IP}:{STATS_PORT}")


@pytest.fixture
def metrics_node(
    network: Network, fake_ca: tuple[str, FakeCA], tmp_path: Path, ztunnel_logs: LogKeeper
) -> Iterator[MetricsNode]:
    ca_dir, ca = fake_ca
    node, monitor = network.node("zt"), network.node("mon")
    network.link(node, f"{NODE_IP}/24", monitor, f"{MONITOR_IP}/24")
    config = _config(tmp_path / "local.yaml")
    uds = str(tmp_path / "ztunnel.sock")
    loop = LoopThread()
    zt: NodeZtunnel | None = None

    async def make_cni() -> FakeCNI:
        return FakeCNI(uds, netns_prefix=f"{PREFIX}pod-", node_netns=node.name)

    cni = loop.run(make_cni())
    try:
        env = {
            "PROXY_MODE": "shared",
            "INPOD_UDS": uds,
            "FAKE_CA": "true",
            "FAKE_CA_DIR": ca_dir,
            "XDS_ADDRESS": "",
            "LOCAL_XDS_PATH": str(config),
            "NODE_NAME": NODE_NAME,
            "POD_NAME": ZTUNNEL.name,
            "POD_NAMESPACE": ZTUNNEL.namespace,
            "SERVICE_ACCOUNT": ZTUNNEL.sa,
            "ZTUNNEL_WORKERS": str(WORKERS),
            "LOG_FORMAT": "json",
            "UNSTABLE_ENABLE_SOCKS5": "false",
        }
        zt = ztunnel_logs.add("zt", NodeZtunnel(node, env))
        loop.run(cni.start())
        loop.run(cni.wait_snapshots(1, timeout=20.0))
        zt.wait_ready()
        yield MetricsNode(node, monitor, zt, ca, tmp_path)
    finally:
        if zt is not None:
            zt.kill()
        with contextlib.suppress(Exception):
            loop.run(cni.close())
        loop.close()


# ---------------------------------------------------------------------------------------------
# A raw HBONE client that speaks HTTP/1.1 inside the tunnel


@dataclass(frozen=True, slots=True)
class Exchange:
    status: int | None  # the CONNECT response status (None: no response)
    received: bytes  # what came back through the tunnel
    ended_by: str


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


def scrape_over_hbone(ctx: ssl.SSLContext, ip: str, authority: str) -> Exchange:
    """CONNECT, send the scrape once admitted, read until the server ends the stream."""
    raw = socket.create_connection((ip, HBONE_PORT), IO_TIMEOUT)
    raw.settimeout(IO_TIMEOUT)
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
                return Exchange(status, bytes(received), "eof")
            for ev in conn.receive_data(data):
                if getattr(ev, "stream_id", stream) != stream:
                    continue
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                    if status != 200:
                        return Exchange(status, bytes(received), "response")
                    conn.send_data(stream, SCRAPE)
                elif isinstance(ev, h2.events.DataReceived):
                    received += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, stream)
                elif isinstance(ev, h2.events.StreamEnded):
                    conn.end_stream(stream)  # both halves closed: the stream is complete
                    conn.close_connection()
                    tls.sendall(conn.data_to_send())
                    return Exchange(status, bytes(received), "end_stream")
                elif isinstance(ev, h2.events.StreamReset):
                    return Exchange(status, bytes(received), f"reset {ev.error_code!r}")
            tls.sendall(conn.data_to_send())


def _first_scrape(node: MetricsNode) -> Exchange:
    """ztunnel's own certificate arrives shortly after readiness: retry until TLS is served."""

    def attempt() -> Exchange | None:
        try:
            return node.scrape_as(PROMETHEUS_IDENTITY)
        except (OSError, ssl.SSLError):
            return None

    return poll_until(attempt, 15.0, "the self listener serves TLS", interval=0.2)


# ---------------------------------------------------------------------------------------------


def test_metrics_over_hbone_reach_the_metrics_server(metrics_node: MetricsNode) -> None:
    zt = metrics_node.zt
    scrape = _first_scrape(metrics_node)
    assert scrape.status == 200, scrape
    head, _, body = scrape.received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"# TYPE" in body, body[:200]
    assert scrape.ended_by == "end_stream", scrape

    labels = {"reporter": "destination", "source_principal": PROMETHEUS_IDENTITY}
    zt.wait_metric("istio_tcp_connections_opened_total", 1, **labels)
    zt.wait_metric("istio_tcp_connections_closed_total", 1, **labels)
    totals = {
        name: zt.metric(name, reporter="destination")
        for name in ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total")
    }
    assert totals == {
        "istio_tcp_connections_opened_total": 1,
        "istio_tcp_connections_closed_total": 1,
    }, totals
    assert zt.metric("istio_tcp_connections_opened_total", destination_workload=ZTUNNEL.name) == 1

    line = zt.wait_access(**{"direction": "inbound", "src.identity": PROMETHEUS_IDENTITY})
    assert "error" not in line.fields, line.text
    assert line.fields["dst.workload"] == ZTUNNEL.name, line.text
    assert line.fields["dst.addr"] == f"{NODE_IP}:{HBONE_PORT}", line.text
    assert line.fields["dst.hbone_addr"] == f"{NODE_IP}:{STATS_PORT}", line.text
    assert line.fields["dst.identity"] == ZTUNNEL.identity, line.text


def test_policy_admits_only_the_prometheus_identity(metrics_node: MetricsNode) -> None:
    zt = metrics_node.zt
    admitted = _first_scrape(metrics_node)
    assert admitted.status == 200, admitted

    refused = metrics_node.scrape_as(INTRUDER_IDENTITY)
    assert refused.status == 401, refused
    assert refused.received == b"", refused

    line = zt.wait_access(**{"direction": "inbound", "src.identity": INTRUDER_IDENTITY})
    assert line.fields["error"] == REJECTED, line.text
    assert line.fields["dst.hbone_addr"] == f"{NODE_IP}:{STATS_PORT}", line.text
    zt.wait_metric(
        "istio_tcp_connections_closed_total",
        1,
        reporter="destination",
        source_principal=INTRUDER_IDENTITY,
        response_flags="DENY",
    )


def test_plaintext_metrics_port_stays(metrics_node: MetricsNode) -> None:
    reply = metrics_node.zt.http_get(STATS_PORT, "/metrics")
    assert reply.status == 200, reply
    assert "# TYPE" in reply.body
