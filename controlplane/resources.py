"""State model -> xDS resources: the inverse of `ztunnel.core.convert`, plus names and versions.

What istiod does for ztunnel (`pilot/pkg/serviceregistry/kube/controller/ambient`), reduced to
the model the YAML config already describes: every workload becomes an `istio.workload.Address`
named by its uid, every service one named `namespace/hostname`, every policy an
`istio.security.Authorization` named `namespace/name`. A resource's version is a hash of its
bytes, so a reconnecting client that echoes it in `initial_resource_versions` is sent only what
changed. Aliases carry the other names an on-demand client may ask for (`network/ip`).

Round trip: `convert.decode_address(name, to_bytes(x)) == x` for every model object the YAML
loader produces, except `workload_type`, which the proto narrows to its enum (an unknown or
empty type arrives as `deployment`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2

from ztunnel.core.convert import INVALID_CIDR
from ztunnel.core.model import (
    Authorization,
    GatewayAddress,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Service,
    ServiceAccountMatch,
    StateSnapshot,
    StringMatch,
    Workload,
)
from ztunnel.gen import authorization_pb2, workload_pb2, xds_pb2

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
TYPE_URLS = (ADDRESS_TYPE, AUTHORIZATION_TYPE)

_W = workload_pb2
_A = authorization_pb2
_PROTOCOLS = {"TCP": _W.NONE, "HBONE": _W.HBONE}
_NETWORK_MODES = {"Standard": _W.STANDARD, "HostNetwork": _W.HOST_NETWORK}
_STATUSES = {"Healthy": _W.HEALTHY, "Unhealthy": _W.UNHEALTHY}
_APP_TUNNELS = {"NONE": _W.ApplicationTunnel.NONE, "PROXY": _W.ApplicationTunnel.PROXY}
_IP_FAMILIES = {None: _W.AUTOMATIC, "IPv4": _W.IPV4_ONLY, "IPv6": _W.IPV6_ONLY, "Dual": _W.DUAL}
_LB_MODES = {
    "Standard": _W.LoadBalancing.UNSPECIFIED_MODE,
    "Strict": _W.LoadBalancing.STRICT,
    "Failover": _W.LoadBalancing.FAILOVER,
    "Passthrough": _W.LoadBalancing.PASSTHROUGH,
}
_LB_HEALTH = {
    "OnlyHealthy": _W.LoadBalancing.ONLY_HEALTHY,
    "AllowAll": _W.LoadBalancing.ALLOW_ALL,
}
_LB_SCOPES = {
    "Region": _W.LoadBalancing.REGION,
    "Zone": _W.LoadBalancing.ZONE,
    "Subzone": _W.LoadBalancing.SUBZONE,
    "Node": _W.LoadBalancing.NODE,
    "Cluster": _W.LoadBalancing.CLUSTER,
    "Network": _W.LoadBalancing.NETWORK,
}
_SCOPES = {
    "Global": _A.GLOBAL,
    "Namespace": _A.NAMESPACE,
    "WorkloadSelector": _A.WORKLOAD_SELECTOR,
}
_ACTIONS = {"Allow": _A.ALLOW, "Deny": _A.DENY}


# --- named, versioned resources -------------------------------------------------------------


def resources_of(snap: StateSnapshot) -> dict[str, dict[str, xds_pb2.Resource]]:
    """{type URL: {resource name: Resource}} for everything in `snap`."""
    addresses: dict[str, xds_pb2.Resource] = {}
    for w in snap.workloads:
        aliases = [f"{w.network}/{ip}" for ip in w.workload_ips]
        addresses[w.uid] = resource(w.uid, _W.Address(workload=workload_to_proto(w)), aliases)
    for s in snap.services:
        aliases = [v.key() for v in s.vips]
        addresses[s.key()] = resource(s.key(), _W.Address(service=service_to_proto(s)), aliases)
    policies = {p.key(): resource(p.key(), authorization_to_proto(p)) for p in snap.policies}
    return {ADDRESS_TYPE: addresses, AUTHORIZATION_TYPE: policies}


def resource(
    name: str, message: _W.Address | _A.Authorization, aliases: Iterable[str] = ()
) -> xds_pb2.Resource:
    """A Resource wrapping `message`, versioned by the hash of its deterministic bytes."""
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return xds_pb2.Resource(
        name=name, version=version_of(packed.value), resource=packed, aliases=list(aliases)
    )


def version_of(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


# --- workloads ------------------------------------------------------------------------------


def workload_to_proto(w: Workload) -> _W.Workload:
    pb = _W.Workload(
        uid=w.uid,
        name=w.name,
        namespace=w.namespace,
        addresses=[ipaddress.ip_address(ip).packed for ip in w.workload_ips],
        network=w.network,
        tunnel_protocol=_PROTOCOLS[w.protocol],
        trust_domain=w.trust_domain,
        service_account=w.service_account,
        node=w.node,
        canonical_name=w.canonical_name,
        canonical_revision=w.canonical_revision,
        workload_type=_workload_type(w.workload_type),
        workload_name=w.workload_name,
        native_tunnel=w.native_tunnel,
        authorization_policies=list(w.authorization_policies),
        status=_STATUSES[w.status],
        cluster_id=w.cluster_id,
        hostname=w.hostname,
        services={key: _port_list(ports) for key, ports in w.services.items()},
        locality=_W.Locality(
            region=w.locality.region, zone=w.locality.zone, subzone=w.locality.subzone
        ),
        network_mode=_NETWORK_MODES[w.network_mode],
    )
    pb.capacity.value = w.capacity
    if w.waypoint is not None:
        pb.waypoint.CopyFrom(_gateway(w.waypoint))
    if w.network_gateway is not None:
        pb.network_gateway.CopyFrom(_gateway(w.network_gateway))
    if w.application_tunnel is not None:
        tunnel = w.application_tunnel
        pb.application_tunnel.CopyFrom(
            _W.ApplicationTunnel(protocol=_APP_TUNNELS[tunnel.protocol], port=tunnel.port or 0)
        )
    return pb


def _workload_type(name: str) -> _W.WorkloadType.ValueType:
    known = _W.WorkloadType.DESCRIPTOR.values_by_name.get(name.upper())
    return _W.WorkloadType.ValueType(known.number) if known is not None else _W.DEPLOYMENT


def _ports(ports: Mapping[int, int]) -> list[_W.Port]:
    return [_W.Port(service_port=k, target_port=v) for k, v in ports.items()]


def _port_list(ports: Mapping[int, int]) -> _W.PortList:
    return _W.PortList(ports=_ports(ports))


def _network_address(addr: NetworkAddress) -> _W.NetworkAddress:
    return _W.NetworkAddress(
        network=addr.network, address=ipaddress.ip_address(addr.address).packed
    )


def _gateway(gw: GatewayAddress) -> _W.GatewayAddress:
    pb = _W.GatewayAddress(hbone_mtls_port=gw.hbone_mtls_port)
    dest = gw.destination
    if isinstance(dest, NamespacedHostname):
        pb.hostname.CopyFrom(
            _W.NamespacedHostname(namespace=dest.namespace, hostname=dest.hostname)
        )
    else:
        pb.address.CopyFrom(_network_address(dest))
    return pb


# --- services -------------------------------------------------------------------------------


def service_to_proto(s: Service) -> _W.Service:
    addresses = [_network_address(v) for v in s.vips]
    for c in s.cidr_vips:
        net = ipaddress.ip_network(c.cidr, strict=False)
        addresses.append(
            _W.NetworkAddress(
                network=c.network, address=net.network_address.packed, length=net.prefixlen
            )
        )
    pb = _W.Service(
        name=s.name,
        namespace=s.namespace,
        hostname=s.hostname,
        addresses=addresses,
        ports=_ports(s.ports),
        subject_alt_names=list(s.subject_alt_names),
        weighted_waypoints=[
            _W.WeightedWaypoint(destination=_gateway(ww.destination), weight=ww.weight)
            for ww in s.weighted_waypoints
        ],
        ip_families=_IP_FAMILIES[s.ip_families],
        canonical=s.canonical,
        visibility=_W.Service.NAMESPACE if s.visibility == "Namespace" else _W.Service.PUBLIC,
    )
    if s.waypoint is not None:
        pb.waypoint.CopyFrom(_gateway(s.waypoint))
    if s.load_balancer is not None:
        lb = s.load_balancer
        pb.load_balancing.CopyFrom(
            _W.LoadBalancing(
                routing_preference=[_LB_SCOPES[p] for p in lb.routing_preferences],
                mode=_LB_MODES[lb.mode],
                health_policy=_LB_HEALTH[lb.health_policy],
            )
        )
    return pb


# --- authorization --------------------------------------------------------------------------


def authorization_to_proto(p: Authorization) -> _A.Authorization:
    return _A.Authorization(
        name=p.name,
        namespace=p.namespace,
        scope=_SCOPES[p.scope],
        action=_ACTIONS[p.action],
        dry_run=p.dry_run,
        rules=[
            _A.Rule(clauses=[_A.Clause(matches=[_match(m) for m in clause]) for clause in rule])
            for rule in p.rules
        ],
    )


def _match(m: Match) -> _A.Match:
    return _A.Match(
        namespaces=_string_matches(m.namespaces),
        not_namespaces=_string_matches(m.not_namespaces),
        principals=_string_matches(m.principals),
        not_principals=_string_matches(m.not_principals),
        source_ips=_prefixes(m.source_ips),
        not_source_ips=_prefixes(m.not_source_ips),
        destination_ips=_prefixes(m.destination_ips),
        not_destination_ips=_prefixes(m.not_destination_ips),
        destination_ports=list(m.destination_ports),
        not_destination_ports=list(m.not_destination_ports),
        service_accounts=_sa_matches(m.service_accounts),
        not_service_accounts=_sa_matches(m.not_service_accounts),
    )


def _string_matches(matches: Iterable[StringMatch]) -> list[_A.StringMatch]:
    out = []
    for m in matches:
        pb = _A.StringMatch()
        if m.kind == "Exact":
            pb.exact = m.value
        elif m.kind == "Prefix":
            pb.prefix = m.value
        elif m.kind == "Suffix":
            pb.suffix = m.value
        else:
            pb.presence.SetInParent()
        out.append(pb)
    return out


def _sa_matches(matches: Iterable[ServiceAccountMatch]) -> list[_A.ServiceAccountMatch]:
    return [
        _A.ServiceAccountMatch(namespace=m.namespace, serviceAccount=m.service_account)
        for m in matches
    ]


def _prefixes(cidrs: Iterable[str]) -> list[_A.Address]:
    out = []
    for cidr in cidrs:
        if cidr == INVALID_CIDR:
            out.append(_A.Address())  # zero address bytes: the client turns it back into INVALID
            continue
        net = ipaddress.ip_network(cidr, strict=False)
        out.append(_A.Address(address=net.network_address.packed, length=net.prefixlen))
    return out
