"""DNS proxy decisions: name expansion, service matching and answers (upstream `src/dns/*`).

Pure: bytes and parsed messages in, decisions and bytes out; the rng is an argument. The
glue in `workers/dns.py` owns the sockets, the forwarder, the clock, metrics and logs.

Wire format is dnspython's (`dns.message`, `dns.name`, `dns.rdata`): the maintained pure
Python DNS library, typed (py.typed), with no native code and no required dependencies. It
parses hostile packets into exceptions rather than crashes and renders with name
compression and truncation (`to_wire(max_size=..., prefer_truncation=True)`), which we
would otherwise have to write and fuzz ourselves. Only its message types are used here;
none of its resolver or socket code is.

Behaviour follows the inventory §13 (`src/dns/server.rs`, `handler.rs`). Deliberate
differences, each safer or more exact and none visible to a well-behaved client:

* Query names match hostnames case-insensitively (RFC 4343). Kubernetes and Istio
  hostnames are lowercase DNS-1123 names, so only mixed-case queries behave differently.
  A name whose labels are not hostname characters (escaped dots, binary) is forwarded.
* Only class IN queries are answered from the mesh; CH, ANY and the rest are forwarded.
* EDNS version > 0 gets BADVERS (RFC 6891 §6.1.3), as hickory's server does before the
  handler runs; version 0 is echoed with the DO bit and max(512, client payload).
* A UDP message with QR=1 is dropped rather than answered with FORMERR: answering
  responses is how two servers (or one, spoofed) ping-pong forever. Over TCP it is FORMERR.
* The access log's `endpoints` is the number of addresses answered; upstream logs the
  answer count before it adds the address records (0, or 1 for the CNAME).
* A UDP answer too big for the client drops whole RRsets and sets TC (RFC 2181 §9);
  hickory fills the datagram with part of an RRset. Either way the client retries on TCP.
"""

from __future__ import annotations

import functools
import ipaddress
import random
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ztunnel.core.config import Config, ProxyMode
from ztunnel.core.metrics import Labels
from ztunnel.core.model import Service, Workload
from ztunnel.core.state import ProxyState

TTL = 30  # seconds, every locally generated record (`DEFAULT_TTL_SECONDS`)
HEADER_LEN = 12
MIN_UDP_PAYLOAD = 512  # RFC 1035 UDP limit; also the EDNS payload floor we echo
MAX_MESSAGE = 65535  # the TCP length prefix's range
RA = 0x0080  # header flag bits, for replies built without parsing the query
_AA_BIT = 0x04  # AA within the third header byte
_QR = 0x8000
_OPCODE_MASK = 0x7800
_RD = 0x0100
_TC = 0x0200
_A, _AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
_IN = dns.rdataclass.IN

# --- metrics (src/dns/metrics.rs); counters are pushed without `_total` --------------------

REQUESTS = "istio_dns_requests"
UPSTREAM_REQUESTS = "istio_dns_upstream_requests"
UPSTREAM_FAILURES = "istio_dns_upstream_failures"
UPSTREAM_DURATION = "istio_dns_upstream_request_duration_seconds"
DURATION_BUCKETS = (0.0005, 0.001, 0.01, 0.1, 1.0, 5.0)  # seconds, upstream's buckets
# Prometheus' `le` spelling of each bound (prometheus_client floatToGoString), then +Inf.
_LE = ("0.0005", "0.001", "0.01", "0.1", "1.0", "5.0", "+Inf")
# request_query_type values: a fixed set, so a client cannot mint label values (#936).
QUERY_TYPE_LABELS = frozenset(
    {"a", "aaaa", "any", "caa", "cname", "dnskey", "ds", "https", "mx", "naptr", "ns", "ptr"}
    | {"soa", "srv", "svcb", "txt"}
)
OTHER_QUERY_TYPE = "other"
UNKNOWN = "unknown"


def query_type_label(rdtype: int) -> str:
    """The `request_query_type` label: lowercase type name from a fixed set, else `other`."""
    text = dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype)).lower()
    return text if text in QUERY_TYPE_LABELS else OTHER_QUERY_TYPE


def dns_labels(query_type: str, protocol: str, client: Workload | None) -> Labels:
    """DnsLabels in upstream's order; a missing source encodes as `unknown`."""
    return (
        ("request_query_type", query_type),
        ("request_protocol", protocol),
        ("source_canonical_service", (client.canonical_name if client else "") or UNKNOWN),
        ("source_canonical_revision", (client.canonical_revision if client else "") or UNKNOWN),
    )


def duration_samples(labels: Labels, seconds: float) -> list[tuple[str, Labels, float]]:
    """Counter increments for one histogram observation: cumulative buckets, sum, count."""
    out = [
        (f"{UPSTREAM_DURATION}_bucket", (*labels, ("le", le)), 1.0)
        for bound, le in zip((*DURATION_BUCKETS, float("inf")), _LE, strict=True)
        if seconds <= bound
    ]
    out.append((f"{UPSTREAM_DURATION}_sum", labels, seconds))
    out.append((f"{UPSTREAM_DURATION}_count", labels, 1.0))
    return out


# --- settings and resolv.conf --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResolvConf:
    """What the forwarder and dedicated-mode search need from a resolv.conf."""

    nameservers: tuple[str, ...] = ()  # IPs, IPv6 possibly with a %scope
    search: tuple[str, ...] = ()  # normalised: lowercase, no trailing dot
    use_vc: bool = False  # `options use-vc` / `tcp`: always TCP upstream


def parse_resolv_conf(text: str) -> ResolvConf:
    """glibc's reading: the last `search` or `domain` line wins; bad nameservers are skipped."""
    servers: list[str] = []
    search: tuple[str, ...] = ()
    use_vc = False
    for raw in text.splitlines():
        words = raw.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        key, args = words[0], words[1:]
        if key == "nameserver" and args and _is_ip(args[0]):
            servers.append(args[0])
        elif key in ("search", "domain"):
            search = tuple(d for d in map(normalize, args) if d)
        elif key == "options":
            use_vc = use_vc or any(o in ("use-vc", "tcp") for o in args)
    return ResolvConf(nameservers=tuple(servers), search=search, use_vc=use_vc)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Settings:
    """The configuration an answer depends on (spec §1, §13)."""

    cluster_domain: str = "cluster.local"
    proxy_mode: ProxyMode = "shared"
    resolv_search: tuple[str, ...] = ()  # the search list of ztunnel's resolv.conf
    ipv6_enabled: bool = True
    preferred_namespace: str | None = None

    @classmethod
    def from_config(cls, config: Config, resolv: ResolvConf) -> Settings:
        return cls(
            cluster_domain=normalize(config.cluster_domain),
            proxy_mode=config.proxy_mode,
            resolv_search=resolv.search,
            ipv6_enabled=config.ipv6_enabled,
            preferred_namespace=config.prefered_service_namespace,
        )


# --- names ---------------------------------------------------------------------------------

_HOST_LABEL = re.compile(rb"[A-Za-z0-9_*-]{1,63}")


def normalize(name: str) -> str:
    """Lowercase, without the trailing dot: the form hostnames are indexed in."""
    return name.strip().rstrip(".").lower()


def mesh_name(qname: dns.name.Name) -> str | None:
    """The query name as a lowercase hostname, or None if no label could be a hostname's."""
    labels = qname.labels[:-1] if qname.is_absolute() else qname.labels
    if not all(_HOST_LABEL.fullmatch(label) for label in labels):
        return None
    return b".".join(labels).decode("ascii").lower()


def search_domains(
    mode: ProxyMode, client_ns: str, cluster_domain: str, resolv_conf_search: Sequence[str]
) -> tuple[str, ...]:
    """Shared mode assumes Kubernetes' pod search list; dedicated mode uses resolv.conf's.

    Upstream's SystemForwarder: a shared ztunnel's own resolv.conf is the node's, not the
    pod's, so it hardcodes `<ns>.svc.<domain> svc.<domain> <domain>` (ztunnel#555).
    """
    if mode == "shared":
        return (f"{client_ns}.svc.{cluster_domain}", f"svc.{cluster_domain}", cluster_domain)
    return tuple(resolv_conf_search)


def has_domain(name: str, domain: str) -> bool:
    """`name` ends with the labels of `domain` and has more labels (`name_util.rs`)."""
    return (
        bool(domain)
        and not domain.startswith("*")
        and name.endswith("." + domain)
        and len(name) > len(domain) + 1
    )


def trim_domain(name: str, domain: str) -> str | None:
    """`name` without `domain`, or None when it does not end with it (or nothing is left)."""
    return name[: -len(domain) - 1] if has_domain(name, domain) else None


def kube_fqdns(name: str, client_ns: str, cluster_domain: str) -> list[str]:
    """The Kubernetes FQDNs a short name could stand for (`Store::to_kube_fqdns`)."""
    if not name:
        return []
    labels = name.split(".")
    svc_domain = f"svc.{cluster_domain}"
    ns_domain = f"{client_ns}.{svc_domain}"
    if len(labels) == 1:  # <service> in the client's namespace
        return [f"{name}.{ns_domain}"]
    if len(labels) == 2:  # <service>.<ns>, or <pod-hostname>.<subdomain>
        return [f"{name}.{svc_domain}", f"{name}.{ns_domain}"]
    if len(labels) == 3:  # <service>.<ns>.svc, and <pod-hostname>.<subdomain>.<ns>
        out = [f"{name}.{cluster_domain}"] if labels[-1] == "svc" else []
        return [*out, f"{name}.{svc_domain}"]
    if len(labels) == 4 and labels[-1] == "svc":  # <pod-hostname>.<subdomain>.<ns>.svc
        return [f"{name}.{cluster_domain}"]
    return []


@dataclass(frozen=True, slots=True)
class Alias:
    """A name to look up for the query; `stripped` is set when a search domain was removed.

    `stripped` is the query name less that search domain (the CNAME target), for the
    stripped name itself and for each Kubernetes FQDN expanded from it.
    """

    name: str
    stripped: str | None = None


def expand_aliases(
    name: str, client_ns: str, cluster_domain: str, search: Sequence[str]
) -> list[Alias]:
    """The name, its Kubernetes FQDNs, then per matching search domain the stripped name and
    its FQDNs; first occurrence wins (`Store::get_aliases`)."""
    out: dict[str, Alias] = {}

    def add(alias: Alias) -> None:
        out.setdefault(alias.name, alias)

    add(Alias(name))
    for fqdn in kube_fqdns(name, client_ns, cluster_domain):
        add(Alias(fqdn))
    for domain in search:
        stripped = trim_domain(name, domain)
        if stripped is None:
            continue
        add(Alias(stripped, stripped))
        for fqdn in kube_fqdns(stripped, client_ns, cluster_domain):
            add(Alias(fqdn, stripped))
    return list(out.values())


def wildcards(name: str) -> list[str]:
    """The name, then `*.<parent>` for each parent with at least one label (`get_wildcards`)."""
    out = [name]
    labels = name.split(".")
    out.extend("*." + ".".join(labels[i:]) for i in range(1, len(labels)))
    return out


# --- matching ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Match:
    """The service found for a query: via which alias and which (possibly wildcard) name."""

    service: Service
    name: str
    alias: Alias

    @property
    def wildcard(self) -> bool:
        return self.name == "*" or self.name.startswith("*.")


def best_service(
    candidates: Iterable[Service], client_ns: str | None, preferred_ns: str | None
) -> Service | None:
    """`ServiceMatch::find_best_match`: the client's namespace at once; otherwise the last
    canonical service, else the last in the preferred namespace, else the first."""
    chosen: Service | None = None
    canonical = False
    for svc in candidates:
        if client_ns is not None and svc.namespace == client_ns:
            return svc
        if svc.canonical:
            chosen, canonical = svc, True
        elif chosen is None or (svc.namespace == preferred_ns and not canonical):
            chosen = svc
    return chosen


def find_server(
    state: ProxyState,
    aliases: Sequence[Alias],
    client: Workload,
    preferred_ns: str | None,
    cluster_domain: str,
) -> Match | None:
    """The first alias, tried exactly then by wildcards of decreasing specificity, that names
    a service with VIPs (or a headless Kubernetes one) visible to the client
    (`Store::find_server`). Workload and headless-pod names are not answered (ztunnel#1119)."""
    headless_suffix = f".svc.{cluster_domain}"
    for alias in aliases:
        for name in wildcards(alias.name):
            found = [
                s
                for s in state.services_by_hostname(name)
                if (s.vips or s.hostname.endswith(headless_suffix))
                and (s.visibility != "Namespace" or s.namespace == client.namespace)
            ]
            # Upstream passes "" when PREFERED_SERVICE_NAMESPACE is unset.
            service = best_service(found, client.namespace, preferred_ns or "")
            if service is not None:
                return Match(service, name, alias)
    return None


def family_allowed(service: Service, rdtype: int, ipv6_enabled: bool) -> bool:
    """`service_family_allowed`: AAAA needs IPV6_ENABLED; single-family services answer one.

    Headless services need this: their pods may be dual-stack though the service is not.
    """
    if rdtype == _AAAA and not ipv6_enabled:
        return False
    if service.ip_families == "IPv4":
        return rdtype != _AAAA
    if service.ip_families == "IPv6":
        return rdtype != _A
    return True


def addresses(
    state: ProxyState,
    service: Service,
    client: Workload,
    rdtype: int,
    rng: random.Random,
) -> list[str]:
    """VIPs of the family on the client's network; for a headless service, the first IP of
    the family of each endpoint workload. Shuffled for DNS load balancing."""
    v6 = rdtype == _AAAA
    if service.vips:
        out = [
            v.address
            for v in service.vips
            if (":" in v.address) == v6 and v.network == client.network
        ]
    else:
        out = []
        for uid in state.endpoints(service.key()):
            w = state.workload_by_uid(uid)
            ip = next((a for a in w.workload_ips if (":" in a) == v6), None) if w else None
            if ip is not None:
                out.append(ip)
    rng.shuffle(out)
    return out


# --- messages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed standard query with exactly one question."""

    message: dns.message.Message
    wire: bytes

    @property
    def name(self) -> dns.name.Name:
        return self.message.question[0].name

    @property
    def rdtype(self) -> int:
        return int(self.message.question[0].rdtype)

    @property
    def rdclass(self) -> int:
        return int(self.message.question[0].rdclass)

    @property
    def type_text(self) -> str:
        """For logs: `A`, `AAAA`, `TYPE65280`."""
        return dns.rdatatype.to_text(self.message.question[0].rdtype)

    @property
    def udp_limit(self) -> int:
        """The largest UDP response the client takes: its EDNS payload, at least 512."""
        if self.message.edns < 0:
            return MIN_UDP_PAYLOAD
        return max(MIN_UDP_PAYLOAD, self.message.payload)


@dataclass(frozen=True, slots=True)
class Reply:
    """A finished response, already rendered (errors)."""

    wire: bytes
    rcode: int
    result: str  # the access log's `result`


@dataclass(frozen=True, slots=True)
class Answer:
    """An authoritative mesh answer, rendered per transport (and per rotation) by `render`."""

    query: Query
    result: str  # the access log's `result`
    addresses: tuple[str, ...] = ()  # in answer order: already shuffled
    cname: dns.name.Name | None = None  # the stripped name the query name points at

    @property
    def endpoints(self) -> int:
        return len(self.addresses)

    def render(self, max_size: int, rotation: int = 0) -> bytes:
        """Wire form within `max_size` (records that do not fit are dropped, TC set), with
        the addresses rotated left by `rotation`: another order of the same answer."""
        resp = _response(self.query)
        resp.flags |= dns.flags.AA
        owner = self.query.name
        if self.cname is not None:
            resp.answer.append(dns.rrset.from_rdata(owner, TTL, _cname(self.cname)))
            owner = self.cname
        if self.addresses:
            k = rotation % len(self.addresses)
            order = self.addresses[k:] + self.addresses[:k]
            rdatas = [_rdata(self.query.rdtype, a) for a in order]
            resp.answer.append(dns.rrset.from_rdata_list(owner, TTL, rdatas))
        # want_shuffle=False: dnspython shuffles RRsets with the global `random` by default;
        # the order is ours (the rng's shuffle, then the rotation).
        return resp.to_wire(max_size=max_size, prefer_truncation=True, want_shuffle=False)


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours to answer: send it upstream."""


FORWARD = Forward()
Decision = Answer | Forward | Reply

# What parsing hostile bytes may raise. dnspython documents DNSException subclasses; the
# rest are defensive: a parser corner case must become FORMERR, not a dead listener.
_PARSE_ERRORS = (
    dns.exception.DNSException,
    ValueError,
    IndexError,
    KeyError,
    TypeError,
    UnicodeError,
    struct.error,
)


def parse_query(wire: bytes, *, tcp: bool) -> Query | Reply | None:
    """A query to answer, an error reply, or None to drop the packet silently.

    Order as hickory's server: unreadable ⇒ FORMERR; a response ⇒ FORMERR (dropped over
    UDP, see the module notes); opcode other than QUERY ⇒ NOTIMP; then our own checks: not
    exactly one question ⇒ FORMERR; EDNS version > 0 ⇒ BADVERS.
    """
    if len(wire) < HEADER_LEN:
        return None  # not even an id to answer
    flags = int.from_bytes(wire[2:4], "big")
    if flags & _QR:
        return _header_reply(wire, dns.rcode.FORMERR, "response as request") if tcp else None
    if flags & _OPCODE_MASK:
        return _header_reply(wire, dns.rcode.NOTIMP, "unimplemented opcode")
    try:
        message = dns.message.from_wire(wire)
    except _PARSE_ERRORS:
        return _header_reply(wire, dns.rcode.FORMERR, "malformed query")
    if len(message.question) != 1:
        return _header_reply(wire, dns.rcode.FORMERR, "not exactly one question")
    query = Query(message, wire)
    if message.edns > 0:
        return error_reply(query, dns.rcode.BADVERS, "unsupported EDNS version")
    return query


def _header_reply(wire: bytes, rcode: dns.rcode.Rcode, result: str) -> Reply:
    """A header-only reply for a query we cannot (or need not) parse further."""
    qid, flags = struct.unpack_from("!HH", wire)
    out = _QR | (flags & (_OPCODE_MASK | _RD)) | RA | int(rcode)
    return Reply(struct.pack("!6H", qid, out, 0, 0, 0, 0), int(rcode), result)


def _response(query: Query) -> dns.message.Message:
    """The response skeleton: id, question, RD copied, RA=1, EDNS echoed (`handler.rs`)."""
    msg = query.message
    resp = dns.message.make_response(
        msg, recursion_available=True, our_payload=max(MIN_UDP_PAYLOAD, msg.payload)
    )
    if msg.edns >= 0 and msg.ednsflags & dns.flags.DO:
        resp.ednsflags |= dns.flags.DO
    return resp


def error_reply(query: Query, rcode: dns.rcode.Rcode, result: str) -> Reply:
    """An error response that keeps the question and the EDNS echo."""
    resp = _response(query)
    resp.set_rcode(rcode)
    try:
        return Reply(resp.to_wire(max_size=MAX_MESSAGE), int(rcode), result)
    except dns.exception.DNSException:
        return _header_reply(query.wire, rcode, result)


def servfail(query: Query, result: str) -> Reply:
    return error_reply(query, dns.rcode.SERVFAIL, result)


def servfail_wire(wire: bytes) -> bytes:
    """SERVFAIL for a query known only by its bytes (the forwarding path keeps no parse)."""
    parsed = parse_query(wire, tcp=True)
    if isinstance(parsed, Query):
        return servfail(parsed, "").wire
    return _header_reply(wire, dns.rcode.SERVFAIL, "").wire


def rcode_text(rcode: int) -> str:
    """`NXDOMAIN`, `SERVFAIL`, ... for logs."""
    return dns.rcode.to_text(dns.rcode.Rcode.make(rcode))


def answer(
    query: Query,
    client: Workload | None,
    state: ProxyState,
    settings: Settings,
    rng: random.Random,
) -> Decision:
    """Answer A/AAAA for mesh services from the state; forward everything else (§13.2)."""
    if client is None:
        return servfail(query, "unknown source")
    if query.rdtype not in (_A, _AAAA) or query.rdclass != _IN:
        return FORWARD
    name = mesh_name(query.name)
    if name is None:
        return FORWARD
    domain = settings.cluster_domain
    search = search_domains(settings.proxy_mode, client.namespace, domain, settings.resolv_search)
    aliases = expand_aliases(name, client.namespace, domain, search)
    match = find_server(state, aliases, client, settings.preferred_namespace, domain)
    if match is None:
        return FORWARD
    if not family_allowed(match.service, query.rdtype, settings.ipv6_enabled):
        # Not NXDOMAIN: the name exists, it has no records of this type.
        return Answer(query, "service does not support this record type")
    addrs = addresses(state, match.service, client, query.rdtype, rng)
    if not addrs:
        return Answer(query, "no records")
    cname = None
    if match.alias.stripped is not None and not match.wildcard:
        # Found by stripping a search domain: point the asked name at the stripped one.
        cname = _leading_labels(query.name, match.alias.stripped.count(".") + 1)
    return Answer(query, "success", tuple(addrs), cname)


def _leading_labels(name: dns.name.Name, count: int) -> dns.name.Name:
    """The first `count` labels of `name` as an absolute name, keeping the client's case."""
    return dns.name.Name((*name.labels[:count], b""))


def _cname(target: dns.name.Name) -> dns.rdata.Rdata:
    return dns.rdata.from_text(_IN, dns.rdatatype.CNAME, target.to_text())


@functools.lru_cache(maxsize=4096)
def _rdata(rdtype: int, address: str) -> dns.rdata.Rdata:
    """A/AAAA rdata, cached: building one from text costs more than rendering it."""
    return dns.rdata.from_text(_IN, dns.rdatatype.RdataType.make(rdtype), address)


# --- forwarded replies ---------------------------------------------------------------------


def question_end(wire: bytes) -> int | None:
    """Offset just past the first question, or None when the bytes do not hold one."""
    i = HEADER_LEN
    while i < len(wire):
        n = wire[i]
        if n == 0:
            i += 1
            break
        if n & 0xC0 == 0xC0:
            i += 2
            break
        if n & 0xC0:
            return None
        i += 1 + n
    else:
        return None
    i += 4  # qtype, qclass
    return i if i <= len(wire) else None


def with_id(wire: bytes, qid: int) -> bytes:
    return qid.to_bytes(2, "big") + wire[2:]


def as_forwarded(reply: bytes, query: bytes) -> bytes:
    """The upstream reply for the client: its query's id, AA cleared and RA set, as upstream
    sends forwarded answers (non-authoritative, recursion available); the rest as is."""
    return query[:2] + bytes((reply[2] & ~_AA_BIT & 0xFF, reply[3] | RA)) + reply[4:]


def reply_matches(reply: bytes, query: bytes, qend: int) -> bool:
    """Is `reply` the answer to `query`: same id, QR set, same question bytes.

    Error replies (FORMERR, REFUSED...) may come without a question section.
    """
    if len(reply) < HEADER_LEN or reply[:2] != query[:2] or not reply[2] & 0x80:
        return False
    if reply[4:6] == b"\x00\x00" and reply[3] & 0x0F:
        return True
    return reply[HEADER_LEN:qend] == query[HEADER_LEN:qend]


def truncated(reply: bytes) -> bool:
    return len(reply) >= HEADER_LEN and bool(int.from_bytes(reply[2:4], "big") & _TC)


def reply_summary(reply: bytes) -> tuple[int, int]:
    """(rcode, answer count) from the header (extended rcode bits ignored)."""
    return reply[3] & 0x0F, int.from_bytes(reply[6:8], "big")


def fit_udp(reply: bytes, limit: int) -> bytes | None:
    """`reply` within the client's UDP limit: as is when it fits, else re-rendered with the
    records that fit and TC set (the client retries over TCP). None if it cannot be parsed."""
    if len(reply) <= max(limit, MIN_UDP_PAYLOAD):
        return reply
    try:
        msg = dns.message.from_wire(reply)
        return msg.to_wire(max_size=limit, prefer_truncation=True, want_shuffle=False)
    except _PARSE_ERRORS:
        return None
