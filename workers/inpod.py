"""Shared (in-pod) mode in a worker: one proxy per pod, serving from inside the pod's netns.

The supervisor sends each pod's network-namespace fd over the fd channel
(`ztunnel.fdchannel`: PodAdded + fd, PodRemoved; every message answered with PodAcked).
For a pod this worker then, like upstream's `InPodSocketFactory` (reference §14.3):

* gives the pod a `NetnsExecutor`, a thread living in the pod netns;
* binds there, with SO_REUSEPORT (every worker binds the same ports; the kernel spreads
  connections) and SO_MARK = PACKET_MARK, the pod's 15001, 15006 and 15008 on the
  wildcard address, 15080 with SOCKS5, and DNS (15053, UDP + TCP) when the DNS proxy is on;
* builds a `Proxy` for the pod's WorkloadInfo whose upstream sockets are also created in
  the pod netns (marked, so the pod's redirection lets them out), with its own connection
  tracker and HBONE pool;
* serves once the worker has its first state snapshot (early connections wait in the
  listen backlog), and acks as soon as everything is bound.

The same uid with the same netns is an idempotent add; a different netns replaces the
proxy. PodRemoved closes the pod's listeners, cuts its connections at once (upstream
drains a deleted workload with DrainMode::Immediate) and releases the netns.

Listeners always use SO_REUSEPORT, whatever INPOD_PORT_REUSE says: the workers of one
ztunnel share every pod's ports.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from workers.dns import BoundPair, DNSServer, bind_hosts, bind_pairs, ipv6_on_localhost
from workers.inbound import HBONEListener
from workers.metrics import WorkerMetrics
from workers.proxy import OnDemand, Proxy
from workers.revocation import Revocation
from workers.tasks import TaskSet
from workers.tracking import ConnectionTracker
from ztunnel import fdchannel, sockets, tls
from ztunnel.core.config import Config, WorkloadInfo
from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.core.state import ProxyState
from ztunnel.netns import NetnsError, NetnsExecutor, NetnsID, netns_id

log = logging.getLogger(__name__)

DRAIN_ERROR = "connection closed because the pod was removed"

Server = asyncio.Server | HBONEListener | DNSServer


@dataclass(slots=True)
class _Bound:
    """The listening sockets of one pod, created inside its netns."""

    outbound: socket.socket
    inbound_plain: socket.socket
    inbound: socket.socket
    socks5: socket.socket | None = None
    dns: list[BoundPair] = field(default_factory=list)

    def close(self) -> None:
        for sock in (self.outbound, self.inbound_plain, self.inbound, self.socks5):
            if sock is not None:
                sock.close()
        for tcp, udp in self.dns:
            tcp.close()
            udp.close()


@dataclass(slots=True, eq=False)
class PodProxy:
    """One pod served by this worker."""

    uid: str
    info: WorkloadInfo
    netns_id: NetnsID
    executor: NetnsExecutor
    proxy: Proxy
    tracker: ConnectionTracker
    servers: list[Server] = field(default_factory=list)
    serving: bool = False
    closed: bool = False

    async def start_serving(self) -> None:
        if self.serving or self.closed:
            return
        self.serving = True
        for server in self.servers:
            await server.start_serving()

    def stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    def close(self) -> None:
        """Stop listening, cut every connection now, release the netns thread."""
        if self.closed:
            return
        self.closed = True
        self.stop_accepting()
        for conn in self.tracker:
            conn.error = conn.error or DRAIN_ERROR
            conn.flow.abort()
        self.proxy.close()
        self.executor.close(wait=False)


class InPodManager:
    """Reads the fd channel and runs the proxies of this worker's pods."""

    def __init__(
        self,
        config: Config,
        channel: socket.socket,
        *,
        index: int,
        state: Callable[[], ProxyState],
        certs: Callable[[], Mapping[str, WorkloadCertificate]],
        contexts: tls.ContextCache,
        tasks: TaskSet,
        metrics: WorkerMetrics,
        trackers: list[ConnectionTracker],
        on_demand: OnDemand | None = None,
        revocation: Revocation | None = None,
    ) -> None:
        self.config = config
        self.on_demand = on_demand
        self.revocation = revocation
        self.channel = channel
        self.index = index
        self.state = state
        self.certs = certs
        self.contexts = contexts
        self.tasks = tasks
        self.metrics = metrics
        self.trackers = trackers  # the worker's list: drain, metrics and rechecks see our pods
        self.pods: dict[str, PodProxy] = {}
        self.serving = False  # the worker has its first snapshot: pods serve once bound
        self.draining = False

    # -- channel ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the fd channel until the supervisor closes it (or the task is cancelled)."""
        while True:
            try:
                header, fds = await fdchannel.recv(self.channel)
            except fdchannel.ChannelClosed:
                log.warning("worker %d: supervisor closed the fd channel", self.index)
                return
            except fdchannel.FdChannelError as e:
                log.error("worker %d: bad fd channel packet: %s", self.index, e)
                continue
            try:
                msg = fdchannel.decode(header)
            except fdchannel.FdChannelError as e:
                fdchannel.close_fds(fds)
                log.error("worker %d: %s", self.index, e)
                continue
            if isinstance(msg, fdchannel.PodAdded):
                error = await self._on_added(msg, fds)
            else:
                fdchannel.close_fds(fds)
                if not isinstance(msg, fdchannel.PodRemoved):
                    continue
                self.remove(msg.uid)
                error = ""
            await self._ack(msg.uid, error)

    async def _ack(self, uid: str, error: str) -> None:
        try:
            await fdchannel.asend(
                self.channel, fdchannel.encode(fdchannel.PodAcked(uid=uid, error=error))
            )
        except OSError as e:
            log.warning(
                "worker %d: cannot answer the supervisor about pod %s: %s", self.index, uid, e
            )

    async def _on_added(self, msg: fdchannel.PodAdded, fds: list[int]) -> str:
        """Start (or keep) the pod's proxy; "" on success, else why not."""
        if len(fds) != 1:
            fdchannel.close_fds(fds)
            return f"expected 1 netns fd, got {len(fds)}"
        try:
            return await self._add(msg, fds[0])
        except (OSError, NetnsError) as e:
            log.error("worker %d: failed to start proxy for pod %s: %s", self.index, msg.uid, e)
            return _describe(e)
        except Exception as e:  # a pod that cannot start must not stop the channel
            log.exception("worker %d: failed to start proxy for pod %s", self.index, msg.uid)
            return _describe(e)
        finally:
            fdchannel.close_fds(fds)  # the executor keeps its own duplicate

    async def _add(self, msg: fdchannel.PodAdded, fd: int) -> str:
        if self.draining:
            return "worker is shutting down"
        nid = netns_id(fd)
        current = self.pods.get(msg.uid)
        if current is not None:
            if current.netns_id == nid:
                return ""  # the same pod in the same netns: nothing to do
            log.info("worker %d: pod %s has a new netns, replacing its proxy", self.index, msg.uid)
            self.remove(msg.uid)
        info = WorkloadInfo(msg.name, msg.namespace, msg.service_account)
        self.pods[msg.uid] = await self._start(msg.uid, info, nid, fd)
        log.info(
            "worker %d: serving pod %s (%s/%s)", self.index, msg.uid, info.namespace, info.name
        )
        return ""

    # -- pods -------------------------------------------------------------------------------------

    async def _start(self, uid: str, info: WorkloadInfo, nid: NetnsID, fd: int) -> PodProxy:
        executor = NetnsExecutor(fd, name=f"pod-{uid[:8]}")
        try:
            bound = await executor.run(_bind_pod, self.config)
        except BaseException:
            executor.close(wait=False)
            raise
        config = self.config

        async def new_socket(ip: str) -> socket.socket:
            try:
                return await executor.run(sockets.new_upstream_socket, ip, config)
            except NetnsError as e:  # the pod is gone (executor closed)
                raise OSError(errno.ENETDOWN, str(e)) from None

        tracker = ConnectionTracker(self.metrics)
        proxy = Proxy(
            config,
            info=info,
            state=self.state,
            certs=self.certs,
            tracker=tracker,
            tasks=self.tasks,
            contexts=self.contexts,
            new_socket=new_socket,
            on_demand=self.on_demand,
            revocation=self.revocation,
        )
        pod = PodProxy(uid, info, nid, executor, proxy, tracker)
        try:
            await self._serve(pod, bound)
            if self.serving:
                await pod.start_serving()
        except BaseException:
            bound.close()
            pod.close()
            raise
        self.trackers.append(tracker)
        return pod

    async def _serve(self, pod: PodProxy, bound: _Bound) -> None:
        """Wrap the bound sockets in servers that accept from `start_serving` on."""
        loop = asyncio.get_running_loop()
        proxy, cfg = pod.proxy, self.config
        for sock, factory in (
            (bound.outbound, proxy.outbound_protocol),
            (bound.inbound_plain, proxy.inbound_plaintext_protocol),
            (bound.socks5, proxy.socks5_protocol),
        ):
            if sock is not None:
                server = await loop.create_server(
                    factory, sock=sock, start_serving=False, backlog=sockets.LISTEN_BACKLOG
                )
                pod.servers.append(server)
        pod.servers.append(HBONEListener(proxy, bound.inbound))
        if bound.dns:
            executor = pod.executor

            async def dns_socket(
                family: socket.AddressFamily, kind: socket.SocketKind
            ) -> socket.socket:
                try:
                    return await executor.run(socket.socket, family, kind)
                except NetnsError as e:
                    raise OSError(errno.ENETDOWN, str(e)) from None

            dns = DNSServer(
                cfg,
                proxy.local_workload,
                self.state,
                self.metrics,
                self.tasks,
                socket_factory=dns_socket,
            )
            await dns.attach(bound.dns)
            pod.servers.append(dns)

    async def start_serving(self) -> None:
        """The worker has its first snapshot: every pod bound so far starts accepting."""
        self.serving = True
        for uid, pod in tuple(self.pods.items()):
            try:
                await pod.start_serving()
            except OSError as e:
                log.error("worker %d: pod %s cannot serve: %s", self.index, uid, e)

    def remove(self, uid: str) -> None:
        pod = self.pods.pop(uid, None)
        if pod is None:
            return
        live = len(pod.tracker)
        pod.close()
        if pod.tracker in self.trackers:
            self.trackers.remove(pod.tracker)
        log.info(
            "worker %d: stopped serving pod %s (%s/%s), %d connections closed",
            self.index,
            uid,
            pod.info.namespace,
            pod.info.name,
            live,
        )

    # -- worker lifecycle -------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """Drain begins: no new pods, no new connections; live ones may finish."""
        self.draining = True
        for pod in self.pods.values():
            pod.stop_accepting()

    def close_proxies(self) -> None:
        """Drain is over: cut what is left."""
        for uid in list(self.pods):
            self.remove(uid)

    def close(self) -> None:
        self.close_proxies()
        self.channel.close()


def _bind_pod(config: Config) -> _Bound:
    """Bind the pod's listeners; runs on the pod's netns thread."""
    if config.listener_migration:
        _, why = sockets.enable_listener_migration()  # this thread is in the pod's netns
        if why is not None:
            log.debug("pod netns: cannot set %s (%s)", sockets.TCP_MIGRATE_REQ, why)
    mark = config.packet_mark
    host = _wildcard(config)
    opened: list[socket.socket] = []
    pairs: list[BoundPair] = []

    def listener(h: str, port: int) -> socket.socket:
        sock = sockets.bind_listener(h, port, reuse_port=True, mark=mark)
        opened.append(sock)
        return sock

    try:
        bound = _Bound(
            outbound=listener(host, config.outbound_port),
            inbound_plain=listener(host, config.inbound_plaintext_port),
            inbound=listener(host, config.inbound_port),
        )
        if config.socks5_enabled:
            bound.socks5 = listener("127.0.0.1", config.socks5_port)
        if config.dns_proxy:
            hosts = bind_hosts(config, lo_ipv6=ipv6_on_localhost())
            pairs = bind_pairs(hosts, config.dns_proxy_addr.port, mark)
            bound.dns = pairs
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return bound


def _wildcard(config: Config) -> str:
    """`::` (dual stack) when IPv6 is enabled and usable in this netns, else 0.0.0.0."""
    host = config.bind_any
    if host != "::":
        return host
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        return "0.0.0.0"
    with probe:
        try:
            probe.bind(("::", 0))
        except OSError:
            return "0.0.0.0"
    return host


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
