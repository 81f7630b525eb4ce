"""LOCAL_XDS_PATH / LOCAL_XDS YAML: upstream's example, every rejection, JSON forms, round trips."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.core.configdump import state_to_json
from ztunnel.core.errors import ConfigError
from ztunnel.core.localconfig import (
    load_local_config,
    local_config_to_json,
    parse_local_config,
    policy_to_json,
    service_to_json,
    workload_to_json,
)
from ztunnel.core.model import (
    ApplicationTunnel,
    Authorization,
    Endpoint,
    GatewayAddress,
    LoadBalancer,
    Locality,
    Match,
    NamespacedHostname,
    NetworkAddress,
    NetworkCidr,
    Service,
    ServiceAccountMatch,
    StateSnapshot,
    StringMatch,
    WeightedWaypoint,
    Workload,
)
from ztunnel.core.state import ProxyState

pytestmark = pytest.mark.timeout(60)

EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "localhost.yaml"
PORTS = {"default/example.com": {80: 8080}, "default/example2.com": {80: 8080}}


def parse(text: str) -> StateSnapshot:
    return parse_local_config(text, source="test.yaml")


def rejected(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# --- upstream's example ---------------------------------------------------------------------


def test_upstream_example_loads_exactly() -> None:
    snap = load_local_config(str(EXAMPLE_PATH))
    common: dict[str, Any] = {
        "namespace": "default",
        "trust_domain": "cluster.local",
        "service_account": "default",
        "cluster_id": "Kubernetes",
        "node": "local",
        "network": "",
        "services": PORTS,
    }
    assert snap.workloads == (
        Workload(
            uid="cluster1//v1/Pod/default/local",
            name="local",
            workload_ips=("127.0.0.1",),
            protocol="HBONE",
            **common,
        ),
        Workload(
            uid="cluster1//v1/Pod/default/local-tcp",
            name="local-tcp",
            workload_ips=("127.0.0.2",),
            protocol="TCP",
            **common,
        ),
    )
    assert snap.services == (
        Service(
            name="local",
            namespace="default",
            hostname="example.com",
            vips=(NetworkAddress(network="", address="127.10.0.1"),),
            ports={80: 8080},
            subject_alt_names=("spiffe://cluster.local/ns/default/sa/local",),
            canonical=True,
        ),
        Service(
            name="remote",
            namespace="default",
            hostname="example2.com",
            vips=(NetworkAddress(network="remote", address="127.10.0.2"),),
            ports={80: 8080},
            canonical=True,
        ),
    )
    assert snap.policies == (
        Authorization(
            name="deny-9999",
            namespace="default",
            scope="Namespace",
            action="Allow",
            dry_run=False,
            rules=(((Match(not_destination_ports=(9999,)),),),),
        ),
    )


def test_example_workloads_get_xds_identity_defaults() -> None:
    w = load_local_config(str(EXAMPLE_PATH)).workloads[0]
    assert w.identity() == "spiffe://cluster.local/ns/default/sa/default"


def test_explicit_identity_fields_are_kept() -> None:
    (w,) = parse(
        "workloads: [{namespace: ns, workloadIps: [], services: {}, trustDomain: td,"
        " serviceAccount: sa, clusterId: c1}]"
    ).workloads
    assert (w.trust_domain, w.service_account, w.cluster_id) == ("td", "sa", "c1")


def test_example_is_usable_as_a_state() -> None:
    state = ProxyState.from_snapshot(load_local_config(str(EXAMPLE_PATH)), "local")
    local = state.find_by_info("local", "default", "default")
    assert local is not None
    assert [s.hostname for s in state.services_for_workload(local)] == [
        "example.com",
        "example2.com",
    ]
    assert len(state.endpoints("default/example.com")) == 2
    assert state.best_service_by_vip("remote", "127.10.0.2", "default") is not None


def test_inline_local_xds_names_its_source() -> None:
    snap = parse_local_config("services: []\n", source="LOCAL_XDS")
    assert snap == StateSnapshot()
    with pytest.raises(ConfigError, match=r"^LOCAL_XDS: workloads\[0\]"):
        parse_local_config("workloads: [{}]", source="LOCAL_XDS")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}", "workloads: []"])
def test_empty_documents_are_empty_configs(text: str) -> None:
    assert parse(text) == StateSnapshot()


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_local_config(str(missing))


# --- full schema ----------------------------------------------------------------------------

FULL = """
workloads:
- uid: c//Pod/ns/full
  name: full
  namespace: ns
  workloadIps: ["10.0.0.1", "2001:DB8::1"]
  waypoint: {destination: "net1/10.0.0.10", hboneMtlsPort: 15008}
  networkGateway: {destination: "istio-system/gw.example", hboneMtlsPort: 15009}
  protocol: HBONE
  networkMode: HostNetwork
  trustDomain: td
  serviceAccount: sa
  network: net1
  workloadName: full-deploy
  workloadType: deployment
  canonicalName: full-app
  canonicalRevision: v1
  hostname: full.example
  node: node1
  nativeTunnel: true
  applicationTunnel: {protocol: PROXY, port: 15088}
  authorizationPolicies: [ns/sel]
  status: Unhealthy
  clusterId: c1
  locality: {region: r, zone: z, subzone: s}
  services: {"ns/full.example": {80: 8080, 443: 8443}}
  capacity: 7
policies:
- name: sel
  namespace: ns
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [{Exact: a}, {Prefix: b}, {Suffix: c}, {Presence: []}]
        notNamespaces: [Presence]
        serviceAccounts: [{namespace: ns, serviceAccount: sa}]
        notServiceAccounts: [{namespace: ns2, serviceAccount: sa2}]
        principals: [{Presence: null}]
        notPrincipals: [{Exact: "spiffe://x"}]
        sourceIps: ["10.0.0.0/8"]
        notSourceIps: ["10.1.2.3/32"]
        destinationIps: ["2001:db8::/32"]
        notDestinationIps: ["10.9.9.9/16"]
        destinationPorts: [80]
        notDestinationPorts: [9999]
    - - destinationPorts: [81]
services:
- name: full
  namespace: ns
  hostname: full.example
  vips: ["net1/10.96.0.1", "/2001:db8::10"]
  cidrVips: [{network: net1, cidr: "10.97.0.0/16"}]
  ports: {80: 8080, 443: 0}
  subjectAltNames: ["spiffe://td/ns/ns/sa/sa"]
  waypoint: {destination: {namespace: ns, hostname: wp.example}, hboneMtlsPort: 15008}
  weightedWaypoints:
  - {destination: {destination: "ns/wp.example", hboneMtlsPort: 15008}, weight: 90}
  - {destination: {destination: "/10.0.0.11", hboneMtlsPort: 15008}, weight: 10}
  loadBalancer: {routingPreferences: [Network, Region, Zone, Subzone, Node, Cluster],
                 mode: Failover, healthPolicy: AllowAll}
  ipFamilies: Dual
  canonical: true
  visibility: Namespace
"""


def test_full_schema_maps_every_field() -> None:
    snap = parse(FULL)
    (w,) = snap.workloads
    assert w.workload_ips == ("10.0.0.1", "2001:db8::1")
    assert w.waypoint == GatewayAddress(
        destination=NetworkAddress(network="net1", address="10.0.0.10")
    )
    assert w.network_gateway == GatewayAddress(
        destination=NamespacedHostname(namespace="istio-system", hostname="gw.example"),
        hbone_mtls_port=15009,
    )
    assert (w.protocol, w.network_mode, w.status, w.capacity) == (
        "HBONE",
        "HostNetwork",
        "Unhealthy",
        7,
    )
    assert (w.workload_name, w.workload_type, w.canonical_name, w.canonical_revision) == (
        "full-deploy",
        "deployment",
        "full-app",
        "v1",
    )
    assert (w.hostname, w.node, w.native_tunnel, w.cluster_id) == (
        "full.example",
        "node1",
        True,
        "c1",
    )
    assert w.application_tunnel == ApplicationTunnel(protocol="PROXY", port=15088)
    assert w.authorization_policies == ("ns/sel",)
    assert w.locality == Locality(region="r", zone="z", subzone="s")
    assert w.services == {"ns/full.example": {80: 8080, 443: 8443}}

    (svc,) = snap.services
    assert svc.vips == (
        NetworkAddress(network="net1", address="10.96.0.1"),
        NetworkAddress(network="", address="2001:db8::10"),
    )
    assert svc.cidr_vips == (NetworkCidr(network="net1", cidr="10.97.0.0/16"),)
    assert svc.ports == {80: 8080, 443: 0}
    assert svc.waypoint == GatewayAddress(
        destination=NamespacedHostname(namespace="ns", hostname="wp.example")
    )
    assert svc.weighted_waypoints == (
        WeightedWaypoint(
            destination=GatewayAddress(
                destination=NamespacedHostname(namespace="ns", hostname="wp.example")
            ),
            weight=90,
        ),
        WeightedWaypoint(
            destination=GatewayAddress(destination=NetworkAddress(address="10.0.0.11")),
            weight=10,
        ),
    )
    assert svc.load_balancer == LoadBalancer(
        routing_preferences=("Network", "Region", "Zone", "Subzone", "Node", "Cluster"),
        mode="Failover",
        health_policy="AllowAll",
    )
    assert (svc.ip_families, svc.canonical, svc.visibility) == ("Dual", True, "Namespace")

    (p,) = snap.policies
    assert (p.scope, p.action, p.dry_run, len(p.rules), len(p.rules[0])) == (
        "WorkloadSelector",
        "Deny",
        True,
        1,
        2,
    )
    m = p.rules[0][0][0]
    assert m.namespaces == (
        StringMatch(kind="Exact", value="a"),
        StringMatch(kind="Prefix", value="b"),
        StringMatch(kind="Suffix", value="c"),
        StringMatch(kind="Presence"),
    )
    assert m.not_namespaces == (StringMatch(kind="Presence"),)
    assert m.service_accounts == (ServiceAccountMatch(namespace="ns", service_account="sa"),)
    assert m.principals == (StringMatch(kind="Presence"),)
    assert m.source_ips == ("10.0.0.0/8",)
    assert m.not_destination_ips == ("10.9.0.0/16",)  # host bits cleared, as xDS does
    assert m.destination_ips == ("2001:db8::/32",)
    assert (m.destination_ports, m.not_destination_ports) == ((80,), (9999,))
    assert p.rules[0][1] == (Match(destination_ports=(81,)),)


def test_service_endpoints_fold_into_their_workloads() -> None:
    snap = parse(
        """
workloads:
- {uid: u1, namespace: ns, workloadIps: [], services: {"ns/a": {80: 1}}}
- {uid: u2, namespace: ns, workloadIps: [], services: {}}
services:
- name: a
  namespace: ns
  hostname: a
  vips: []
  ports: {80: 80}
  endpoints:
    u1: {workloadUid: u1, port: {80: 2}, status: Healthy}
    u2: {workloadUid: u2, port: {80: 3}, status: Healthy}
    ghost: {workloadUid: ghost, port: {80: 4}, status: Healthy}
"""
    )
    assert [w.services for w in snap.workloads] == [{"ns/a": {80: 1}}, {"ns/a": {80: 3}}]


@pytest.mark.parametrize(
    ("yaml_value", "expected"),
    [
        ("yes", "yes"),
        ("on", "on"),
        ("123", "123"),
        ("0755", "0755"),
        ('"quoted"', "quoted"),
    ],
)
def test_scalars_are_read_as_yaml_1_2(yaml_value: str, expected: str) -> None:
    (w,) = parse(
        f"workloads: [{{namespace: {yaml_value}, workloadIps: [], services: {{}}}}]"
    ).workloads
    assert w.namespace == expected


def test_quoted_numbers_convert_to_ports() -> None:
    (svc,) = parse(
        'services: [{name: a, namespace: b, hostname: c, vips: [], ports: {"80": "8080"}}]'
    ).services
    assert svc.ports == {80: 8080}


def test_unknown_keys_are_ignored_where_upstream_ignores_them() -> None:
    snap = parse(
        """
workloads:
- {namespace: ns, workloadIps: [], services: {}, locality: {region: r, zone: z, subzone: s, x: 1}}
services:
- name: a
  namespace: b
  hostname: c
  vips: []
  ports: {}
  cidrVips: [{network: "", cidr: 10.0.0.0/8, x: 1}]
policies:
- name: p
  namespace: ns
  scope: Global
  action: Allow
  dryRun: false
  rules:
  - - - destinationPorts: [1]
        futureField: 1
        serviceAccounts: [{namespace: a, serviceAccount: b, x: 1}]
"""
    )
    assert snap.policies[0].rules[0][0][0].destination_ports == (1,)


# --- rejections -----------------------------------------------------------------------------

W = "{namespace: ns, workloadIps: [], services: {}%s}"
S = "{name: a, namespace: b, hostname: c, vips: [], ports: {}%s}"
P = "{name: p, namespace: ns, scope: Global, action: Allow, dryRun: false, rules: %s}"
GW = "{destination: '/10.0.0.1', hboneMtlsPort: 15008%s}"


def wl_yaml(extra: str = "") -> str:
    return "workloads: [" + W % extra + "]"


def svc_yaml(extra: str = "") -> str:
    return "services: [" + S % extra + "]"


def pol_yaml(rules: str) -> str:
    return "policies: [" + P % rules + "]"


def match_yaml(match: str) -> str:
    return pol_yaml(f"[[[{match}]]]")


REJECTIONS = [
    # unknown keys, at every level upstream denies them
    ("extra: 1", "test.yaml: Object contains unknown field `extra`"),
    (wl_yaml(", bogus: 1"), "test.yaml: workloads[0]: Object contains unknown field `bogus`"),
    (svc_yaml(", bogus: 1"), "test.yaml: services[0]: Object contains unknown field `bogus`"),
    (
        "policies: [{name: p, namespace: ns, scope: Global, action: Allow, dryRun: false,"
        " rules: [], x: 1}]",
        "test.yaml: policies[0]: Object contains unknown field `x`",
    ),
    (
        wl_yaml(", waypoint: " + GW % ", x: 1"),
        "test.yaml: workloads[0].waypoint: Object contains unknown field `x`",
    ),
    (
        wl_yaml(", applicationTunnel: {protocol: NONE, x: 1}"),
        "workloads[0].applicationTunnel: Object contains unknown field `x`",
    ),
    (
        svc_yaml(
            ", loadBalancer: {routingPreferences: [], mode: Strict, healthPolicy: AllowAll, x: 1}"
        ),
        "services[0].loadBalancer: Object contains unknown field `x`",
    ),
    (
        svc_yaml(", weightedWaypoints: [{destination: " + GW % "" + ", weight: 1, x: 1}]"),
        "services[0].weightedWaypoints[0]: Object contains unknown field `x`",
    ),
    (
        svc_yaml(", endpoints: {u: {workloadUid: u, port: {}, status: Healthy, x: 1}}"),
        "services[0].endpoints[...]: Object contains unknown field `x`",
    ),
    # required keys
    (
        "workloads: [{namespace: ns, workloadIps: []}]",
        "test.yaml: workloads[0]: Object missing required field `services`",
    ),
    ("workloads: [{namespace: ns, services: {}}]", "missing required field `workloadIps`"),
    ("workloads: [{workloadIps: [], services: {}}]", "missing required field `namespace`"),
    ("services: [{name: a, namespace: b, hostname: c, ports: {}}]", "required field `vips`"),
    ("services: [{name: a, namespace: b, hostname: c, vips: []}]", "required field `ports`"),
    (
        "policies: [{name: p, namespace: ns, scope: Global, action: Allow, rules: []}]",
        "policies[0]: Object missing required field `dryRun`",
    ),
    (
        svc_yaml(", loadBalancer: {routingPreferences: [], healthPolicy: AllowAll}"),
        "services[0].loadBalancer: Object missing required field `mode`",
    ),
    (
        wl_yaml(", waypoint: {destination: '/10.0.0.1'}"),
        "workloads[0].waypoint: Object missing required field `hboneMtlsPort`",
    ),
    (wl_yaml(", locality: {region: r}"), "workloads[0].locality: Object missing required field"),
    # bad addresses
    (
        "workloads: [" + W % "" + ", {namespace: ns, workloadIps: ['x'], services: {}}]",
        "test.yaml: workloads[1].workloadIps[0]: invalid IP 'x'",
    ),
    ("workloads: [{namespace: ns, workloadIps: ['10.0.0.256'], services: {}}]", "invalid IP"),
    (
        "services: [{name: a, namespace: b, hostname: c, vips: ['10.0.0.1'], ports: {}}]",
        "test.yaml: services[0].vips[0]: invalid address '10.0.0.1' (want network/ip)",
    ),
    (
        "services: [{name: a, namespace: b, hostname: c, vips: ['net/nope'], ports: {}}]",
        "services[0].vips[0]: invalid IP 'nope'",
    ),
    (
        svc_yaml(", cidrVips: [{network: '', cidr: 10.0.0.1}]"),
        "services[0].cidrVips[0].cidr: invalid CIDR",
    ),
    (svc_yaml(", cidrVips: [{network: '', cidr: 10.0.0.0/33}]"), "invalid CIDR '10.0.0.0/33'"),
    (
        match_yaml("{sourceIps: ['10.0.0.1']}"),
        "policies[0].rules[0][0][0].sourceIps[0]: invalid CIDR",
    ),
    (match_yaml("{notDestinationIps: [x/8]}"), "notDestinationIps[0]: invalid CIDR 'x/8'"),
    (
        wl_yaml(", waypoint: {destination: nowhere, hboneMtlsPort: 1}"),
        "workloads[0].waypoint.destination: invalid name 'nowhere'",
    ),
    (
        wl_yaml(", waypoint: {destination: {namespace: a}, hboneMtlsPort: 1}"),
        "workloads[0].waypoint.destination: invalid gateway destination",
    ),
    (
        "workloads: [{namespace: ns, workloadIps: [], services: {nope: {}}}]",
        "workloads[0].services['nope']: invalid name 'nope' (want namespace/hostname)",
    ),
    # bad numbers
    (svc_yaml(", ports: {80: 70000}").replace("ports: {}, ", ""), "Expected `int` <= 65535"),
    (
        "services: [{name: a, namespace: b, hostname: c, vips: [], ports: {x: 1}}]",
        "services[0].ports",
    ),
    (wl_yaml(", capacity: -1"), "workloads[0].capacity: Expected `int` >= 0"),
    (match_yaml("{destinationPorts: [65536]}"), "destinationPorts[0]: Expected `int` <= 65535"),
    # bad enums
    (wl_yaml(", protocol: UDP"), "workloads[0].protocol: Invalid enum value 'UDP'"),
    (wl_yaml(", networkMode: Host"), "workloads[0].networkMode: Invalid enum value"),
    (wl_yaml(", status: Sick"), "workloads[0].status: Invalid enum value"),
    (wl_yaml(", applicationTunnel: {protocol: HTTP}"), "applicationTunnel.protocol: Invalid enum"),
    (svc_yaml(", visibility: Private"), "services[0].visibility: Invalid enum value"),
    (svc_yaml(", ipFamilies: IPv5"), "services[0].ipFamilies: Invalid enum value"),
    (
        svc_yaml(
            ", loadBalancer: {routingPreferences: [Planet], mode: Strict, healthPolicy: AllowAll}"
        ),
        "services[0].loadBalancer.routingPreferences[0]: Invalid enum value 'Planet'",
    ),
    (
        svc_yaml(", loadBalancer: {routingPreferences: [], mode: Random, healthPolicy: AllowAll}"),
        "loadBalancer.mode: Invalid enum value",
    ),
    (
        svc_yaml(", loadBalancer: {routingPreferences: [], mode: Strict, healthPolicy: Some}"),
        "loadBalancer.healthPolicy: Invalid enum value",
    ),
    (
        "policies: [{name: p, namespace: ns, scope: Cluster, action: Allow, dryRun: false,"
        " rules: []}]",
        "policies[0].scope: Invalid enum value 'Cluster'",
    ),
    (
        "policies: [{name: p, namespace: ns, scope: Global, action: Audit, dryRun: false,"
        " rules: []}]",
        "policies[0].action: Invalid enum value 'Audit'",
    ),
    # bad string matches
    (
        match_yaml("{namespaces: [{Regex: x}]}"),
        "policies[0].rules[0][0][0].namespaces[0]: invalid string match",
    ),
    (match_yaml("{principals: [{Exact: a, Prefix: b}]}"), "principals[0]: invalid string match"),
    (match_yaml("{principals: [{Exact: [a]}]}"), "principals[0]: invalid string match"),
    (match_yaml("{notPrincipals: [{Presence: x}]}"), "notPrincipals[0]: invalid string match"),
    (match_yaml("{notNamespaces: [Exact]}"), "notNamespaces[0]: invalid string match 'Exact'"),
    (match_yaml("{namespaces: [{}]}"), "namespaces[0]: invalid string match"),
    # bad shapes
    ("- 1", "test.yaml: Expected `object`, got `array`"),
    ("workloads: {}", "test.yaml: workloads: Expected `array`, got `object`"),
    ("workloads: null", "test.yaml: workloads: Expected `array`, got `null`"),
    (wl_yaml(", nativeTunnel: maybe"), "workloads[0].nativeTunnel: Expected `bool`"),
    (pol_yaml("[[{destinationPorts: [1]}]]"), "policies[0].rules[0][0]: Expected `array`"),
    ("workloads: [", "test.yaml: invalid YAML"),
]


@pytest.mark.parametrize(("text", "message"), REJECTIONS)
def test_rejections_name_source_and_element(text: str, message: str) -> None:
    error = rejected(text)
    assert message in error
    assert error.startswith("test.yaml: ")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("{Exact: x}", StringMatch(kind="Exact", value="x")),
        ("{Prefix: x}", StringMatch(kind="Prefix", value="x")),
        ("{Suffix: x}", StringMatch(kind="Suffix", value="x")),
        ("{Exact: ''}", StringMatch(kind="Exact", value="")),
        ("{Presence: []}", StringMatch(kind="Presence")),
        ("{Presence: null}", StringMatch(kind="Presence")),
        ("{Presence: ~}", StringMatch(kind="Presence")),
        ("{Presence: }", StringMatch(kind="Presence")),
        ("Presence", StringMatch(kind="Presence")),
    ],
)
def test_string_match_forms(raw: str, expected: StringMatch) -> None:
    (p,) = parse(match_yaml(f"{{principals: [{raw}]}}")).policies
    assert p.rules[0][0][0].principals == (expected,)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("'net/10.0.0.1'", NetworkAddress(network="net", address="10.0.0.1")),
        ("'/::1'", NetworkAddress(network="", address="::1")),
        ("'ns/wp.example'", NamespacedHostname(namespace="ns", hostname="wp.example")),
        ("'ns/10.0.0.x'", NamespacedHostname(namespace="ns", hostname="10.0.0.x")),
        ("{namespace: ns, hostname: h}", NamespacedHostname(namespace="ns", hostname="h")),
    ],
)
def test_gateway_destination_forms(raw: str, expected: object) -> None:
    (w,) = parse(wl_yaml(f", waypoint: {{destination: {raw}, hboneMtlsPort: 15008}}")).workloads
    assert w.waypoint is not None
    assert w.waypoint.destination == expected


# --- JSON forms (config_dump) ---------------------------------------------------------------


def test_workload_dump_form_matches_upstream() -> None:
    w = load_local_config(str(EXAMPLE_PATH)).workloads[0]
    assert workload_to_json(w) == {
        "workloadIps": ["127.0.0.1"],
        "protocol": "HBONE",
        "networkMode": "Standard",
        "uid": "cluster1//v1/Pod/default/local",
        "name": "local",
        "namespace": "default",
        "trustDomain": "cluster.local",
        "serviceAccount": "default",
        "node": "local",
        "status": "Healthy",
        "clusterId": "Kubernetes",
        "services": ["default/example.com", "default/example2.com"],
        "capacity": 1,
    }
    assert workload_to_json(w, local=True)["services"] == PORTS


def test_waypoint_dump_form_matches_upstream() -> None:
    gw = GatewayAddress(destination=NetworkAddress(network="defaultnw", address="127.0.0.10"))
    w = Workload(namespace="ns", waypoint=gw)
    assert workload_to_json(w)["waypoint"] == {
        "destination": "defaultnw/127.0.0.10",
        "hboneMtlsPort": 15008,
    }


def test_service_dump_form_carries_endpoints() -> None:
    svc = load_local_config(str(EXAMPLE_PATH)).services[1]
    ep = Endpoint(workload_uid="u", port={80: 8080}, status="Unhealthy")
    assert service_to_json(svc, {"u": ep}) == {
        "name": "remote",
        "namespace": "default",
        "hostname": "example2.com",
        "vips": ["remote/127.10.0.2"],
        "ports": {80: 8080},
        "endpoints": {"u": {"workloadUid": "u", "port": {80: 8080}, "status": "Unhealthy"}},
        "subjectAltNames": [],
        "canonical": True,
        "visibility": "Public",
    }
    assert json.loads(json.dumps(service_to_json(svc)))["ports"] == {"80": 8080}


def test_policy_dump_form_matches_upstream() -> None:
    p = Authorization(
        name="p",
        namespace="ns",
        scope="Global",
        action="Deny",
        rules=(((Match(principals=(StringMatch(kind="Presence"),), destination_ports=(80,)),),),),
    )
    assert policy_to_json(p) == {
        "name": "p",
        "namespace": "ns",
        "scope": "Global",
        "action": "Deny",
        "rules": [[[{"principals": [{"Presence": []}], "destinationPorts": [80]}]]],
        "dryRun": False,
    }


def test_state_dump_is_sorted_and_lists_staged_services() -> None:
    snap = load_local_config(str(EXAMPLE_PATH))
    orphan = Workload(uid="a-orphan", namespace="ns", services={"ns/missing": {1: 2}})
    state = ProxyState.from_snapshot(
        StateSnapshot(
            workloads=(*reversed(snap.workloads), orphan),
            services=tuple(reversed(snap.services)),
            policies=snap.policies,
        )
    )
    dump = state_to_json(state)
    assert [w["uid"] for w in dump["workloads"]] == [
        "a-orphan",
        "cluster1//v1/Pod/default/local",
        "cluster1//v1/Pod/default/local-tcp",
    ]
    assert [s["hostname"] for s in dump["services"]] == ["example.com", "example2.com"]
    assert len(dump["services"][0]["endpoints"]) == 2
    assert dump["stagedServices"] == {
        "ns/missing": {"a-orphan": {"workloadUid": "a-orphan", "port": {1: 2}, "status": "Healthy"}}
    }


# --- round trips ----------------------------------------------------------------------------


def _reparse(snap: StateSnapshot) -> StateSnapshot:
    return parse_local_config(json.dumps(local_config_to_json(snap)), source="round-trip")


@pytest.mark.parametrize("text", [EXAMPLE_PATH.read_text(), FULL])
def test_parse_to_json_parse_is_stable(text: str) -> None:
    snap = parse(text)
    assert _reparse(snap) == snap
    assert _reparse(_reparse(snap)) == snap


names = st.text(st.sampled_from("abcxyz-."), min_size=1, max_size=6)
ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
ports = st.dictionaries(st.integers(0, 65535), st.integers(0, 65535), max_size=2)
gateways = st.builds(
    GatewayAddress,
    destination=st.one_of(
        st.builds(NetworkAddress, network=names | st.just(""), address=ips),
        st.builds(NamespacedHostname, namespace=names, hostname=names),
    ),
    hbone_mtls_port=st.integers(0, 65535),
)
string_matches = st.one_of(
    st.builds(StringMatch, kind=st.sampled_from(["Exact", "Prefix", "Suffix"]), value=names),
    st.just(StringMatch(kind="Presence")),
)
cidrs = st.ip_addresses(v=4).map(lambda ip: f"{ip}/32") | st.just("10.0.0.0/8")
workloads = st.builds(
    Workload,
    uid=names,
    name=names,
    namespace=names,
    workload_ips=st.lists(ips, max_size=2).map(tuple),
    waypoint=st.none() | gateways,
    protocol=st.sampled_from(["TCP", "HBONE"]),
    trust_domain=names,
    service_account=names,
    cluster_id=names,
    node=names | st.just(""),
    native_tunnel=st.booleans(),
    application_tunnel=st.none()
    | st.builds(ApplicationTunnel, protocol=st.just("PROXY"), port=st.none() | st.integers(1, 9)),
    authorization_policies=st.lists(names, max_size=2).map(tuple),
    status=st.sampled_from(["Healthy", "Unhealthy"]),
    locality=st.builds(Locality, region=names, zone=names, subzone=names),
    services=st.dictionaries(st.builds(lambda a, b: f"{a}/{b}", names, names), ports, max_size=2),
    capacity=st.integers(0, 2**32 - 1),
)
services = st.builds(
    Service,
    name=names,
    namespace=names,
    hostname=names,
    vips=st.lists(st.builds(NetworkAddress, network=names, address=ips), max_size=2).map(tuple),
    cidr_vips=st.lists(st.builds(NetworkCidr, network=names, cidr=cidrs), max_size=1).map(tuple),
    ports=ports,
    waypoint=st.none() | gateways,
    weighted_waypoints=st.lists(
        st.builds(WeightedWaypoint, destination=gateways, weight=st.integers(0, 100)), max_size=2
    ).map(tuple),
    load_balancer=st.none()
    | st.builds(
        LoadBalancer,
        routing_preferences=st.lists(st.sampled_from(["Region", "Zone", "Network"])).map(tuple),
        mode=st.sampled_from(["Standard", "Strict", "Failover", "Passthrough"]),
        health_policy=st.sampled_from(["OnlyHealthy", "AllowAll"]),
    ),
    ip_families=st.none() | st.sampled_from(["Dual", "IPv4", "IPv6"]),
    canonical=st.booleans(),
    visibility=st.sampled_from(["Public", "Namespace"]),
)
matches = st.builds(
    Match,
    namespaces=st.lists(string_matches, max_size=2).map(tuple),
    not_principals=st.lists(string_matches, max_size=2).map(tuple),
    service_accounts=st.lists(
        st.builds(ServiceAccountMatch, namespace=names, service_account=names), max_size=1
    ).map(tuple),
    source_ips=st.lists(cidrs, max_size=2).map(tuple),
    not_destination_ports=st.lists(st.integers(0, 65535), max_size=2).map(tuple),
)
policies = st.builds(
    Authorization,
    name=names,
    namespace=names,
    scope=st.sampled_from(["Global", "Namespace", "WorkloadSelector"]),
    action=st.sampled_from(["Allow", "Deny"]),
    dry_run=st.booleans(),
    rules=st.lists(
        st.lists(st.lists(matches, max_size=2).map(tuple), max_size=2).map(tuple), max_size=2
    ).map(tuple),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.builds(
        StateSnapshot,
        workloads=st.lists(workloads, max_size=3).map(tuple),
        services=st.lists(services, max_size=3).map(tuple),
        policies=st.lists(policies, max_size=2).map(tuple),
    )
)
def test_any_snapshot_survives_the_local_config_form(snap: StateSnapshot) -> None:
    assert _reparse(snap) == snap
