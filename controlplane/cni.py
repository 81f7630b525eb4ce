"""A fake istio-cni node agent: pod netns with in-pod redirection, handed to ztunnel over ZDS.

For one "node" (the caller's network namespace, or a named one) it creates pods the way the
real CNI plugin does in ambient mode: a network namespace per pod joined to the node by a
veth pair (routed: the pod's default route is on-link, the node's end answers ARP by
proxy and the node routes the pod's /32 to it), plus the iptables rules that send the
pod's traffic to ztunnel's listeners inside that netns (reference §14.9, upstream
scripts/ztunnel-redirect-inpod.sh). It serves ZDS like upstream's test server
(src/test_helpers/inpod.rs, reference §14.6): accept one ztunnel at a time, read its
hello, send `AddWorkload` (with the netns fd) for every existing pod and `SnapshotSent`,
then Add/Del as pods come and go, reading the ack of each. Acks are recorded in `acks`.
A newer connection replaces the current one, as a restarted ztunnel's would.

    cni = FakeCNI("/tmp/zds.sock", netns_prefix="demo-")
    await cni.start()
    pod = await cni.create_pod("web", "default", "web-sa", "10.10.0.5")
    ...
    await cni.close()   # removes every namespace, link and the socket it created

CLI: `python -m controlplane.cni --uds /tmp/zds.sock --pod default/web/web-sa=10.10.0.5`.
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN), `ip` (iproute2) and `iptables-restore`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from ztunnel import fdchannel
from ztunnel.core import zds
from ztunnel.core.config import WorkloadInfo
from ztunnel.core.errors import ZtunnelError

log = logging.getLogger(__name__)

NETNS_DIR = "/run/netns"
POD_IFNAME = "eth0"
PROBE_ADDR = "169.254.7.127"  # kubelet probes arrive SNATed from here; never redirected
PACKET_MARK = 0x539  # ztunnel's SO_MARK (PACKET_MARK=1337): its own traffic is not redirected
CONN_MARK = 0x111  # set on connections ztunnel spoofs the source of (original-src replies)
MARK_MASK = 0xFFF
ROUTE_TABLE = 100
CMD_TIMEOUT = 15.0  # seconds per `ip` / `iptables-restore` command
ACK_TIMEOUT = 5.0  # seconds to wait for ztunnel's answer to one request

_if_seq = itertools.count(1)


class CNIError(ZtunnelError):
    reason = "cni"


def redirect_rules() -> str:
    """iptables-restore input for inside a pod (same effect as ztunnel-redirect-inpod.sh).

    mangle: a connection whose packets arrive marked by ztunnel gets CONN_MARK, and the
    pod's replies on it get the mark back, so `ip rule fwmark` routes them to ztunnel's
    transparent socket. nat OUTPUT: DNS to 15053, the pod's other TCP to 15001, except
    ztunnel's own (marked) traffic, loopback and the probe address. nat PREROUTING: TCP
    arriving for the pod goes to 15006, except HBONE on 15008 which ztunnel serves itself.
    """
    mark = f"0x{PACKET_MARK:x}/0x{MARK_MASK:x}"
    conn = f"0x{CONN_MARK:x}/0x{MARK_MASK:x}"
    full = "0xffffffff"
    return "\n".join(
        [
            "*mangle",
            ":ISTIO_PRERT - [0:0]",
            ":ISTIO_OUTPUT - [0:0]",
            "-A PREROUTING -j ISTIO_PRERT",
            "-A OUTPUT -j ISTIO_OUTPUT",
            f"-A ISTIO_PRERT -m mark --mark {mark} -j CONNMARK --set-xmark {conn}",
            f"-A ISTIO_OUTPUT -m connmark --mark {conn}"
            f" -j CONNMARK --restore-mark --nfmask {full} --ctmask {full}",
            "COMMIT",
            "*nat",
            ":ISTIO_PRERT - [0:0]",
            ":ISTIO_OUTPUT - [0:0]",
            "-A PREROUTING -j ISTIO_PRERT",
            "-A OUTPUT -j ISTIO_OUTPUT",
            f"-A ISTIO_OUTPUT -d {PROBE_ADDR}/32 -p tcp -m tcp -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -o lo -p udp -m mark ! --mark {mark} -m udp --dport 53"
            " -j REDIRECT --to-ports 15053",
            f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m tcp --dport 53 -m mark ! --mark {mark}"
            " -j REDIRECT --to-ports 15053",
            f"-A ISTIO_OUTPUT -p tcp -m mark --mark {conn} -j ACCEPT",
            "-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -o lo -j ACCEPT",
            f"-A ISTIO_OUTPUT ! -d 127.0.0.1/32 -p tcp -m mark ! --mark {mark}"
            " -j REDIRECT --to-ports 15001",
            f"-A ISTIO_PRERT -s {PROBE_ADDR}/32 -p tcp -m tcp -j ACCEPT",
            f"-A ISTIO_PRERT ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m mark ! --mark {mark}"
            " -j REDIRECT --to-ports 15006",
            "COMMIT",
            "",
        ]
    )


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    service_account: str
    ip: str
    uid: str
    netns: str  # the netns name under /run/netns
    node_ifname: str  # the node's end of the veth pair

    @property
    def info(self) -> WorkloadInfo:
        return WorkloadInfo(
            name=self.name, namespace=self.namespace, service_account=self.service_account
        )

    @property
    def netns_path(self) -> str:
        return os.path.join(NETNS_DIR, self.netns)

    def open_netns(self) -> int:
        """A new close-on-exec fd for the pod's netns; the caller closes it."""
        return os.open(self.netns_path, os.O_RDONLY | os.O_CLOEXEC)


@dataclass(frozen=True, slots=True)
class AckRecord:
    """One request sent to ztunnel and its answer: error "" = ACK, None = no answer."""

    kind: str  # "add", "del", "snapshot" or "raw"
    uid: str
    error: str | None


@dataclass(slots=True)
class _Server:
    listener: socket.socket
    task: asyncio.Task[None] | None = None
    conn: socket.socket | None = None
    snapshots: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class FakeCNI:
    """Pods for one node, and the ZDS server that hands them to ztunnel."""

    def __init__(
        self,
        uds_path: str,
        *,
        netns_prefix: str | None = None,
        node_netns: str | None = None,
        redirect: bool = True,
        ack_timeout: float = ACK_TIMEOUT,
    ) -> None:
        """`node_netns` None: pods hang off the netns this process runs in."""
        self.uds_path = uds_path
        self.netns_prefix = netns_prefix if netns_prefix is not None else f"ztcni-{os.getpid()}-"
        self.node_netns = node_netns
        self.redirect = redirect
        self.ack_timeout = ack_timeout
        self.pods: dict[str, Pod] = {}  # by name
        self.acks: list[AckRecord] = []
        self.hellos: list[int] = []  # the ZdsHello version of each connection
        self._server: _Server | None = None
        self._lock = asyncio.Lock()  # one request (and its ack) at a time
        self._forwarding_set = False

    # -- ZDS server -------------------------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.uds_path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            listener.bind(self.uds_path)
            listener.listen(16)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        server = _Server(listener)
        server.task = asyncio.get_running_loop().create_task(self._serve(server), name="fake-cni")
        self._server = server
        log.info("fake CNI serving ZDS on %s", self.uds_path)

    @property
    def connected(self) -> bool:
        return self._server is not None and self._server.conn is not None

    @property
    def snapshots(self) -> int:
        """Connections that completed the snapshot."""
        return self._server.snapshots if self._server is not None else 0

    async def wait_snapshots(self, count: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until `count` connections have received their snapshot."""
        server = self._require_server()
        async with asyncio.timeout(timeout), server.changed:
            await server.changed.wait_for(lambda: server.snapshots >= count)

    async def _serve(self, server: _Server) -> None:
        while True:
            await fdchannel.wait_io(server.listener, write=False)
            try:
                conn, _ = server.listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(False)
            async with self._lock:
                self._drop_conn(server)
                server.conn = conn
                try:
                    await self._handshake(conn)
                except (OSError, TimeoutError, zds.ZdsError) as e:
                    log.warning("ztunnel connection failed during the snapshot: %s", e)
                    self._drop_conn(server)
                    continue
            async with server.changed:
                server.snapshots += 1
                server.changed.notify_all()

    async def _handshake(self, conn: socket.socket) -> None:
        async with asyncio.timeout(self.ack_timeout):
            hello = await fdchannel.recv_packet(conn, zds.MAX_MESSAGE, 1)
        fdchannel.close_fds(hello.fds)
        if not hello.data:
            raise OSError("ztunnel closed before its hello")
        self.hellos.append(zds.decode_hello(hello.data))
        for pod in list(self.pods.values()):
            await self._add(conn, pod)
        await self._exchange(conn, "snapshot", "", zds.encode_snapshot_sent(), ())

    async def _add(self, conn: socket.socket, pod: Pod) -> str:
        fd = pod.open_netns()
        try:
            return await self._exchange(
                conn, "add", pod.uid, zds.encode_add(pod.uid, pod.info), [fd]
            )
        finally:
            os.close(fd)

    async def _exchange(
        self, conn: socket.socket, kind: str, uid: str, payload: bytes, fds: Sequence[int]
    ) -> str:
        """Send one request and read its ack; raises if the connection is gone."""
        await fdchannel.asend_packet(conn, payload, fds)
        async with asyncio.timeout(self.ack_timeout):
            answer = await fdchannel.recv_packet(conn, zds.MAX_MESSAGE, 1)
        fdchannel.close_fds(answer.fds)
        if not answer.data:
            self.acks.append(AckRecord(kind, uid, None))
            raise OSError("ztunnel closed the connection without an ack")
        error = zds.decode_ack(answer.data)
        self.acks.append(AckRecord(kind, uid, error))
        log.info("ztunnel answered %s %s: %s", kind, uid or "-", error or "ack")
        return error

    async def _request(
        self,
        kind: str,
        uid: str,
        payload: bytes,
        fds: Sequence[int] = (),
        *,
        pod: Pod | None = None,
    ) -> str | None:
        """Send on the current connection, if any: the ack error, None if not delivered.

        With `pod`, the request is that pod's AddWorkload with a fresh netns fd.
        """
        server = self._require_server()
        async with self._lock:
            conn = server.conn
            if conn is None:
                return None
            try:
                if pod is not None:
                    return await self._add(conn, pod)
                return await self._exchange(conn, kind, uid, payload, fds)
            except (OSError, TimeoutError, zds.ZdsError) as e:
                log.warning("ztunnel connection lost: %s", e)
                self._drop_conn(server)
                return None

    async def send_raw(self, payload: bytes, fds: Sequence[int] = ()) -> str | None:
        """Send any bytes and fds as one request (tests of malformed input); the fds stay
        the caller's. Returns the ack error, or None when ztunnel answered nothing."""
        return await self._request("raw", "", payload, fds)

    async def disconnect(self) -> None:
        """Close the current connection (ztunnel reconnects and gets a new snapshot)."""
        server = self._require_server()
        async with self._lock:
            self._drop_conn(server)

    @staticmethod
    def _drop_conn(server: _Server) -> None:
        if server.conn is not None:
            server.conn.close()
            server.conn = None

    def _require_server(self) -> _Server:
        if self._server is None:
            raise CNIError("FakeCNI.start() was not called")
        return self._server

    # -- pods -------------------------------------------------------------------------------------

    async def create_pod(
        self,
        name: str,
        namespace: str,
        service_account: str,
        ip: str,
        *,
        uid: str | None = None,
        notify: bool = True,
    ) -> Pod:
        """Create the pod's netns, veth and redirection; tell ztunnel unless `notify=False`.

        The ack of the Add is the last entry of `acks` (when a ztunnel is connected).
        """
        if name in self.pods:
            raise CNIError(f"pod {name} exists")
        pod = Pod(
            name=name,
            namespace=namespace,
            service_account=service_account,
            ip=ip,
            uid=uid or str(uuid.uuid4()),
            netns=self.netns_prefix + _safe(f"{namespace}-{name}"),
            node_ifname=f"zc{os.getpid():x}{next(_if_seq):x}"[:15],
        )
        try:
            await asyncio.to_thread(self._setup_pod, pod)
        except BaseException:
            await asyncio.to_thread(self._teardown_pod, pod)
            raise
        self.pods[name] = pod
        if notify and self._server is not None:
            await self._request("add", pod.uid, b"", pod=pod)
        return pod

    async def delete_pod(self, name: str, *, notify: bool = True) -> None:
        """Tell ztunnel (unless `notify=False`, a missed delete), then remove the pod."""
        pod = self.pods.pop(name)
        if notify and self._server is not None:
            await self._request("del", pod.uid, zds.encode_del(pod.uid))
        await asyncio.to_thread(self._teardown_pod, pod)

    def _node(self) -> list[str]:
        return ["-n", self.node_netns] if self.node_netns is not None else []

    def _setup_pod(self, pod: Pod) -> None:
        node = self._node()
        _ip("netns", "add", pod.netns)
        _ip("-n", pod.netns, "link", "set", "lo", "up")
        _ip(
            *node,
            *("link", "add", pod.node_ifname, "type", "veth"),
            *("peer", "name", POD_IFNAME, "netns", pod.netns),
        )
        _ip("-n", pod.netns, "addr", "add", f"{pod.ip}/32", "dev", POD_IFNAME)
        _ip("-n", pod.netns, "link", "set", POD_IFNAME, "up")
        # On-link default route: the pod ARPs for every destination and the node answers
        # (proxy ARP for what it routes elsewhere, plain ARP for its own addresses).
        _ip("-n", pod.netns, "route", "add", "default", "dev", POD_IFNAME, "scope", "link")
        self._sysctl(f"net.ipv4.conf.{pod.node_ifname}.proxy_arp=1")
        # Answer proxy ARP at once: the kernel's default 0.8 s delay stalls a new pod's
        # first connection through the node.
        self._sysctl(f"net.ipv4.neigh.{pod.node_ifname}.proxy_delay=0")
        if self.node_netns is not None and not self._forwarding_set:
            # Pod to pod on this node is routed by the node. A named node netns is ours to
            # configure; the caller's own netns is left alone.
            self._sysctl("net.ipv4.ip_forward=1")
            self._forwarding_set = True
        _ip(*node, "link", "set", pod.node_ifname, "up")
        _ip(*node, "route", "add", f"{pod.ip}/32", "dev", pod.node_ifname)
        if self.redirect:
            _in_netns(
                pod.netns, ["iptables-restore", "--wait", "10", "--noflush"], redirect_rules()
            )
            _ip(
                "-n",
                pod.netns,
                "route",
                "add",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                str(ROUTE_TABLE),
            )
            _ip(
                *("-n", pod.netns, "rule", "add", "fwmark", f"0x{CONN_MARK:x}/0x{MARK_MASK:x}"),
                *("pref", "32764", "lookup", str(ROUTE_TABLE)),
            )

    def _sysctl(self, setting: str) -> None:
        argv = [_binary("sysctl"), "-qw", setting]
        if self.node_netns is not None:
            _in_netns(self.node_netns, argv)
        else:
            _run(argv)

    def _teardown_pod(self, pod: Pod) -> None:
        # Delete the node's end explicitly: ztunnel may still hold the pod netns open, which
        # would keep the veth (and the node's route to the pod) alive past `netns del`.
        _ip(*self._node(), "link", "del", pod.node_ifname, check=False)
        _ip("netns", "del", pod.netns, check=False)

    async def close(self) -> None:
        """Stop serving and remove every pod, link and the socket (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            if server.task is not None:
                server.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await server.task
            self._drop_conn(server)
            server.listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds_path)
        pods, self.pods = list(self.pods.values()), {}
        for pod in pods:
            await asyncio.to_thread(self._teardown_pod, pod)

    async def __aenter__(self) -> FakeCNI:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


# --- commands -----------------------------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/sbin", "/usr/bin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )
    if found is None:
        raise CNIError(f"`{name}` not found")
    return found


def _run(argv: Sequence[str], stdin: str | None = None, *, check: bool = True) -> None:
    done = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CMD_TIMEOUT,
        check=False,
    )
    if check and done.returncode != 0:
        raise CNIError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")


def _ip(*args: str, check: bool = True) -> None:
    _run([_binary("ip"), *args], check=check)


def _in_netns(netns: str, argv: Sequence[str], stdin: str | None = None) -> None:
    _run([_binary("ip"), "netns", "exec", netns, *argv], stdin)


# --- CLI ----------------------------------------------------------------------------------------


def parse_pod(text: str) -> tuple[str, str, str, str]:
    """`namespace/name/service-account=ip` -> (name, namespace, service_account, ip)."""
    spec, sep, ip = text.partition("=")
    parts = spec.split("/")
    if not sep or not ip or len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected namespace/name/service-account=ip")
    namespace, name, service_account = parts
    return name, namespace, service_account, ip


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m controlplane.cni",
        description="Fake istio-cni: create pod netns with in-pod redirection, serve ZDS.",
    )
    p.add_argument("--uds", required=True, help="ZDS socket path (ztunnel's INPOD_UDS)")
    p.add_argument(
        "--pod",
        action="append",
        default=[],
        type=parse_pod,
        help="namespace/name/service-account=ip (repeatable)",
    )
    p.add_argument("--netns-prefix", default=None, help="pod netns name prefix")
    p.add_argument("--node-netns", default=None, help="node netns name (default: this one)")
    p.add_argument("--no-redirect", action="store_true", help="skip the iptables rules")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with FakeCNI(
        args.uds,
        netns_prefix=args.netns_prefix,
        node_netns=args.node_netns,
        redirect=not args.no_redirect,
    ) as cni:
        for name, namespace, service_account, ip in args.pod:
            pod = await cni.create_pod(name, namespace, service_account, ip)
            log.info("pod %s/%s uid=%s ip=%s netns=%s", namespace, name, pod.uid, ip, pod.netns)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(_main(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
