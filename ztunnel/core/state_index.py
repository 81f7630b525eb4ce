"""The state's index tables and the copy-on-write transaction that applies a StateDelta to them.

`Tables` is the whole indexed state as plain dicts, immutable by convention: a delta never
mutates a table it did not create. `apply_delta` opens a `_Txn` over the current tables; each
table (and each inner bucket of a nested table) is copied the first time the delta writes to
it, so untouched tables and buckets are shared between the old and the new state. Building
from a snapshot is the same transaction over empty, already-owned tables, so it copies nothing.

Upstream keeps these indexes in `src/state/workload.rs::WorkloadStore`,
`src/state/service.rs::ServiceStore` and `src/state/policy.rs::PolicyStore` and mutates them
under a lock (§7.4 of the inventory); here every mutation produces a new `Tables`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Generic, NamedTuple, TypeVar

from ztunnel.core.model import Authorization, Endpoint, Service, StateDelta, Workload

K = TypeVar("K")
V = TypeVar("V")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# (name, namespace, service account): upstream's WorkloadInfo (`src/state.rs`).
InfoKey = tuple[str, str, str]


class CidrEntry(NamedTuple):
    """One CIDR VIP of a service, pre-parsed for longest-prefix matching."""

    network: str
    net: IPNetwork
    service_key: str


@dataclass(frozen=True, slots=True)
class Tables:
    """Every index of the state. Multi-valued buckets are dicts used as ordered sets."""

    local_node: str | None
    workloads: dict[str, Workload]  # uid -> workload
    workloads_by_addr: dict[str, dict[str, None]]  # "network/ip" -> uids (not HostNetwork)
    workloads_by_identity: dict[str, dict[str, None]]  # spiffe identity -> uids
    workloads_by_info: dict[InfoKey, dict[str, None]]  # local-node workloads only
    services: dict[str, Service]  # "namespace/hostname" -> service
    services_by_vip: dict[str, dict[str, None]]  # "network/ip" -> service keys
    services_by_host: dict[str, dict[str, str]]  # hostname -> {namespace: service key}
    cidr_vips: tuple[CidrEntry, ...]
    # Every endpoint a workload declares, keyed by service key, whether or not the service
    # is known. Entries for unknown services are upstream's "staged services".
    members: dict[str, dict[str, Endpoint]]
    # Known services only, after the health filter: what load balancing reads.
    endpoints: dict[str, dict[str, Endpoint]]
    policies: dict[str, Authorization]  # "namespace/name" -> policy
    policies_global: dict[str, None]  # keys of every Global policy, whatever its namespace
    policies_by_namespace: dict[str, dict[str, None]]  # Namespace-scoped policy keys


def empty_tables(local_node: str | None) -> Tables:
    return Tables(
        local_node=local_node,
        workloads={},
        workloads_by_addr={},
        workloads_by_identity={},
        workloads_by_info={},
        services={},
        services_by_vip={},
        services_by_host={},
        cidr_vips=(),
        members={},
        endpoints={},
        policies={},
        policies_global={},
        policies_by_namespace={},
    )


def include_endpoint(service: Service, endpoint: Endpoint) -> bool:
    """Upstream's health filter (`Service::should_include_endpoint`)."""
    if endpoint.status == "Healthy":
        return True
    lb = service.load_balancer
    return lb is not None and lb.health_policy == "AllowAll"


def addr_key(network: str, ip: str) -> str:
    return f"{network}/{ip}"


def info_key(name: str, namespace: str, service_account: str) -> InfoKey:
    return (name, namespace, service_account)


# --- copy-on-write tables -------------------------------------------------------------------


class _Flat(Generic[K, V]):
    """A dict copied on its first write."""

    __slots__ = ("_owned", "data")

    def __init__(self, base: dict[K, V], owned: bool) -> None:
        self.data = base
        self._owned = owned

    def set(self, key: K, value: V) -> None:
        self._own()[key] = value

    def pop(self, key: K) -> V | None:
        if key not in self.data:
            return None
        return self._own().pop(key)

    def _own(self) -> dict[K, V]:
        if not self._owned:
            self.data = dict(self.data)
            self._owned = True
        return self.data


class _Nested(Generic[K, V]):
    """A dict of dicts; the outer dict and each inner bucket are copied on their first write."""

    __slots__ = ("_outer", "_owned_buckets", "data")

    def __init__(self, base: dict[K, dict[str, V]], owned: bool) -> None:
        self.data = base
        self._outer = owned
        # With owned tables every bucket is fresh, so none needs a copy.
        self._owned_buckets: set[K] | None = None if owned else set()

    def set(self, key: K, member: str, value: V) -> None:
        if self._owned_buckets is None:  # fast path while building from a snapshot
            self.data.setdefault(key, {})[member] = value
        else:
            self._bucket(key)[member] = value

    def discard(self, key: K, member: str) -> None:
        bucket = self.data.get(key)
        if bucket is None or member not in bucket:
            return
        if len(bucket) == 1:
            self.drop(key)
        else:
            del self._bucket(key)[member]

    def replace(self, key: K, bucket: dict[str, V]) -> None:
        if not bucket:
            self.drop(key)
            return
        self._own()[key] = bucket
        if self._owned_buckets is not None:
            self._owned_buckets.add(key)

    def drop(self, key: K) -> None:
        if key in self.data:
            del self._own()[key]
            if self._owned_buckets is not None:
                self._owned_buckets.discard(key)

    def _bucket(self, key: K) -> dict[str, V]:
        outer = self._own()
        if self._owned_buckets is None:
            return outer.setdefault(key, {})
        if key not in self._owned_buckets:
            outer[key] = dict(outer.get(key, ()))
            self._owned_buckets.add(key)
        return outer[key]

    def _own(self) -> dict[K, dict[str, V]]:
        if not self._outer:
            self.data = dict(self.data)
            self._outer = True
        return self.data


# --- the transaction ------------------------------------------------------------------------


class _Txn:
    """Applies upserts and removals to copy-on-write views of one `Tables`."""

    def __init__(self, base: Tables, owned: bool) -> None:
        self.local_node = base.local_node
        self.workloads = _Flat(base.workloads, owned)
        self.by_addr = _Nested(base.workloads_by_addr, owned)
        self.by_identity = _Nested(base.workloads_by_identity, owned)
        self.by_info = _Nested(base.workloads_by_info, owned)
        self.services = _Flat(base.services, owned)
        self.by_vip = _Nested(base.services_by_vip, owned)
        self.by_host = _Nested(base.services_by_host, owned)
        self._base_cidr = base.cidr_vips
        self._cidr: list[CidrEntry] | None = None  # our own copy, once written
        self.members = _Nested(base.members, owned)
        self.endpoints = _Nested(base.endpoints, owned)
        self.policies = _Flat(base.policies, owned)
        self.policies_global = _Flat(base.policies_global, owned)
        self.policies_by_ns = _Nested(base.policies_by_namespace, owned)

    def finish(self) -> Tables:
        return Tables(
            local_node=self.local_node,
            workloads=self.workloads.data,
            workloads_by_addr=self.by_addr.data,
            workloads_by_identity=self.by_identity.data,
            workloads_by_info=self.by_info.data,
            services=self.services.data,
            services_by_vip=self.by_vip.data,
            services_by_host=self.by_host.data,
            cidr_vips=self._base_cidr if self._cidr is None else tuple(self._cidr),
            members=self.members.data,
            endpoints=self.endpoints.data,
            policies=self.policies.data,
            policies_global=self.policies_global.data,
            policies_by_namespace=self.policies_by_ns.data,
        )

    # workloads (`WorkloadStore::insert` / `remove` plus the endpoint bookkeeping of
    # `ProxyStateUpdateMutator::insert_workload` in src/xds.rs)

    def upsert_workload(self, w: Workload) -> None:
        self.remove_workload(w.uid)
        self.workloads.set(w.uid, w)
        if w.network_mode != "HostNetwork":
            for ip in w.workload_ips:
                self.by_addr.set(addr_key(w.network, ip), w.uid, None)
        self.by_identity.set(w.identity(), w.uid, None)
        if self._is_local(w):
            self.by_info.set(info_key(w.name, w.namespace, w.service_account), w.uid, None)
        for key, ports in w.services.items():
            self._add_member(key, Endpoint(workload_uid=w.uid, port=ports, status=w.status))

    def remove_workload(self, uid: str) -> None:
        prev = self.workloads.pop(uid)
        if prev is None:
            return
        if prev.network_mode != "HostNetwork":
            for ip in prev.workload_ips:
                self.by_addr.discard(addr_key(prev.network, ip), uid)
        self.by_identity.discard(prev.identity(), uid)
        if self._is_local(prev):
            self.by_info.discard(info_key(prev.name, prev.namespace, prev.service_account), uid)
        for key in prev.services:
            self.members.discard(key, uid)
            self.endpoints.discard(key, uid)

    def _is_local(self, w: Workload) -> bool:
        return self.local_node is None or w.node == self.local_node

    def _add_member(self, key: str, ep: Endpoint) -> None:
        self.members.set(key, ep.workload_uid, ep)
        svc = self.services.data.get(key)
        if svc is not None and include_endpoint(svc, ep):
            self.endpoints.set(key, ep.workload_uid, ep)

    # services (`ServiceStore::insert_internal` / `remove`)

    def upsert_service(self, svc: Service) -> None:
        key = svc.key()
        prev = self.services.pop(key)  # re-added last: see `ProxyState.to_snapshot`
        if prev is not None:
            self._unindex_service(prev, key)
        self.services.set(key, svc)
        for vip in svc.vips:
            self.by_vip.set(addr_key(vip.network, vip.address), key, None)
        self.by_host.set(svc.hostname, svc.namespace, key)
        if svc.cidr_vips:
            self._cidr_list().extend(_cidr_entry(c.network, c.cidr, key) for c in svc.cidr_vips)
        members = self.members.data.get(key, {})
        self.endpoints.replace(key, {u: e for u, e in members.items() if include_endpoint(svc, e)})

    def remove_service(self, key: str) -> None:
        prev = self.services.pop(key)
        if prev is not None:
            self._unindex_service(prev, key)
            self.endpoints.drop(key)

    def _unindex_service(self, prev: Service, key: str) -> None:
        for vip in prev.vips:
            self.by_vip.discard(addr_key(vip.network, vip.address), key)
        self.by_host.discard(prev.hostname, prev.namespace)
        if prev.cidr_vips:
            self._cidr = [c for c in self._cidr_list() if c.service_key != key]

    def _cidr_list(self) -> list[CidrEntry]:
        if self._cidr is None:
            self._cidr = list(self._base_cidr)
        return self._cidr

    # policies (`PolicyStore::insert` / `remove`: a new scope moves the policy between indexes)

    def upsert_policy(self, policy: Authorization) -> None:
        key = policy.key()
        self.remove_policy(key)
        self.policies.set(key, policy)
        if policy.scope == "Global":
            self.policies_global.set(key, None)
        elif policy.scope == "Namespace":
            self.policies_by_ns.set(policy.namespace, key, None)

    def remove_policy(self, key: str) -> None:
        prev = self.policies.pop(key)
        if prev is None:
            return
        if prev.scope == "Global":
            self.policies_global.pop(key)
        elif prev.scope == "Namespace":
            self.policies_by_ns.discard(prev.namespace, key)


def _cidr_entry(network: str, cidr: str, key: str) -> CidrEntry:
    return CidrEntry(network, ipaddress.ip_network(cidr, strict=False), key)


def apply_delta(base: Tables, delta: StateDelta, *, owned: bool = False) -> Tables:
    """Apply one delta: upserts (workloads, services, policies), then removals.

    Workloads go before services so a service upserted in the same delta filters its
    endpoints once, over the final membership. `owned=True` means `base` is fresh and private
    to the caller (building from a snapshot), so nothing needs copying.
    """
    txn = _Txn(base, owned)
    for w in delta.workloads:
        txn.upsert_workload(w)
    for svc in delta.services:
        txn.upsert_service(svc)
    for policy in delta.policies:
        txn.upsert_policy(policy)
    for uid in delta.removed_workloads:
        txn.remove_workload(uid)
    for key in delta.removed_services:
        txn.remove_service(key)
    for key in delta.removed_policies:
        txn.remove_policy(key)
    return txn.finish()
