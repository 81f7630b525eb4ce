"""Double HBONE through a network gateway (upstream §9.9) on a real ztunnel.

The service `echo` has its only endpoint on network `remote`, reachable through that
network's gateway at 127.0.0.3. The gateway here is written for the test with plain `ssl`
and `h2` (not the product's HBONE core), as an east-west gateway behaves: it terminates the
outer HBONE tunnel, checks it was asked for `<service host>:<port>`, and pipes the stream's
bytes to the destination node's 15008. That node is this same ztunnel, so the inner TLS and
CONNECT (with `x-forwarded-network`) arrive at its inbound, which serves the service by
hostname and reaches the echo server. A client goes in through SOCKS5.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import (
    LOCALHOST,
    EchoServer,
    Socks5Refused,
    recv_exact,
    socks5_connect,
)
from tests.integration.hbone_client import mint
from tests.integration.hbone_gateway import HBONEGateway

GATEWAY_IP = "127.0.0.3"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
LOCAL_ID = "spiffe://cluster.local/ns/default/sa/default"
SERVICE_HOST = "echo.default.svc.cluster.local"
SERVICE_VIP = "10.96.0.20"
ZTUNNEL_HBONE = (LOCALHOST, 15008)


def _config(path: Path, gateway_port: int, echo_port: int, sans: list[str]) -> Path:
    def workload(name: str, ip: str, sa: str, network: str, **extra: object) -> dict[str, object]:
        return {
            "uid": f"cluster1//v1/Pod/default/{name}",
            "name": name,
            "namespace": "default" if sa != "istio-eastwestgateway" else "istio-system",
            "serviceAccount": sa,
            "workloadIps": [ip],
            "protocol": "HBONE",
            "network": network,
            **extra,
        }

    config = {
        "workloads": [
            workload("local", LOCALHOST, "default", "", services={}),
            workload(
                "echo-remote",
                "10.20.0.5",
                "echo",
                "remote",
                services={f"default/{SERVICE_HOST}": {80: echo_port}},
                networkGateway={
                    "destination": f"remote/{GATEWAY_IP}",
                    "hboneMtlsPort": gateway_port,
                },
            ),
            workload(
                "istio-eastwestgateway", GATEWAY_IP, "istio-eastwestgateway", "remote", services={}
            ),
        ],
        "services": [
            {
                "name": "echo",
                "namespace": "default",
                "hostname": SERVICE_HOST,
                "vips": [f"/{SERVICE_VIP}"],
                "ports": {80: echo_port},
                "subjectAltNames": sans,
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def gateway() -> Iterator[HBONEGateway]:
    gw = HBONEGateway(mint(GATEWAY_ID), listen=(GATEWAY_IP, 0), upstream=ZTUNNEL_HBONE)
    yield gw
    gw.close()


@pytest.mark.timeout(60)
def test_round_trip_through_the_gateway(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path, gateway: HBONEGateway
) -> None:
    with EchoServer(LOCALHOST) as echo:
        config = _config(tmp_path / "local.yaml", gateway.port, echo.port, [LOCAL_ID])
        zt = ztunnel({"LOCAL_XDS_PATH": str(config), "LOG_FORMAT": "json"})
        message = os.urandom(1 << 20)  # windows and backpressure across both layers
        with socks5_connect(LOCALHOST, 15080, SERVICE_VIP, 80) as sock:
            sender = threading.Thread(target=sock.sendall, args=(message,))
            sender.start()
            assert recv_exact(sock, len(message)) == message
            sender.join(5)
        assert len(echo.peers) == 1
    # The outer CONNECT named the service, and came with the source's certificate.
    (outer,) = gateway.requests
    assert outer[":method"] == "CONNECT"
    assert outer[":authority"] == f"{SERVICE_HOST}:80"
    assert "x-forwarded-network" not in outer
    sans = dict(gateway.peer_certs[0]["subjectAltName"])
    assert sans["URI"] == LOCAL_ID
    # The inner CONNECT reached this ztunnel's inbound with the same authority.
    inbound = zt.logs.wait_for(
        lambda ln: ln.is_access() and ln.fields.get("direction") == "inbound", timeout=5
    )
    assert inbound.fields["dst.hbone_addr"] == f"{SERVICE_HOST}:80"
    outbound = zt.logs.wait_for(
        lambda ln: ln.is_access() and ln.fields.get("direction") == "outbound", timeout=5
    )
    assert outbound.fields["dst.addr"] == f"{GATEWAY_IP}:{gateway.port}"
    assert outbound.fields["dst.hbone_addr"] == f"{SERVICE_HOST}:80"
    assert outbound.fields["dst.identity"] == LOCAL_ID  # the inner peer, not the gateway
    assert "error" not in outbound.fields, outbound.fields


@pytest.mark.timeout(60)
def test_inner_identity_must_be_a_service_san(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path, gateway: HBONEGateway
) -> None:
    with EchoServer(LOCALHOST) as echo:
        other = "spiffe://cluster.local/ns/default/sa/someone-else"
        config = _config(tmp_path / "local.yaml", gateway.port, echo.port, [other])
        zt = ztunnel({"LOCAL_XDS_PATH": str(config), "LOG_FORMAT": "json"})
        try:
            sock = socks5_connect(LOCALHOST, 15080, SERVICE_VIP, 80)
        except (Socks5Refused, ConnectionError):
            pass  # refused in the SOCKS5 reply: as good as a closed connection
        else:
            with sock, contextlib.suppress(ConnectionResetError, BrokenPipeError):
                sock.settimeout(5)
                sock.sendall(b"never echoed")
                assert sock.recv(100) == b""
        assert echo.peers == []
    failed = zt.logs.wait_for(
        lambda ln: ln.is_access() and ln.fields.get("direction") == "outbound", timeout=5
    )
    assert "match none of" in str(failed.fields.get("error")), failed.fields
