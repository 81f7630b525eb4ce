"""One workload's proxy in a worker: outbound (15001), SOCKS5 (15080), inbound plaintext (15006).

Upstream's ProxyFactory builds one proxy per captured workload (one in dedicated mode, one
per pod in shared mode); each owns its listeners, its HBONE pool and its connections. This
module is glue: the routing plan comes from `ztunnel.core.routing`, the HTTP/2 work from
`ztunnel.core.hbone`; here sockets are connected and handed over.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from workers import authz, double
from workers.accept import Accepted
from workers.pool import HBONEClientProtocol, Pool, PoolError, WorkloadKey
from workers.relay import Relay
from workers.revocation import Revocation
from workers.tasks import TaskSet
from workers.tracking import ConnectionTracker, Tracked, log_failed
from workers.tunnel import H2Protocol, TunnelLeg
from ztunnel import sockets, tls
from ztunnel.core import hbone, rbac, routing
from ztunnel.core import metrics as m
from ztunnel.core.config import Config, WorkloadInfo
from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.core.model import Workload
from ztunnel.core.socks5 import REPLY_HOST_UNREACHABLE, SUCCESS_REPLY, Socks5Target, error_reply
from ztunnel.core.state import ProxyState

log = logging.getLogger(__name__)

SocketFactory = Callable[[str], Awaitable[socket.socket]]
OnDemand = Callable[[str], Awaitable[bool]]
CONNECT_TIMEOUT = 10.0  # upstream CONNECTION_TIMEOUT (src/proxy.rs)
RESPONSE_TIMEOUT = 10.0  # CONNECT sent, no response: give up on this stream
CLOSED_ERROR = "connection closed because the proxy was stopped"
CERT_WAIT = 5.0  # a certificate still on its way from the CA: wait this long, then fail
CERT_POLL = 0.02


@dataclass(slots=True)
class TunnelFlow:
    """Byte counts of an HBONE stream in upstream's metric directions."""

    leg: TunnelLeg
    outbound: bool  # the leg is the downstream client (outbound) or the local app (inbound)

    @property
    def received(self) -> int:
        return self.leg.bytes_to_stream if self.outbound else self.leg.bytes_from_stream

    @property
    def sent(self) -> int:
        return self.leg.bytes_from_stream if self.outbound else self.leg.bytes_to_stream

    def abort(self) -> None:
        self.leg.abort()


class Proxy:
    """The proxy of one workload: listener protocols, routing, its pool and connections."""

    def __init__(
        self,
        config: Config,
        *,
        info: WorkloadInfo,
        state: Callable[[], ProxyState],
        certs: Callable[[], Mapping[str, WorkloadCertificate]],
        tracker: ConnectionTracker,
        tasks: TaskSet,
        contexts: tls.ContextCache,
        new_socket: SocketFactory | None = None,
        on_demand: OnDemand | None = None,
        revocation: Revocation | None = None,
    ) -> None:
        self.config = config
        self.revocation = revocation  # CRL_PATH in force, or None
        self.on_demand = on_demand  # XDS_ON_DEMAND: ask the supervisor for a missed address
        # Upstream sockets: in this process's netns, or (in-pod mode) in the pod's.
        self.new_socket: SocketFactory = new_socket or self._local_socket
        self.info = info
        self.state = state
        self.certs = certs
        self.tracker = tracker
        self.tasks = tasks
        self.contexts = contexts
        self.pool = Pool(config, contexts, self.new_socket, revocation)
        self.inbound_connections: set[H2Protocol] = set()  # HBONE server connections
        self.rng = random.Random()
        self.closed = False  # closed (its pod is gone): connections still connecting give up

    async def _local_socket(self, ip: str) -> socket.socket:
        return sockets.new_upstream_socket(ip, self.config)

    def local_workload(self) -> Workload | None:
        return self.state().find_by_info(
            self.info.name, self.info.namespace, self.info.service_account
        )

    def certificate(self, w: Workload) -> WorkloadCertificate | None:
        return self.certs().get(w.identity())

    async def await_certificate(self, w: Workload) -> WorkloadCertificate | None:
        """The workload's certificate, waiting up to CERT_WAIT for one not yet delivered.

        Right after start-up, or for a workload that just arrived, the supervisor may still be
        fetching it from the CA; upstream's connection waits for that fetch too. Only this
        miss path polls; a certificate already held is returned at once.
        """
        cert = self.certificate(w)
        if cert is not None:
            return cert
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CERT_WAIT
        while cert is None and loop.time() < deadline and not self.closed:
            await asyncio.sleep(CERT_POLL)
            cert = self.certificate(w)
        return cert

    # -- listener protocol factories -------------------------------------------------------------

    def outbound_protocol(self) -> Accepted:
        return self._accepted("source", lambda acc, _: self._outbound_accepted(acc))

    def socks5_protocol(self) -> Accepted:
        return self._accepted("source", self._socks5_target, socks5=True)

    def inbound_plaintext_protocol(self) -> Accepted:
        return self._accepted("destination", lambda acc, _: self._inbound_plain_accepted(acc))

    def _accepted(
        self,
        reporter: m.Reporter,
        on_target: Callable[[Accepted, Socks5Target | None], None],
        *,
        socks5: bool = False,
    ) -> Accepted:
        self.tracker.socket_opened(reporter)
        acc = Accepted(on_target, socks5=socks5)
        closed = False

        def socket_closed(_: object = None) -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.tracker.socket_closed(reporter)

        acc.on_lost = socket_closed
        acc.on_finished = socket_closed
        return acc

    # -- outbound -------------------------------------------------------------------------------

    def _outbound_accepted(self, acc: Accepted) -> None:
        assert acc.transport is not None
        sock: socket.socket = acc.transport.get_extra_info("socket")
        sockets.set_keepalive(sock, self.config)
        dst_ip, dst_port = sockets.original_dst(sock)
        self._route_outbound(acc, dst_ip, dst_port)

    def _socks5_target(self, acc: Accepted, target: Socks5Target | None) -> None:
        assert target is not None and acc.transport is not None
        if target.is_domain:
            self.tasks.spawn(self._socks5_resolve(acc, target), name="socks5-resolve")
            return
        # Upstream answers success before connecting (src/proxy/socks5.rs).
        acc.transport.write(SUCCESS_REPLY)
        self._route_outbound(acc, target.host, target.port)

    async def _socks5_resolve(self, acc: Accepted, target: Socks5Target) -> None:
        ip = await self._resolve(target.host, acc.peer[0])
        if ip is None:
            acc.reject(error_reply(REPLY_HOST_UNREACHABLE))
            return
        assert acc.transport is not None
        acc.transport.write(SUCCESS_REPLY)
        self._route_outbound(acc, ip, target.port)

    async def _resolve(self, host: str, client_ip: str) -> str | None:
        """Mesh service names resolve to their VIP; other names through the system resolver."""
        for svc in self.state().services_by_hostname(host):
            for vip in svc.vips:
                if vip.network == self.config.network:
                    return vip.address
        family = socket.AF_INET6 if ":" in client_ip else socket.AF_INET
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, family=family, type=socket.SOCK_STREAM
            )
        except OSError as e:
            log.warning("socks5 lookup of %s failed: %s", host, e)
            return None
        return sockets.canonical_ip(str(infos[0][4][0])) if infos else None

    def _route_outbound(self, acc: Accepted, dst_ip: str, dst_port: int) -> None:
        src_ip, src_port = acc.peer
        src, dst = sockets.format_addr(src_ip, src_port), sockets.format_addr(dst_ip, dst_port)
        source = self.local_workload()
        if sockets.is_loopback(dst_ip) and dst_port in self.config.illegal_ports:
            return self._fail(acc, src, dst, "source", "attempted recursive call to ourselves")
        if source is None:
            return self._fail(
                acc, src, dst, "source", "failed to fetch information about local workload"
            )
        if self.on_demand is not None and not self._known(dst_ip):
            # Upstream fetch_address: ask for `network/ip`, then plan with what arrived.
            self.tasks.spawn(self._route_after_fetch(acc, dst_ip, dst_port), name="on-demand")
            return None
        return self._plan_and_start(acc, (src, dst), source, dst_ip, dst_port)

    def _known(self, ip: str) -> bool:
        state, network = self.state(), self.config.network
        return bool(state.workloads_by_ip(network, ip) or state.services_by_vip(network, ip))

    async def _route_after_fetch(self, acc: Accepted, dst_ip: str, dst_port: int) -> None:
        assert self.on_demand is not None
        await self.on_demand(f"{self.config.network}/{dst_ip}")
        source = self.local_workload()
        if acc.lost:
            return
        src, dst = sockets.format_addr(*acc.peer), sockets.format_addr(dst_ip, dst_port)
        if source is None:
            return self._fail(acc, src, dst, "source", "local workload disappeared")
        self._plan_and_start(acc, (src, dst), source, dst_ip, dst_port)

    def _plan_and_start(
        self, acc: Accepted, addrs: tuple[str, str], source: Workload, dst_ip: str, dst_port: int
    ) -> None:
        src, dst = addrs
        src_ip = acc.peer[0]
        plan = routing.plan_outbound(
            self.state(),
            source=source,
            src_ip=src_ip,
            dst_ip=dst_ip,
            dst_port=dst_port,
            network=self.config.network,
            illegal_ports=self.config.illegal_ports,
            rng=self.rng,
        )
        if isinstance(plan, routing.RouteError):
            return self._fail(acc, src, dst, "source", plan.reason)
        if plan.resolve_hostname is not None:
            host = plan.resolve_hostname
            task = self._resolve_then_start(acc, src, dst, source, plan=plan, host=host)
            self.tasks.spawn(task, name="dns")
            return
        self._start_plan(acc, src, dst, source, plan)

    async def _resolve_then_start(
        self,
        acc: Accepted,
        src: str,
        dst: str,
        source: Workload,
        *,
        plan: routing.OutboundPlan,
        host: str,
    ) -> None:
        """Hostname-only workloads: resolve on demand, prefer the original family (§10.5)."""
        self.tracker.metrics.inc(m.ON_DEMAND_DNS, m.on_demand_dns_labels(source, host))
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except OSError as e:
            return self._fail(acc, src, dst, "source", f"dns lookup of {host} failed: {e}")
        answers = [sockets.canonical_ip(str(info[4][0])) for info in infos]
        ip = routing.pick_resolved_ip(answers, dst.rsplit(":", 1)[0].strip("[]"), self.rng)
        if ip is None:
            return self._fail(acc, src, dst, "source", f"no addresses for {host}")
        self._start_plan(acc, src, dst, source, plan.with_resolved_ip(ip))

    def _start_plan(
        self, acc: Accepted, src: str, dst: str, source: Workload, plan: routing.OutboundPlan
    ) -> None:
        if plan.kind in ("tcp", "passthrough"):
            labels = m.TrafficLabels(
                reporter="source",
                source=source,
                destination=plan.destination_workload,
                destination_service=plan.destination_service,
            )
            return self._start_tcp(acc, src, plan.next_hop, labels)
        return self._start_hbone(acc, src, source, plan)

    def _fail(self, acc: Accepted, src: str, dst: str, reporter: m.Reporter, reason: str) -> None:
        log_failed(src, dst, reporter, reason)
        acc.reject()

    # -- plain TCP legs (outbound TCP/passthrough and inbound plaintext) ------------------------

    def _start_tcp(
        self,
        acc: Accepted,
        src: str,
        hop: tuple[str, int],
        labels: m.TrafficLabels,
        ctx: authz.AuthzContext | None = None,
    ) -> None:
        relay = Relay(lambda r: self.tracker.closed(conn))
        conn = Tracked(
            flow=relay,
            labels=labels,
            src_addr=src,
            dst_addr=sockets.format_addr(*hop),
            src_workload=_workload_name(labels.source),
            dst_workload=_workload_name(labels.destination),
        )
        conn.on_close = acc.on_finished
        conn.authz = ctx
        self.tracker.opened(conn)  # registered before the policy check (connection_manager.rs)
        acc.on_lost = _chain(acc.on_lost, lambda _: self.tracker.closed(conn))
        if ctx is not None:
            info = self.config.authz_policy_info_logging
            decision = authz.check(self.state(), ctx, info_logging=info)
            if not decision.allowed:
                conn.response_flags, conn.error = "DENY", authz.rejection(decision)
                acc.reject()
                self.tracker.closed(conn)
                return
        self.tasks.spawn(self._connect_tcp(acc, relay, conn, hop), name="connect-tcp")

    async def _connect_tcp(
        self, acc: Accepted, relay: Relay, conn: Tracked, hop: tuple[str, int]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await self.new_socket(hop[0])
        except OSError as e:
            return self._tcp_failed(acc, conn, e)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, hop)
            await loop.create_connection(lambda: relay.upstream, sock=sock)
        except (OSError, TimeoutError) as e:
            sock.close()
            return self._tcp_failed(acc, conn, e)
        if self.closed:
            conn.error = conn.error or CLOSED_ERROR
            relay.abort()
            acc.reject()
            self.tracker.closed(conn)
            return
        if not acc.handoff(relay.downstream):
            relay.abort()
            self.tracker.closed(conn)

    def _tcp_failed(self, acc: Accepted, conn: Tracked, exc: BaseException) -> None:
        conn.response_flags = "CONNECT"
        conn.error = _describe(exc)
        acc.reject()
        self.tracker.closed(conn)

    # -- outbound HBONE -----------------------------------------------------------------------

    def _start_hbone(
        self, acc: Accepted, src: str, source: Workload, plan: routing.OutboundPlan
    ) -> None:
        labels = m.TrafficLabels(
            reporter="source",
            source=source,
            source_principal=source.identity(),
            destination=plan.destination_workload,
            destination_service=plan.destination_service,
            security_policy="mutual_tls",
        )
        leg = TunnelLeg(lambda _: leg_closed(self.tracker, conn, leg))
        conn = Tracked(
            flow=TunnelFlow(leg, outbound=True),
            labels=labels,
            src_addr=src,
            dst_addr=sockets.format_addr(*plan.next_hop),
            src_workload=_workload_name(source),
            dst_workload=_workload_name(plan.destination_workload),
            hbone_addr=plan.hbone_authority,
        )
        conn.on_close = acc.on_finished
        self.tracker.opened(conn)

        def lost(_: Accepted) -> None:
            leg.abort()
            self.tracker.closed(conn)

        acc.on_lost = _chain(acc.on_lost, lost)
        self.tasks.spawn(self._connect_tunnel(acc, leg, conn, source, plan), name="connect-hbone")

    async def _connect_tunnel(
        self,
        acc: Accepted,
        leg: TunnelLeg,
        conn: Tracked,
        source: Workload,
        plan: routing.OutboundPlan,
    ) -> None:
        cert = await self.await_certificate(source)
        if cert is None:
            return self._hbone_failed(
                acc, conn, f"no certificate for {source.identity()}", "IDENTITY_ERROR"
            )
        if acc.lost:
            return self.tracker.closed(conn)
        if plan.kind == "double_hbone":
            return await self._connect_double(acc, leg, conn, source, plan, cert=cert)
        return await self._connect_hbone(acc, leg, conn, source, plan, cert=cert)

    async def _connect_hbone(
        self,
        acc: Accepted,
        leg: TunnelLeg,
        conn: Tracked,
        source: Workload,
        plan: routing.OutboundPlan,
        *,
        cert: WorkloadCertificate,
    ) -> None:
        key = WorkloadKey(source.identity(), plan.expected_identities, plan.next_hop, acc.peer[0])
        try:
            h2 = await self.pool.checkout(key, cert)
        except PoolError as e:
            return self._hbone_failed(acc, conn, str(e), e.flag)
        except OSError as e:  # the upstream socket could not even be created
            return self._hbone_failed(acc, conn, _describe(e), "CONNECT")
        if self.closed:
            h2.close()  # made for a pool that was closed meanwhile
            return self._hbone_failed(acc, conn, CLOSED_ERROR, "CONNECT")
        if acc.lost:
            return self.tracker.closed(conn)
        status = await self._open_stream(h2, leg, conn, acc, plan)
        if status != 200:
            leg.abort()
            reason = f"http status: {status}" if status else "connection closed before response"
            return self._hbone_failed(acc, conn, reason, "CONNECT")
        if self.closed:
            leg.abort()
            return self._hbone_failed(acc, conn, CLOSED_ERROR, "CONNECT")
        if not acc.handoff(leg):
            leg.abort()
            self.tracker.closed(conn)

    async def _open_stream(
        self,
        h2: HBONEClientProtocol,
        leg: TunnelLeg,
        conn: Tracked,
        acc: Accepted,
        plan: routing.OutboundPlan,
    ) -> int:
        assert plan.hbone_authority is not None and conn.labels.source is not None
        source = conn.labels.source
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_response(status: int) -> None:
            # Record a refusal at once: the stream's reset may close the record before the
            # awaiting task resumes (a 401 and its RST_STREAM arrive in one read).
            if status != 200 and conn.error is None:
                conn.response_flags = "CONNECT"
                conn.error = (
                    f"http status: {status}" if status else "connection closed before response"
                )
            if not fut.done():
                fut.set_result(status)

        h2.open(plan.hbone_authority, self._hbone_headers(source, acc, plan), leg, on_response)
        try:
            async with asyncio.timeout(RESPONSE_TIMEOUT):
                return await fut
        except TimeoutError:
            return 0

    def _hbone_headers(
        self, source: Workload, acc: Accepted, plan: routing.OutboundPlan
    ) -> list[tuple[str, str]]:
        return [
            ("baggage", hbone.baggage_header(source)),
            ("forwarded", hbone.forwarded_header(acc.peer[0], acc.peer[1], plan.forwarded_host)),
            ("traceparent", str(hbone.TraceParent.new(self.rng))),
        ]

    async def _connect_double(
        self,
        acc: Accepted,
        leg: TunnelLeg,
        conn: Tracked,
        source: Workload,
        plan: routing.OutboundPlan,
        *,
        cert: WorkloadCertificate,
    ) -> None:
        """Double HBONE through the destination network's gateway (`workers.double`)."""
        gateway, authority = plan.gateway, plan.hbone_authority
        assert gateway is not None and authority is not None
        src_id, peer = source.identity(), acc.peer[0]
        try:
            tunnel, status = await double.open_double(
                self.pool,
                outer_key=WorkloadKey(src_id, gateway.expected_identities, gateway.next_hop, peer),
                inner_key=WorkloadKey(src_id, plan.expected_identities, plan.next_hop, peer),
                cert=cert,
                authority=authority,
                headers=self._hbone_headers(source, acc, plan),
                network=self.config.network,
                leg=leg,
            )
        except PoolError as e:
            return self._hbone_failed(acc, conn, str(e), e.flag)
        except OSError as e:
            return self._hbone_failed(acc, conn, _describe(e), "CONNECT")
        if status != 200:
            leg.abort()
            reason = f"http status: {status}" if status else "connection closed before response"
            return self._hbone_failed(acc, conn, reason, "CONNECT")
        # Metrics name the gateway; the log names the workload behind it, as upstream derives
        # it from the inner response's baggage and the inner peer's identity.
        conn.dst_workload = tunnel.inner.response_baggage.workload_name or conn.dst_workload
        conn.dst_identity = tunnel.inner.peer_identity
        if self.closed or acc.lost or not acc.handoff(leg):
            leg.abort()
            tunnel.abort()
            if self.closed:
                return self._hbone_failed(acc, conn, CLOSED_ERROR, "CONNECT")
            self.tracker.closed(conn)

    def _hbone_failed(self, acc: Accepted, conn: Tracked, reason: str, flag: str) -> None:
        conn.response_flags = flag
        conn.error = reason
        acc.reject()
        self.tracker.closed(conn)

    # -- inbound plaintext ----------------------------------------------------------------------

    def _inbound_plain_accepted(self, acc: Accepted) -> None:
        assert acc.transport is not None
        sock: socket.socket = acc.transport.get_extra_info("socket")
        sockets.set_keepalive(sock, self.config)
        dst_ip, dst_port = sockets.original_dst(sock)
        src_ip, src_port = acc.peer
        src, dst = sockets.format_addr(src_ip, src_port), sockets.format_addr(dst_ip, dst_port)
        if dst_port in self.config.illegal_ports:
            return self._fail(acc, src, dst, "destination", "attempted recursive call to ourselves")
        local = self.local_workload()
        if local is None:
            return self._fail(
                acc, src, dst, "destination", "failed to fetch information about local workload"
            )
        state = self.state()
        labels = m.TrafficLabels(
            reporter="destination",
            source=state.workload_by_ip(self.config.network, src_ip),
            destination=local,
            destination_service=routing.guess_inbound_service(state, local, dst_port, None),
        )
        ctx = authz.AuthzContext(local.uid, rbac.Connection(src_ip, None, dst_ip, dst_port))
        self._start_tcp(acc, src, (dst_ip, dst_port), labels, ctx)

    def close(self) -> None:
        """The workload is gone (pod deleted, drain over): end its HBONE connections too."""
        self.closed = True
        self.pool.close()
        for conn in tuple(self.inbound_connections):
            conn.abort()


def _chain(
    first: Callable[[Accepted], None] | None, second: Callable[[Accepted], object]
) -> Callable[[Accepted], None]:
    def both(acc: Accepted) -> None:
        if first is not None:
            first(acc)
        second(acc)

    return both


def leg_closed(tracker: ConnectionTracker, conn: Tracked, leg: TunnelLeg) -> None:
    """A tunnel leg finished: a tunnel that broke under it is the connection's error."""
    if leg.tunnel_error is not None and conn.error is None:
        conn.error = leg.tunnel_error
    tracker.closed(conn)


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
