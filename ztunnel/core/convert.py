"""xDS protobuf -> state model: workloads, services and authorization policies.

Pure functions mirroring upstream's `TryFrom` conversions (`src/state/workload.rs`,
`src/state/service.rs`, `src/rbac.rs`) and their rejection reasons (`WorkloadError`), so a
NACK reads the same as upstream's. A bad resource raises `ResourceRejected(name, why)`
and never anything else; the caller rejects that resource only (reference §7.4).

Upstream narrows u32 wire values with Rust `as` casts (ports `as u16`, prefix lengths
`as u8`), which wrap instead of failing; those casts are reproduced with masks below so
an odd value is converted the same way on both implementations.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.message import DecodeError, Message

from ztunnel.core.errors import ResourceRejected
from ztunnel.core.model import (
    ApplicationTunnel,
    AppTunnelProtocol,
    Authorization,
    GatewayAddress,
    HealthStatus,
    IPFamilies,
    LoadBalancer,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkCidr,
    NetworkMode,
    PolicyAction,
    PolicyScope,
    Protocol,
    Service,
    ServiceAccountMatch,
    StringMatch,
    WeightedWaypoint,
    Workload,
)
from ztunnel.gen import authorization_pb2, workload_pb2

__all__ = [
    "address_from_proto",
    "authorization_from_proto",
    "decode_address",
    "decode_authorization",
    "service_from_proto",
    "workload_from_proto",
]

_P = TypeVar("_P", bound=Message)
_T = TypeVar("_T")
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address

_U16 = 0xFFFF  # Rust `as u16`
_U8 = 0xFF  # Rust `as u8`

# Upstream's XDS defaults for empty identity fields (`TryFrom<XdsWorkload> for Workload`).
_DEFAULT_TRUST_DOMAIN = "cluster.local"
_DEFAULT_SERVICE_ACCOUNT = "default"
_DEFAULT_CLUSTER_ID = "Kubernetes"

_PROTOCOLS: dict[str, Protocol] = {"NONE": "TCP", "HBONE": "HBONE"}
_NETWORK_MODES: dict[str, NetworkMode] = {"STANDARD": "Standard", "HOST_NETWORK": "HostNetwork"}
_STATUSES: dict[str, HealthStatus] = {"HEALTHY": "Healthy", "UNHEALTHY": "Unhealthy"}
_APP_TUNNELS: dict[str, AppTunnelProtocol] = {"NONE": "NONE", "PROXY": "PROXY"}
_IP_FAMILIES: dict[str, IPFamilies | None] = {
    "AUTOMATIC": None,
    "IPV4_ONLY": "IPv4",
    "IPV6_ONLY": "IPv6",
    "DUAL": "Dual",
}
_LB_SCOPES: dict[str, LoadBalancerScope] = {
    "REGION": "Region",
    "ZONE": "Zone",
    "SUBZONE": "Subzone",
    "NODE": "Node",
    "CLUSTER": "Cluster",
    "NETWORK": "Network",
}
_LB_MODES: dict[str, LoadBalancerMode] = {
    "UNSPECIFIED_MODE": "Standard",
    "STRICT": "Strict",
    "FAILOVER": "Failover",
    "PASSTHROUGH": "Passthrough",
}
_LB_HEALTH: dict[str, LoadBalancerHealthPolicy] = {
    "ONLY_HEALTHY": "OnlyHealthy",
    "ALLOW_ALL": "AllowAll",
}
_POLICY_SCOPES: dict[str, PolicyScope] = {
    "GLOBAL": "Global",
    "NAMESPACE": "Namespace",
    "WORKLOAD_SELECTOR": "WorkloadSelector",
}
_POLICY_ACTIONS: dict[str, PolicyAction] = {"ALLOW": "Allow", "DENY": "Deny"}


class _Invalid(Exception):
    """Internal: why a resource is bad; the public entry points add the resource name."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


# --- public API ---------------------------------------------------------------------------


def workload_from_proto(pb: workload_pb2.Workload) -> Workload:
    """Convert a Workload; rejections are named by its uid (the xDS resource name)."""
    return _named(pb.uid, _workload, pb)


def service_from_proto(pb: workload_pb2.Service) -> Service:
    """Convert a Service; rejections are named `namespace/hostname`."""
    return _named(f"{pb.namespace}/{pb.hostname}", _service, pb)


def address_from_proto(pb: workload_pb2.Address) -> Workload | Service:
    """Convert an Address (the WDS resource): whichever of workload / service it holds."""
    return _named(_address_name(pb), _address, pb)


def authorization_from_proto(pb: authorization_pb2.Authorization) -> Authorization:
    """Convert an Authorization; rejections are named `namespace/name`."""
    return _named(f"{pb.namespace}/{pb.name}", _authorization, pb)


def decode_address(name: str, raw: bytes) -> Workload | Service:
    """Parse and convert the value of an `istio.workload.Address` Any."""
    return _named(name, _address, _parse(name, workload_pb2.Address, raw))


def decode_authorization(name: str, raw: bytes) -> Authorization:
    """Parse and convert the value of an `istio.security.Authorization` Any."""
    return _named(name, _authorization, _parse(name, authorization_pb2.Authorization, raw))


def _named(name: str, convert: Callable[[_P], _T], pb: _P) -> _T:
    try:
        return convert(pb)
    except _Invalid as exc:
        raise ResourceRejected(name, exc.why) from None


def _parse(name: str, cls: type[_P], raw: bytes) -> _P:
    msg = cls()
    try:
        msg.ParseFromString(raw)
    except DecodeError as exc:
        # upstream: AdsError::Decode, "decode: {prost DecodeError}"
        raise ResourceRejected(name, f"decode: {exc}") from exc
    return msg


def _address_name(pb: workload_pb2.Address) -> str:
    kind = pb.WhichOneof("type")
    if kind == "workload":
        return pb.workload.uid
    if kind == "service":
        return f"{pb.service.namespace}/{pb.service.hostname}"
    return ""


def _address(pb: workload_pb2.Address) -> Workload | Service:
    kind = pb.WhichOneof("type")
    if kind == "workload":
        return _workload(pb.workload)
    if kind == "service":
        return _service(pb.service)
    raise _Invalid("unknown address type")  # src/xds.rs PreparedUpdate::try_from_address


# --- shared pieces -------------------------------------------------------------------------


def _enum_name(desc: EnumDescriptor, value: int) -> str:
    """The enum value's name; an unknown number rejects, as prost's `try_from` does."""
    known = desc.values_by_number.get(value)
    if known is None:
        # WorkloadError::EnumError wrapping prost::UnknownEnumValue
        raise _Invalid(f"decode error: unknown enumeration value {value}")
    return known.name


def _byte_to_ip(raw: bytes) -> _IP:
    """`byte_to_ip`: exactly 4 (IPv4) or 16 (IPv6) bytes."""
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    if len(raw) == 16:
        return ipaddress.IPv6Address(raw)
    raise _Invalid(f"failed to parse address, had {len(raw)} bytes")  # ByteAddressParse


def _cidr(ip: _IP, length: int) -> str:
    """`IpNet::new(ip, length)` as the canonical network string (host bits cleared).

    Clearing host bits does not change what the prefix contains (ipnet tests containment
    against the network address too) and lets consumers parse it with strict checking.
    """
    if length > ip.max_prefixlen:
        raise _Invalid("invalid cidr: invalid IP prefix length")  # ipnet::PrefixLenError
    if isinstance(ip, ipaddress.IPv4Address):
        return str(ipaddress.IPv4Network((ip, length), strict=False))
    return str(ipaddress.IPv6Network((ip, length), strict=False))


def _ports(ports: Iterable[workload_pb2.Port]) -> dict[int, int]:
    """PortList -> {service port: target port}; later duplicates win, app_protocol dropped."""
    return {p.service_port & _U16: p.target_port & _U16 for p in ports}


def _gateway(pb: workload_pb2.GatewayAddress) -> GatewayAddress:
    kind = pb.WhichOneof("destination")
    destination: NetworkAddress | NamespacedHostname
    if kind == "address":
        ip = _byte_to_ip(pb.address.address)
        destination = NetworkAddress(network=pb.address.network, address=str(ip))
    elif kind == "hostname":
        destination = NamespacedHostname(
            namespace=pb.hostname.namespace, hostname=pb.hostname.hostname
        )
    else:
        raise _Invalid("nonempty gateway address is missing address")  # MissingGatewayAddress
    return GatewayAddress(destination=destination, hbone_mtls_port=pb.hbone_mtls_port & _U16)


def _optional_gateway(present: bool, pb: workload_pb2.GatewayAddress) -> GatewayAddress | None:
    return _gateway(pb) if present else None


# --- workloads ----------------------------------------------------------------------------


def _workload(pb: workload_pb2.Workload) -> Workload:
    # Same check order as upstream, so a resource with several faults gets the same reason.
    waypoint = _optional_gateway(pb.HasField("waypoint"), pb.waypoint)
    network_gateway = _optional_gateway(pb.HasField("network_gateway"), pb.network_gateway)
    app_tunnel = _app_tunnel(pb.application_tunnel) if pb.HasField("application_tunnel") else None
    ips = tuple(str(_byte_to_ip(raw)) for raw in pb.addresses)
    services = _workload_services(pb.services)
    return Workload(
        uid=pb.uid,
        name=pb.name,
        namespace=pb.namespace,
        workload_ips=ips,
        waypoint=waypoint,
        network_gateway=network_gateway,
        protocol=_tunnel_protocol(pb.tunnel_protocol),
        network_mode=_NETWORK_MODES[
            _enum_name(workload_pb2.NetworkMode.DESCRIPTOR, pb.network_mode)
        ],
        trust_domain=pb.trust_domain or _DEFAULT_TRUST_DOMAIN,
        service_account=pb.service_account or _DEFAULT_SERVICE_ACCOUNT,
        network=pb.network,
        workload_name=pb.workload_name,
        workload_type=_workload_type(pb.workload_type),
        canonical_name=pb.canonical_name,
        canonical_revision=pb.canonical_revision,
        hostname=pb.hostname,
        node=pb.node,
        native_tunnel=pb.native_tunnel,
        application_tunnel=app_tunnel,
        authorization_policies=tuple(pb.authorization_policies),
        status=_STATUSES[_enum_name(workload_pb2.WorkloadStatus.DESCRIPTOR, pb.status)],
        cluster_id=pb.cluster_id or _DEFAULT_CLUSTER_ID,
        locality=_locality(pb.locality),
        services=services,
        capacity=pb.capacity.value if pb.HasField("capacity") else 1,
    )


def _tunnel_protocol(value: int) -> Protocol:
    name = _enum_name(workload_pb2.TunnelProtocol.DESCRIPTOR, value)
    if name == "LEGACY_ISTIO_MTLS":
        raise _Invalid("unknown enum: unsupported tunnel protocol: legacy istio mtls")
    return _PROTOCOLS[name]


def _workload_type(value: int) -> str:
    # prost's getter (`workload_type()`) maps an unknown number to the default, DEPLOYMENT.
    known = workload_pb2.WorkloadType.DESCRIPTOR.values_by_number.get(value)
    return (known.name if known is not None else "DEPLOYMENT").lower()


def _app_tunnel(pb: workload_pb2.ApplicationTunnel) -> ApplicationTunnel:
    protocol = _enum_name(workload_pb2.ApplicationTunnel.Protocol.DESCRIPTOR, pb.protocol)
    # The zero test is on the wire u32, before the u16 cast (so 65536 gives port 0).
    port = None if pb.port == 0 else pb.port & _U16
    return ApplicationTunnel(protocol=_APP_TUNNELS[protocol], port=port)


def _workload_services(
    services: Mapping[str, workload_pb2.PortList],
) -> dict[str, dict[int, int]]:
    for key in services:
        if "/" not in key:
            raise _Invalid(f"failed to parse namespaced hostname: {key}")
    return {key: _ports(ports.ports) for key, ports in services.items()}


def _locality(pb: workload_pb2.Locality) -> Locality:
    return Locality(region=pb.region, zone=pb.zone, subzone=pb.subzone)


# --- services -----------------------------------------------------------------------------


def _service(pb: workload_pb2.Service) -> Service:
    vips, cidr_vips = _service_addresses(pb.addresses)
    waypoint = _optional_gateway(pb.HasField("waypoint"), pb.waypoint)
    weighted = tuple(_weighted_waypoint(w) for w in pb.weighted_waypoints)
    lb = _load_balancer(pb.load_balancing) if pb.HasField("load_balancing") else None
    ip_families = _IP_FAMILIES[_enum_name(workload_pb2.IPFamilies.DESCRIPTOR, pb.ip_families)]
    return Service(
        name=pb.name,
        namespace=pb.namespace,
        hostname=pb.hostname,
        vips=vips,
        cidr_vips=cidr_vips,
        ports=_ports(pb.ports),
        subject_alt_names=tuple(pb.subject_alt_names),
        waypoint=waypoint,
        weighted_waypoints=weighted,
        load_balancer=lb,
        ip_families=ip_families,
        canonical=pb.canonical,
        # Unknown values fail open to PUBLIC rather than dropping the service.
        visibility="Namespace" if pb.visibility == workload_pb2.Service.NAMESPACE else "Public",
    )


def _service_addresses(
    addresses: Iterable[workload_pb2.NetworkAddress],
) -> tuple[tuple[NetworkAddress, ...], tuple[NetworkCidr, ...]]:
    """Split into VIPs (no length, or the full prefix) and CIDR VIPs (a shorter length)."""
    vips: list[NetworkAddress] = []
    cidrs: list[NetworkCidr] = []
    for addr in addresses:
        ip = _byte_to_ip(addr.address)
        # Compared on the wire u32; only then narrowed `as u8` for IpNet::new.
        if addr.HasField("length") and addr.length != ip.max_prefixlen:
            cidr = _cidr(ip, addr.length & _U8)
            cidrs.append(NetworkCidr(network=addr.network, cidr=cidr))
        else:
            vips.append(NetworkAddress(network=addr.network, address=str(ip)))
    return tuple(vips), tuple(cidrs)


def _weighted_waypoint(pb: workload_pb2.WeightedWaypoint) -> WeightedWaypoint:
    if not pb.HasField("destination"):
        raise _Invalid("nonempty gateway address is missing address")
    return WeightedWaypoint(destination=_gateway(pb.destination), weight=pb.weight)


def _load_balancer(pb: workload_pb2.LoadBalancing) -> LoadBalancer:
    scopes = tuple(_lb_scope(scope) for scope in pb.routing_preference)
    mode = _enum_name(workload_pb2.LoadBalancing.Mode.DESCRIPTOR, pb.mode)
    health = _enum_name(workload_pb2.LoadBalancing.HealthPolicy.DESCRIPTOR, pb.health_policy)
    return LoadBalancer(
        routing_preferences=scopes, mode=_LB_MODES[mode], health_policy=_LB_HEALTH[health]
    )


def _lb_scope(value: int) -> LoadBalancerScope:
    name = _enum_name(workload_pb2.LoadBalancing.Scope.DESCRIPTOR, value)
    scope = _LB_SCOPES.get(name)
    if scope is None:  # UNSPECIFIED_SCOPE
        raise _Invalid("unknown enum: invalid target")
    return scope


# --- authorization ------------------------------------------------------------------------


def _authorization(pb: authorization_pb2.Authorization) -> Authorization:
    rules = tuple(
        tuple(tuple(_match(m) for m in clause.matches) for clause in rule.clauses)
        for rule in pb.rules
    )
    scope = _enum_name(authorization_pb2.Scope.DESCRIPTOR, pb.scope)
    action = _enum_name(authorization_pb2.Action.DESCRIPTOR, pb.action)
    return Authorization(
        name=pb.name,
        namespace=pb.namespace,
        scope=_POLICY_SCOPES[scope],
        action=_POLICY_ACTIONS[action],
        dry_run=pb.dry_run,
        rules=rules,
    )


def _match(pb: authorization_pb2.Match) -> Match:
    return Match(
        namespaces=_string_matches(pb.namespaces),
        not_namespaces=_string_matches(pb.not_namespaces),
        service_accounts=_sa_matches(pb.service_accounts),
        not_service_accounts=_sa_matches(pb.not_service_accounts),
        principals=_string_matches(pb.principals),
        not_principals=_string_matches(pb.not_principals),
        source_ips=_prefixes(pb.source_ips),
        not_source_ips=_prefixes(pb.not_source_ips),
        destination_ips=_prefixes(pb.destination_ips),
        not_destination_ips=_prefixes(pb.not_destination_ips),
        destination_ports=tuple(p & _U16 for p in pb.destination_ports),
        not_destination_ports=tuple(p & _U16 for p in pb.not_destination_ports),
    )


def _string_matches(pbs: Iterable[authorization_pb2.StringMatch]) -> tuple[StringMatch, ...]:
    # A StringMatch with no oneof set is dropped (upstream `filter_map`).
    return tuple(m for m in map(_string_match, pbs) if m is not None)


def _string_match(pb: authorization_pb2.StringMatch) -> StringMatch | None:
    kind = pb.WhichOneof("match_type")
    if kind == "exact":
        return StringMatch(kind="Exact", value=pb.exact)
    if kind == "prefix":
        return StringMatch(kind="Prefix", value=pb.prefix)
    if kind == "suffix":
        return StringMatch(kind="Suffix", value=pb.suffix)
    if kind == "presence":
        return StringMatch(kind="Presence")
    return None


def _sa_matches(
    pbs: Iterable[authorization_pb2.ServiceAccountMatch],
) -> tuple[ServiceAccountMatch, ...]:
    return tuple(
        ServiceAccountMatch(namespace=m.namespace, service_account=m.serviceAccount) for m in pbs
    )


INVALID_CIDR = "invalid"


def _prefixes(pbs: Iterable[authorization_pb2.Address]) -> tuple[str, ...]:
    # Upstream drops an unparseable address (`filter_map`), so a positive list whose every
    # entry was bad arrives empty and constrains nothing: an ALLOW on `source_ips` would
    # admit every source. We keep a sentinel in its place instead; `rbac` resolves it toward
    # the restrictive side of the policy's action (fail closed).
    return tuple(INVALID_CIDR if p is None else p for p in map(_prefix, pbs))


def _prefix(pb: authorization_pb2.Address) -> str | None:
    try:
        return _cidr(_byte_to_ip(pb.address), pb.length & _U8)
    except _Invalid:
        return None
