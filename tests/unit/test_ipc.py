"""Supervisor <-> worker codec and Clone sequencing."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.core import ipc
from ztunnel.core.errors import SchemaMismatch
from ztunnel.core.model import (
    Authorization,
    GatewayAddress,
    Match,
    NamespacedHostname,
    NetworkAddress,
    Service,
    StateDelta,
    StateSnapshot,
    StringMatch,
    Workload,
)


def _pub(seq: int) -> ipc.Published:
    return ipc.Published(seq=seq, payload=ipc.LogLevelChanged(spec=f"s{seq}"))


def _snap(seq: int) -> ipc.Snapshot:
    return ipc.Snapshot(seq=seq, state=StateSnapshot())


def test_updates_before_first_snapshot_are_buffered_then_applied_in_order() -> None:
    f = ipc.CloneFollower()
    assert f.on_published(_pub(6)) is ipc.Verdict.BUFFERED
    assert f.on_published(_pub(5)) is ipc.Verdict.BUFFERED
    ready = f.on_snapshot(_snap(4))
    assert [m.seq for m in ready] == [5, 6]
    assert f.seq == 6 and not f.resyncing


def test_updates_covered_by_snapshot_are_dropped() -> None:
    f = ipc.CloneFollower()
    f.on_published(_pub(3))
    assert f.on_snapshot(_snap(3)) == []
    assert f.on_published(_pub(2)) is ipc.Verdict.STALE
    assert f.on_published(_pub(4)) is ipc.Verdict.APPLY


def test_delta_gap_triggers_full_resync() -> None:
    f = ipc.CloneFollower()
    f.on_snapshot(_snap(10))
    assert f.on_published(_pub(11)) is ipc.Verdict.APPLY
    assert f.on_published(_pub(13)) is ipc.Verdict.RESYNC
    assert f.resyncing
    # Until the snapshot arrives, updates keep being buffered rather than applied.
    assert f.on_published(_pub(14)) is ipc.Verdict.BUFFERED
    ready = f.on_snapshot(_snap(12))
    assert [m.seq for m in ready] == [13, 14]
    assert f.seq == 14 and not f.resyncing


def test_snapshot_that_leaves_a_gap_keeps_resyncing() -> None:
    f = ipc.CloneFollower()
    f.on_published(_pub(9))
    ready = f.on_snapshot(_snap(5))
    assert ready == []
    assert f.resyncing and f.seq == 5


def test_buffer_is_bounded() -> None:
    f = ipc.CloneFollower(max_buffer=3)
    for seq in range(10):
        f.on_published(_pub(seq))
    assert [m.seq for m in f.on_snapshot(_snap(6))] == [7, 8, 9]


def test_publisher_numbers_consecutively() -> None:
    p = ipc.ClonePublisher()
    assert [p.next(ipc.LogLevelChanged(spec="x")).seq for _ in range(3)] == [1, 2, 3]


def test_schema_mismatch_is_detected() -> None:
    data = ipc.encode(ipc.Published(schema=99, seq=1, payload=ipc.LogLevelChanged(spec="x")))
    with pytest.raises(SchemaMismatch):
        ipc.decode_to_worker(data)


def test_garbage_is_a_decode_error() -> None:
    with pytest.raises(msgspec.DecodeError):
        ipc.decode_to_worker(b"\x93garbage")


def test_old_reader_ignores_new_fields() -> None:
    """Schema evolution: a newer supervisor may add fields; an older worker still decodes."""

    class NewerAck(msgspec.Struct, tag_field="t", tag="ack", kw_only=True):
        schema: int = ipc.SCHEMA_VERSION
        seq: int
        listening: bool = False
        some_future_field: str = "x"

    msg = ipc.decode_from_worker(msgspec.msgpack.encode(NewerAck(seq=7)))
    assert msg == ipc.Ack(seq=7)


def test_new_reader_defaults_missing_fields() -> None:
    class OlderAck(msgspec.Struct, tag_field="t", tag="ack", kw_only=True):
        schema: int = ipc.SCHEMA_VERSION
        seq: int

    assert ipc.decode_from_worker(msgspec.msgpack.encode(OlderAck(seq=3))) == ipc.Ack(seq=3)


_names = st.text(alphabet="abcdefghij-.", min_size=1, max_size=12)
_ips = st.ip_addresses().map(str)
_gateways = st.builds(
    GatewayAddress,
    destination=st.one_of(
        st.builds(NetworkAddress, network=_names, address=_ips),
        st.builds(NamespacedHostname, namespace=_names, hostname=_names),
    ),
    hbone_mtls_port=st.integers(1, 65535),
)
_workloads = st.builds(
    Workload,
    uid=_names,
    name=_names,
    namespace=_names,
    workload_ips=st.lists(_ips, max_size=3).map(tuple),
    waypoint=st.none() | _gateways,
    protocol=st.sampled_from(["TCP", "HBONE"]),
    services=st.dictionaries(
        _names,
        st.dictionaries(st.integers(1, 65535), st.integers(0, 65535), max_size=2),
        max_size=2,
    ),
    capacity=st.integers(0, 10),
)
_services = st.builds(
    Service,
    name=_names,
    namespace=_names,
    hostname=_names,
    vips=st.lists(st.builds(NetworkAddress, network=_names, address=_ips), max_size=2).map(tuple),
    ports=st.dictionaries(st.integers(1, 65535), st.integers(0, 65535), max_size=3),
    canonical=st.booleans(),
)
_policies = st.builds(
    Authorization,
    name=_names,
    namespace=_names,
    scope=st.sampled_from(["Global", "Namespace", "WorkloadSelector"]),
    action=st.sampled_from(["Allow", "Deny"]),
    rules=st.lists(
        st.lists(
            st.lists(
                st.builds(
                    Match,
                    principals=st.lists(
                        st.builds(
                            StringMatch,
                            kind=st.sampled_from(["Exact", "Prefix", "Suffix", "Presence"]),
                            value=_names,
                        ),
                        max_size=2,
                    ).map(tuple),
                    destination_ports=st.lists(st.integers(1, 65535), max_size=2).map(tuple),
                ),
                max_size=2,
            ).map(tuple),
            max_size=2,
        ).map(tuple),
        max_size=2,
    ).map(tuple),
)


@given(
    workloads=st.lists(_workloads, max_size=4),
    services=st.lists(_services, max_size=3),
    policies=st.lists(_policies, max_size=2),
    seq=st.integers(0, 2**40),
)
def test_snapshot_round_trips(
    workloads: list[Workload], services: list[Service], policies: list[Authorization], seq: int
) -> None:
    snap = ipc.Snapshot(
        seq=seq,
        state=StateSnapshot(
            workloads=tuple(workloads), services=tuple(services), policies=tuple(policies)
        ),
    )
    assert ipc.decode_to_worker(ipc.encode(snap)) == snap


@given(workloads=st.lists(_workloads, max_size=3), removed=st.lists(_names, max_size=3))
def test_delta_round_trips(workloads: list[Workload], removed: list[str]) -> None:
    msg = ipc.Published(
        seq=1,
        payload=ipc.StateChanged(
            delta=StateDelta(workloads=tuple(workloads), removed_services=tuple(removed))
        ),
    )
    assert ipc.decode_to_worker(ipc.encode(msg)) == msg


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    try:
        ipc.decode_to_worker(data)
        ipc.decode_from_worker(data)
    except (msgspec.DecodeError, SchemaMismatch):
        pass


def test_on_demand_messages_round_trip() -> None:
    req = ipc.OnDemandRequest(request_id=7, name="/10.0.0.1")
    assert ipc.decode_from_worker(ipc.encode(req)) == req
    reply = ipc.OnDemandReply(request_id=7, found=True, seq=42)
    assert ipc.decode_to_worker(ipc.encode(reply)) == reply
