"""The worker process: state follower, listeners, heartbeats, drain.

A worker binds its own SO_REUSEPORT listeners (the kernel spreads connections across
workers), follows the supervisor's state with the Clone pattern, and never blocks on the
supervisor on the data path: it serves from the last state it has.

Dedicated mode: one proxy, its listeners in the worker's own netns. Shared (in-pod) mode:
one proxy per pod, created by `workers.inpod.InPodManager` as pods arrive on the fd
channel, each with listeners inside its pod's netns and a connection tracker of its own;
drain, metrics and policy rechecks go over every tracker in `trackers`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq
import zmq.asyncio

from workers import authz
from workers.dns import DNSServer, bind_hosts
from workers.inbound import HBONEListener
from workers.inpod import InPodManager
from workers.metrics import WorkerMetrics
from workers.proxy import Proxy
from workers.revocation import Revocation
from workers.tasks import TaskSet
from workers.tracking import ConnectionTracker
from ztunnel import sockets, tls
from ztunnel.core import ipc
from ztunnel.core.config import Config, WorkloadInfo
from ztunnel.core.errors import SchemaMismatch
from ztunnel.core.state import ProxyState
from ztunnel.telemetry import LogControl

log = logging.getLogger(__name__)

ON_DEMAND_TIMEOUT = 6.0  # seconds; the supervisor gives up after 5 s (upstream never does)
HEARTBEAT_INTERVAL = 1.0  # seconds; also the metrics push period


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The supervisor's ZeroMQ endpoints (ipc:// in a 0700 runtime directory)."""

    pub: str
    router: str

    @classmethod
    def in_dir(cls, runtime_dir: str) -> Endpoints:
        return cls(
            pub=f"ipc://{runtime_dir}/state.pub", router=f"ipc://{runtime_dir}/control.router"
        )


class Worker:
    def __init__(
        self,
        config: Config,
        index: int,
        endpoints: Endpoints,
        logs: LogControl,
        *,
        fd_channel: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.endpoints = endpoints
        self.logs = logs
        self.state = ProxyState.empty(config.node_name)
        self.follower = ipc.CloneFollower()
        self.metrics = WorkerMetrics()
        self.tracker = ConnectionTracker(self.metrics)
        self.trackers: list[ConnectionTracker] = [self.tracker]  # + one per pod (shared mode)
        self.tasks = TaskSet()
        self.servers: list[asyncio.Server | HBONEListener | DNSServer] = []
        self.certs: dict[str, ipc.WorkloadCertificate] = {}
        self._demands: dict[int, asyncio.Future[ipc.OnDemandReply]] = {}
        self._seq_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._demand_ids = 0
        self.contexts = tls.ContextCache()
        self.revocation = (
            Revocation(config.crl_path, self.metrics, self.trackers) if config.crl_path else None
        )
        self.proxies: list[Proxy] = []
        self.listening = False
        self.inpod: InPodManager | None = None
        if fd_channel is not None:
            self.inpod = InPodManager(
                config,
                fd_channel,
                index=index,
                state=lambda: self.state,
                certs=lambda: self.certs,
                contexts=self.contexts,
                tasks=self.tasks,
                metrics=self.metrics,
                trackers=self.trackers,
                on_demand=self.on_demand if config.xds_on_demand else None,
                revocation=self.revocation,
            )
        self._stop = asyncio.Event()
        self._exit_code = ipc.EXIT_OK
        self._ctx = zmq.asyncio.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._dealer = self._ctx.socket(zmq.DEALER)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self._connect_channel()
        try:
            await self._bind_listeners()
        except sockets.BindError as e:
            log.error("worker %d: %s", self.index, e.strerror)
            self._close_channel()
            return ipc.EXIT_BOOT_ERROR
        self._send(ipc.Hello(index=self.index, pid=os.getpid()))
        self.tasks.spawn(self._recv_loop(self._sub, self._on_pub), name="state-sub")
        self.tasks.spawn(self._recv_loop(self._dealer, self._on_direct), name="control")
        self.tasks.spawn(self._heartbeat(), name="heartbeat")
        if self.revocation is not None:
            self.tasks.spawn(self.revocation.watch(), name="crl-watch")
        if self.inpod is not None:
            self.tasks.spawn(self.inpod.run(), name="fd-channel")
        await self._stop.wait()
        if self._exit_code == ipc.EXIT_OK:
            await self._drain()
        await self.tasks.cancel_all()
        if self.inpod is not None:
            self.inpod.close()
        self._send(self._metrics_push(final=True))
        self._close_channel()
        return self._exit_code

    def _connect_channel(self) -> None:
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(self.endpoints.pub)
        self._dealer.setsockopt(zmq.IDENTITY, f"w{self.index}-{os.getpid()}".encode())
        self._dealer.connect(self.endpoints.router)

    def _close_channel(self) -> None:
        self._sub.close(linger=0)
        self._dealer.close(linger=2000)  # let the final metrics push leave
        self._ctx.term()

    async def _drain(self) -> None:
        """Stop accepting; let connections finish until the deadline; then cut them."""
        for server in self.servers:
            server.close()
        if self.inpod is not None:
            self.inpod.stop_accepting()
        trackers = tuple(self.trackers)
        try:
            async with asyncio.timeout(self.config.termination_deadline):
                await asyncio.gather(*(t.wait_empty() for t in trackers))
        except TimeoutError:
            log.info(
                "worker %d: drain deadline reached, closing %d connections",
                self.index,
                sum(len(t) for t in trackers),
            )
        for tracker in trackers:
            for conn in tracker:
                conn.error = conn.error or "connection closed due to connection drain"
                conn.flow.abort()
        for proxy in self.proxies:
            proxy.close()
        if self.inpod is not None:
            self.inpod.close_proxies()
        await asyncio.sleep(0.05)  # let connection_lost callbacks account the aborted ones

    # -- listeners ----------------------------------------------------------------------------

    async def _bind_listeners(self) -> None:
        info = self.config.workload_info
        if info is None:
            self._bind_self_listener()
            return
        if self.config.dns_proxy:  # upstream runs DNS even with ENABLE_PROXY=false
            await self._bind_dns(info)
        if not self.config.enable_proxy:
            return
        proxy = self._new_proxy(info, on_demand=self.config.xds_on_demand)
        any_addr, cfg = self.config.bind_any, self.config
        await self._serve(any_addr, cfg.outbound_port, proxy.outbound_protocol)
        await self._serve(any_addr, cfg.inbound_plaintext_port, proxy.inbound_plaintext_protocol)
        self.servers.append(HBONEListener(proxy, sockets.bind_listener(any_addr, cfg.inbound_port)))
        if cfg.socks5_enabled:
            await self._serve("127.0.0.1", cfg.socks5_port, proxy.socks5_protocol)

    def _new_proxy(self, info: WorkloadInfo, *, on_demand: bool) -> Proxy:
        """A proxy in this worker's own netns, counted by the worker's own tracker."""
        proxy = Proxy(
            self.config,
            info=info,
            state=lambda: self.state,
            certs=lambda: self.certs,
            tracker=self.tracker,
            tasks=self.tasks,
            contexts=self.contexts,
            on_demand=self.on_demand if on_demand else None,
            revocation=self.revocation,
        )
        self.proxies.append(proxy)
        return proxy

    def _bind_self_listener(self) -> None:
        """Shared mode: ztunnel's own workload gets HBONE on 15008 in ztunnel's netns.

        Upstream's "self" inbound listener (`create_ztunnel_self_proxy_listener`): only
        when POD_NAME, POD_NAMESPACE and SERVICE_ACCOUNT are all set. It serves whatever
        workload matches them in the state (certificate from the supervisor, the usual
        inbound checks and AuthorizationPolicies), so a CONNECT to the metrics port reaches
        the metrics server. No outbound, plaintext inbound or DNS listeners; upstream
        sockets are plain (no source spoofing). Dedicated mode has no such listener.
        """
        cfg = self.config
        own = cfg.ztunnel_identity()
        if cfg.proxy_mode != "shared" or own is None or not cfg.enable_proxy:
            return
        proxy = self._new_proxy(own, on_demand=False)
        sock = sockets.bind_listener(cfg.bind_any, cfg.inbound_port)
        self.servers.append(HBONEListener(proxy, sock))

    async def _bind_dns(self, info: WorkloadInfo) -> None:
        cfg = self.config
        server = DNSServer(
            cfg,
            lambda: self.state.find_by_info(info.name, info.namespace, info.service_account),
            lambda: self.state,
            self.metrics,
            self.tasks,
        )
        await server.bind(bind_hosts(cfg), cfg.dns_proxy_addr.port)
        self.servers.append(server)

    async def _serve(
        self, host: str, port: int, factory: Callable[[], asyncio.BaseProtocol]
    ) -> None:
        sock = sockets.bind_listener(host, port)
        loop = asyncio.get_running_loop()
        # Bound now, accepting after the first snapshot: early connections wait in the backlog.
        server = await loop.create_server(
            factory, sock=sock, start_serving=False, backlog=sockets.LISTEN_BACKLOG
        )
        self.servers.append(server)

    async def _start_serving(self) -> None:
        for server in self.servers:
            await server.start_serving()
        if self.inpod is not None:
            await self.inpod.start_serving()  # pods that arrived before the first snapshot
        self.listening = True
        self._ack()

    # -- state channel ------------------------------------------------------------------------

    async def _recv_loop(
        self, sock: zmq.asyncio.Socket, handle: Callable[[ipc.ToWorker], None]
    ) -> None:
        while True:
            data = await sock.recv()
            try:
                msg = ipc.decode_to_worker(data)
            except SchemaMismatch as e:
                log.error("worker %d: %s; exiting", self.index, e)
                self._exit_code = ipc.EXIT_SCHEMA_MISMATCH
                self._stop.set()
                return
            except msgspec.DecodeError as e:
                log.error(
                    "worker %d: undecodable message from supervisor dropped: %s", self.index, e
                )
                continue
            handle(msg)

    def _on_pub(self, msg: ipc.ToWorker) -> None:
        if not isinstance(msg, ipc.Published):
            return
        verdict = self.follower.on_published(msg)
        if verdict is ipc.Verdict.APPLY:
            self._apply(msg.payload)
            self._ack()
        elif verdict is ipc.Verdict.RESYNC:
            log.info("worker %d: gap at seq %d, asking for a snapshot", self.index, msg.seq)
            self._send(ipc.ResyncRequest(have_seq=self.follower.seq or 0))

    async def on_demand(self, name: str) -> bool:
        """XDS_ON_DEMAND: ask the supervisor for `name`; True once its answer is applied."""
        self._demand_ids += 1
        request_id = self._demand_ids
        fut: asyncio.Future[ipc.OnDemandReply] = asyncio.get_running_loop().create_future()
        self._demands[request_id] = fut
        self._send(ipc.OnDemandRequest(request_id=request_id, name=name))
        try:
            async with asyncio.timeout(ON_DEMAND_TIMEOUT):
                reply = await fut
                # The answer's state travels on the sequenced channel; wait until applied.
                await self._applied_up_to(reply.seq)
        except TimeoutError:
            log.warning("worker %d: on-demand lookup of %s timed out", self.index, name)
            return False
        finally:
            self._demands.pop(request_id, None)
        return reply.found

    async def _applied_up_to(self, seq: int) -> None:
        if (self.follower.seq or 0) >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq_waiters.append((seq, fut))
        await fut

    def _wake_seq_waiters(self) -> None:
        have = self.follower.seq or 0
        keep = []
        for seq, fut in self._seq_waiters:
            if seq <= have:
                if not fut.done():
                    fut.set_result(None)
            elif not fut.done():
                keep.append((seq, fut))
        self._seq_waiters = keep

    def _on_direct(self, msg: ipc.ToWorker) -> None:
        if isinstance(msg, ipc.OnDemandReply):
            fut = self._demands.get(msg.request_id)
            if fut is not None and not fut.done():
                fut.set_result(msg)
            return
        if not isinstance(msg, ipc.Snapshot):
            return
        first = self.follower.seq is None
        ready = self.follower.on_snapshot(msg)
        self.state = ProxyState.from_snapshot(msg.state, self.config.node_name)
        self.certs = {c.identity: c for c in msg.certificates}
        if msg.log_spec != self.logs.current():
            self.logs.set(msg.log_spec)
        for published in ready:
            self._apply(published.payload)
        if self.follower.resyncing:
            self._send(ipc.ResyncRequest(have_seq=self.follower.seq or 0))
        if first:
            self.tasks.spawn(self._start_serving(), name="start-serving")
        self._ack()

    def _apply(self, payload: ipc.Payload) -> None:
        if isinstance(payload, ipc.StateChanged):
            self.state = self.state.apply(payload.delta)
            if payload.delta.touches_policies():
                info = self.config.authz_policy_info_logging
                for tracker in tuple(self.trackers):
                    authz.recheck(tracker, self.state, info_logging=info)
        elif isinstance(payload, ipc.CertificatesChanged):
            certs = dict(self.certs)
            certs.update((c.identity, c) for c in payload.updated)
            for identity in payload.removed:
                certs.pop(identity, None)
                self.contexts.forget(identity)
            self.certs = certs
        elif isinstance(payload, ipc.LogLevelChanged):
            self.logs.set(payload.spec)

    def _ack(self) -> None:
        if self.follower.seq is not None:
            self._send(ipc.Ack(seq=self.follower.seq, listening=self.listening))
            if self._seq_waiters:
                self._wake_seq_waiters()

    def _send(self, msg: ipc.FromWorker) -> None:
        try:
            self._dealer.send(ipc.encode(msg), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("worker %d: supervisor channel full, message dropped", self.index)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            self._ack()
            self._send(self._metrics_push())

    def _metrics_push(self, *, final: bool = False) -> ipc.MetricsPush:
        for tracker in self.trackers:
            tracker.fold_live_bytes()
        return self.metrics.take_push(final=final)
