"""ProxyState: the immutable, indexed view of workloads, services and policies.

A ProxyState never changes: `apply(delta)` returns a new state that shares every index the
delta did not touch (see `ztunnel.core.state_index`). The supervisor holds the authoritative
one and workers rebuild theirs from the same snapshots and deltas, so both answer queries the
same way. Query semantics follow upstream's stores (`src/state.rs`, `src/state/workload.rs`,
`src/state/service.rs`, `src/state/policy.rs`).

Deliberate differences from upstream, all of which make the state a function of its contents
rather than of the order of updates:

* Service endpoints are derived from workload membership (`Workload.services`) on every
  change. Upstream copies endpoints into the Service object when they arrive and filters them
  by health only at that moment; here changing a service's health policy re-filters, and a
  service that is removed and re-added keeps the endpoints its workloads still declare
  (until then they show as staged).
* Several services in one namespace may share a VIP; upstream keeps only the newest per
  namespace under that VIP, so removing it hides the other from VIP lookups.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from ztunnel.core.model import (
    Authorization,
    Endpoint,
    Service,
    StateDelta,
    StateSnapshot,
    Workload,
)
from ztunnel.core.state_index import (
    Tables,
    addr_key,
    apply_delta,
    empty_tables,
    info_key,
)

_EMPTY: Mapping[str, Endpoint] = MappingProxyType({})


class ProxyState:
    """Workloads, services and policies with upstream's indexes; immutable."""

    __slots__ = ("_t",)

    def __init__(self, tables: Tables) -> None:
        self._t = tables

    @classmethod
    def empty(cls, local_node: str | None = None) -> ProxyState:
        return cls(empty_tables(local_node))

    @classmethod
    def from_snapshot(cls, snap: StateSnapshot, local_node: str | None = None) -> ProxyState:
        delta = StateDelta(workloads=snap.workloads, services=snap.services, policies=snap.policies)
        return cls(apply_delta(empty_tables(local_node), delta, owned=True))

    def apply(self, delta: StateDelta) -> ProxyState:
        """A new state with `delta` applied; this one is left unchanged."""
        if delta.is_empty():
            return self
        return ProxyState(apply_delta(self._t, delta))

    def to_snapshot(self) -> StateSnapshot:
        """The contents, each kind in the order of its last upsert.

        Ties are broken by that order (the first service on a VIP or CIDR, the newest
        workload on an IP), so a state rebuilt from this snapshot answers exactly as this one.
        """
        t = self._t
        return StateSnapshot(
            workloads=tuple(t.workloads.values()),
            services=tuple(t.services.values()),
            policies=tuple(t.policies.values()),
        )

    @property
    def local_node(self) -> str | None:
        return self._t.local_node

    # --- workloads ----------------------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self._t.workloads.get(uid)

    def workloads(self) -> Iterable[Workload]:
        return self._t.workloads.values()

    def workloads_by_ip(self, network: str, ip: str) -> tuple[Workload, ...]:
        """Every workload at `network/ip`, oldest first (HostNetwork workloads are not indexed)."""
        uids = self._t.workloads_by_addr.get(addr_key(network, ip), ())
        return tuple(self._t.workloads[u] for u in uids)

    def workload_by_ip(self, network: str, ip: str) -> Workload | None:
        """The workload at `network/ip`; on a conflict prefer pods, then HBONE, then the newest.

        Upstream's `WorkloadByAddr::get` ranks by (uid names a Pod, protocol is HBONE) and
        `max_by_key` returns the last of equal maxima.
        """
        uids = self._t.workloads_by_addr.get(addr_key(network, ip))
        if not uids:
            return None
        best: Workload | None = None
        best_rank = (False, False)
        for uid in uids:
            w = self._t.workloads[uid]
            rank = ("//Pod/" in w.uid, w.protocol == "HBONE")
            if best is None or rank >= best_rank:
                best, best_rank = w, rank
        return best

    def workloads_by_identity(self, identity: str) -> tuple[Workload, ...]:
        uids = self._t.workloads_by_identity.get(identity, ())
        return tuple(self._t.workloads[u] for u in uids)

    def has_local_workload_with_identity(self, identity: str) -> bool:
        """Whether a workload on the local node still runs as `identity` (cert forgetting, §8.5)."""
        node = self._t.local_node
        return any(node is None or w.node == node for w in self.workloads_by_identity(identity))

    def find_by_info(self, name: str, namespace: str, service_account: str) -> Workload | None:
        """The local-node workload with this name, namespace and service account (§14.4).

        Only workloads whose node is the local node are indexed (all when it is unset); when
        several match, the most recently updated one wins.
        """
        uids = self._t.workloads_by_info.get(info_key(name, namespace, service_account))
        if not uids:
            return None
        return self._t.workloads[next(reversed(uids))]

    # --- services -----------------------------------------------------------------------------

    def service_by_key(self, key: str) -> Service | None:
        """The service named `namespace/hostname`."""
        return self._t.services.get(key)

    def services(self) -> Iterable[Service]:
        return self._t.services.values()

    def services_by_vip(self, network: str, ip: str) -> tuple[Service, ...]:
        keys = self._t.services_by_vip.get(addr_key(network, ip), ())
        return tuple(self._t.services[k] for k in keys)

    def services_by_hostname(self, hostname: str) -> tuple[Service, ...]:
        """Every service with this hostname, one per namespace (`ServiceStore::get_by_host`)."""
        keys = self._t.services_by_host.get(hostname, {})
        return tuple(self._t.services[k] for k in keys.values())

    def best_service_by_hostname(
        self, hostname: str, client_namespace: str | None
    ) -> Service | None:
        """`ServiceStore::get_best_by_host`: the visible service in the client's namespace,
        else the last canonical one, else the first."""
        visible = [
            s
            for s in self.services_by_hostname(hostname)
            if client_namespace is None or _visible_to(s, client_namespace)
        ]
        return _best_match(visible, client_namespace)

    def services_for_workload(self, w: Workload) -> tuple[Service, ...]:
        """The known services `w` is an endpoint of (`ServiceStore::get_by_workload`)."""
        found = (self._t.services.get(k) for k in w.services)
        return tuple(s for s in found if s is not None)

    def best_service_by_vip(
        self, network: str, ip: str, client_namespace: str | None
    ) -> Service | None:
        """Upstream's `ServiceStore::get_best_by_vip` (§10).

        Among the services on this exact VIP that the client may see: one in the client's
        namespace, else the last canonical one, else the first. Failing that, the CIDR VIPs
        containing `ip`, ranked by (client's namespace, longest prefix, canonical).
        """
        visible = [
            s
            for s in self.services_by_vip(network, ip)
            if client_namespace is None or _visible_to(s, client_namespace)
        ]
        best = _best_match(visible, client_namespace)
        if best is not None:
            return best
        return self._best_by_cidr_vip(network, ip, client_namespace)

    def _best_by_cidr_vip(self, network: str, ip: str, ns: str | None) -> Service | None:
        if not self._t.cidr_vips:
            return None
        addr = ipaddress.ip_address(ip)
        best: Service | None = None
        best_rank = (False, -1, False)
        for entry in self._t.cidr_vips:
            if entry.network != network or entry.net.version != addr.version:
                continue
            svc = self._t.services[entry.service_key]
            if addr not in entry.net or (ns is not None and not _visible_to(svc, ns)):
                continue
            rank = (ns is not None and svc.namespace == ns, entry.net.prefixlen, svc.canonical)
            if rank > best_rank:
                best, best_rank = svc, rank
        return best

    def endpoints(self, service_key: str) -> Mapping[str, Endpoint]:
        """uid -> endpoint of a known service, after the health filter (§10.2)."""
        eps = self._t.endpoints.get(service_key)
        return _EMPTY if eps is None else MappingProxyType(eps)

    def staged_services(self) -> Mapping[str, Mapping[str, Endpoint]]:
        """Endpoints declared by workloads for services not (yet) known, by service key."""
        t = self._t
        return MappingProxyType(
            {k: MappingProxyType(v) for k, v in t.members.items() if k not in t.services}
        )

    # --- policies -----------------------------------------------------------------------------

    def policy_by_key(self, key: str) -> Authorization | None:
        return self._t.policies.get(key)

    def policies(self) -> Iterable[Authorization]:
        return self._t.policies.values()

    def policies_for_workload(self, w: Workload) -> tuple[Authorization, ...]:
        """Policies that apply to `w` as a destination (§12.1).

        Namespace-scoped policies of w's namespace, every Global policy, and the policies
        `w.authorization_policies` names (upstream looks those up by key whatever their
        scope). Unknown keys are skipped; a policy reached twice is listed once.
        """
        t = self._t
        keys = dict.fromkeys(t.policies_by_namespace.get(w.namespace, ()))
        keys.update(t.policies_global)
        keys.update(dict.fromkeys(w.authorization_policies))
        found = (t.policies.get(k) for k in keys)
        return tuple(p for p in found if p is not None)

    # --- counts for metrics -------------------------------------------------------------------

    @property
    def num_workloads(self) -> int:
        return len(self._t.workloads)

    @property
    def num_services(self) -> int:
        return len(self._t.services)

    @property
    def num_policies(self) -> int:
        return len(self._t.policies)

    @property
    def num_vips(self) -> int:
        return len(self._t.services_by_vip)

    @property
    def num_staged_services(self) -> int:
        t = self._t
        return sum(1 for k in t.members if k not in t.services)


def _visible_to(svc: Service, client_namespace: str) -> bool:
    """`Service::visible_to`: Namespace-visibility services are seen only from their namespace."""
    return svc.visibility != "Namespace" or svc.namespace == client_namespace


def _best_match(candidates: Iterable[Service], client_namespace: str | None) -> Service | None:
    """`ServiceMatch::find_best_match`: client namespace, else last canonical, else first."""
    chosen: Service | None = None
    for svc in candidates:
        if client_namespace is not None and svc.namespace == client_namespace:
            return svc
        if svc.canonical or chosen is None:
            chosen = svc
    return chosen
