"""ZDS end to end: the ZDS client against the fake istio-cni with real pod namespaces.

Each test gets a node namespace and pods named `ztzds-<pid>-…`, all removed afterwards
(and left-overs of dead runs removed first). ztunnel itself is not started: the client
drives a recording PodHandler, and the redirection test plays ztunnel's listeners with
sockets created through `NetnsExecutor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controlplane.cni import FakeCNI, Pod
from ztunnel import netns
from ztunnel.core import zds
from ztunnel.core.config import WorkloadInfo
from ztunnel.supervisor.zds import ZDSClient

pytestmark = pytest.mark.timeout(20)

PREFIX = f"ztzds-{os.getpid()}-"
NODE_IP = "198.18.0.1"
SO_ORIGINAL_DST = 80
_seq = itertools.count()
_STALE = re.compile(r"^ztzds-(\d+)-")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=15)


def _ip_quiet(*args: str) -> None:
    subprocess.run(["ip", *args], check=False, capture_output=True, timeout=15)


def _remove_stale() -> None:
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir("/run/netns"):
            m = _STALE.match(name)
            if m and not os.path.exists(f"/proc/{m.group(1)}"):
                _ip_quiet("netns", "del", name)


def _ours() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(PREFIX))
    return []


class RecordingHandler:
    """A PodHandler that keeps a dup of each netns fd, as the supervisor's will."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.infos: dict[str, WorkloadInfo] = {}
        self.calls: list[tuple[str, str]] = []

    async def add(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        self.calls.append(("add", uid))
        self.running[uid] = os.dup(netns_fd)
        self.infos[uid] = info

    async def delete(self, uid: str) -> None:
        self.calls.append(("delete", uid))
        os.close(self.running.pop(uid))

    def known(self) -> set[str]:
        return set(self.running)

    def netns_of(self, uid: str) -> netns.NetnsID:
        return netns.netns_id(self.running[uid])


@dataclass
class Node:
    name: str
    cni: FakeCNI
    handler: RecordingHandler = field(default_factory=RecordingHandler)
    readiness: list[bool] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def start_client(self) -> ZDSClient:
        client = ZDSClient(self.cni.uds_path, self.handler, readiness_pending=self.readiness.append)
        self.task = asyncio.create_task(client.run())
        await self.cni.wait_snapshots(1)
        return client

    async def until(self, cond: object, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        assert callable(cond)
        async with asyncio.timeout(timeout):
            while not cond():  # noqa: ASYNC110 (polls plain attributes)
                await asyncio.sleep(0.005)

    async def pod(self, name: str, ip: str, uid: str | None = None) -> Pod:
        return await self.cni.create_pod(name, "default", f"{name}-sa", ip, uid=uid)


def _pod_id(pod: Pod) -> netns.NetnsID:
    st = os.stat(pod.netns_path)
    return netns.NetnsID(st.st_dev, st.st_ino)


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    _remove_stale()
    n = next(_seq)
    name = f"{PREFIX}node{n}"
    _ip("netns", "add", name)
    cni = FakeCNI(str(tmp_path / "zds.sock"), netns_prefix=f"{PREFIX}{n}-", node_netns=name)
    node = Node(name, cni)
    try:
        _ip("-n", name, "link", "set", "lo", "up")
        _ip("-n", name, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        await cni.start()
        yield node
    finally:
        if node.task is not None:
            node.task.cancel()
            await asyncio.gather(node.task, return_exceptions=True)
        await cni.close()
        zds.close_fds(node.handler.running.values())
        await asyncio.to_thread(_ip_quiet, "netns", "del", name)
    assert [ns for ns in _ours() if ns.startswith(f"{PREFIX}{n}-")] == []


async def test_snapshot_reconcile_drops_pods_not_resent_and_keeps_the_rest(node: Node) -> None:
    a = await node.pod("a", "198.18.1.10")
    b = await node.pod("b", "198.18.1.11")
    await node.start_client()
    assert node.cni.hellos == [1]
    assert sorted(node.handler.known()) == sorted([a.uid, b.uid])
    assert node.handler.infos[a.uid] == WorkloadInfo("a", "default", "a-sa")
    assert node.handler.netns_of(a.uid) == _pod_id(a)
    assert [(r.kind, r.error) for r in node.cni.acks] == [
        ("add", ""),
        ("add", ""),
        ("snapshot", ""),
    ]
    await node.until(lambda: node.readiness == [True, False])

    # A delete the client never hears of, then the node agent restarts.
    await node.cni.delete_pod("a", notify=False)
    await node.cni.disconnect()
    await node.cni.wait_snapshots(2)
    await node.until(lambda: node.handler.known() == {b.uid})
    assert node.handler.calls == [("add", a.uid), ("add", b.uid), ("delete", a.uid)]
    assert node.readiness == [True, False, True, False]


async def test_pods_added_and_deleted_after_the_snapshot(node: Node) -> None:
    await node.start_client()
    c = await node.pod("c", "198.18.1.12")
    assert node.cni.acks[-1].kind == "add" and node.cni.acks[-1].error == ""
    assert node.handler.netns_of(c.uid) == _pod_id(c)
    await node.cni.delete_pod("c")
    assert node.cni.acks[-1].kind == "del" and node.cni.acks[-1].error == ""
    assert node.handler.calls == [("add", c.uid), ("delete", c.uid)]
    assert node.readiness[-1] is False


async def test_new_netns_for_a_known_uid_replaces_the_proxy(node: Node) -> None:
    a = await node.pod("a", "198.18.1.10")
    await node.start_client()
    old = node.handler.netns_of(a.uid)
    # The sandbox is re-created (a CNI failure elsewhere): same uid, fresh netns.
    await node.cni.delete_pod("a", notify=False)
    a2 = await node.pod("a", "198.18.1.10", uid=a.uid)
    assert node.handler.calls == [("add", a.uid), ("delete", a.uid), ("add", a.uid)]
    assert node.handler.netns_of(a.uid) == _pod_id(a2) != old


@pytest.mark.parametrize(
    "case",
    ["extra fd", "missing fd", "garbage payload", "pipe as netns", "fd on del"],
)
async def test_malformed_messages_are_nacked_and_every_fd_closed(node: Node, case: str) -> None:
    a = await node.pod("a", "198.18.1.10")
    await node.start_client()
    await node.until(lambda: node.readiness[-1:] == [False])
    ns1, ns2 = a.open_netns(), a.open_netns()
    r, w = os.pipe()
    add = zds.encode_add("intruder", WorkloadInfo("x", "default", "x-sa"))
    payload, fds, error = {
        "extra fd": (add, [ns1, ns2], "failure to read message : Expected 1 FD, got 2"),
        "missing fd": (add, [], "failure to read message : No control message"),
        "garbage payload": (b"\x0a\xff\xff\xff", [ns1], "failure to read message : failed to"),
        "pipe as netns": (add, [r], "failure to start proxy : fd "),
        "fd on del": (zds.encode_del(a.uid), [ns1], "failure to read message : Unexpected"),
    }[case]
    before = _fd_count()
    try:
        answer = await node.cni.send_raw(payload, fds)
    finally:
        zds.close_fds([ns1, ns2, r, w])
    assert answer is not None and answer.startswith(error), answer
    if error.startswith("failure to read message"):
        # Dropped, re-established, and the re-sent pod kept without a second start.
        await node.cni.wait_snapshots(2)
        await node.until(lambda: node.readiness[-1:] == [False])
        assert node.readiness[-3:] == [False, True, False]
    assert node.handler.calls == [("add", a.uid)]
    assert _fd_count() == before - 4


def _orig_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack("!2xH4s8x", raw)
    return socket.inet_ntoa(addr), port


def _listen(port: int, host: str = "0.0.0.0") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(8)
    s.settimeout(5)
    return s


def _connect(addr: tuple[str, int], mark: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    if mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.connect(addr)
    return s


async def test_pod_traffic_is_redirected_to_ztunnel_ports_inside_the_pod(node: Node) -> None:
    pod = await node.pod("web", "198.18.1.20")
    pod_fd = pod.open_netns()
    node_fd = os.open(f"/run/netns/{node.name}", os.O_RDONLY | os.O_CLOEXEC)
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, pod_fd)
        stack.callback(os.close, node_fd)
        in_pod = stack.enter_context(netns.NetnsExecutor(pod_fd, name="pod"))
        on_node = stack.enter_context(netns.NetnsExecutor(node_fd, name="node"))
        inbound = stack.enter_context(await in_pod.run(_listen, 15006))
        hbone = stack.enter_context(await in_pod.run(_listen, 15008))
        outbound = stack.enter_context(await in_pod.run(_listen, 15001))
        upstream = stack.enter_context(await on_node.run(_listen, 9090, NODE_IP))

        # Inbound plaintext to any pod port lands on 15006 with the original destination.
        c1 = stack.enter_context(await on_node.run(_connect, (pod.ip, 8080)))
        got, _ = await asyncio.to_thread(inbound.accept)
        with got:
            assert _orig_dst(got) == (pod.ip, 8080)
            assert got.getpeername()[0] == NODE_IP
        del c1
        # HBONE on 15008 is not redirected.
        stack.enter_context(await on_node.run(_connect, (pod.ip, 15008)))
        got, _ = await asyncio.to_thread(hbone.accept)
        got.close()
        # The app's own outbound TCP goes to 15001 ...
        stack.enter_context(await in_pod.run(_connect, (NODE_IP, 9090)))
        got, _ = await asyncio.to_thread(outbound.accept)
        with got:
            assert _orig_dst(got) == (NODE_IP, 9090)
        # ... while ztunnel's (SO_MARK 1337) leaves the pod untouched.
        stack.enter_context(await in_pod.run(_connect, (NODE_IP, 9090), 0x539))
        got, peer = await asyncio.to_thread(upstream.accept)
        with got:
            assert peer[0] == pod.ip
    rules = await asyncio.to_thread(
        subprocess.run,
        ["ip", "-n", pod.netns, "rule", "show"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "fwmark 0x111/0xfff lookup 100" in rules.stdout


async def test_pods_on_one_node_reach_each_other_through_the_node(node: Node) -> None:
    a = await node.pod("a", "198.18.1.10")
    b = await node.pod("b", "198.18.1.11")
    a_fd, b_fd = a.open_netns(), b.open_netns()
    with contextlib.ExitStack() as stack:
        stack.callback(os.close, a_fd)
        stack.callback(os.close, b_fd)
        in_a = stack.enter_context(netns.NetnsExecutor(a_fd))
        in_b = stack.enter_context(netns.NetnsExecutor(b_fd))
        hbone = stack.enter_context(await in_b.run(_listen, 15008))
        # ztunnel in pod a (marked) dialing pod b's HBONE port, as an outbound tunnel does.
        stack.enter_context(await in_a.run(_connect, (b.ip, 15008), 0x539))
        got, peer = await asyncio.to_thread(hbone.accept)
        with got:
            assert peer[0] == a.ip
