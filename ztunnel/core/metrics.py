"""Istio metric names and label derivation (`src/proxy/metrics.rs`), as plain data.

Workers count into plain dicts keyed by (family, labels) and push deltas to the supervisor,
which exposes them; this module decides the families and the exact label sets and order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ztunnel.core.model import Service, Workload

Reporter = Literal["source", "destination"]
SecurityPolicy = Literal["mutual_tls", "unknown"]
Labels = tuple[tuple[str, str], ...]

TCP_OPENED = "istio_tcp_connections_opened"
TCP_CLOSED = "istio_tcp_connections_closed"
TCP_FAILED = "istio_tcp_connections_failed"
TCP_RECEIVED = "istio_tcp_received_bytes"
TCP_SENT = "istio_tcp_sent_bytes"
TCP_SOCKETS_OPEN = "istio_tcp_sockets_open"
ON_DEMAND_DNS = "istio_on_demand_dns"

UNKNOWN = "unknown"
NO_FLAGS = "-"


def _v(value: str | None) -> str:
    """Upstream's DefaultedUnknown: a missing or empty value encodes as `unknown`."""
    return value if value else UNKNOWN


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficLabels:
    """CommonTrafficLabels of one connection, computed once when it opens."""

    reporter: Reporter
    source: Workload | None = None
    source_principal: str | None = None
    destination: Workload | None = None
    destination_service: Service | None = None
    security_policy: SecurityPolicy = "unknown"

    def encode(self, response_flags: str = NO_FLAGS) -> Labels:
        """The label pairs in upstream's order; region/zone only when a workload applied."""
        src, dst, svc = self.source, self.destination, self.destination_service
        labels: list[tuple[str, str]] = [("reporter", self.reporter)]
        labels += _source_labels(src, self.source_principal)
        labels += [
            ("destination_service", _v(svc.hostname if svc else None)),
            ("destination_service_namespace", _v(svc.namespace if svc else None)),
            ("destination_service_name", _v(svc.name if svc else None)),
        ]
        labels += _destination_labels(dst)
        labels += [
            ("request_protocol", "tcp"),
            ("response_flags", response_flags),
            ("connection_security_policy", self.security_policy),
        ]
        if src is not None or dst is not None:
            labels += [
                ("source_region", _v(src.locality.region if src else None)),
                ("source_zone", _v(src.locality.zone if src else None)),
                ("destination_region", _v(dst.locality.region if dst else None)),
                ("destination_zone", _v(dst.locality.zone if dst else None)),
            ]
        return tuple(labels)


def _source_labels(w: Workload | None, principal: str | None) -> list[tuple[str, str]]:
    return [
        ("source_workload", _v(w.workload_name if w else None)),
        ("source_canonical_service", _v(w.canonical_name if w else None)),
        ("source_canonical_revision", _v(w.canonical_revision if w else None)),
        ("source_workload_namespace", _v(w.namespace if w else None)),
        # Never from xDS: only the verified peer identity (or our own on outbound HBONE).
        ("source_principal", _v(principal)),
        ("source_app", _v(w.canonical_name if w else None)),
        ("source_version", _v(w.canonical_revision if w else None)),
        ("source_cluster", _v(w.cluster_id if w else None)),
    ]


def _destination_labels(w: Workload | None) -> list[tuple[str, str]]:
    return [
        ("destination_workload", _v(w.workload_name if w else None)),
        ("destination_canonical_service", _v(w.canonical_name if w else None)),
        ("destination_canonical_revision", _v(w.canonical_revision if w else None)),
        ("destination_workload_namespace", _v(w.namespace if w else None)),
        ("destination_principal", _v(w.identity() if w else None)),
        ("destination_app", _v(w.canonical_name if w else None)),
        ("destination_version", _v(w.canonical_revision if w else None)),
        ("destination_cluster", _v(w.cluster_id if w else None)),
    ]


def on_demand_dns_labels(source: Workload, hostname: str) -> Labels:
    """OnDemandDnsLabels (`src/proxy/metrics.rs`): the source workload, then the hostname."""
    return (*_source_labels(source, source.identity()), ("hostname", hostname))


def socket_labels(reporter: Reporter) -> Labels:
    return (("reporter", reporter),)
