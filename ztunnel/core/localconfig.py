"""The LOCAL_XDS_PATH / LOCAL_XDS YAML config: parsing into a StateSnapshot, and its JSON forms.

The schema is upstream's `LocalConfig` (`src/xds.rs`): top-level `workloads`, `policies` and
`services`, camelCase keys, and unknown keys rejected wherever upstream's serde structs say
`deny_unknown_fields` (the document, Workload, Service, Endpoint, GatewayAddress,
ApplicationTunnel, LoadBalancer, WeightedWaypoint, Authorization). Upstream ignores unknown
keys in Locality, NetworkCidr, authorization matches and service-account matches, and so do
we. A workload's `services` map (`"namespace/hostname": {servicePort: targetPort}`) is
required, even if empty.

Decisions that differ from a literal reading of upstream:

* Identity defaults. Upstream's YAML leaves `trustDomain`, `serviceAccount` and `clusterId`
  empty when omitted, which makes `examples/localhost.yaml` run as `spiffe:///ns/default/...`
  (inventory §19.1). We apply the xDS defaults instead (`cluster.local`, `default`,
  `Kubernetes`, as in `src/state/workload.rs`), so a file-loaded workload behaves exactly like
  the same workload pushed by istiod.
* Service back-references. Upstream's LocalWorkload `services` map shadows the workload's own
  service list, so file-loaded workloads have none (§19.2). We fill `Workload.services` from
  the map, so inbound service lookup works for them too.
* Service `endpoints` in the file are folded into the named workload's `services` map (the
  workload's own entry wins); endpoints naming a workload the file does not define are
  dropped, since an endpoint without its workload is never routable.
* A gateway `destination` is `"network/ip"` or `"namespace/hostname"` (upstream's untagged
  string forms); `{namespace, hostname}` is also accepted.
* Scalars are read as YAML 1.2 does (only `true`/`false` are booleans; `yes`, `on`, `0755`
  stay strings) and then converted to the type the schema expects, so `name: 123` is the
  string "123" and a quoted port `"80"` is the number 80 (a JSON config dump reads back).
* CIDRs (`cidrVips`, policy IP matches) need an explicit prefix length, as upstream's IpNet
  does, and are stored as the network (`10.1.2.3/8` -> `10.0.0.0/8`), as the xDS conversion
  stores them; containment is unchanged.

Errors raise ConfigError naming the source and the element, e.g.
`examples/localhost.yaml: workloads[1].workloadIps[0]: invalid IP 'x'`.
"""

from __future__ import annotations

import ipaddress
import re

import msgspec
import yaml

try:
    from yaml import CSafeLoader as _SafeLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _SafeLoader  # type: ignore[assignment]

from ztunnel.core.configdump import (
    local_config_to_json,
    policy_to_json,
    service_to_json,
    workload_to_json,
)
from ztunnel.core.errors import ConfigError
from ztunnel.core.localconfig_schema import (
    LocalApplicationTunnel,
    LocalAuthorization,
    LocalConfig,
    LocalGatewayAddress,
    LocalLoadBalancer,
    LocalLocality,
    LocalMatch,
    LocalService,
    LocalServiceAccountMatch,
    LocalWeightedWaypoint,
    LocalWorkload,
    RawStringMatch,
)
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
    StateSnapshot,
    StringMatch,
    StringMatchKind,
    WeightedWaypoint,
    Workload,
)

__all__ = [
    "DEFAULT_CLUSTER_ID",
    "DEFAULT_SERVICE_ACCOUNT",
    "DEFAULT_TRUST_DOMAIN",
    "load_local_config",
    "local_config_to_json",
    "parse_local_config",
    "policy_to_json",
    "service_to_json",
    "workload_to_json",
]

# The xDS conversion defaults for empty fields (`src/state/workload.rs`).
DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SERVICE_ACCOUNT = "default"
DEFAULT_CLUSTER_ID = "Kubernetes"


# --- entry points ---------------------------------------------------------------------------


def load_local_config(path: str) -> StateSnapshot:
    """Read and parse the LOCAL_XDS_PATH file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read local config: {e}") from e
    return parse_local_config(text, source=path)


def parse_local_config(text: str, *, source: str) -> StateSnapshot:
    """Parse a local config document; `source` names it in error messages."""
    try:
        raw = _decode(text)
        return _to_snapshot(raw)
    except _Invalid as e:
        where = f"{e.where}: " if e.where else ""
        raise ConfigError(f"{source}: {where}{e.why}") from e


class _Invalid(Exception):
    """A schema violation at a path inside the document."""

    def __init__(self, where: str, why: str) -> None:
        super().__init__(f"{where}: {why}")
        self.where = where
        self.why = why


class _Yaml12Loader(_SafeLoader):
    """Plain scalars stay strings except YAML 1.2 nulls; the schema types convert the rest."""

    yaml_implicit_resolvers = {}  # our own table, not a mutation of SafeLoader's


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)

# msgspec reports "<reason> - at `$.a[0].b`" or "<reason> - at `key` in `$.a`".
_MSGSPEC_PATH = re.compile(r"(?s)^(.*) - at `(key` in `)?\$\.?(.*)`$")


def _decode(text: str) -> LocalConfig:
    try:
        doc = yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        raise _Invalid("", f"invalid YAML: {e}") from e
    try:
        return msgspec.convert({} if doc is None else doc, LocalConfig, strict=False)
    except msgspec.ValidationError as e:
        m = _MSGSPEC_PATH.match(str(e))
        if m is None:
            raise _Invalid("", str(e)) from e
        why = f"{m.group(1)} (in a map key)" if m.group(2) else m.group(1)
        raise _Invalid(m.group(3), why) from e


def _to_snapshot(raw: LocalConfig) -> StateSnapshot:
    workloads = [_workload(w, f"workloads[{i}]") for i, w in enumerate(raw.workloads)]
    services = [_service(s, f"services[{i}]") for i, s in enumerate(raw.services)]
    policies = [_policy(p, f"policies[{i}]") for i, p in enumerate(raw.policies)]
    workloads = _fold_service_endpoints(workloads, raw.services)
    return StateSnapshot(
        workloads=tuple(workloads), services=tuple(services), policies=tuple(policies)
    )


# --- scalars --------------------------------------------------------------------------------


def _ip(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _Invalid(where, f"invalid IP {value!r}") from None


def _cidr(value: str, where: str) -> str:
    """An `ip/len` network as upstream's IpNet reads it (length required, host bits allowed).

    Written as the network (host bits cleared), as the xDS conversion does: containment is
    the same, and consumers can parse it strictly.
    """
    length = value.partition("/")[2]
    try:
        if not length.isdigit():
            raise ValueError(value)
        iface = ipaddress.ip_interface(value)
    except ValueError:
        raise _Invalid(where, f"invalid CIDR {value!r} (want ip/prefix-length)") from None
    return str(iface.network)


def _network_address(value: str, where: str) -> NetworkAddress:
    network, sep, ip = value.partition("/")
    if not sep:
        raise _Invalid(where, f"invalid address {value!r} (want network/ip)")
    return NetworkAddress(network=network, address=_ip(ip, where))


def _namespaced_host(value: str, where: str) -> NamespacedHostname:
    namespace, sep, hostname = value.partition("/")
    if not sep:
        raise _Invalid(where, f"invalid name {value!r} (want namespace/hostname)")
    return NamespacedHostname(namespace=namespace, hostname=hostname)


def _optional_gateway(raw: LocalGatewayAddress | None, where: str) -> GatewayAddress | None:
    return None if raw is None else _gateway(raw, where)


def _gateway(raw: LocalGatewayAddress, where: str) -> GatewayAddress:
    return GatewayAddress(
        destination=_destination(raw.destination, f"{where}.destination"),
        hbone_mtls_port=raw.hbone_mtls_port,
    )


_DESTINATION_FORMS = "want 'network/ip', 'namespace/hostname' or {namespace, hostname}"


def _destination(raw: str | dict[str, str], where: str) -> NetworkAddress | NamespacedHostname:
    """Upstream's untagged `gatewayaddress::Destination`: an address if the part after the
    first `/` is an IP, else a namespaced hostname."""
    if isinstance(raw, dict):
        if set(raw) != {"namespace", "hostname"}:
            raise _Invalid(where, f"invalid gateway destination {raw!r} ({_DESTINATION_FORMS})")
        return NamespacedHostname(namespace=raw["namespace"], hostname=raw["hostname"])
    network, _, rest = raw.partition("/")
    try:
        return NetworkAddress(network=network, address=str(ipaddress.ip_address(rest)))
    except ValueError:
        return _namespaced_host(raw, where)


# --- workloads ------------------------------------------------------------------------------


def _workload(raw: LocalWorkload, where: str) -> Workload:
    return Workload(
        uid=raw.uid,
        name=raw.name,
        namespace=raw.namespace,
        workload_ips=tuple(
            _ip(ip, f"{where}.workloadIps[{i}]") for i, ip in enumerate(raw.workload_ips)
        ),
        waypoint=_optional_gateway(raw.waypoint, f"{where}.waypoint"),
        network_gateway=_optional_gateway(raw.network_gateway, f"{where}.networkGateway"),
        protocol=raw.protocol,
        network_mode=raw.network_mode,
        trust_domain=raw.trust_domain or DEFAULT_TRUST_DOMAIN,
        service_account=raw.service_account or DEFAULT_SERVICE_ACCOUNT,
        network=raw.network,
        workload_name=raw.workload_name,
        workload_type=raw.workload_type,
        canonical_name=raw.canonical_name,
        canonical_revision=raw.canonical_revision,
        hostname=raw.hostname,
        node=raw.node,
        native_tunnel=raw.native_tunnel,
        application_tunnel=_app_tunnel(raw.application_tunnel),
        authorization_policies=tuple(raw.authorization_policies),
        status=raw.status,
        cluster_id=raw.cluster_id or DEFAULT_CLUSTER_ID,
        locality=_locality(raw.locality),
        services=_service_ports(raw.services, f"{where}.services"),
        capacity=raw.capacity,
    )


def _app_tunnel(raw: LocalApplicationTunnel | None) -> ApplicationTunnel | None:
    if raw is None:
        return None
    return ApplicationTunnel(protocol=raw.protocol, port=raw.port)


def _locality(raw: LocalLocality | None) -> Locality:
    if raw is None:
        return Locality()
    return Locality(region=raw.region, zone=raw.zone, subzone=raw.subzone)


def _service_ports(raw: dict[str, dict[int, int]], where: str) -> dict[str, dict[int, int]]:
    for key in raw:
        _namespaced_host(key, f"{where}[{key!r}]")
    return {key: dict(ports) for key, ports in raw.items()}


def _fold_service_endpoints(
    workloads: list[Workload], services: list[LocalService]
) -> list[Workload]:
    """Add each service-listed endpoint to its workload's `services` map, unless already there."""
    index = {w.uid: i for i, w in enumerate(workloads)}
    for svc in services:
        key = f"{svc.namespace}/{svc.hostname}"
        for ep in svc.endpoints.values():
            i = index.get(ep.workload_uid)
            if i is None or key in workloads[i].services:
                continue
            merged = {**workloads[i].services, key: dict(ep.port)}
            workloads[i] = msgspec.structs.replace(workloads[i], services=merged)
    return workloads


# --- services -------------------------------------------------------------------------------


def _service(raw: LocalService, where: str) -> Service:
    return Service(
        name=raw.name,
        namespace=raw.namespace,
        hostname=raw.hostname,
        vips=tuple(_network_address(v, f"{where}.vips[{i}]") for i, v in enumerate(raw.vips)),
        cidr_vips=tuple(
            NetworkCidr(network=c.network, cidr=_cidr(c.cidr, f"{where}.cidrVips[{i}].cidr"))
            for i, c in enumerate(raw.cidr_vips)
        ),
        ports=dict(raw.ports),
        subject_alt_names=tuple(raw.subject_alt_names),
        waypoint=_optional_gateway(raw.waypoint, f"{where}.waypoint"),
        weighted_waypoints=tuple(
            _weighted_waypoint(ww, f"{where}.weightedWaypoints[{i}]")
            for i, ww in enumerate(raw.weighted_waypoints)
        ),
        load_balancer=_load_balancer(raw.load_balancer),
        ip_families=raw.ip_families,
        canonical=raw.canonical,
        visibility=raw.visibility,
    )


def _weighted_waypoint(raw: LocalWeightedWaypoint, where: str) -> WeightedWaypoint:
    gateway = _gateway(raw.destination, f"{where}.destination")
    return WeightedWaypoint(destination=gateway, weight=raw.weight)


def _load_balancer(raw: LocalLoadBalancer | None) -> LoadBalancer | None:
    if raw is None:
        return None
    return LoadBalancer(
        routing_preferences=tuple(raw.routing_preferences),
        mode=raw.mode,
        health_policy=raw.health_policy,
    )


# --- policies -------------------------------------------------------------------------------


def _policy(raw: LocalAuthorization, where: str) -> Authorization:
    return Authorization(
        name=raw.name,
        namespace=raw.namespace,
        scope=raw.scope,
        action=raw.action,
        dry_run=raw.dry_run,
        rules=tuple(
            tuple(
                tuple(_match(m, f"{where}.rules[{i}][{j}][{k}]") for k, m in enumerate(clause))
                for j, clause in enumerate(rule)
            )
            for i, rule in enumerate(raw.rules)
        ),
    )


def _match(raw: LocalMatch, where: str) -> Match:
    return Match(
        namespaces=_string_matches(raw.namespaces, f"{where}.namespaces"),
        not_namespaces=_string_matches(raw.not_namespaces, f"{where}.notNamespaces"),
        service_accounts=_sa_matches(raw.service_accounts),
        not_service_accounts=_sa_matches(raw.not_service_accounts),
        principals=_string_matches(raw.principals, f"{where}.principals"),
        not_principals=_string_matches(raw.not_principals, f"{where}.notPrincipals"),
        source_ips=_cidrs(raw.source_ips, f"{where}.sourceIps"),
        not_source_ips=_cidrs(raw.not_source_ips, f"{where}.notSourceIps"),
        destination_ips=_cidrs(raw.destination_ips, f"{where}.destinationIps"),
        not_destination_ips=_cidrs(raw.not_destination_ips, f"{where}.notDestinationIps"),
        destination_ports=tuple(raw.destination_ports),
        not_destination_ports=tuple(raw.not_destination_ports),
    )


def _cidrs(raw: list[str], where: str) -> tuple[str, ...]:
    return tuple(_cidr(c, f"{where}[{i}]") for i, c in enumerate(raw))


def _sa_matches(raw: list[LocalServiceAccountMatch]) -> tuple[ServiceAccountMatch, ...]:
    return tuple(
        ServiceAccountMatch(namespace=m.namespace, service_account=m.service_account) for m in raw
    )


def _string_matches(raw: list[RawStringMatch], where: str) -> tuple[StringMatch, ...]:
    return tuple(_string_match(m, f"{where}[{i}]") for i, m in enumerate(raw))


_VALUE_KINDS: dict[str, StringMatchKind] = {
    "Exact": "Exact",
    "Prefix": "Prefix",
    "Suffix": "Suffix",
}
_STRING_MATCH_FORMS = "want {Exact: s}, {Prefix: s}, {Suffix: s} or {Presence: []}"


def _string_match(raw: RawStringMatch, where: str) -> StringMatch:
    """Upstream's externally tagged `StringMatch`; `Presence` is a variant without data."""
    if raw == "Presence":
        return StringMatch(kind="Presence")
    if isinstance(raw, dict) and len(raw) == 1:
        ((tag, value),) = raw.items()
        if tag == "Presence" and value in (None, []):
            return StringMatch(kind="Presence")
        kind = _VALUE_KINDS.get(tag)
        if kind is not None and isinstance(value, str):
            return StringMatch(kind=kind, value=value)
    raise _Invalid(where, f"invalid string match {raw!r} ({_STRING_MATCH_FORMS})")
