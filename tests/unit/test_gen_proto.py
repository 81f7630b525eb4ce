"""Generated protobuf code: in sync with proto/, and wire names / numbers as upstream Istio."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, ServiceDescriptor

from ztunnel.gen import authorization_pb2, citadel_pb2, workload_pb2, xds_pb2, zds_pb2

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
GEN = REPO / "ztunnel" / "gen"
GENERATED_GLOBS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


def _generated(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for pattern in GENERATED_GLOBS for p in root.glob(pattern)}


@pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools is not installed, so scripts/gen-proto cannot run",
)
def test_regenerating_reproduces_the_committed_files(tmp_path: Path) -> None:
    subprocess.run(
        [str(REPO / "scripts" / "gen-proto"), str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=100,
        env={**os.environ, "PYTHON": sys.executable},
    )
    fresh = _generated(tmp_path / "ztunnel" / "gen")
    committed = _generated(GEN)
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run scripts/gen-proto: {stale} differ from proto/"


def test_xds_type_urls_match_the_generated_descriptors() -> None:
    address = f"type.googleapis.com/{workload_pb2.Address.DESCRIPTOR.full_name}"
    policy = f"type.googleapis.com/{authorization_pb2.Authorization.DESCRIPTOR.full_name}"
    assert address == "type.googleapis.com/istio.workload.Address"
    assert policy == "type.googleapis.com/istio.security.Authorization"


@pytest.mark.parametrize(
    ("service", "method", "path"),
    [
        (
            citadel_pb2.DESCRIPTOR.services_by_name["IstioCertificateService"],
            "CreateCertificate",
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        ),
        (
            xds_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"],
            "DeltaAggregatedResources",
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
        ),
        (
            xds_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"],
            "StreamAggregatedResources",
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
        ),
    ],
)
def test_grpc_method_paths_are_upstreams(
    service: ServiceDescriptor, method: str, path: str
) -> None:
    assert f"/{service.full_name}/{service.methods_by_name[method].name}" == path


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (workload_pb2.Workload.DESCRIPTOR, "uid", 20),
        (workload_pb2.Workload.DESCRIPTOR, "name", 1),
        (workload_pb2.Workload.DESCRIPTOR, "addresses", 3),
        (workload_pb2.Workload.DESCRIPTOR, "tunnel_protocol", 5),
        (workload_pb2.Workload.DESCRIPTOR, "network_gateway", 19),
        (workload_pb2.Workload.DESCRIPTOR, "hostname", 21),
        (workload_pb2.Workload.DESCRIPTOR, "services", 22),
        (workload_pb2.Workload.DESCRIPTOR, "application_tunnel", 23),
        (workload_pb2.Workload.DESCRIPTOR, "network_mode", 25),
        (workload_pb2.Workload.DESCRIPTOR, "capacity", 27),
        (workload_pb2.Service.DESCRIPTOR, "weighted_waypoints", 13),
        (workload_pb2.Service.DESCRIPTOR, "visibility", 14),
        (workload_pb2.NetworkAddress.DESCRIPTOR, "length", 3),
        (workload_pb2.GatewayAddress.DESCRIPTOR, "hbone_mtls_port", 3),
        (authorization_pb2.Match.DESCRIPTOR, "service_accounts", 11),
        (authorization_pb2.Match.DESCRIPTOR, "source_ips", 5),
        (authorization_pb2.Clause.DESCRIPTOR, "matches", 2),
        (authorization_pb2.ServiceAccountMatch.DESCRIPTOR, "serviceAccount", 2),
        (zds_pb2.DelWorkload.DESCRIPTOR, "uid", 2),
        (zds_pb2.WorkloadRequest.DESCRIPTOR, "keep", 5),
        (zds_pb2.WorkloadRequest.DESCRIPTOR, "snapshot_sent", 3),
        (citadel_pb2.IstioCertificateRequest.DESCRIPTOR, "validity_duration", 3),
        (citadel_pb2.IstioCertificateRequest.DESCRIPTOR, "metadata", 4),
        (xds_pb2.Node.DESCRIPTOR, "build_version", 5),
        (xds_pb2.DeltaDiscoveryRequest.DESCRIPTOR, "initial_resource_versions", 5),
        (xds_pb2.DeltaDiscoveryRequest.DESCRIPTOR, "response_nonce", 6),
        (xds_pb2.DeltaDiscoveryRequest.DESCRIPTOR, "error_detail", 7),
        (xds_pb2.DeltaDiscoveryResponse.DESCRIPTOR, "nonce", 5),
        (xds_pb2.DeltaDiscoveryResponse.DESCRIPTOR, "removed_resources", 6),
        (xds_pb2.Resource.DESCRIPTOR, "name", 3),
        (xds_pb2.Resource.DESCRIPTOR, "ttl", 6),
    ],
)
def test_field_numbers_are_upstreams(message: Descriptor, field: str, number: int) -> None:
    assert message.fields_by_name[field].number == number


def test_network_address_length_has_presence() -> None:
    # `optional uint32 length`: absent (a host address) must differ from 0 (a /0 CIDR).
    field = workload_pb2.NetworkAddress.DESCRIPTOR.fields_by_name["length"]
    assert field.has_presence
