"""Hostname-only workloads resolved on demand (upstream §10.5, `test_on_demand_dns_request`).

The service's only endpoint has no IP, just `hostname: localhost`; each connection to the
service VIP resolves it (through the system resolver, so /etc/hosts) and dials the answer.
Two connections count `istio_on_demand_dns_total` twice, labelled with the source workload
and the hostname.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import LOCALHOST, EchoServer, recv_exact, socks5_connect

VIP = "127.10.0.7"


def _config(path: Path, echo_port: int) -> Path:
    config = {
        "workloads": [
            {
                "uid": "cluster1//v1/Pod/default/local",
                "name": "local",
                "namespace": "default",
                "serviceAccount": "default",
                "workloadIps": [LOCALHOST],
                "protocol": "TCP",
                "services": {},
            },
            {
                "uid": "cluster1//v1/Pod/default/by-name",
                "name": "by-name",
                "namespace": "default",
                "serviceAccount": "by-name",
                "workloadIps": [],
                "hostname": "localhost",
                "protocol": "TCP",
                "services": {"default/named.default.svc.cluster.local": {80: echo_port}},
            },
        ],
        "services": [
            {
                "name": "named",
                "namespace": "default",
                "hostname": "named.default.svc.cluster.local",
                "vips": [f"/{VIP}"],
                "ports": {80: echo_port},
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.timeout(60)
def test_each_connection_resolves_the_hostname_and_is_counted(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path
) -> None:
    with EchoServer(LOCALHOST) as echo:
        zt = ztunnel({"LOCAL_XDS_PATH": str(_config(tmp_path / "local.yaml", echo.port))})
        for i in range(2):
            with socks5_connect(LOCALHOST, zt.ports.socks5, VIP, 80) as sock:
                sock.sendall(f"hello {i}".encode())
                assert recv_exact(sock, 7) == f"hello {i}".encode()
        assert len(echo.peers) == 2
    labels = {  # source_workload is the workload_name, which this config leaves out
        "source_workload_namespace": "default",
        "source_principal": "spiffe://cluster.local/ns/default/sa/default",
        "hostname": "localhost",
    }
    deadline = time.monotonic() + 5
    while zt.metric_value("istio_on_demand_dns_total", **labels) < 2:
        assert time.monotonic() < deadline, zt.metrics()
        time.sleep(0.2)
    assert zt.metric_value("istio_on_demand_dns_total", **labels) == 2
