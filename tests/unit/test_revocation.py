"""The worker's CRL glue (`workers.revocation`): loading CRL_PATH, admitting peers, re-checks.

Peers here are real TLS sessions over a loopback socket pair, with certificates from a
FakeCA; the end-to-end behaviour between two ztunnels is in tests/e2e/test_crl_nodes.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from workers.metrics import WorkerMetrics
from workers.revocation import REJECTIONS, REVOKED_ERROR, REVOKED_FLAG, Revocation
from workers.tracking import ConnectionTracker, Tracked
from workers.tunnel import H2Protocol, TunnelLeg
from ztunnel import tls
from ztunnel.core import hbone
from ztunnel.core import metrics as m
from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(60)

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
SERVER = "spiffe://cluster.local/ns/default/sa/server"


def _serial(cert: WorkloadCertificate) -> int:
    return x509.load_pem_x509_certificate(cert.chain_pem[0].encode()).serial_number


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA.ephemeral()


@pytest.fixture
def certs(ca: FakeCA) -> tuple[WorkloadCertificate, WorkloadCertificate]:
    now = time.time()
    return ca.issue(CLIENT, ttl=3600, now=now), ca.issue(SERVER, ttl=3600, now=now)


@pytest.fixture
def sessions(
    certs: tuple[WorkloadCertificate, WorkloadCertificate],
) -> Iterator[tuple[ssl.SSLSocket, ssl.SSLSocket]]:
    """A completed mutual-TLS handshake over a socket pair: (client side, server side)."""
    contexts = tls.ContextCache()
    client_cert, server_cert = certs
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    server = contexts.server(server_cert).wrap_socket(
        b, server_side=True, do_handshake_on_connect=False
    )
    client = contexts.client(client_cert).wrap_socket(
        a, server_hostname=None, do_handshake_on_connect=False
    )
    thread = threading.Thread(target=server.do_handshake)
    thread.start()
    client.do_handshake()
    thread.join(5)
    yield client, server
    client.close()
    server.close()


class FakeConn(H2Protocol):
    """An HBONE connection without a transport: records that it was aborted."""

    def __init__(self) -> None:
        super().__init__(hbone.HBONEServer(hbone.H2Settings.server()))
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


def _revocation(path: Path | None) -> tuple[Revocation, WorkerMetrics, list[ConnectionTracker]]:
    metrics = WorkerMetrics()
    trackers = [ConnectionTracker(metrics)]
    return Revocation(str(path) if path else None, metrics, trackers), metrics, trackers


def _rejections(metrics: WorkerMetrics, reporter: str) -> float:
    push = metrics.take_push()
    return sum(
        c.value
        for c in push.counters
        if c.family == REJECTIONS and dict(c.labels).get("reporter") == reporter
    )


async def test_admit_refuses_a_revoked_peer_and_counts_it(
    tmp_path: Path,
    ca: FakeCA,
    certs: tuple[WorkloadCertificate, WorkloadCertificate],
    sessions: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client_cert, _ = certs
    client, server = sessions
    path = tmp_path / "crl.pem"
    path.write_bytes(ca.sign_crl([_serial(client_cert)]))
    rev, metrics, _ = _revocation(path)
    reason = rev.admit(FakeConn(), server, "destination")  # the server judges the client
    assert reason is not None and str(_serial(client_cert)) in reason
    assert rev.admit(FakeConn(), client, "source") is None  # the server's cert is fine
    assert len(rev) == 1
    assert _rejections(metrics, "destination") == 1
    assert _rejections(metrics, "source") == 0


async def test_a_new_crl_tears_down_live_connections_of_revoked_peers_only(
    tmp_path: Path,
    ca: FakeCA,
    certs: tuple[WorkloadCertificate, WorkloadCertificate],
    sessions: tuple[ssl.SSLSocket, ssl.SSLSocket],
) -> None:
    client_cert, _ = certs
    client, server = sessions
    path = tmp_path / "crl.pem"
    path.write_bytes(b"")
    rev, metrics, trackers = _revocation(path)
    inbound, outbound = FakeConn(), FakeConn()
    assert rev.admit(inbound, server, "destination") is None
    assert rev.admit(outbound, client, "source") is None
    leg = TunnelLeg(lambda _: None)
    leg.bind_stream(inbound, 1)
    tracked = Tracked(
        flow=_Flow(leg),
        labels=m.TrafficLabels(reporter="destination"),
        src_addr="10.0.0.1:1",
        dst_addr="10.0.0.2:2",
    )
    trackers[0].opened(tracked)
    path.write_bytes(ca.sign_crl([_serial(client_cert)]))
    assert rev.load()
    assert rev.recheck() == 1
    assert inbound.aborted and not outbound.aborted
    assert (tracked.response_flags, tracked.error) == (REVOKED_FLAG, REVOKED_ERROR)
    assert _rejections(metrics, "destination") == 1
    assert len(rev) == 1  # the outbound one is still tracked
    assert rev.recheck() == 0  # each connection is torn down once


class _Flow:
    def __init__(self, leg: TunnelLeg) -> None:
        self.leg = leg
        self.received = 0
        self.sent = 0

    def abort(self) -> None:
        pass


def test_a_missing_or_broken_file_keeps_the_revocations_in_force(
    tmp_path: Path, ca: FakeCA, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crl.pem"
    caplog.set_level(logging.WARNING)
    rev, _, _ = _revocation(path)  # missing at start: nothing revoked, a warning
    assert rev.crl.revoked == 0
    assert any("CRL_PATH" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)
    path.write_bytes(ca.sign_crl([7, 8]))
    assert rev.load() and rev.crl.revoked == 2
    path.write_bytes(b"garbage")
    assert not rev.load()
    assert rev.crl.revoked == 2
    path.unlink()
    assert not rev.load()
    assert rev.crl.revoked == 2
    path.write_bytes(b"")
    assert rev.load() and rev.crl.revoked == 0


async def test_watch_applies_a_settled_edit(tmp_path: Path, ca: FakeCA) -> None:
    path = tmp_path / "crl.pem"
    path.write_bytes(b"")
    rev, _, _ = _revocation(path)
    task = asyncio.get_running_loop().create_task(rev.watch())
    try:
        tmp = tmp_path / "crl.tmp"
        tmp.write_bytes(ca.sign_crl([1, 2, 3]))
        tmp.replace(path)  # as a ConfigMap update swaps the file
        async with asyncio.timeout(10):
            while True:
                if rev.crl.revoked == 3:
                    break
                await asyncio.sleep(0.05)
    finally:
        task.cancel()


async def test_disabled_without_crl_path(sessions: tuple[ssl.SSLSocket, ssl.SSLSocket]) -> None:
    rev, metrics, _ = _revocation(None)
    assert not rev.enabled
    assert rev.admit(FakeConn(), sessions[1], "destination") is None
    assert len(rev) == 0
    assert metrics.take_push().counters == ()


def test_a_worker_without_crl_path_never_loads_x509_parsing() -> None:
    # `cryptography.x509` costs ~9 MB of RSS per worker process; only CRL checking needs it.
    code = "import sys, workers.worker; print('cryptography.x509' in sys.modules)"
    argv = [sys.executable, "-c", code]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
