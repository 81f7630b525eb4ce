"""A real Prometheus scrapes ztunnel; the PromQL of Istio's ztunnel dashboard finds its series.

ztunnel runs on loopback on non-default ports (so a ztunnel of another test, or of the host,
does not collide), with SOCKS5 on and the DNS proxy off. Prometheus (`prometheus` and
`promtool` from the Debian package) runs with a temporary config and data directory,
listens on a free loopback port and scrapes every second. Traffic goes through ztunnel's
SOCKS5 listener to a local echo server outside the mesh. The queries are the panels of
Istio's ztunnel dashboard (`manifests/addons/dashboards/ztunnel.libsonnet`), minus the
`pod` / `app` selectors that Kubernetes service discovery would add.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
import statistics
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    LOCALHOST,
    EchoServer,
    HarnessError,
    StartZtunnel,
    ZtunnelProcess,
    poll_until,
    recv_exact,
    socks5_connect,
)
from prometheus_client import CollectorRegistry, generate_latest

from workers.metrics import WorkerMetrics
from workers.tracking import ConnectionTracker, Tracked
from ztunnel.core import ipc
from ztunnel.core import metrics as m
from ztunnel.core.model import Locality, Service, Workload
from ztunnel.supervisor.aggregate import WorkerMetricsCollector

pytestmark = pytest.mark.timeout(120)

ISTIO_VERSION = "1.24.0-py"
PORTS = {
    "ZTUNNEL_OUTBOUND_PORT": "26001",
    "ZTUNNEL_INBOUND_PLAINTEXT_PORT": "26006",
    "ZTUNNEL_INBOUND_PORT": "26008",
    "ZTUNNEL_SOCKS5_PORT": "26080",
    "ZTUNNEL_READINESS_PORT": "26021",
    "PROXY_CONFIG": json.dumps({"proxyAdminPort": 26000, "statsPort": 26020}),
}
STATS_PORT = 26020
SOCKS5_PORT = 26080
PROMETHEUS_START_TIMEOUT = 30.0
QUERY_TIMEOUT = 30.0  # seconds: a few 1 s scrapes, plus rate() needing two samples
CONNECTIONS = 3
PAYLOAD = b"hello world"

DASHBOARD_QUERIES = (
    'sum by (tag) (istio_build{component="ztunnel"})',
    "sum(rate(istio_tcp_connections_opened_total[1m]))",
    "-sum(rate(istio_tcp_connections_closed_total[1m]))",
    "sum(rate(istio_tcp_sent_bytes_total[1m]))",
    "sum(rate(istio_tcp_received_bytes_total[1m]))",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
    "sum(istio_tcp_connections_opened_total - istio_tcp_connections_closed_total)",
    "sum(istio_tcp_sockets_open)",
    "sum(process_open_fds)",
)

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
requires_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not installed (Debian package `prometheus`; scripts/test adds it)",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return int(s.getsockname()[1])


class Prometheus:
    """One Prometheus server with a scrape job for ztunnel's metrics port."""

    def __init__(self, directory: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = _free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n"
            "  scrape_interval: 1s\n"
            "  evaluation_interval: 1s\n"
            "scrape_configs:\n"
            "  - job_name: ztunnel\n"
            "    metrics_path: /stats/prometheus\n"
            "    static_configs:\n"
            f"      - targets: ['{target}']\n"
            "        labels: {app: ztunnel, pod: ztunnel-test}\n"
        )
        self.log = directory / "prometheus.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address={LOCALHOST}:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def get(self, path: str, timeout: float = 5.0) -> Any:
        url = f"http://{LOCALHOST}:{self.port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return json.loads(reply.read())

    def wait_ready(self) -> None:
        def ready() -> bool | None:
            if self.proc.poll() is not None:
                raise HarnessError(f"prometheus exited:\n{self.log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                url = f"http://{LOCALHOST}:{self.port}/-/ready"
                with urllib.request.urlopen(url, timeout=1.0) as reply:
                    return reply.status == 200 or None
            return None

        poll_until(ready, PROMETHEUS_START_TIMEOUT, "prometheus ready", interval=0.2)

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = self.get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        assert answer["status"] == "success", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def wait_series(self, promql: str) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            return self.query(promql) or None

        return poll_until(probe, QUERY_TIMEOUT, f"series for {promql}", interval=0.5)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def zt(ztunnel: StartZtunnel) -> ZtunnelProcess:
    return ztunnel(
        {
            **PORTS,
            "UNSTABLE_ENABLE_SOCKS5": "true",
            "ISTIO_META_DNS_CAPTURE": "false",
            "ISTIO_META_ISTIO_VERSION": ISTIO_VERSION,
        }
    )


@pytest.fixture
def prometheus(tmp_path: Path, zt: ZtunnelProcess) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path, f"{LOCALHOST}:{STATS_PORT}")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _traffic(echo: EchoServer) -> None:
    for _ in range(CONNECTIONS):
        with socks5_connect(LOCALHOST, SOCKS5_PORT, echo.host, echo.port) as sock:
            sock.sendall(PAYLOAD)
            assert recv_exact(sock, len(PAYLOAD)) == PAYLOAD


def _value(series: dict[str, Any]) -> float:
    return float(series["value"][1])


@requires_prometheus
def test_promtool_accepts_the_exposition(zt: ZtunnelProcess, echo_server: EchoServer) -> None:
    assert PROMTOOL is not None
    _traffic(echo_server)
    poll_until(
        lambda: zt.metric_value("istio_tcp_connections_closed_total") >= CONNECTIONS or None,
        10.0,
        "connections closed in the metrics",
        interval=0.2,
    )
    text = zt.metrics()
    check = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert check.returncode == 0, (check.stdout + check.stderr).decode()


@requires_prometheus
def test_dashboard_queries_return_series(
    zt: ZtunnelProcess, prometheus: Prometheus, echo_server: EchoServer
) -> None:
    target = poll_until(
        lambda: next(
            (
                t
                for t in prometheus.get("/api/v1/targets")["data"]["activeTargets"]
                if t["health"] == "up"
            ),
            None,
        ),
        QUERY_TIMEOUT,
        "ztunnel target up",
        interval=0.5,
    )
    assert target["scrapeUrl"] == f"http://{LOCALHOST}:{STATS_PORT}/stats/prometheus", target
    _traffic(echo_server)

    results = {q: prometheus.wait_series(q) for q in DASHBOARD_QUERIES}

    [build] = results['sum by (tag) (istio_build{component="ztunnel"})']
    assert build["metric"] == {"tag": ISTIO_VERSION}, build
    assert _value(build) == 1

    def settled() -> bool | None:
        sent = prometheus.query('sum(istio_tcp_sent_bytes_total{reporter="source"})')
        received = prometheus.query('sum(istio_tcp_received_bytes_total{reporter="source"})')
        opened = prometheus.query('sum(istio_tcp_connections_opened_total{reporter="source"})')
        if not (sent and received and opened):
            return None
        want = (CONNECTIONS * len(PAYLOAD),) * 2 + (CONNECTIONS,)
        return (_value(sent[0]), _value(received[0]), _value(opened[0])) == want or None

    poll_until(settled, QUERY_TIMEOUT, "byte and connection counters scraped", interval=0.5)
    [fds] = results["sum(process_open_fds)"]
    assert _value(fds) > 0
    for series in results["istio_tcp_sent_bytes_total"]:
        assert series["metric"]["job"] == "ztunnel", series
        assert series["metric"]["request_protocol"] == "tcp", series


# ---------------------------------------------------------------------------------------------
# Measurements: printed (run with -s to see them), never asserted


SCRAPE_SERIES = 10_000
SCRAPE_RUNS = 5
HOT_PATH_CONNECTIONS = 10_000
BYTE_FAMILIES = (m.TCP_OPENED, m.TCP_CLOSED, m.TCP_RECEIVED, m.TCP_SENT, m.TCP_FAILED)


def _workload(name: str, namespace: str, ip: str) -> Workload:
    return Workload(
        uid=f"cluster1//v1/Pod/{namespace}/{name}",
        name=name,
        namespace=namespace,
        workload_ips=(ip,),
        protocol="HBONE",
        trust_domain="cluster.local",
        service_account=name,
        workload_name=f"{name}-deploy",
        canonical_name=name,
        canonical_revision="v1",
        cluster_id="Kubernetes",
        locality=Locality(region="eu-west1", zone="eu-west1-b"),
    )


def _full_labels(i: int) -> m.TrafficLabels:
    """Every label set: source and destination workloads, service, principal, locality."""
    source = _workload(f"client-{i}", "default", f"10.0.{i // 250}.{i % 250 + 1}")
    destination = _workload(f"server-{i % 50}", "backend", "10.1.0.1")
    service = Service(
        name=f"server-{i % 50}",
        namespace="backend",
        hostname=f"server-{i % 50}.backend.svc.cluster.local",
    )
    return m.TrafficLabels(
        reporter="destination",
        source=source,
        source_principal=source.identity(),
        destination=destination,
        destination_service=service,
        security_policy="mutual_tls",
    )


def test_measure_scrape_latency_with_10k_series() -> None:
    per_family = SCRAPE_SERIES // len(BYTE_FAMILIES)
    counters = tuple(
        ipc.CounterDelta(family, _full_labels(i).encode(), float(i + 1))
        for family in BYTE_FAMILIES
        for i in range(per_family)
    )
    collector = WorkerMetricsCollector()
    collector.apply("w0", ipc.MetricsPush(counters=counters))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    timings: list[float] = []
    body = b""
    for _ in range(SCRAPE_RUNS):
        start = time.perf_counter()
        body = generate_latest(registry)
        timings.append(time.perf_counter() - start)
    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    print(
        f"\nscrape of {series} series ({len(body) / 1e6:.1f} MB): median "
        f"{statistics.median(timings) * 1e3:.0f} ms, min {min(timings) * 1e3:.0f} ms "
        f"over {SCRAPE_RUNS} runs"
    )


class _Flow:
    received = 11
    sent = 22

    def abort(self) -> None:
        pass


def test_measure_per_connection_metric_bookkeeping() -> None:
    """ConnectionTracker.opened + closed with full labels; access log lines off."""
    tracker = ConnectionTracker(WorkerMetrics())
    labels = [_full_labels(i % 100) for i in range(HOT_PATH_CONNECTIONS)]
    access = logging.getLogger("access")
    level = access.level
    access.setLevel(logging.WARNING)
    timings: list[float] = []
    try:
        for conn_labels in labels:
            conn = Tracked(
                flow=_Flow(), labels=conn_labels, src_addr="10.0.0.1:4000", dst_addr="10.1.0.1:80"
            )
            start = time.perf_counter()
            tracker.opened(conn)
            tracker.closed(conn)
            timings.append(time.perf_counter() - start)
    finally:
        access.setLevel(level)
    print(
        f"\nopened+closed with full labels: median {statistics.median(timings) * 1e6:.1f} us, "
        f"p99 {statistics.quantiles(timings, n=100)[98] * 1e6:.1f} us "
        f"over {HOT_PATH_CONNECTIONS} connections"
    )
