"""Shared (in-pod) mode across two nodes: two pods per node, one ztunnel per node.

Two "node" namespaces N1 (198.18.0.1) and N2 (198.18.0.2) are joined by a veth pair and
route each other's pod subnet (198.18.1.0/24 lives on N1, 198.18.2.0/24 on N2). Each node
runs a shared-mode ztunnel (two workers, its own NODE_NAME) and a fake istio-cni
(`controlplane.cni.FakeCNI`) that creates the node's pods (a netns per pod, a veth to the
node, the in-pod redirection rules) and hands them to that ztunnel over ZDS. Both ztunnels
read the same local config listing every pod as an HBONE workload, and share one private
FAKE_CA_DIR, so each trusts the other's certificates.

    N1: a1 198.18.1.10, a2 198.18.1.11        N2: b1 198.18.2.10, b2 198.18.2.11

Every pod runs an echo server on 8080. A connection a1 -> b1 is captured into ztunnel's
15001 inside a1, leaves a1 as HBONE to b1's 15008 (served by N2's ztunnel inside b1) and
is delivered to b1's echo server; a1 -> a2 takes the same path without leaving N1.

Beyond traffic: malformed ZDS input while pods serve, the node agent restarting (snapshot
reconcile without dropping connections), DelWorkload with a connection crossing nodes, and
measurements (start latency of a pod's listeners, memory per pod) printed for docs/inpod.md
(run with `-s -k measure` to see them).

The fake CNIs run on an event loop of their own (a thread), so tests can block.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import json
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from mesh import (
    IO_TIMEOUT,
    WORKERS,
    EchoServer,
    HarnessError,
    HTTPReply,
    LogKeeper,
    LoopThread,
    NodeZtunnel,
    WorkloadSpec,
    connect,
    digest,
    poll_until,
    recv_exact,
    send_and_drain,
    write_local_config,
)
from netns import PREFIX, Netns, Network, enter
from pyroute2 import DiagSocket
from test_shared_mode import READY_WORKLOADS

from controlplane.cni import FakeCNI, Pod
from ztunnel.core import zds
from ztunnel.core.config import WorkloadInfo
from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(90)

T = TypeVar("T")

ECHO_PORT = 8080
POD_PORTS = (15001, 15006, 15008, 15053)  # outbound, plaintext inbound, HBONE, DNS
TCP_LISTEN = 10  # linux/tcp_states.h
CLOSE_WITHIN = 3.0  # seconds for ztunnel to cut a removed pod's connections


@dataclass(frozen=True, slots=True)
class NodeSpec:
    key: str  # "n1", "n2": netns label and socket name
    name: str  # NODE_NAME
    ip: str
    pod_subnet: str


N1 = NodeSpec("n1", "node-1", "198.18.0.1", "198.18.1.0/24")
N2 = NodeSpec("n2", "node-2", "198.18.0.2", "198.18.2.0/24")
A1 = WorkloadSpec("a1", "198.18.1.10", N1.name, canonical_name="alpha", canonical_revision="v1")
A2 = WorkloadSpec("a2", "198.18.1.11", N1.name, canonical_name="alpha", canonical_revision="v2")
B1 = WorkloadSpec("b1", "198.18.2.10", N2.name, canonical_name="beta", canonical_revision="v1")
B2 = WorkloadSpec("b2", "198.18.2.11", N2.name, canonical_name="beta", canonical_revision="v2")
PODS = {N1.key: (A1, A2), N2.key: (B1, B2)}
SPECS = {spec.name: spec for specs in PODS.values() for spec in specs}

# Extra node-1 workloads for the measurements; they have no pod until the test creates one.
MEASURE_PODS = 50
MEASURE_LATENCY_PODS = 10
EXTRA = [
    WorkloadSpec(f"m{i:02d}", f"198.18.1.{100 + i}", N1.name, canonical_name="measure")
    for i in range(MEASURE_PODS)
]


@dataclass
class Node:
    spec: NodeSpec
    ns: Netns
    uds: str
    cni: FakeCNI
    zt: NodeZtunnel
    pods: dict[str, Pod]  # by pod name, as created (also those since dropped)

    def admin_json(self, path: str) -> Any:
        reply = self.zt.http_get(self.zt.ports.admin, path)
        assert reply.status == 200, reply
        return json.loads(reply.body)

    def workload_state(self) -> dict[str, Any]:
        state: dict[str, Any] = self.admin_json("/config_dump")["workloadState"]
        return state


@dataclass
class Cluster:
    loop: LoopThread
    nodes: dict[str, Node]
    pod_ns: dict[str, Netns]  # every pod's netns, by pod name
    servers: list[EchoServer]

    def add_pod(self, node: Node, spec: WorkloadSpec, label: str | None = None) -> Pod:
        """A new pod on `node`, announced to its ztunnel, with an echo server on 8080."""
        pod = self.loop.run(node.cni.create_pod(spec.name, spec.namespace, spec.sa, spec.ip))
        node.pods[spec.name] = pod
        _no_proxy_arp_delay(node.ns, pod)
        ns = self.pod_ns[label or spec.name] = Netns(pod.netns, label or spec.name)
        self.servers.append(EchoServer(ns, spec.ip, ECHO_PORT))
        return pod

    def connect(self, pod: str, host: str, port: int = ECHO_PORT) -> socket.socket:
        """A connection made by an app inside `pod` (the pod's capture rules apply)."""
        return connect(self.pod_ns[pod], host, port)

    def new_cni(self, node: Node) -> FakeCNI:
        """A FakeCNI for `node` (same socket, same pod naming), not yet serving."""
        return self.loop.run(_make_cni(node.uds, node.spec, node.ns))


async def _make_cni(uds: str, spec: NodeSpec, ns: Netns) -> FakeCNI:
    return FakeCNI(uds, netns_prefix=f"{PREFIX}{spec.key}p-", node_netns=ns.name)


def _no_proxy_arp_delay(node: Netns, pod: Pod) -> None:
    """The node answers the pod's ARP requests (proxy ARP) at once, not after a random delay
    of up to `proxy_delay` (0.8 s by default): else the first connection to or from every
    new address stalls, which would dominate the timings here."""
    node.run("sysctl", "-qw", f"net.ipv4.neigh.{pod.node_ifname}.proxy_delay=0")


def _readiness(zt: NodeZtunnel) -> HTTPReply | None:
    with contextlib.suppress(OSError):
        return zt.http_get(zt.ports.readiness, "/healthz/ready", timeout=1.0)
    return None


@pytest.fixture
def cluster(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[Cluster]:
    ca_dir, _ = fake_ca
    n1, n2 = network.node(N1.key), network.node(N2.key)
    network.link(n1, f"{N1.ip}/24", n2, f"{N2.ip}/24")
    n1.run("ip", "route", "add", N2.pod_subnet, "via", N2.ip)
    n2.run("ip", "route", "add", N1.pod_subnet, "via", N1.ip)
    config = write_local_config(tmp_path / "local.yaml", [*SPECS.values(), *EXTRA])
    loop = LoopThread()
    nodes: dict[str, Node] = {}
    cnis: list[FakeCNI] = []
    pod_ns: dict[str, Netns] = {}
    servers: list[EchoServer] = []
    try:
        for spec, ns in ((N1, n1), (N2, n2)):
            uds = str(tmp_path / f"{spec.key}.sock")
            cni = loop.run(_make_cni(uds, spec, ns))
            cnis.append(cni)
            pods: dict[str, Pod] = {}
            for w in PODS[spec.key]:
                pods[w.name] = loop.run(cni.create_pod(w.name, w.namespace, w.sa, w.ip))
                _no_proxy_arp_delay(ns, pods[w.name])
                pod_ns[w.name] = Netns(pods[w.name].netns, w.name)
                servers.append(EchoServer(pod_ns[w.name], w.ip, ECHO_PORT))
            env = {
                "PROXY_MODE": "shared",
                "INPOD_UDS": uds,
                "FAKE_CA": "true",
                "FAKE_CA_DIR": ca_dir,
                "XDS_ADDRESS": "",
                "LOCAL_XDS_PATH": str(config),
                "NODE_NAME": spec.name,
                "ZTUNNEL_WORKERS": str(WORKERS),
                "LOG_FORMAT": "json",
                "UNSTABLE_ENABLE_SOCKS5": "false",
            }
            zt = ztunnel_logs.add(spec.key, NodeZtunnel(ns, env))
            nodes[spec.key] = Node(spec, ns, uds, cni, zt, pods)
        for node in nodes.values():
            loop.run(node.cni.start())
        for node in nodes.values():
            loop.run(node.cni.wait_snapshots(1, timeout=30.0), timeout=35.0)
            node.zt.wait_ready()
        yield Cluster(loop, nodes, pod_ns, servers)
    finally:
        for node in nodes.values():
            node.zt.kill()
        for server in servers:
            server.close()
        for cni in {id(c): c for c in [*cnis, *(n.cni for n in nodes.values())]}.values():
            with contextlib.suppress(Exception):
                loop.run(cni.close(), timeout=60.0)
        loop.close()
        for ns in pod_ns.values():
            ns.close()


# ---------------------------------------------------------------------------------------------
# Helpers


def _listeners(ns: Netns) -> collections.Counter[int]:
    """{port: listening TCP sockets} inside `ns`, from `ss -ltnH`."""
    ports: collections.Counter[int] = collections.Counter()
    for line in ns.ss("-ltnH").splitlines():
        cols = line.split()
        if len(cols) >= 4:
            ports[int(cols[3].rsplit(":", 1)[1])] += 1
    return ports


def _echo(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data)) == data


def _round_trip(cluster: Cluster, pod: str, host: str, payload: bytes) -> str:
    """One connection from `pod` to `host`:8080 echoing `payload`; the client's address."""
    with cluster.connect(pod, host) as sock:
        received, clean_eof = send_and_drain(sock, payload)
        client = "{}:{}".format(*sock.getsockname())
    assert len(received) == len(payload) and digest(received) == digest(payload)
    assert clean_eof
    return client


def _wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer ends `sock` (EOF or reset)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionError):
        while sock.recv(65536):
            pass
    return time.monotonic() - start


def _fd_targets(pid: int) -> list[str]:
    targets = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                targets.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return targets


def _netns_fds(pid: int) -> collections.Counter[str]:
    """How many fds `pid` holds on each network namespace (by /run/netns path or inode)."""
    return collections.Counter(
        t for t in _fd_targets(pid) if t.startswith(("/run/netns/", "net:["))
    )


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (live ones)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if not os.path.exists(f"/proc/{p}"):
            continue
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
    return out


def _status(pid: int, key: str) -> int:
    """A number from /proc/<pid>/status (VmRSS in KiB, Threads); 0 if absent (a zombie)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    return 0


def _role(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().split(b"\0") if a]
    if "--index" in argv:
        return f"worker{argv[argv.index('--index') + 1]}"
    return "supervisor"


def _memory(zt: NodeZtunnel, key: str = "VmRSS") -> dict[str, int]:
    """RSS in KiB (or another status number) of every ztunnel process, by role."""
    return {_role(pid): _status(pid, key) for pid in _process_tree(zt.proc.pid)}


def _poll_listening(want: collections.Counter[int], timeout: float) -> float:
    """Runs inside a pod: time.monotonic() once every port of `want` has its listeners.

    Asks the kernel over sock_diag (what `ss` does; reading /proc/net/tcp walks the whole
    host's socket table and takes milliseconds), every half millisecond.
    """
    deadline = time.monotonic() + timeout
    with DiagSocket() as diag:
        diag.bind()
        while time.monotonic() < deadline:
            have: collections.Counter[int] = collections.Counter()
            for family in (socket.AF_INET, socket.AF_INET6):
                for entry in diag.get_sock_stats(family=family, states=1 << TCP_LISTEN):
                    have[entry["idiag_sport"]] += 1
            if all(have[port] >= count for port, count in want.items()):
                return time.monotonic()
            time.sleep(0.0005)
    raise HarnessError(f"listeners {dict(want)} not up within {timeout}s")


def _run_in(netns_name: str, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
    """`fn(*args)` on a new thread inside the namespace `netns_name`."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def body() -> None:
        try:
            enter(netns_name)
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=body, daemon=True, name=f"in-{netns_name}").start()
    return future


def _hello(host: str, port: int) -> None:
    """One short echo exchange (run inside a pod)."""
    with socket.create_connection((host, port), IO_TIMEOUT) as sock:
        sock.settimeout(IO_TIMEOUT)
        _echo(sock, b"hello")


def _percentiles(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return (
        f"median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms "
        f"(n={len(ms)})"
    )


# ---------------------------------------------------------------------------------------------
# Traffic


def test_two_nodes_two_pods_each_pod_to_pod_across_and_within_nodes(cluster: Cluster) -> None:
    # Every worker of the node's ztunnel listens inside every pod (SO_REUSEPORT).
    for node in cluster.nodes.values():
        for name in node.pods:
            ports = _listeners(cluster.pod_ns[name])
            for port in POD_PORTS:
                assert ports[port] >= WORKERS, f"{name}: {port} has {ports[port]} listeners"
            for port in POD_PORTS[:3]:  # one wildcard socket per worker
                assert ports[port] == WORKERS, f"{name}: {dict(ports)}"
        assert node.zt.metric("workload_manager_active_proxy_count") == 2
        assert {v["info"]["name"] for v in node.workload_state().values()} == set(node.pods)

    n1, n2 = cluster.nodes[N1.key], cluster.nodes[N2.key]

    # Across nodes: a1 (N1) -> b1 (N2), 1 MiB over HBONE.
    payload = os.urandom(1 << 20)
    client = _round_trip(cluster, "a1", B1.ip, payload)
    assert client.startswith(f"{A1.ip}:")
    out = n1.zt.wait_access(**{"src.addr": client, "direction": "outbound"})
    assert out.fields["src.workload"] == "a1"
    assert out.fields["src.identity"] == A1.identity
    assert out.fields["dst.workload"] == "b1"
    assert out.fields["dst.identity"] == B1.identity
    assert out.fields["dst.addr"] == f"{B1.ip}:15008"
    assert out.fields["dst.hbone_addr"] == f"{B1.ip}:{ECHO_PORT}"
    assert out.fields["bytes_sent"] == out.fields["bytes_recv"] == str(len(payload))
    inbound = n2.zt.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{B1.ip}:{ECHO_PORT}"}
    )
    assert inbound.fields["src.addr"].startswith(f"{A1.ip}:")
    assert inbound.fields["src.workload"] == "a1"
    assert inbound.fields["src.identity"] == A1.identity
    assert inbound.fields["dst.workload"] == "b1"
    assert inbound.fields["dst.identity"] == B1.identity
    assert inbound.fields["bytes_sent"] == inbound.fields["bytes_recv"] == str(len(payload))
    # N2 never saw an outbound connection, N1 no inbound one.
    assert not n2.zt.logs.find(lambda ln: ln.is_access() and ln.fields["direction"] == "outbound")
    assert not n1.zt.logs.find(lambda ln: ln.is_access() and ln.fields["direction"] == "inbound")

    # Within N1: a1 -> a2, both ends served by N1's ztunnel (in two different pods).
    small = os.urandom(64 * 1024)
    local = _round_trip(cluster, "a1", A2.ip, small)
    out = n1.zt.wait_access(**{"src.addr": local, "direction": "outbound"})
    assert (out.fields["src.identity"], out.fields["dst.identity"]) == (A1.identity, A2.identity)
    assert out.fields["dst.addr"] == f"{A2.ip}:15008"
    inbound = n1.zt.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{A2.ip}:{ECHO_PORT}"}
    )
    assert (inbound.fields["src.workload"], inbound.fields["dst.workload"]) == ("a1", "a2")
    assert inbound.fields["src.identity"] == A1.identity
    assert inbound.fields["dst.identity"] == A2.identity

    # And from the other side: b2 (N2) -> a2 (N1).
    back = _round_trip(cluster, "b2", A2.ip, b"the other way")
    out = n2.zt.wait_access(**{"src.addr": back, "direction": "outbound"})
    assert (out.fields["src.workload"], out.fields["dst.workload"]) == ("b2", "a2")

    def labels(src: WorkloadSpec, dst: WorkloadSpec, reporter: str) -> dict[str, str]:
        return {
            "reporter": reporter,
            "connection_security_policy": "mutual_tls",
            "source_workload": src.name,
            "source_workload_namespace": src.namespace,
            "source_principal": src.identity,
            "source_canonical_service": src.canonical_name,
            "source_canonical_revision": src.canonical_revision,
            "destination_workload": dst.name,
            "destination_workload_namespace": dst.namespace,
            "destination_principal": dst.identity,
            "destination_canonical_service": dst.canonical_name,
            "destination_canonical_revision": dst.canonical_revision,
            "request_protocol": "tcp",
        }

    for zt, src, dst, reporter, size in (
        (n1.zt, A1, B1, "source", len(payload)),
        (n2.zt, A1, B1, "destination", len(payload)),
        (n1.zt, A1, A2, "source", len(small)),
        (n1.zt, A1, A2, "destination", len(small)),
    ):
        want = labels(src, dst, reporter)
        zt.wait_metric("istio_tcp_connections_opened_total", 1, **want)
        zt.wait_metric("istio_tcp_connections_closed_total", 1, **want)
        zt.wait_metric("istio_tcp_received_bytes_total", size, **want)
        zt.wait_metric("istio_tcp_sent_bytes_total", size, **want)
    # a1 -> b1 is reported once per side: no destination report on N1, no source on N2.
    assert n1.zt.metric("istio_tcp_connections_opened_total", **labels(A1, B1, "destination")) == 0
    assert n2.zt.metric("istio_tcp_connections_opened_total", **labels(A1, B1, "source")) == 0
    n2.zt.wait_metric("istio_tcp_connections_opened_total", 1, **labels(B2, A2, "source"))
    n1.zt.wait_metric("istio_tcp_connections_opened_total", 1, **labels(B2, A2, "destination"))


# ---------------------------------------------------------------------------------------------
# Malformed ZDS input


def test_bad_fd_and_truncated_message_are_rejected_while_other_pods_keep_serving(
    cluster: Cluster,
) -> None:
    n1 = cluster.nodes[N1.key]
    a1, a2 = n1.pods["a1"], n1.pods["a2"]
    supervisor = n1.zt.proc.pid
    held = cluster.connect("a1", B1.ip)
    r, w = os.pipe()
    spare = a2.open_netns()
    try:
        _echo(held, b"before")
        pipe_target = os.readlink(f"/proc/self/fd/{r}")
        netns_fds = _netns_fds(supervisor)
        assert netns_fds == {a1.netns_path: 1, a2.netns_path: 1}  # one kept per pod

        def send(payload: bytes, fds: list[int]) -> str:
            answer = cluster.loop.run(n1.cni.send_raw(payload, fds))
            assert answer is not None, "no answer from ztunnel"
            return answer

        # A pipe instead of a netns, for a new pod and for a1 itself: NACKed, connection kept.
        intruder = WorkloadInfo("intruder", "default", "intruder")
        error = send(zds.encode_add("intruder-uid", intruder), [r])
        assert error.startswith("failure to start proxy : "), error
        error = send(zds.encode_add(a1.uid, a1.info), [w])
        assert error.startswith("failure to start proxy : "), error
        assert n1.cni.snapshots == 1 and n1.cni.connected
        reply = _readiness(n1.zt)
        assert reply is not None and reply.status == 200, reply
        assert n1.zt.metric("workload_manager_pending_proxy_count") == 0
        assert set(n1.workload_state()) == {a1.uid, a2.uid}
        _echo(held, b"after the pipes")

        # Truncated: an Add longer than ZDS's 1024-byte packets, with a real netns fd.
        long_add = zds.encode_add("x" * 1500, WorkloadInfo("long", "default", "long"))
        assert len(long_add) > zds.MAX_MESSAGE
        error = send(long_add, [spare])
        assert error == "failure to read message : received truncated message", error
        cluster.loop.run(n1.cni.wait_snapshots(2, timeout=15.0), timeout=20.0)
        _echo(held, b"after the truncated message")

        # Garbage: not a WorkloadRequest at all.
        error = send(b"\x0a\xff\xff\xff\x0f", [])
        assert error.startswith("failure to read message : failed to decode"), error
        cluster.loop.run(n1.cni.wait_snapshots(3, timeout=15.0), timeout=20.0)
        n1.zt.wait_ready()
        _echo(held, b"after everything")
    finally:
        held.close()
        for fd in (r, w, spare):
            os.close(fd)

    # Every reconnect re-sent both pods: same netns, so the proxies were kept as they were.
    assert [(a.kind, a.error) for a in n1.cni.acks[-3:]] == [
        ("add", ""),
        ("add", ""),
        ("snapshot", ""),
    ]
    assert n1.zt.metric("workload_manager_proxies_started_total") == 2
    assert n1.zt.metric("workload_manager_proxies_stopped_total") == 0
    assert n1.zt.metric("workload_manager_active_proxy_count") == 2
    assert set(n1.workload_state()) == {a1.uid, a2.uid}
    # Nothing received with the bad messages was kept.
    tree = _process_tree(supervisor)
    assert all(pipe_target not in _fd_targets(pid) for pid in tree)
    assert _netns_fds(supervisor) == netns_fds
    # New connections through both pods of N1, across and within the node.
    _round_trip(cluster, "a1", B2.ip, b"new across")
    _round_trip(cluster, "a2", B1.ip, b"new from a2")
    _round_trip(cluster, "a2", A1.ip, b"new within")
    assert len(n1.zt.logs.find(lambda ln: "bad ZDS message" in ln.message)) == 2


# ---------------------------------------------------------------------------------------------
# Node agent restart


def test_cni_socket_restart_resyncs_without_dropping_connections(cluster: Cluster) -> None:
    n1 = cluster.nodes[N1.key]
    zt = n1.zt
    a1 = n1.pods["a1"]
    held = cluster.connect("a1", B1.ip)
    doomed = cluster.connect("a2", B2.ip)  # a2 will not be re-sent
    with held, doomed:
        _echo(held, b"before")
        _echo(doomed, b"before")

        # The node agent goes away; its pods stay (a restart does not delete pods).
        old = n1.cni
        kept = {"a1": old.pods["a1"]}
        old.pods = {}
        cluster.loop.run(old.close())

        def not_ready() -> HTTPReply | None:
            reply = _readiness(zt)
            return reply if reply is not None and reply.status == 500 else None

        reply = poll_until(not_ready, 10.0, "readiness 500 without the node agent", 0.02)
        assert reply.body == f"not ready, pending: {READY_WORKLOADS}\n"
        # Proxies keep running without the node agent.
        _echo(held, b"while the node agent is away")
        _echo(doomed, b"while the node agent is away")
        _round_trip(cluster, "a1", B2.ip, b"new while away")
        assert zt.metric("workload_manager_active_proxy_count") == 2
        time.sleep(0.5)  # a few failed reconnects (backoff)
        assert not_ready() is not None

        # A new node agent on the same socket, which only knows a1.
        new = cluster.new_cni(n1)
        new.pods = dict(kept)
        n1.cni = new
        cluster.loop.run(new.start())
        cluster.loop.run(new.wait_snapshots(1, timeout=20.0), timeout=25.0)
        zt.wait_ready()
        assert [(a.kind, a.uid, a.error) for a in new.acks] == [
            ("add", a1.uid, ""),
            ("snapshot", "", ""),
        ]
        _echo(held, b"after the restart")
        # a2 was not re-sent: its proxy is gone, with its connection and listeners.
        assert _wait_closed(doomed, IO_TIMEOUT) < CLOSE_WITHIN

    assert set(n1.workload_state()) == {a1.uid}
    zt.wait_metric("workload_manager_active_proxy_count", 1)
    assert zt.metric("workload_manager_proxies_started_total") == 2  # a1 was kept, not restarted
    assert zt.metric("workload_manager_proxies_stopped_total") == 1
    ports = _listeners(cluster.pod_ns["a2"])
    assert not any(ports[p] for p in POD_PORTS), dict(ports)
    assert _listeners(cluster.pod_ns["a1"])[15001] == WORKERS
    _round_trip(cluster, "a1", B1.ip, b"new after the restart")
    assert zt.logs.find(lambda ln: "removing 1 pods not re-sent" in ln.message)


# ---------------------------------------------------------------------------------------------
# DelWorkload with a connection crossing nodes
# (test_shared_mode.py covers the same-node case: both pods on one node.)


def test_del_workload_with_an_open_connection_tears_it_down(cluster: Cluster) -> None:
    n1, n2 = cluster.nodes[N1.key], cluster.nodes[N2.key]
    to_b1 = cluster.connect("a1", B1.ip)  # b1 (destination, on N2) will be deleted
    from_a2 = cluster.connect("a2", B2.ip)  # a2 (source, on N1) will be deleted
    survivor = cluster.connect("a1", B2.ip)  # neither end is deleted
    with to_b1, from_a2, survivor:
        for sock in (to_b1, from_a2, survivor):
            _echo(sock, b"ping")

        # The destination pod goes: N2 cuts the inbound side, N1's client sees the end.
        cluster.loop.run(n2.cni.delete_pod("b1"))
        assert (n2.cni.acks[-1].kind, n2.cni.acks[-1].error) == ("del", "")
        assert _wait_closed(to_b1, IO_TIMEOUT) < CLOSE_WITHIN
        _echo(survivor, b"still here")

        # The source pod goes: N1 cuts its outbound connection.
        cluster.loop.run(n1.cni.delete_pod("a2"))
        assert (n1.cni.acks[-1].kind, n1.cni.acks[-1].error) == ("del", "")
        assert _wait_closed(from_a2, IO_TIMEOUT) < CLOSE_WITHIN
        _echo(survivor, b"still here")

    for node, gone in ((n1, "a2"), (n2, "b1")):
        node.zt.wait_metric("workload_manager_active_proxy_count", 1)
        assert node.zt.metric("workload_manager_proxies_stopped_total") == 1
        assert node.pods[gone].uid not in node.workload_state()
    # The access logs say why: the pod was removed.
    for node, direction in ((n2, "inbound"), (n1, "outbound")):
        lines = node.zt.access_logs()
        assert any(
            ln.fields.get("direction") == direction
            and "pod was removed" in ln.fields.get("error", "")
            for ln in lines
        ), [ln.fields for ln in lines]
    _round_trip(cluster, "a1", B2.ip, b"a new connection")

    # b1 comes back with the same IP (a new sandbox and uid): a1's pooled HBONE connection to
    # the old b1 was reset with it, so the very first connection reaches the new pod.
    old_uid = n2.pods["b1"].uid
    again = cluster.add_pod(n2, B1, label="b1-again")
    assert again.uid != old_uid and (n2.cni.acks[-1].kind, n2.cni.acks[-1].error) == ("add", "")
    n2.zt.wait_ready()
    assert _listeners(cluster.pod_ns["b1-again"])[15008] == WORKERS
    payload = b"to the new b1"
    _round_trip(cluster, "a1", B1.ip, payload)
    line = n2.zt.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{B1.ip}:{ECHO_PORT}"},
        bytes_recv=str(len(payload)),
    )
    assert (line.fields["src.workload"], line.fields["dst.workload"]) == ("a1", "b1")


# ---------------------------------------------------------------------------------------------
# Measurements (printed, not asserted beyond sanity)


def test_measure_add_latency_and_memory_per_pod(cluster: Cluster) -> None:
    n1 = cluster.nodes[N1.key]
    cni, zt = n1.cni, n1.zt
    want = _listeners(cluster.pod_ns["a1"])  # what a pod that is up has
    want = collections.Counter({p: want[p] for p in POD_PORTS})

    async def create_all() -> list[Pod]:
        return list(
            await asyncio.gather(
                *(cni.create_pod(w.name, w.namespace, w.sa, w.ip, notify=False) for w in EXTRA)
            )
        )

    started = time.monotonic()
    pods = cluster.loop.run(create_all(), timeout=120.0)
    n1.pods.update({p.name: p for p in pods})
    for pod in pods:
        _no_proxy_arp_delay(n1.ns, pod)
    setup = time.monotonic() - started
    time.sleep(1.0)
    before = _memory(zt)
    threads_before = _memory(zt, "Threads")

    async def timed_add(pod: Pod) -> tuple[float, float, str | None]:
        fd = pod.open_netns()
        try:
            sent = time.monotonic()
            error = await cni.send_raw(zds.encode_add(pod.uid, pod.info), [fd])
            return sent, time.monotonic(), error
        finally:
            os.close(fd)

    acks: list[float] = []
    listening: list[float] = []
    for i, pod in enumerate(pods):
        poller = (
            _run_in(pod.netns, _poll_listening, want, 20.0) if i < MEASURE_LATENCY_PODS else None
        )
        if poller is not None:
            time.sleep(0.01)  # the poller is in its loop
        sent, acked, error = cluster.loop.run(timed_add(pod))
        assert error == "", error
        acks.append(acked - sent)
        if poller is not None:
            listening.append(poller.result(25.0) - sent)
    zt.wait_metric("workload_manager_active_proxy_count", 2 + MEASURE_PODS)
    time.sleep(2.0)
    added = _memory(zt)
    threads_added = _memory(zt, "Threads")

    # One HBONE connection from every new pod (a certificate and a pooled connection each).
    started = time.monotonic()
    for pod in pods:
        _run_in(pod.netns, _hello, B1.ip, ECHO_PORT).result(IO_TIMEOUT * 2)
    traffic = time.monotonic() - started
    time.sleep(2.0)
    used = _memory(zt)

    def per_pod(a: dict[str, int], b: dict[str, int]) -> str:
        rows = [
            f"{role} {a[role] / 1024:.1f} -> {b[role] / 1024:.1f} MiB "
            f"({(b[role] - a[role]) / MEASURE_PODS:+.0f} KiB/pod)"
            for role in sorted(a)
            if role in b
        ]
        total = (sum(b.values()) - sum(a.values())) / MEASURE_PODS
        return "; ".join(rows) + f"; total {total:+.0f} KiB/pod"

    print()
    print(f"[measure] {MEASURE_PODS} pod netns created by FakeCNI in {setup:.1f} s")
    print(f"[measure] AddWorkload -> listening in every worker: {_percentiles(listening)}")
    print(f"[measure] AddWorkload -> ACK, same pods: {_percentiles(acks[:MEASURE_LATENCY_PODS])}")
    print(f"[measure] AddWorkload -> ACK, no poller: {_percentiles(acks[MEASURE_LATENCY_PODS:])}")
    print(f"[measure] memory, 2 -> {2 + MEASURE_PODS} pods idle: {per_pod(before, added)}")
    print(f"[measure] threads, 2 -> {2 + MEASURE_PODS} pods: {threads_before} -> {threads_added}")
    print(f"[measure] {MEASURE_PODS} first connections (one per pod) in {traffic:.1f} s")
    print(f"[measure] memory, with a pooled HBONE connection per pod: {per_pod(before, used)}")
    assert len(listening) == MEASURE_LATENCY_PODS
    assert all(latency < 20.0 for latency in listening)
