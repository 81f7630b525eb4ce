"""Bytes serialized by upstream Istio's own protos decode, field for field, with ours.

The fixture was produced with protoc-generated code from upstream's workload.proto and
authorization.proto (see its `comment`); decoding it here checks wire compatibility
independently of our .proto files, and the converter then sees what istiod would send.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ztunnel.core import convert
from ztunnel.core.model import NetworkAddress, Service, Workload
from ztunnel.gen import authorization_pb2, workload_pb2

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "upstream_proto_bytes.json").read_text())


def _bytes(name: str) -> bytes:
    return bytes.fromhex(FIXTURE[name])


def test_upstream_workload_bytes_decode_with_every_field() -> None:
    addr = workload_pb2.Address.FromString(_bytes("address_workload"))
    assert addr.WhichOneof("type") == "workload"
    pb = addr.workload
    assert pb.uid == "cluster1//v1/Pod/default/server"
    assert pb.tunnel_protocol == workload_pb2.TunnelProtocol.HBONE
    assert pb.workload_type == workload_pb2.WorkloadType.POD
    assert pb.capacity.value == 3
    assert pb.application_tunnel.port == 15088
    assert pb.services["default/echo.default.svc.cluster.local"].ports[0].target_port == 8080
    w = convert.decode_address("cluster1//v1/Pod/default/server", _bytes("address_workload"))
    assert isinstance(w, Workload)
    assert w.workload_ips == ("10.1.2.3", "fd00::3")
    assert (w.network, w.protocol, w.workload_type, w.workload_name) == (
        "net1",
        "HBONE",
        "pod",
        "server-7d9",
    )
    assert w.identity() == "spiffe://cluster.local/ns/default/sa/server-sa"
    assert w.waypoint is not None
    assert w.waypoint.destination == NetworkAddress(network="net1", address="10.1.2.9")
    assert (w.locality.region, w.locality.zone, w.locality.subzone) == ("r1", "z1", "s1")
    assert w.services == {"default/echo.default.svc.cluster.local": {80: 8080}}
    assert w.authorization_policies == ("default/allow-prom",)
    assert (w.cluster_id, w.capacity, w.node) == ("c1", 3, "node-a")


def test_upstream_service_bytes_decode_with_every_field() -> None:
    s = convert.decode_address("default/echo.default.svc.cluster.local", _bytes("address_service"))
    assert isinstance(s, Service)
    assert s.vips == (NetworkAddress(network="net1", address="10.96.0.10"),)
    assert [(c.network, c.cidr) for c in s.cidr_vips] == [("net1", "10.97.0.0/16")]
    assert s.ports == {80: 8080}
    assert s.subject_alt_names == ("spiffe://cluster.local/ns/default/sa/server-sa",)
    assert s.load_balancer is not None
    assert s.load_balancer.routing_preferences == ("Network", "Zone")
    assert (s.load_balancer.mode, s.load_balancer.health_policy) == ("Failover", "AllowAll")
    assert (s.ip_families, s.canonical, s.visibility) == ("Dual", True, "Namespace")


@pytest.mark.parametrize("field", ["principals", "not_namespaces", "service_accounts"])
def test_upstream_authorization_bytes_decode(field: str) -> None:
    pb = authorization_pb2.Authorization.FromString(_bytes("authorization"))
    assert getattr(pb.rules[0].clauses[0].matches[0], field)
    p = convert.decode_authorization("default/allow-prom", _bytes("authorization"))
    assert (p.scope, p.action, p.dry_run) == ("WorkloadSelector", "Allow", False)
    m = p.rules[0][0][0]
    assert m.principals[0].kind == "Exact"
    assert m.principals[0].value == "cluster.local/ns/monitoring/sa/prometheus"
    assert (m.not_namespaces[0].kind, m.not_namespaces[0].value) == ("Prefix", "kube-")
    assert (m.service_accounts[0].namespace, m.service_accounts[0].service_account) == (
        "monitoring",
        "prometheus",
    )
    assert m.source_ips == ("10.0.0.0/8",)
    assert m.destination_ports == (15020, 8080)
    assert m.not_destination_ports == (9999,)
