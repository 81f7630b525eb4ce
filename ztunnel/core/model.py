"""The state model: Workload, Service, Authorization and friends as frozen msgspec Structs.

These are the cross-process data of ztunnel: the supervisor converts xDS protobufs and the
local YAML config into them, and ships them to workers inside snapshots and deltas. Field
names follow upstream's Rust structs (`src/state/workload.rs`, `src/state/service.rs`,
`src/rbac.rs`); the YAML / config_dump spelling is camelCase (see `ztunnel.core.localconfig`).

Snapshot contract (STYLE §5): new fields get defaults, existing field types never change.
IP addresses are canonical strings (`str(ipaddress.ip_address(x))`): cheap to hash, compare
and encode, and never ambiguous between IPv4 and v4-mapped IPv6.
"""

from __future__ import annotations

from typing import Literal

import msgspec

Protocol = Literal["TCP", "HBONE"]
NetworkMode = Literal["Standard", "HostNetwork"]
HealthStatus = Literal["Healthy", "Unhealthy"]
Visibility = Literal["Public", "Namespace"]
IPFamilies = Literal["Dual", "IPv4", "IPv6"]
LoadBalancerMode = Literal["Standard", "Strict", "Failover", "Passthrough"]
LoadBalancerHealthPolicy = Literal["OnlyHealthy", "AllowAll"]
LoadBalancerScope = Literal["Region", "Zone", "Subzone", "Node", "Cluster", "Network"]
AppTunnelProtocol = Literal["NONE", "PROXY"]
PolicyScope = Literal["Global", "Namespace", "WorkloadSelector"]
PolicyAction = Literal["Allow", "Deny"]
StringMatchKind = Literal["Exact", "Prefix", "Suffix", "Presence"]


class _Model(msgspec.Struct, frozen=True, kw_only=True, gc=False, omit_defaults=True):
    """Base for model structs: immutable, keyword-only, not tracked by the cyclic GC."""


# --- addresses -------------------------------------------------------------------------------


class NetworkAddress(_Model, frozen=True, kw_only=True, tag="address"):
    """An IP on a network: upstream's `NetworkAddress`, written `network/ip` in YAML."""

    network: str = ""
    address: str

    def key(self) -> str:
        return f"{self.network}/{self.address}"


class NetworkCidr(_Model, frozen=True, kw_only=True):
    """A CIDR VIP of a service (`cidrVips`)."""

    network: str = ""
    cidr: str


class NamespacedHostname(_Model, frozen=True, kw_only=True, tag="hostname"):
    namespace: str
    hostname: str

    def key(self) -> str:
        return f"{self.namespace}/{self.hostname}"


class GatewayAddress(_Model, frozen=True, kw_only=True):
    """A waypoint or network gateway: an address or a namespaced hostname, plus its HBONE port."""

    destination: NetworkAddress | NamespacedHostname
    hbone_mtls_port: int = 15008


class WeightedWaypoint(_Model, frozen=True, kw_only=True):
    destination: GatewayAddress
    weight: int = 0


class Locality(_Model, frozen=True, kw_only=True):
    region: str = ""
    zone: str = ""
    subzone: str = ""


class ApplicationTunnel(_Model, frozen=True, kw_only=True):
    protocol: AppTunnelProtocol = "NONE"
    port: int | None = None


# --- workloads ------------------------------------------------------------------------------


class Workload(_Model, frozen=True, kw_only=True):
    """A workload (pod, VM, ...) as ztunnel sees it (`src/state/workload.rs::Workload`)."""

    uid: str = ""
    name: str = ""
    namespace: str
    workload_ips: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    protocol: Protocol = "TCP"
    network_mode: NetworkMode = "Standard"
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
    application_tunnel: ApplicationTunnel | None = None
    authorization_policies: tuple[str, ...] = ()
    status: HealthStatus = "Healthy"
    cluster_id: str = ""
    locality: Locality = Locality()
    # "namespace/hostname" -> {service port: target port}; the source of this workload's
    # endpoints in each service (workload.proto `services`).
    services: dict[str, dict[int, int]] = msgspec.field(default_factory=dict)
    capacity: int = 1

    def identity(self) -> str:
        """The SPIFFE identity: `spiffe://<td>/ns/<ns>/sa/<sa>` (`src/identity/manager.rs`)."""
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


# --- services -------------------------------------------------------------------------------


class LoadBalancer(_Model, frozen=True, kw_only=True):
    routing_preferences: tuple[LoadBalancerScope, ...] = ()
    mode: LoadBalancerMode = "Standard"
    health_policy: LoadBalancerHealthPolicy = "OnlyHealthy"


class Endpoint(_Model, frozen=True, kw_only=True):
    """A workload's membership in a service, derived from `Workload.services`."""

    workload_uid: str
    port: dict[int, int] = msgspec.field(default_factory=dict)
    status: HealthStatus = "Healthy"


class Service(_Model, frozen=True, kw_only=True):
    """A service (`src/state/service.rs::Service`); endpoints live in the state's index."""

    name: str
    namespace: str
    hostname: str
    vips: tuple[NetworkAddress, ...] = ()
    cidr_vips: tuple[NetworkCidr, ...] = ()
    ports: dict[int, int] = msgspec.field(default_factory=dict)
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None
    weighted_waypoints: tuple[WeightedWaypoint, ...] = ()
    load_balancer: LoadBalancer | None = None
    ip_families: IPFamilies | None = None
    canonical: bool = False
    visibility: Visibility = "Public"

    def key(self) -> str:
        """The xDS resource name and store key: `namespace/hostname`."""
        return f"{self.namespace}/{self.hostname}"


# --- authorization --------------------------------------------------------------------------


class StringMatch(_Model, frozen=True, kw_only=True):
    kind: StringMatchKind
    value: str = ""


class ServiceAccountMatch(_Model, frozen=True, kw_only=True):
    namespace: str
    service_account: str


class Match(_Model, frozen=True, kw_only=True):
    """AND across field types; within a type, any-of (positive) and none-of (`not_*`)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    destination_ips: tuple[str, ...] = ()
    not_destination_ips: tuple[str, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()


class Authorization(_Model, frozen=True, kw_only=True):
    """An L4 authorization policy: rules -> clauses -> matches (`src/rbac.rs::Authorization`)."""

    name: str
    namespace: str
    scope: PolicyScope
    action: PolicyAction
    dry_run: bool = False
    rules: tuple[tuple[tuple[Match, ...], ...], ...] = ()

    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


# --- whole-state containers -----------------------------------------------------------------


class StateSnapshot(_Model, frozen=True, kw_only=True):
    """Everything a worker needs to route and authorize: the authoritative state's contents."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()


class StateDelta(_Model, frozen=True, kw_only=True):
    """One atomic change to the state: upserts then removals, per kind."""

    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    policies: tuple[Authorization, ...] = ()
    removed_workloads: tuple[str, ...] = ()  # uids
    removed_services: tuple[str, ...] = ()  # "namespace/hostname"
    removed_policies: tuple[str, ...] = ()  # "namespace/name"

    def is_empty(self) -> bool:
        return not (
            self.workloads
            or self.services
            or self.policies
            or self.removed_workloads
            or self.removed_services
            or self.removed_policies
        )

    def touches_policies(self) -> bool:
        return bool(self.policies or self.removed_policies)
