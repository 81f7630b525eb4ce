"""HBONE header values: baggage, traceparent, forwarded, `:authority`, and CONNECT head checks.

Wire formats follow upstream: `src/baggage.rs`, `src/proxy.rs` (`TraceParent`,
`parse_forwarded_host`, `HboneAddress`), `src/proxy/outbound.rs::build_forwarded`. The two
`parse_*_head` functions are our own strict replacement for h2's inbound header validation,
which the connection core switches off (it is slow, treats a bad request as a connection
error, and accepts `Host` in place of `:authority`: hardening.md §1.3).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ztunnel.core.model import Workload

Headers = tuple[tuple[str, str], ...]

REASON_NOT_CONNECT = "expected method CONNECT, got {}"
REASON_NO_AUTHORITY = "no valid authority pseudo header"
REASON_MALFORMED = "malformed request headers"

# --- baggage (src/baggage.rs) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Baggage:
    """The W3C baggage ztunnel sends about a workload; None where the value is unknown."""

    cluster_id: str | None = None
    namespace: str | None = None
    workload_name: str | None = None
    service_name: str | None = None
    revision: str | None = None
    region: str | None = None
    zone: str | None = None

    @classmethod
    def from_workload(cls, w: Workload) -> Baggage:
        """Upstream `Workload::baggage`: empty strings become None."""
        return cls(
            cluster_id=w.cluster_id or None,
            namespace=w.namespace or None,
            workload_name=w.workload_name or None,
            service_name=w.canonical_name or None,
            revision=w.canonical_revision or None,
            region=w.locality.region or None,
            zone=w.locality.zone or None,
        )

    def header(self, workload_type: str) -> str:
        """Upstream `baggage_header_val`: comma-joined, only the items that are set."""
        items = (
            ("k8s.cluster.name", self.cluster_id),
            ("k8s.namespace.name", self.namespace),
            (f"k8s.{workload_type}.name", self.workload_name),
            ("service.name", self.service_name),
            ("service.version", self.revision),
            ("cloud.region", self.region),
            ("cloud.availability_zone", self.zone),
        )
        return ",".join(f"{k}={v}" for k, v in items if v is not None)


def baggage_header(workload: Workload) -> str:
    """The `baggage` header value describing `workload` (request: source, response: destination)."""
    return Baggage.from_workload(workload).header(workload.workload_type)


_BAGGAGE_FIELDS = {
    "k8s.cluster.name": "cluster_id",
    "k8s.namespace.name": "namespace",
    "k8s.deployment.name": "workload_name",
    "k8s.cronjob.name": "workload_name",
    "k8s.pod.name": "workload_name",
    "k8s.job.name": "workload_name",
    "service.name": "service_name",
    "service.version": "revision",
    "cloud.region": "region",
    "cloud.availability_zone": "zone",
}


def _visible_ascii(value: str) -> bool:
    # http's `HeaderValue::to_str` accepts only tab and 0x20..0x7e; upstream then drops the baggage.
    return all(c == "\t" or " " <= c <= "~" for c in value)


def parse_baggage(value: str) -> Baggage:
    """Upstream `parse_baggage_header`; join repeated `baggage` headers with `,` first.

    Items split on `,`, then on `=`; the second piece is the value (empty means None); unknown
    keys are ignored; a later item for the same field wins. Never raises.
    """
    if not _visible_ascii(value):
        return Baggage()
    found: dict[str, str | None] = {}
    for item in value.split(","):
        parts = item.split("=")
        field = _BAGGAGE_FIELDS.get(parts[0]) if len(parts) > 1 else None
        if field is not None:
            found[field] = parts[1] or None
    return Baggage(**found)


# --- traceparent (src/proxy.rs::TraceParent, W3C trace context) ------------------------------


class RandomBits(Protocol):
    """What `TraceParent.new` needs from an rng (`random.Random` fits)."""

    def getrandbits(self, k: int, /) -> int: ...


_TRACEPARENT = re.compile(r"[0-9a-fA-F]{2}-[0-9a-fA-F]{32}-[0-9a-fA-F]{16}-[0-9a-fA-F]{2}")


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A W3C `traceparent`: version, 128-bit trace id, 64-bit parent id, flags."""

    version: int
    trace_id: int
    parent_id: int
    flags: int

    @classmethod
    def new(cls, rng: RandomBits) -> TraceParent:
        """A fresh random id, as upstream gives every outbound connection."""
        return cls(0, rng.getrandbits(128), rng.getrandbits(64), 0)

    @classmethod
    def parse(cls, value: str) -> TraceParent | None:
        """The incoming header if it is exactly 55 characters of `vv-trace-parent-ff` hex."""
        if len(value) != 55 or not value.isascii() or not _TRACEPARENT.fullmatch(value):
            return None
        v, t, p, f = value.split("-")
        return cls(int(v, 16), int(t, 16), int(p, 16), int(f, 16))

    def header(self) -> str:
        """The header value, `00-<32 hex>-<16 hex>-00` (upstream's Debug form)."""
        return f"{self.version:02x}-{self.trace_id:032x}-{self.parent_id:016x}-{self.flags:02x}"

    __str__ = header

    @property
    def trace_id_hex(self) -> str:
        """The trace id alone (upstream's Display): the span and access-log `id`."""
        return f"{self.trace_id:032x}"


# --- forwarded (src/proxy/outbound.rs::build_forwarded, src/proxy.rs::parse_forwarded_host) ---


def format_authority(host: str, port: int) -> str:
    """`ip:port`, `[v6]:port` or `host:port`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarded_header(src_ip: str, src_port: int, host: str | None = None) -> str:
    """`for="<downstream ip:port>"`, plus `;host=<service hostname>` for a service destination."""
    value = f'for="{format_authority(src_ip, src_port)}"'
    return f"{value};host={host}" if host else value


_RUST_WHITESPACE = " \t\n\x0b\x0c\r"


def parse_forwarded_host(value: str) -> str | None:
    """The `host=` of a `Forwarded` value, unquoted; None if absent, empty or not ASCII."""
    if not value.isascii():
        return None
    for raw in value.split(";"):
        part = raw.strip(_RUST_WHITESPACE)
        if part.startswith("host="):
            host = part[5:]
            host = host.removeprefix('"').removesuffix('"')
            return host or None
    return None


# --- :authority (src/proxy.rs::HboneAddress) --------------------------------------------------

_MAX_AUTHORITY = 300
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def _port(text: str) -> int | None:
    if not (0 < len(text) <= 5 and text.isdigit()):
        return None
    port = int(text)
    return port if 0 < port <= 65535 else None


def _ipv6(text: str) -> str | None:
    if "%" in text:  # zone ids never name a pod
        return None
    try:
        return str(ipaddress.IPv6Address(text))
    except ValueError:
        return None


def _ipv4(text: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _host(text: str) -> tuple[str, bool] | None:
    if text[:1].isdigit() and (ip := _ipv4(text)) is not None:
        return ip, True
    if len(text) > 253 or not _HOSTNAME.fullmatch(text):
        return None
    # A last label of digits only is a mistyped IPv4 address, never a DNS name (RFC 3696 §2).
    return None if text.rsplit(".", 1)[-1].isdigit() else (text, False)


def parse_authority(value: str) -> tuple[str, int, bool] | None:
    """`(host, port, is_ip)` for `ip:port`, `[v6]:port` or `host:port`; None otherwise.

    Rejects userinfo, paths, unbracketed IPv6, zone ids and ports outside 1..65535. IP hosts
    come back canonical (`str(ipaddress.ip_address(...))`). Never raises.
    """
    if not value or len(value) > _MAX_AUTHORITY or not value.isascii():
        return None
    if value[0] == "[":
        end = value.find("]")
        host = _ipv6(value[1:end]) if end > 0 and value[end + 1 : end + 2] == ":" else None
        parsed = (host, True) if host is not None else None
        port_text = value[end + 2 :]
    else:
        host_text, colon, port_text = value.rpartition(":")
        parsed = _host(host_text) if colon and host_text else None
    port = _port(port_text)
    if parsed is None or port is None:
        return None
    return parsed[0], port, parsed[1]


# --- request / response heads (RFC 9113 §8.2-§8.5) ---------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
)
_REQUEST_PSEUDO = frozenset((b":method", b":authority", b":scheme", b":path", b":protocol"))
_RESPONSE_PSEUDO = frozenset((b":status",))


def _bad_field_name(name: bytes, value: bytes) -> bool:
    if not _TOKEN.fullmatch(name) or name in _CONNECTION_SPECIFIC:
        return True
    return name == b"te" and value != b"trailers"


def _split_head(
    raw: Iterable[tuple[bytes, bytes]], allowed: frozenset[bytes]
) -> tuple[dict[bytes, bytes], Headers] | None:
    """Pseudo-headers and decoded regular headers, or None if the block is malformed."""
    pseudo: dict[bytes, bytes] = {}
    regular: list[tuple[str, str]] = []
    for name, value in raw:
        if _BAD_VALUE.search(value):
            return None
        if name[:1] == b":":
            if regular or name not in allowed or name in pseudo:
                return None
            pseudo[name] = value
        elif _bad_field_name(name, value):
            return None
        else:
            regular.append((name.decode("latin-1"), value.decode("latin-1")))
    return pseudo, tuple(regular)


def parse_connect_head(raw: Iterable[tuple[bytes, bytes]]) -> tuple[str, Headers] | str:
    """`(authority, headers)` of a well-formed HBONE CONNECT, else the reason for a 400.

    Only `:authority` names the target (never `Host`); `:scheme`, `:path` and `:protocol` make
    a CONNECT malformed (RFC 9113 §8.5). Reasons use upstream's wording (`src/proxy.rs`).
    """
    split = _split_head(raw, _REQUEST_PSEUDO)
    if split is None or b":method" not in split[0]:
        return REASON_MALFORMED
    pseudo, headers = split
    method = pseudo[b":method"]
    if method != b"CONNECT":
        return REASON_NOT_CONNECT.format(method.decode("latin-1"))
    if len(pseudo) != 2 or b":authority" not in pseudo:
        return REASON_NO_AUTHORITY
    authority = pseudo[b":authority"].decode("latin-1")
    if parse_authority(authority) is None:
        return REASON_NO_AUTHORITY
    return authority, headers


def parse_response_head(raw: Iterable[tuple[bytes, bytes]]) -> tuple[int, Headers] | None:
    """`(status, headers)` of a well-formed response head, else None."""
    split = _split_head(raw, _RESPONSE_PSEUDO)
    if split is None:
        return None
    status = split[0].get(b":status", b"")
    if len(status) != 3 or not status.isdigit():
        return None
    return int(status), split[1]


def encode_headers(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """Outbound regular headers as bytes; raises ValueError on a name or value h2 must not send."""
    out = []
    for name, value in headers:
        n, v = name.encode("latin-1"), value.encode("latin-1")
        if not _TOKEN.fullmatch(n) or n in _CONNECTION_SPECIFIC or _BAD_VALUE.search(v):
            raise ValueError(f"invalid header {name!r}")
        out.append((n, v))
    return out
