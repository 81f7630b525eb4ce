"""DNS proxy decisions (`ztunnel.core.dns`) and the worker's query path (`workers.dns`).

Tables ported from upstream `src/dns/server.rs` tests (`test_to_kube_fqdns`,
`test_get_wildcards`, `lookup`, `search_domains`) and `src/dns/name_util.rs`, plus the wire
rules of `src/dns/handler.rs` and hardening §4.7 (bad packets).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Coroutine
from typing import Any

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.dns import DNSServer, Forwarder, Nameserver, bind_hosts
from workers.metrics import WorkerMetrics
from workers.tasks import TaskSet
from ztunnel.core import dns as core
from ztunnel.core.config import Config
from ztunnel.core.model import NetworkAddress, Service, StateDelta, StateSnapshot, Workload
from ztunnel.core.state import ProxyState

pytestmark = pytest.mark.timeout(60)

NS1, NS2, NS3, PREFERRED = "ns1", "ns2", "ns3", "preferred-ns"
NW1, NW2 = "nw1", "nw2"
DOMAIN = "cluster.local"
K8S_SEARCH = ("ns1.svc.cluster.local", "svc.cluster.local", "cluster.local")


# --- fixtures: upstream's `state()` -----------------------------------------------------------


def na(network: str, address: str) -> NetworkAddress:
    return NetworkAddress(network=network, address=address)


def kube(name: str, ns: str) -> str:
    return f"{name}.{ns}.svc.{DOMAIN}"


def service(name: str, ns: str, *vips: NetworkAddress, **kw: Any) -> Service:
    kw.setdefault("hostname", kube(name, ns))
    return Service(name=name, namespace=ns, vips=vips, ports={80: 80}, **kw)


def external(host: str, *vips: NetworkAddress, ns: str = NS1, **kw: Any) -> Service:
    return service(host, ns, *vips, hostname=host, **kw)


def workload(name: str, ns: str, *ips: str, services: tuple[str, ...] = ()) -> Workload:
    return Workload(
        uid=name,
        name=name,
        namespace=ns,
        network=NW1,
        workload_ips=ips,
        trust_domain=DOMAIN,
        canonical_name=name,
        canonical_revision="v1",
        services={s: {80: 80} for s in services},
    )


CLIENT = workload("client", NS1, "10.0.0.1")

SERVICES = (
    external("www.google.com", na(NW1, "1.1.1.1")),
    service("productpage", NS1, na(NW1, "9.9.9.9")),
    service("example", NS2, na(NW1, "10.10.10.10")),
    service("nslocal", NS2, na(NW1, "10.10.10.240"), visibility="Namespace"),
    service("nslocalsame", NS1, na(NW1, "10.10.10.241"), visibility="Namespace"),
    external("everywhere.io", na(NW1, "10.10.10.110"), ns=NS2),
    external("preferred.io", na(NW1, "10.10.10.210"), ns=NS2),
    external("everywhere.io", na(NW1, "10.10.10.111"), ns=PREFERRED),
    external("preferred.io", na(NW1, "10.10.10.211"), ns=PREFERRED),
    external("everywhere.io", na(NW1, "10.10.10.112"), ns=NS1),
    external("canonical.svc", na(NW1, "10.10.10.140"), ns=NS2),
    external("canonical.svc", na(NW1, "10.10.10.141"), ns=NS3, canonical=True),
    external("canonical.with.local", na(NW1, "10.10.10.150"), ns=NS1),
    external("canonical.with.local", na(NW1, "10.10.10.151"), ns=NS2, canonical=True),
    service(
        "details",
        NS2,
        *(na(NW1, f"{i}.{i}.{i}.{i}") for i in (11, 12, 13, 14)),
        hostname="details.ns2.svc.cluster.remote",
    ),
    external("ipv4.localhost", na(NW1, "2.2.2.2")),
    external("ipv6.localhost", na(NW1, "2001:db8::ff00:42:8329")),
    external("dual.localhost", na(NW1, "2.2.2.2"), na(NW1, "2001:db8::ff00:42:8329")),
    external("*.wildcard", na(NW1, "10.10.10.10")),
    external("*.b.wildcard", na(NW1, "11.11.11.11")),
    external("*.svc.mesh.company.net", na(NW1, "10.1.2.3")),
    service("nw2-only", NS1, na(NW2, "20.20.20.20")),
    service("both-networks", NS1, na(NW1, "21.21.21.21"), na(NW2, "22.22.22.22")),
    service("headless", NS1),
    external("headless.example.com"),
    external("headless-no-endpoints.example.com"),
    service("headless-ipv6", NS1, ip_families="IPv6"),
    service("headless-ipv4", NS1, ip_families="IPv4"),
)

WORKLOADS = (
    CLIENT,
    workload(
        "headless0", NS1, "30.30.30.30", "2001:db8::30", services=(f"ns1/{kube('headless', NS1)}",)
    ),
    workload(
        "headless1", NS1, "31.31.31.31", "2001:db8::31", services=(f"ns1/{kube('headless', NS1)}",)
    ),
    workload(
        "headless-external",
        NS1,
        "32.32.32.32",
        "2001:db8::32",
        services=("ns1/headless.example.com",),
    ),
    workload(
        "headless2",
        NS1,
        "33.33.33.33",
        "2001:db8::33",
        services=(f"ns1/{kube('headless-ipv6', NS1)}", f"ns1/{kube('headless-ipv4', NS1)}"),
    ),
)

STATE = ProxyState.from_snapshot(StateSnapshot(workloads=WORKLOADS, services=SERVICES))
SETTINGS = core.Settings(cluster_domain=DOMAIN, preferred_namespace=PREFERRED)


def query_wire(
    name: str,
    rdtype: str = "A",
    *,
    edns: int = -1,
    payload: int = 1232,
    do: bool = False,
    qid: int = 4242,
) -> bytes:
    q = dns.message.make_query(name, rdtype, use_edns=edns, payload=payload, want_dnssec=do)
    q.id = qid
    return q.to_wire()


def parse(wire: bytes, *, tcp: bool = False) -> core.Query:
    parsed = core.parse_query(wire, tcp=tcp)
    assert isinstance(parsed, core.Query)
    return parsed


def decide(
    name: str,
    rdtype: str = "A",
    *,
    client: Workload | None = CLIENT,
    state: ProxyState = STATE,
    cfg: core.Settings = SETTINGS,
) -> core.Decision:
    return core.answer(parse(query_wire(name, rdtype)), client, state, cfg, random.Random(7))


def records(decision: core.Decision) -> list[tuple[str, str, str]]:
    """(owner, type, data) of the answer section, CNAME first then sorted like upstream."""
    assert isinstance(decision, core.Answer)
    msg = dns.message.from_wire(decision.render(core.MAX_MESSAGE))
    out = [
        (rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype), rd.to_text())
        for rrset in msg.answer
        for rd in rrset
    ]
    return sorted(out, key=lambda r: (r[1] != "CNAME", r))


# --- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("name", ["name.ns1.svc.cluster.local"]),
        ("name.ns2", ["name.ns2.svc.cluster.local", "name.ns2.ns1.svc.cluster.local"]),
        ("name.ns2.svc", ["name.ns2.svc.cluster.local", "name.ns2.svc.svc.cluster.local"]),
        ("name.ns2.not-svc", ["name.ns2.not-svc.svc.cluster.local"]),
        ("pod.sub-domain.ns.svc", ["pod.sub-domain.ns.svc.cluster.local"]),
        ("pod.sub-domain.ns.not-svc", []),
        ("name.ns2.svc.cluster", []),
        ("name.ns2.svc.cluster.local", []),
        ("www.google.com", ["www.google.com.svc.cluster.local"]),
        ("", []),
    ],
)
def test_kube_fqdns_expand_only_the_forms_the_name_allows(host: str, expected: list[str]) -> None:
    assert core.kube_fqdns(host, NS1, DOMAIN) == expected


def test_mesh_name_lowercases_and_drops_the_root() -> None:
    assert core.mesh_name(dns.name.from_text("ProductPage.NS1.")) == "productpage.ns1"
    assert core.mesh_name(dns.name.root) == ""
    assert core.mesh_name(dns.name.from_text("*.wildcard.")) == "*.wildcard"


@pytest.mark.parametrize("text", ["a\\.b.c.", "bad\\000.name.", "sp\\032ace.x.", "\\@.x."])
def test_names_with_non_hostname_labels_are_not_mesh_names(text: str) -> None:
    assert core.mesh_name(dns.name.from_text(text)) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("svc1", ["svc1"]),
        (
            "svc1.ns1.svc.cluster.local",
            [
                "svc1.ns1.svc.cluster.local",
                "*.ns1.svc.cluster.local",
                "*.svc.cluster.local",
                "*.cluster.local",
                "*.local",
            ],
        ),
    ],
)
def test_wildcards_go_from_exact_to_least_specific(name: str, expected: list[str]) -> None:
    assert core.wildcards(name) == expected


@pytest.mark.parametrize(
    ("name", "domain", "has", "trimmed"),
    [
        ("name.ns.svc.cluster.local", "svc.cluster.local", True, "name.ns"),
        ("name.ns.a.different.domain", "svc.cluster.local", False, None),
        ("cluster.com", "svc.cluster.local", False, None),
        ("svc.cluster.local", "svc.cluster.local", False, None),  # nothing would be left
        ("x.svc.cluster.local", "*.cluster.local", False, None),  # wildcards are no domain
        ("xsvc.cluster.local", "svc.cluster.local", False, None),  # label boundary
    ],
)
def test_has_and_trim_domain(name: str, domain: str, has: bool, trimmed: str | None) -> None:
    assert core.has_domain(name, domain) is has
    assert core.trim_domain(name, domain) == trimmed


def test_search_domains_shared_mode_are_the_pods_kubernetes_list() -> None:
    got = core.search_domains("shared", "default-ns", DOMAIN, ("istio-system.svc.cluster.local",))
    assert got == ("default-ns.svc.cluster.local", "svc.cluster.local", "cluster.local")


def test_search_domains_dedicated_mode_come_from_resolv_conf() -> None:
    assert core.search_domains("dedicated", "ns1", DOMAIN, ("corp.example", "x")) == (
        "corp.example",
        "x",
    )


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        (
            "productpage",
            [("productpage", None), ("productpage.ns1.svc.cluster.local", None)],
        ),
        (
            "productpage.ns1.ns1.svc.cluster.local",
            [
                ("productpage.ns1.ns1.svc.cluster.local", None),
                ("productpage.ns1", "productpage.ns1"),
                ("productpage.ns1.svc.cluster.local", "productpage.ns1"),
                ("productpage.ns1.ns1", "productpage.ns1.ns1"),
                ("productpage.ns1.ns1.svc", "productpage.ns1.ns1.svc"),
            ],
        ),
        (
            "www.google.com.ns1.svc.cluster.local",
            [
                ("www.google.com.ns1.svc.cluster.local", None),
                ("www.google.com", "www.google.com"),
                ("www.google.com.svc.cluster.local", "www.google.com"),
                ("www.google.com.ns1", "www.google.com.ns1"),
                ("www.google.com.ns1.svc", "www.google.com.ns1.svc"),
            ],
        ),
        # A stripped name's FQDN that repeats an earlier alias keeps the first (unstripped).
        (
            "a.b.svc.cluster.local",
            [
                ("a.b.svc.cluster.local", None),
                ("a.b", "a.b"),
                ("a.b.ns1.svc.cluster.local", "a.b"),
                ("a.b.svc", "a.b.svc"),
                ("a.b.svc.svc.cluster.local", "a.b.svc"),
            ],
        ),
    ],
)
def test_aliases_add_kube_fqdns_then_search_domain_strips(
    host: str, expected: list[tuple[str, str | None]]
) -> None:
    got = core.expand_aliases(host, NS1, DOMAIN, K8S_SEARCH)
    assert [(a.name, a.stripped) for a in got] == expected


# --- service choice ------------------------------------------------------------------------


def test_best_service_prefers_client_namespace_then_canonical_then_preferred_then_first() -> None:
    a, b = external("h", ns="a"), external("h", ns="b")
    canon = external("h", ns="c", canonical=True)
    pref = external("h", ns="p")
    assert core.best_service([a, b], "b", None) is b
    assert core.best_service([a, canon, b], "b", "p") is b
    assert core.best_service([a, canon, pref], "x", "p") is canon
    assert core.best_service([a, pref, canon], "x", "p") is canon
    assert core.best_service([a, pref, b], "x", "p") is pref
    assert core.best_service([a, b], "x", "p") is a
    assert core.best_service([], "x", "p") is None


def test_find_server_skips_services_without_vips_unless_kubernetes_headless() -> None:
    aliases = core.expand_aliases("headless.example.com", NS1, DOMAIN, K8S_SEARCH)
    assert core.find_server(STATE, aliases, CLIENT, None, DOMAIN) is None
    aliases = core.expand_aliases("headless", NS1, DOMAIN, K8S_SEARCH)
    match = core.find_server(STATE, aliases, CLIENT, None, DOMAIN)
    assert match is not None and match.service.hostname == kube("headless", NS1)


def test_find_server_reports_wildcard_matches() -> None:
    aliases = core.expand_aliases("a.b.wildcard", NS1, DOMAIN, K8S_SEARCH)
    match = core.find_server(STATE, aliases, CLIENT, None, DOMAIN)
    assert match is not None and match.name == "*.b.wildcard" and match.wildcard


# --- answers (upstream `lookup` table) -----------------------------------------------------

A, AAAA, CNAME = "A", "AAAA", "CNAME"


@pytest.mark.parametrize(
    ("host", "qtype", "expected"),
    [
        ("www.google.com", A, [("www.google.com.", A, "1.1.1.1")]),
        (
            "www.google.com.ns1.svc.cluster.local.",
            A,
            [
                ("www.google.com.ns1.svc.cluster.local.", CNAME, "www.google.com."),
                ("www.google.com.", A, "1.1.1.1"),
            ],
        ),
        (
            "productpage.ns1.svc.cluster.local.",
            A,
            [("productpage.ns1.svc.cluster.local.", A, "9.9.9.9")],
        ),
        ("productpage.ns1.", A, [("productpage.ns1.", A, "9.9.9.9")]),
        ("productpage.", A, [("productpage.", A, "9.9.9.9")]),
        (
            "productpage.ns1.ns1.svc.cluster.local.",
            A,
            [
                ("productpage.ns1.ns1.svc.cluster.local.", CNAME, "productpage.ns1."),
                ("productpage.ns1.", A, "9.9.9.9"),
            ],
        ),
        ("productpage.ns1.ns1.svc.cluster.local.", AAAA, []),
        ("example.ns2.", A, [("example.ns2.", A, "10.10.10.10")]),
        (
            "example.ns2.svc.cluster.local.",
            A,
            [("example.ns2.svc.cluster.local.", A, "10.10.10.10")],
        ),
        (
            "nslocalsame.ns1.svc.cluster.local.",
            A,
            [("nslocalsame.ns1.svc.cluster.local.", A, "10.10.10.241")],
        ),
        ("example.ns2.svc.", A, [("example.ns2.svc.", A, "10.10.10.10")]),
        (
            "details.ns2.svc.cluster.remote.",
            A,
            [("details.ns2.svc.cluster.remote.", A, f"{i}.{i}.{i}.{i}") for i in (11, 12, 13, 14)],
        ),
        ("dual.localhost.", A, [("dual.localhost.", A, "2.2.2.2")]),
        ("dual.localhost.", AAAA, [("dual.localhost.", AAAA, "2001:db8::ff00:42:8329")]),
        ("ipv6.localhost.", A, []),
        ("ipv4.localhost.", AAAA, []),
        ("foo.wildcard.", A, [("foo.wildcard.", A, "10.10.10.10")]),
        ("a.b.wildcard.", A, [("a.b.wildcard.", A, "11.11.11.11")]),
        ("foo.svc.mesh.company.net.", A, [("foo.svc.mesh.company.net.", A, "10.1.2.3")]),
        (
            "foo.foons.svc.mesh.company.net.",
            A,
            [("foo.foons.svc.mesh.company.net.", A, "10.1.2.3")],
        ),
        (
            "foo.svc.mesh.company.net.ns1.svc.cluster.local.",
            A,
            [("foo.svc.mesh.company.net.ns1.svc.cluster.local.", A, "10.1.2.3")],
        ),
        ("nw2-only.ns1.svc.cluster.local.", A, []),
        (
            "both-networks.ns1.svc.cluster.local.",
            A,
            [("both-networks.ns1.svc.cluster.local.", A, "21.21.21.21")],
        ),
        (
            "headless.ns1.svc.cluster.local.",
            A,
            [
                ("headless.ns1.svc.cluster.local.", A, "30.30.30.30"),
                ("headless.ns1.svc.cluster.local.", A, "31.31.31.31"),
            ],
        ),
        (
            "headless.ns1.svc.cluster.local.",
            AAAA,
            [
                ("headless.ns1.svc.cluster.local.", AAAA, "2001:db8::30"),
                ("headless.ns1.svc.cluster.local.", AAAA, "2001:db8::31"),
            ],
        ),
        (
            "headless-ipv6.ns1.svc.cluster.local.",
            AAAA,
            [("headless-ipv6.ns1.svc.cluster.local.", AAAA, "2001:db8::33")],
        ),
        ("headless-ipv6.ns1.svc.cluster.local.", A, []),
        (
            "headless-ipv4.ns1.svc.cluster.local.",
            A,
            [("headless-ipv4.ns1.svc.cluster.local.", A, "33.33.33.33")],
        ),
        ("headless-ipv4.ns1.svc.cluster.local.", AAAA, []),
        ("preferred.io.", A, [("preferred.io.", A, "10.10.10.211")]),
        ("everywhere.io.", A, [("everywhere.io.", A, "10.10.10.112")]),
        ("canonical.svc", A, [("canonical.svc.", A, "10.10.10.141")]),
        ("canonical.with.local", A, [("canonical.with.local.", A, "10.10.10.150")]),
        ("ProductPage.NS1.", A, [("ProductPage.NS1.", A, "9.9.9.9")]),  # RFC 4343
    ],
)
def test_mesh_answers(host: str, qtype: str, expected: list[tuple[str, str, str]]) -> None:
    decision = decide(host, qtype)
    assert isinstance(decision, core.Answer)
    msg = dns.message.from_wire(decision.render(core.MAX_MESSAGE))
    assert msg.flags & dns.flags.AA and msg.flags & dns.flags.RA
    assert msg.rcode() == dns.rcode.NOERROR  # empty answers are NOERROR, never NXDOMAIN
    assert records(decision) == expected
    assert all(rrset.ttl == core.TTL for rrset in msg.answer)


@pytest.mark.parametrize(
    ("host", "qtype"),
    [
        ("productpage.ns1.", "NS"),  # only A and AAAA are answered locally
        ("productpage.ns1.", "TXT"),
        ("www.bing.com", A),  # unknown host
        ("nslocal.ns2.svc.cluster.local.", A),  # namespace-visible service of another ns
        ("example.", A),  # short name of another namespace
        ("details.ns2.", A),  # a remote-cluster FQDN is not a kube FQDN
        ("headless.pod0.ns1.svc.cluster.local.", A),  # pod names: upstream TODO (#1119)
        ("headless.pod0.ns1.", A),
        ("headless-no-endpoints.example.com", A),  # no VIP, not a Kubernetes service
        ("headless.example.com", A),
        (".", A),
    ],
)
def test_forwarded(host: str, qtype: str) -> None:
    assert decide(host, qtype) is core.FORWARD


def test_non_in_class_queries_are_forwarded() -> None:
    q = dns.message.make_query("productpage.ns1.", "A", rdclass="CH")
    assert core.answer(parse(q.to_wire()), CLIENT, STATE, SETTINGS, random.Random()) is core.FORWARD


def test_results_name_why_an_answer_is_empty() -> None:
    for host, qtype, result in [
        ("productpage.", A, "success"),
        ("ipv6.localhost.", A, "no records"),
        ("nw2-only.ns1.svc.cluster.local.", A, "no records"),
        ("headless-ipv6.ns1.svc.cluster.local.", A, "service does not support this record type"),
    ]:
        decision = decide(host, qtype)
        assert isinstance(decision, core.Answer) and decision.result == result, host


def test_aaaa_needs_ipv6_enabled() -> None:
    no_v6 = core.Settings(cluster_domain=DOMAIN, ipv6_enabled=False)
    decision = decide("dual.localhost.", AAAA, cfg=no_v6)
    assert records(decision) == []
    assert isinstance(decision, core.Answer)
    assert decision.result == "service does not support this record type"
    assert records(decide("dual.localhost.", A, cfg=no_v6)) == [("dual.localhost.", A, "2.2.2.2")]


def test_client_network_selects_vips() -> None:
    nw2_client = Workload(uid="c2", name="c2", namespace=NS1, network=NW2)
    got = records(decide("both-networks.ns1.svc.cluster.local.", client=nw2_client))
    assert got == [("both-networks.ns1.svc.cluster.local.", A, "22.22.22.22")]


def test_unknown_client_gets_servfail() -> None:
    decision = decide("productpage.", client=None)
    assert isinstance(decision, core.Reply)
    msg = dns.message.from_wire(decision.wire)
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.flags & dns.flags.RA
    assert msg.question[0].name == dns.name.from_text("productpage.")


def test_dedicated_mode_strips_resolv_conf_search_domains() -> None:
    cfg = core.Settings(
        cluster_domain=DOMAIN, proxy_mode="dedicated", resolv_search=("corp.example",)
    )
    got = records(decide("productpage.ns1.corp.example.", cfg=cfg))
    assert got == [
        ("productpage.ns1.corp.example.", CNAME, "productpage.ns1."),
        ("productpage.ns1.", A, "9.9.9.9"),
    ]
    # ... and not the shared-mode Kubernetes list.
    assert decide("productpage.ns1.ns1.svc.cluster.local.", cfg=cfg) is core.FORWARD


def test_addresses_are_shuffled() -> None:
    q = parse(query_wire("details.ns2.svc.cluster.remote."))
    orders = set()
    rng = random.Random(1)
    for _ in range(30):
        decision = core.answer(q, CLIENT, STATE, SETTINGS, rng)
        assert isinstance(decision, core.Answer)
        orders.add(decision.addresses)
    assert len(orders) > 1


def test_render_rotates_the_addresses() -> None:
    decision = decide("details.ns2.svc.cluster.remote.")
    assert isinstance(decision, core.Answer)
    first = [
        dns.message.from_wire(decision.render(512, k)).answer[0][0].to_text() for k in range(4)
    ]
    assert first == list(decision.addresses)


def test_headless_answers_only_healthy_endpoints_first_ip_of_family() -> None:
    sick = Workload(
        uid="sick",
        name="sick",
        namespace=NS1,
        network=NW1,
        workload_ips=("34.34.34.34",),
        status="Unhealthy",
        services={f"ns1/{kube('headless', NS1)}": {80: 80}},
    )
    multi = workload(
        "multi", NS1, "35.0.0.1", "35.0.0.2", services=(f"ns1/{kube('headless', NS1)}",)
    )
    state = ProxyState.from_snapshot(
        StateSnapshot(workloads=(*WORKLOADS, sick, multi), services=SERVICES)
    )
    got = {r[2] for r in records(decide("headless.ns1.svc.cluster.local.", state=state))}
    assert got == {"30.30.30.30", "31.31.31.31", "35.0.0.1"}


# --- wire rules ----------------------------------------------------------------------------


def test_response_copies_id_question_rd_and_sets_ra() -> None:
    decision = decide("productpage.")
    assert isinstance(decision, core.Answer)
    msg = dns.message.from_wire(decision.render(512))
    assert msg.id == 4242 and msg.flags & dns.flags.RD and msg.flags & dns.flags.QR
    assert msg.edns == -1  # no EDNS asked, none answered


@pytest.mark.parametrize(("payload", "echoed"), [(4096, 4096), (1232, 1232), (100, 512)])
def test_edns_is_echoed_with_a_512_floor_and_the_do_bit(payload: int, echoed: int) -> None:
    q = parse(query_wire("productpage.", edns=0, payload=payload, do=True))
    decision = core.answer(q, CLIENT, STATE, SETTINGS, random.Random())
    assert isinstance(decision, core.Answer)
    msg = dns.message.from_wire(decision.render(q.udp_limit))
    assert msg.edns == 0 and msg.payload == echoed and msg.ednsflags & dns.flags.DO
    assert q.udp_limit == max(512, payload)


def test_edns_version_above_zero_gets_badvers() -> None:
    reply = core.parse_query(query_wire("productpage.", edns=1), tcp=False)
    assert isinstance(reply, core.Reply)
    msg = dns.message.from_wire(reply.wire)
    assert msg.rcode() == dns.rcode.BADVERS and msg.edns == 0


def test_large_headless_answer_is_truncated_over_udp_only() -> None:
    ep = f"ns1/{kube('big', NS1)}"
    many = tuple(
        workload(f"w{i}", NS1, f"240.0.{i // 256}.{i % 256}", services=(ep,)) for i in range(300)
    )
    state = ProxyState.from_snapshot(
        StateSnapshot(workloads=(CLIENT, *many), services=(service("big", NS1),))
    )
    q = parse(query_wire("big.ns1.svc.cluster.local."))
    decision = core.answer(q, CLIENT, state, SETTINGS, random.Random())
    assert isinstance(decision, core.Answer)
    udp = dns.message.from_wire(decision.render(q.udp_limit))
    tcp = dns.message.from_wire(decision.render(core.MAX_MESSAGE))
    assert udp.flags & dns.flags.TC and len(decision.render(q.udp_limit)) <= 512
    assert not tcp.flags & dns.flags.TC and len(tcp.answer[0]) == 300


def header(qid: int = 7, flags: int = 0x0100, qd: int = 1, an: int = 0) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, 0, 0)


def rcode_of(reply: core.Query | core.Reply | None) -> int:
    assert isinstance(reply, core.Reply)
    return reply.wire[3] & 0x0F


@pytest.mark.parametrize("wire", [b"", b"\x00", b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00"])
def test_shorter_than_a_header_is_dropped(wire: bytes) -> None:
    assert core.parse_query(wire, tcp=False) is None
    assert core.parse_query(wire, tcp=True) is None


def test_response_as_request_is_dropped_on_udp_and_formerr_on_tcp() -> None:
    wire = header(flags=0x8100) + query_wire("x.")[12:]
    assert core.parse_query(wire, tcp=False) is None
    assert rcode_of(core.parse_query(wire, tcp=True)) == dns.rcode.FORMERR


@pytest.mark.parametrize("opcode", [dns.opcode.NOTIFY, dns.opcode.UPDATE, dns.opcode.STATUS, 15])
def test_other_opcodes_get_notimp(opcode: int) -> None:
    wire = header(flags=(opcode << 11) | 0x0100) + query_wire("x.")[12:]
    reply = core.parse_query(wire, tcp=False)
    assert rcode_of(reply) == dns.rcode.NOTIMP
    assert isinstance(reply, core.Reply)
    assert reply.wire[:2] == b"\x00\x07" and reply.wire[2] & 0x80  # same id, QR


@pytest.mark.parametrize(
    "wire",
    [
        header(qd=0),  # no question
        header(qd=65535),  # counts that lie
        header(qd=2) + query_wire("a.")[12:] + query_wire("b.")[12:],  # two questions
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # compression pointer loop
        header() + b"\x40" + b"a" * 64 + b"\x00\x00\x01\x00\x01",  # label > 63
        header() + (b"\x3f" + b"a" * 63) * 5 + b"\x00\x00\x01\x00\x01",  # name > 255
        header() + b"\x01a\x00\x00\x01",  # truncated question
        query_wire("x.") + b"junk",  # trailing bytes
    ],
)
def test_malformed_queries_get_formerr(wire: bytes) -> None:
    assert rcode_of(core.parse_query(wire, tcp=False)) == dns.rcode.FORMERR


def test_rcodes_and_types_for_labels_are_bounded() -> None:
    assert core.query_type_label(dns.rdatatype.AAAA) == "aaaa"
    assert core.query_type_label(dns.rdatatype.HTTPS) == "https"
    assert core.query_type_label(65280) == "other"
    assert core.query_type_label(dns.rdatatype.NULL) == "other"
    assert core.rcode_text(3) == "NXDOMAIN"


def test_dns_labels_follow_upstream_order_and_default_to_unknown() -> None:
    assert core.dns_labels("a", "udp", CLIENT) == (
        ("request_query_type", "a"),
        ("request_protocol", "udp"),
        ("source_canonical_service", "client"),
        ("source_canonical_revision", "v1"),
    )
    assert core.dns_labels("aaaa", "tcp", None)[2:] == (
        ("source_canonical_service", "unknown"),
        ("source_canonical_revision", "unknown"),
    )


def test_duration_samples_are_cumulative_buckets_sum_and_count() -> None:
    labels = core.dns_labels("a", "udp", None)
    got = {(f, dict(ls).get("le")): v for f, ls, v in core.duration_samples(labels, 0.05)}
    base = core.UPSTREAM_DURATION
    assert got == {
        (f"{base}_bucket", "0.1"): 1.0,
        (f"{base}_bucket", "1.0"): 1.0,
        (f"{base}_bucket", "5.0"): 1.0,
        (f"{base}_bucket", "+Inf"): 1.0,
        (f"{base}_sum", None): 0.05,
        (f"{base}_count", None): 1.0,
    }


# --- resolv.conf and forwarded replies -----------------------------------------------------


def test_resolv_conf_nameservers_search_and_options() -> None:
    conf = core.parse_resolv_conf(
        "# comment\nnameserver 10.96.0.10\nnameserver fe80::1%lo\nnameserver bogus\n"
        "domain first.example\nsearch NS.svc.cluster.local. svc.cluster.local ; trailing\n"
        "options ndots:5 use-vc\n"
    )
    assert conf.nameservers == ("10.96.0.10", "fe80::1%lo")
    assert conf.search == ("ns.svc.cluster.local", "svc.cluster.local")
    assert conf.use_vc
    assert core.parse_resolv_conf("search a\ndomain b\n").search == ("b",)  # last one wins
    assert core.parse_resolv_conf("").nameservers == ()


def test_reply_matching_checks_id_qr_and_question() -> None:
    q = query_wire("www.example.com.", qid=99)
    qend = core.question_end(q)
    assert qend == 12 + len(b"\x03www\x07example\x03com\x00") + 4
    good = dns.message.make_response(dns.message.from_wire(q)).to_wire()
    assert core.reply_matches(good, q, qend)
    assert not core.reply_matches(core.with_id(good, 98), q, qend)
    assert not core.reply_matches(q, q, qend)  # QR clear
    other = dns.message.make_response(dns.message.from_wire(query_wire("x.", qid=99))).to_wire()
    assert not core.reply_matches(other, q, qend)
    refused = header(qid=99, flags=0x8005, qd=0)  # an error without a question is accepted
    assert core.reply_matches(refused, q, qend)
    assert core.question_end(header() + b"\x05ab") is None


def test_forwarded_reply_takes_the_client_id_and_is_not_authoritative() -> None:
    upstream = header(qid=99, flags=0x8504, qd=1, an=1) + b"rest"  # QR AA RD, RA clear
    out = core.as_forwarded(upstream, query_wire("x.", qid=7))
    qid, flags = struct.unpack_from("!HH", out)
    assert qid == 7 and not flags & dns.flags.AA and flags & dns.flags.RA
    assert flags & dns.flags.RD and out[4:] == upstream[4:]


def test_oversized_forwarded_reply_is_truncated_to_the_client_limit() -> None:
    q = dns.message.from_wire(query_wire("large.test."))
    resp = dns.message.make_response(q)
    rrset = dns.rrset.from_text_list(
        "large.test.", 60, "IN", "A", [f"240.0.0.{i}" for i in range(256)]
    )
    resp.answer.append(rrset)
    wire = resp.to_wire()
    assert core.fit_udp(wire, 8192) == wire
    small = core.fit_udp(wire, 512)
    assert small is not None and len(small) <= 512
    assert dns.message.from_wire(small).flags & dns.flags.TC
    assert core.fit_udp(wire[:600], 512) is None  # cannot be parsed: caller SERVFAILs
    assert core.reply_summary(wire) == (0, 256)
    assert not core.truncated(wire) and core.truncated(small)


def test_servfail_wire_keeps_the_question_when_it_parses() -> None:
    msg = dns.message.from_wire(core.servfail_wire(query_wire("x.example.", edns=0)))
    assert msg.rcode() == dns.rcode.SERVFAIL and msg.id == 4242 and msg.edns == 0
    assert core.servfail_wire(header(qd=0))[3] & 0x0F == dns.rcode.SERVFAIL


# --- the worker's query path without sockets ------------------------------------------------


class FakeTasks(TaskSet):
    """Records what would be spawned and closes it: no loop needed."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[str] = []

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> Any:
        self.spawned.append(name)
        coro.close()


def config(env: dict[str, str] | None = None) -> Config:
    base = {
        "PROXY_MODE": "dedicated",
        "PROXY_WORKLOAD_INFO": "ns1/client/default",
        "XDS_ADDRESS": "",
        "FAKE_CA": "true",
    }
    return Config.from_env(
        {**base, **(env or {})},
        cpu_count=2,
        mesh_config_path="/nonexistent/ztunnel-test/mesh",
        path_exists=lambda _: False,
    )


def server(
    client: Workload | None = CLIENT, *, tmp_resolv: str = "/dev/null"
) -> tuple[DNSServer, WorkerMetrics, FakeTasks]:
    metrics, tasks = WorkerMetrics(), FakeTasks()
    srv = DNSServer(
        config(),
        lambda: client,
        lambda: STATE,
        metrics,
        tasks,
        resolv_conf=tmp_resolv,
        client_wait=0,
    )
    return srv, metrics, tasks


def counters(metrics: WorkerMetrics) -> dict[tuple[str, str], float]:
    push = metrics.take_push()
    return {(c.family, dict(c.labels)["request_query_type"]): c.value for c in push.counters}


def test_server_answers_mesh_names_and_counts_requests() -> None:
    srv, metrics, tasks = server()
    replies: list[bytes] = []
    for _ in range(3):  # the second and third come from the decision cache
        assert srv.handle(query_wire("productpage.", qid=11), "udp", replies.append)
    assert len(replies) == 3 and len(set(replies)) == 1
    msg = dns.message.from_wire(replies[0])
    assert msg.id == 11 and msg.answer[0][0].to_text() == "9.9.9.9"
    assert counters(metrics) == {(core.REQUESTS, "a"): 3.0}
    assert tasks.spawned == []


def test_server_cache_puts_every_address_first_in_turn() -> None:
    srv, metrics, _ = server()
    firsts = set()
    for i in range(200):
        replies: list[bytes] = []
        srv.handle(query_wire("details.ns2.svc.cluster.remote.", qid=i), "udp", replies.append)
        msg = dns.message.from_wire(replies[0])
        assert msg.id == i and len(msg.answer[0]) == 4
        firsts.add(msg.answer[0][0].to_text())
    assert firsts == {"11.11.11.11", "12.12.12.12", "13.13.13.13", "14.14.14.14"}
    assert counters(metrics) == {(core.REQUESTS, "a"): 200.0}


def test_server_cache_is_dropped_with_the_state() -> None:
    state = {"now": STATE}
    metrics, tasks = WorkerMetrics(), FakeTasks()
    srv = DNSServer(
        config(),
        lambda: CLIENT,
        lambda: state["now"],
        metrics,
        tasks,
        resolv_conf="/dev/null",
        client_wait=0,
    )
    replies: list[bytes] = []
    srv.handle(query_wire("productpage."), "udp", replies.append)
    moved = service("productpage", NS1, na(NW1, "9.9.9.10"))
    state["now"] = STATE.apply(StateDelta(services=(moved,)))
    srv.handle(query_wire("productpage."), "udp", replies.append)
    got = [dns.message.from_wire(r).answer[0][0].to_text() for r in replies]
    assert got == ["9.9.9.9", "9.9.9.10"]


def test_server_cache_keeps_each_query_id() -> None:
    srv, _, _ = server()
    replies: list[bytes] = []
    srv.handle(query_wire("productpage.", qid=1), "udp", replies.append)
    srv.handle(query_wire("productpage.", qid=2), "udp", replies.append)
    assert [dns.message.from_wire(r).id for r in replies] == [1, 2]


def test_server_forwards_unknown_names_on_a_task() -> None:
    srv, metrics, tasks = server()
    replies: list[bytes] = []
    assert srv.handle(query_wire("www.bing.com.", "MX"), "tcp", replies.append)
    assert srv.handle(query_wire("www.bing.com.", "MX"), "tcp", replies.append)  # cached
    assert replies == [] and tasks.spawned == ["dns-forward", "dns-forward"]
    assert counters(metrics) == {
        (core.REQUESTS, "mx"): 2.0,
        (core.UPSTREAM_REQUESTS, "mx"): 2.0,
    }


def test_server_unknown_client_is_servfail_and_counted_as_unknown() -> None:
    srv, metrics, _ = server(client=None)
    replies: list[bytes] = []
    srv.handle(query_wire("productpage."), "udp", replies.append)
    assert dns.message.from_wire(replies[0]).rcode() == dns.rcode.SERVFAIL
    push = metrics.take_push()
    assert [dict(c.labels)["source_canonical_service"] for c in push.counters] == ["unknown"]


def test_server_drops_what_it_cannot_answer_and_formerrs_garbage() -> None:
    srv, metrics, _ = server()
    replies: list[bytes] = []
    assert not srv.handle(b"\x01\x02", "udp", replies.append)
    assert srv.handle(header() + b"\xff\xff", "udp", replies.append)
    assert replies[0][3] & 0x0F == dns.rcode.FORMERR
    assert counters(metrics) == {}  # malformed packets never reach the counted path


def test_bind_hosts_follow_dns_proxy_addr() -> None:
    assert bind_hosts(config({"ISTIO_META_DNS_PROXY_ADDR": "127.0.0.2:5353"})) == ["127.0.0.2"]
    assert bind_hosts(config({"IPV6_ENABLED": "false"})) == ["127.0.0.1"]
    assert bind_hosts(config())[0] == "127.0.0.1"


def test_forwarder_defaults_to_localhost_like_glibc() -> None:
    assert Forwarder([]).nameservers == (Nameserver.parse("127.0.0.1"),)
    ns = Nameserver.parse("::1", 5353)
    assert ns.address[:2] == ("::1", 5353)


# --- property: nothing a client sends makes the handler raise --------------------------------

VALID = query_wire("productpage.ns1.svc.cluster.local.", edns=0, do=True)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=600), proto=st.sampled_from(["udp", "tcp"]))
def test_random_bytes_never_raise(data: bytes, proto: str) -> None:
    srv, _, _ = server()
    replies: list[bytes] = []
    srv.handle(data, proto, replies.append)  # type: ignore[arg-type]
    for wire in replies:
        assert len(wire) >= core.HEADER_LEN and wire[2] & 0x80  # every reply is a response
        assert len(wire) <= core.MIN_UDP_PAYLOAD  # garbage never gets a big reply


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    cut=st.integers(0, len(VALID)),
    tail=st.binary(max_size=40),
)
def test_mutated_queries_never_raise(edits: list[tuple[int, int]], cut: int, tail: bytes) -> None:
    wire = bytearray(VALID)
    for pos, value in edits:
        wire[pos] = value
    sent = bytes(wire[:cut]) + tail
    srv, _, _ = server()
    replies: list[bytes] = []
    srv.handle(sent, "udp", replies.append)
    for reply in replies:
        assert reply[:2] == sent[:2]  # answered under the client's id


def test_edns_padding_option_query_is_answered() -> None:
    q = dns.message.make_query(
        "productpage.",
        "A",
        use_edns=0,
        options=[dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\x00" * 8)],
    )
    srv, _, _ = server()
    replies: list[bytes] = []
    srv.handle(q.to_wire(), "udp", replies.append)
    assert dns.message.from_wire(replies[0]).answer
