"""TLS handshakes that never finish on 15008 (hardening §4.3, P1 "slowloris").

Hundreds of clients connect to the HBONE port and never send a ClientHello (or stop after a
few bytes of one). A real client must still get through at once, and ztunnel must close
every stalled connection by its handshake timeout (10 s, upstream's), giving their file
descriptors back.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.integration.harness import LOCALHOST, EchoServer
from tests.integration.hbone_client import HBONEStream, mint

IDLE = 400
HANDSHAKE_TIMEOUT = 10.0  # workers.inbound.HANDSHAKE_TIMEOUT
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


def _open_fds(pids: list[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


@pytest.mark.timeout(90)
def test_stalled_handshakes_do_not_block_others_and_are_closed(  # type: ignore[no-untyped-def]
    ztunnel,
) -> None:
    zt = ztunnel(workers=2)
    workers = zt.wait_for_workers(2)
    before = _open_fds(workers)
    stalled: list[socket.socket] = []
    try:
        for i in range(IDLE):
            sock = socket.create_connection((LOCALHOST, 15008), timeout=5)
            if i % 2:
                sock.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, no more
            sock.setblocking(False)
            stalled.append(sock)
        opened = time.monotonic()

        # A real HBONE client is served while they wait.
        with EchoServer(LOCALHOST) as echo:
            started = time.monotonic()
            stream = HBONEStream(LOCALHOST, 15008, mint(CLIENT))
            try:
                assert stream.connect(f"{LOCALHOST}:{echo.port}") == 200
                stream.send(b"still served")
                assert stream.recv_exactly(12, timeout=5) == b"still served"
            finally:
                stream.close()
            assert time.monotonic() - started < 2.0

        # Every stalled connection is closed by the handshake timeout, not much later.
        deadline = opened + HANDSHAKE_TIMEOUT + 5.0
        open_ones = list(stalled)
        while open_ones and time.monotonic() < deadline:
            open_ones = [s for s in open_ones if not _closed_by_peer(s)]
            time.sleep(0.2)
        assert not open_ones, f"{len(open_ones)} of {IDLE} stalled handshakes still open"
        assert time.monotonic() - opened >= HANDSHAKE_TIMEOUT - 1.0  # not cut before the timeout
    finally:
        for sock in stalled:
            sock.close()
    # Their descriptors are given back.
    deadline = time.monotonic() + 5.0
    while _open_fds(workers) > before + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _open_fds(workers) <= before + 5, (before, _open_fds(workers))
