"""JSON forms of workloads, services and policies, as upstream's admin `/config_dump` writes them.

The shapes are upstream's serde output (`src/state/workload.rs`, `src/state/service.rs`,
`src/rbac.rs`, `src/state.rs::ProxyStateSerialization`): camelCase keys, the same forms as the
local YAML config, fields omitted where upstream says `skip_serializing_if`. The results are
plain dicts and lists ready for any JSON encoder; port maps keep int keys, which encoders
write as strings, as serde does.

Upstream's dump lists a workload's services as `["namespace/hostname", ...]`, which its own
local config cannot read back. `workload_to_json(w, local=True)` and `local_config_to_json`
write the LOCAL_XDS form instead (the `services` port map), so a state can be saved as a
config file and loaded again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ztunnel.core.model import (
    Authorization,
    Endpoint,
    GatewayAddress,
    Locality,
    Match,
    Service,
    StateSnapshot,
    StringMatch,
    Workload,
)

if TYPE_CHECKING:
    from ztunnel.core.state import ProxyState

JSONObject = dict[str, Any]


def _put(obj: JSONObject, key: str, value: Any) -> None:
    """Set `key` unless `value` is empty or None (serde's `skip_serializing_if`)."""
    if value:
        obj[key] = value


def gateway_to_json(g: GatewayAddress) -> JSONObject:
    """`{"destination": "network/ip" | "namespace/hostname", "hboneMtlsPort": port}`."""
    return {"destination": g.destination.key(), "hboneMtlsPort": g.hbone_mtls_port}


def _gateway_or_none(g: GatewayAddress | None) -> JSONObject | None:
    return None if g is None else gateway_to_json(g)


def _locality(loc: Locality) -> JSONObject | None:
    if loc == Locality():
        return None
    return {"region": loc.region, "zone": loc.zone, "subzone": loc.subzone}


def workload_to_json(w: Workload, *, local: bool = False) -> JSONObject:
    """A workload; `local=True` gives the LOCAL_XDS form with the `services` port map."""
    obj: JSONObject = {"workloadIps": list(w.workload_ips)}
    _put(obj, "waypoint", _gateway_or_none(w.waypoint))
    _put(obj, "networkGateway", _gateway_or_none(w.network_gateway))
    obj.update(protocol=w.protocol, networkMode=w.network_mode)
    _put(obj, "uid", w.uid)
    obj.update(name=w.name, namespace=w.namespace)
    _put(obj, "trustDomain", w.trust_domain)
    _put(obj, "serviceAccount", w.service_account)
    _put(obj, "network", w.network)
    _put(obj, "workloadName", w.workload_name)
    _put(obj, "workloadType", w.workload_type)
    _put(obj, "canonicalName", w.canonical_name)
    _put(obj, "canonicalRevision", w.canonical_revision)
    _put(obj, "hostname", w.hostname)
    _put(obj, "node", w.node)
    _put(obj, "nativeTunnel", w.native_tunnel)
    if w.application_tunnel is not None:
        tunnel = w.application_tunnel
        obj["applicationTunnel"] = {"protocol": tunnel.protocol, "port": tunnel.port}
    _put(obj, "authorizationPolicies", list(w.authorization_policies))
    obj.update(status=w.status, clusterId=w.cluster_id)
    _put(obj, "locality", _locality(w.locality))
    if local:
        obj["services"] = {key: dict(ports) for key, ports in w.services.items()}
    else:
        _put(obj, "services", list(w.services))
    obj["capacity"] = w.capacity
    return obj


def endpoint_to_json(ep: Endpoint) -> JSONObject:
    return {"workloadUid": ep.workload_uid, "port": dict(ep.port), "status": ep.status}


def service_to_json(svc: Service, endpoints: Mapping[str, Endpoint] | None = None) -> JSONObject:
    """A service with its endpoints (uid -> endpoint) as the state holds them."""
    obj: JSONObject = {
        "name": svc.name,
        "namespace": svc.namespace,
        "hostname": svc.hostname,
        "vips": [v.key() for v in svc.vips],
    }
    _put(obj, "cidrVips", [{"network": c.network, "cidr": c.cidr} for c in svc.cidr_vips])
    obj["ports"] = dict(svc.ports)
    obj["endpoints"] = {uid: endpoint_to_json(ep) for uid, ep in (endpoints or {}).items()}
    obj["subjectAltNames"] = list(svc.subject_alt_names)
    _put(obj, "waypoint", _gateway_or_none(svc.waypoint))
    _put(
        obj,
        "weightedWaypoints",
        [
            {"destination": gateway_to_json(ww.destination), "weight": ww.weight}
            for ww in svc.weighted_waypoints
        ],
    )
    if svc.load_balancer is not None:
        lb = svc.load_balancer
        obj["loadBalancer"] = {
            "routingPreferences": list(lb.routing_preferences),
            "mode": lb.mode,
            "healthPolicy": lb.health_policy,
        }
    _put(obj, "ipFamilies", svc.ip_families)
    obj.update(canonical=svc.canonical, visibility=svc.visibility)
    return obj


def string_match_to_json(m: StringMatch) -> JSONObject:
    """Externally tagged, as serde writes it: `{"Exact": "x"}`, `{"Presence": []}`."""
    return {m.kind: [] if m.kind == "Presence" else m.value}


def match_to_json(m: Match) -> JSONObject:
    obj: JSONObject = {}
    _put(obj, "namespaces", [string_match_to_json(s) for s in m.namespaces])
    _put(obj, "notNamespaces", [string_match_to_json(s) for s in m.not_namespaces])
    _put(obj, "serviceAccounts", [_sa(s.namespace, s.service_account) for s in m.service_accounts])
    _put(
        obj,
        "notServiceAccounts",
        [_sa(s.namespace, s.service_account) for s in m.not_service_accounts],
    )
    _put(obj, "principals", [string_match_to_json(s) for s in m.principals])
    _put(obj, "notPrincipals", [string_match_to_json(s) for s in m.not_principals])
    _put(obj, "sourceIps", list(m.source_ips))
    _put(obj, "notSourceIps", list(m.not_source_ips))
    _put(obj, "destinationIps", list(m.destination_ips))
    _put(obj, "notDestinationIps", list(m.not_destination_ips))
    _put(obj, "destinationPorts", list(m.destination_ports))
    _put(obj, "notDestinationPorts", list(m.not_destination_ports))
    return obj


def _sa(namespace: str, service_account: str) -> JSONObject:
    return {"namespace": namespace, "serviceAccount": service_account}


def policy_to_json(p: Authorization) -> JSONObject:
    return {
        "name": p.name,
        "namespace": p.namespace,
        "scope": p.scope,
        "action": p.action,
        "rules": [[[match_to_json(m) for m in clause] for clause in rule] for rule in p.rules],
        "dryRun": p.dry_run,
    }


def local_config_to_json(snap: StateSnapshot) -> JSONObject:
    """A whole LOCAL_XDS document holding `snap`; `parse_local_config` reads it back."""
    return {
        "workloads": [workload_to_json(w, local=True) for w in snap.workloads],
        "policies": [policy_to_json(p) for p in snap.policies],
        "services": [service_to_json(s) for s in snap.services],
    }


def state_to_json(state: ProxyState) -> JSONObject:
    """The state part of `/config_dump`: workloads by uid, services by hostname, policies by key,
    and the staged endpoints of services not yet known."""
    workloads = sorted(state.workloads(), key=lambda w: w.uid)
    services = sorted(state.services(), key=lambda s: (s.hostname, s.namespace))
    policies = sorted(state.policies(), key=Authorization.key)
    staged = state.staged_services()
    return {
        "workloads": [workload_to_json(w) for w in workloads],
        "services": [service_to_json(s, state.endpoints(s.key())) for s in services],
        "policies": [policy_to_json(p) for p in policies],
        "stagedServices": {
            key: {uid: endpoint_to_json(ep) for uid, ep in eps.items()}
            for key, eps in staged.items()
        },
    }
