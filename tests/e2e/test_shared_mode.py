"""Shared (in-pod) mode end to end: one ztunnel serving two pods from inside their netns.

A "node" namespace runs a shared-mode ztunnel (two workers) and the fake istio-cni
(`controlplane.cni.FakeCNI`), which creates the pods `client` and `server` (each a netns
joined to the node by a veth pair, with the in-pod redirection rules) and hands their
netns to ztunnel over ZDS. ztunnel's workers then listen on 15001/15006/15008 inside each
pod. A connection the client pod makes to the server pod is captured into ztunnel's 15001
in the client pod, tunnelled over HBONE to ztunnel's 15008 in the server pod and delivered
to the echo server there; one to an address outside the mesh (the node's) passes through.
Also covered: the service VIP and the DNS proxy inside a pod, plaintext inbound (15006),
a pod that cannot start (NACK, pending, retried), pod removal, a worker replaced (pods
replayed to it) and SIGTERM. Upstream's counterparts are the `*_inpod` tests of
`tests/namespaced.rs` (inventory §17.2).

The fake CNI runs on an event loop of its own (a thread), so the test itself can block.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from netns import PREFIX, Netns, Network

from controlplane.cni import FakeCNI, Pod
from ztunnel.core import zds
from ztunnel.fakeca import FakeCA
from ztunnel.netns import NetnsExecutor

pytestmark = pytest.mark.timeout(120)

NODE_NAME = "node-1"
NODE_IP = "198.18.0.1"  # on the node's lo: the outside-the-mesh echo lives here
CLIENT_IP = "198.18.1.10"
SERVER_IP = "198.18.1.11"
ECHO_PORT = 8080
OUTSIDE_PORT = 9090
READY_WORKLOADS = "workload proxy manager"

SERVICE_HOST = "echo.default.svc.cluster.local"
SERVICE_VIP = "198.18.2.1"
SERVICE_PORT = 80

CLIENT = WorkloadSpec("client", CLIENT_IP, NODE_NAME)
SERVER = WorkloadSpec(
    "server", SERVER_IP, NODE_NAME, services={f"default/{SERVICE_HOST}": {SERVICE_PORT: ECHO_PORT}}
)


def _write_config(path: Path) -> Path:
    write_local_config(path, [CLIENT, SERVER])
    config = json.loads(path.read_text())
    config["services"] = [
        {
            "name": "echo",
            "namespace": "default",
            "hostname": SERVICE_HOST,
            "vips": [f"/{SERVICE_VIP}"],
            "ports": {SERVICE_PORT: ECHO_PORT},
        }
    ]
    path.write_text(json.dumps(config, indent=2))
    return path


@dataclass
class InPodNode:
    node: Netns
    cni: FakeCNI
    loop: LoopThread
    zt: NodeZtunnel
    pods: dict[str, Pod]
    pod_ns: dict[str, Netns]
    early_readiness: HTTPReply | None

    def connect(self, pod: str, host: str, port: int) -> socket.socket:
        """A connection made by an app inside `pod` (so the pod's capture rules apply)."""
        return connect(self.pod_ns[pod], host, port)

    def admin_json(self, path: str) -> Any:
        reply = self.zt.http_get(self.zt.ports.admin, path)
        assert reply.status == 200, reply
        return json.loads(reply.body)


def _readiness(zt: NodeZtunnel) -> HTTPReply | None:
    with contextlib.suppress(OSError):
        return zt.http_get(zt.ports.readiness, "/healthz/ready", timeout=1.0)
    return None


def _only_zds_pending(zt: NodeZtunnel) -> HTTPReply | None:
    if not zt.running():
        raise HarnessError(f"ztunnel exited with {zt.proc.returncode}:\n{zt.logs.tail()}")
    reply = _readiness(zt)
    if reply is not None and reply.body == f"not ready, pending: {READY_WORKLOADS}\n":
        return reply
    return None


@pytest.fixture
def inpod(
    network: Network,
    fake_ca: tuple[str, FakeCA],
    tmp_path: Path,
    ztunnel_logs: LogKeeper,
) -> Iterator[InPodNode]:
    ca_dir, _ = fake_ca
    node = network.node("node")
    node.run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    config = _write_config(tmp_path / "local.yaml")
    uds = str(tmp_path / "ztunnel.sock")
    loop = LoopThread()
    pod_ns: dict[str, Netns] = {}
    servers: list[EchoServer] = []
    zt: NodeZtunnel | None = None

    async def make_cni() -> FakeCNI:
        return FakeCNI(uds, netns_prefix=f"{PREFIX}pod-", node_netns=node.name)

    cni = loop.run(make_cni())
    try:
        pods = {
            spec.name: loop.run(cni.create_pod(spec.name, spec.namespace, spec.sa, spec.ip))
            for spec in (CLIENT, SERVER)
        }
        for name, pod in pods.items():
            pod_ns[name] = Netns(pod.netns, name)
        servers.append(EchoServer(pod_ns["server"], SERVER_IP, ECHO_PORT))
        servers.append(EchoServer(node, NODE_IP, OUTSIDE_PORT))
        env = {
            "PROXY_MODE": "shared",
            "INPOD_UDS": uds,
            "FAKE_CA": "true",
            "FAKE_CA_DIR": ca_dir,
            "XDS_ADDRESS": "",
            "LOCAL_XDS_PATH": str(config),
            "NODE_NAME": NODE_NAME,
            "ZTUNNEL_WORKERS": str(WORKERS),
            "LOG_FORMAT": "json",
            "UNSTABLE_ENABLE_SOCKS5": "false",
        }
        zt = ztunnel_logs.add("node", NodeZtunnel(node, env))
        # No node agent yet: everything but the workload proxy manager gets ready.
        early = poll_until(lambda: _only_zds_pending(zt), 20.0, "only ZDS pending", 0.05)
        loop.run(cni.start())
        loop.run(cni.wait_snapshots(1, timeout=20.0))
        zt.wait_ready()
        yield InPodNode(node, cni, loop, zt, pods, pod_ns, early)
    finally:
        if zt is not None:
            zt.kill()
        for server in servers:
            server.close()
        with contextlib.suppress(Exception):
            loop.run(cni.close())
        loop.close()
        for ns in pod_ns.values():
            ns.close()


def _wait_closed(sock: socket.socket, timeout: float) -> float:
    """Seconds until the peer ends `sock` (EOF or reset)."""
    start = time.monotonic()
    sock.settimeout(timeout)
    with contextlib.suppress(ConnectionError):
        while sock.recv(65536):
            pass
    return time.monotonic() - start


def _refused(port: int) -> bool:
    """Nothing listens on 127.0.0.1:`port` (TCP) in the calling thread's netns."""
    try:
        socket.create_connection(("127.0.0.1", port), 2.0).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------------------------------------


def test_ready_only_after_the_zds_snapshot(inpod: InPodNode) -> None:
    early = inpod.early_readiness
    assert early is not None and early.status == 500
    assert early.body == f"not ready, pending: {READY_WORKLOADS}\n"
    assert [(r.kind, r.error) for r in inpod.cni.acks] == [
        ("add", ""),
        ("add", ""),
        ("snapshot", ""),
    ]
    state = inpod.admin_json("/config_dump")["workloadState"]
    assert state == {
        pod.uid: {
            "state": "Up",
            "info": {"name": name, "namespace": "default", "serviceAccount": name},
        }
        for name, pod in inpod.pods.items()
    }
    assert inpod.zt.metric("workload_manager_active_proxy_count") == 2
    assert inpod.zt.metric("workload_manager_proxies_started_total") == 2
    assert inpod.zt.metric("workload_manager_pending_proxy_count") == 0


def test_outbound_to_outside_the_mesh_passes_through_from_the_pod(inpod: InPodNode) -> None:
    payload = os.urandom(256 * 1024)
    with inpod.connect("client", NODE_IP, OUTSIDE_PORT) as sock:
        received, clean_eof = send_and_drain(sock, payload)
        client_addr = "{}:{}".format(*sock.getsockname())
    assert digest(received) == digest(payload) and clean_eof
    line = inpod.zt.wait_access(**{"src.addr": client_addr, "direction": "outbound"})
    assert line.fields["dst.addr"] == f"{NODE_IP}:{OUTSIDE_PORT}"
    assert line.fields["src.workload"] == "client"
    assert "src.identity" not in line.fields  # plain TCP: no mTLS identities
    assert line.fields["bytes_sent"] == str(len(payload))


def test_pod_to_pod_over_hbone_with_both_identities(inpod: InPodNode) -> None:
    payload = os.urandom(1 << 20)
    with inpod.connect("client", SERVER_IP, ECHO_PORT) as sock:
        received, clean_eof = send_and_drain(sock, payload)
        client_addr = "{}:{}".format(*sock.getsockname())
    assert len(received) == len(payload) and digest(received) == digest(payload)
    assert clean_eof

    outbound = inpod.zt.wait_access(**{"src.addr": client_addr, "direction": "outbound"})
    assert outbound.fields["src.identity"] == CLIENT.identity
    assert outbound.fields["dst.identity"] == SERVER.identity
    assert outbound.fields["dst.addr"] == f"{SERVER_IP}:15008"
    assert outbound.fields["dst.hbone_addr"] == f"{SERVER_IP}:{ECHO_PORT}"

    inbound = inpod.zt.wait_access(
        **{"direction": "inbound", "dst.hbone_addr": f"{SERVER_IP}:{ECHO_PORT}"}
    )
    assert inbound.fields["src.identity"] == "spiffe://cluster.local/ns/default/sa/client"
    assert inbound.fields["dst.identity"] == "spiffe://cluster.local/ns/default/sa/server"
    assert inbound.fields["src.addr"].startswith(f"{CLIENT_IP}:")
    assert inbound.fields["src.workload"] == "client"
    assert inbound.fields["dst.workload"] == "server"


def test_service_vip_and_dns_proxy_inside_the_pod(inpod: InPodNode) -> None:
    # DNS to any resolver is captured into the pod's 15053 and answered from the mesh.
    answer = inpod.pod_ns["client"].call(_dns_a_query, NODE_IP, SERVICE_HOST)
    assert answer == [SERVICE_VIP]
    # The VIP is load-balanced to the server pod, over HBONE.
    with inpod.connect("client", SERVICE_VIP, SERVICE_PORT) as sock:
        received, clean_eof = send_and_drain(sock, b"via the service")
        client_addr = "{}:{}".format(*sock.getsockname())
    assert received == b"via the service" and clean_eof
    line = inpod.zt.wait_access(**{"src.addr": client_addr, "direction": "outbound"})
    assert line.fields["dst.hbone_addr"] == f"{SERVER_IP}:{ECHO_PORT}"
    assert line.fields["dst.service"] == SERVICE_HOST
    assert line.fields["dst.identity"] == SERVER.identity


def test_removed_pod_stops_at_once_and_the_other_pod_keeps_working(inpod: InPodNode) -> None:
    held = inpod.connect("client", SERVER_IP, ECHO_PORT)
    with held:
        held.sendall(b"ping")
        assert recv_exact(held, 4) == b"ping"
        server_fd = inpod.pods["server"].open_netns()  # keeps the netns to look inside
        try:
            inpod.loop.run(inpod.cni.delete_pod("server"))
            assert inpod.cni.acks[-1].kind == "del" and inpod.cni.acks[-1].error == ""
            assert _wait_closed(held, IO_TIMEOUT) < 3.0
            with NetnsExecutor(server_fd, name="removed-pod") as inside:
                for port in (15001, 15006, 15008, 15053):
                    assert inside.call(_refused, port, timeout=5), f"pod port {port} still open"
        finally:
            os.close(server_fd)

    inpod.zt.wait_metric("workload_manager_active_proxy_count", 1)
    assert inpod.zt.metric("workload_manager_proxies_stopped_total") == 1
    assert list(inpod.admin_json("/config_dump")["workloadState"]) == [inpod.pods["client"].uid]

    with inpod.connect("client", NODE_IP, OUTSIDE_PORT) as sock:
        received, clean_eof = send_and_drain(sock, b"still here")
    assert received == b"still here" and clean_eof


def test_plaintext_from_outside_the_mesh_is_captured_on_15006_in_the_pod(
    inpod: InPodNode,
) -> None:
    """The node (no mesh identity) connects to the server pod: its 15006 takes it."""
    with connect(inpod.node, SERVER_IP, ECHO_PORT) as sock:
        received, clean_eof = send_and_drain(sock, b"from the node")
        node_addr = "{}:{}".format(*sock.getsockname())
    assert received == b"from the node" and clean_eof
    line = inpod.zt.wait_access(**{"src.addr": node_addr, "direction": "inbound"})
    assert line.fields["dst.addr"] == f"{SERVER_IP}:{ECHO_PORT}"
    assert line.fields["dst.workload"] == "server"
    assert "src.identity" not in line.fields


def test_a_pod_that_cannot_start_is_pending_then_retried(inpod: InPodNode) -> None:
    """A port taken inside the pod: NACK, pending (not ready), retried until it binds."""
    extra = WorkloadSpec("late", "198.18.1.12", NODE_NAME)
    pod = inpod.loop.run(
        inpod.cni.create_pod(extra.name, "default", extra.sa, extra.ip, notify=False)
    )
    fd = pod.open_netns()
    try:
        with NetnsExecutor(fd, name="late-pod") as inside:
            squatter = inside.call(_squat, 15006, timeout=5)  # no SO_REUSEPORT: a conflict
            with squatter:
                error = inpod.loop.run(inpod.cni.send_raw(zds.encode_add(pod.uid, pod.info), [fd]))
                assert error is not None
                assert error.startswith("failure to start proxy : worker "), error
                assert "15006: address already in use" in error
                ready = inpod.zt.http_get(inpod.zt.ports.readiness, "/healthz/ready")
                assert ready.status == 500 and READY_WORKLOADS in ready.body
                assert inpod.zt.metric("workload_manager_pending_proxy_count") == 1
                state = inpod.admin_json("/config_dump")["workloadState"]
                assert state[pod.uid]["state"] == "Pending"
            # Port free again: the 5 s retry starts it.
            inpod.zt.wait_ready(timeout=15.0)
    finally:
        os.close(fd)
    assert inpod.zt.metric("workload_manager_pending_proxy_count") == 0
    assert inpod.zt.metric("workload_manager_active_proxy_count") == 3
    assert inpod.admin_json("/config_dump")["workloadState"][pod.uid]["state"] == "Up"


def test_a_replacement_worker_gets_every_pod_again(inpod: InPodNode) -> None:
    before = _worker_pids(inpod.zt)
    assert len(before) == WORKERS
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    after = poll_until(
        lambda: p if len(p := _worker_pids(inpod.zt)) == WORKERS and victim not in p else None,
        15.0,
        "a replacement worker",
        0.05,
    )
    (new,) = set(after) - set(before)
    index = _worker_index(new)

    def replayed() -> bool | None:
        lines = inpod.zt.logs.find(
            lambda line: (
                line.process == f"worker{index}"
                and line.message.startswith(f"worker {index}: serving pod")
            )
        )
        return True if len(lines) >= 4 else None  # 2 pods before the kill, 2 after

    poll_until(replayed, 15.0, "both pods replayed to the new worker", 0.05)
    for _ in range(8):  # whichever worker the kernel picks, the pod is served
        with inpod.connect("client", SERVER_IP, ECHO_PORT) as sock:
            received, clean_eof = send_and_drain(sock, b"again")
        assert received == b"again" and clean_eof


def test_sigterm_drains_every_pod_and_exits_cleanly(inpod: InPodNode) -> None:
    with inpod.connect("client", SERVER_IP, ECHO_PORT) as sock:
        assert send_and_drain(sock, b"before")[0] == b"before"
    inpod.zt.proc.send_signal(signal.SIGTERM)
    assert inpod.zt.proc.wait(15) == 0
    errors = inpod.zt.logs.find(lambda line: line.level in ("error", "ERROR"))
    assert errors == [], errors
    assert inpod.zt.logs.find(lambda line: line.message == "shutdown complete")


def _dns_a_query(server: str, name: str) -> list[str]:
    """The A records for `name` from `server`:53 over UDP (a minimal stub resolver)."""
    qid = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    query = qid.to_bytes(2, "big") + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    query += question + b"\x00\x01\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendto(query, (server, 53))
        reply = sock.recv(4096)
    assert reply[:2] == query[:2] and reply[3] & 0x0F == 0, reply  # same id, NOERROR
    answers = int.from_bytes(reply[6:8], "big")
    offset = 12 + len(question) + 4
    out = []
    for _ in range(answers):
        offset += 2 if reply[offset] & 0xC0 == 0xC0 else len(question)
        rtype = int.from_bytes(reply[offset : offset + 2], "big")
        length = int.from_bytes(reply[offset + 8 : offset + 10], "big")
        data = reply[offset + 10 : offset + 10 + length]
        if rtype == 1:
            out.append(socket.inet_ntoa(data))
        offset += 10 + length
    return out


def _squat(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", port))
    sock.listen(1)
    return sock


def _worker_pids(zt: NodeZtunnel) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{zt.proc.pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{zt.proc.pid}/task/{task}/children") as f:
            pids.extend(int(p) for p in f.read().split())
    return sorted(p for p in pids if "--index" in _cmdline(p) and _state(p) not in ("Z", None))


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()[0]


def _worker_index(pid: int) -> int:
    argv = _cmdline(pid)
    return int(argv[argv.index("--index") + 1])
