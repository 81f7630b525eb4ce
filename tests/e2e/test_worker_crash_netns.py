"""A worker that dies with connections still in its accept queue (hardening P2.1).

Workers share each listening port with SO_REUSEPORT; the kernel spreads new connections over
their listeners by hash and completes handshakes before any worker accepts. If a worker dies,
the connections waiting in its queue are reset, unless net.ipv4.tcp_migrate_req=1 (set by
ztunnel in every netns it listens in, ZTUNNEL_LISTENER_MIGRATION) moves them to a live
listener. Here one of two workers is stopped (SIGSTOP), forty SOCKS5 clients connect, and
the stopped worker is killed: with migration every client is served, without it the ones
queued on the victim fail. Each ztunnel runs in a namespace of its own, so the sysctl never
touches the host.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from pathlib import Path

import pytest
from mesh import EchoServer, NodeZtunnel, WorkloadSpec, private_ca_dir, write_local_config
from netns import Netns, Network

pytestmark = pytest.mark.timeout(90)

SOCKS5_PORT = 15080
ECHO_PORT = 7070
CLIENTS = 40
WORKLOAD = WorkloadSpec("client", "198.18.0.9", "node-a")  # the SOCKS5 source, by info


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return found


def _workers(zt: NodeZtunnel) -> list[int]:
    pids = []
    for pid in _children(zt.proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"workers" in argv:
            pids.append(pid)
    return sorted(pids)


def _socks5_request(ns: Netns) -> socket.socket:
    """Connect and send the whole SOCKS5 exchange at once: it waits in the socket buffer."""
    sock: socket.socket = ns.call(socket.create_connection, ("127.0.0.1", SOCKS5_PORT), 5.0)
    target = socket.inet_aton("127.0.0.1") + struct.pack("!H", ECHO_PORT)
    sock.sendall(b"\x05\x01\x00" + b"\x05\x01\x00\x01" + target)
    return sock


def _served(sock: socket.socket) -> bool:
    """The SOCKS5 replies arrive and a message echoes back."""
    sock.settimeout(10.0)
    try:
        replies = b""
        while len(replies) < 2 + 10:
            chunk = sock.recv(12 - len(replies))
            if not chunk:
                return False
            replies += chunk
        if replies[:2] != b"\x05\x00" or replies[3] != 0:
            return False
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False
    finally:
        sock.close()


def _crash_one_worker_with_a_full_queue(
    network: Network, tmp_path: Path, *, migration: bool
) -> tuple[int, str]:
    """Failed clients out of CLIENTS, and the namespace's tcp_migrate_req."""
    ns = network.node("crash")
    config = write_local_config(tmp_path / "local.yaml", [WORKLOAD])
    with private_ca_dir() as (ca_dir, _):
        zt = NodeZtunnel.dedicated(
            ns,
            WORKLOAD,
            config,
            ca_dir,
            extra={
                "UNSTABLE_ENABLE_SOCKS5": "true",
                "ZTUNNEL_LISTENER_MIGRATION": "true" if migration else "false",
            },
        )
        echo = EchoServer(ns, "127.0.0.1", ECHO_PORT)
        try:
            zt.wait_ready()
            workers = _workers(zt)
            assert len(workers) == 2, workers
            victim = workers[1]
            os.kill(victim, signal.SIGSTOP)
            try:
                clients = [_socks5_request(ns) for _ in range(CLIENTS)]
            finally:
                os.kill(victim, signal.SIGKILL)
            failed = sum(not _served(sock) for sock in clients)
            sysctl: str = ns.call(
                lambda: Path("/proc/sys/net/ipv4/tcp_migrate_req").read_text().strip()
            )
            return failed, sysctl
        finally:
            echo.close()
            zt.kill()


def test_a_killed_workers_queued_connections_are_served_by_the_other(
    network: Network, tmp_path: Path
) -> None:
    failed, sysctl = _crash_one_worker_with_a_full_queue(network, tmp_path, migration=True)
    assert sysctl == "1"
    assert failed == 0, f"{failed} of {CLIENTS} clients queued on the killed worker were reset"


def test_without_migration_the_queued_connections_are_lost(
    network: Network, tmp_path: Path
) -> None:
    """The control: proves the clients above really queued on the killed worker."""
    started = time.monotonic()
    failed, sysctl = _crash_one_worker_with_a_full_queue(network, tmp_path, migration=False)
    assert sysctl == "0"
    # SO_REUSEPORT hashes 40 connections over two listeners: some land on the victim.
    assert 0 < failed < CLIENTS, failed
    assert time.monotonic() - started < 60
