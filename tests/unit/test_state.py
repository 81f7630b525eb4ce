"""ProxyState: indexes, copy-on-write deltas, VIP choice, local lookup and policy selection."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.core.model import (
    Authorization,
    Endpoint,
    LoadBalancer,
    NetworkAddress,
    NetworkCidr,
    Service,
    StateDelta,
    StateSnapshot,
    Workload,
)
from ztunnel.core.state import ProxyState

pytestmark = pytest.mark.timeout(60)

replace = msgspec.structs.replace


def wl(uid: str, *ips: str, **kw: Any) -> Workload:
    fields: dict[str, Any] = {
        "name": uid.rsplit("/", 1)[-1],
        "namespace": "default",
        "trust_domain": "cluster.local",
        "service_account": "default",
        "node": "node1",
    }
    fields.update(kw)
    return Workload(uid=uid, workload_ips=ips, **fields)


def svc(hostname: str, *vips: str, namespace: str = "default", **kw: Any) -> Service:
    addrs = tuple(NetworkAddress(network=v.split("/")[0], address=v.split("/")[1]) for v in vips)
    return Service(
        name=hostname.split(".", maxsplit=1)[0],
        namespace=namespace,
        hostname=hostname,
        vips=addrs,
        **kw,
    )


def pol(name: str, scope: str, namespace: str = "default", action: str = "Allow") -> Authorization:
    return Authorization(name=name, namespace=namespace, scope=scope, action=action)  # type: ignore[arg-type]


def allow_all() -> LoadBalancer:
    return LoadBalancer(health_policy="AllowAll")


def state(*items: Workload | Service | Authorization, node: str | None = None) -> ProxyState:
    return ProxyState.from_snapshot(
        StateSnapshot(
            workloads=tuple(i for i in items if isinstance(i, Workload)),
            services=tuple(i for i in items if isinstance(i, Service)),
            policies=tuple(i for i in items if isinstance(i, Authorization)),
        ),
        node,
    )


EXAMPLE_KEY = "default/example.com"
A = wl("c//v1/Pod/default/a", "10.0.0.1", services={EXAMPLE_KEY: {80: 8080}})
B = wl("c//v1/Pod/default/b", "10.0.0.2", services={EXAMPLE_KEY: {80: 9090}})
EXAMPLE = svc("example.com", "/10.96.0.1", ports={80: 8080})


# --- indexes after a snapshot ----------------------------------------------------------------


def test_snapshot_indexes_workloads_by_uid_ip_and_identity() -> None:
    s = state(A, B)
    assert s.workload_by_uid(A.uid) == A
    assert s.workload_by_ip("", "10.0.0.2") == B
    assert s.workload_by_ip("other", "10.0.0.2") is None
    assert {w.uid for w in s.workloads_by_identity(A.identity())} == {A.uid, B.uid}
    assert s.num_workloads == 2


def test_host_network_workloads_are_not_indexed_by_ip() -> None:
    host = wl("c//v1/Pod/default/h", "10.0.0.9", network_mode="HostNetwork")
    s = state(host)
    assert s.workload_by_uid(host.uid) == host
    assert s.workload_by_ip("", "10.0.0.9") is None


def test_snapshot_indexes_services_and_endpoints() -> None:
    s = state(A, B, EXAMPLE)
    assert s.service_by_key(EXAMPLE_KEY) == EXAMPLE
    assert s.services_by_vip("", "10.96.0.1") == (EXAMPLE,)
    assert s.services_by_hostname("example.com") == (EXAMPLE,)
    assert dict(s.endpoints(EXAMPLE_KEY)) == {
        A.uid: Endpoint(workload_uid=A.uid, port={80: 8080}),
        B.uid: Endpoint(workload_uid=B.uid, port={80: 9090}),
    }
    assert s.staged_services() == {}
    assert s.services_for_workload(A) == (EXAMPLE,)
    assert (s.num_services, s.num_vips, s.num_staged_services) == (1, 1, 0)


def test_endpoints_of_unknown_services_are_staged() -> None:
    s = state(A)
    assert s.endpoints(EXAMPLE_KEY) == {}
    assert dict(s.staged_services()[EXAMPLE_KEY]) == {
        A.uid: Endpoint(workload_uid=A.uid, port={80: 8080})
    }
    assert s.services_for_workload(A) == ()
    assert s.num_staged_services == 1


def test_snapshot_round_trips() -> None:
    p = pol("p", "Global")
    s = state(A, B, EXAMPLE, p)
    again = ProxyState.from_snapshot(s.to_snapshot())
    assert again.to_snapshot() == s.to_snapshot()


def test_results_are_read_only() -> None:
    s = state(A, EXAMPLE)
    with pytest.raises(TypeError):
        s.endpoints(EXAMPLE_KEY)["x"] = Endpoint(workload_uid="x")  # type: ignore[index]


# --- apply ----------------------------------------------------------------------------------


def test_apply_never_mutates_the_old_state() -> None:
    old = state(A, EXAMPLE, pol("p", "Namespace"))
    before = old.to_snapshot()
    new = old.apply(
        StateDelta(
            workloads=(B, replace(A, workload_ips=("10.0.0.7",))),
            services=(replace(EXAMPLE, vips=()),),
            removed_policies=("default/p",),
        )
    )
    assert old.to_snapshot() == before
    assert old.workload_by_ip("", "10.0.0.1") == A
    assert set(old.endpoints(EXAMPLE_KEY)) == {A.uid}
    assert old.services_by_vip("", "10.96.0.1") == (EXAMPLE,)
    assert old.policy_by_key("default/p") is not None
    assert new.workload_by_ip("", "10.0.0.1") is None
    assert set(new.endpoints(EXAMPLE_KEY)) == {A.uid, B.uid}
    assert new.policy_by_key("default/p") is None


def test_empty_delta_returns_the_same_state() -> None:
    s = state(A)
    assert s.apply(StateDelta()) is s


def test_workload_replace_moves_its_ip_and_memberships() -> None:
    s = state(A, EXAMPLE)
    moved = replace(A, workload_ips=("10.0.0.5",), services={"default/other.com": {1: 2}})
    s = s.apply(StateDelta(workloads=(moved,)))
    assert s.workload_by_ip("", "10.0.0.1") is None
    assert s.workload_by_ip("", "10.0.0.5") == moved
    assert s.endpoints(EXAMPLE_KEY) == {}
    assert set(s.staged_services()) == {"default/other.com"}


def test_workload_removal_drops_its_endpoints_and_staged_entries() -> None:
    s = state(A, B, EXAMPLE, wl("c//v1/Pod/default/c", "10.0.0.3", services={"ns/x": {1: 1}}))
    s = s.apply(StateDelta(removed_workloads=(A.uid, "c//v1/Pod/default/c", "unknown")))
    assert set(s.endpoints(EXAMPLE_KEY)) == {B.uid}
    assert s.staged_services() == {}
    assert s.workload_by_uid(A.uid) is None
    assert s.workload_by_ip("", "10.0.0.1") is None
    assert {w.uid for w in s.workloads_by_identity(A.identity())} == {B.uid}


def test_staged_endpoints_are_promoted_when_the_service_arrives() -> None:
    s = state(A, B)
    s = s.apply(StateDelta(services=(EXAMPLE,)))
    assert set(s.endpoints(EXAMPLE_KEY)) == {A.uid, B.uid}
    assert s.staged_services() == {}


def test_service_replace_keeps_endpoints_and_reindexes_vips() -> None:
    s = state(A, EXAMPLE)
    moved = replace(EXAMPLE, vips=(NetworkAddress(address="10.96.0.2"),))
    s = s.apply(StateDelta(services=(moved,)))
    assert s.services_by_vip("", "10.96.0.1") == ()
    assert s.services_by_vip("", "10.96.0.2") == (moved,)
    assert set(s.endpoints(EXAMPLE_KEY)) == {A.uid}


def test_service_removal_clears_indexes_and_stages_its_endpoints() -> None:
    s = state(A, EXAMPLE).apply(StateDelta(removed_services=(EXAMPLE_KEY, "ns/unknown")))
    assert s.service_by_key(EXAMPLE_KEY) is None
    assert s.services_by_vip("", "10.96.0.1") == ()
    assert s.services_by_hostname("example.com") == ()
    assert s.endpoints(EXAMPLE_KEY) == {}
    assert set(s.staged_services()[EXAMPLE_KEY]) == {A.uid}


def test_upsert_and_remove_in_one_delta_removes() -> None:
    s = state().apply(StateDelta(workloads=(A,), removed_workloads=(A.uid,)))
    assert s.workload_by_uid(A.uid) is None
    assert s.staged_services() == {}


@pytest.mark.parametrize(
    ("status", "lb", "included"),
    [
        ("Healthy", None, True),
        ("Unhealthy", None, False),
        ("Unhealthy", LoadBalancer(), False),
        ("Unhealthy", LoadBalancer(health_policy="AllowAll"), True),
        ("Healthy", LoadBalancer(health_policy="AllowAll"), True),
    ],
)
def test_health_filter(status: str, lb: LoadBalancer | None, included: bool) -> None:
    w = replace(A, status=status)
    service = replace(EXAMPLE, load_balancer=lb)
    expected = {A.uid} if included else set()
    staged_first = state(w).apply(StateDelta(services=(service,)))
    service_first = state(service).apply(StateDelta(workloads=(w,)))
    assert set(staged_first.endpoints(EXAMPLE_KEY)) == expected
    assert set(service_first.endpoints(EXAMPLE_KEY)) == expected
    assert set(staged_first.staged_services()) == set()


def test_health_policy_change_refilters_endpoints() -> None:
    sick = replace(A, status="Unhealthy")
    s = state(sick, B, EXAMPLE)
    assert set(s.endpoints(EXAMPLE_KEY)) == {B.uid}
    s = s.apply(StateDelta(services=(replace(EXAMPLE, load_balancer=allow_all()),)))
    assert set(s.endpoints(EXAMPLE_KEY)) == {A.uid, B.uid}
    s = s.apply(StateDelta(services=(EXAMPLE,)))
    assert set(s.endpoints(EXAMPLE_KEY)) == {B.uid}


def test_workload_turning_unhealthy_leaves_the_endpoints() -> None:
    s = state(A, B, EXAMPLE).apply(StateDelta(workloads=(replace(A, status="Unhealthy"),)))
    assert set(s.endpoints(EXAMPLE_KEY)) == {B.uid}


def test_policy_upsert_replace_and_remove() -> None:
    s = state(pol("p", "Namespace"))
    s = s.apply(StateDelta(policies=(pol("p", "Namespace", action="Deny"),)))
    assert s.policy_by_key("default/p").action == "Deny"  # type: ignore[union-attr]
    assert s.num_policies == 1
    s = s.apply(StateDelta(removed_policies=("default/p", "default/none")))
    assert s.num_policies == 0
    assert s.policies_for_workload(A) == ()


# --- workload lookups -----------------------------------------------------------------------


# Istio workload uids are cluster/group/kind/namespace/name, so pods read "c//Pod/ns/name"
# (upstream's `WorkloadByAddr::get` tests for "//Pod/").
@pytest.mark.parametrize(
    ("first", "second", "winner"),
    [
        (("c//Pod/ns/a", "TCP"), ("c//Pod/ns/b", "TCP"), 1),  # tie: newest
        (("c//Pod/ns/a", "HBONE"), ("c//Pod/ns/b", "TCP"), 0),  # HBONE
        (("c//Pod/ns/a", "TCP"), ("c/networking.istio.io/WorkloadEntry/ns/b", "HBONE"), 0),
        (("c/networking.istio.io/WorkloadEntry/ns/a", "TCP"), ("c//Pod/ns/b", "TCP"), 1),
    ],
)
def test_workload_by_ip_conflict_prefers_pods_then_hbone_then_newest(
    first: tuple[str, str], second: tuple[str, str], winner: int
) -> None:
    ws = [wl(uid, "10.0.0.1", protocol=proto) for uid, proto in (first, second)]
    s = state(*ws)
    assert s.workload_by_ip("", "10.0.0.1") == ws[winner]
    assert s.workloads_by_ip("", "10.0.0.1") == tuple(ws)


@pytest.mark.parametrize(
    ("local_node", "workload_node", "found"),
    [
        (None, "node1", True),
        (None, "", True),
        ("node1", "node1", True),
        ("node1", "node2", False),
        ("node1", "", False),
    ],
)
def test_find_by_info_only_sees_local_node(
    local_node: str | None, workload_node: str, found: bool
) -> None:
    w = wl("c//v1/Pod/default/a", "10.0.0.1", node=workload_node, service_account="sa")
    s = state(w, node=local_node)
    assert (s.find_by_info("a", "default", "sa") == w) is found
    assert s.find_by_info("a", "default", "other") is None
    assert s.find_by_info("b", "default", "sa") is None


def test_find_by_info_follows_node_changes_and_removal() -> None:
    w = wl("c//v1/Pod/default/a", "10.0.0.1", node="node1")
    s = state(w, node="node1")
    s = s.apply(StateDelta(workloads=(replace(w, node="node2"),)))
    assert s.find_by_info("a", "default", "default") is None
    s = s.apply(StateDelta(workloads=(w,)))
    assert s.find_by_info("a", "default", "default") == w
    s = s.apply(StateDelta(removed_workloads=(w.uid,)))
    assert s.find_by_info("a", "default", "default") is None


def test_has_local_workload_with_identity() -> None:
    s = state(A, replace(B, node="node2", service_account="b"), node="node1")
    assert s.has_local_workload_with_identity(A.identity())
    assert not s.has_local_workload_with_identity(replace(B, service_account="b").identity())


# --- service choice by VIP ------------------------------------------------------------------


def _vip_case(*specs: tuple[str, str, bool, str]) -> ProxyState:
    """specs: (hostname, namespace, canonical, visibility) sharing VIP 10.96.0.1."""
    return state(
        *(
            svc(h, "/10.96.0.1", namespace=ns, canonical=c, visibility=vis)
            for h, ns, c, vis in specs
        )
    )


@pytest.mark.parametrize(
    ("specs", "client_ns", "want"),
    [
        ([("a", "ns1", False, "Public")], None, "ns1/a"),
        ([("a", "ns1", False, "Public"), ("b", "ns2", False, "Public")], "ns2", "ns2/b"),
        ([("a", "ns1", False, "Public"), ("b", "ns2", False, "Public")], "ns3", "ns1/a"),
        ([("a", "ns1", False, "Public"), ("b", "ns2", True, "Public")], "ns3", "ns2/b"),
        ([("a", "ns1", False, "Public"), ("b", "ns2", True, "Public")], "ns1", "ns1/a"),
        ([("a", "ns1", True, "Public"), ("b", "ns2", True, "Public")], "ns3", "ns2/b"),
        ([("a", "ns1", False, "Namespace"), ("b", "ns2", False, "Public")], "ns3", "ns2/b"),
        ([("a", "ns1", True, "Namespace"), ("b", "ns2", False, "Public")], "ns3", "ns2/b"),
        ([("a", "ns1", True, "Namespace"), ("b", "ns2", False, "Public")], "ns1", "ns1/a"),
        ([("a", "ns1", True, "Namespace"), ("b", "ns2", False, "Public")], None, "ns1/a"),
        ([("a", "ns1", False, "Namespace")], "ns2", None),
    ],
)
def test_best_service_by_vip(
    specs: list[tuple[str, str, bool, str]], client_ns: str | None, want: str | None
) -> None:
    best = _vip_case(*specs).best_service_by_vip("", "10.96.0.1", client_ns)
    assert (best.key() if best else None) == want


def test_best_service_by_vip_misses_other_networks() -> None:
    s = state(svc("a", "net1/10.96.0.1"))
    assert s.best_service_by_vip("net2", "10.96.0.1", None) is None
    assert s.best_service_by_vip("net1", "10.96.0.1", None) is not None


def _cidr_svc(host: str, ns: str, *cidrs: str, canonical: bool = False, **kw: Any) -> Service:
    nets = tuple(NetworkCidr(network=kw.pop("network", ""), cidr=c) for c in cidrs)
    return svc(host, namespace=ns, cidr_vips=nets, canonical=canonical, **kw)


@pytest.mark.parametrize(
    ("services", "ip", "client_ns", "want"),
    [
        ([_cidr_svc("a", "ns1", "10.0.0.0/8")], "10.1.2.3", None, "ns1/a"),
        ([_cidr_svc("a", "ns1", "10.0.0.0/8")], "11.1.2.3", None, None),
        (
            [_cidr_svc("a", "ns1", "10.0.0.0/8"), _cidr_svc("b", "ns1", "10.1.0.0/16")],
            "10.1.2.3",
            None,
            "ns1/b",
        ),
        (
            [_cidr_svc("b", "ns1", "10.1.0.0/16"), _cidr_svc("a", "ns1", "10.0.0.0/8")],
            "10.2.0.1",
            None,
            "ns1/a",
        ),
        (
            [_cidr_svc("a", "ns1", "10.0.0.0/8"), _cidr_svc("b", "ns2", "10.1.0.0/16")],
            "10.1.2.3",
            "ns1",
            "ns1/a",
        ),
        (
            [
                _cidr_svc("a", "ns1", "10.0.0.0/8"),
                _cidr_svc("b", "ns2", "10.0.0.0/8", canonical=True),
            ],
            "10.1.2.3",
            "ns3",
            "ns2/b",
        ),
        (
            [_cidr_svc("a", "ns1", "10.0.0.0/8"), _cidr_svc("b", "ns2", "10.0.0.0/8")],
            "10.1.2.3",
            "ns3",
            "ns1/a",
        ),
        ([_cidr_svc("a", "ns1", "10.0.0.0/8", visibility="Namespace")], "10.1.2.3", "ns2", None),
        ([_cidr_svc("a", "ns1", "10.0.0.0/8", network="net1")], "10.1.2.3", None, None),
        ([_cidr_svc("a", "ns1", "2001:db8::/32")], "2001:db8::1", None, "ns1/a"),
        ([_cidr_svc("a", "ns1", "0.0.0.0/0")], "2001:db8::1", None, None),
        (
            [_cidr_svc("a", "ns1", "10.0.0.0/8"), svc("b", "/10.1.2.3", namespace="ns2")],
            "10.1.2.3",
            "ns1",
            "ns2/b",
        ),
        (
            [
                _cidr_svc("a", "ns1", "10.0.0.0/8"),
                svc("b", "/10.1.2.3", namespace="ns2", visibility="Namespace"),
            ],
            "10.1.2.3",
            "ns1",
            "ns1/a",
        ),
    ],
)
def test_best_service_by_cidr_vip(
    services: list[Service], ip: str, client_ns: str | None, want: str | None
) -> None:
    best = state(*services).best_service_by_vip("", ip, client_ns)
    assert (best.key() if best else None) == want


def test_removing_a_cidr_service_removes_its_ranges() -> None:
    a = _cidr_svc("a", "ns1", "10.0.0.0/8")
    s = state(a).apply(StateDelta(removed_services=(a.key(),)))
    assert s.best_service_by_vip("", "10.1.2.3", None) is None
    s = s.apply(StateDelta(services=(a, replace(a, cidr_vips=()))))
    assert s.best_service_by_vip("", "10.1.2.3", None) is None


def test_best_service_by_hostname_applies_visibility_and_namespace() -> None:
    s = state(
        svc("h", namespace="ns1", visibility="Namespace"),
        svc("h", namespace="ns2"),
        svc("h", namespace="ns3", canonical=True),
    )
    assert len(s.services_by_hostname("h")) == 3
    assert s.best_service_by_hostname("h", "ns1").key() == "ns1/h"  # type: ignore[union-attr]
    assert s.best_service_by_hostname("h", "ns4").key() == "ns3/h"  # type: ignore[union-attr]
    assert s.best_service_by_hostname("nope", None) is None


# --- policy selection -----------------------------------------------------------------------


def test_policies_for_workload_by_scope() -> None:
    w = replace(A, authorization_policies=("default/sel", "default/missing", "default/ns"))
    s = state(
        pol("ns", "Namespace"),
        pol("other-ns", "Namespace", namespace="other"),
        pol("global", "Global", namespace="istio-system"),
        pol("sel", "WorkloadSelector"),
        pol("sel-unlisted", "WorkloadSelector"),
    )
    keys = [p.key() for p in s.policies_for_workload(w)]
    assert sorted(keys) == ["default/ns", "default/sel", "istio-system/global"]


@pytest.mark.parametrize(
    ("scope", "applies"),
    [("Namespace", True), ("Global", True), ("WorkloadSelector", False)],
)
def test_policy_moving_between_scopes(scope: str, applies: bool) -> None:
    start = "WorkloadSelector" if scope != "WorkloadSelector" else "Namespace"
    s = state(pol("p", start, namespace="default"))
    s = s.apply(StateDelta(policies=(pol("p", scope),)))
    assert bool(s.policies_for_workload(A)) is applies
    other_ns = replace(A, namespace="other")
    assert bool(s.policies_for_workload(other_ns)) is (scope == "Global")


# --- random delta sequences equal a snapshot of the final contents --------------------------

UIDS = [f"c//v1/Pod/ns{i % 2}/w{i}" for i in range(4)]
KEYS = ["ns0/h0", "ns0/h1", "ns1/h0", "ns1/h1"]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
VIPS = ["10.96.0.1", "10.96.0.2"]
POLICY_KEYS = ["ns0/p0", "ns0/p1", "ns1/p0"]

workloads_st = st.builds(
    lambda i, ips, mode, node, sa, status, svcs, pols, proto: Workload(
        uid=UIDS[i],
        name=f"w{i}",
        namespace=f"ns{i % 2}",
        workload_ips=tuple(ips),
        network_mode=mode,
        node=node,
        service_account=sa,
        status=status,
        services={k: {80: 8000 + n} for n, k in enumerate(svcs)},
        authorization_policies=tuple(pols),
        protocol=proto,
    ),
    st.integers(0, len(UIDS) - 1),
    st.lists(st.sampled_from(IPS), max_size=2, unique=True),
    st.sampled_from(["Standard", "HostNetwork"]),
    st.sampled_from(["n0", "n1"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["Healthy", "Unhealthy"]),
    st.lists(st.sampled_from(KEYS), max_size=3, unique=True),
    st.lists(st.sampled_from(POLICY_KEYS), max_size=2),
    st.sampled_from(["TCP", "HBONE"]),
)
services_st = st.builds(
    lambda key, vips, cidrs, canonical, lb, vis: Service(
        name=key.split("/")[1],
        namespace=key.split("/")[0],
        hostname=key.split("/")[1],
        vips=tuple(NetworkAddress(address=v) for v in vips),
        cidr_vips=tuple(NetworkCidr(cidr=c) for c in cidrs),
        canonical=canonical,
        load_balancer=lb,
        visibility=vis,
    ),
    st.sampled_from(KEYS),
    st.lists(st.sampled_from(VIPS), max_size=2, unique=True),
    st.lists(st.sampled_from(["10.96.0.0/16", "10.96.0.0/24"]), max_size=1),
    st.booleans(),
    st.sampled_from([None, LoadBalancer(), allow_all()]),
    st.sampled_from(["Public", "Namespace"]),
)
policies_st = st.builds(
    lambda key, scope: pol(key.split("/")[1], scope, namespace=key.split("/")[0]),
    st.sampled_from(POLICY_KEYS),
    st.sampled_from(["Global", "Namespace", "WorkloadSelector"]),
)
deltas_st = st.builds(
    StateDelta,
    workloads=st.lists(workloads_st, max_size=3).map(tuple),
    services=st.lists(services_st, max_size=2).map(tuple),
    policies=st.lists(policies_st, max_size=2).map(tuple),
    removed_workloads=st.lists(st.sampled_from(UIDS), max_size=2).map(tuple),
    removed_services=st.lists(st.sampled_from(KEYS), max_size=1).map(tuple),
    removed_policies=st.lists(st.sampled_from(POLICY_KEYS), max_size=1).map(tuple),
)


def _view(s: ProxyState) -> dict[str, Any]:
    """Everything observable through queries, order-insensitive."""
    snap = s.to_snapshot()
    hosts = {k.split("/")[1] for k in KEYS}
    return {
        "workloads": {w.uid: w for w in snap.workloads},
        "services": {v.key(): v for v in snap.services},
        "policies": {p.key(): p for p in snap.policies},
        "by_ip": {ip: [w.uid for w in s.workloads_by_ip("", ip)] for ip in IPS},
        "best_by_ip": {ip: s.workload_by_ip("", ip) for ip in IPS},
        "by_vip": {v: [x.key() for x in s.services_by_vip("", v)] for v in VIPS},
        "best_by_vip": {
            (v, ns): s.best_service_by_vip("", v, ns) for v in VIPS for ns in (None, "ns0", "ns1")
        },
        "by_host": {h: sorted(x.key() for x in s.services_by_hostname(h)) for h in hosts},
        "endpoints": {k: dict(s.endpoints(k)) for k in KEYS},
        "staged": {k: dict(v) for k, v in s.staged_services().items()},
        "identity": {
            i: sorted(w.uid for w in s.workloads_by_identity(i))
            for i in {w.identity() for w in snap.workloads}
        },
        "info": {
            (f"w{n}", f"ns{n % 2}", sa): s.find_by_info(f"w{n}", f"ns{n % 2}", sa)
            for n in range(len(UIDS))
            for sa in ("a", "b")
        },
        "policies_for": {
            w.uid: sorted(p.key() for p in s.policies_for_workload(w)) for w in snap.workloads
        },
        "cidr": {ns: s.best_service_by_vip("", "10.96.5.5", ns) for ns in (None, "ns0", "ns1")},
        "counts": (
            s.num_workloads,
            s.num_services,
            s.num_policies,
            s.num_vips,
            s.num_staged_services,
        ),
    }


def _reference_apply(ref: dict[str, dict[str, Any]], d: StateDelta) -> None:
    """Plain dicts; an upsert moves the entry last, as `ProxyState.to_snapshot` orders them."""
    for w in d.workloads:
        ref["w"].pop(w.uid, None)
        ref["w"][w.uid] = w
    for v in d.services:
        ref["s"].pop(v.key(), None)
        ref["s"][v.key()] = v
    for p in d.policies:
        ref["p"].pop(p.key(), None)
        ref["p"][p.key()] = p
    for uid in d.removed_workloads:
        ref["w"].pop(uid, None)
    for key in d.removed_services:
        ref["s"].pop(key, None)
    for key in d.removed_policies:
        ref["p"].pop(key, None)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(deltas_st, max_size=8))
def test_random_deltas_equal_snapshot_of_final_contents(deltas: list[StateDelta]) -> None:
    ref: dict[str, dict[str, Any]] = {"w": {}, "s": {}, "p": {}}
    s = ProxyState.empty("n0")
    history = [(s, _view(s))]
    for d in deltas:
        s = s.apply(d)
        _reference_apply(ref, d)
        history.append((s, _view(s)))
    final = StateSnapshot(
        workloads=tuple(ref["w"].values()),
        services=tuple(ref["s"].values()),
        policies=tuple(ref["p"].values()),
    )
    assert _view(s) == _view(ProxyState.from_snapshot(final, "n0"))
    assert _view(s) == _view(ProxyState.from_snapshot(s.to_snapshot(), "n0"))
    # Copy-on-write: every intermediate state still answers as it did when it was made.
    for old, seen in history:
        assert _view(old) == seen


# --- cost of building a large state (printed, never asserted) --------------------------------


def test_from_snapshot_cost_of_10k_workloads_and_2k_services() -> None:
    services = tuple(
        svc(f"s{i}.ns{i % 50}.svc", f"/10.96.{i // 250}.{i % 250}", namespace=f"ns{i % 50}")
        for i in range(2000)
    )
    workloads = tuple(
        wl(
            f"c//v1/Pod/ns{i % 50}/p{i}",
            f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
            namespace=f"ns{i % 50}",
            node=f"n{i % 20}",
            services={services[i % 2000].key(): {80: 8080}},
        )
        for i in range(10000)
    )
    snap = StateSnapshot(workloads=workloads, services=services)
    start = time.perf_counter()
    s = ProxyState.from_snapshot(snap, "n1")
    built = time.perf_counter()
    s.apply(StateDelta(workloads=(replace(workloads[0], status="Unhealthy"),)))
    done = time.perf_counter()
    print(
        f"from_snapshot(10k workloads, 2k services): {(built - start) * 1e3:.1f} ms; "
        f"one-workload apply: {(done - built) * 1e6:.0f} us"
    )
    assert s.num_workloads == 10000
