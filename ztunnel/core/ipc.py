"""Supervisor <-> worker messages and the Clone-pattern sequencing, without any I/O.

The supervisor publishes sequenced `Published` messages on a ZeroMQ PUB socket; a worker
subscribes first, then says `Hello` on its DEALER socket and receives a full `Snapshot`;
updates queued meanwhile with a sequence above the snapshot's apply in order, and a gap in
the sequence makes the worker ask for a new snapshot (zguide ch.5, "Clone").

Every message carries the schema version. A worker that meets a version it does not speak
exits with `EXIT_SCHEMA_MISMATCH`; new fields get defaults, field types never change.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgspec

from ztunnel.core.errors import SchemaMismatch
from ztunnel.core.model import StateDelta, StateSnapshot

SCHEMA_VERSION = 1

# Worker exit codes the supervisor understands (gunicorn's boot-error idea).
EXIT_OK = 0
EXIT_BOOT_ERROR = 3  # could not start (listener bind failed, bad config): do not restart
EXIT_SCHEMA_MISMATCH = 4  # supervisor speaks another schema: restarting cannot help


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="t", omit_defaults=True):
    schema: int = SCHEMA_VERSION


# --- payloads of sequenced updates ---------------------------------------------------------


class StateChanged(_Msg, frozen=True, kw_only=True, tag="state"):
    delta: StateDelta


class WorkloadCertificate(msgspec.Struct, frozen=True, kw_only=True):
    """A workload's certificate and key, PEM. Never log the bodies."""

    identity: str
    chain_pem: tuple[str, ...]  # leaf first
    key_pem: str
    roots_pem: tuple[str, ...]
    not_before: float  # unix seconds
    not_after: float


class CertificatesChanged(_Msg, frozen=True, kw_only=True, tag="certs"):
    updated: tuple[WorkloadCertificate, ...] = ()
    removed: tuple[str, ...] = ()  # identities


class LogLevelChanged(_Msg, frozen=True, kw_only=True, tag="log"):
    spec: str


Payload = StateChanged | CertificatesChanged | LogLevelChanged


class Published(_Msg, frozen=True, kw_only=True, tag="pub"):
    """One sequenced update on the PUB socket."""

    seq: int
    payload: Payload


class Snapshot(_Msg, frozen=True, kw_only=True, tag="snap"):
    """Everything a worker needs, as of `seq` (sent on join and on gap)."""

    seq: int
    state: StateSnapshot
    certificates: tuple[WorkloadCertificate, ...] = ()
    log_spec: str = "info"


# --- worker -> supervisor (DEALER -> ROUTER) -----------------------------------------------


class Hello(_Msg, frozen=True, kw_only=True, tag="hello"):
    index: int
    pid: int


class ResyncRequest(_Msg, frozen=True, kw_only=True, tag="resync"):
    have_seq: int


class Ack(_Msg, frozen=True, kw_only=True, tag="ack"):
    """Applied everything up to `seq`; also the worker's heartbeat."""

    seq: int
    listening: bool = False


class CounterDelta(msgspec.Struct, frozen=True, array_like=True):
    family: str
    labels: tuple[tuple[str, str], ...]
    value: float


class GaugeValue(msgspec.Struct, frozen=True, array_like=True):
    family: str
    labels: tuple[tuple[str, str], ...]
    value: float


class MetricsPush(_Msg, frozen=True, kw_only=True, tag="metrics"):
    """Counter increments since the last push and absolute gauge values of this worker."""

    counters: tuple[CounterDelta, ...] = ()
    gauges: tuple[GaugeValue, ...] = ()
    final: bool = False


class OnDemandRequest(_Msg, frozen=True, kw_only=True, tag="ondemand"):
    """XDS_ON_DEMAND: the worker missed `name` (`network/ip`, a uid or `ns/host`)."""

    request_id: int
    name: str


class OnDemandReply(_Msg, frozen=True, kw_only=True, tag="ondemand-reply"):
    """The supervisor's answer; the state it implies is in updates up to `seq`."""

    request_id: int
    found: bool
    seq: int


ToWorker = Published | Snapshot | OnDemandReply
FromWorker = Hello | ResyncRequest | Ack | MetricsPush | OnDemandRequest

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


def decode_to_worker(data: bytes) -> ToWorker:
    """Decode a supervisor message; raises SchemaMismatch or msgspec.DecodeError."""
    msg: ToWorker = _to_worker.decode(data)
    _check_schema(msg.schema)
    return msg


def decode_from_worker(data: bytes) -> FromWorker:
    msg: FromWorker = _from_worker.decode(data)
    _check_schema(msg.schema)
    return msg


def _check_schema(schema: int) -> None:
    if schema != SCHEMA_VERSION:
        raise SchemaMismatch(f"peer speaks schema {schema}, this process {SCHEMA_VERSION}")


# --- Clone sequencing ----------------------------------------------------------------------


class Verdict(enum.Enum):
    APPLY = "apply"
    STALE = "stale"  # already covered by the snapshot or applied before
    BUFFERED = "buffered"  # no snapshot yet: kept until one arrives
    RESYNC = "resync"  # a gap: ask for a snapshot, keep buffering


@dataclass(slots=True)
class CloneFollower:
    """The worker's side of Clone: decides what to do with each sequenced update."""

    seq: int | None = None  # last applied sequence; None until the first snapshot
    resyncing: bool = False
    _buffer: list[Published] = field(default_factory=list)
    max_buffer: int = 10_000

    def on_published(self, msg: Published) -> Verdict:
        if self.seq is None or self.resyncing:
            self._keep(msg)
            return Verdict.BUFFERED
        if msg.seq <= self.seq:
            return Verdict.STALE
        if msg.seq != self.seq + 1:
            self.resyncing = True
            self._keep(msg)
            return Verdict.RESYNC
        self.seq = msg.seq
        return Verdict.APPLY

    def on_snapshot(self, snap: Snapshot) -> list[Published]:
        """Adopt a snapshot; returns the buffered updates to apply after it, in order.

        If the buffered updates do not continue the snapshot without a gap, the ones
        after the gap are dropped and `resyncing` stays set so the caller asks again.
        """
        self.seq = snap.seq
        ready: list[Published] = []
        for msg in sorted(self._buffer, key=lambda m: m.seq):
            if msg.seq <= self.seq:
                continue
            if msg.seq != self.seq + 1:
                break
            self.seq = msg.seq
            ready.append(msg)
        gap = any(m.seq > self.seq + 1 for m in self._buffer)
        self._buffer.clear()
        self.resyncing = gap
        return ready

    def _keep(self, msg: Published) -> None:
        if len(self._buffer) >= self.max_buffer:
            # A worker this far behind gets a full snapshot anyway; drop the oldest.
            self._buffer.pop(0)
        self._buffer.append(msg)


@dataclass(slots=True)
class ClonePublisher:
    """The supervisor's side: numbers updates; the latest sequence is the state version."""

    seq: int = 0

    def next(self, payload: Payload) -> Published:
        self.seq += 1
        return Published(seq=self.seq, payload=payload)
