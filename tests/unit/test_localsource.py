"""Local config reload: the delta between two versions of LOCAL_XDS_PATH."""

from __future__ import annotations

from ztunnel.core.model import Authorization, Match, Service, StateSnapshot, Workload
from ztunnel.supervisor.localsource import diff


def _w(uid: str, ip: str) -> Workload:
    return Workload(uid=uid, name=uid, namespace="default", workload_ips=(ip,))


def _p(name: str, port: int) -> Authorization:
    rules = (((Match(destination_ports=(port,)),),),)
    return Authorization(
        name=name, namespace="default", scope="Namespace", action="Deny", rules=rules
    )


def test_unchanged_config_gives_an_empty_delta() -> None:
    snap = StateSnapshot(workloads=(_w("a", "10.0.0.1"),), policies=(_p("x", 1),))
    assert diff(snap, snap).is_empty()


def test_changed_and_new_resources_are_upserted_and_missing_ones_removed() -> None:
    svc = Service(name="s", namespace="default", hostname="s.example")
    old = StateSnapshot(
        workloads=(_w("a", "10.0.0.1"), _w("b", "10.0.0.2")),
        services=(svc,),
        policies=(_p("x", 1),),
    )
    new = StateSnapshot(
        workloads=(_w("a", "10.0.0.9"), _w("c", "10.0.0.3")), policies=(_p("x", 2), _p("y", 3))
    )
    d = diff(old, new)
    assert {w.uid for w in d.workloads} == {"a", "c"}
    assert d.removed_workloads == ("b",)
    assert d.removed_services == ("default/s.example",)
    assert {p.name for p in d.policies} == {"x", "y"}
    assert d.touches_policies()
