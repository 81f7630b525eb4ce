"""A blocking HBONE test client: mTLS with a FAKE_CA identity, one CONNECT stream, raw bytes.

Independent of the product's HBONE core on purpose: plain `ssl` plus `h2`, so a test sees
exactly what a remote ztunnel would send and receive.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events

from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.fakeca import FakeCA

FAKE_CA_DIR = os.environ.get("FAKE_CA_DIR", "/tmp/ztunnel-fake-ca")


def mint(identity: str, ca: FakeCA | None = None) -> WorkloadCertificate:
    return (ca or FakeCA.open(FAKE_CA_DIR)).issue(identity, ttl=3600, now=time.time())


def client_context(cert: WorkloadCertificate) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata="".join(cert.roots_pem))
    with tempfile.TemporaryDirectory() as d:
        chain, key = Path(d, "chain.pem"), Path(d, "key.pem")
        chain.write_text("".join(cert.chain_pem))
        key.write_text(cert.key_pem)
        ctx.load_cert_chain(str(chain), str(key))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class HBONEStream:
    """One CONNECT stream on its own TLS connection."""

    def __init__(
        self, host: str, port: int, cert: WorkloadCertificate, timeout: float = 5.0
    ) -> None:
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = client_context(cert).wrap_socket(raw, server_hostname=None)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self._flush()
        self.stream_id = 0
        self.status = 0
        self.received = bytearray()
        self.ended = False
        self.reset = False

    def connect(self, authority: str, method: str = "CONNECT") -> int:
        """Send the request; return the response status (0 if the connection died)."""
        self.stream_id = self.h2.get_next_available_stream_id()
        headers = [(":method", method), (":authority", authority)]
        if method != "CONNECT":
            headers += [(":scheme", "https"), (":path", "/")]
        self.h2.send_headers(self.stream_id, headers)
        self._flush()
        while not self.status and self._pump():
            pass
        return self.status

    def send(self, data: bytes) -> None:
        self.h2.send_data(self.stream_id, data)
        self._flush()

    def recv_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        deadline = time.monotonic() + timeout
        while len(self.received) < n and not (self.ended or self.reset):
            if time.monotonic() > deadline or not self._pump():
                break
        out = bytes(self.received[:n])
        del self.received[:n]
        return out

    def wait_closed(self, timeout: float) -> bool:
        """True once the stream is reset or ended by the peer (or the connection died)."""
        deadline = time.monotonic() + timeout
        while not (self.ended or self.reset) and time.monotonic() < deadline:
            if not self._pump(min(0.2, max(0.01, deadline - time.monotonic()))):
                return True
        return self.ended or self.reset

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def _pump(self, timeout: float | None = None) -> bool:
        """Read once and handle events; False when the connection is gone."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except (OSError, ssl.SSLError):
            self.reset = True
            return False
        if not data:
            self.reset = self.reset or not self.ended
            return False
        for ev in self.h2.receive_data(data):
            self._handle(ev)
        self._flush()
        return True

    def _handle(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == self.stream_id:
            for name, value in ev.headers:
                if name in (b":status", ":status"):
                    self.status = int(value)
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == self.stream_id:
            self.received += ev.data
            self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == self.stream_id:
            self.ended = True
        elif (
            isinstance(ev, h2.events.StreamReset) and ev.stream_id == self.stream_id
        ) or isinstance(ev, h2.events.ConnectionTerminated):
            self.reset = True
