"""L4 authorization: Istio AuthorizationPolicy semantics over one connection (`src/rbac.rs`).

`evaluate(policies, conn) -> Decision` is upstream's `ProxyState::assert_rbac` (`src/state.rs`)
minus policy selection, which `ProxyState.policies_for_workload` already does (§12.1). It is
pure: it neither logs nor reads a clock. The authz log lines upstream would emit through
`authpol_log!` come back in `Decision.logs`, and the caller picks the level
(DEBUG, or INFO with AUTHZ_POLICY_INFO_LOGGING).

Evaluation order (§12.2): dry-run DENY matches are logged; the first enforced DENY that
matches rejects; dry-run ALLOW matches are logged; no enforced ALLOW means allow; any ALLOW
that matches allows; otherwise reject. Dry-run policies never change the decision.

Match semantics (§12.3) follow `Authorization::matches`: a policy matches if any rule does,
a rule if all its clauses do, a clause if any of its Matches does; a Match ANDs its field
types, and within a type the positive list needs any entry to match and the `not_` list
needs none to. An empty `rules` never matches; a rule with no clauses and a clause with no
Matches always match. Principals are matched against the peer identity with `spiffe://`
stripped (no identity: no principal entry matches, so `not_principals` pass), namespaces
against the peer's namespace (`""` without identity), service accounts by exact equality on
(namespace, service account) -- never a regex, so `cert-manager.io` cannot match
`cert-managerXio` (GHSA-9gcg-w975-3rjh, RBAC-7) -- and IPs by CIDR containment, where an
IPv4 address is never inside an IPv6 prefix or the reverse.

Fail-closed deviation (istio/istio#61126). Upstream skips a Match whose twelve fields are all
empty, so it never matches. istiod sends exactly that for a rule whose attributes were all
L7 (it strips what ztunnel cannot enforce), so a DENY written with only L7 attributes never
fires and the traffic it meant to stop is allowed. Our rule:

* In a DENY policy an all-empty Match matches every connection, as an AND over zero
  constraints naturally would. A clause holding one therefore matches, and a DENY can only
  become broader, never weaker, when istiod strips parts of it.
* In an ALLOW policy an all-empty Match is skipped as upstream does (it is not a match), so a
  stripped ALLOW grants nothing; that is fail-closed too.
* Everything else is upstream's: empty `rules` never matches (Istio: "If not set, the match
  will never occur"), for DENY as for ALLOW; a rule with no clauses, and a clause with no
  Matches, match.

"All-empty" is judged over the twelve fields this module enforces. A field added to the model
later is unknown until its semantics are written here, and it can only restrict: an ALLOW Match
that sets it is skipped, a DENY Match ignores it (so a DENY Match setting nothing else matches).

The converter's duty (not checkable here): it drops unparseable addresses as upstream does
(`filter_map`), so a positive list whose every entry was invalid arrives empty and then
constrains nothing -- an ALLOW on `source_ips` would admit every source -- and a DENY that lost
one of several entries fires on fewer sources. It must keep a sentinel in place of each
dropped entry instead. Any non-CIDR string works: one that reaches this module unparsed is
resolved toward the restrictive side of the policy's action (it matches every IP in a DENY's
positive list or an ALLOW's `not_` list, and no IP in an ALLOW's positive list or a DENY's
`not_` list).

Each policy is compiled once into nested tuples and kept in an identity-keyed cache (a frozen
Struct would re-hash its whole rule tree on every lookup); IPs are compared as integers.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from msgspec.structs import astuple

from ztunnel.core.identity import PREFIX, Identity
from ztunnel.core.model import Authorization, Match, ServiceAccountMatch, StringMatch

__all__ = [
    "LOG_ALLOW",
    "LOG_DENY",
    "LOG_DRY_RUN_ALLOW",
    "LOG_DRY_RUN_DENY",
    "LOG_DRY_RUN_NO_ALLOW",
    "LOG_NONE_ALLOWED",
    "LOG_NO_ALLOW_POLICIES",
    "NOT_ALLOWED",
    "Connection",
    "Decision",
    "evaluate",
    "matches",
]

# `AuthorizationRejectionError` Display strings (`src/proxy.rs`).
NOT_ALLOWED = "allow policies exist, but none allowed"
_EXPLICITLY_DENIED = "explicitly denied by: "

# `authpol_log!` messages (`src/state.rs::assert_rbac`).
LOG_DRY_RUN_DENY = "dry-run: deny policy match"
LOG_DENY = "deny policy match"
LOG_DRY_RUN_ALLOW = "dry-run: allow policy match"
LOG_DRY_RUN_NO_ALLOW = "dry-run: no allow policies match"
LOG_NO_ALLOW_POLICIES = "no allow policies, allow"
LOG_ALLOW = "allow policy match"
LOG_NONE_ALLOWED = "no allow policies matched"


# --- connection and decision -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """What RBAC sees of a connection (`src/rbac.rs::Connection`).

    `dst_port` is the final target port (after service->target mapping and the app-tunnel
    override), never 15008. IPs are strings; a v4-mapped IPv6 address is read as its IPv4
    address, as upstream canonicalizes socket addresses (`socket::to_canonical`).
    """

    src_ip: str
    src_identity: Identity | None  # None for plaintext (15006) peers
    dst_ip: str
    dst_port: int


@dataclass(frozen=True, slots=True)
class Decision:
    """The verdict, the deciding policy's key (if one decided) and the authz log lines.

    Each log line is the upstream message, followed by ` policy=<ns>/<name>` when upstream
    attaches the policy field.
    """

    allowed: bool
    reason: str
    policy: str | None = None
    logs: tuple[str, ...] = ()


# --- the connection as matched ---------------------------------------------------------------

# IPs are compared as ints. IPv6 keys carry bit 128 and every compiled mask keeps that bit, so
# a v4 address can never fall inside a v6 prefix or the reverse.
_V6 = 1 << 128
_V4_ALL = (1 << 32) - 1


def _ip_key(text: str) -> int:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped
        if mapped is None:
            return int(ip) | _V6
        ip = mapped
    return int(ip)


@dataclass(frozen=True, slots=True)
class _Peer:
    ips: tuple[int, int]  # (source, destination) keys
    port: int
    principal: str | None  # the identity without `spiffe://`; None without identity
    namespace: str  # "" without identity
    service_account: tuple[str, str] | None  # (namespace, service account)


def _peer(conn: Connection) -> _Peer:
    ips = (_ip_key(conn.src_ip), _ip_key(conn.dst_ip))
    ident = conn.src_identity
    if ident is None:
        return _Peer(ips, conn.dst_port, None, "", None)
    principal = str(ident)[len(PREFIX) :]  # upstream strips `spiffe://` before matching
    sa = (ident.namespace, ident.service_account)
    return _Peer(ips, conn.dst_port, principal, ident.namespace, sa)


# --- compiled matchers -----------------------------------------------------------------------
#
# A policy compiles to nested tuples of ints, strings and small sets, not to objects or
# closures: a whole policy set is compiled at once after an update, and the cyclic GC, which
# keeps re-scanning every tracked object created meanwhile, cost several times the compiling.
# Tuples holding only atoms drop out of its sight; sets of up to _SMALL items are tuples too.

_T = TypeVar("_T")
_Set = tuple[_T, ...] | frozenset[_T]
_SMALL = 8
_CidrTable = tuple[tuple[int, _Set[int]], ...]  # (mask, network keys) per prefix length
_StringSet = tuple[_Set[str], tuple[str, ...], tuple[str, ...], bool]  # exact, prefixes, ...
_Ports = tuple[_Set[int], _Set[int]]  # (positive, negative); empty = not constrained
_ServiceAccounts = tuple[_Set[tuple[str, str]], _Set[tuple[str, str]]]
_Cidrs = tuple[_CidrTable | None, _CidrTable | None]  # None = not constrained
_Strings = tuple[_StringSet | None, _StringSet | None]
# One Match: ports, service accounts, destination IPs, source IPs, principals, namespaces;
# None for a field type the Match leaves empty.
_CompiledMatch = tuple[
    _Ports | None,
    _ServiceAccounts | None,
    _Cidrs | None,
    _Cidrs | None,
    _Strings | None,
    _Strings | None,
]
_AnyOf = tuple[_CompiledMatch, ...]
_Rule = tuple[_AnyOf, ...]  # all clauses must match
# (always, alternatives, rules): the policy matches always, or if any alternative does, or if
# any rule does. Single-clause rules are folded into the alternatives (any rule of any Match
# is any Match) and single-field positive Matches there are merged by field, so ten rules
# naming ten CIDRs cost one set lookup per prefix length.
_Compiled = tuple[bool, _AnyOf, tuple[_Rule, ...]]


def _set(values: Iterable[_T]) -> _Set[_T]:
    unique = tuple(dict.fromkeys(values))
    return unique if len(unique) <= _SMALL else frozenset(unique)


def _parse_v4(addr: str, length: str) -> tuple[int, int] | None:
    try:
        a, b, c, d = map(int, addr.split("."))
        bits = int(length)
    except ValueError:
        return None
    # int() also takes signs, spaces, "_" and non-ASCII digits; only the canonical spelling,
    # which is what the converter writes, may take this path.
    if f"{a}.{b}.{c}.{d}" != addr or str(bits) != length or not 0 <= bits <= 32:
        return None
    if not (0 <= a <= 255 and 0 <= b <= 255 and 0 <= c <= 255 and 0 <= d <= 255):
        return None
    mask = _V4_ALL ^ ((1 << (32 - bits)) - 1)
    return mask | _V6, ((a << 24) | (b << 16) | (c << 8) | d) & mask


def _parse_cidr(text: str) -> tuple[int, int] | None:
    """`(mask, network key)` of a CIDR, or None if it does not parse.

    Canonical IPv4 (what the converter writes) takes a fast path; the rest goes through
    `ipaddress` (IPv6, or anything unusual, which then parses or is refused as it would be).
    """
    addr, _, length = text.partition("/")
    if addr.count(".") == 3:
        fast = _parse_v4(addr, length)
        if fast is not None:
            return fast
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    v6 = _V6 if net.version == 6 else 0
    return int(net.netmask) | _V6, int(net.network_address) | v6


def _cidr_table(cidrs: tuple[str, ...], *, invalid_matches: bool) -> _CidrTable:
    by_mask: dict[int, set[int]] = {}
    for text in cidrs:
        parsed = _parse_cidr(text)
        if parsed is None:
            # Should not happen (the model holds canonical CIDRs). Fail closed: the entry
            # matches everything where that restricts, and nothing where that would widen.
            if invalid_matches:
                by_mask.setdefault(0, set()).add(0)  # mask 0 keeps nothing: matches any IP
            continue
        by_mask.setdefault(parsed[0], set()).add(parsed[1])
    return tuple((mask, _set(keys)) for mask, keys in by_mask.items())


def _in_cidrs(key: int, table: _CidrTable) -> bool:
    # A plain loop, not any(): a generator costs more than the lookups (hot path).
    for mask, keys in table:  # noqa: SIM110
        if (key & mask) in keys:
            return True
    return False


def _cidrs_ok(key: int, pos: _CidrTable | None, neg: _CidrTable | None) -> bool:
    if pos is not None and not _in_cidrs(key, pos):
        return False
    return neg is None or not _in_cidrs(key, neg)


def _string_set(matches: tuple[StringMatch, ...]) -> _StringSet | None:
    if not matches:
        return None

    def values(kind: str) -> tuple[str, ...]:
        return tuple(m.value for m in matches if m.kind == kind)

    presence = any(m.kind == "Presence" for m in matches)
    return _set(values("Exact")), values("Prefix"), values("Suffix"), presence


def _in_strings(value: str | None, strings: _StringSet) -> bool:
    if value is None:  # a principal without identity: `strip_prefix("spiffe://")` fails
        return False
    exact, prefixes, suffixes, presence = strings
    return (
        value in exact
        or value.startswith(prefixes)
        or value.endswith(suffixes)
        or (presence and value != "")
    )


def _strings_ok(value: str | None, pos: _StringSet | None, neg: _StringSet | None) -> bool:
    if pos is not None and not _in_strings(value, pos):
        return False
    return neg is None or not _in_strings(value, neg)


def _match_ok(m: _CompiledMatch, peer: _Peer) -> bool:
    """AND across field types, cheapest first (`Authorization::matches`)."""
    ports, service_accounts, destination_ips, source_ips, principals, namespaces = m
    if ports is not None:
        pos_ports, neg_ports = ports
        if (pos_ports and peer.port not in pos_ports) or peer.port in neg_ports:
            return False
    if service_accounts is not None:
        # Exact tuple equality: nothing here is ever compiled into a pattern (RBAC-7).
        pos_sa, neg_sa = service_accounts
        sa = peer.service_account
        if pos_sa and (sa is None or sa not in pos_sa):
            return False
        if sa is not None and sa in neg_sa:
            return False
    if destination_ips is not None and not _cidrs_ok(peer.ips[1], *destination_ips):
        return False
    if source_ips is not None and not _cidrs_ok(peer.ips[0], *source_ips):
        return False
    if principals is not None and not _strings_ok(peer.principal, *principals):
        return False
    return namespaces is None or _strings_ok(peer.namespace, *namespaces)


_FIELDS = tuple(Match.__struct_fields__)
# The fields this module enforces: upstream's `RbacMatch`, each positive list and its `not_`
# twin. A field added to the model later is unknown here until its semantics are written; see
# `_clause_matches`. Positive lists are any-of, so single-field ones merge across a clause.
_MERGEABLE = frozenset(
    (
        "namespaces",
        "service_accounts",
        "principals",
        "source_ips",
        "destination_ips",
        "destination_ports",
    )
)
_KNOWN_FIELDS = _MERGEABLE | {f"not_{f}" for f in _MERGEABLE}


def _set_fields(m: Match) -> list[str]:
    return [f for f, v in zip(_FIELDS, astuple(m), strict=True) if v]


def _cidrs(pos: tuple[str, ...], neg: tuple[str, ...], deny: bool) -> _Cidrs | None:
    if not (pos or neg):
        return None
    return (
        _cidr_table(pos, invalid_matches=deny) if pos else None,
        _cidr_table(neg, invalid_matches=not deny) if neg else None,
    )


def _strings(pos: tuple[StringMatch, ...], neg: tuple[StringMatch, ...]) -> _Strings | None:
    return (_string_set(pos), _string_set(neg)) if pos or neg else None


def _service_accounts(
    pos: tuple[ServiceAccountMatch, ...], neg: tuple[ServiceAccountMatch, ...]
) -> _ServiceAccounts | None:
    def keys(sas: tuple[ServiceAccountMatch, ...]) -> _Set[tuple[str, str]]:
        return _set((a.namespace, a.service_account) for a in sas)

    return (keys(pos), keys(neg)) if pos or neg else None


def _compile_match(m: Match, deny: bool) -> _CompiledMatch:
    pos_ports, neg_ports = m.destination_ports, m.not_destination_ports
    return (
        (_set(pos_ports), _set(neg_ports)) if pos_ports or neg_ports else None,
        _service_accounts(m.service_accounts, m.not_service_accounts),
        _cidrs(m.destination_ips, m.not_destination_ips, deny),
        _cidrs(m.source_ips, m.not_source_ips, deny),
        _strings(m.principals, m.not_principals),
        _strings(m.namespaces, m.not_namespaces),
    )


def _compile_any(matches: list[tuple[Match, list[str]]], deny: bool) -> _AnyOf:
    """Any-of `matches` (with their set fields), single-field positive ones merged by field."""
    merged: dict[str, list[Any]] = {}
    rest: list[Match] = []
    for m, fields in matches:
        if len(fields) == 1 and fields[0] in _MERGEABLE:
            merged.setdefault(fields[0], []).extend(getattr(m, fields[0]))
        else:
            rest.append(m)
    rest += (Match(**{f: tuple(values)}) for f, values in merged.items())
    return tuple(_compile_match(m, deny) for m in rest)


def _clause_matches(clause: tuple[Match, ...], deny: bool) -> list[tuple[Match, list[str]]] | None:
    """The Matches (and their set fields) a clause needs any of; None if it always matches."""
    if not clause:
        return None  # upstream: a clause with no Matches matches
    live: list[tuple[Match, list[str]]] = []
    for m in clause:
        fields = _set_fields(m)
        if not _KNOWN_FIELDS.intersection(fields):  # upstream's `RbacMatch::is_empty`
            if deny:
                # istio/istio#61126, fail closed: upstream skips an all-empty Match, which
                # turns a DENY whose L7-only rule was stripped into a no-op. In a DENY it
                # matches instead, so the clause matches whatever else it holds.
                return None
            continue  # ALLOW: skipped as upstream, so it grants nothing
        if not deny and not _KNOWN_FIELDS.issuperset(fields):
            continue  # ALLOW with a constraint we cannot enforce: grants nothing
        live.append((m, fields))
    return live  # [] when every Match was skipped: the clause never matches


def _compile(policy: Authorization) -> _Compiled:
    deny = policy.action != "Allow"  # upstream partitions on `== Allow`
    flat: list[tuple[Match, list[str]]] = []
    rules: list[_Rule] = []
    for rule in policy.rules:
        clauses = [_clause_matches(c, deny) for c in rule]
        if any(c == [] for c in clauses):
            continue  # a clause that can never match sinks its whole rule
        live = [c for c in clauses if c is not None]
        if not live:
            return (True, (), ())  # no clause constrains: matches everything
        if len(live) == 1:
            flat += live[0]
        else:
            rules.append(tuple(_compile_any(c, deny) for c in live))
    return (False, _compile_any(flat, deny), tuple(rules))


# A Struct is hashed by walking its whole rule tree, so the cache is keyed by identity and
# holds the policy itself, which keeps the id from being reused while the entry lives. It is
# emptied when full rather than kept LRU: replaced policies only age out that way, and a
# hit then costs one dict lookup.
_CACHE_LIMIT = 1 << 16
_cache: dict[int, tuple[Authorization, _Compiled]] = {}


def _compiled(policy: Authorization) -> _Compiled:
    hit = _cache.get(id(policy))
    if hit is not None and hit[0] is policy:
        return hit[1]
    compiled = _compile(policy)
    if len(_cache) >= _CACHE_LIMIT:
        _cache.clear()  # policies replaced by updates are dropped wholesale
    _cache[id(policy)] = (policy, compiled)
    return compiled


def _matches(policy: Authorization, peer: _Peer) -> bool:
    always, alternatives, rules = _compiled(policy)
    if always:
        return True
    for m in alternatives:
        if _match_ok(m, peer):
            return True
    for rule in rules:
        for clause in rule:
            for m in clause:
                if _match_ok(m, peer):
                    break
            else:
                break  # no Match in this clause: the rule fails
        else:
            return True  # every clause matched
    return False


# --- evaluation ------------------------------------------------------------------------------


def matches(policy: Authorization, conn: Connection) -> bool:
    """Whether `policy` matches `conn` (`Authorization::matches`, with the #61126 rule)."""
    return _matches(policy, _peer(conn))


def _logged(message: str, policy: Authorization) -> str:
    return f"{message} policy={policy.key()}"


def evaluate(policies: Iterable[Authorization], conn: Connection) -> Decision:
    """Allow or reject `conn` under the already-selected `policies` (`assert_rbac`, §12.2).

    `policies` is iterated once, in selection order, which decides which DENY is named when
    several match. A malformed IP in `conn` raises ValueError (sockets never produce one).
    """
    deny: list[Authorization] = []
    deny_dry_run: list[Authorization] = []
    allow: list[Authorization] = []
    allow_dry_run: list[Authorization] = []
    for p in policies:
        if p.action == "Allow":
            (allow_dry_run if p.dry_run else allow).append(p)
        else:
            (deny_dry_run if p.dry_run else deny).append(p)
    if not (deny or deny_dry_run or allow or allow_dry_run):
        return Decision(True, LOG_NO_ALLOW_POLICIES, None, (LOG_NO_ALLOW_POLICIES,))

    peer = _peer(conn)
    logs = [_logged(LOG_DRY_RUN_DENY, p) for p in deny_dry_run if _matches(p, peer)]
    for p in deny:
        if _matches(p, peer):
            logs.append(_logged(LOG_DENY, p))
            key = p.key()
            return Decision(False, _EXPLICITLY_DENIED + key, key, tuple(logs))

    dry_allowed = [_logged(LOG_DRY_RUN_ALLOW, p) for p in allow_dry_run if _matches(p, peer)]
    logs += dry_allowed
    if not allow:
        if allow_dry_run and not dry_allowed:
            # Allowed now, but would be rejected if the dry-run ALLOWs were enforced.
            logs.append(LOG_DRY_RUN_NO_ALLOW)
        logs.append(LOG_NO_ALLOW_POLICIES)
        return Decision(True, LOG_NO_ALLOW_POLICIES, None, tuple(logs))
    for p in allow:
        if _matches(p, peer):
            logs.append(_logged(LOG_ALLOW, p))
            return Decision(True, LOG_ALLOW, p.key(), tuple(logs))
    logs.append(LOG_NONE_ALLOWED)
    return Decision(False, NOT_ALLOWED, None, tuple(logs))
