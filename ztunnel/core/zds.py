"""ZDS message rules, acks and snapshot reconcile without I/O (upstream src/inpod/protocol.rs).

istio-cni (the server) sends one `WorkloadRequest` per SOCK_SEQPACKET packet; the pod's
network-namespace fd rides along as SCM_RIGHTS on `AddWorkload` only. ztunnel (the client)
answers every request with `WorkloadResponse{ack{error}}`, an empty error meaning success
(reference §14). This module turns a received packet (payload + fds) into a `Request` or a
`ZdsError`, keeps the per-connection snapshot bookkeeping of upstream's
`WorkloadProxyManagerState` (statemanager.rs), and encodes the few messages both sides send.
The socket work lives in `ztunnel.supervisor.zds` (client) and `controlplane.cni` (server).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ztunnel.core.config import WorkloadInfo
from ztunnel.core.errors import ZtunnelError
from ztunnel.gen import zds_pb2

MAX_MESSAGE = 1024  # bytes: upstream reads every packet into a 1024-byte buffer
PENDING_RETRY = 5.0  # seconds between retries of proxies that failed to start (RETRY_DURATION)

# Reconnect backoff (workloadmanager.rs): 10 ms doubling to 15 s; announce failures add ±20 %.
BACKOFF_INITIAL = 0.010  # seconds
BACKOFF_MAX = 15.0  # seconds
BACKOFF_JITTER = 0.2  # fraction either side


# --- errors -----------------------------------------------------------------------------------


class ZdsError(ZtunnelError):
    """A request ztunnel refuses; `ack_error` is the NACK text sent back to the node agent."""

    reason = "zds"
    prefix = "failure to process message"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def ack_error(self) -> str:
        # Upstream formats `anyhow!("failure to read message : {:?}", e)`: note the spaces.
        return f"{self.prefix} : {self.detail}"


class ZdsReadError(ZdsError):
    """The packet itself is bad (size, fds, protobuf). Upstream NACKs and reconnects."""

    reason = "zds_read"
    prefix = "failure to read message"


class ZdsProtocolError(ZdsError):
    """A well-formed request that breaks the protocol (Keep after snapshot, 2nd snapshot,
    Add without workload_info). Upstream NACKs and exits 1; the client here NACKs and
    reconnects instead, so a confused node agent cannot take every pod's proxy down."""

    reason = "zds_protocol"

    def __init__(self, detail: str) -> None:
        super().__init__(f"protocol error: {detail}")


def start_failure(detail: str) -> str:
    """NACK text for a proxy that could not start; the connection is kept (workloadmanager.rs)."""
    return f"failure to start proxy : {detail}"


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddWorkload:
    """Start a proxy for pod `uid` inside the netns behind `netns_fd` (owned by the receiver)."""

    uid: str
    info: WorkloadInfo
    netns_fd: int


@dataclass(frozen=True, slots=True)
class KeepWorkload:
    """Snapshot only: the pod still exists, keep its proxy (no fd)."""

    uid: str


@dataclass(frozen=True, slots=True)
class DelWorkload:
    """Stop the proxy of pod `uid` at once (idempotent)."""

    uid: str


@dataclass(frozen=True, slots=True)
class SnapshotSent:
    """Every existing pod has been sent; drop proxies of pods that were not."""


Request = AddWorkload | KeepWorkload | DelWorkload | SnapshotSent


def parse_request(payload: bytes, fds: list[int], *, truncated: bool = False) -> Request | ZdsError:
    """One received packet -> a `Request`, or the error to NACK.

    `fds` are the descriptors received with the packet (SCM_RIGHTS), `truncated` says the
    kernel set MSG_TRUNC or MSG_CTRUNC. On success an `AddWorkload` owns the single fd.
    On error nothing is kept: **the caller closes every fd in `fds`** (`close_fds`), which
    is what prevents a hostile or buggy node agent from leaking descriptors into ztunnel.
    The checks run in upstream's order (`get_workload_data`): fd count first, then
    truncation, then the protobuf, then the fd/message pairing.
    """
    if len(fds) > 1:
        return ZdsReadError(f"Expected 1 FD, got {len(fds)}")
    if truncated:
        return ZdsReadError("received truncated message")
    req = zds_pb2.WorkloadRequest()
    try:
        req.ParseFromString(payload)
    except DecodeError as e:
        return ZdsReadError(f"failed to decode WorkloadRequest: {e}")
    kind = req.WhichOneof("payload")
    if kind is None:
        return ZdsReadError("no payload")
    if kind == "add":
        return _add(req.add, fds)
    if fds:
        return ZdsReadError("Unexpected control message")
    if kind == "keep":
        return KeepWorkload(uid=req.keep.uid)
    if kind == "del":
        return DelWorkload(uid=getattr(req, "del").uid)  # `del` is a Python keyword
    return SnapshotSent()


def _add(add: zds_pb2.AddWorkload, fds: list[int]) -> AddWorkload | ZdsError:
    if not fds:
        return ZdsReadError("No control message")
    if not add.HasField("workload_info"):
        # Upstream raises this one while processing (statemanager.rs), hence a protocol error.
        return ZdsProtocolError("workload_info is required but not present")
    wi = add.workload_info
    info = WorkloadInfo(name=wi.name, namespace=wi.namespace, service_account=wi.service_account)
    return AddWorkload(uid=add.uid, info=info, netns_fd=fds[0])


def close_fds(fds: Iterable[int]) -> None:
    """Close received descriptors, ignoring ones already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- encoding -----------------------------------------------------------------------------------


def encode_hello() -> bytes:
    return zds_pb2.ZdsHello(version=zds_pb2.V1).SerializeToString()


def decode_hello(payload: bytes) -> int:
    """The version a client announced (0 when absent); raises ZdsReadError if undecodable."""
    hello = zds_pb2.ZdsHello()
    try:
        hello.ParseFromString(payload)
    except DecodeError as e:
        raise ZdsReadError(f"failed to decode ZdsHello: {e}") from None
    return int(hello.version)


def encode_ack(error: str = "") -> bytes:
    """`WorkloadResponse{ack{error}}`; an empty error is an ACK."""
    return zds_pb2.WorkloadResponse(ack=zds_pb2.Ack(error=error)).SerializeToString()


def decode_ack(payload: bytes) -> str:
    """The error text of an ack ("" = success); raises ZdsReadError if it is not an ack."""
    resp = zds_pb2.WorkloadResponse()
    try:
        resp.ParseFromString(payload)
    except DecodeError as e:
        raise ZdsReadError(f"failed to decode WorkloadResponse: {e}") from None
    if resp.WhichOneof("payload") != "ack":
        raise ZdsReadError("response without ack")
    return resp.ack.error


def encode_add(uid: str, info: WorkloadInfo | None) -> bytes:
    """An AddWorkload (the fd is sent beside it); `info=None` omits workload_info."""
    add = zds_pb2.AddWorkload(uid=uid)
    if info is not None:
        add.workload_info.CopyFrom(
            zds_pb2.WorkloadInfo(
                name=info.name, namespace=info.namespace, service_account=info.service_account
            )
        )
    return zds_pb2.WorkloadRequest(add=add).SerializeToString()


def encode_keep(uid: str) -> bytes:
    return zds_pb2.WorkloadRequest(keep=zds_pb2.KeepWorkload(uid=uid)).SerializeToString()


def encode_del(uid: str) -> bytes:
    req = zds_pb2.WorkloadRequest()
    getattr(req, "del").uid = uid  # `del` is a Python keyword
    return req.SerializeToString()


def encode_snapshot_sent() -> bytes:
    return zds_pb2.WorkloadRequest(snapshot_sent=zds_pb2.SnapshotSent()).SerializeToString()


# --- snapshot reconcile ------------------------------------------------------------------------


class SnapshotState:
    """Per-connection snapshot bookkeeping (upstream `WorkloadProxyManagerState`).

    Before `SnapshotSent`, Add and Keep record the uid as "still exists"; Del forgets it.
    `SnapshotSent` names the running proxies that were not re-sent: the caller drains them.
    A proxy that failed to start is pending until it starts or is deleted; the node is
    ready for pods ("workload proxy manager") once the snapshot is in and nothing is
    pending. Every new connection starts over (`on_connect`).
    """

    __slots__ = ("_names", "_pending", "snapshot_received")

    def __init__(self) -> None:
        self.snapshot_received = False
        self._names: set[str] = set()
        self._pending: set[str] = set()

    @property
    def ready(self) -> bool:
        return self.snapshot_received and not self._pending

    @property
    def pending(self) -> frozenset[str]:
        return frozenset(self._pending)

    def on_connect(self) -> None:
        self.snapshot_received = False
        self._names.clear()
        self._pending.clear()

    def on_add(self, uid: str) -> None:
        """An Add arrived (the caller then starts the proxy and reports started/failed)."""
        if not self.snapshot_received:
            self._names.add(uid)

    def on_keep(self, uid: str) -> ZdsProtocolError | None:
        if self.snapshot_received:
            return ZdsProtocolError("pod keep received after snapshot")
        self._names.add(uid)
        return None

    def on_del(self, uid: str) -> bool:
        """True when the proxy must be stopped now; before the snapshot the reconcile will."""
        self._pending.discard(uid)
        if not self.snapshot_received:
            self._names.discard(uid)
            return False
        return True

    def on_snapshot(self, running: Iterable[str]) -> frozenset[str] | ZdsProtocolError:
        """The running uids to drain: those not re-sent since the connection began."""
        if self.snapshot_received:
            return ZdsProtocolError("pod snapshot received already")
        drain = frozenset(running) - self._names
        self._names.clear()
        self.snapshot_received = True
        return drain

    def on_started(self, uid: str) -> None:
        self._pending.discard(uid)

    def on_failed(self, uid: str) -> None:
        self._pending.add(uid)


class ReconnectBackoff:
    """Delay before the next connection attempt: doubles from 10 ms to 15 s, jittered.

    `rand` is a uniform draw in [0, 1) supplied by the caller (the core has no rng).
    """

    __slots__ = ("_next", "initial", "jitter", "maximum")

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        jitter: float = BACKOFF_JITTER,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.jitter = jitter
        self._next = initial

    def next_delay(self, rand: float) -> float:
        base = self._next
        self._next = min(base * 2, self.maximum)
        return base * (1 + self.jitter * (2 * rand - 1))

    def reset(self) -> None:
        self._next = self.initial
