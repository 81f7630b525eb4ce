"""Routing decisions: the outbound request plan (§10) and the inbound HBONE target (§9.6).

Pure functions over a `ProxyState`, ported from upstream's `src/proxy/outbound.rs`
(`build_request`, `build_request_through_gateway`), `src/proxy/inbound.rs`
(`validate_destination`, `find_inbound_upstream`), `src/proxy/inbound_passthrough.rs` and
`src/proxy.rs` (`guess_inbound_service`). Endpoint, waypoint and gateway choice live in
`ztunnel.core.routing_lb`. Failures are `RouteError` values carrying upstream's message, so
the glue can log them and pick the status code (400 for `validate_hbone_destination`, 503
for `find_inbound_upstream`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from ztunnel.core.model import ApplicationTunnel, NetworkAddress, Service, Workload
from ztunnel.core.routing_lb import (
    NoRoute,
    Rng,
    Upstream,
    fetch_network_gateway,
    fetch_waypoint,
    finalize,
    find_destination,
    find_upstream,
    is_from_waypoint,
    is_ipv6,
    load_balance,
    no_valid_destination,
    sample_weighted_waypoint,
)
from ztunnel.core.state import ProxyState

__all__ = [
    "HBONE_PORT",
    "SELF_CALL",
    "GatewayHop",
    "InboundPassthrough",
    "InboundTarget",
    "OutboundPlan",
    "RouteError",
    "RouteKind",
    "find_inbound_upstream",
    "format_addr",
    "guess_inbound_service",
    "load_balance",
    "pick_resolved_ip",
    "plan_inbound_passthrough",
    "plan_outbound",
    "validate_hbone_destination",
]

HBONE_PORT = 15008  # upstream `cfg.inbound_addr` port
SELF_CALL = "attempted recursive call to ourselves"

RouteKind = Literal["hbone", "tcp", "passthrough", "double_hbone"]


@dataclass(frozen=True, slots=True)
class RouteError:
    """Why a connection cannot be routed: upstream's error text (e.g. `no healthy upstream: …`)."""

    reason: str


@dataclass(frozen=True, slots=True)
class GatewayHop:
    """The outer tunnel of double HBONE (§9.9): pooled, terminated by the network gateway."""

    next_hop: tuple[str, int]
    hbone_authority: str
    expected_identities: tuple[str, ...]  # gateway service SANs + gateway workload identity
    workload: Workload


@dataclass(frozen=True, slots=True)
class OutboundPlan:
    """Where an outbound connection goes (upstream's `Request`).

    * `hbone`: TLS + CONNECT to `next_hop` (a pod's 15008, or a waypoint's HBONE port) with
      `hbone_authority`, verifying the peer against `expected_identities`.
    * `tcp`: plain TCP to a known workload at `next_hop`.
    * `passthrough`: plain TCP to the original destination; no destination workload.
    * `double_hbone`: `gateway` is the outer tunnel; the inner one rides inside it with the
      same authority (`service-hostname:port`) and `x-forwarded-network`, verified against
      `expected_identities` (the upstream's service SANs only), never pooled.

    `destination_workload` is the next hop's workload for metrics (the waypoint or the
    gateway when there is one); `destination_service` the service the client meant, whose
    hostname goes into the `forwarded` header (`forwarded_host`).

    When `resolve_hostname` is set the next hop is a hostname-only workload: its IP is ""
    until the caller resolves the name (§10.5, see `pick_resolved_ip`) and calls
    `with_resolved_ip`.
    """

    kind: RouteKind
    next_hop: tuple[str, int]
    hbone_authority: str | None = None
    expected_identities: tuple[str, ...] = ()
    destination_workload: Workload | None = None
    destination_service: Service | None = None
    via_waypoint: bool = False
    gateway: GatewayHop | None = None
    forwarded_host: str | None = None
    resolve_hostname: str | None = None
    # With `resolve_hostname`: the authority is `<resolved ip>:authority_port`.
    authority_port: int | None = None

    def with_resolved_ip(self, ip: str) -> OutboundPlan:
        """This plan with the resolved IP of `resolve_hostname` filled in."""
        gateway = self.gateway
        if gateway is not None:
            gateway = replace(gateway, next_hop=(ip, gateway.next_hop[1]))
        authority = self.hbone_authority
        if self.authority_port is not None:
            authority = format_addr(ip, self.authority_port)
        return replace(
            self,
            next_hop=(ip, self.next_hop[1]),
            hbone_authority=authority,
            gateway=gateway,
            resolve_hostname=None,
            authority_port=None,
        )


def format_addr(ip: str, port: int) -> str:
    """`ip:port`, `[v6]:port`: a socket address as Rust displays it (and HBONE carries it)."""
    return f"[{ip}]:{port}" if is_ipv6(ip) else f"{ip}:{port}"


def pick_resolved_ip(answers: Sequence[str], original_ip: str, rng: Rng) -> str | None:
    """A random DNS answer of the original destination's family, else of the other (§10.5)."""
    want_v6 = is_ipv6(original_ip)
    same = [a for a in answers if is_ipv6(a) == want_v6]
    pool = same or list(answers)
    if not pool:
        return None
    return pool[min(int(rng.random() * len(pool)), len(pool) - 1)]


# --- outbound (`build_request`) --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Request:
    state: ProxyState
    source: Workload
    src_ip: str
    dst_ip: str
    dst_port: int
    network: str
    rng: Rng
    hbone_port: int

    @property
    def target(self) -> str:
        return format_addr(self.dst_ip, self.dst_port)


def plan_outbound(
    state: ProxyState,
    *,
    source: Workload,
    src_ip: str,
    dst_ip: str,
    dst_port: int,
    network: str,
    illegal_ports: frozenset[int],
    rng: Rng,
    hbone_port: int = HBONE_PORT,
) -> OutboundPlan | RouteError:
    """Plan a connection from `source` (at `src_ip`) to the original `dst_ip:dst_port`.

    IPs are canonical strings; `network` is this ztunnel's NETWORK.
    """
    if _is_loopback(dst_ip) and dst_port in illegal_ports:
        return RouteError(SELF_CALL)
    req = _Request(state, source, src_ip, dst_ip, dst_port, network, rng, hbone_port)
    try:
        return _build(req)
    except NoRoute as e:
        return RouteError(e.message)


def _build(req: _Request) -> OutboundPlan:
    state, source = req.state, req.source
    service = _addressed_service(req)
    if service is not None:
        plan = _via_service_waypoint(req, service)
        if plan is not None:
            return plan
    # Upstream selection is on the source's network (`fetch_upstream`).
    candidate = find_upstream(
        state,
        source,
        req.dst_ip,
        req.dst_port,
        network=source.network,
        mode="standard",
        rng=req.rng,
    )
    us = finalize(candidate, req.dst_ip)
    if us is None:
        return _no_upstream(req, service)
    if us.workload.network != source.network:
        # Only services span networks: fetch_upstream finds workloads on our network only.
        if service is None:
            raise NoRoute(f"no service for target address: {req.target}")
        return _through_gateway(req, us, service, via_waypoint=False)
    if service is None and not is_from_waypoint(state, us.workload, source, req.src_ip):
        plan = _via_workload_waypoint(req, us)
        if plan is not None:
            return plan
    return _direct(req, us)


def _addressed_service(req: _Request) -> Service | None:
    """The service at the destination VIP, unless a workload owns that IP (`find_address`)."""
    if req.state.workload_by_ip(req.network, req.dst_ip) is not None:
        return None
    return req.state.best_service_by_vip(req.network, req.dst_ip, req.source.namespace)


def _via_service_waypoint(req: _Request, service: Service) -> OutboundPlan | None:
    gw = sample_weighted_waypoint(service, req.rng) or service.waypoint
    if gw is None:
        return None
    wp = fetch_waypoint(req.state, gw, req.source, req.dst_ip, req.rng)
    if wp.workload.network != req.source.network:
        return _through_gateway(req, wp, service, via_waypoint=True)
    return _to_waypoint(req, wp, service)


def _via_workload_waypoint(req: _Request, us: Upstream) -> OutboundPlan | None:
    gw = us.workload.waypoint
    if gw is None:
        return None
    wp = fetch_waypoint(req.state, gw, req.source, req.dst_ip, req.rng)
    return _to_waypoint(req, wp, us.service)


def _to_waypoint(req: _Request, wp: Upstream, service: Service | None) -> OutboundPlan:
    """HBONE to the waypoint, keeping the original (untranslated) target as the authority."""
    return OutboundPlan(
        kind="hbone",
        next_hop=(_hop_ip(wp), wp.port),
        hbone_authority=req.target,
        expected_identities=wp.sans(),
        destination_workload=wp.workload,
        destination_service=service,
        via_waypoint=True,
        forwarded_host=_host(service),
        resolve_hostname=wp.resolve_hostname,
    )


def _no_upstream(req: _Request, service: Service | None) -> OutboundPlan:
    if service is not None and not _is_passthrough(service):
        raise NoRoute(f"no healthy upstream: {req.target}")
    return OutboundPlan(kind="passthrough", next_hop=(req.dst_ip, req.dst_port))


def _through_gateway(
    req: _Request, us: Upstream, service: Service, *, via_waypoint: bool
) -> OutboundPlan:
    """Double HBONE via the upstream's network gateway; both tunnels name the service."""
    gw = us.workload.network_gateway
    if gw is None:
        raise no_valid_destination(us.workload)
    gwu = fetch_network_gateway(req.state, gw, req.source, req.dst_ip, req.rng)
    authority = f"{service.hostname}:{req.dst_port}"
    hop = (_hop_ip(gwu), gwu.port)
    outer = GatewayHop(
        next_hop=hop,
        hbone_authority=authority,
        expected_identities=gwu.sans(),
        workload=gwu.workload,
    )
    return OutboundPlan(
        kind="double_hbone",
        next_hop=hop,
        hbone_authority=authority,
        expected_identities=us.service_sans(),
        destination_workload=gwu.workload,
        destination_service=service,
        via_waypoint=via_waypoint,
        gateway=outer,
        forwarded_host=service.hostname,
        resolve_hostname=gwu.resolve_hostname,
    )


def _direct(req: _Request, us: Upstream) -> OutboundPlan:
    """To the workload itself: HBONE to its 15008 with `ip:target_port`, or plain TCP."""
    ip = _hop_ip(us)
    hbone = us.workload.protocol == "HBONE"
    return OutboundPlan(
        kind="hbone" if hbone else "tcp",
        next_hop=(ip, req.hbone_port if hbone else us.port),
        hbone_authority=format_addr(ip, us.port) if hbone and ip else None,
        authority_port=us.port if hbone and not ip else None,
        expected_identities=us.sans() if hbone else (),
        destination_workload=us.workload,
        destination_service=us.service,
        forwarded_host=_host(us.service),
        resolve_hostname=us.resolve_hostname,
    )


def _hop_ip(us: Upstream) -> str:
    """The IP to dial; "" while a hostname awaits resolution."""
    if us.ip is not None:
        return us.ip
    if us.resolve_hostname is not None:
        return ""
    raise no_valid_destination(us.workload)


def _is_passthrough(svc: Service) -> bool:
    return svc.load_balancer is not None and svc.load_balancer.mode == "Passthrough"


def _host(svc: Service | None) -> str | None:
    return None if svc is None else svc.hostname


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


# --- inbound HBONE (`validate_destination`, `find_inbound_upstream`) -------------------------


@dataclass(frozen=True, slots=True)
class InboundTarget:
    """Where an accepted CONNECT goes: always our pod IP, at the resolved port.

    With an application tunnel, `tunnel_target` is the address to announce to the app
    (the PROXY header's destination when `proxy_protocol`). `services` are the candidates
    for `guess_inbound_service`.
    """

    ip: str
    port: int
    proxy_protocol: bool = False
    tunnel_target: tuple[str, int] | None = None
    services: tuple[Service, ...] = ()


def validate_hbone_destination(
    state: ProxyState,
    *,
    local: Workload,
    conn_dst_ip: str,
    authority_host: str,
    authority_port: int,
    network: str,
) -> RouteError | None:
    """Check a CONNECT authority against the connection (§9.6 step 3); errors are 400s.

    Hostname authorities pass (they fail later if unknown). An IP must equal the
    connection's destination IP, unless the local workload has an application tunnel, or
    the authority's service or workload names us as its waypoint (the "sandwich").
    `authority_port` plays no part; it is taken so both inbound calls read alike.
    """
    del authority_port
    hbone_ip = _parse_ip(authority_host)
    if hbone_ip is None or hbone_ip == conn_dst_ip or local.application_tunnel is not None:
        return None
    if _targets_this_waypoint(state, local, conn_dst_ip, hbone_ip, network):
        return None
    return RouteError(f"ip mismatch: {conn_dst_ip} != {hbone_ip}")


def _targets_this_waypoint(
    state: ProxyState, local: Workload, conn_dst_ip: str, hbone_ip: str, network: str
) -> bool:
    target = find_destination(state, NetworkAddress(network=network, address=hbone_ip))
    if target is None or target.waypoint is None:
        return False
    wp = find_destination(state, target.waypoint.destination)
    if isinstance(wp, Service):
        return local.uid in state.endpoints(wp.key())
    if isinstance(wp, Workload):
        return conn_dst_ip in wp.workload_ips
    return False


def find_inbound_upstream(
    state: ProxyState,
    *,
    local: Workload,
    conn_dst_ip: str,
    authority_host: str,
    authority_port: int,
    is_ip: bool,
    illegal_ports: frozenset[int],
    network: str,
) -> InboundTarget | RouteError:
    """Resolve the upstream of a CONNECT (§9.6 step 4); errors are 503s."""
    try:
        return _inbound_target(
            state,
            local,
            conn_dst_ip,
            (authority_host, authority_port, is_ip),
            illegal_ports=illegal_ports,
            network=network,
        )
    except NoRoute as e:
        return RouteError(e.message)


def _inbound_target(
    state: ProxyState,
    local: Workload,
    conn_dst_ip: str,
    authority: tuple[str, int, bool],
    *,
    illegal_ports: frozenset[int],
    network: str,
) -> InboundTarget:
    host, authority_port, is_ip = authority
    svc: Service | None = None
    if is_ip:
        port = authority_port
        services = state.services_for_workload(local)
    else:
        svc = state.best_service_by_hostname(host, local.namespace)
        if svc is None:
            raise NoRoute(f"no service or workload for hostname: {host}")
        port = _service_target_port(state, svc, local, authority_port)
        services = (svc,)
    # Checked on the resolved port: a hostname may map onto one of our own listeners.
    if port in illegal_ports:
        raise NoRoute(SELF_CALL)
    target = InboundTarget(ip=conn_dst_ip, port=port, services=services)
    if local.application_tunnel is None:
        return target
    if svc is None:
        tunnel_target = (_parse_ip(host) or host, authority_port)
    else:
        tunnel_target = (_tunnel_vip(svc, network), authority_port)
    return _through_app_tunnel(target, local.application_tunnel, tunnel_target)


def _through_app_tunnel(
    target: InboundTarget, tunnel: ApplicationTunnel, tunnel_target: tuple[str, int]
) -> InboundTarget:
    """The tunnel may move the port (e.g. all PROXY traffic to 15088); the address the
    app is told about travels in the PROXY header when the protocol is PROXY."""
    return replace(
        target,
        port=target.port if tunnel.port is None else tunnel.port,
        proxy_protocol=tunnel.protocol == "PROXY",
        tunnel_target=tunnel_target,
    )


def _service_target_port(state: ProxyState, svc: Service, local: Workload, svc_port: int) -> int:
    """Our endpoint's mapping for the service port, else the service's non-zero target."""
    ep = state.endpoints(svc.key()).get(local.uid)
    if ep is not None and svc_port in ep.port:
        return ep.port[svc_port]
    target = svc.ports.get(svc_port, 0)
    if target == 0:
        raise NoRoute(f"requested service {svc.hostname}:{svc_port} found, but cannot resolve port")
    return target


def _tunnel_vip(svc: Service, network: str) -> str:
    """PROXY cannot carry a hostname: a VIP on our network, IPv4 preferred (last best wins)."""
    best: str | None = None
    best_rank = -1
    for vip in svc.vips:
        rank = (1 if is_ipv6(vip.address) else 2) if vip.network == network else 0
        if rank >= best_rank:
            best, best_rank = vip.address, rank
    if best is None:
        raise NoRoute(f"requested service {svc.hostname} found, but has no IP addresses")
    return best


def _parse_ip(host: str) -> str | None:
    """The canonical IP of an authority host (brackets allowed), or None for a hostname."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def guess_inbound_service(
    state: ProxyState,
    local: Workload,
    dst_port: int,
    forwarded_host: str | None,
    *,
    candidates: Iterable[Service] | None = None,
) -> Service | None:
    """The service an inbound connection was probably for, for metrics (§9.6 step 7).

    Among `candidates` (default: the local workload's services), the one named by the
    `forwarded` header's host, else the first whose target port, or our endpoint's mapping
    of one of its ports, equals `dst_port`.
    """
    services = tuple(state.services_for_workload(local) if candidates is None else candidates)
    if forwarded_host is not None:
        for svc in services:
            if svc.hostname == forwarded_host:
                return svc
    for svc in services:
        if _serves_port(state, svc, local, dst_port):
            return svc
    return None


def _serves_port(state: ProxyState, svc: Service, local: Workload, port: int) -> bool:
    ep = state.endpoints(svc.key()).get(local.uid)
    mapped = ep.port if ep is not None else {}
    return any(t == port or mapped.get(s) == port for s, t in svc.ports.items())


# --- inbound plaintext (`inbound_passthrough.rs`, §11.1) -------------------------------------


@dataclass(frozen=True, slots=True)
class InboundPassthrough:
    """An accepted plaintext inbound connection: dial the original destination as is."""

    target: tuple[str, int]
    source_workload: Workload | None
    destination_service: Service | None


def plan_inbound_passthrough(
    state: ProxyState,
    *,
    local: Workload,
    src_ip: str,
    dst_ip: str,
    dst_port: int,
    network: str,
    illegal_ports: frozenset[int],
) -> InboundPassthrough | RouteError:
    """Any IP on an illegal port is a self call; the source is looked up on our network."""
    if dst_port in illegal_ports:
        return RouteError(SELF_CALL)
    return InboundPassthrough(
        target=(dst_ip, dst_port),
        source_workload=state.workload_by_ip(network, src_ip),
        destination_service=guess_inbound_service(state, local, dst_port, None),
    )
