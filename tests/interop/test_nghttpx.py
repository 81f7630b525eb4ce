"""nghttpx (nghttp2's proxy) standing in for a destination node's 15008, reached by ztunnel.

Node A runs the dedicated ztunnel of `default/client` with capture; node B runs no ztunnel:
`nghttpx --http2-proxy` listens on 198.18.0.2:15008 with a FAKE_CA certificate for
`default/server`, demands a client certificate from the same root, TLS 1.3 only, and hands
each CONNECT to an HTTP/1 forward proxy (below) that dials the echo servers. So the whole
outbound HBONE path of ztunnel (pool, mTLS, SPIFFE check, CONNECT, DATA, flow control)
meets a server we did not write. nghttpx does not pass half-close on (reference
performance.md §2(d)): these tests never wait for an EOF that only a FIN could bring.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mesh import (
    IO_TIMEOUT,
    PROJECT_ROOT,
    EchoServer,
    HarnessError,
    LogKeeper,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    digest,
    issue,
    poll_until,
    recv_exact,
    write_cert,
    write_local_config,
)
from netns import Netns, Network

from ztunnel.fakeca import FakeCA

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(
        shutil.which("nghttpx") is None, reason="needs nghttpx (Debian package nghttp2-proxy)"
    ),
]

CLIENT_IP = "198.18.0.1"
SERVER_IP = "198.18.0.2"
DOUBLE_PORT = 8080
ECHO_PORT = 8081
HBONE_PORT = 15008
PROXY_ADDR = ("127.0.0.1", 3128)  # the HTTP/1 CONNECT proxy behind nghttpx, inside node B
REDIRECT = str(PROJECT_ROOT / "scripts" / "redirect")

CLIENT = WorkloadSpec("client", CLIENT_IP, "node-a")
SERVER = WorkloadSpec("server", SERVER_IP, "node-b")


class ConnectProxy:
    """A tiny HTTP/1.1 CONNECT forward proxy (tinyproxy's role), one thread per direction.

    Upstream sockets are opened inside `ns`. Each request line is kept in `requests`.
    """

    def __init__(self, ns: Netns, addr: tuple[str, int]) -> None:
        self.ns = ns
        self.requests: list[str] = []
        self._listener: socket.socket = ns.call(_listen, addr)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="proxy")
        self._acceptor.start()

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
        conn.settimeout(IO_TIMEOUT)
        try:
            head = _read_head(conn)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, target, _ = line.split(" ", 2)
            with self._lock:
                self.requests.append(line)
            if method != "CONNECT":
                conn.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                conn.close()
                return
            host, port = target.rsplit(":", 1)
            upstream = self.ns.call(socket.create_connection, (host, int(port)), IO_TIMEOUT)
        except (OSError, ValueError):
            conn.close()
            return
        conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        conn.settimeout(None)
        upstream.settimeout(None)
        with self._lock:
            self._socks += [conn, upstream]
        threading.Thread(target=_pump, args=(upstream, conn), daemon=True).start()
        _pump(conn, upstream)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=2)


def _listen(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(64)
    sock.settimeout(0.2)
    return sock


def _read_head(conn: socket.socket, limit: int = 64 * 1024) -> bytes:
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(4096)
        if not chunk or len(buf) > limit:
            raise ValueError("no complete request head")
        buf += chunk
    return bytes(buf)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF, then pass the half-close on."""
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@dataclass
class NghttpxNode:
    a: Netns
    b: Netns
    za: NodeZtunnel
    proxy: ConnectProxy
    nghttpx: subprocess.Popen[bytes]
    errorlog: Path


@pytest.fixture
def mesh_to_nghttpx(
    network: Network, fake_ca: tuple[str, FakeCA], tmp_path: Path, ztunnel_logs: LogKeeper
) -> Iterator[NghttpxNode]:
    ca_dir, ca = fake_ca
    a, b = network.node("a"), network.node("ngx")
    network.link(a, f"{CLIENT_IP}/24", b, f"{SERVER_IP}/24")
    config = write_local_config(tmp_path / "local.yaml", [CLIENT, SERVER])
    a.run(REDIRECT, "outbound", SERVER_IP, f"{DOUBLE_PORT}:{ECHO_PORT}")
    servers = [
        EchoServer(b, SERVER_IP, DOUBLE_PORT, double=True),
        EchoServer(b, SERVER_IP, ECHO_PORT),
    ]
    proxy = ConnectProxy(b, PROXY_ADDR)
    cert = write_cert(tmp_path / "certs", "server", issue(ca, SERVER.identity))
    errorlog = tmp_path / "nghttpx-error.log"
    nghttpx = b.popen(
        [
            *("nghttpx", "--conf=/dev/null", "--http2-proxy", "--workers=1"),
            f"--frontend={SERVER_IP},{HBONE_PORT}",
            f"--backend={PROXY_ADDR[0]},{PROXY_ADDR[1]}",
            *("--verify-client", f"--verify-client-cacert={cert.ca}"),
            "--tls-min-proto-version=TLSv1.3",
            "--no-ocsp",
            f"--errorlog-file={errorlog}",
            "--accesslog-file=/dev/null",
            *(str(cert.key), str(cert.cert)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    za = ztunnel_logs.add("client", NodeZtunnel.dedicated(a, CLIENT, config, ca_dir))
    try:
        _wait_listening(b, nghttpx, errorlog)
        za.wait_ready()
        yield NghttpxNode(a, b, za, proxy, nghttpx, errorlog)
    finally:
        za.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(nghttpx.pid, signal.SIGKILL)
        nghttpx.wait(5)
        proxy.close()
        for server in servers:
            server.close()


def _wait_listening(ns: Netns, proc: subprocess.Popen[bytes], errorlog: Path) -> None:
    def probe() -> bool | None:
        if proc.poll() is not None:
            log = errorlog.read_text() if errorlog.exists() else ""
            raise HarnessError(f"nghttpx exited with {proc.returncode}:\n{log}")
        try:
            ns.call(socket.create_connection, (SERVER_IP, HBONE_PORT), 1.0).close()
        except OSError:
            return None
        return True

    poll_until(probe, 10.0, "nghttpx to listen on 15008", interval=0.05)


def test_captured_connection_reaches_the_echo_server_through_nghttpx(
    mesh_to_nghttpx: NghttpxNode,
) -> None:
    node = mesh_to_nghttpx
    with connect(node.a, SERVER_IP, DOUBLE_PORT) as sock:
        sock.sendall(b"hello world")
        assert recv_exact(sock, 22) == b"hello world" * 2

    # The CONNECT authority ztunnel sent is what nghttpx forwarded to its backend.
    assert node.proxy.requests == [f"CONNECT {SERVER_IP}:{DOUBLE_PORT} HTTP/1.1"]
    node.za.wait_metric(
        "istio_tcp_connections_opened_total",
        1,
        reporter="source",
        connection_security_policy="mutual_tls",
        destination_workload="server",
        destination_principal=SERVER.identity,
        source_principal=CLIENT.identity,
    )


def test_bulk_bytes_flow_both_ways_through_nghttpx_under_flow_control(
    mesh_to_nghttpx: NghttpxNode,
) -> None:
    """More than every default HTTP/2 window (64 KiB) in both directions at once."""
    node = mesh_to_nghttpx
    payload = os.urandom(4 << 20)
    received = bytearray()
    with connect(node.a, SERVER_IP, ECHO_PORT, timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
        sender.start()
        deadline = time.monotonic() + 30
        while len(received) < len(payload) and time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            received += chunk
        sender.join(5)
    assert len(received) == len(payload)
    assert digest(bytes(received)) == digest(payload)
    assert node.proxy.requests == [f"CONNECT {SERVER_IP}:{ECHO_PORT} HTTP/1.1"]


def test_several_captured_connections_each_get_their_own_stream_through_nghttpx(
    mesh_to_nghttpx: NghttpxNode,
) -> None:
    node = mesh_to_nghttpx
    socks = [connect(node.a, SERVER_IP, DOUBLE_PORT) for _ in range(10)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"%02d" % i)
        for i, sock in enumerate(socks):
            assert recv_exact(sock, 4) == (b"%02d" % i) * 2
    finally:
        for sock in socks:
            sock.close()
    assert len(node.proxy.requests) == 10
