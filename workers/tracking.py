"""Connection accounting: Istio metrics and access logs for each proxied connection.

`istio_tcp_connections_opened_total` and bytes use the labels computed at open time
(`response_flags="-"`); closed and failed use the final flags (inventory §4.3). Bytes of
live connections are folded into the counters at every metrics push, so a scrape sees
long-lived traffic without a per-chunk counter update.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from workers.metrics import WorkerMetrics
from ztunnel.core import metrics as m
from ztunnel.telemetry import Unquoted

access_log = logging.getLogger("access")


class Flow(Protocol):
    """The bytes of one proxied connection, in upstream's metric directions."""

    @property
    def received(self) -> int:
        """From the downstream peer (the client on outbound, the remote peer on inbound)."""

    @property
    def sent(self) -> int:
        """Back to the downstream peer."""

    def abort(self) -> None: ...


@dataclass(slots=True, eq=False)
class Tracked:
    """One proxied connection from accept to close."""

    flow: Flow
    labels: m.TrafficLabels
    src_addr: str
    dst_addr: str
    src_workload: str | None = None
    dst_workload: str | None = None
    hbone_addr: str | None = None
    dst_identity: str | None = None  # logged instead of the destination's (double HBONE)
    response_flags: str = m.NO_FLAGS
    error: str | None = None
    start: float = field(default_factory=time.monotonic)
    open_labels: m.Labels = ()
    reported_recv: int = 0
    reported_sent: int = 0
    on_close: Callable[[], None] | None = None
    authz: object | None = None  # workers.authz.AuthzContext for inbound connections


class ConnectionTracker:
    """Every live connection of one worker, for drain, metrics and (later) policy checks."""

    __slots__ = ("_empty", "_live", "metrics")

    def __init__(self, metrics: WorkerMetrics) -> None:
        self.metrics = metrics
        self._live: set[Tracked] = set()
        self._empty: asyncio.Event | None = None

    async def wait_empty(self) -> None:
        """Return once no connection is live (used by drain)."""
        if not self._live:
            return
        self._empty = asyncio.Event()
        await self._empty.wait()

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Tracked]:
        return iter(tuple(self._live))

    def socket_opened(self, reporter: m.Reporter) -> None:
        self.metrics.gauge_add(m.TCP_SOCKETS_OPEN, m.socket_labels(reporter), 1)

    def socket_closed(self, reporter: m.Reporter) -> None:
        self.metrics.gauge_add(m.TCP_SOCKETS_OPEN, m.socket_labels(reporter), -1)

    def opened(self, conn: Tracked) -> None:
        conn.open_labels = conn.labels.encode()
        self.metrics.inc(m.TCP_OPENED, conn.open_labels)
        self._live.add(conn)
        if access_log.isEnabledFor(logging.DEBUG):
            access_log.debug("connection opened", extra={"fields": _fields(conn)})

    def closed(self, conn: Tracked) -> None:
        """Account a finished connection; later calls for the same connection do nothing."""
        if conn not in self._live:
            return
        self._live.discard(conn)
        if conn.on_close is not None:
            conn.on_close()
        if not self._live and self._empty is not None:
            self._empty.set()
        self._fold_bytes(conn)
        final = (
            conn.labels.encode(conn.response_flags)
            if conn.response_flags != m.NO_FLAGS
            else conn.open_labels
        )
        self.metrics.inc(m.TCP_CLOSED, final)
        if conn.response_flags != m.NO_FLAGS:
            self.metrics.inc(m.TCP_FAILED, final)
        fields = _fields(conn)
        fields.update(_byte_fields(conn))
        if conn.error is None:
            access_log.info("connection complete", extra={"fields": fields})
        else:
            fields["error"] = conn.error
            access_log.error("connection complete", extra={"fields": fields})

    def fold_live_bytes(self) -> None:
        """Called before each metrics push."""
        for conn in self._live:
            self._fold_bytes(conn)

    def _fold_bytes(self, conn: Tracked) -> None:
        recv, sent = conn.flow.received, conn.flow.sent
        if recv > conn.reported_recv:
            self.metrics.inc(m.TCP_RECEIVED, conn.open_labels, recv - conn.reported_recv)
            conn.reported_recv = recv
        if sent > conn.reported_sent:
            self.metrics.inc(m.TCP_SENT, conn.open_labels, sent - conn.reported_sent)
            conn.reported_sent = sent


def log_failed(src_addr: str, dst_addr: str, reporter: m.Reporter, error: str) -> None:
    """Upstream's `log_early_deny`: a failure before the connection had its full context."""
    access_log.warning(
        "connection failed",
        extra={
            "fields": {
                "src.addr": Unquoted(src_addr),
                "dst.addr": Unquoted(dst_addr),
                "direction": _direction(reporter),
                "error": error,
            }
        },
    )


def _direction(reporter: m.Reporter) -> str:
    return "outbound" if reporter == "source" else "inbound"


def _fields(conn: Tracked) -> dict[str, object]:
    labels = dict(conn.open_labels)
    mtls = conn.labels.security_policy == "mutual_tls"
    fields: dict[str, object] = {"src.addr": Unquoted(conn.src_addr)}
    _put(fields, "src.workload", conn.src_workload)
    _put(fields, "src.namespace", labels.get("source_workload_namespace"))
    if mtls:
        _put(fields, "src.identity", labels.get("source_principal"))
    _put(fields, "src.cluster", labels.get("source_cluster"))
    fields["dst.addr"] = Unquoted(conn.dst_addr)
    if conn.hbone_addr is not None:
        fields["dst.hbone_addr"] = Unquoted(conn.hbone_addr)
    _put(fields, "dst.service", labels.get("destination_service"))
    _put(fields, "dst.workload", conn.dst_workload)
    _put(fields, "dst.namespace", labels.get("destination_workload_namespace"))
    if mtls:
        _put(fields, "dst.identity", conn.dst_identity or labels.get("destination_principal"))
    _put(fields, "dst.cluster", labels.get("destination_cluster"))
    fields["direction"] = _direction(conn.labels.reporter)
    return fields


def _put(fields: dict[str, object], key: str, value: str | None) -> None:
    """Optional fields whose value is missing (or `unknown`) are omitted, as upstream."""
    if value and value != m.UNKNOWN:
        fields[key] = value


def _byte_fields(conn: Tracked) -> dict[str, object]:
    # Istio flips the metric for the source reporter; logs are unflipped (upstream metrics.rs).
    recv, sent = conn.flow.received, conn.flow.sent
    outbound = conn.labels.reporter == "source"
    return {
        "bytes_sent": recv if outbound else sent,
        "bytes_recv": sent if outbound else recv,
        "duration": f"{int((time.monotonic() - conn.start) * 1000)}ms",
    }
