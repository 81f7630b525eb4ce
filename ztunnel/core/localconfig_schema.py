"""The LOCAL_XDS YAML schema: msgspec Structs mirroring upstream's serde structs.

Field names, requiredness and `deny_unknown_fields` follow `src/xds.rs::LocalConfig` /
`LocalWorkload`, `src/state/workload.rs`, `src/state/service.rs` and `src/rbac.rs`. Values are
checked further (addresses, CIDRs, string matches) and mapped onto the model by
`ztunnel.core.localconfig`.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from ztunnel.core.model import (
    AppTunnelProtocol,
    HealthStatus,
    IPFamilies,
    LoadBalancerHealthPolicy,
    LoadBalancerMode,
    LoadBalancerScope,
    NetworkMode,
    PolicyAction,
    PolicyScope,
    Protocol,
    Visibility,
)

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]


class _Strict(msgspec.Struct, rename="camel", forbid_unknown_fields=True, kw_only=True):
    """A struct upstream declares `deny_unknown_fields`."""


class _Lax(msgspec.Struct, rename="camel", kw_only=True):
    """A struct upstream lets carry unknown keys (ignored)."""


class LocalGatewayAddress(_Strict):
    destination: str | dict[str, str]
    hbone_mtls_port: Port


class LocalApplicationTunnel(_Strict):
    protocol: AppTunnelProtocol
    port: Port | None = None


class LocalLocality(_Lax):
    region: str
    zone: str
    subzone: str


class LocalWorkload(_Strict, kw_only=True):
    workload_ips: list[str]
    waypoint: LocalGatewayAddress | None = None
    network_gateway: LocalGatewayAddress | None = None
    protocol: Protocol = "TCP"
    network_mode: NetworkMode = "Standard"
    uid: str = ""
    name: str = ""
    namespace: str
    trust_domain: str = ""
    service_account: str = ""
    network: str = ""
    workload_name: str = ""
    workload_type: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    hostname: str = ""
    node: str = ""
    native_tunnel: bool = False
    application_tunnel: LocalApplicationTunnel | None = None
    authorization_policies: list[str] = []
    status: HealthStatus = "Healthy"
    cluster_id: str = ""
    locality: LocalLocality | None = None
    # LocalWorkload's own key: required, "namespace/hostname" -> {service port: target port}.
    services: dict[str, dict[Port, Port]]
    capacity: U32 = 1


class LocalNetworkCidr(msgspec.Struct, kw_only=True):
    network: str
    cidr: str


class LocalWeightedWaypoint(_Strict):
    destination: LocalGatewayAddress
    weight: U32


class LocalLoadBalancer(_Strict):
    routing_preferences: list[LoadBalancerScope]
    mode: LoadBalancerMode
    health_policy: LoadBalancerHealthPolicy


class LocalEndpoint(_Strict):
    workload_uid: str
    port: dict[Port, Port]
    status: HealthStatus


class LocalService(_Strict, kw_only=True):
    name: str
    namespace: str
    hostname: str
    vips: list[str]
    cidr_vips: list[LocalNetworkCidr] = []
    ports: dict[Port, Port]
    endpoints: dict[str, LocalEndpoint] = {}
    subject_alt_names: list[str] = []
    waypoint: LocalGatewayAddress | None = None
    weighted_waypoints: list[LocalWeightedWaypoint] = []
    load_balancer: LocalLoadBalancer | None = None
    ip_families: IPFamilies | None = None
    canonical: bool = False
    visibility: Visibility = "Public"


RawStringMatch = dict[str, Any] | str


class LocalServiceAccountMatch(_Lax):
    namespace: str
    service_account: str


class LocalMatch(_Lax):
    namespaces: list[RawStringMatch] = []
    not_namespaces: list[RawStringMatch] = []
    service_accounts: list[LocalServiceAccountMatch] = []
    not_service_accounts: list[LocalServiceAccountMatch] = []
    principals: list[RawStringMatch] = []
    not_principals: list[RawStringMatch] = []
    source_ips: list[str] = []
    not_source_ips: list[str] = []
    destination_ips: list[str] = []
    not_destination_ips: list[str] = []
    destination_ports: list[Port] = []
    not_destination_ports: list[Port] = []


class LocalAuthorization(_Strict):
    name: str
    namespace: str
    scope: PolicyScope
    action: PolicyAction
    rules: list[list[list[LocalMatch]]]
    dry_run: bool


class LocalConfig(_Strict):
    workloads: list[LocalWorkload] = []
    policies: list[LocalAuthorization] = []
    services: list[LocalService] = []
