"""One workload's proxy inside a worker: outbound (15001), inbound plaintext (15006), SOCKS5.

Upstream's ProxyFactory builds one proxy per captured workload (one in dedicated mode, one
per pod in shared mode); each owns its listeners and its connections. This module holds
the glue from accepted sockets to the relay; the decisions come from `ztunnel.core`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from workers.relay import Relay, RelaySide
from workers.tasks import TaskSet
from workers.tracking import ConnectionTracker, Tracked, log_failed
from ztunnel import sockets
from ztunnel.core import metrics as m
from ztunnel.core.config import Config, WorkloadInfo
from ztunnel.core.model import Service, Workload
from ztunnel.core.socks5 import (
    REPLY_CONNECTION_REFUSED,
    REPLY_HOST_UNREACHABLE,
    SUCCESS_REPLY,
    Socks5Error,
    Socks5Negotiation,
    error_reply,
)
from ztunnel.core.state import ProxyState

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # upstream CONNECTION_TIMEOUT (src/proxy.rs)


@dataclass(frozen=True, slots=True)
class Route:
    """Where an accepted connection goes, and what its metrics say about it."""

    ip: str
    port: int
    labels: m.TrafficLabels
    dst_workload: str | None


class Proxy:
    """The proxy of one workload: creates listener protocols and owns their connections."""

    def __init__(
        self,
        config: Config,
        info: WorkloadInfo,
        state: Callable[[], ProxyState],
        tracker: ConnectionTracker,
        tasks: TaskSet,
    ) -> None:
        self.config = config
        self.info = info
        self._state = state
        self.tracker = tracker
        self.tasks = tasks

    # -- lookups ------------------------------------------------------------------------------

    def local_workload(self) -> Workload | None:
        return self._state().find_by_info(
            self.info.name, self.info.namespace, self.info.service_account
        )

    def _destination(self, ip: str, source: Workload) -> tuple[Workload | None, Service | None]:
        state = self._state()
        network = self.config.network
        svc = state.best_service_by_vip(network, ip, source.namespace)
        return state.workload_by_ip(network, ip), svc

    # -- outbound -----------------------------------------------------------------------------

    def outbound_protocol(self) -> RelaySide:
        return self._new_relay("source", lambda r: _OutboundDownstream(r, self)).downstream

    def socks5_protocol(self) -> RelaySide:
        return self._new_relay("source", lambda r: _Socks5Downstream(r, self)).downstream

    def plan_outbound(self, src: str, dst_ip: str, dst_port: int) -> Route | str:
        """The outbound request plan; a string is the reason to drop the connection."""
        if sockets.is_loopback(dst_ip) and dst_port in self.config.illegal_ports:
            return "attempted recursive call to ourselves"
        source = self.local_workload()
        if source is None:
            return "failed to fetch information about local workload"
        dst_workload, svc = self._destination(dst_ip, source)
        # Until HBONE routing exists every destination is reached as plain TCP at the
        # original address: upstream's passthrough for destinations outside the mesh.
        labels = m.TrafficLabels(
            reporter="source", source=source, destination=dst_workload, destination_service=svc
        )
        return Route(dst_ip, dst_port, labels, _workload_name(dst_workload))

    # -- inbound plaintext --------------------------------------------------------------------

    def inbound_plaintext_protocol(self) -> RelaySide:
        return self._new_relay("destination", lambda r: _InboundDownstream(r, self)).downstream

    def plan_inbound_plaintext(self, src: str, dst_ip: str, dst_port: int) -> Route | str:
        if dst_port in self.config.illegal_ports:
            return "attempted recursive call to ourselves"
        local = self.local_workload()
        if local is None:
            return "failed to fetch information about local workload"
        state = self._state()
        source = state.workload_by_ip(self.config.network, src)
        svc = _guess_inbound_service(state, local, dst_port)
        labels = m.TrafficLabels(
            reporter="destination", source=source, destination=local, destination_service=svc
        )
        return Route(dst_ip, dst_port, labels, _workload_name(local))

    # -- shared ---------------------------------------------------------------------------------

    def _new_relay(self, reporter: m.Reporter, downstream: Callable[[Relay], RelaySide]) -> Relay:
        self.tracker.socket_opened(reporter)

        def done(relay: Relay) -> None:
            self.tracker.socket_closed(reporter)
            conn = relay.tracked
            if isinstance(conn, Tracked):
                if relay.error is not None and conn.error is None:
                    conn.error = str(relay.error) or type(relay.error).__name__
                self.tracker.closed(conn)

        return Relay(done, downstream)

    def start(
        self, side: RelaySide, src: str, route: Route, reporter: m.Reporter, early: bytes = b""
    ) -> None:
        conn = Tracked(
            relay=side.relay,
            labels=route.labels,
            src_addr=src,
            dst_addr=sockets.format_addr(route.ip, route.port),
            src_workload=_workload_name(route.labels.source),
            dst_workload=route.dst_workload,
        )
        side.relay.tracked = conn
        self.tracker.opened(conn)
        self.tasks.spawn(self._connect(conn, route, early), name="connect")

    async def _connect(self, conn: Tracked, route: Route, early: bytes) -> None:
        relay = conn.relay
        loop = asyncio.get_running_loop()
        try:
            sock = sockets.new_upstream_socket(route.ip, self.config)
        except OSError as e:
            self._connect_failed(conn, e)
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (route.ip, route.port))
            await loop.create_connection(lambda: relay.upstream, sock=sock)
        except (OSError, TimeoutError) as e:
            sock.close()
            self._connect_failed(conn, e)
            return
        if (
            relay.done
            or relay.downstream.transport is None
            or relay.downstream.transport.is_closing()
        ):
            relay.abort()
            return
        if early and relay.upstream.transport is not None:
            relay.downstream.bytes_in += len(early)
            relay.upstream.transport.write(early)
        relay.start()

    def _connect_failed(self, conn: Tracked, exc: BaseException) -> None:
        conn.response_flags = "CONNECT"
        conn.error = _describe(exc)
        downstream = conn.relay.downstream.transport
        if downstream is not None:
            downstream.abort()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "connection timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return f"io error: {exc.strerror} (os error {exc.errno})"
    return str(exc) or type(exc).__name__


def _workload_name(w: Workload | None) -> str | None:
    """`src.workload` / `dst.workload`: the pod name, falling back to the canonical name."""
    if w is None:
        return None
    return w.name or w.canonical_name or None


def _guess_inbound_service(state: ProxyState, local: Workload, port: int) -> Service | None:
    """First service of the workload whose target port, or our endpoint's mapping, is `port`."""
    for svc in state.services_for_workload(local):
        if port in svc.ports.values():
            return svc
        ports = local.services.get(svc.key(), {})
        if port in ports.values():
            return svc
    return None


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return sockets.format_addr(sockets.canonical_ip(peer[0]), peer[1])


class _OutboundDownstream(RelaySide):
    """Accepted on 15001: original destination from SO_ORIGINAL_DST."""

    __slots__ = ("proxy",)

    def __init__(self, relay: Relay, proxy: Proxy) -> None:
        super().__init__(relay)
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        sock: socket.socket = transport.get_extra_info("socket")
        sockets.set_keepalive(sock, self.proxy.config)
        src = _peer(transport)
        dst_ip, dst_port = sockets.original_dst(sock)
        self._route(src, dst_ip, dst_port)

    def _route(self, src: str, dst_ip: str, dst_port: int) -> None:
        assert self.transport is not None
        plan = self.proxy.plan_outbound(src, dst_ip, dst_port)
        if isinstance(plan, str):
            log_failed(src, sockets.format_addr(dst_ip, dst_port), "source", plan)
            self.transport.abort()
            return
        self.proxy.start(self, src, plan, "source")


class _InboundDownstream(RelaySide):
    """Accepted on 15006: plaintext to a local workload, original destination kept."""

    __slots__ = ("proxy",)

    def __init__(self, relay: Relay, proxy: Proxy) -> None:
        super().__init__(relay)
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        sock: socket.socket = transport.get_extra_info("socket")
        sockets.set_keepalive(sock, self.proxy.config)
        peer = transport.get_extra_info("peername")
        src_ip = sockets.canonical_ip(peer[0])
        src = sockets.format_addr(src_ip, peer[1])
        dst_ip, dst_port = sockets.original_dst(sock)
        plan = self.proxy.plan_inbound_plaintext(src_ip, dst_ip, dst_port)
        if isinstance(plan, str):
            log_failed(src, sockets.format_addr(dst_ip, dst_port), "destination", plan)
            self.transport.abort()
            return
        self.proxy.start(self, src, plan, "destination")


class _Socks5Downstream(RelaySide):
    """Accepted on 15080: SOCKS5 negotiation, then the outbound plan for the named target."""

    __slots__ = ("negotiation", "proxy")

    def __init__(self, relay: Relay, proxy: Proxy) -> None:
        super().__init__(relay)
        self.proxy = proxy
        self.negotiation: Socks5Negotiation | None = Socks5Negotiation()

    def data_received(self, data: bytes) -> None:
        if self.negotiation is None:
            super().data_received(data)
            return
        assert self.transport is not None
        try:
            out, target = self.negotiation.feed(data)
        except Socks5Error as e:
            log.warning("failed to negotiate socks connection: %s", e)
            self.transport.write(e.reply())
            self.transport.close()
            self.negotiation = None
            return
        if out:
            self.transport.write(out)
        if target is None:
            return
        early = self.negotiation.leftover()
        self.negotiation = None
        self.transport.pause_reading()
        self.proxy.tasks.spawn(
            self._resolve_and_route(target.host, target.port, target.is_domain, early),
            name="socks5",
        )

    def eof_received(self) -> bool:
        if self.negotiation is not None:
            return False  # closed mid-negotiation
        return super().eof_received()

    async def _resolve_and_route(self, host: str, port: int, is_domain: bool, early: bytes) -> None:
        assert self.transport is not None
        src = _peer(self.transport)
        ip = await self._resolve(host, src) if is_domain else host
        if ip is None:
            self.transport.write(error_reply(REPLY_HOST_UNREACHABLE))
            self.transport.close()
            return
        plan = self.proxy.plan_outbound(src, ip, port)
        if isinstance(plan, str):
            log_failed(src, sockets.format_addr(ip, port), "source", plan)
            self.transport.write(error_reply(REPLY_CONNECTION_REFUSED))
            self.transport.close()
            return
        # Upstream answers success before connecting (src/proxy/socks5.rs).
        self.transport.write(SUCCESS_REPLY)
        self.proxy.start(self, src, plan, "source", early)

    async def _resolve(self, host: str, src: str) -> str | None:
        """Mesh service names resolve to their VIP; other names through the system resolver."""
        state = self.proxy._state()
        for svc in state.services_by_hostname(host):
            for vip in svc.vips:
                if vip.network == self.proxy.config.network:
                    return vip.address
        family = socket.AF_INET6 if src.startswith("[") else socket.AF_INET
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_STREAM)
        except OSError as e:
            log.warning("socks5 lookup of %s failed: %s", host, e)
            return None
        return sockets.canonical_ip(str(infos[0][4][0])) if infos else None
