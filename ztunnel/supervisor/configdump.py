"""`/config_dump` in upstream's JSON shape (`src/admin.rs::ConfigDump`)."""

from __future__ import annotations

from ztunnel.core.config import Config
from ztunnel.core.configdump import (
    endpoint_to_json,
    policy_to_json,
    service_to_json,
    workload_to_json,
)
from ztunnel.core.model import StateSnapshot
from ztunnel.core.state import ProxyState
from ztunnel.version import BuildInfo


def build(
    state: ProxyState,
    *,
    static: StateSnapshot | None,
    build: BuildInfo,
    config: Config,
    certificates: list[dict[str, object]] | None = None,
) -> dict[str, object]:
    snap = state.to_snapshot()
    return {
        "workloads": [workload_to_json(w) for w in sorted(snap.workloads, key=lambda w: w.uid)],
        "services": [
            service_to_json(s, state.endpoints(s.key()))
            for s in sorted(snap.services, key=lambda s: s.hostname)
        ],
        "policies": [policy_to_json(p) for p in sorted(snap.policies, key=lambda p: p.key())],
        "stagedServices": {
            key: {uid: endpoint_to_json(ep) for uid, ep in eps.items()}
            for key, eps in sorted(state.staged_services().items())
        },
        "staticConfig": _static(static),
        "version": build.to_dump(),
        "config": config.to_dump(),
        "certificates": certificates or [],
    }


def _static(snap: StateSnapshot | None) -> dict[str, object]:
    if snap is None:
        return {"workloads": [], "policies": [], "services": []}
    return {
        "workloads": [workload_to_json(w) for w in snap.workloads],
        "policies": [policy_to_json(p) for p in snap.policies],
        "services": [service_to_json(s, {}) for s in snap.services],
    }
