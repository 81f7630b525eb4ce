"""The supervisor: owns the authoritative state and the admin runtime, runs the workers.

Start order matters: ports are checked and the admin/stats/readiness servers bound first
(a port in use is a fatal start error), then workers are spawned (before any gRPC channel
could exist), then state sources start. Shutdown: stop taking new work, drain the workers
within the deadline, close the servers, exit 0.

Shared (in-pod) mode adds the ZDS client: started once the first state is in (local config
loaded, or the first xDS sync), it hands each pod's netns to the `PodManager`, which gets
every worker to serve the pod from inside that netns (reference §14).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from ztunnel import netns
from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.errors import ConfigError, ZtunnelError
from ztunnel.core.model import StateDelta
from ztunnel.core.state import ProxyState
from ztunnel.sockets import (
    SO_MARK,
    TCP_MIGRATE_REQ,
    BindError,
    enable_listener_migration,
    probe_port_free,
)
from ztunnel.supervisor import configdump
from ztunnel.supervisor.admin import admin_routes
from ztunnel.supervisor.aggregate import WorkerMetricsCollector
from ztunnel.supervisor.arbiter import Arbiter
from ztunnel.supervisor.caclient import CAClient
from ztunnel.supervisor.certs import (
    CertificateSource,
    CertManager,
    FakeCASource,
    wanted_identities,
)
from ztunnel.supervisor.channel import StateChannel
from ztunnel.supervisor.http import HTTPServer
from ztunnel.supervisor.localsource import LocalSource
from ztunnel.supervisor.metrics import build_registry, metrics_routes
from ztunnel.supervisor.pods import PodManager
from ztunnel.supervisor.readiness import Readiness, readiness_routes
from ztunnel.supervisor.xds import XDSClient
from ztunnel.supervisor.zds import READINESS_TASK as READY_WORKLOADS
from ztunnel.supervisor.zds import ZDSClient
from ztunnel.telemetry import LogControl
from ztunnel.version import BuildInfo

log = logging.getLogger(__name__)

READY_PROXY = "proxy"
READY_STATE = "state manager"
ON_DEMAND_TIMEOUT = 5.0  # seconds; upstream waits forever (inventory §19.7)
EXIT_GRACE = 2.0  # seconds past the drain deadline before workers are killed


class StartError(ZtunnelError):
    """A fatal start-up problem, reported as one clear line and exit status 1."""

    reason = "start"


class StateStore:
    """The authoritative state plus the Clone publisher that versions it."""

    def __init__(self, local_node: str | None, log_spec: Callable[[], str]) -> None:
        self.state = ProxyState.empty(local_node)
        self.publisher = ipc.ClonePublisher()
        self.channel: StateChannel | None = None
        self.published_at = time.monotonic()  # when the current version was published
        self.on_publish: Callable[[], None] = lambda: None
        self._log_spec = log_spec

    def apply(self, delta: StateDelta) -> None:
        if delta.is_empty():
            return
        self.state = self.state.apply(delta)
        self.publish(ipc.StateChanged(delta=delta))

    def publish(self, payload: ipc.Payload) -> None:
        msg = self.publisher.next(payload)
        self.published_at = time.monotonic()
        if self.channel is not None:
            self.channel.publish(msg)
        self.on_publish()

    def snapshot(self, certificates: tuple[ipc.WorkloadCertificate, ...] = ()) -> ipc.Snapshot:
        return ipc.Snapshot(
            seq=self.publisher.seq,
            state=self.state.to_snapshot(),
            certificates=certificates,
            log_spec=self._log_spec(),
        )


class Supervisor:
    def __init__(self, config: Config, logs: LogControl) -> None:
        self.config = config
        self.logs = logs
        self.readiness = Readiness()
        self.store = StateStore(config.node_name, logs.current)
        self.collector = WorkerMetricsCollector()
        self.runtime_dir = tempfile.mkdtemp(prefix="ztunnel-")  # mkdtemp creates it 0700
        self.arbiter: Arbiter | None = None
        self.servers: list[HTTPServer] = []
        self.local = LocalSource(config)
        self.certs: CertManager | None = None
        self.xds: XDSClient | None = None
        self._xds_task: asyncio.Task[None] | None = None
        self.registry: CollectorRegistry | None = None
        self._stop = asyncio.Event()
        self._fatal: str | None = None
        self._snapshot_cache: tuple[int, ipc.Snapshot] | None = None
        self._logged_seq = -1
        self._on_demand_tasks: set[asyncio.Task[None]] = set()
        self._watch_task: asyncio.Task[None] | None = None
        self.pods: PodManager | None = None
        self.zds: ZDSClient | None = None
        self._zds_task: asyncio.Task[None] | None = None
        self.store.on_publish = self._update_readiness
        # A level set through /logging applies to every worker, where the access log lives.
        logs.on_change = lambda spec: self.store.publish(ipc.LogLevelChanged(spec=spec))

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> int:
        try:
            await self._start()
        except (StartError, ConfigError, BindError, OSError) as e:
            log.error("failed to start: %s", _describe(e))
            await self._shutdown(grace=EXIT_GRACE)
            return 1
        self._install_signals()
        await self._stop.wait()
        await self._shutdown(grace=self.config.termination_deadline + EXIT_GRACE)
        if self._fatal is not None:
            log.error("%s", self._fatal)
            return 1
        log.info("shutdown complete")
        return 0

    async def _start(self) -> None:
        shared = self.config.proxy_mode == "shared"
        self.readiness.register(READY_STATE)
        self.readiness.register(READY_PROXY)
        if shared:
            self.readiness.register(READY_WORKLOADS)
            _verify_inpod_privileges()
        self._probe_data_plane_ports()
        if self.config.listener_migration:
            changed, why = enable_listener_migration()
            if why is not None:
                log.info(
                    "cannot set %s (%s): connections queued on a worker that dies are reset",
                    TCP_MIGRATE_REQ,
                    why,
                )
            elif changed:
                log.info(
                    "set %s to 1 in this network namespace (ZTUNNEL_LISTENER_MIGRATION=false "
                    "leaves it alone)",
                    TCP_MIGRATE_REQ,
                )
        await self._start_http()
        self.store.channel = StateChannel(self.runtime_dir)
        if shared:
            self.pods = PodManager(self.registry)
        self.arbiter = Arbiter(
            self.config.workers,
            runtime_dir=self.runtime_dir,
            channel=self.store.channel,
            snapshot=self._snapshot,
            collector=self.collector,
            on_fatal=self._on_fatal,
            on_progress=self._update_readiness,
            on_demand=self._on_demand,
            fd_channels=shared,
            on_worker_started=self.pods.worker_started if self.pods is not None else None,
        )
        log.info(
            "starting %d worker processes (%s)", self.config.workers, self.config.workers_source
        )
        await self.arbiter.start()
        # gRPC channels only from here on: every worker has been exec'd already.
        self.certs = CertManager(self._certificate_source(), self.store.publish)
        self.apply(self.local.load())
        loop = asyncio.get_running_loop()
        self._watch_task = loop.create_task(self.local.watch(self.apply), name="local-config-watch")
        if self.config.xds_address is None:
            self._on_synced()
        else:
            self.xds = XDSClient(
                self.config,
                state=lambda: self.store.state,
                on_update=self.apply,
                on_synced=self._on_synced,
                registry=self.registry,
            )
            self._xds_task = loop.create_task(self.xds.run(), name="xds")
        self._update_readiness()

    def _certificate_source(self) -> CertificateSource:
        cfg = self.config
        if cfg.fake_ca:
            return FakeCASource(cfg.fake_ca_dir, cfg.secret_ttl)
        return CAClient(cfg)

    def _on_synced(self) -> None:
        """The first state is in: ready as far as state goes, and (shared) pods may come."""
        self.readiness.mark_ready(READY_STATE)
        if self.pods is None or self._zds_task is not None:
            return
        self.zds = ZDSClient(self.config.inpod_uds, self.pods, readiness_pending=self._zds_pending)
        zds = self.zds
        self.pods.pending_source = lambda: zds.pending
        loop = asyncio.get_running_loop()
        self._zds_task = loop.create_task(self.zds.run(), name="zds")
        self._zds_task.add_done_callback(self._zds_done)
        log.info("in-pod mode: connecting to the node agent at %s", self.config.inpod_uds)

    def _zds_done(self, task: asyncio.Task[None]) -> None:
        """The ZDS client runs until cancelled; anything else ends ztunnel, as upstream."""
        if task.cancelled():
            return
        exc = task.exception()
        log.error("workload proxy manager failed", exc_info=exc)
        self._on_fatal(f"workload proxy manager failed: {exc or 'stopped'}")

    def _zds_pending(self, pending: bool) -> None:
        if pending:
            self.readiness.rearm(READY_WORKLOADS)
        else:
            self.readiness.mark_ready(READY_WORKLOADS)

    def _probe_data_plane_ports(self) -> None:
        cfg = self.config
        if not cfg.enable_proxy:
            return
        if cfg.proxy_mode == "shared":
            # In-pod listeners live in each pod's netns, not ours; only ztunnel's own
            # HBONE listener (when it has an identity) binds here.
            if cfg.ztunnel_identity() is not None:
                probe_port_free(cfg.bind_any, cfg.inbound_port)
            return
        for port in (cfg.outbound_port, cfg.inbound_plaintext_port, cfg.inbound_port):
            probe_port_free(cfg.bind_any, port)
        if cfg.socks5_enabled:
            probe_port_free("127.0.0.1", cfg.socks5_port)

    async def _start_http(self) -> None:
        cfg = self.config
        registry = build_registry(cfg.istio_version, pids=self._pids)
        registry.register(self.collector)
        self.registry = registry
        admin = HTTPServer(
            admin_routes(
                config_dump=self._config_dump, log_control=self.logs, on_quit=self.request_stop
            ),
            "admin",
        )
        stats = HTTPServer(metrics_routes(registry), "stats")
        ready = HTTPServer(readiness_routes(self.readiness), "readiness")
        for server, host, port in (
            (admin, _localhosts(cfg.ipv6_enabled), cfg.admin_port),
            (stats, _any_hosts(cfg.ipv6_enabled), cfg.stats_port),
            (ready, _any_hosts(cfg.ipv6_enabled), cfg.readiness_port),
        ):
            self.servers.append(server)
            try:
                await server.start(host, port)
            except OSError as e:
                what = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
                raise StartError(
                    f"failed to bind {server.name} server on port {port}: {what}"
                ) from e

    async def _shutdown(self, grace: float) -> None:
        for task in (self._zds_task, self._watch_task, self._xds_task):
            if task is not None:
                task.cancel()
        if self._zds_task is not None:
            # Stop reading ZDS first (upstream drains every pod's proxy on global drain).
            await asyncio.gather(self._zds_task, return_exceptions=True)
        if self.certs is not None:
            self.certs.stop()
            if isinstance(self.certs.source, CAClient):
                await self.certs.source.close()
        if self.arbiter is not None:
            await self.arbiter.stop(grace)
        if self.pods is not None:
            await self.pods.close()
        for server in self.servers:
            await server.close(grace=1.0)
        if self.store.channel is not None:
            self.store.channel.close()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_sigint)

    def _on_sigint(self) -> None:
        if self._stop.is_set():
            log.warning("Double Ctrl+C, exiting immediately")
            os._exit(0)
        self.request_stop()

    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info(
                "received shutdown request, draining for up to %.1fs",
                self.config.termination_deadline,
            )
            self._stop.set()

    def _on_fatal(self, reason: str) -> None:
        self._fatal = self._fatal or reason
        self._stop.set()

    # -- readiness, state, admin ----------------------------------------------------------------

    def _update_readiness(self) -> None:
        """Called on every worker ack, worker exit and publish: is every worker current?"""
        if self.arbiter is None:
            return
        seq = self.store.publisher.seq
        if not self.arbiter.all_current(seq):
            self.readiness.rearm(READY_PROXY)
            return
        self.readiness.mark_ready(READY_PROXY)
        if seq != self._logged_seq:
            self._logged_seq = seq
            elapsed = (time.monotonic() - self.store.published_at) * 1000
            log.info(
                "state version %d applied by all %d workers (%.1f ms after publish)",
                seq,
                len(self.arbiter.slots),
                elapsed,
            )

    def apply(self, delta: StateDelta) -> None:
        """Apply a state change, then make sure the certificates it implies are wanted."""
        self.store.apply(delta)
        if self.certs is not None:
            self.certs.want(wanted_identities(self.store.state, self.config))

    def _on_demand(self, identity: bytes, msg: ipc.OnDemandRequest) -> None:
        """A worker missed an address: ask istiod for it, then answer with the state version."""

        async def ask() -> None:
            found = False
            if self.xds is not None:
                found = await self.xds.request(msg.name, timeout=ON_DEMAND_TIMEOUT)
            if self.store.channel is not None:
                seq = self.store.publisher.seq
                reply = ipc.OnDemandReply(request_id=msg.request_id, found=found, seq=seq)
                self.store.channel.send(identity, reply)

        task = asyncio.get_running_loop().create_task(ask(), name=f"on-demand {msg.name}")
        self._on_demand_tasks.add(task)
        task.add_done_callback(self._on_demand_tasks.discard)

    def _snapshot(self) -> ipc.Snapshot:
        seq = self.store.publisher.seq
        if self._snapshot_cache is None or self._snapshot_cache[0] != seq:
            certs = self.certs.snapshot() if self.certs is not None else ()
            self._snapshot_cache = (seq, self.store.snapshot(certs))
        return self._snapshot_cache[1]

    def _pids(self) -> list[int]:
        return [os.getpid(), *(self.arbiter.pids() if self.arbiter else ())]

    def _config_dump(self) -> dict[str, object]:
        dump = configdump.build(
            self.store.state,
            static=self.local.reread(),
            build=BuildInfo.current(),
            config=self.config,
            certificates=self.certs.dump() if self.certs is not None else [],
        )
        if self.pods is not None:
            dump["workloadState"] = self.pods.dump()
        return dump


def _verify_inpod_privileges() -> None:
    """In-pod mode enters pod netns and marks sockets: fail at start without the privileges
    (upstream `WorkloadProxyManager::verify_syscalls`)."""
    try:
        netns.verify_setns()
    except (netns.NetnsError, OSError) as e:
        raise StartError(f"failed to set netns: {e}. make sure ztunnel has CAP_SYS_ADMIN") from e
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, 1337)
    except OSError as e:
        raise StartError(
            "failed to set socket mark: failed to set mark on socket. make sure ztunnel has "
            f"CAP_NET_RAW, CAP_NET_ADMIN. error: {e}"
        ) from e


def _localhosts(ipv6: bool) -> list[str]:
    return ["127.0.0.1", "::1"] if ipv6 and _ipv6_localhost() else ["127.0.0.1"]


def _any_hosts(ipv6: bool) -> list[str]:
    """Wildcard binds: asyncio makes `::` IPv6-only, so IPv4 is bound separately."""
    return ["0.0.0.0", "::"] if ipv6 and os.path.exists("/proc/net/if_inet6") else ["0.0.0.0"]


def _ipv6_localhost() -> bool:
    """`[::1]` only when IPv6 is not disabled on lo (upstream `ipv6_enabled_on_localhost`)."""
    try:
        with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as f:
            return f.read().strip() == "0"
    except OSError:
        return False


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)
