"""Routing: the outbound request plan, load balancing, and the inbound HBONE target.

The tables port upstream's `build_request_*` cases (`src/proxy/outbound.rs`), the
`test_find_inbound_upstream` / `test_build_inbound_request` cases (`src/proxy/inbound.rs`)
and `test_load_balance`, `find_upstream_port_mappings`, `test_sample_weighted_waypoint`
(`src/state.rs`), with upstream's ids.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

from ztunnel.core.model import (
    ApplicationTunnel,
    GatewayAddress,
    LoadBalancer,
    Locality,
    NamespacedHostname,
    NetworkAddress,
    Service,
    StateSnapshot,
    WeightedWaypoint,
    Workload,
)
from ztunnel.core.routing import (
    SELF_CALL,
    InboundPassthrough,
    InboundTarget,
    OutboundPlan,
    RouteError,
    find_inbound_upstream,
    format_addr,
    guess_inbound_service,
    load_balance,
    pick_resolved_ip,
    plan_inbound_passthrough,
    plan_outbound,
    validate_hbone_destination,
)
from ztunnel.core.routing_lb import sample_weighted_waypoint
from ztunnel.core.state import ProxyState

pytestmark = pytest.mark.timeout(60)

replace = msgspec.structs.replace
ILLEGAL = frozenset({15001, 15006, 15008})
TD = "cluster.local"


# --- builders --------------------------------------------------------------------------------


def wl(uid: str, *ips: str, **kw: Any) -> Workload:
    """A workload with upstream's xDS defaults: cluster.local, SA default, namespace ""."""
    fields: dict[str, Any] = {
        "name": uid.rsplit("/", 1)[-1],
        "namespace": "",
        "trust_domain": TD,
        "service_account": "default",
        "workload_ips": ips,
    }
    fields.update(kw)
    return Workload(uid=uid, **fields)


def svc(hostname: str, *vips: str, namespace: str = "", **kw: Any) -> Service:
    """A service; a VIP is `ip` (network "") or `network/ip`."""
    addrs = tuple(
        NetworkAddress(network=v.split("/")[0], address=v.split("/")[1])
        if "/" in v
        else NetworkAddress(address=v)
        for v in vips
    )
    return Service(name=hostname, namespace=namespace, hostname=hostname, vips=addrs, **kw)


def gw_ip(ip: str, port: int = 15008, network: str = "") -> GatewayAddress:
    return GatewayAddress(
        destination=NetworkAddress(network=network, address=ip), hbone_mtls_port=port
    )


def gw_host(hostname: str, port: int = 15008, namespace: str = "") -> GatewayAddress:
    return GatewayAddress(
        destination=NamespacedHostname(namespace=namespace, hostname=hostname),
        hbone_mtls_port=port,
    )


def state(*items: Workload | Service) -> ProxyState:
    return ProxyState.from_snapshot(
        StateSnapshot(
            workloads=tuple(i for i in items if isinstance(i, Workload)),
            services=tuple(i for i in items if isinstance(i, Service)),
        )
    )


def split_addr(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host.strip("[]"), int(port)


# The fixture of upstream's `run_build_request_multi`.
SOURCE = wl(
    "cluster1//v1/Pod/ns/source-workload", "127.0.0.1", "::1", namespace="ns", node="local-node"
)
WAYPOINT = wl(
    "cluster1//v1/Pod/ns/waypoint-workload",
    "127.0.0.10",
    namespace="ns",
    node="local-node",
    service_account="waypoint-sa",
)
WAYPOINT_DUAL = wl(
    "cluster1//v1/Pod/ns/waypoint-workload-dual",
    "127.0.0.11",
    "ff06::c5",
    namespace="ns",
    node="local-node",
    service_account="waypoint-sa",
)


def outbound(
    items: tuple[Workload | Service, ...],
    to: str,
    *,
    src: str = "127.0.0.1",
    source: Workload = SOURCE,
    rng: random.Random | None = None,
) -> OutboundPlan | RouteError:
    st = state(SOURCE, WAYPOINT, WAYPOINT_DUAL, *items)
    return plan_on(st, to, src=src, source=source, rng=rng)


def plan_on(
    st: ProxyState,
    to: str,
    *,
    src: str = "127.0.0.1",
    source: Workload = SOURCE,
    rng: random.Random | None = None,
) -> OutboundPlan | RouteError:
    ip, port = split_addr(to)
    return plan_outbound(
        st,
        source=source,
        src_ip=src,
        dst_ip=ip,
        dst_port=port,
        network="",
        illegal_ports=ILLEGAL,
        rng=rng or random.Random(1),
    )


def ok(result: OutboundPlan | RouteError) -> OutboundPlan:
    assert isinstance(result, OutboundPlan), result
    return result


def summary(result: OutboundPlan | RouteError) -> tuple[str, str, str] | None:
    """(kind, hbone authority, next hop) as upstream's ExpectedRequest, None for errors."""
    if isinstance(result, RouteError):
        return None
    return (result.kind, result.hbone_authority or "", format_addr(*result.next_hop))


# --- the xDS of upstream's build_request tests -----------------------------------------------

EXAMPLE = svc("example.com", "127.0.0.3", ports={80: 8080})
EXAMPLE_MEMBER = {"/example.com": {80: 8080}}
GW_10_22 = gw_ip("10.22.1.1", 15009, network="remote")
EW_GATEWAY = wl("Kubernetes//Pod/default/remote-ew-gtw", "10.22.1.1", network="remote")
REMOTE_POD_VIA_GW = wl(
    "Kubernetes//Pod/default/remote-example.com-pod",
    network="remote",
    network_gateway=GW_10_22,
    services=EXAMPLE_MEMBER,
)
LOCAL_POD = wl(
    "Kubernetes//Pod/default/local-example.com-pod",
    "127.0.0.2",
    protocol="HBONE",
    services=EXAMPLE_MEMBER,
)
FAILOVER_SVC = replace(
    EXAMPLE, load_balancer=LoadBalancer(routing_preferences=("Network",), mode="Failover")
)
TEST_TCP = wl("cluster1//v1/Pod/ns/test-tcp", "127.0.0.2", namespace="ns")
MY_POD_WP = wl("cluster1//v1/Pod/default/my-pod", "127.0.0.2", waypoint=gw_ip("127.0.0.10"))
DUAL_POD = wl("cluster1//v1/Pod/ns/test-tcp", "127.0.0.2", "ff06::c3", namespace="ns")
HOST_NET_SVC = svc("example.com", "127.0.0.3", ports={80: 80})
POD1 = wl(
    "cluster1//v1/Pod/default/pod1",
    "127.0.0.2",
    network_mode="HostNetwork",
    services={"/example.com": {80: 80}},
)
POD2 = wl("cluster1//v1/Pod/default/pod2", "127.0.0.2", network_mode="HostNetwork")
DUAL_HBONE = wl(
    "cluster1//v1/Pod/default/dual",
    "127.0.0.2",
    "ff06::c3",
    protocol="HBONE",
    services={"/example.com": {}},
)
PASSTHROUGH_SVC = svc(
    "example.com",
    "1.2.3.4",
    "1.5.6.7",
    ports={80: 80},
    load_balancer=LoadBalancer(mode="Passthrough"),
)


def families(f: str) -> Service:
    return svc("example.com", "127.0.0.3", "::3", ports={80: 80}, ip_families=f)


BUILD_REQUEST_CASES = [
    pytest.param(
        "127.0.0.1",
        "1.2.3.4:80",
        (wl("cluster1//v1/Pod/default/my-pod", "127.0.0.2"),),
        ("passthrough", "", "1.2.3.4:80"),
        id="build_request_unknown_dest",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (
            EXAMPLE,
            wl(
                "cluster1//v1/Pod/default/remote-pod",
                "10.0.0.2",
                network="remote",
                services=EXAMPLE_MEMBER,
            ),
        ),
        None,
        id="build_request_wrong_network",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (
            EXAMPLE,
            wl(
                "cluster1//v1/Pod/default/remote-pod",
                network="remote",
                network_gateway=GW_10_22,
                services=EXAMPLE_MEMBER,
            ),
            wl("cluster1//v1/Pod/default/ew-gtw", "10.22.1.1", network="remote"),
        ),
        ("double_hbone", "example.com:80", "10.22.1.1:15009"),
        id="build_request_double_hbone-gateway_by_ip",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (
            EXAMPLE,
            svc("ew-gtw", "127.0.0.4", ports={15009: 15009}),
            wl(
                "cluster1//v1/Pod/default/remote-pod",
                "127.0.0.6",
                network="remote",
                network_gateway=gw_host("ew-gtw", 15009),
                services=EXAMPLE_MEMBER,
            ),
            wl(
                "cluster1//v1/Pod/default/ew-gtw",
                "127.0.0.5",
                network="remote",
                services={"/ew-gtw": {15009: 15008}},
            ),
        ),
        ("double_hbone", "example.com:80", "127.0.0.5:15008"),
        id="build_request_double_hbone-gateway_by_hostname",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (
            replace(EXAMPLE, waypoint=gw_host("waypoint.com")),
            svc("waypoint.com", "127.0.0.4", ports={15008: 15008}),
            wl(
                "Kubernetes//Pod/default/remote-waypoint-pod",
                network="remote",
                network_gateway=GW_10_22,
                services={"/waypoint.com": {15008: 15008}},
            ),
            EW_GATEWAY,
        ),
        ("double_hbone", "example.com:80", "10.22.1.1:15009"),
        id="build_request_double_hbone-remote_waypoint",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (FAILOVER_SVC, EW_GATEWAY, REMOTE_POD_VIA_GW, LOCAL_POD),
        ("hbone", "127.0.0.2:8080", "127.0.0.2:15008"),
        id="build_request_failover_to_remote-healthy_local",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (FAILOVER_SVC, EW_GATEWAY, REMOTE_POD_VIA_GW, replace(LOCAL_POD, status="Unhealthy")),
        ("double_hbone", "example.com:80", "10.22.1.1:15009"),
        id="build_request_failover_to_remote-unhealthy_local",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (replace(TEST_TCP, node="remote-node"),),
        ("tcp", "", "127.0.0.2:80"),
        id="build_request_known_dest_remote_node_tcp",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (replace(TEST_TCP, node="remote-node", protocol="HBONE"),),
        ("hbone", "127.0.0.2:80", "127.0.0.2:15008"),
        id="build_request_known_dest_remote_node_hbone",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (replace(TEST_TCP, node="local-node"),),
        ("tcp", "", "127.0.0.2:80"),
        id="build_request_known_dest_local_node_tcp",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (replace(TEST_TCP, node="local-node", protocol="HBONE"),),
        ("hbone", "127.0.0.2:80", "127.0.0.2:15008"),
        id="build_request_known_dest_local_node_hbone",
    ),
    pytest.param(
        "127.0.0.2",
        "127.0.0.1:80",
        (MY_POD_WP,),
        ("tcp", "", "127.0.0.1:80"),
        id="build_request_source_waypoint",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (MY_POD_WP,),
        ("hbone", "127.0.0.2:80", "127.0.0.10:15008"),
        id="build_request_destination_waypoint",
    ),
    pytest.param(
        "127.0.0.1",
        "[ff06::c3]:80",
        (
            wl(
                "cluster1//v1/Pod/default/my-pod",
                "127.0.0.2",
                "ff06::c3",
                waypoint=gw_ip("127.0.0.11"),
            ),
        ),
        ("hbone", "[ff06::c3]:80", "127.0.0.11:15008"),
        id="build_request_destination_waypoint_mismatch_ip",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (svc("", "127.0.0.3", ports={80: 8080}, waypoint=gw_ip("127.0.0.10")),),
        ("hbone", "127.0.0.3:80", "127.0.0.10:15008"),
        id="build_request_destination_svc_waypoint",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (svc("", "127.0.0.3", ports={80: 8080}),),
        None,
        id="build_request_empty_service",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (
            svc("example.com", "127.0.0.3", ports={80: 0, 8080: 0}),
            wl(
                "cluster1//v1/Pod/default/matching-pod",
                "127.0.0.2",
                services={"/example.com": {80: 1234}},
            ),
            # This pod does not map port 80 at all.
            wl(
                "cluster1//v1/Pod/default/unmatching-pod",
                "127.0.0.4",
                services={"/example.com": {8080: 9999}},
            ),
        ),
        ("tcp", "", "127.0.0.2:1234"),
        id="build_request_target_port",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (HOST_NET_SVC, POD1, POD2),
        ("tcp", "", "127.0.0.2:80"),
        id="build_request_host_network-to_service",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (HOST_NET_SVC, POD1, POD2),
        ("passthrough", "", "127.0.0.2:80"),
        id="build_request_host_network-to_node_ip",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.2:80",
        (replace(DUAL_POD, node="remote-node"),),
        ("tcp", "", "127.0.0.2:80"),
        id="multiple_address_workload-v4",
    ),
    pytest.param(
        "127.0.0.1",
        "[ff06::c3]:80",
        (replace(DUAL_POD, node="remote-node"),),
        ("tcp", "", "[ff06::c3]:80"),
        id="multiple_address_workload-v6",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (families("IPv6"), DUAL_HBONE),
        ("hbone", "[ff06::c3]:80", "[ff06::c3]:15008"),
        id="service_ip_families-v6_only",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (families("IPv4"), DUAL_HBONE),
        ("hbone", "127.0.0.2:80", "127.0.0.2:15008"),
        id="service_ip_families-v4_only",
    ),
    pytest.param(
        "127.0.0.1",
        "127.0.0.3:80",
        (families("Dual"), DUAL_HBONE),
        ("hbone", "127.0.0.2:80", "127.0.0.2:15008"),
        id="service_ip_families-dual_from_v4",
    ),
    pytest.param(
        "::1",
        "[::3]:80",
        (families("Dual"), DUAL_HBONE),
        ("hbone", "[ff06::c3]:80", "[ff06::c3]:15008"),
        id="service_ip_families-dual_from_v6",
    ),
    pytest.param(
        "127.0.0.1",
        "1.2.3.4:80",
        (PASSTHROUGH_SVC,),
        ("passthrough", "", "1.2.3.4:80"),
        id="build_request_passthrough_svc",
    ),
    pytest.param(
        "127.0.0.1",
        "1.2.3.4:80",
        (replace(PASSTHROUGH_SVC, waypoint=gw_ip("127.0.0.10")),),
        ("hbone", "1.2.3.4:80", "127.0.0.10:15008"),
        id="build_request_passthrough_svc_with_waypoint",
    ),
]


@pytest.mark.parametrize(("src", "to", "items", "want"), BUILD_REQUEST_CASES)
def test_build_request(
    src: str,
    to: str,
    items: tuple[Workload | Service, ...],
    want: tuple[str, str, str] | None,
) -> None:
    assert summary(outbound(items, to, src=src)) == want


def test_host_network_service_traffic_goes_to_the_member_pod_not_its_ip_twin() -> None:
    to_svc = ok(outbound((HOST_NET_SVC, POD1, POD2), "127.0.0.3:80"))
    assert to_svc.destination_workload is not None
    assert to_svc.destination_workload.name == "pod1"
    to_node = ok(outbound((HOST_NET_SVC, POD1, POD2), "127.0.0.2:80"))
    assert to_node.destination_workload is None


# --- outbound: the plan's fields ------------------------------------------------------------

SELF = wl("c//v1/Pod/default/self", "10.0.0.1", namespace="default", service_account="self")
SVC_SAN = "spiffe://cluster.local/ns/default/sa/svc-sa"
WEB = svc(
    "web.default.svc.cluster.local",
    "10.96.0.1",
    namespace="default",
    ports={80: 8080},
    subject_alt_names=(SVC_SAN, "not-a-spiffe-id"),
)
WEB_KEY = WEB.key()


def member(uid: str, *ips: str, ports: dict[int, int] | None = None, **kw: Any) -> Workload:
    fields: dict[str, Any] = {"namespace": "default", "protocol": "HBONE"}
    fields.update(kw)
    return wl(uid, *ips, services={WEB_KEY: ports if ports is not None else {}}, **fields)


WEB_POD = member("c//v1/Pod/default/web", "10.0.1.1", service_account="web")


def test_vip_to_hbone_endpoint_maps_the_port_and_expects_both_identities() -> None:
    plan = ok(plan_on(state(SELF, WEB, WEB_POD), "10.96.0.1:80", src="10.0.0.1", source=SELF))
    assert plan.kind == "hbone"
    assert plan.next_hop == ("10.0.1.1", 15008)
    assert plan.hbone_authority == "10.0.1.1:8080"
    # The invalid SAN is dropped, as upstream does with a warning.
    assert plan.expected_identities == (SVC_SAN, "spiffe://cluster.local/ns/default/sa/web")
    assert plan.destination_workload == WEB_POD
    assert plan.destination_service == WEB
    assert plan.forwarded_host == "web.default.svc.cluster.local"
    assert not plan.via_waypoint and plan.gateway is None and plan.resolve_hostname is None


def test_vip_to_tcp_endpoint_dials_the_target_port() -> None:
    pod = replace(WEB_POD, protocol="TCP")
    plan = ok(plan_on(state(SELF, WEB, pod), "10.96.0.1:80", source=SELF))
    assert (plan.kind, plan.next_hop, plan.hbone_authority) == ("tcp", ("10.0.1.1", 8080), None)
    assert plan.expected_identities == ()
    assert plan.destination_service == WEB


def test_endpoint_port_map_wins_over_the_service_target_port() -> None:
    pod = replace(WEB_POD, services={WEB_KEY: {80: 9090}})
    plan = ok(plan_on(state(SELF, WEB, pod), "10.96.0.1:80", source=SELF))
    assert plan.hbone_authority == "10.0.1.1:9090"


def test_workload_addressed_traffic_has_no_service() -> None:
    plan = ok(plan_on(state(SELF, WEB, WEB_POD), "10.0.1.1:8080", source=SELF))
    assert (plan.kind, plan.hbone_authority) == ("hbone", "10.0.1.1:8080")
    assert plan.destination_service is None and plan.forwarded_host is None
    assert plan.expected_identities == ("spiffe://cluster.local/ns/default/sa/web",)


@pytest.mark.parametrize(
    ("to", "want"),
    [
        pytest.param("127.0.0.1:15001", SELF_CALL, id="v4_loopback_outbound_port"),
        pytest.param("127.0.0.5:15006", SELF_CALL, id="v4_loopback_range"),
        pytest.param("[::1]:15008", SELF_CALL, id="v6_loopback"),
        pytest.param("[::ffff:127.0.0.1]:15008", SELF_CALL, id="v4_mapped_loopback"),
        pytest.param("127.0.0.1:8080", None, id="loopback_legal_port"),
        pytest.param("10.9.9.9:15008", None, id="illegal_port_not_loopback"),
    ],
)
def test_loopback_illegal_port_is_a_self_call(to: str, want: str | None) -> None:
    result = plan_on(state(SELF), to, source=SELF)
    if want is None:
        assert ok(result).kind == "passthrough"
    else:
        assert result == RouteError(want)


def test_service_without_healthy_endpoints_has_no_healthy_upstream() -> None:
    sick = replace(WEB_POD, status="Unhealthy")
    assert plan_on(state(SELF, WEB, sick), "10.96.0.1:80", source=SELF) == RouteError(
        "no healthy upstream: 10.96.0.1:80"
    )
    v6 = replace(WEB, vips=(NetworkAddress(address="fd00::1"),))
    assert plan_on(state(SELF, v6), "[fd00::1]:80", source=SELF) == RouteError(
        "no healthy upstream: [fd00::1]:80"
    )


def test_allow_all_health_policy_routes_to_unhealthy_endpoints() -> None:
    sick = replace(WEB_POD, status="Unhealthy")
    lenient = replace(WEB, load_balancer=LoadBalancer(health_policy="AllowAll"))
    plan = ok(plan_on(state(SELF, lenient, sick), "10.96.0.1:80", source=SELF))
    assert plan.destination_workload == sick


def test_unknown_service_port_has_no_healthy_upstream() -> None:
    result = plan_on(state(SELF, WEB, WEB_POD), "10.96.0.1:443", source=SELF)
    assert result == RouteError("no healthy upstream: 10.96.0.1:443")


def test_lb_passthrough_service_goes_to_the_original_destination() -> None:
    passthrough = replace(WEB, load_balancer=LoadBalancer(mode="Passthrough"))
    plan = ok(plan_on(state(SELF, passthrough, WEB_POD), "10.96.0.1:80", source=SELF))
    assert (plan.kind, plan.next_hop) == ("passthrough", ("10.96.0.1", 80))
    assert plan.destination_workload is None and plan.destination_service is None


def test_service_in_the_client_namespace_wins_a_shared_vip() -> None:
    other = replace(WEB, namespace="other", ports={80: 7070})
    other_pod = wl(
        "c//v1/Pod/other/web",
        "10.0.2.1",
        namespace="other",
        protocol="HBONE",
        services={other.key(): {}},
    )
    st = state(SELF, other, other_pod, WEB, WEB_POD)
    assert ok(plan_on(st, "10.96.0.1:80", source=SELF)).hbone_authority == "10.0.1.1:8080"
    elsewhere = replace(SELF, namespace="other")
    assert ok(plan_on(st, "10.96.0.1:80", source=elsewhere)).hbone_authority == "10.0.2.1:7070"


# --- outbound: waypoints --------------------------------------------------------------------

WP_SA = "spiffe://cluster.local/ns/default/sa/waypoint"
WP_POD = wl(
    "c//v1/Pod/default/waypoint",
    "10.0.9.1",
    "fd00::9:1",
    namespace="default",
    service_account="waypoint",
    protocol="HBONE",
    services={"default/waypoint.default.svc.cluster.local": {15008: 15008}},
)
WP_SVC = svc(
    "waypoint.default.svc.cluster.local",
    "10.96.9.1",
    namespace="default",
    ports={15008: 15008},
    subject_alt_names=("spiffe://cluster.local/ns/default/sa/waypoint-svc",),
)


@pytest.mark.parametrize(
    ("waypoint", "hop"),
    [
        pytest.param(gw_ip("10.0.9.1"), ("10.0.9.1", 15008), id="by_pod_ip"),
        pytest.param(gw_ip("10.96.9.1"), ("10.0.9.1", 15008), id="by_service_vip"),
        pytest.param(
            gw_host("waypoint.default.svc.cluster.local", namespace="default"),
            ("10.0.9.1", 15008),
            id="by_hostname",
        ),
    ],
)
def test_service_waypoint(waypoint: GatewayAddress, hop: tuple[str, int]) -> None:
    web = replace(WEB, waypoint=waypoint)
    plan = ok(plan_on(state(SELF, web, WEB_POD, WP_POD, WP_SVC), "10.96.0.1:80", source=SELF))
    assert (plan.kind, plan.next_hop, plan.hbone_authority) == ("hbone", hop, "10.96.0.1:80")
    assert plan.via_waypoint
    assert plan.destination_workload == WP_POD
    assert plan.destination_service == web
    assert plan.forwarded_host == web.hostname
    assert plan.expected_identities[-1] == WP_SA


def test_service_waypoint_by_hostname_follows_the_callers_ip_family() -> None:
    web = replace(
        WEB,
        vips=(*WEB.vips, NetworkAddress(address="fd00::96:1")),
        waypoint=gw_host("waypoint.default.svc.cluster.local", namespace="default"),
    )
    st = state(SELF, web, WEB_POD, WP_POD, WP_SVC)
    plan = ok(plan_on(st, "[fd00::96:1]:80", src="fd00::1", source=SELF))
    assert plan.next_hop == ("fd00::9:1", 15008)
    assert plan.hbone_authority == "[fd00::96:1]:80"
    # The waypoint service's SANs plus the waypoint workload's identity.
    assert plan.expected_identities == ("spiffe://cluster.local/ns/default/sa/waypoint-svc", WP_SA)


def test_service_waypoint_by_hostname_resolves_a_workload_hostname() -> None:
    wp = replace(WP_POD, hostname="wp.example", services={})
    web = replace(WEB, waypoint=gw_host("wp.example", namespace="default"))
    plan = ok(plan_on(state(SELF, web, WEB_POD, wp), "10.96.0.1:80", source=SELF))
    assert plan.next_hop == ("10.0.9.1", 15008)
    assert plan.expected_identities == (WP_SA,)


@pytest.mark.parametrize(
    ("waypoint", "reason"),
    [
        pytest.param(
            gw_host("missing.example", namespace="default"),
            "unknown waypoint: waypoint missing.example not found",
            id="unknown_hostname",
        ),
        pytest.param(
            gw_ip("10.0.0.99"),
            "unknown waypoint: waypoint /10.0.0.99:15008 not found",
            id="unknown_ip",
        ),
    ],
)
def test_unknown_waypoint_is_an_error(waypoint: GatewayAddress, reason: str) -> None:
    web = replace(WEB, waypoint=waypoint)
    assert plan_on(state(SELF, web, WEB_POD), "10.96.0.1:80", source=SELF) == RouteError(reason)


def test_workload_waypoint_applies_to_workload_addressed_traffic_only() -> None:
    pod = replace(WEB_POD, waypoint=gw_ip("10.0.9.1"))
    st = state(SELF, WEB, pod, WP_POD)
    direct = ok(plan_on(st, "10.0.1.1:8080", source=SELF))
    assert (direct.next_hop, direct.hbone_authority) == (("10.0.9.1", 15008), "10.0.1.1:8080")
    assert direct.via_waypoint and direct.expected_identities == (WP_SA,)
    # Through the service (which has no waypoint) the workload's waypoint is not used.
    via_svc = ok(plan_on(st, "10.96.0.1:80", source=SELF))
    assert (via_svc.next_hop, via_svc.via_waypoint) == (("10.0.1.1", 15008), False)


def test_source_that_is_the_waypoint_goes_direct() -> None:
    pod = replace(WEB_POD, waypoint=gw_ip("10.0.9.1"))
    st = state(pod, WP_POD)
    from_wp = ok(plan_on(st, "10.0.1.1:8080", src="10.0.9.1", source=WP_POD))
    assert (from_wp.next_hop, from_wp.via_waypoint) == (("10.0.1.1", 15008), False)
    # Same identity from another IP is not the waypoint (`check_from_waypoint`).
    spoofed = ok(plan_on(st, "10.0.1.1:8080", src="10.0.0.50", source=WP_POD))
    assert spoofed.via_waypoint


def test_source_waypoint_check_through_a_waypoint_service() -> None:
    pod = replace(
        WEB_POD, waypoint=gw_host("waypoint.default.svc.cluster.local", namespace="default")
    )
    st = state(pod, WP_POD, WP_SVC)
    plan = ok(plan_on(st, "10.0.1.1:8080", src="10.0.9.1", source=WP_POD))
    assert not plan.via_waypoint


def test_weighted_waypoints_split_by_weight() -> None:
    canary = replace(
        WP_POD, uid="c//v1/Pod/default/canary", workload_ips=("10.0.9.2",), services={}
    )
    web = replace(
        WEB,
        waypoint=gw_ip("10.0.9.1"),
        weighted_waypoints=(
            WeightedWaypoint(destination=gw_ip("10.0.9.1"), weight=75),
            WeightedWaypoint(destination=gw_ip("10.0.9.2"), weight=25),
        ),
    )
    st = state(SELF, web, WEB_POD, WP_POD, canary)
    rng = random.Random(7)
    hops = Counter(
        ok(plan_on(st, "10.96.0.1:80", source=SELF, rng=rng)).next_hop[0] for _ in range(1000)
    )
    assert set(hops) == {"10.0.9.1", "10.0.9.2"}
    assert 0.70 < hops["10.0.9.1"] / 1000 < 0.80


def test_all_zero_weighted_waypoints_fall_back_to_the_waypoint_field() -> None:
    web = replace(
        WEB,
        waypoint=gw_ip("10.0.9.1"),
        weighted_waypoints=(WeightedWaypoint(destination=gw_ip("10.0.9.2"), weight=0),),
    )
    plan = ok(plan_on(state(SELF, web, WEB_POD, WP_POD), "10.96.0.1:80", source=SELF))
    assert plan.next_hop == ("10.0.9.1", 15008)


def test_sample_weighted_waypoint() -> None:
    """Upstream `test_sample_weighted_waypoint`."""
    a, b = gw_ip("10.0.0.1"), gw_ip("10.0.0.2")

    def ws(*weights: tuple[GatewayAddress, int]) -> Service:
        return replace(
            WEB,
            weighted_waypoints=tuple(WeightedWaypoint(destination=g, weight=w) for g, w in weights),
        )

    rng = random.Random(0)
    assert sample_weighted_waypoint(WEB, rng) is None
    assert all(sample_weighted_waypoint(ws((a, 100), (b, 0)), rng) == a for _ in range(50))
    assert all(sample_weighted_waypoint(ws((a, 0), (b, 100)), rng) == b for _ in range(50))
    assert sample_weighted_waypoint(ws((a, 0), (b, 0)), rng) is None
    split = ws((a, 75), (b, 25))
    picks = Counter(sample_weighted_waypoint(split, rng) for _ in range(10_000))
    assert set(picks) == {a, b}
    assert 0.70 < picks[a] / 10_000 < 0.80


# --- outbound: network gateways and double HBONE --------------------------------------------

GW_POD = wl(
    "c//v1/Pod/istio-system/eastwest",
    "10.22.1.1",
    namespace="istio-system",
    service_account="eastwest",
    network="remote",
)


def remote_member(**kw: Any) -> Workload:
    fields: dict[str, Any] = {
        "namespace": "default",
        "network": "remote",
        "network_gateway": gw_ip("10.22.1.1", 15009, network="remote"),
        "services": {WEB_KEY: {80: 8080}},
    }
    fields.update(kw)
    return wl("c//v1/Pod/default/remote-web", **fields)


def test_double_hbone_via_network_gateway() -> None:
    plan = ok(plan_on(state(SELF, WEB, remote_member(), GW_POD), "10.96.0.1:80", source=SELF))
    assert plan.kind == "double_hbone"
    assert plan.next_hop == ("10.22.1.1", 15009)
    assert plan.hbone_authority == "web.default.svc.cluster.local:80"
    # The inner tunnel is verified against the target service's SANs only.
    assert plan.expected_identities == (SVC_SAN,)
    assert plan.destination_workload == GW_POD
    assert plan.destination_service == WEB
    assert plan.forwarded_host == WEB.hostname
    assert plan.gateway is not None
    assert plan.gateway.next_hop == ("10.22.1.1", 15009)
    assert plan.gateway.hbone_authority == plan.hbone_authority
    assert plan.gateway.expected_identities == (
        "spiffe://cluster.local/ns/istio-system/sa/eastwest",
    )
    assert plan.gateway.workload == GW_POD


def test_remote_workload_without_gateway_has_no_valid_destination() -> None:
    remote = remote_member(network_gateway=None, workload_ips=("10.1.0.1",))
    result = plan_on(state(SELF, WEB, remote), "10.96.0.1:80", source=SELF)
    assert result == RouteError(
        "no valid routing destination for workload: c//v1/Pod/default/remote-web"
    )


def test_unknown_network_gateway_is_an_error() -> None:
    remote = remote_member(network_gateway=gw_host("nowhere", 15009, namespace="default"))
    result = plan_on(state(SELF, WEB, remote), "10.96.0.1:80", source=SELF)
    assert result == RouteError("unknown network gateway: network gateway nowhere not found")


def test_addressless_workload_on_our_network_is_never_used() -> None:
    # WDS is client-agnostic: a gateway on our own network must not be used.
    local = remote_member(network="")
    result = plan_on(state(SELF, WEB, local, GW_POD), "10.96.0.1:80", source=SELF)
    assert result == RouteError("no healthy upstream: 10.96.0.1:80")


# --- outbound: hostname-only workloads ------------------------------------------------------


def test_hostname_only_workload_asks_the_caller_to_resolve() -> None:
    pod = replace(WEB_POD, workload_ips=(), hostname="web.vm.example")
    plan = ok(plan_on(state(SELF, WEB, pod), "10.96.0.1:80", source=SELF))
    assert plan.resolve_hostname == "web.vm.example"
    assert plan.kind == "hbone"
    assert plan.next_hop == ("", 15008)
    assert plan.hbone_authority is None
    resolved = plan.with_resolved_ip("fd00::77")
    assert resolved.next_hop == ("fd00::77", 15008)
    assert resolved.hbone_authority == "[fd00::77]:8080"
    assert resolved.resolve_hostname is None


def test_hostname_only_tcp_workload() -> None:
    pod = replace(WEB_POD, workload_ips=(), hostname="web.vm.example", protocol="TCP")
    plan = ok(plan_on(state(SELF, WEB, pod), "10.96.0.1:80", source=SELF))
    assert (plan.kind, plan.next_hop, plan.resolve_hostname) == (
        "tcp",
        ("", 8080),
        "web.vm.example",
    )
    assert plan.with_resolved_ip("10.5.5.5").next_hop == ("10.5.5.5", 8080)


def test_hostname_only_waypoint_keeps_the_original_authority() -> None:
    wp = replace(WP_POD, workload_ips=(), hostname="wp.example", services={})
    web = replace(WEB, waypoint=gw_host("wp.example", namespace="default"))
    plan = ok(plan_on(state(SELF, web, WEB_POD, wp), "10.96.0.1:80", source=SELF))
    assert (plan.next_hop, plan.resolve_hostname) == (("", 15008), "wp.example")
    resolved = plan.with_resolved_ip("10.0.9.9")
    assert (resolved.next_hop, resolved.hbone_authority) == (("10.0.9.9", 15008), "10.96.0.1:80")


def test_service_family_restriction_falls_back_to_dns() -> None:
    pod = replace(WEB_POD, workload_ips=("10.0.1.1",), hostname="web.vm.example")
    v6_only = replace(WEB, ip_families="IPv6")
    plan = ok(plan_on(state(SELF, v6_only, pod), "10.96.0.1:80", source=SELF))
    assert plan.resolve_hostname == "web.vm.example"


def test_pick_resolved_ip_prefers_the_original_family() -> None:
    rng = random.Random(3)
    answers = ["10.0.0.1", "fd00::1", "10.0.0.2"]
    assert {pick_resolved_ip(answers, "10.96.0.1", rng) for _ in range(50)} == {
        "10.0.0.1",
        "10.0.0.2",
    }
    assert pick_resolved_ip(answers, "fd00::96", rng) == "fd00::1"
    assert pick_resolved_ip(["10.0.0.1"], "fd00::96", rng) == "10.0.0.1"
    assert pick_resolved_ip([], "10.96.0.1", rng) is None


# --- load balancing -------------------------------------------------------------------------


def locality_pod(name: str, region: str, zone: str, **kw: Any) -> Workload:
    return member(
        f"c//v1/Pod/default/{name}",
        f"10.0.3.{len(name)}",
        ports={80: 80},
        locality=Locality(region=region, zone=zone),
        **kw,
    )


def lb_service(mode: str, *prefs: str) -> Service:
    return replace(
        WEB,
        ports={80: 80},
        load_balancer=LoadBalancer(routing_preferences=prefs, mode=mode),  # type: ignore[arg-type]
    )


def picks(st: ProxyState, service: Service, source: Workload, tries: int = 200) -> set[str]:
    rng = random.Random(11)
    out = set()
    for _ in range(tries):
        got = load_balance(st, service, source=source, svc_port=80, rng=rng)
        out.add("" if got is None else got[0].name)
    return out


def test_strict_excludes_endpoints_outside_the_source_locality() -> None:
    here = locality_pod("here", "r1", "z1")
    there = locality_pod("there", "r1", "z2")
    strict = lb_service("Strict", "Region", "Zone")
    src = replace(SELF, locality=Locality(region="r1", zone="z1"))
    assert picks(state(here, there, strict), strict, src) == {"here"}
    nowhere = replace(SELF, locality=Locality(region="r9", zone="z9"))
    assert picks(state(here, there, strict), strict, nowhere) == {""}


def test_failover_prefers_the_same_zone_then_falls_back() -> None:
    here = locality_pod("here", "r1", "z1")
    there = locality_pod("there", "r1", "z2")
    far = locality_pod("far-away", "r2", "z3")
    failover = lb_service("Failover", "Region", "Zone")
    src = replace(SELF, locality=Locality(region="r1", zone="z1"))
    assert picks(state(here, there, far, failover), failover, src) == {"here"}
    assert picks(state(there, far, failover), failover, src) == {"there"}
    assert picks(state(far, failover), failover, src) == {"far-away"}


def test_weighted_by_capacity() -> None:
    big = member("c//v1/Pod/default/big", "10.0.4.1", capacity=3)
    small = member("c//v1/Pod/default/small", "10.0.4.2", capacity=1)
    idle = member("c//v1/Pod/default/idle", "10.0.4.3", capacity=0)
    st = state(big, small, idle, WEB)
    rng = random.Random(2024)
    counts: Counter[str] = Counter()
    for _ in range(1000):
        got = load_balance(st, WEB, source=SELF, svc_port=80, rng=rng)
        assert got is not None
        counts[got[0].name] += 1
    assert counts["idle"] == 0
    assert 0.70 < counts["big"] / 1000 < 0.80


def test_load_balance_returns_the_target_port() -> None:
    st = state(WEB_POD, WEB)
    assert load_balance(st, WEB, source=SELF, svc_port=80, rng=random.Random(0)) == (WEB_POD, 8080)
    assert load_balance(st, WEB, source=SELF, svc_port=81, rng=random.Random(0)) is None


@pytest.mark.parametrize(
    ("svc_ports", "ep_ports", "tunnel", "mode", "want"),
    [
        pytest.param({80: 0}, {80: 9090}, None, "standard", 9090, id="ep_mapping"),
        pytest.param({80: 8080}, {}, None, "standard", 8080, id="svc_mapping"),
        pytest.param(
            {80: 0},
            {},
            ApplicationTunnel(protocol="PROXY", port=15088),
            "waypoint",
            80,
            id="app_tunnel",
        ),
        pytest.param(
            {}, {}, ApplicationTunnel(protocol="PROXY"), "waypoint", None, id="tunnel_without_port"
        ),
        pytest.param({}, {}, None, "waypoint", None, id="waypoint_port_missing"),
        pytest.param({80: 0}, {}, None, "standard", None, id="named_port_unmapped"),
    ],
)
def test_find_upstream_port_mappings(
    svc_ports: dict[int, int],
    ep_ports: dict[int, int],
    tunnel: ApplicationTunnel | None,
    mode: str,
    want: int | None,
) -> None:
    """Upstream `find_upstream_port_mappings`, plus the cases that find nothing."""
    pod = member("c//v1/Pod/default/ep", "192.168.0.1", ports=ep_ports, application_tunnel=tunnel)
    service = replace(WEB, ports=svc_ports)
    got = load_balance(
        state(pod, service),
        service,
        source=SELF,
        svc_port=80,
        rng=random.Random(0),
        mode=mode,  # type: ignore[arg-type]
    )
    assert (got[1] if got else None) == want


# Upstream `test_load_balance`: the same endpoints under Strict and Failover
# [Network, Region, Zone].
def _lb_wl(name: str, ip: str | None, network: str, region: str = "", zone: str = "") -> Workload:
    ips = (ip,) if ip else ()
    return wl(
        f"cluster1//v1/Pod/default/{name}",
        *ips,
        namespace="default",
        network=network,
        locality=Locality(region=region, zone=zone),
        services={"default/lb.example": {80: 80}},
    )


LB_WORKLOADS = (
    _lb_wl("wl_no_locality", "192.168.0.1", "network"),
    _lb_wl("wl_match", "192.168.0.2", "network", "reg", "zone"),
    _lb_wl("wl_almost", "192.168.0.3", "network", "reg", "not-zone"),
    _lb_wl("wl_other", "192.168.0.5", "other", "reg", "zone"),
    _lb_wl("wl_empty_ip", None, "network", "reg", "zone"),
)
NRZ = ("Network", "Region", "Zone")


def _lb_svc(mode: str) -> Service:
    return svc(
        "lb.example",
        "10.99.0.1",
        namespace="default",
        ports={80: 80},
        load_balancer=LoadBalancer(routing_preferences=NRZ, mode=mode),  # type: ignore[arg-type]
    )


def _src(network: str = "", region: str = "", zone: str = "") -> Workload:
    return wl("", "127.0.0.1", network=network, locality=Locality(region=region, zone=zone))


@pytest.mark.parametrize(
    ("mode", "source", "want"),
    [
        pytest.param("Strict", _src(), set(), id="strict no match should not select"),
        pytest.param(
            "Strict",
            LB_WORKLOADS[1],
            {"wl_match"},
            id="strict match",
        ),
        pytest.param(
            "Failover",
            _src("no-match", "no-match", "no-match"),
            {"wl_match", "wl_almost", "wl_no_locality", "wl_other"},
            id="failover no match can select any endpoint",
        ),
        pytest.param(
            "Failover",
            _src("network", "reg", "zone"),
            {"wl_match"},
            id="failover matches network+region+zone",
        ),
        pytest.param(
            "Failover",
            _src("network", "reg"),
            {"wl_match", "wl_almost"},
            id="failover matches network+region",
        ),
        pytest.param(
            "Failover",
            _src("network", "no-match", "no-match"),
            {"wl_match", "wl_almost", "wl_no_locality"},
            id="failover matches network",
        ),
        pytest.param(
            "Failover",
            _src("no-match", "reg", "zone"),
            {"wl_match", "wl_other"},
            id="failover matches region+zone",
        ),
    ],
)
def test_load_balance(mode: str, source: Workload, want: set[str]) -> None:
    service = _lb_svc(mode)
    st = state(*LB_WORKLOADS, service)
    got = picks(st, service, source, tries=max(10, 10 * len(want)) * 5) - {""}
    assert got == want


def test_failover_never_selects_a_workload_without_an_address() -> None:
    service = _lb_svc("Failover")
    st = state(*LB_WORKLOADS, service)
    assert "wl_empty_ip" not in picks(st, service, _src(), tries=50)


def test_load_balance_over_10k_endpoints_timing() -> None:
    pods = [
        member(f"c//v1/Pod/default/p{i}", f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        for i in range(10_000)
    ]
    st = state(*pods, WEB)
    rng = random.Random(5)
    runs = 20
    start = time.perf_counter()
    for _ in range(runs):
        assert load_balance(st, WEB, source=SELF, svc_port=80, rng=rng) is not None
    per_call = (time.perf_counter() - start) / runs
    print(f"load_balance over 10k endpoints: {per_call * 1e3:.2f} ms/call")


# --- inbound (upstream `test_find_inbound_upstream` / `test_build_inbound_request`) ----------

CLIENT_POD_IP = "10.0.0.1"
SERVER_POD_IP = "10.0.0.2"
SERVER_SVC_IP = "10.10.0.1"
SERVER_POD_HOSTNAME = "server.default.svc.cluster.local"
WAYPOINT_POD_IP = "10.0.0.3"
WAYPOINT_SVC_IP = "10.10.0.2"
SERVER_PORT = 80
TARGET_PORT = 8080
PROXY_PORT = 15088
APP_TUNNEL_PROXY = ApplicationTunnel(protocol="PROXY", port=PROXY_PORT)

# (attachment "none" | "service" | "workload", waypoint address, app tunnel of the waypoint)
Attach = tuple[str, str | None, ApplicationTunnel | None]
NO_WAYPOINT: Attach = ("none", None, None)


def inbound_state(attach: Attach) -> ProxyState:
    """Upstream's inbound `test_state`: server and waypoint services and pods, plus a client."""
    kind, address, tunnel = attach
    wp = gw_ip(address) if address else None
    services = [
        svc(
            f"{name}.default.svc.cluster.local",
            vip,
            namespace="default",
            ports={80: 8080},
            subject_alt_names=(f"{name}.default.svc.cluster.local",),
            waypoint=wp if name == "server" and kind == "service" else None,
            canonical=True,
        )
        for name, vip in (("waypoint", WAYPOINT_SVC_IP), ("server", SERVER_SVC_IP))
    ]
    pods = [
        wl(
            f"cluster1//v1/Pod/default/{name}",
            ip,
            name=f"workload-{name}",
            namespace="default",
            service_account=f"service-account-{name}",
            protocol="HBONE",
            waypoint=wp if name == "server" and kind == "workload" else None,
            application_tunnel=tunnel if name == "waypoint" else None,
            services={f"default/{name}.default.svc.cluster.local": {}} if name != "client" else {},
        )
        for name, ip in (
            ("waypoint", WAYPOINT_POD_IP),
            ("client", CLIENT_POD_IP),
            ("server", SERVER_POD_IP),
        )
    ]
    return state(*services, *pods)


# Short names so each row of upstream's table reads on two lines.
POD, SVC, WPOD, WSVC, CLIENT = (
    SERVER_POD_IP,
    SERVER_SVC_IP,
    WAYPOINT_POD_IP,
    WAYPOINT_SVC_IP,
    CLIENT_POD_IP,
)


def _in(
    id_: str, attach: Attach, conn: str, hbone: str, port: int, want: object
) -> Any:  # pytest's ParameterSet is not public
    return pytest.param(attach, conn, hbone, port, want, id=id_)


INBOUND_CASES = [
    # Regular workload traffic, by IP and by service hostname.
    _in("to workload no waypoint",
        NO_WAYPOINT, POD, POD, TARGET_PORT, (POD, TARGET_PORT, None)),
    _in("svc hostname to workload no waypoint",
        NO_WAYPOINT, POD, SERVER_POD_HOSTNAME, SERVER_PORT, (POD, TARGET_PORT, None)),
    # Sandwiched waypoint, to-workload traffic.
    _in("to workload with waypoint referenced by pod",
        ("workload", WPOD, None), WPOD, POD, TARGET_PORT, (WPOD, TARGET_PORT, None)),
    _in("to workload with waypoint referenced by vip",
        ("workload", WSVC, None), WPOD, POD, TARGET_PORT, (WPOD, TARGET_PORT, None)),
    _in("to workload with app tunnel",
        ("workload", WSVC, APP_TUNNEL_PROXY), WPOD, POD, TARGET_PORT, (WPOD, PROXY_PORT, POD)),
    # Sandwiched waypoint, to-service traffic.
    _in("to service with waypoint referenced by pod",
        ("service", WPOD, None), WPOD, SVC, TARGET_PORT, (WPOD, TARGET_PORT, None)),
    _in("to service with waypint referenced by vip",
        ("service", WSVC, None), WPOD, SVC, TARGET_PORT, (WPOD, TARGET_PORT, None)),
    _in("to service with app tunnel",
        ("service", WSVC, APP_TUNNEL_PROXY), WPOD, SVC, TARGET_PORT, (WPOD, PROXY_PORT, SVC)),
    # Errors.
    _in("to server ip mismatch", NO_WAYPOINT, POD, CLIENT, TARGET_PORT, None),
    _in("to waypoint without attachment", NO_WAYPOINT, WPOD, CLIENT, TARGET_PORT, None),
    _in("to workload via waypoint with wrong attachment",
        ("service", WPOD, None), WPOD, POD, TARGET_PORT, None),
    _in("to service via waypoint with wrong attachment",
        ("workload", WPOD, None), WPOD, SVC, TARGET_PORT, None),
]  # fmt: skip


def _is_ip(host: str) -> bool:
    return host[0].isdigit() or ":" in host


def inbound(
    st: ProxyState, conn_dst: str, host: str, port: int
) -> tuple[RouteError | None, InboundTarget | RouteError]:
    """(validate_destination, find_inbound_upstream) for a CONNECT to `host:port`."""
    local = st.workload_by_ip("", conn_dst)
    assert local is not None
    valid = validate_hbone_destination(
        st, local=local, conn_dst_ip=conn_dst, authority_host=host, authority_port=port, network=""
    )
    target = find_inbound_upstream(
        st,
        local=local,
        conn_dst_ip=conn_dst,
        authority_host=host,
        authority_port=port,
        is_ip=_is_ip(host),
        illegal_ports=ILLEGAL,
        network="",
    )
    return valid, target


@pytest.mark.parametrize(("attach", "conn_dst", "hbone_dst", "port", "want"), INBOUND_CASES)
def test_find_inbound_upstream(
    attach: Attach,
    conn_dst: str,
    hbone_dst: str,
    port: int,
    want: tuple[str, int, str | None] | None,
) -> None:
    valid, target = inbound(inbound_state(attach), conn_dst, hbone_dst, port)
    if want is None:
        assert isinstance(valid, RouteError)
        return
    assert isinstance(target, InboundTarget)
    assert (target.ip, target.port) == want[:2]


@pytest.mark.parametrize(("attach", "conn_dst", "hbone_dst", "port", "want"), INBOUND_CASES)
def test_build_inbound_request(
    attach: Attach,
    conn_dst: str,
    hbone_dst: str,
    port: int,
    want: tuple[str, int, str | None] | None,
) -> None:
    valid, target = inbound(inbound_state(attach), conn_dst, hbone_dst, port)
    if want is None:
        assert valid is not None
        return
    assert valid is None
    assert isinstance(target, InboundTarget)
    ip, target_port, tunnel_ip = want
    assert (target.ip, target.port) == (ip, target_port)
    assert target.tunnel_target == (None if tunnel_ip is None else (tunnel_ip, port))
    assert target.proxy_protocol == (tunnel_ip is not None)


def test_inbound_ip_mismatch_message() -> None:
    st = inbound_state(NO_WAYPOINT)
    valid, _ = inbound(st, SERVER_POD_IP, CLIENT_POD_IP, TARGET_PORT)
    assert valid == RouteError("ip mismatch: 10.0.0.2 != 10.0.0.1")


def test_inbound_ipv6_authority_is_canonicalised() -> None:
    pod = wl("c//v1/Pod/default/v6", "fd00::2", namespace="default")
    st = state(pod)
    same = validate_hbone_destination(
        st,
        local=pod,
        conn_dst_ip="fd00::2",
        authority_host="[fd00:0::2]",
        authority_port=80,
        network="",
    )
    assert same is None
    other = validate_hbone_destination(
        st,
        local=pod,
        conn_dst_ip="fd00::2",
        authority_host="fd00::3",
        authority_port=80,
        network="",
    )
    assert other == RouteError("ip mismatch: fd00::2 != fd00::3")


def _server_local(st: ProxyState) -> Workload:
    local = st.workload_by_ip("", SERVER_POD_IP)
    assert local is not None
    return local


def _find(st: ProxyState, local: Workload, host: str, port: int) -> InboundTarget | RouteError:
    return find_inbound_upstream(
        st,
        local=local,
        conn_dst_ip=SERVER_POD_IP,
        authority_host=host,
        authority_port=port,
        is_ip=_is_ip(host),
        illegal_ports=ILLEGAL,
        network="",
    )


def test_inbound_hostname_authority_with_a_named_port() -> None:
    named = svc("named.default.svc.cluster.local", "10.10.0.9", namespace="default", ports={80: 0})
    server = wl(
        "c//v1/Pod/default/server",
        SERVER_POD_IP,
        namespace="default",
        services={named.key(): {80: 9999}},
    )
    st = state(named, server)
    target = _find(st, server, named.hostname, 80)
    assert isinstance(target, InboundTarget)
    assert (target.ip, target.port, target.services) == (SERVER_POD_IP, 9999, (named,))
    # Without our endpoint's mapping a named port cannot be resolved.
    bare = replace(server, services={})
    assert _find(state(named, bare), bare, named.hostname, 80) == RouteError(
        "requested service named.default.svc.cluster.local:80 found, but cannot resolve port"
    )


def test_inbound_unknown_hostname() -> None:
    st = inbound_state(NO_WAYPOINT)
    assert _find(st, _server_local(st), "nope.example", 80) == RouteError(
        "no service or workload for hostname: nope.example"
    )


def test_inbound_hostname_prefers_the_local_namespace() -> None:
    mine = svc("shared.example", "10.10.1.1", namespace="default", ports={80: 8081})
    theirs = svc("shared.example", "10.10.1.2", namespace="aaa", ports={80: 8082}, canonical=True)
    server = wl("c//v1/Pod/default/server", SERVER_POD_IP, namespace="default")
    target = _find(state(theirs, mine, server), server, "shared.example", 80)
    assert isinstance(target, InboundTarget) and target.port == 8081


@pytest.mark.parametrize(
    ("host", "port"),
    [
        pytest.param(SERVER_POD_IP, 15008, id="ip_authority"),
        pytest.param("loop.default.svc.cluster.local", 80, id="hostname_mapped_to_15006"),
    ],
)
def test_inbound_illegal_target_port_is_a_self_call(host: str, port: int) -> None:
    loop = svc(
        "loop.default.svc.cluster.local", "10.10.0.8", namespace="default", ports={80: 15006}
    )
    server = wl("c//v1/Pod/default/server", SERVER_POD_IP, namespace="default")
    assert _find(state(loop, server), server, host, port) == RouteError(SELF_CALL)


def test_inbound_app_tunnel_none_keeps_the_port_and_sends_no_proxy_header() -> None:
    server = wl(
        "c//v1/Pod/default/server",
        SERVER_POD_IP,
        namespace="default",
        application_tunnel=ApplicationTunnel(protocol="NONE"),
    )
    target = _find(state(server), server, SERVER_POD_IP, 8080)
    assert target == InboundTarget(
        ip=SERVER_POD_IP, port=8080, proxy_protocol=False, tunnel_target=(SERVER_POD_IP, 8080)
    )


def test_inbound_app_tunnel_hostname_picks_a_v4_vip_on_our_network() -> None:
    multi = svc(
        "multi.default.svc.cluster.local",
        "other/10.20.0.1",
        "fd00::10",
        "10.10.0.7",
        namespace="default",
        ports={80: 8080},
    )
    server = wl(
        "c//v1/Pod/default/server",
        SERVER_POD_IP,
        namespace="default",
        application_tunnel=APP_TUNNEL_PROXY,
    )
    target = _find(state(multi, server), server, multi.hostname, 80)
    assert isinstance(target, InboundTarget)
    assert (target.port, target.tunnel_target, target.proxy_protocol) == (
        PROXY_PORT,
        ("10.10.0.7", 80),
        True,
    )
    no_vip = replace(multi, vips=())
    assert _find(state(no_vip, server), server, multi.hostname, 80) == RouteError(
        "requested service multi.default.svc.cluster.local found, but has no IP addresses"
    )


# --- inbound: service guess and plaintext passthrough --------------------------------------


def test_guess_inbound_service() -> None:
    a = svc("a.example", "10.10.2.1", namespace="default", ports={80: 8080})
    b = svc("b.example", "10.10.2.2", namespace="default", ports={90: 0})
    server = wl(
        "c//v1/Pod/default/server",
        SERVER_POD_IP,
        namespace="default",
        services={a.key(): {}, b.key(): {90: 9090}},
    )
    st = state(a, b, server)
    assert guess_inbound_service(st, server, 8080, None) == a
    assert guess_inbound_service(st, server, 9090, None) == b  # through our endpoint's map
    assert guess_inbound_service(st, server, 8080, "b.example") == b  # forwarded host wins
    assert guess_inbound_service(st, server, 1234, "elsewhere.example") is None
    assert guess_inbound_service(st, server, 8080, None, candidates=(b,)) is None


def test_plan_inbound_passthrough() -> None:
    st = inbound_state(NO_WAYPOINT)
    server = _server_local(st)
    got = plan_inbound_passthrough(
        st,
        local=server,
        src_ip=CLIENT_POD_IP,
        dst_ip=SERVER_POD_IP,
        dst_port=8080,
        network="",
        illegal_ports=ILLEGAL,
    )
    assert isinstance(got, InboundPassthrough)
    assert got.target == (SERVER_POD_IP, 8080)
    assert got.source_workload is not None and got.source_workload.name == "workload-client"
    assert got.destination_service is not None
    assert got.destination_service.hostname == SERVER_POD_HOSTNAME
    # Any IP on an illegal port is a self call on this path.
    loop = plan_inbound_passthrough(
        st,
        local=server,
        src_ip=CLIENT_POD_IP,
        dst_ip=SERVER_POD_IP,
        dst_port=15008,
        network="",
        illegal_ports=ILLEGAL,
    )
    assert loop == RouteError(SELF_CALL)
