"""Upstream selection for routing: load balancing, waypoints, network gateways and IP choice.

A port of upstream's `src/state.rs` (`ProxyState::find_upstream`, `load_balance`,
`DemandProxyState::finalize_upstream`, `fetch_waypoint`, `fetch_network_gateway`,
`pick_workload_destination_or_resolve`) and `src/proxy.rs` (`check_from_waypoint`) over our
immutable `ProxyState`. There is no
on-demand xDS here: the state is whatever the worker holds. Randomness comes from an
injected `rng`; DNS for hostname-only workloads is left to the caller
(`Upstream.resolve_hostname`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from ztunnel.core.errors import ZtunnelError
from ztunnel.core.identity import Identity, IdentityError
from ztunnel.core.model import (
    Endpoint,
    GatewayAddress,
    IPFamilies,
    LoadBalancer,
    NamespacedHostname,
    NetworkAddress,
    Service,
    Workload,
)
from ztunnel.core.state import ProxyState

ResolutionMode = Literal["standard", "waypoint"]
T = TypeVar("T")


class Rng(Protocol):
    """What routing needs from `random.Random`: a float in [0, 1)."""

    def random(self) -> float: ...


class NoRoute(ZtunnelError):
    """A request that cannot be routed; `message` is upstream's error text.

    Raised inside the planner and turned into a `RouteError` value at its public edge.
    """

    reason = "no_route"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Upstream:
    """A chosen workload and port (upstream's `Upstream`).

    `ip` is None when the workload is reached through its network gateway, or when it has
    only a hostname: then `resolve_hostname` names what the caller must resolve.
    """

    workload: Workload
    port: int
    service: Service | None
    ip: str | None
    resolve_hostname: str | None = None

    def service_sans(self) -> tuple[str, ...]:
        """The service's valid SPIFFE SANs; invalid ones are skipped as upstream does."""
        return valid_sans(self.service.subject_alt_names) if self.service else ()

    def sans(self) -> tuple[str, ...]:
        """Service SANs plus the workload identity (`workload_and_services_san`)."""
        return (*self.service_sans(), self.workload.identity())


# (workload, target port, service it was selected from): upstream's `UpstreamParts`.
Candidate = tuple[Workload, int, Service | None]


def valid_sans(sans: Iterable[str]) -> tuple[str, ...]:
    out = []
    for san in sans:
        try:
            Identity.parse(san)
        except IdentityError:
            continue
        out.append(san)
    return tuple(out)


def is_ipv6(ip: str) -> bool:
    return ":" in ip


# --- load balancing (`ProxyState::load_balance`) --------------------------------------------


def load_balance(
    state: ProxyState,
    service: Service,
    *,
    source: Workload,
    svc_port: int,
    rng: Rng,
    mode: ResolutionMode = "standard",
) -> tuple[Workload, int] | None:
    """Pick an endpoint of `service` for `svc_port`: (workload, target port), or None.

    Endpoints are filtered (§10.1), ranked by the service's routing preferences, and the
    winner drawn at random weighted by capacity. The target port is the endpoint's mapping
    for `svc_port`, else the service's non-zero target port, else `svc_port` itself when
    the workload has an application tunnel with a port (`find_upstream_from_service`).
    """
    if mode == "standard" and svc_port not in service.ports:
        return None
    eligible = _eligible(state, service, source, svc_port, mode)
    lb = service.load_balancer
    if lb is not None and lb.mode != "Standard":
        eligible = _best_ranked(eligible, source, lb)
    picked = choose_weighted(eligible, [w.capacity for _, w in eligible], rng)
    if picked is None:
        return None
    ep, wl = picked
    port = _target_port(service, ep, wl, svc_port)
    return None if port is None else (wl, port)


def _eligible(
    state: ProxyState, service: Service, source: Workload, svc_port: int, mode: ResolutionMode
) -> list[tuple[Endpoint, Workload]]:
    svc_target = service.ports.get(svc_port)
    out = []
    for ep in state.endpoints(service.key()).values():
        wl = state.workload_by_uid(ep.workload_uid)
        if wl is None or not _reachable(wl, source):
            continue
        if mode == "standard":
            # A named port (target 0) is usable only where the endpoint maps it.
            if not svc_target and svc_port not in ep.port:
                continue
        elif svc_target is None and wl.application_tunnel is None:
            # Waypoints are not addressed by users: the port may be absent with a tunnel.
            continue
        out.append((ep, wl))
    return out


def _reachable(wl: Workload, source: Workload) -> bool:
    """A workload with no IP and no hostname is reachable only via a remote network gateway.

    WDS is client-agnostic, so such a workload may carry a gateway even on our network;
    it must never be used there.
    """
    if wl.workload_ips or wl.hostname:
        return True
    return wl.network != source.network and wl.network_gateway is not None


def _best_ranked(
    eligible: list[tuple[Endpoint, Workload]], source: Workload, lb: LoadBalancer
) -> list[tuple[Endpoint, Workload]]:
    """Keep the endpoints of maximum rank; in Strict mode only full matches count."""
    wanted = len(lb.routing_preferences)
    ranked = []
    for ep, wl in eligible:
        rank, adjust = _rank(source, wl, lb)
        if lb.mode == "Strict" and rank != wanted:
            continue
        ranked.append((rank + adjust, ep, wl))
    if not ranked:
        return []
    best = max(r for r, _, _ in ranked)
    return [(ep, wl) for r, ep, wl in ranked if r == best]


def _rank(src: Workload, wl: Workload, lb: LoadBalancer) -> tuple[int, int]:
    """(rank, network adjustment) of one endpoint.

    Scopes are walked in order, each match adding one, stopping at the first mismatch.
    When Network comes first, a network match is worth every other scope (the adjustment)
    and a mismatch skips Network instead of stopping, so locality still ranks remote
    endpoints among themselves.
    """
    prefs = lb.routing_preferences
    network_first = bool(prefs) and prefs[0] == "Network"
    rank = adjust = 0
    for scope in prefs:
        if scope == "Network":
            matches = src.network == wl.network
            if network_first:
                if not matches:
                    continue
                adjust = len(prefs) - 1
        else:
            matches = _same_scope(scope, src, wl)
        if not matches:
            break
        rank += 1
    return rank, adjust


def _same_scope(scope: str, a: Workload, b: Workload) -> bool:
    if scope == "Region":
        return a.locality.region == b.locality.region
    if scope == "Zone":
        return a.locality.zone == b.locality.zone
    if scope == "Subzone":
        return a.locality.subzone == b.locality.subzone
    if scope == "Node":
        return a.node == b.node
    return a.cluster_id == b.cluster_id  # Cluster


def _target_port(service: Service, ep: Endpoint, wl: Workload, svc_port: int) -> int | None:
    mapped = ep.port.get(svc_port)
    if mapped is not None:
        return mapped
    svc_target = service.ports.get(svc_port, 0)
    if svc_target > 0:
        return svc_target
    tunnel = wl.application_tunnel
    if tunnel is not None and tunnel.port is not None:
        return svc_port
    return None


def choose_weighted(items: Sequence[T], weights: Sequence[int], rng: Rng) -> T | None:
    """One item drawn with probability proportional to its weight; None if no weight is set.

    Zero-weight items are never chosen (as with rand's `choose_weighted`).
    """
    total = sum(w for w in weights if w > 0)
    if total <= 0:
        return None
    point = rng.random() * total
    acc = 0
    last = None
    for item, w in zip(items, weights, strict=True):
        if w <= 0:
            continue
        acc += w
        last = item
        if point < acc:
            return item
    return last  # float rounding at the very top of the range


def sample_weighted_waypoint(service: Service, rng: Rng) -> GatewayAddress | None:
    """A waypoint from `weighted_waypoints` by weight; None when the set is empty or all zero."""
    ww = service.weighted_waypoints
    picked = choose_weighted(ww, [w.weight for w in ww], rng)
    return None if picked is None else picked.destination


# --- upstream lookup (`find_upstream`, `finalize_upstream`) ----------------------------------


def find_upstream(
    state: ProxyState,
    source: Workload,
    ip: str,
    port: int,
    *,
    network: str,
    mode: ResolutionMode,
    rng: Rng,
) -> Candidate | None:
    """A service VIP (load-balanced) wins over a workload IP; PASSTHROUGH services give None."""
    svc = state.best_service_by_vip(network, ip, source.namespace)
    if svc is not None:
        if svc.load_balancer is not None and svc.load_balancer.mode == "Passthrough":
            return None
        return from_service(state, source, svc, port, mode=mode, rng=rng)
    wl = state.workload_by_ip(network, ip)
    return None if wl is None else (wl, port, None)


def from_service(
    state: ProxyState, source: Workload, svc: Service, port: int, *, mode: ResolutionMode, rng: Rng
) -> Candidate | None:
    picked = load_balance(state, svc, source=source, svc_port=port, rng=rng, mode=mode)
    return None if picked is None else (picked[0], picked[1], svc)


def finalize(candidate: Candidate | None, original_ip: str) -> Upstream | None:
    """Choose the IP to dial for a candidate (upstream's `finalize_upstream`)."""
    if candidate is None:
        return None
    wl, port, svc = candidate
    families = svc.ip_families if svc is not None else None
    ip = pick_workload_ip(wl, original_ip, families)
    hostname = wl.hostname if ip is None and wl.hostname else None
    if ip is None and hostname is None and wl.network_gateway is None:
        raise no_valid_destination(wl)
    return Upstream(workload=wl, port=port, service=svc, ip=ip, resolve_hostname=hostname)


def pick_workload_ip(wl: Workload, original_ip: str, families: IPFamilies | None) -> str | None:
    """The original IP if the workload has it; else one allowed by the service's families,
    preferring the original's family; else None (DNS or network gateway decide)."""
    if original_ip in wl.workload_ips:
        return original_ip
    allowed = [ip for ip in wl.workload_ips if _family_accepts(families, ip)]
    want_v6 = is_ipv6(original_ip)
    same = [ip for ip in allowed if is_ipv6(ip) == want_v6]
    if same:
        return same[0]
    return allowed[0] if allowed else None


def _family_accepts(families: IPFamilies | None, ip: str) -> bool:
    if families == "IPv4":
        return not is_ipv6(ip)
    if families == "IPv6":
        return is_ipv6(ip)
    return True


def no_valid_destination(wl: Workload) -> NoRoute:
    return NoRoute(f"no valid routing destination for workload: {wl.uid}")


# --- waypoints and network gateways (§10.3, §10.4) ------------------------------------------


def is_from_waypoint(state: ProxyState, dst: Workload, source: Workload, src_ip: str) -> bool:
    """Whether the source is `dst`'s own waypoint (`check_from_waypoint`): same identity and
    the downstream IP is one of the waypoint workload's. Keeps sandwiched traffic from
    traversing the waypoint twice."""
    gw = dst.waypoint
    if gw is None:
        return False
    identity = source.identity()

    def is_waypoint(w: Workload) -> bool:
        return w.identity() == identity and src_ip in w.workload_ips

    found = find_destination(state, gw.destination)
    if isinstance(found, Workload):
        return is_waypoint(found)
    if isinstance(found, Service):
        return any(is_waypoint(w) for w in _endpoint_workloads(state, found))
    return False


def find_destination(
    state: ProxyState, dest: NetworkAddress | NamespacedHostname
) -> Service | Workload | None:
    """`ProxyState::find_destination` without a client namespace: by IP a workload wins."""
    if isinstance(dest, NamespacedHostname):
        return find_hostname(state, dest)
    wl = state.workload_by_ip(dest.network, dest.address)
    if wl is not None:
        return wl
    return state.best_service_by_vip(dest.network, dest.address, None)


def _endpoint_workloads(state: ProxyState, svc: Service) -> Iterable[Workload]:
    for uid in state.endpoints(svc.key()):
        wl = state.workload_by_uid(uid)
        if wl is not None:
            yield wl


def find_hostname(state: ProxyState, name: NamespacedHostname) -> Service | Workload | None:
    """A service by namespaced hostname, else a workload with that hostname and namespace.

    The workload fallback scans every workload, as upstream does (an uncommon path).
    """
    svc = state.service_by_key(name.key())
    if svc is not None:
        return svc
    for wl in state.workloads():
        if wl.hostname == name.hostname and wl.namespace == name.namespace:
            return wl
    return None


def fetch_waypoint(
    state: ProxyState,
    gw: GatewayAddress,
    source: Workload,
    original_ip: str,
    rng: Rng,
) -> Upstream:
    """Resolve a waypoint (`fetch_waypoint`); raises `unknown waypoint` when it is not found."""
    return _fetch_gateway(state, gw, source, original_ip, rng=rng, mode="waypoint")


def fetch_network_gateway(
    state: ProxyState,
    gw: GatewayAddress,
    source: Workload,
    original_ip: str,
    rng: Rng,
) -> Upstream:
    """Resolve a network gateway (`fetch_network_gateway`, Standard mode)."""
    return _fetch_gateway(state, gw, source, original_ip, rng=rng, mode="standard")


def _fetch_gateway(
    state: ProxyState,
    gw: GatewayAddress,
    source: Workload,
    original_ip: str,
    *,
    rng: Rng,
    mode: ResolutionMode,
) -> Upstream:
    what = "waypoint" if mode == "waypoint" else "network gateway"
    error = f"unknown {what}"
    dest = gw.destination
    port = gw.hbone_mtls_port
    if isinstance(dest, NamespacedHostname):
        found = find_hostname(state, dest)
        if found is None:
            raise NoRoute(f"{error}: {what} {dest.hostname} not found")
        if isinstance(found, Service):
            candidate = from_service(state, source, found, port, mode=mode, rng=rng)
        else:
            candidate = (found, port, None)
        # Keep the original destination so the IP family follows the caller's.
        target_ip = original_ip
    else:
        # By IP the address is used as given, so the IP family may change.
        candidate = find_upstream(
            state, source, dest.address, port, network=dest.network, mode=mode, rng=rng
        )
        target_ip = dest.address
    upstream = finalize(candidate, target_ip)
    if upstream is None:
        raise NoRoute(f"{error}: {what} {describe_gateway(gw)} not found")
    return upstream


def describe_gateway(gw: GatewayAddress) -> str:
    return f"{gw.destination.key()}:{gw.hbone_mtls_port}"
