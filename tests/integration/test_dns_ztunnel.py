"""The DNS proxy inside a real ztunnel: `dig` against every worker's :15053."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from harness import StartZtunnel, poll_until

pytestmark = pytest.mark.skipif(shutil.which("dig") is None, reason="needs dig (dnsutils)")


def _dig(*args: str) -> str:
    out = subprocess.run(
        ["dig", "@127.0.0.1", "-p", "15053", "+short", "+time=3", "+tries=1", *args],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.timeout(60)
def test_mesh_service_resolves_over_udp_and_tcp_and_is_counted(ztunnel: StartZtunnel) -> None:
    zt = ztunnel(workers=2)
    # examples/localhost.yaml: default/example.com has VIP 127.10.0.1 on the default network.
    for _ in range(4):  # several queries, so both workers' sockets are likely exercised
        assert _dig("example.com", "A") == "127.10.0.1"
        assert _dig("example.com", "A", "+tcp") == "127.10.0.1"

    def counted() -> float | None:
        udp = zt.metric_value("istio_dns_requests_total", request_protocol="udp")
        tcp = zt.metric_value("istio_dns_requests_total", request_protocol="tcp")
        return udp if udp >= 4 and tcp >= 4 else None

    poll_until(counted, 5.0, "istio_dns_requests_total for 4 UDP and 4 TCP queries")
    # The other service is on network "remote": no VIP on the client's network, empty answer.
    assert _dig("example2.com", "A") == ""
