"""xDS protobuf -> model conversion: accept / reject tables, a realistic round trip, fuzzing."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf import empty_pb2, wrappers_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.core import convert
from ztunnel.core.errors import ResourceRejected
from ztunnel.core.model import (
    ApplicationTunnel,
    Authorization,
    GatewayAddress,
    LoadBalancer,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkCidr,
    Service,
    ServiceAccountMatch,
    StringMatch,
    WeightedWaypoint,
    Workload,
)
from ztunnel.gen import authorization_pb2 as apb
from ztunnel.gen import workload_pb2 as wpb

pytestmark = pytest.mark.timeout(60)

V4 = bytes([10, 0, 0, 1])
V6 = ipaddress.IPv6Address("fd00::1").packed
UNKNOWN_ENUM = "decode error: unknown enumeration value {}"
MISSING_GATEWAY = "nonempty gateway address is missing address"
_APP_PROTOCOL = wpb.ApplicationTunnel.Protocol.ValueType  # a raw, possibly unknown, number


# --- builders ---------------------------------------------------------------------------------


def workload_pb(**fields: Any) -> wpb.Workload:
    base: dict[str, Any] = {"uid": "cluster1//v1/Pod/default/pod-a", "namespace": "default"}
    return wpb.Workload(**(base | fields))


def service_pb(**fields: Any) -> wpb.Service:
    base: dict[str, Any] = {"name": "web", "namespace": "default", "hostname": "web.default"}
    return wpb.Service(**(base | fields))


def policy_pb(*matches: apb.Match, **fields: Any) -> apb.Authorization:
    rules = [apb.Rule(clauses=[apb.Clause(matches=list(matches))])] if matches else []
    base: dict[str, Any] = {"name": "allow-web", "namespace": "default", "rules": rules}
    return apb.Authorization(**(base | fields))


def gw_addr(raw: bytes, port: int = 15008, network: str = "") -> wpb.GatewayAddress:
    address = wpb.NetworkAddress(network=network, address=raw)
    return wpb.GatewayAddress(address=address, hbone_mtls_port=port)


def net_addr(raw: bytes, length: int | None = None, network: str = "") -> wpb.NetworkAddress:
    if length is None:
        return wpb.NetworkAddress(network=network, address=raw)
    return wpb.NetworkAddress(network=network, address=raw, length=length)


def rbac_addr(ip: str, length: int) -> apb.Address:
    return apb.Address(address=ipaddress.ip_address(ip).packed, length=length)


def lb_pb(*scopes: Any, mode: Any = 0, health: Any = 0) -> wpb.LoadBalancing:
    # Any: the tables deliberately pass numbers outside the enums.
    return wpb.LoadBalancing(routing_preference=list(scopes), mode=mode, health_policy=health)


def only_match(policy: Authorization) -> Match:
    [[[match]]] = policy.rules
    return match


# --- workloads: accepted -----------------------------------------------------------------------


WORKLOAD_ACCEPTS: list[tuple[str, wpb.Workload, Callable[[Workload], Any], Any]] = [
    ("v4 address", workload_pb(addresses=[V4]), lambda w: w.workload_ips, ("10.0.0.1",)),
    ("v6 address", workload_pb(addresses=[V6]), lambda w: w.workload_ips, ("fd00::1",)),
    (
        "dual stack keeps order",
        workload_pb(addresses=[V6, V4]),
        lambda w: w.workload_ips,
        ("fd00::1", "10.0.0.1"),
    ),
    (
        "v4-mapped v6 stays v6",
        workload_pb(addresses=[ipaddress.IPv6Address("::ffff:10.0.0.1").packed]),
        lambda w: w.workload_ips,
        (str(ipaddress.IPv6Address("::ffff:10.0.0.1")),),
    ),
    ("no addresses", workload_pb(hostname="vm.example"), lambda w: w.workload_ips, ()),
    ("trust domain default", workload_pb(), lambda w: w.trust_domain, "cluster.local"),
    ("trust domain kept", workload_pb(trust_domain="td"), lambda w: w.trust_domain, "td"),
    ("service account default", workload_pb(), lambda w: w.service_account, "default"),
    ("service account kept", workload_pb(service_account="sa"), lambda w: w.service_account, "sa"),
    ("cluster id default", workload_pb(), lambda w: w.cluster_id, "Kubernetes"),
    ("cluster id kept", workload_pb(cluster_id="c2"), lambda w: w.cluster_id, "c2"),
    ("tunnel NONE is TCP", workload_pb(tunnel_protocol=wpb.NONE), lambda w: w.protocol, "TCP"),
    ("tunnel HBONE", workload_pb(tunnel_protocol=wpb.HBONE), lambda w: w.protocol, "HBONE"),
    ("type default", workload_pb(), lambda w: w.workload_type, "deployment"),
    ("type pod", workload_pb(workload_type=wpb.POD), lambda w: w.workload_type, "pod"),
    ("type cronjob", workload_pb(workload_type=wpb.CRONJOB), lambda w: w.workload_type, "cronjob"),
    ("type job", workload_pb(workload_type=wpb.JOB), lambda w: w.workload_type, "job"),
    # prost's enum getter falls back to the default for an unknown number.
    ("type unknown", workload_pb(workload_type=42), lambda w: w.workload_type, "deployment"),
    ("mode standard", workload_pb(), lambda w: w.network_mode, "Standard"),
    (
        "mode host network",
        workload_pb(network_mode=wpb.HOST_NETWORK),
        lambda w: w.network_mode,
        "HostNetwork",
    ),
    ("status healthy", workload_pb(), lambda w: w.status, "Healthy"),
    ("status unhealthy", workload_pb(status=wpb.UNHEALTHY), lambda w: w.status, "Unhealthy"),
    ("capacity unset is 1", workload_pb(), lambda w: w.capacity, 1),
    (
        "capacity zero kept",
        workload_pb(capacity=wrappers_pb2.UInt32Value(value=0)),
        lambda w: w.capacity,
        0,
    ),
    (
        "capacity set",
        workload_pb(capacity=wrappers_pb2.UInt32Value(value=7)),
        lambda w: w.capacity,
        7,
    ),
    ("no app tunnel", workload_pb(), lambda w: w.application_tunnel, None),
    (
        "app tunnel port 0 is None",
        workload_pb(application_tunnel=wpb.ApplicationTunnel(protocol=wpb.ApplicationTunnel.PROXY)),
        lambda w: w.application_tunnel,
        ApplicationTunnel(protocol="PROXY", port=None),
    ),
    (
        "app tunnel port kept",
        workload_pb(application_tunnel=wpb.ApplicationTunnel(port=15088)),
        lambda w: w.application_tunnel,
        ApplicationTunnel(protocol="NONE", port=15088),
    ),
    (
        "app tunnel port wraps like `as u16`",
        workload_pb(application_tunnel=wpb.ApplicationTunnel(port=65536)),
        lambda w: w.application_tunnel,
        ApplicationTunnel(protocol="NONE", port=0),
    ),
    (
        "services map",
        workload_pb(
            services={
                "default/web.default": wpb.PortList(
                    ports=[wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.HTTP11)]
                ),
                "other/db.other": wpb.PortList(),
            }
        ),
        lambda w: w.services,
        {"default/web.default": {80: 8080}, "other/db.other": {}},
    ),
    (
        "service ports: later duplicate wins, `as u16`",
        workload_pb(
            services={
                "ns/h": wpb.PortList(
                    ports=[
                        wpb.Port(service_port=80, target_port=1),
                        wpb.Port(service_port=80, target_port=2),
                        wpb.Port(service_port=65536 + 443, target_port=65536 + 8443),
                    ]
                )
            }
        ),
        lambda w: w.services,
        {"ns/h": {80: 2, 443: 8443}},
    ),
    (
        "waypoint by address",
        workload_pb(waypoint=gw_addr(V4, 15008, "net1")),
        lambda w: w.waypoint,
        GatewayAddress(destination=NetworkAddress(network="net1", address="10.0.0.1")),
    ),
    (
        "waypoint by hostname, port 0 kept",
        workload_pb(
            waypoint=wpb.GatewayAddress(
                hostname=wpb.NamespacedHostname(namespace="ns", hostname="wp.ns")
            )
        ),
        lambda w: w.waypoint,
        GatewayAddress(
            destination=NamespacedHostname(namespace="ns", hostname="wp.ns"), hbone_mtls_port=0
        ),
    ),
    (
        "network gateway v6",
        workload_pb(network_gateway=gw_addr(V6, 15009)),
        lambda w: w.network_gateway,
        GatewayAddress(destination=NetworkAddress(address="fd00::1"), hbone_mtls_port=15009),
    ),
    (
        "locality",
        workload_pb(locality=wpb.Locality(region="r", zone="z", subzone="s")),
        lambda w: w.locality,
        Locality(region="r", zone="z", subzone="s"),
    ),
    ("locality absent", workload_pb(), lambda w: w.locality, Locality()),
    (
        "authorization policies",
        workload_pb(authorization_policies=["ns/a", "ns/b"]),
        lambda w: w.authorization_policies,
        ("ns/a", "ns/b"),
    ),
]


@pytest.mark.parametrize(
    ("pb", "get", "want"),
    [case[1:] for case in WORKLOAD_ACCEPTS],
    ids=[case[0] for case in WORKLOAD_ACCEPTS],
)
def test_workload_field_converts(
    pb: wpb.Workload, get: Callable[[Workload], Any], want: Any
) -> None:
    assert get(convert.workload_from_proto(pb)) == want


# --- workloads: rejected -----------------------------------------------------------------------


WORKLOAD_REJECTS: list[tuple[str, wpb.Workload, str]] = [
    (
        "3-byte address",
        workload_pb(addresses=[b"\x01\x02\x03"]),
        "failed to parse address, had 3 bytes",
    ),
    ("empty address", workload_pb(addresses=[V4, b""]), "failed to parse address, had 0 bytes"),
    ("5-byte address", workload_pb(addresses=[bytes(5)]), "failed to parse address, had 5 bytes"),
    (
        "legacy istio mtls",
        workload_pb(tunnel_protocol=wpb.LEGACY_ISTIO_MTLS),
        "unknown enum: unsupported tunnel protocol: legacy istio mtls",
    ),
    ("unknown tunnel protocol", workload_pb(tunnel_protocol=9), UNKNOWN_ENUM.format(9)),
    ("unknown network mode", workload_pb(network_mode=5), UNKNOWN_ENUM.format(5)),
    ("unknown status", workload_pb(status=3), UNKNOWN_ENUM.format(3)),
    (
        "unknown app tunnel protocol",
        workload_pb(application_tunnel=wpb.ApplicationTunnel(protocol=_APP_PROTOCOL(4))),
        UNKNOWN_ENUM.format(4),
    ),
    (
        "waypoint without destination",
        workload_pb(waypoint=wpb.GatewayAddress(hbone_mtls_port=15008)),
        MISSING_GATEWAY,
    ),
    (
        "network gateway without destination",
        workload_pb(network_gateway=wpb.GatewayAddress()),
        MISSING_GATEWAY,
    ),
    (
        "waypoint with a bad address",
        workload_pb(waypoint=gw_addr(bytes(6))),
        "failed to parse address, had 6 bytes",
    ),
    (
        "service key without a slash",
        workload_pb(services={"web.default": wpb.PortList()}),
        "failed to parse namespaced hostname: web.default",
    ),
    (
        # Upstream converts the waypoint before the addresses: the first fault is reported.
        "first fault wins",
        workload_pb(waypoint=wpb.GatewayAddress(), addresses=[b"\x01"]),
        MISSING_GATEWAY,
    ),
]


@pytest.mark.parametrize(
    ("pb", "why"),
    [case[1:] for case in WORKLOAD_REJECTS],
    ids=[case[0] for case in WORKLOAD_REJECTS],
)
def test_workload_rejected_with_upstream_reason(pb: wpb.Workload, why: str) -> None:
    with pytest.raises(ResourceRejected) as err:
        convert.workload_from_proto(pb)
    assert err.value.why == why
    assert err.value.name == pb.uid


# --- services: accepted ------------------------------------------------------------------------


SERVICE_ACCEPTS: list[tuple[str, wpb.Service, Callable[[Service], Any], Any]] = [
    (
        "vip without length",
        service_pb(addresses=[net_addr(V4, network="net1")]),
        lambda s: (s.vips, s.cidr_vips),
        ((NetworkAddress(network="net1", address="10.0.0.1"),), ()),
    ),
    (
        "v4 full-length prefix is a vip",
        service_pb(addresses=[net_addr(V4, 32)]),
        lambda s: (s.vips, s.cidr_vips),
        ((NetworkAddress(address="10.0.0.1"),), ()),
    ),
    (
        "v6 full-length prefix is a vip",
        service_pb(addresses=[net_addr(V6, 128)]),
        lambda s: (s.vips, s.cidr_vips),
        ((NetworkAddress(address="fd00::1"),), ()),
    ),
    (
        "v4 shorter prefix is a cidr vip",
        service_pb(addresses=[net_addr(bytes([10, 1, 2, 0]), 24, "net1")]),
        lambda s: (s.vips, s.cidr_vips),
        ((), (NetworkCidr(network="net1", cidr="10.1.2.0/24"),)),
    ),
    (
        "cidr host bits are cleared",
        service_pb(addresses=[net_addr(bytes([10, 1, 2, 3]), 16)]),
        lambda s: s.cidr_vips,
        (NetworkCidr(cidr="10.1.0.0/16"),),
    ),
    (
        "v6 cidr vip",
        service_pb(addresses=[net_addr(V6, 64)]),
        lambda s: s.cidr_vips,
        (NetworkCidr(cidr="fd00::/64"),),
    ),
    (
        "length 0 is a cidr covering everything",
        service_pb(addresses=[net_addr(V4, 0)]),
        lambda s: s.cidr_vips,
        (NetworkCidr(cidr="0.0.0.0/0"),),
    ),
    (
        "prefix length wraps like `as u8`",
        service_pb(addresses=[net_addr(V4, 256 + 8)]),
        lambda s: s.cidr_vips,
        (NetworkCidr(cidr="10.0.0.0/8"),),
    ),
    (
        "mixed vips and cidrs keep order",
        service_pb(addresses=[net_addr(V6), net_addr(V4, 8), net_addr(V4)]),
        lambda s: (s.vips, s.cidr_vips),
        (
            (NetworkAddress(address="fd00::1"), NetworkAddress(address="10.0.0.1")),
            (NetworkCidr(cidr="10.0.0.0/8"),),
        ),
    ),
    (
        "ports: app protocol dropped, later duplicate wins",
        service_pb(
            ports=[
                wpb.Port(service_port=80, target_port=8080, app_protocol=wpb.HTTP2),
                wpb.Port(service_port=443, target_port=8443),
                wpb.Port(service_port=80, target_port=9090),
            ]
        ),
        lambda s: s.ports,
        {80: 9090, 443: 8443},
    ),
    ("no load balancing", service_pb(), lambda s: s.load_balancer, None),
    (
        "unspecified mode is Standard",
        service_pb(load_balancing=lb_pb()),
        lambda s: s.load_balancer,
        LoadBalancer(routing_preferences=(), mode="Standard", health_policy="OnlyHealthy"),
    ),
    (
        "scopes, failover, allow all",
        service_pb(
            load_balancing=lb_pb(
                wpb.LoadBalancing.NETWORK,
                wpb.LoadBalancing.REGION,
                wpb.LoadBalancing.ZONE,
                wpb.LoadBalancing.SUBZONE,
                wpb.LoadBalancing.NODE,
                wpb.LoadBalancing.CLUSTER,
                mode=wpb.LoadBalancing.FAILOVER,
                health=wpb.LoadBalancing.ALLOW_ALL,
            )
        ),
        lambda s: s.load_balancer,
        LoadBalancer(
            routing_preferences=("Network", "Region", "Zone", "Subzone", "Node", "Cluster"),
            mode="Failover",
            health_policy="AllowAll",
        ),
    ),
    (
        "strict",
        service_pb(load_balancing=lb_pb(mode=wpb.LoadBalancing.STRICT)),
        lambda s: s.load_balancer.mode if s.load_balancer else None,
        "Strict",
    ),
    (
        "passthrough",
        service_pb(load_balancing=lb_pb(mode=wpb.LoadBalancing.PASSTHROUGH)),
        lambda s: s.load_balancer.mode if s.load_balancer else None,
        "Passthrough",
    ),
    ("ip families automatic is None", service_pb(), lambda s: s.ip_families, None),
    ("ip families v4", service_pb(ip_families=wpb.IPV4_ONLY), lambda s: s.ip_families, "IPv4"),
    ("ip families v6", service_pb(ip_families=wpb.IPV6_ONLY), lambda s: s.ip_families, "IPv6"),
    ("ip families dual", service_pb(ip_families=wpb.DUAL), lambda s: s.ip_families, "Dual"),
    ("visibility default public", service_pb(), lambda s: s.visibility, "Public"),
    (
        "visibility namespace",
        service_pb(visibility=wpb.Service.NAMESPACE),
        lambda s: s.visibility,
        "Namespace",
    ),
    ("unknown visibility is public", service_pb(visibility=9), lambda s: s.visibility, "Public"),
    (
        "weighted waypoints",
        service_pb(
            weighted_waypoints=[
                wpb.WeightedWaypoint(destination=gw_addr(V4), weight=90),
                wpb.WeightedWaypoint(
                    destination=wpb.GatewayAddress(
                        hostname=wpb.NamespacedHostname(namespace="ns", hostname="wp2"),
                        hbone_mtls_port=15008,
                    ),
                ),
            ]
        ),
        lambda s: s.weighted_waypoints,
        (
            WeightedWaypoint(
                destination=GatewayAddress(destination=NetworkAddress(address="10.0.0.1")),
                weight=90,
            ),
            WeightedWaypoint(
                destination=GatewayAddress(
                    destination=NamespacedHostname(namespace="ns", hostname="wp2")
                ),
                weight=0,
            ),
        ),
    ),
    ("canonical", service_pb(canonical=True), lambda s: s.canonical, True),
    (
        "subject alt names",
        service_pb(subject_alt_names=["spiffe://td/ns/a/sa/b"]),
        lambda s: s.subject_alt_names,
        ("spiffe://td/ns/a/sa/b",),
    ),
]


@pytest.mark.parametrize(
    ("pb", "get", "want"),
    [case[1:] for case in SERVICE_ACCEPTS],
    ids=[case[0] for case in SERVICE_ACCEPTS],
)
def test_service_field_converts(pb: wpb.Service, get: Callable[[Service], Any], want: Any) -> None:
    assert get(convert.service_from_proto(pb)) == want


# --- services: rejected ------------------------------------------------------------------------


SERVICE_REJECTS: list[tuple[str, wpb.Service, str]] = [
    (
        "5-byte vip",
        service_pb(addresses=[net_addr(bytes(5))]),
        "failed to parse address, had 5 bytes",
    ),
    ("empty vip", service_pb(addresses=[net_addr(b"")]), "failed to parse address, had 0 bytes"),
    (
        "v4 prefix too long",
        service_pb(addresses=[net_addr(V4, 33)]),
        "invalid cidr: invalid IP prefix length",
    ),
    (
        "v6 prefix too long",
        service_pb(addresses=[net_addr(V6, 129)]),
        "invalid cidr: invalid IP prefix length",
    ),
    (
        "unspecified scope",
        service_pb(
            load_balancing=lb_pb(wpb.LoadBalancing.ZONE, wpb.LoadBalancing.UNSPECIFIED_SCOPE)
        ),
        "unknown enum: invalid target",
    ),
    ("unknown scope", service_pb(load_balancing=lb_pb(99)), UNKNOWN_ENUM.format(99)),
    ("unknown mode", service_pb(load_balancing=lb_pb(mode=9)), UNKNOWN_ENUM.format(9)),
    ("unknown health policy", service_pb(load_balancing=lb_pb(health=5)), UNKNOWN_ENUM.format(5)),
    ("unknown ip families", service_pb(ip_families=8), UNKNOWN_ENUM.format(8)),
    (
        "waypoint without destination",
        service_pb(waypoint=wpb.GatewayAddress(hbone_mtls_port=15008)),
        MISSING_GATEWAY,
    ),
    (
        "weighted waypoint without gateway",
        service_pb(weighted_waypoints=[wpb.WeightedWaypoint(weight=1)]),
        MISSING_GATEWAY,
    ),
    (
        "weighted waypoint gateway without destination",
        service_pb(weighted_waypoints=[wpb.WeightedWaypoint(destination=wpb.GatewayAddress())]),
        MISSING_GATEWAY,
    ),
]


@pytest.mark.parametrize(
    ("pb", "why"),
    [case[1:] for case in SERVICE_REJECTS],
    ids=[case[0] for case in SERVICE_REJECTS],
)
def test_service_rejected_with_upstream_reason(pb: wpb.Service, why: str) -> None:
    with pytest.raises(ResourceRejected) as err:
        convert.service_from_proto(pb)
    assert err.value.why == why
    assert err.value.name == "default/web.default"


# --- addresses ---------------------------------------------------------------------------------


def test_address_holding_a_workload_converts_to_workload() -> None:
    got = convert.address_from_proto(wpb.Address(workload=workload_pb(addresses=[V4])))
    assert isinstance(got, Workload)
    assert got.workload_ips == ("10.0.0.1",)


def test_address_holding_a_service_converts_to_service() -> None:
    got = convert.address_from_proto(wpb.Address(service=service_pb()))
    assert isinstance(got, Service)
    assert got.key() == "default/web.default"


def test_empty_address_is_rejected_as_unknown_type() -> None:
    with pytest.raises(ResourceRejected) as err:
        convert.decode_address("ns/thing", b"")
    assert (err.value.name, err.value.why) == ("ns/thing", "unknown address type")


def test_address_rejection_is_named_after_the_inner_resource() -> None:
    bad = wpb.Address(workload=workload_pb(uid="uid-1", status=7))
    with pytest.raises(ResourceRejected) as err:
        convert.address_from_proto(bad)
    assert err.value.name == "uid-1"
    assert str(err.value) == f"uid-1: {UNKNOWN_ENUM.format(7)}"


def test_decode_address_uses_the_xds_resource_name() -> None:
    raw = wpb.Address(service=service_pb(ip_families=8)).SerializeToString()
    with pytest.raises(ResourceRejected) as err:
        convert.decode_address("xds-name", raw)
    assert err.value.name == "xds-name"


@pytest.mark.parametrize("raw", [b"\xff", b"\x0a\x05\x01", b"\x0a\xff\xff\xff\xff\x0f"])
def test_undecodable_bytes_are_rejected_as_decode_errors(raw: bytes) -> None:
    for decode in (convert.decode_address, convert.decode_authorization):
        with pytest.raises(ResourceRejected) as err:
            decode("res", raw)
        assert err.value.name == "res"
        assert err.value.why.startswith("decode: ")


# --- authorization -----------------------------------------------------------------------------


POLICY_ACCEPTS: list[tuple[str, apb.Authorization, Callable[[Authorization], Any], Any]] = [
    ("scope global", policy_pb(scope=apb.GLOBAL), lambda p: p.scope, "Global"),
    ("scope namespace", policy_pb(scope=apb.NAMESPACE), lambda p: p.scope, "Namespace"),
    (
        "scope workload selector",
        policy_pb(scope=apb.WORKLOAD_SELECTOR),
        lambda p: p.scope,
        "WorkloadSelector",
    ),
    ("action allow", policy_pb(), lambda p: p.action, "Allow"),
    ("action deny", policy_pb(action=apb.DENY), lambda p: p.action, "Deny"),
    ("dry run", policy_pb(dry_run=True), lambda p: p.dry_run, True),
    ("no rules", policy_pb(), lambda p: p.rules, ()),
    (
        "string matches of every kind",
        policy_pb(
            apb.Match(
                namespaces=[apb.StringMatch(exact="a"), apb.StringMatch(prefix="b")],
                not_namespaces=[apb.StringMatch(suffix="c")],
                principals=[apb.StringMatch(presence=empty_pb2.Empty())],
                not_principals=[apb.StringMatch(exact="")],
            )
        ),
        only_match,
        Match(
            namespaces=(
                StringMatch(kind="Exact", value="a"),
                StringMatch(kind="Prefix", value="b"),
            ),
            not_namespaces=(StringMatch(kind="Suffix", value="c"),),
            principals=(StringMatch(kind="Presence"),),
            not_principals=(StringMatch(kind="Exact", value=""),),
        ),
    ),
    (
        "string match with no kind is dropped",
        policy_pb(apb.Match(namespaces=[apb.StringMatch(), apb.StringMatch(exact="x")])),
        lambda p: only_match(p).namespaces,
        (StringMatch(kind="Exact", value="x"),),
    ),
    (
        "service accounts",
        policy_pb(
            apb.Match(
                service_accounts=[apb.ServiceAccountMatch(namespace="ns", serviceAccount="sa")],
                not_service_accounts=[apb.ServiceAccountMatch(namespace="ns2", serviceAccount="b")],
            )
        ),
        lambda p: (only_match(p).service_accounts, only_match(p).not_service_accounts),
        (
            (ServiceAccountMatch(namespace="ns", service_account="sa"),),
            (ServiceAccountMatch(namespace="ns2", service_account="b"),),
        ),
    ),
    (
        "ip prefixes in all four fields",
        policy_pb(
            apb.Match(
                source_ips=[rbac_addr("10.0.0.0", 8)],
                not_source_ips=[rbac_addr("10.1.2.3", 32)],
                destination_ips=[rbac_addr("fd00::", 64)],
                not_destination_ips=[rbac_addr("fd00::1", 128)],
            )
        ),
        lambda p: (
            only_match(p).source_ips,
            only_match(p).not_source_ips,
            only_match(p).destination_ips,
            only_match(p).not_destination_ips,
        ),
        (("10.0.0.0/8",), ("10.1.2.3/32",), ("fd00::/64",), ("fd00::1/128",)),
    ),
    (
        # IpNet::new(ip, 0): a zero length is the whole address family, as upstream.
        "length 0 covers everything",
        policy_pb(apb.Match(source_ips=[rbac_addr("10.1.2.3", 0)])),
        lambda p: only_match(p).source_ips,
        ("0.0.0.0/0",),
    ),
    (
        "invalid addresses become a fail-closed sentinel",
        policy_pb(
            apb.Match(
                source_ips=[
                    apb.Address(address=b"\x01\x02\x03", length=8),
                    rbac_addr("10.0.0.1", 33),
                    rbac_addr("fd00::1", 129),
                    rbac_addr("192.168.0.0", 16),
                ]
            )
        ),
        lambda p: only_match(p).source_ips,
        (convert.INVALID_CIDR, convert.INVALID_CIDR, convert.INVALID_CIDR, "192.168.0.0/16"),
    ),
    (
        "prefix length wraps like `as u8`",
        policy_pb(apb.Match(source_ips=[rbac_addr("10.0.0.0", 256 + 8)])),
        lambda p: only_match(p).source_ips,
        ("10.0.0.0/8",),
    ),
    (
        "ports, `as u16`",
        policy_pb(apb.Match(destination_ports=[80, 65536 + 443], not_destination_ports=[9999])),
        lambda p: (only_match(p).destination_ports, only_match(p).not_destination_ports),
        ((80, 443), (9999,)),
    ),
    (
        "rules -> clauses -> matches keep their shape",
        policy_pb(
            rules=[
                apb.Rule(
                    clauses=[
                        apb.Clause(matches=[apb.Match(destination_ports=[1]), apb.Match()]),
                        apb.Clause(),
                    ]
                ),
                apb.Rule(),
            ]
        ),
        lambda p: p.rules,
        (((Match(destination_ports=(1,)), Match()), ()), ()),
    ),
]


@pytest.mark.parametrize(
    ("pb", "get", "want"),
    [case[1:] for case in POLICY_ACCEPTS],
    ids=[case[0] for case in POLICY_ACCEPTS],
)
def test_authorization_field_converts(
    pb: apb.Authorization, get: Callable[[Authorization], Any], want: Any
) -> None:
    assert get(convert.authorization_from_proto(pb)) == want


@pytest.mark.parametrize(
    ("pb", "why"),
    [
        (policy_pb(scope=3), UNKNOWN_ENUM.format(3)),
        (policy_pb(action=2), UNKNOWN_ENUM.format(2)),
        (policy_pb(action=-1), UNKNOWN_ENUM.format(-1)),
    ],
    ids=["unknown scope", "unknown action (no AUDIT)", "negative action"],
)
def test_authorization_rejected_with_upstream_reason(pb: apb.Authorization, why: str) -> None:
    with pytest.raises(ResourceRejected) as err:
        convert.authorization_from_proto(pb)
    assert (err.value.name, err.value.why) == ("default/allow-web", why)


def test_decode_authorization_uses_the_xds_resource_name() -> None:
    raw = policy_pb(scope=9).SerializeToString()
    with pytest.raises(ResourceRejected) as err:
        convert.decode_authorization("default/allow-web-xds", raw)
    assert err.value.name == "default/allow-web-xds"


# --- realistic round trips ---------------------------------------------------------------------


def test_realistic_workload_round_trips_through_bytes() -> None:
    pb = wpb.Workload(
        uid="Kubernetes//Pod/bookinfo/reviews-v1-5b4f",
        name="reviews-v1-5b4f",
        namespace="bookinfo",
        addresses=[bytes([10, 244, 1, 7]), ipaddress.IPv6Address("fd00:10:244::7").packed],
        network="net-a",
        tunnel_protocol=wpb.HBONE,
        service_account="bookinfo-reviews",
        waypoint=gw_addr(bytes([10, 96, 0, 20]), 15008),
        node="node-1",
        canonical_name="reviews",
        canonical_revision="v1",
        workload_type=wpb.DEPLOYMENT,
        workload_name="reviews-v1",
        authorization_policies=["bookinfo/allow-productpage"],
        services={
            "bookinfo/reviews.bookinfo.svc.cluster.local": wpb.PortList(
                ports=[wpb.Port(service_port=9080, target_port=9080, app_protocol=wpb.HTTP11)]
            )
        },
        locality=wpb.Locality(region="eu-west1", zone="eu-west1-b"),
        capacity=wrappers_pb2.UInt32Value(value=2),
    )
    got = convert.decode_address(pb.uid, wpb.Address(workload=pb).SerializeToString())
    assert got == Workload(
        uid="Kubernetes//Pod/bookinfo/reviews-v1-5b4f",
        name="reviews-v1-5b4f",
        namespace="bookinfo",
        workload_ips=("10.244.1.7", "fd00:10:244::7"),
        waypoint=GatewayAddress(destination=NetworkAddress(address="10.96.0.20")),
        protocol="HBONE",
        trust_domain="cluster.local",
        service_account="bookinfo-reviews",
        network="net-a",
        workload_name="reviews-v1",
        workload_type="deployment",
        canonical_name="reviews",
        canonical_revision="v1",
        node="node-1",
        authorization_policies=("bookinfo/allow-productpage",),
        cluster_id="Kubernetes",
        locality=Locality(region="eu-west1", zone="eu-west1-b"),
        services={"bookinfo/reviews.bookinfo.svc.cluster.local": {9080: 9080}},
        capacity=2,
    )
    assert got.identity() == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"


def test_realistic_service_round_trips_through_bytes() -> None:
    pb = wpb.Service(
        name="reviews",
        namespace="bookinfo",
        hostname="reviews.bookinfo.svc.cluster.local",
        addresses=[
            net_addr(bytes([10, 96, 0, 12]), network="net-a"),
            net_addr(bytes([240, 0, 0, 0]), 4),
        ],
        ports=[wpb.Port(service_port=9080, target_port=9080)],
        waypoint=gw_addr(bytes([10, 96, 0, 20])),
        load_balancing=lb_pb(
            wpb.LoadBalancing.NETWORK, wpb.LoadBalancing.ZONE, mode=wpb.LoadBalancing.FAILOVER
        ),
        ip_families=wpb.IPV4_ONLY,
        canonical=True,
    )
    got = convert.decode_address(
        "bookinfo/reviews.bookinfo.svc.cluster.local", wpb.Address(service=pb).SerializeToString()
    )
    assert got == Service(
        name="reviews",
        namespace="bookinfo",
        hostname="reviews.bookinfo.svc.cluster.local",
        vips=(NetworkAddress(network="net-a", address="10.96.0.12"),),
        cidr_vips=(NetworkCidr(cidr="240.0.0.0/4"),),
        ports={9080: 9080},
        waypoint=GatewayAddress(destination=NetworkAddress(address="10.96.0.20")),
        load_balancer=LoadBalancer(routing_preferences=("Network", "Zone"), mode="Failover"),
        ip_families="IPv4",
        canonical=True,
        visibility="Public",
    )


def test_realistic_policy_round_trips_through_bytes() -> None:
    pb = apb.Authorization(
        name="allow-productpage",
        namespace="bookinfo",
        scope=apb.WORKLOAD_SELECTOR,
        action=apb.ALLOW,
        rules=[
            apb.Rule(
                clauses=[
                    apb.Clause(
                        matches=[
                            apb.Match(
                                principals=[
                                    apb.StringMatch(
                                        exact="spiffe://cluster.local/ns/bookinfo/sa/productpage"
                                    )
                                ],
                                not_source_ips=[rbac_addr("10.244.9.0", 24)],
                            )
                        ]
                    ),
                    apb.Clause(matches=[apb.Match(destination_ports=[9080])]),
                ]
            )
        ],
    )
    got = convert.decode_authorization("bookinfo/allow-productpage", pb.SerializeToString())
    assert got == Authorization(
        name="allow-productpage",
        namespace="bookinfo",
        scope="WorkloadSelector",
        action="Allow",
        rules=(
            (
                (
                    Match(
                        principals=(
                            StringMatch(
                                kind="Exact",
                                value="spiffe://cluster.local/ns/bookinfo/sa/productpage",
                            ),
                        ),
                        not_source_ips=("10.244.9.0/24",),
                    ),
                ),
                (Match(destination_ports=(9080,)),),
            ),
        ),
    )
    assert got.key() == "bookinfo/allow-productpage"


# --- fuzzing (mirror of upstream fuzz/fuzz_targets/protobuf.rs) -------------------------------


def _only_rejections(decode: Callable[[str, bytes], object], raw: bytes) -> None:
    try:
        decode("fuzz", raw)
    except ResourceRejected as err:
        assert err.name == "fuzz"
        assert err.why


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_resource_rejected(raw: bytes) -> None:
    _only_rejections(convert.decode_address, raw)
    _only_rejections(convert.decode_authorization, raw)


_SEED_ADDRESS = wpb.Address(
    workload=workload_pb(
        addresses=[V4, V6],
        waypoint=gw_addr(V4),
        services={"ns/h": wpb.PortList(ports=[wpb.Port(service_port=1, target_port=2)])},
        application_tunnel=wpb.ApplicationTunnel(port=1),
        capacity=wrappers_pb2.UInt32Value(value=3),
    )
).SerializeToString()
_SEED_POLICY = policy_pb(
    apb.Match(
        namespaces=[apb.StringMatch(exact="a")],
        source_ips=[rbac_addr("10.0.0.0", 8)],
        destination_ports=[80],
    )
).SerializeToString()


@FUZZ
@given(st.data())
def test_mutated_valid_messages_only_ever_raise_resource_rejected(data: st.DataObject) -> None:
    for seed, decode in (
        (_SEED_ADDRESS, convert.decode_address),
        (_SEED_POLICY, convert.decode_authorization),
    ):
        raw = bytearray(seed)
        for _ in range(data.draw(st.integers(1, 4))):
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(raw)))
        _only_rejections(decode, bytes(raw[:cut]))


_raw_ip = st.one_of(
    st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16), st.binary(max_size=20)
)
_enum = st.integers(-3, 8)
_u32 = st.integers(0, 2**32 - 1)


@st.composite
def _gateway_pbs(draw: st.DrawFn) -> wpb.GatewayAddress:
    kind = draw(st.sampled_from(["address", "hostname", None]))
    pb = wpb.GatewayAddress(hbone_mtls_port=draw(_u32))
    if kind == "address":
        pb.address.CopyFrom(wpb.NetworkAddress(address=draw(_raw_ip)))
    elif kind == "hostname":
        pb.hostname.CopyFrom(wpb.NamespacedHostname(namespace="ns", hostname="h"))
    return pb


@st.composite
def _address_pbs(draw: st.DrawFn) -> wpb.Address:
    if draw(st.booleans()):
        wl = workload_pb(
            addresses=draw(st.lists(_raw_ip, max_size=3)),
            tunnel_protocol=draw(_enum),
            network_mode=draw(_enum),
            status=draw(_enum),
            workload_type=draw(_enum),
            services={draw(st.sampled_from(["ns/h", "bad", "a/b/c"])): wpb.PortList()},
        )
        if draw(st.booleans()):
            wl.waypoint.CopyFrom(draw(_gateway_pbs()))
        if draw(st.booleans()):
            wl.application_tunnel.CopyFrom(
                wpb.ApplicationTunnel(protocol=_APP_PROTOCOL(draw(_enum)), port=draw(_u32))
            )
        return wpb.Address(workload=wl)
    addresses = [
        wpb.NetworkAddress(address=draw(_raw_ip), length=draw(_u32))
        if draw(st.booleans())
        else wpb.NetworkAddress(address=draw(_raw_ip))
        for _ in range(draw(st.integers(0, 3)))
    ]
    svc = service_pb(addresses=addresses, ip_families=draw(_enum), visibility=draw(_enum))
    if draw(st.booleans()):
        svc.load_balancing.CopyFrom(
            lb_pb(*draw(st.lists(_enum, max_size=3)), mode=draw(_enum), health=draw(_enum))
        )
    if draw(st.booleans()):
        svc.weighted_waypoints.add().destination.CopyFrom(draw(_gateway_pbs()))
    return wpb.Address(service=svc)


@FUZZ
@given(_address_pbs())
def test_structured_random_addresses_convert_or_reject(pb: wpb.Address) -> None:
    _only_rejections(convert.decode_address, pb.SerializeToString())


@FUZZ
@given(
    st.lists(st.tuples(_raw_ip, _u32), max_size=4),
    _enum,
    _enum,
)
def test_structured_random_policies_convert_or_reject(
    ips: list[tuple[bytes, int]], scope: int, action: int
) -> None:
    match = apb.Match(source_ips=[apb.Address(address=a, length=n) for a, n in ips])
    pb = policy_pb(match, scope=scope, action=action)
    try:
        got = convert.authorization_from_proto(pb)
    except ResourceRejected:
        return
    for cidr in only_match(got).source_ips:
        if cidr == convert.INVALID_CIDR:
            continue
        assert str(ipaddress.ip_network(cidr)) == cidr  # canonical, host bits clear
