"""The namespace fixture library itself: isolation, addressing limits and teardown."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import netns
import pytest
from netns import NetnsError, Network

pytestmark = pytest.mark.timeout(30)


def _netns_inode() -> int:
    return os.stat(f"/proc/self/task/{_gettid()}/ns/net").st_ino


def _gettid() -> int:
    return int(os.readlink("/proc/thread-self").rsplit("/", 1)[1])


def test_callables_run_inside_the_namespace_and_the_caller_stays_outside(
    network: Network,
) -> None:
    ns = network.node("x")
    expected = os.stat(f"{netns.NETNS_DIR}/{ns.name}").st_ino
    assert ns.call(_netns_inode) == expected
    assert _netns_inode() != expected


def test_veth_link_carries_tcp_between_two_namespaces(network: Network) -> None:
    a, b = network.node("a"), network.node("b")
    network.link(a, "198.18.0.1/24", b, "198.18.0.2/24")
    listener = b.call(socket.create_server, ("198.18.0.2", 0))
    port = listener.getsockname()[1]
    with listener, a.call(socket.create_connection, ("198.18.0.2", port), 5.0) as client:
        listener.settimeout(5.0)
        served, peer = listener.accept()
        with served:
            client.sendall(b"ping")
            assert served.recv(4) == b"ping"
        assert peer[0] == "198.18.0.1"


def test_addresses_outside_the_benchmark_and_test_net_ranges_are_refused(
    network: Network,
) -> None:
    a, b = network.node("a"), network.node("b")
    with pytest.raises(NetnsError, match="outside"):
        network.link(a, "10.0.0.1/24", b, "10.0.0.2/24")


def test_closing_removes_namespaces_and_kills_their_processes() -> None:
    with Network() as net:
        ns = net.node("gone")
        proc = ns.popen(["sleep", "60"])
        assert ns.name in netns.list_namespaces()
    assert ns.name not in netns.list_namespaces()
    assert proc.poll() is not None


def test_namespaces_of_a_dead_run_are_removed_and_live_ones_kept() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    stale = f"{netns.ROOT_PREFIX}{dead.stdout.strip()}-left-behind"
    with Network() as net:
        mine = net.node("mine")
        subprocess.run([netns.ip_binary() or "ip", "netns", "add", stale], check=True)
        try:
            removed = netns.remove_stale()
            assert stale in removed
            assert mine.name not in removed
            assert mine.name in netns.list_namespaces()
        finally:
            subprocess.run(
                [netns.ip_binary() or "ip", "netns", "del", stale],
                check=False,
                capture_output=True,
            )
