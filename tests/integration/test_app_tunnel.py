"""Application tunnels ("sandwich", upstream §9.7) on a real ztunnel.

The local workload at 127.0.0.1 declares `applicationTunnel`. Raw HBONE clients with FAKE_CA
identities CONNECT into its 15008 as remote ztunnels would. With protocol PROXY the app is a
server on localhost that reads the PROXY v2 header with a third-party parser (`proxyprotocol`
from PyPI) and then echoes; with NONE the bytes arrive plain at the tunnel port.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import pytest
import yaml
from proxyprotocol.v2 import ProxyProtocolV2

from tests.integration.harness import LOCALHOST, EchoServer
from tests.integration.hbone_client import HBONEStream, mint

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVICE_VIP = "10.96.0.10"
AUTHORITY_TLV = 0xD0


class ProxyProtocolApp:
    """Accepts, parses a PROXY v2 header, records it, then echoes the rest of the stream."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOCALHOST, 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self.headers: list[Any] = []
        self.errors: list[str] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        parser = ProxyProtocolV2()
        data = b""
        try:
            while len(data) < 16:
                data += conn.recv(16 - len(data))
            length = int.from_bytes(data[14:16], "big")
            while len(data) < 16 + length:
                data += conn.recv(16 + length - len(data))
            self.headers.append(parser.unpack(data))
            while chunk := conn.recv(65536):
                conn.sendall(chunk)
        except Exception as e:  # recorded for the test to show
            self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._thread.join(2)


def _config(path: Path, tunnel: dict[str, object]) -> Path:
    workload = {
        "uid": "cluster1//v1/Pod/default/local",  # PROXY_WORKLOAD_INFO default/local/default
        "name": "local",
        "namespace": "default",
        "serviceAccount": "default",
        "workloadIps": [LOCALHOST],
        "protocol": "HBONE",
        "applicationTunnel": tunnel,
        "services": {"default/echo.default.svc.cluster.local": {80: 8080}},
    }
    service = {
        "name": "echo",
        "namespace": "default",
        "hostname": "echo.default.svc.cluster.local",
        "vips": [f"/{SERVICE_VIP}"],
        "ports": {80: 8080},
    }
    path.write_text(yaml.safe_dump({"workloads": [workload], "services": [service]}))
    return path


@pytest.fixture
def app() -> Iterator[ProxyProtocolApp]:
    server = ProxyProtocolApp()
    yield server
    server.close()


def _round_trip(authority: str, data: bytes = b"through the sandwich") -> HBONEStream:
    stream = HBONEStream(LOCALHOST, 15008, mint(CLIENT))
    assert stream.connect(authority) == 200
    stream.send(data)
    assert stream.recv_exactly(len(data), timeout=5) == data
    return stream


@pytest.mark.timeout(60)
def test_proxy_tunnel_delivers_a_v2_header_to_localhost(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path, app: ProxyProtocolApp
) -> None:
    config = _config(tmp_path / "local.yaml", {"protocol": "PROXY", "port": app.port})
    ztunnel({"LOCAL_XDS_PATH": str(config)})
    stream = _round_trip(f"{LOCALHOST}:8080")
    client_port = stream.sock.getsockname()[1]
    stream.close()
    assert app.errors == []
    (result,) = app.headers
    assert result.source == (ip_address(LOCALHOST), client_port)
    assert result.dest == (ip_address(LOCALHOST), 8080)  # the CONNECT authority
    assert result.tlv[AUTHORITY_TLV] == CLIENT.encode()


@pytest.mark.timeout(60)
def test_proxy_tunnel_names_the_service_vip_for_a_hostname_authority(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path, app: ProxyProtocolApp
) -> None:
    config = _config(tmp_path / "local.yaml", {"protocol": "PROXY", "port": app.port})
    ztunnel({"LOCAL_XDS_PATH": str(config)})
    _round_trip("echo.default.svc.cluster.local:80").close()
    (result,) = app.headers
    assert result.dest == (ip_address(SERVICE_VIP), 80)  # PROXY cannot carry a hostname
    assert result.tlv[AUTHORITY_TLV] == CLIENT.encode()


@pytest.mark.timeout(60)
def test_none_tunnel_moves_the_port_and_sends_no_header(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path
) -> None:
    with EchoServer(LOCALHOST) as echo:
        config = _config(tmp_path / "local.yaml", {"protocol": "NONE", "port": echo.port})
        ztunnel({"LOCAL_XDS_PATH": str(config)})
        _round_trip(f"{LOCALHOST}:8080", b"plain bytes, no header").close()
        assert len(echo.peers) == 1
