"""Inbound HBONE (15008): mTLS with the destination workload's certificate, CONNECT, relay.

Per accepted TCP connection the destination workload is the one owning the connection's
destination IP; its certificate is chosen before TLS starts (no SNI in HBONE). After the
handshake the client's trust domain is checked before a byte is read. Each CONNECT is
validated (`routing.validate_hbone_destination`, `routing.find_inbound_upstream`) and
answered as upstream does: 400 (bad method, authority, IP mismatch), 503 (unknown target,
self-call, connect failure), 200 (then bytes flow both ways).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import cast

from workers import authz
from workers.pool import h2_settings
from workers.proxy import (
    CONNECT_TIMEOUT,
    Proxy,
    TunnelFlow,
    _describe,
    _workload_name,
    leg_closed,
)
from workers.tracking import Tracked, log_failed
from workers.tunnel import H2Protocol, TunnelLeg
from ztunnel import sockets, tls
from ztunnel.core import hbone, proxyproto, rbac, routing
from ztunnel.core import metrics as m
from ztunnel.core.identity import Identity
from ztunnel.core.model import Workload

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0


class HBONEListener:
    """Accepts on 15008 and starts TLS with the certificate of the destination workload.

    Not `create_server(ssl=...)`: the certificate depends on each connection's destination.
    Not `start_tls` either: asyncio delivers early application bytes before the caller can
    verify the peer, and uvloop's server-side start_tls does not complete. So: accept the
    raw socket, choose the context, `connect_accepted_socket(ssl=...)`, and verify the
    client in `connection_made` before any byte is processed.
    """

    def __init__(self, proxy: Proxy, sock: socket.socket) -> None:
        self.proxy = proxy
        self.sock = sock
        self._task: asyncio.Task[None] | None = None

    async def start_serving(self) -> None:
        if self._task is None:
            self._task = self.proxy.tasks.spawn(self._accept_loop(), name="hbone-accept")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.sock.close()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as e:
                log.warning("accept on 15008 failed: %s", e)
                await asyncio.sleep(0.1)  # EMFILE and friends: back off, then recover
                continue
            self.proxy.tasks.spawn(_serve_tls(self.proxy, conn), name="hbone-tls")


async def _serve_tls(proxy: Proxy, conn: socket.socket) -> None:
    try:
        peer = conn.getpeername()
        dst_ip, dst_port = sockets.original_dst(conn)
    except OSError:
        conn.close()  # reset right after accept (upstream #1764): nothing to serve
        return
    src = sockets.format_addr(sockets.canonical_ip(peer[0]), peer[1])
    dst = sockets.format_addr(dst_ip, dst_port)
    local = proxy.local_workload()
    cert = await proxy.await_certificate(local) if local is not None else None
    if local is None or cert is None:
        why = "no local workload" if local is None else f"no certificate for {local.identity()}"
        log_failed(src, dst, "destination", why)
        conn.close()
        return
    try:
        await asyncio.get_running_loop().connect_accepted_socket(
            lambda: HBONEServerProtocol(proxy, local, src, dst, dst_ip),
            conn,
            ssl=proxy.contexts.server(cert),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
        )
    except (OSError, TimeoutError, ConnectionError) as e:
        log_failed(src, dst, "destination", f"tls handshake failed: {_describe(e)}")
        conn.close()


class HBONEServerProtocol(H2Protocol):
    def __init__(self, proxy: Proxy, local: Workload, src: str, dst: str, dst_ip: str) -> None:
        self.server = hbone.HBONEServer(h2_settings(proxy.config, server=True))
        super().__init__(self.server)
        self.proxy = proxy
        self.local = local
        self.src, self.dst, self.dst_ip = src, dst, dst_ip
        self.src_ip = src.rsplit(":", 1)[0].strip("[]")
        self.src_addr = (self.src_ip, int(src.rsplit(":", 1)[1]))
        self.peer_identity: Identity | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """TLS is up: check the client before reading or writing a single byte."""
        session = transport.get_extra_info("ssl_object")
        try:
            self.peer_identity = tls.verify_inbound(session, trust_domain=self.local.trust_domain)
        except tls.TLSError as e:
            log_failed(self.src, self.dst, "destination", f"tls handshake failed: {e}")
            self.closed = True
            cast(asyncio.Transport, transport).abort()
            return
        revocation = self.proxy.revocation
        if revocation is not None and (revoked := revocation.admit(self, session, "destination")):
            log_failed(self.src, self.dst, "destination", f"tls handshake failed: {revoked}")
            self.closed = True
            cast(asyncio.Transport, transport).abort()
            return
        super().connection_made(transport)
        self.proxy.inbound_connections.add(self)

    def data_received(self, data: bytes) -> None:
        if not self.closed:
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.proxy.inbound_connections.discard(self)
        if self.proxy.revocation is not None:
            self.proxy.revocation.forget(self)
        super().connection_lost(exc)

    def on_event(self, ev: hbone.Event) -> None:
        if isinstance(ev, hbone.ConnectRequested):
            # Bind the leg now: a client may send DATA (and END_STREAM) right after its
            # CONNECT, before our answer (RFC 9113 §8.5). The leg holds those bytes, and
            # their flow-control credit, until the upstream socket exists.
            holder: list[Tracked] = []
            tracker = self.proxy.tracker
            leg = TunnelLeg(lambda leg: leg_closed(tracker, holder[0], leg) if holder else None)
            leg.bind_stream(self, ev.stream_id)
            self.proxy.tasks.spawn(self._serve_stream(ev, leg, holder), name="hbone-stream")
        elif isinstance(ev, hbone.RequestRejected):
            log_failed(self.src, self.dst, "destination", ev.reason)

    async def _serve_stream(
        self, ev: hbone.ConnectRequested, leg: TunnelLeg, holder: list[Tracked]
    ) -> None:
        proxy, state = self.proxy, self.proxy.state()
        parsed = hbone.parse_authority(ev.authority)
        if parsed is None:
            return self._reject(ev.stream_id, 400, "no valid authority pseudo header")
        host, port, is_ip = parsed
        network = proxy.config.network
        err = (
            routing.validate_hbone_destination(
                state,
                local=self.local,
                conn_dst_ip=self.dst_ip,
                authority_host=host,
                authority_port=port,
                network=network,
            )
            if is_ip
            else None
        )
        if err is not None:
            return self._reject(ev.stream_id, 400, err.reason)
        target = routing.find_inbound_upstream(
            state,
            local=self.local,
            conn_dst_ip=self.dst_ip,
            authority_host=host,
            authority_port=port,
            is_ip=is_ip,
            illegal_ports=proxy.config.illegal_ports,
            network=network,
        )
        if isinstance(target, routing.RouteError):
            return self._reject(ev.stream_id, 503, target.reason)
        # Register before the policy check, so a policy change racing it is not missed
        # (upstream connection_manager.rs).
        conn = self._track(ev, target)
        conn.flow = TunnelFlow(leg, outbound=False)
        holder.append(conn)
        ctx = authz.AuthzContext(
            self.local.uid,
            rbac.Connection(self.src_ip, self.peer_identity, target.ip, target.port),
        )
        conn.authz = ctx
        decision = authz.check(state, ctx, info_logging=proxy.config.authz_policy_info_logging)
        if not decision.allowed:
            conn.response_flags, conn.error = "DENY", authz.rejection(decision)
            self.legs.pop(ev.stream_id, None)
            self.server.respond(ev.stream_id, 401)
            self.flush()
            proxy.tracker.closed(conn)
            return
        hop, preamble = (target.ip, target.port), b""
        if target.proxy_protocol and target.tunnel_target is not None:
            # The "sandwich" (§9.7): the app learns the client and the tunnel target from a
            # PROXY v2 header; with LOCALHOST_APP_TUNNEL it listens on the pod's loopback.
            if proxy.config.localhost_app_tunnel:
                hop = ("::1" if ":" in target.ip else "127.0.0.1", target.port)
            identity = str(self.peer_identity) if self.peer_identity is not None else None
            preamble = proxyproto.encode_v2(self.src_addr, target.tunnel_target, identity)
        await self._connect(ev, conn, leg, hop, preamble)

    async def _connect(
        self,
        ev: hbone.ConnectRequested,
        conn: Tracked,
        leg: TunnelLeg,
        hop: tuple[str, int],
        preamble: bytes = b"",
    ) -> None:
        ip, port = hop
        loop = asyncio.get_running_loop()
        try:
            sock = await self.proxy.new_socket(ip)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await loop.sock_connect(sock, (ip, port))
                    if preamble:  # before any byte of the stream, which the leg may hold
                        await loop.sock_sendall(sock, preamble)
                await loop.create_connection(lambda: leg, sock=sock)
            except BaseException:
                sock.close()
                raise
        except (OSError, TimeoutError) as e:
            conn.response_flags, conn.error = "CONNECT", _describe(e)
            if not self.core.has_stream(ev.stream_id):
                self.legs.pop(ev.stream_id, None)
                self.proxy.tracker.closed(conn)
                return
            self.legs.pop(ev.stream_id, None)
            self.server.respond(ev.stream_id, 503)
            self.flush()
            self.proxy.tracker.closed(conn)
            return
        if not self.core.has_stream(ev.stream_id):  # reset by the client while we dialled
            conn.error = "stream reset by peer"
            leg.abort()
            return
        response = (
            [("baggage", hbone.baggage_header(self.local))]
            if self.proxy.config.enable_response_baggage
            else []
        )
        self.server.respond(ev.stream_id, 200, response)
        self.flush()

    def _track(self, ev: hbone.ConnectRequested, target: routing.InboundTarget) -> Tracked:
        headers = dict(ev.headers)
        state = self.proxy.state()
        network = self.proxy.config.network
        from_gateway = headers.get("x-forwarded-network", network).lower() != network.lower()
        source = None if from_gateway else state.workload_by_ip(network, self.src_ip)
        forwarded_host = (
            hbone.parse_forwarded_host(headers["forwarded"]) if "forwarded" in headers else None
        )
        labels = m.TrafficLabels(
            reporter="destination",
            source=source,
            source_principal=str(self.peer_identity) if self.peer_identity else None,
            destination=self.local,
            destination_service=routing.guess_inbound_service(
                state, self.local, target.port, forwarded_host, candidates=target.services or None
            ),
            security_policy="mutual_tls",
        )
        conn = Tracked(
            flow=_NoFlow(),
            labels=labels,
            src_addr=self.src,
            dst_addr=self.dst,
            src_workload=_workload_name(source),
            dst_workload=_workload_name(self.local),
            hbone_addr=ev.authority,
        )
        self.proxy.tracker.opened(conn)
        return conn

    def _reject(self, stream_id: int, status: int, reason: str) -> None:
        log_failed(self.src, self.dst, "destination", reason)
        self.legs.pop(stream_id, None)
        self.server.respond(stream_id, status)
        self.flush()


class _NoFlow:
    """Placeholder until the stream's TCP leg exists."""

    received = 0
    sent = 0

    def abort(self) -> None:
        pass
