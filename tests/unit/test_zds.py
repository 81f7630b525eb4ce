"""ZDS: message rules (hardening §4.5), snapshot reconcile, and the client over a real socket.

The client tests run without root: the node agent is `controlplane.cni.FakeCNI` with no
pods, requests go through `send_raw`, and the netns fd is this process's own netns.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.cni import FakeCNI
from ztunnel.core import zds
from ztunnel.core.config import WorkloadInfo
from ztunnel.gen import zds_pb2
from ztunnel.supervisor.zds import ZDSClient

pytestmark = pytest.mark.timeout(20)

INFO = WorkloadInfo(name="web", namespace="default", service_account="web-sa")
ADD = zds.encode_add("uid-1", INFO)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """Three throwaway descriptors (a pipe and /dev/null); whatever is left open is closed."""
    r, w = os.pipe()
    made = [r, w, os.open("/dev/null", os.O_RDONLY)]
    yield made
    zds.close_fds(made)


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# --- parse_request ------------------------------------------------------------------------------


def test_add_with_one_fd_parses_and_owns_the_fd(fds: list[int]) -> None:
    req = zds.parse_request(ADD, fds[:1])
    assert req == zds.AddWorkload(uid="uid-1", info=INFO, netns_fd=fds[0])


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (zds.encode_keep("k"), zds.KeepWorkload(uid="k")),
        (zds.encode_del("d"), zds.DelWorkload(uid="d")),
        (zds.encode_snapshot_sent(), zds.SnapshotSent()),
    ],
)
def test_messages_without_fd_parse(payload: bytes, expected: zds.Request) -> None:
    assert zds.parse_request(payload, []) == expected


def test_del_uses_field_number_two() -> None:
    # DelWorkload.uid is field 2 on the wire (upstream zds.proto), not 1.
    req = zds_pb2.WorkloadRequest.FromString(zds.encode_del("abc"))
    assert getattr(req, "del").uid == "abc"
    assert b"\x12\x03abc" in zds.encode_del("abc")


# Every bad packet of hardening §4.5 that can be judged from the packet alone; the
# number of fds sent, the error class and the exact NACK text.
BAD = [
    ("more than one fd", ADD, 2, False, zds.ZdsReadError, "Expected 1 FD, got 2"),
    ("three fds", ADD, 3, False, zds.ZdsReadError, "Expected 1 FD, got 3"),
    ("fds on Del", zds.encode_del("d"), 2, False, zds.ZdsReadError, "Expected 1 FD, got 2"),
    ("message > 1024 B", ADD, 1, True, zds.ZdsReadError, "received truncated message"),
    ("control truncated", ADD, 0, True, zds.ZdsReadError, "received truncated message"),
    ("no payload", b"", 0, False, zds.ZdsReadError, "no payload"),
    ("unknown field only", b"\x08\x01", 0, False, zds.ZdsReadError, "no payload"),
    ("Add without fd", ADD, 0, False, zds.ZdsReadError, "No control message"),
    ("Del with fd", zds.encode_del("d"), 1, False, zds.ZdsReadError, "Unexpected control message"),
    (
        "Keep with fd",
        zds.encode_keep("k"),
        1,
        False,
        zds.ZdsReadError,
        "Unexpected control message",
    ),
    (
        "SnapshotSent with fd",
        zds.encode_snapshot_sent(),
        1,
        False,
        zds.ZdsReadError,
        "Unexpected control message",
    ),
    (
        "Add without workload_info",
        zds.encode_add("u", None),
        1,
        False,
        zds.ZdsProtocolError,
        "protocol error: workload_info is required but not present",
    ),
]


@pytest.mark.parametrize(
    ("payload", "nfds", "truncated", "cls", "detail"),
    [case[1:] for case in BAD],
    ids=[case[0] for case in BAD],
)
def test_bad_packets_are_rejected(
    fds: list[int],
    payload: bytes,
    nfds: int,
    truncated: bool,
    cls: type[zds.ZdsError],
    detail: str,
) -> None:
    err = zds.parse_request(payload, fds[:nfds], truncated=truncated)
    assert type(err) is cls
    assert isinstance(err, zds.ZdsError)
    assert err.detail == detail


@pytest.mark.parametrize(
    "payload", [b"garbage!", b"\xff\xff\xff", b"\x0a\x02\x0a\xff", b"\x0a\x03\x0a\x01\xc3"]
)
def test_undecodable_payload_is_a_read_error(payload: bytes) -> None:
    err = zds.parse_request(payload, [])
    assert isinstance(err, zds.ZdsReadError)
    assert err.ack_error.startswith("failure to read message : failed to decode WorkloadRequest")


def test_nack_texts_match_upstream_format() -> None:
    assert zds.ZdsReadError("No control message").ack_error == (
        "failure to read message : No control message"
    )
    assert zds.ZdsProtocolError("pod snapshot received already").ack_error == (
        "failure to process message : protocol error: pod snapshot received already"
    )
    assert zds.start_failure("address in use") == "failure to start proxy : address in use"


def test_close_fds_closes_and_tolerates_closed(fds: list[int]) -> None:
    os.close(fds[2])
    zds.close_fds(fds)
    assert not any(_open(fd) for fd in fds)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=1100), nfds=st.integers(0, 3), truncated=st.booleans())
def test_parse_never_raises(payload: bytes, nfds: int, truncated: bool) -> None:
    out = zds.parse_request(payload, list(range(1000, 1000 + nfds)), truncated=truncated)
    assert isinstance(out, zds.ZdsError | zds.AddWorkload | zds.KeepWorkload | zds.DelWorkload)
    if nfds > 1 or truncated:
        assert isinstance(out, zds.ZdsReadError)


# --- encoding -----------------------------------------------------------------------------------


def test_hello_announces_v1() -> None:
    assert zds_pb2.ZdsHello.FromString(zds.encode_hello()).version == zds_pb2.V1
    assert zds.decode_hello(zds.encode_hello()) == 1


@pytest.mark.parametrize("error", ["", "failure to start proxy : boom"])
def test_ack_round_trips(error: str) -> None:
    resp = zds_pb2.WorkloadResponse.FromString(zds.encode_ack(error))
    assert resp.WhichOneof("payload") == "ack" and resp.ack.error == error
    assert zds.decode_ack(zds.encode_ack(error)) == error


@pytest.mark.parametrize("payload", [b"", b"\xff\xff"])
def test_decode_ack_rejects_non_acks(payload: bytes) -> None:
    with pytest.raises(zds.ZdsReadError):
        zds.decode_ack(payload)


# --- SnapshotState ------------------------------------------------------------------------------

# Steps: ("add"|"keep"|"del"|"snap"|"started"|"failed"|"connect", uid); "snap" carries the
# running uids. Expected: the result of the last step, then (snapshot_received, pending, ready).
RECONCILE = [
    (
        "snapshot drains running pods that were not re-sent",
        [("add", "a"), ("snap", {"a", "b", "c"})],
        frozenset({"b", "c"}),
        (True, set(), True),
    ),
    (
        "keep counts as re-sent",
        [("keep", "b"), ("snap", {"b", "c"})],
        frozenset({"c"}),
        (True, set(), True),
    ),
    (
        "del before snapshot forgets the add, so the reconcile drains it",
        [("add", "a"), ("started", "a"), ("del", "a"), ("snap", {"a"})],
        frozenset({"a"}),
        (True, set(), True),
    ),
    (
        "del before snapshot is not an immediate delete",
        [("add", "a"), ("del", "a")],
        False,
        (False, set(), False),
    ),
    (
        "del before snapshot clears pending",
        [("add", "a"), ("failed", "a"), ("del", "a"), ("snap", set())],
        frozenset(),
        (True, set(), True),
    ),
    ("del after snapshot deletes now", [("snap", set()), ("del", "x")], True, (True, set(), True)),
    (
        "del of unknown uid after snapshot is fine",
        [("snap", set()), ("del", "nope")],
        True,
        (True, set(), True),
    ),
    (
        "keep after snapshot is a protocol error",
        [("snap", set()), ("keep", "a")],
        zds.ZdsProtocolError("pod keep received after snapshot"),
        (True, set(), True),
    ),
    (
        "second snapshot is a protocol error",
        [("snap", set()), ("snap", {"a"})],
        zds.ZdsProtocolError("pod snapshot received already"),
        (True, set(), True),
    ),
    (
        "keep of an unknown uid before snapshot is accepted",
        [("keep", "ghost"), ("snap", set())],
        frozenset(),
        (True, set(), True),
    ),
    (
        "pending blocks readiness",
        [("add", "a"), ("failed", "a"), ("snap", {"b"})],
        frozenset({"b"}),
        (True, {"a"}, False),
    ),
    (
        "a pending pod that starts makes it ready",
        [("add", "a"), ("failed", "a"), ("snap", set()), ("started", "a")],
        None,
        (True, set(), True),
    ),
    (
        "adds after the snapshot are not snapshot names",
        [("snap", set()), ("add", "a"), ("connect", ""), ("snap", {"a"})],
        frozenset({"a"}),
        (True, set(), True),
    ),
    (
        "a new connection resets everything",
        [("add", "a"), ("failed", "a"), ("snap", set()), ("connect", "")],
        None,
        (False, set(), False),
    ),
]


def _step(state: zds.SnapshotState, op: str, arg: object) -> object:
    if op == "snap":
        assert isinstance(arg, set)
        return state.on_snapshot(arg)
    assert isinstance(arg, str)
    calls: dict[str, Callable[[str], object]] = {
        "add": state.on_add,
        "keep": state.on_keep,
        "del": state.on_del,
        "started": state.on_started,
        "failed": state.on_failed,
        "connect": lambda _: state.on_connect(),
    }
    return calls[op](arg)


@pytest.mark.parametrize(
    ("steps", "result", "after"),
    [case[1:] for case in RECONCILE],
    ids=[case[0] for case in RECONCILE],
)
def test_snapshot_reconcile(
    steps: list[tuple[str, object]], result: object, after: tuple[bool, set[str], bool]
) -> None:
    state = zds.SnapshotState()
    out: object = None
    for op, arg in steps:
        out = _step(state, op, arg)
    if isinstance(result, zds.ZdsError):
        assert type(out) is type(result) and str(out) == str(result)
    else:
        assert out == result
    assert (state.snapshot_received, set(state.pending), state.ready) == after


def test_backoff_doubles_to_cap_and_resets() -> None:
    b = zds.ReconnectBackoff()
    delays = [b.next_delay(0.5) for _ in range(15)]
    assert delays[:4] == pytest.approx([0.01, 0.02, 0.04, 0.08])
    assert max(delays) == 15.0 and delays[-1] == 15.0
    b.reset()
    assert b.next_delay(0.5) == pytest.approx(0.01)


@pytest.mark.parametrize(("rand", "factor"), [(0.0, 0.8), (0.5, 1.0), (0.999999, 1.2)])
def test_backoff_jitter_is_twenty_percent_either_side(rand: float, factor: float) -> None:
    assert zds.ReconnectBackoff().next_delay(rand) == pytest.approx(0.01 * factor, rel=1e-4)


# --- the client over a real SEQPACKET socket ---------------------------------------------------


class RecordingHandler:
    """A PodHandler that keeps a dup of each netns fd, as the supervisor's does."""

    def __init__(self) -> None:
        self.running: dict[str, int] = {}
        self.infos: dict[str, WorkloadInfo] = {}
        self.calls: list[tuple[str, str]] = []
        self.failing: set[str] = set()

    async def add(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        self.calls.append(("add", uid))
        if uid in self.failing:
            raise OSError(98, "Address already in use")
        self.running[uid] = os.dup(netns_fd)
        self.infos[uid] = info

    async def delete(self, uid: str) -> None:
        self.calls.append(("delete", uid))
        os.close(self.running.pop(uid))

    def known(self) -> set[str]:
        return set(self.running)

    def close(self) -> None:
        zds.close_fds(self.running.values())
        self.running.clear()


class Rig:
    def __init__(self, cni: FakeCNI, client: ZDSClient, handler: RecordingHandler) -> None:
        self.cni = cni
        self.client = client
        self.handler = handler
        self.readiness: list[bool] = []

    async def add(self, uid: str, fds: list[int] | None = None) -> str | None:
        if fds is not None:
            return await self.cni.send_raw(zds.encode_add(uid, INFO), fds)
        fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return await self.cni.send_raw(zds.encode_add(uid, INFO), [fd])
        finally:
            os.close(fd)

    async def until(self, cond: object, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        assert callable(cond)
        async with asyncio.timeout(timeout):
            while not cond():  # noqa: ASYNC110 (polls a plain attribute, no event to wait on)
                await asyncio.sleep(0.005)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    cni = FakeCNI(str(tmp_path / "zds.sock"))
    await cni.start()
    handler = RecordingHandler()
    readiness: list[bool] = []
    client = ZDSClient(
        cni.uds_path, handler, readiness_pending=readiness.append, retry_interval=0.05
    )
    rig = Rig(cni, client, handler)
    rig.readiness = readiness
    task = asyncio.create_task(client.run())
    try:
        await cni.wait_snapshots(1)
        await rig.until(lambda: readiness[-1:] == [False])
        yield rig
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cni.close()
        handler.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_client_says_hello_v1_and_is_ready_after_empty_snapshot(rig: Rig) -> None:
    assert rig.cni.hellos == [zds_pb2.V1]
    assert rig.readiness == [True, False]
    assert (rig.cni.acks[-1].kind, rig.cni.acks[-1].error) == ("snapshot", "")


async def test_readiness_is_pending_from_the_start_without_a_node_agent(tmp_path: Path) -> None:
    readiness: list[bool] = []
    client = ZDSClient(
        str(tmp_path / "absent.sock"), RecordingHandler(), readiness_pending=readiness.append
    )
    task = asyncio.create_task(client.run())
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert readiness == [True]


async def test_add_starts_a_proxy_and_a_repeat_is_idempotent(rig: Rig) -> None:
    assert await rig.add("p1") == ""
    assert await rig.add("p1") == ""
    assert rig.handler.calls == [("add", "p1")]
    assert rig.handler.infos["p1"] == INFO


async def test_del_after_snapshot_stops_the_proxy_and_is_idempotent(rig: Rig) -> None:
    await rig.add("p1")
    assert await rig.cni.send_raw(zds.encode_del("p1")) == ""
    assert await rig.cni.send_raw(zds.encode_del("p1")) == ""
    assert await rig.cni.send_raw(zds.encode_del("never-seen")) == ""
    assert rig.handler.calls == [("add", "p1"), ("delete", "p1")]


async def test_failed_start_is_nacked_pending_and_retried(rig: Rig) -> None:
    rig.handler.failing.add("p1")
    assert await rig.add("p1") == "failure to start proxy : [Errno 98] Address already in use"
    assert rig.client.pending == {"p1"}
    assert rig.readiness[-1] is True  # not ready while a proxy is pending
    await asyncio.sleep(0.12)
    assert rig.handler.calls.count(("add", "p1")) >= 2  # retried with the kept fd
    rig.handler.failing.clear()
    await rig.until(lambda: "p1" in rig.handler.running)
    await rig.until(lambda: rig.readiness[-1] is False)
    assert rig.client.pending == frozenset()


async def test_del_of_a_pending_pod_stops_retries(rig: Rig) -> None:
    rig.handler.failing.add("p1")
    before = _fd_count()
    await rig.add("p1")
    assert await rig.cni.send_raw(zds.encode_del("p1")) == ""
    assert rig.client.pending == frozenset() and rig.readiness[-1] is False
    assert _fd_count() == before  # the fd kept for the retry is gone
    calls = len(rig.handler.calls)
    await asyncio.sleep(0.12)
    assert len(rig.handler.calls) == calls


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (
            zds.encode_keep("k"),
            "failure to process message : protocol error: pod keep received after snapshot",
        ),
        (
            zds.encode_snapshot_sent(),
            "failure to process message : protocol error: pod snapshot received already",
        ),
    ],
    ids=["keep after snapshot", "second snapshot"],
)
async def test_protocol_errors_nack_and_reconnect_without_exiting(
    rig: Rig, payload: bytes, error: str
) -> None:
    await rig.add("p1")
    assert await rig.cni.send_raw(payload) == error
    await rig.cni.wait_snapshots(2)
    assert rig.handler.known() == set()  # the new snapshot did not re-send p1
    assert rig.readiness[-3:] == [False, True, False]


async def test_truncated_payload_is_nacked_and_the_connection_dropped(rig: Rig) -> None:
    big = zds.encode_add("x" * 2000, INFO)
    assert await rig.cni.send_raw(big) == "failure to read message : received truncated message"
    await rig.cni.wait_snapshots(2)


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("two fds", "failure to read message : Expected 1 FD, got 2"),
        ("nine fds", "failure to read message : Expected 1 FD, got 8"),
        ("no fd", "failure to read message : No control message"),
        ("fd on del", "failure to read message : Unexpected control message"),
        ("garbage", "failure to read message : failed to decode WorkloadRequest"),
        ("pipe as netns", "failure to start proxy : fd "),
        ("regular file as netns", "failure to start proxy : fd "),
    ],
    ids=lambda v: v if not v.startswith("failure") else "nack",
)
async def test_malformed_requests_are_nacked_and_every_fd_closed(
    rig: Rig, case: str, error: str
) -> None:
    r, w = os.pipe()
    netns = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    dev_null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    sent = {
        "two fds": (zds.encode_add("u", INFO), [netns, r]),
        "nine fds": (zds.encode_add("u", INFO), [netns] * 9),
        "no fd": (zds.encode_add("u", INFO), []),
        "fd on del": (zds.encode_del("u"), [netns]),
        "garbage": (b"\xff\xfe not a protobuf", [r]),
        "pipe as netns": (zds.encode_add("u", INFO), [r]),
        "regular file as netns": (zds.encode_add("u", INFO), [dev_null]),
    }[case]
    before = _fd_count()
    try:
        answer = await rig.cni.send_raw(*sent)
    finally:
        zds.close_fds([r, w, netns, dev_null])
    assert answer is not None and answer.startswith(error)
    if error.startswith("failure to read message"):
        await rig.cni.wait_snapshots(2)  # dropped and re-established
    else:
        assert rig.cni.connected  # a start failure keeps the connection
        assert rig.client.pending == frozenset()  # an unusable fd is not retried
    assert rig.handler.calls == []
    assert _fd_count() == before - 4
