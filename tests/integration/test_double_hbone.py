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

import asyncio
import contextlib
import os
import ssl
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
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

GATEWAY_IP = "127.0.0.3"
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-eastwestgateway"
LOCAL_ID = "spiffe://cluster.local/ns/default/sa/default"
SERVICE_HOST = "echo.default.svc.cluster.local"
SERVICE_VIP = "10.96.0.20"
ZTUNNEL_HBONE = (LOCALHOST, 15008)


class Gateway:
    """An HBONE server that forwards each CONNECT stream's bytes to ZTUNNEL_HBONE."""

    def __init__(self) -> None:
        cert = mint(GATEWAY_ID)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cadata="".join(cert.roots_pem))
        with tempfile.TemporaryDirectory() as d:
            chain, key = Path(d, "chain.pem"), Path(d, "key.pem")
            chain.write_text("".join(cert.chain_pem))
            key.write_text(cert.key_pem)
            self.context.load_cert_chain(str(chain), str(key))
        self.context.set_alpn_protocols(["h2"])
        self.requests: list[dict[str, str]] = []
        self.peer_certs: list[Any] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, GATEWAY_IP, 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peer_certs.append(writer.get_extra_info("peercert"))
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        upstreams: dict[int, asyncio.StreamWriter] = {}
        pumps: set[asyncio.Task[None]] = set()

        async def pump(sid: int, up: asyncio.StreamReader) -> None:
            while chunk := await up.read(16384):
                conn.send_data(sid, chunk)
                writer.write(conn.data_to_send())
            conn.end_stream(sid)
            writer.write(conn.data_to_send())

        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        headers = {str(k): str(v) for k, v in ev.headers}
                        self.requests.append(headers)
                        up_reader, up_writer = await asyncio.open_connection(*ZTUNNEL_HBONE)
                        upstreams[ev.stream_id] = up_writer
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                        task = asyncio.get_running_loop().create_task(pump(ev.stream_id, up_reader))
                        pumps.add(task)
                    elif isinstance(ev, h2.events.DataReceived):
                        up = upstreams.get(ev.stream_id)
                        if up is not None:
                            up.write(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        up = upstreams.get(ev.stream_id)
                        if up is not None and up.can_write_eof():
                            up.write_eof()
                    elif isinstance(ev, h2.events.StreamReset):
                        up = upstreams.pop(ev.stream_id, None)
                        if up is not None:
                            up.close()
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            for task in pumps:
                task.cancel()
            for up in upstreams.values():
                up.close()
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


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
def gateway() -> Iterator[Gateway]:
    gw = Gateway()
    yield gw
    gw.close()


@pytest.mark.timeout(60)
def test_round_trip_through_the_gateway(  # type: ignore[no-untyped-def]
    ztunnel, tmp_path: Path, gateway: Gateway
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
    ztunnel, tmp_path: Path, gateway: Gateway
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
