"""RBAC: upstream's `src/rbac.rs` and `assert_rbac` cases as tables, the #61126 rule, properties."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ztunnel.core import rbac
from ztunnel.core.identity import Identity
from ztunnel.core.model import (
    Authorization,
    Match,
    ServiceAccountMatch,
    StateSnapshot,
    StringMatch,
    Workload,
)
from ztunnel.core.rbac import NOT_ALLOWED, Connection, Decision, evaluate, matches
from ztunnel.core.state import ProxyState

pytestmark = pytest.mark.timeout(60)

Rules = tuple[tuple[tuple[Match, ...], ...], ...]


def exact(v: str) -> StringMatch:
    return StringMatch(kind="Exact", value=v)


def prefix(v: str) -> StringMatch:
    return StringMatch(kind="Prefix", value=v)


def suffix(v: str) -> StringMatch:
    return StringMatch(kind="Suffix", value=v)


PRESENCE = StringMatch(kind="Presence")


def sa(ns: str, name: str) -> ServiceAccountMatch:
    return ServiceAccountMatch(namespace=ns, service_account=name)


def policy(
    name: str,
    rules: Rules,
    *,
    action: str = "Allow",
    namespace: str = "namespace",
    dry_run: bool = False,
    scope: str = "Global",
) -> Authorization:
    return Authorization(
        name=name,
        namespace=namespace,
        scope=scope,  # type: ignore[arg-type]
        action=action,  # type: ignore[arg-type]
        dry_run=dry_run,
        rules=rules,
    )


def one(m: Match) -> Rules:
    """A single rule of a single clause of a single Match."""
    return (((m,),),)


def allow(name: str, rules: Rules, **kw: Any) -> Authorization:
    return policy(name, rules, action="Allow", **kw)


def deny(name: str, rules: Rules, **kw: Any) -> Authorization:
    return policy(name, rules, action="Deny", **kw)


def ident(td: str, ns: str, sa_name: str) -> Identity:
    return Identity(trust_domain=td, namespace=ns, service_account=sa_name)


def conn(src: str, dst: str, port: int, who: Identity | None = None) -> Connection:
    return Connection(src_ip=src, src_identity=who, dst_ip=dst, dst_port=port)


# The three connections of upstream's tests module.
PLAINTEXT = conn("127.0.0.1", "127.0.0.2", 8080)
TLS = conn("127.0.0.1", "127.0.0.2", 8080, ident("td", "namespace", "account"))
TLS_ALT = conn("127.0.0.3", "127.0.0.4", 9090, ident("td-alt", "ns-alt", "sa=alt"))


def in_ns(ns: str, port: int = 80) -> Connection:
    return conn("127.0.0.1", "127.0.0.2", port, ident("td", ns, "account"))


# --- upstream `src/rbac.rs` tests: Authorization::matches -----------------------------------

NESTED = allow(
    "nested",
    (
        (
            (Match(namespaces=(exact("a"),)), Match(namespaces=(exact("b"),))),
            (Match(destination_ports=(80,)),),
        ),
    ),
)
MULTI_RULE = allow(
    "nested",
    (
        ((Match(namespaces=(exact("a"),)),),),
        ((Match(namespaces=(exact("b"),)),),),
    ),
)


def field_cases(
    test: str, field: str, value: tuple[Any, ...], expect: tuple[bool, bool, bool]
) -> list[Any]:
    """Upstream's `rbac_test!`: one Match with one field, against the three connections."""
    pol = allow(field, one(Match(**{field: value})))
    conns = (("plaintext", PLAINTEXT), ("tls", TLS), ("tls_alt", TLS_ALT))
    return [
        pytest.param(pol, c, want, id=f"{test}-{label}")
        for (label, c), want in zip(conns, expect, strict=True)
    ]


UPSTREAM_MATCH_CASES = [
    # rbac_empty_policy
    pytest.param(allow("empty", one(Match())), PLAINTEXT, False, id="empty_policy-empty_match"),
    pytest.param(allow("empty", (((),),)), PLAINTEXT, True, id="empty_policy-empty_clause"),
    pytest.param(allow("empty", ((),)), PLAINTEXT, True, id="empty_policy-empty_rule"),
    pytest.param(allow("empty", ()), PLAINTEXT, False, id="empty_policy-no_rules"),
    # rbac_nesting (the remote-network case is the same connection: RBAC ignores the network)
    pytest.param(NESTED, in_ns("a"), True, id="nesting-namespace_a"),
    pytest.param(NESTED, in_ns("b"), True, id="nesting-namespace_b"),
    pytest.param(NESTED, in_ns("b"), True, id="nesting-remote_network"),
    pytest.param(NESTED, in_ns("bad"), False, id="nesting-wrong_namespace"),
    pytest.param(NESTED, in_ns("b", 12345), False, id="nesting-wrong_port"),
    # rbac_multi_rule
    pytest.param(MULTI_RULE, in_ns("a"), True, id="multi_rule-namespace_a"),
    pytest.param(MULTI_RULE, in_ns("b"), True, id="multi_rule-namespace_b"),
    pytest.param(MULTI_RULE, in_ns("bad"), False, id="multi_rule-wrong_namespace"),
    # rbac_test! fields
    *field_cases("namespaces", "namespaces", (exact("namespace"),), (False, True, False)),
    *field_cases("not_namespaces", "not_namespaces", (exact("namespace"),), (True, False, True)),
    *field_cases(
        "service_accounts", "service_accounts", (sa("namespace", "account"),), (False, True, False)
    ),
    *field_cases(
        "not_service_accounts",
        "not_service_accounts",
        (sa("namespace", "account"),),
        (True, False, True),
    ),
    *field_cases(
        "principals", "principals", (exact("td/ns/namespace/sa/account"),), (False, True, False)
    ),
    *field_cases(
        "not_principals",
        "not_principals",
        (exact("td/ns/namespace/sa/account"),),
        (True, False, True),
    ),
    *field_cases("source_ips", "source_ips", ("127.0.0.1/32",), (True, True, False)),
    *field_cases("not_source_ips", "not_source_ips", ("127.0.0.1/32",), (False, False, True)),
    *field_cases("destination_ips", "destination_ips", ("127.0.0.2/32",), (True, True, False)),
    *field_cases(
        "not_destination_ips", "not_destination_ips", ("127.0.0.2/32",), (False, False, True)
    ),
    # IpNet::new(127.0.0.1, 24), canonical in the model as 127.0.0.0/24
    *field_cases("cidr_range", "destination_ips", ("127.0.0.0/24",), (True, True, True)),
    *field_cases("destination_ports", "destination_ports", (8080,), (True, True, False)),
    *field_cases("not_destination_ports", "not_destination_ports", (8080,), (False, False, True)),
]


@pytest.mark.parametrize(("pol", "c", "want"), UPSTREAM_MATCH_CASES)
def test_upstream_match_cases(pol: Authorization, c: Connection, want: bool) -> None:
    assert matches(pol, c) is want


def ns_conn(ns: str) -> Connection:
    """A connection whose peer namespace is `ns` ("" = plaintext, as upstream's default)."""
    return PLAINTEXT if ns == "" else in_ns(ns)


# upstream `string_match` (StringMatch::matches), exercised through `namespaces`, which
# upstream matches with `StringMatch::matches` on the bare namespace.
@pytest.mark.parametrize(
    ("matcher", "matchee", "want"),
    [
        pytest.param(exact("foo"), "foo", True, id="exact_match"),
        pytest.param(exact("foo"), "not", False, id="exact_mismatch"),
        pytest.param(exact("foo"), "", False, id="exact_empty_mismatch"),
        pytest.param(prefix("foo"), "foobar", True, id="prefix_match"),
        pytest.param(prefix("foo"), "notfoo", False, id="prefix_mismatch"),
        pytest.param(prefix("foo"), "", False, id="prefix_empty_mismatch"),
        pytest.param(suffix("foo"), "barfoo", True, id="suffix_match"),
        pytest.param(suffix("foo"), "foonot", False, id="suffix_mismatch"),
        pytest.param(suffix("foo"), "", False, id="suffix_empty_mismatch"),
        pytest.param(PRESENCE, "foo", True, id="presence_match"),
        pytest.param(PRESENCE, "", False, id="presence_mismatch"),
    ],
)
def test_upstream_string_match(matcher: StringMatch, matchee: str, want: bool) -> None:
    pol = allow("string", one(Match(namespaces=(matcher,))))
    assert matches(pol, ns_conn(matchee)) is want


# --- field semantics beyond upstream's table ------------------------------------------------

V6 = conn("2001:db8::1", "2001:db8::2", 443, ident("td", "namespace", "account"))
MAPPED = conn("::ffff:10.1.2.3", "::ffff:10.9.9.9", 80)
CERT_MANAGER = ident("cluster.local", "cert-manager", "cert-manager.io")
CERT_MANAGER_X = ident("cluster.local", "cert-manager", "cert-managerXio")
TD_PRINCIPAL = "td/ns/namespace/sa/account"

FIELD_CASES = [
    # principals: matched without `spiffe://`; the spiffe:// form never matches
    pytest.param(Match(principals=(exact(TD_PRINCIPAL),)), TLS, True, id="principal-bare"),
    pytest.param(
        Match(principals=(exact("spiffe://" + TD_PRINCIPAL),)), TLS, False, id="principal-spiffe"
    ),
    pytest.param(Match(principals=(prefix("spiffe://"),)), TLS, False, id="principal-prefix_spf"),
    pytest.param(
        Match(not_principals=(exact("spiffe://" + TD_PRINCIPAL),)),
        TLS,
        True,
        id="not_principal-spiffe_never_excludes",
    ),
    pytest.param(Match(principals=(prefix("td/ns/namespace/"),)), TLS, True, id="principal-prefix"),
    pytest.param(Match(principals=(prefix("td/ns/other/"),)), TLS, False, id="principal-prefix_no"),
    pytest.param(Match(principals=(suffix("/sa/account"),)), TLS, True, id="principal-suffix"),
    pytest.param(Match(principals=(suffix("/sa/other"),)), TLS, False, id="principal-suffix_no"),
    pytest.param(Match(principals=(PRESENCE,)), TLS, True, id="principal-presence"),
    pytest.param(Match(principals=(PRESENCE,)), PLAINTEXT, False, id="principal-presence_plain"),
    pytest.param(Match(not_principals=(PRESENCE,)), PLAINTEXT, True, id="not_principal-presence"),
    pytest.param(Match(not_principals=(PRESENCE,)), TLS, False, id="not_principal-presence_tls"),
    # without identity, even an empty prefix cannot match a principal (strip_prefix fails) ...
    pytest.param(Match(principals=(prefix(""),)), PLAINTEXT, False, id="principal-plain_prefix"),
    pytest.param(Match(principals=(exact(""),)), PLAINTEXT, False, id="principal-plain_exact"),
    # ... while the namespace of a plaintext peer is "" and matched as such
    pytest.param(Match(namespaces=(exact(""),)), PLAINTEXT, True, id="namespace-plain_empty"),
    pytest.param(Match(namespaces=(PRESENCE,)), PLAINTEXT, False, id="namespace-plain_presence"),
    pytest.param(Match(namespaces=(prefix("name"),)), TLS, True, id="namespace-prefix"),
    pytest.param(Match(namespaces=(suffix("space"),)), TLS, True, id="namespace-suffix"),
    pytest.param(Match(not_namespaces=(PRESENCE,)), TLS, False, id="not_namespace-presence"),
    # service accounts: exact (namespace, name) equality, dots are literal (RBAC-7)
    pytest.param(
        Match(service_accounts=(sa("cert-manager", "cert-manager.io"),)),
        conn("10.0.0.1", "10.0.0.2", 80, CERT_MANAGER),
        True,
        id="sa-dots_exact",
    ),
    pytest.param(
        Match(service_accounts=(sa("cert-manager", "cert-manager.io"),)),
        conn("10.0.0.1", "10.0.0.2", 80, CERT_MANAGER_X),
        False,
        id="sa-dot_is_not_wildcard",
    ),
    pytest.param(
        Match(not_service_accounts=(sa("cert-manager", "cert-manager.io"),)),
        conn("10.0.0.1", "10.0.0.2", 80, CERT_MANAGER_X),
        True,
        id="not_sa-dot_is_not_wildcard",
    ),
    pytest.param(
        Match(service_accounts=(sa("cert-manager", "cert-manager.io"),)),
        conn("10.0.0.1", "10.0.0.2", 80, ident("cluster.local", "cert-managerXio", "x")),
        False,
        id="sa-namespace_and_name_both_required",
    ),
    pytest.param(
        Match(service_accounts=(sa("namespace", "account"),)),
        conn("10.0.0.1", "10.0.0.2", 80, ident("other-td", "namespace", "account")),
        True,
        id="sa-ignores_trust_domain",
    ),
    pytest.param(Match(service_accounts=(sa("", ""),)), PLAINTEXT, False, id="sa-plain_no_match"),
    pytest.param(Match(not_service_accounts=(sa("", ""),)), PLAINTEXT, True, id="not_sa-plain"),
    # CIDRs: IPv4, IPv6, and never across families
    pytest.param(Match(source_ips=("2001:db8::/32",)), V6, True, id="v6-src_in"),
    pytest.param(Match(source_ips=("2001:db9::/32",)), V6, False, id="v6-src_out"),
    pytest.param(Match(destination_ips=("2001:db8::2/128",)), V6, True, id="v6-dst_host"),
    pytest.param(Match(not_destination_ips=("2001:db8::/64",)), V6, False, id="v6-not_dst"),
    pytest.param(Match(source_ips=("0.0.0.0/0",)), V6, False, id="v4_any-not_v6"),
    pytest.param(Match(source_ips=("::/0",)), TLS, False, id="v6_any-not_v4"),
    pytest.param(Match(source_ips=("::/0",)), V6, True, id="v6_any-v6"),
    pytest.param(Match(source_ips=("0.0.0.0/0",)), TLS, True, id="v4_any-v4"),
    pytest.param(Match(not_source_ips=("::/0",)), TLS, True, id="not_v6_any-v4"),
    pytest.param(Match(source_ips=("10.0.0.0/8", "::/0")), V6, True, id="mixed_list-v6"),
    pytest.param(Match(source_ips=("10.0.0.0/8",)), MAPPED, True, id="v4_mapped-as_v4"),
    pytest.param(Match(destination_ips=("10.9.9.0/24",)), MAPPED, True, id="v4_mapped-dst"),
    pytest.param(Match(source_ips=("::ffff:0:0/96",)), MAPPED, False, id="v4_mapped-not_v6"),
    pytest.param(Match(source_ips=("127.0.0.0/31",)), TLS, True, id="cidr-31"),
    pytest.param(Match(source_ips=("127.0.0.2/31",)), TLS, False, id="cidr-31_out"),
    # destination port
    pytest.param(Match(destination_ports=(80, 8080)), TLS, True, id="port-any_of"),
    pytest.param(Match(destination_ports=(80,)), TLS, False, id="port-other"),
    pytest.param(Match(not_destination_ports=(80,)), TLS, True, id="not_port-other"),
    # AND across types, any-of within a type, none-of for not_
    pytest.param(
        Match(namespaces=(exact("namespace"),), destination_ports=(8080,)),
        TLS,
        True,
        id="and-both",
    ),
    pytest.param(
        Match(namespaces=(exact("namespace"),), destination_ports=(80,)),
        TLS,
        False,
        id="and-one_fails",
    ),
    pytest.param(
        Match(namespaces=(exact("x"), exact("namespace")), not_namespaces=(exact("y"),)),
        TLS,
        True,
        id="within_type-any_and_none",
    ),
    pytest.param(
        Match(namespaces=(prefix("name"),), not_namespaces=(suffix("space"),)),
        TLS,
        False,
        id="within_type-not_wins",
    ),
    pytest.param(
        Match(source_ips=("127.0.0.0/8",), not_source_ips=("127.0.0.1/32",)),
        TLS,
        False,
        id="cidr-not_carves_hole",
    ),
    pytest.param(
        Match(source_ips=("127.0.0.0/8",), not_source_ips=("127.0.0.1/32",)),
        TLS_ALT,
        True,
        id="cidr-outside_hole",
    ),
]


@pytest.mark.parametrize(("m", "c", "want"), FIELD_CASES)
@pytest.mark.parametrize("action", ["Allow", "Deny"])
def test_match_field_semantics(m: Match, c: Connection, want: bool, action: str) -> None:
    assert matches(policy("p", one(m), action=action), c) is want


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("not_namespaces", (exact("namespace"),)),
        ("not_service_accounts", (sa("namespace", "account"),)),
        ("not_principals", (exact(TD_PRINCIPAL),)),
        ("not_source_ips", ("127.0.0.3/32",)),
        ("not_destination_ips", ("127.0.0.4/32",)),
        ("not_destination_ports", (9090,)),
    ],
)
def test_every_not_field_excludes_only_what_it_names(field: str, value: tuple[Any, ...]) -> None:
    pol = allow("p", one(Match(**{field: value})))
    hit = TLS_ALT if "ips" in field or "ports" in field else TLS
    miss = TLS if hit is TLS_ALT else TLS_ALT
    assert evaluate([pol], hit).allowed is False
    assert evaluate([pol], miss).allowed is True


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("namespaces", (exact("namespace"),)),
        ("namespaces", (PRESENCE,)),
        ("service_accounts", (sa("namespace", "account"),)),
        ("principals", (exact(TD_PRINCIPAL),)),
        ("principals", (PRESENCE,)),
        ("principals", (prefix(""),)),
    ],
)
def test_plaintext_fails_identity_positives_and_passes_negatives(
    field: str, value: tuple[Any, ...]
) -> None:
    positive = allow("p", one(Match(**{field: value})))
    negative = allow("n", one(Match(**{f"not_{field}": value})))
    assert evaluate([positive], PLAINTEXT).allowed is False
    assert evaluate([negative], PLAINTEXT).allowed is True


@pytest.mark.parametrize(
    ("action", "m", "want"),
    [
        # an entry that does not parse resolves toward the restrictive side of the action
        ("Allow", Match(source_ips=("not-a-cidr",)), False),
        ("Deny", Match(source_ips=("not-a-cidr",)), True),
        ("Allow", Match(not_source_ips=("not-a-cidr",)), False),
        ("Deny", Match(not_source_ips=("not-a-cidr",)), True),
        ("Allow", Match(destination_ips=("127.0.0.2/33",)), False),
        ("Deny", Match(destination_ips=("127.0.0.2/33",)), True),
        ("Allow", Match(source_ips=("not-a-cidr", "127.0.0.1/32")), True),
        ("Deny", Match(not_source_ips=("not-a-cidr", "127.0.0.1/32")), False),
    ],
)
def test_unparseable_cidr_fails_closed(action: str, m: Match, want: bool) -> None:
    assert matches(policy("p", one(m), action=action), TLS) is want


def by_ns(*names: str) -> tuple[Match, ...]:
    return tuple(Match(namespaces=(exact(n),)) for n in names)


@pytest.mark.parametrize(
    ("rules", "c", "want"),
    [
        # single-field Matches of one clause, and single-clause rules, are merged by field;
        # the result must be the same any-of
        pytest.param(tuple(((m,),) for m in by_ns("x", "namespace")), TLS, True, id="rules"),
        pytest.param(((by_ns("x", "y", "z"),),), TLS, False, id="clause_none"),
        pytest.param(
            (((*by_ns("x"), Match(not_namespaces=(exact("namespace"),))),),),
            TLS,
            False,
            id="not_is_never_merged",
        ),
        pytest.param(
            (((*by_ns("x"), Match(not_namespaces=(exact("x"),))),),),
            TLS,
            True,
            id="not_is_its_own_alternative",
        ),
        pytest.param(
            (((Match(source_ips=("10.0.0.0/8",)), Match(source_ips=("127.0.0.0/8",))),),),
            TLS,
            True,
            id="cidrs",
        ),
        pytest.param(
            ((by_ns("x", "namespace"), (Match(destination_ports=(1,)),)),),
            TLS,
            False,
            id="multi_clause_rule_keeps_and",
        ),
    ],
)
def test_merged_alternatives_keep_semantics(rules: Rules, c: Connection, want: bool) -> None:
    for action in ("Allow", "Deny"):
        assert matches(policy("p", rules, action=action), c) is want


def test_every_match_field_is_enforced() -> None:
    # A field added to Match must get RBAC semantics here (until then an ALLOW Match setting
    # it is skipped and a DENY ignores it); this fails to make that a deliberate step.
    assert set(Match.__struct_fields__) == rbac._KNOWN_FIELDS


# --- evaluation order and decisions (§12.2, upstream `assert_rbac`) -------------------------

ALLOW_ALL: Rules = ((),)  # a rule with no clauses matches everything
MATCH_TLS = one(Match(principals=(exact(TD_PRINCIPAL),)))
MATCH_NONE = one(Match(destination_ports=(1,)))
NONE_ALLOWED_LOGS = ("no allow policies matched",)
DEFAULT_ALLOW_LOGS = ("no allow policies, allow",)


def explicit(key: str, *logs: str) -> Decision:
    return Decision(
        False, f"explicitly denied by: {key}", key, (*logs, f"deny policy match policy={key}")
    )


def allowed_by(key: str, *logs: str) -> Decision:
    return Decision(True, "allow policy match", key, (*logs, f"allow policy match policy={key}"))


NOT_ALLOWED_DECISION = Decision(False, NOT_ALLOWED, None, NONE_ALLOWED_LOGS)
DEFAULT_ALLOW = Decision(True, "no allow policies, allow", None, DEFAULT_ALLOW_LOGS)

EVALUATE_CASES = [
    pytest.param([], TLS, DEFAULT_ALLOW, id="no_policy-allow"),
    pytest.param([allow("a", MATCH_NONE)], TLS, NOT_ALLOWED_DECISION, id="allow_none_match-deny"),
    pytest.param([allow("a", MATCH_TLS)], TLS, allowed_by("namespace/a"), id="allow_match"),
    pytest.param(
        [allow("a", MATCH_NONE), allow("b", MATCH_TLS)],
        TLS,
        allowed_by("namespace/b"),
        id="any_allow_matches",
    ),
    pytest.param(
        [allow("a", ALLOW_ALL), deny("d", MATCH_TLS)],
        TLS,
        explicit("namespace/d"),
        id="deny_wins_over_allow",
    ),
    pytest.param(
        [deny("d1", MATCH_NONE), deny("d2", MATCH_TLS), deny("d3", ALLOW_ALL)],
        TLS,
        explicit("namespace/d2"),
        id="first_matching_deny_named",
    ),
    pytest.param([deny("d", MATCH_NONE)], TLS, DEFAULT_ALLOW, id="deny_no_match-default_allow"),
    pytest.param(
        [deny("d", MATCH_NONE), allow("a", MATCH_NONE)],
        TLS,
        NOT_ALLOWED_DECISION,
        id="deny_no_match-allow_no_match",
    ),
    # empty rules / empty rule / empty clause / empty match, for ALLOW and DENY (#61126)
    pytest.param([allow("a", ())], TLS, NOT_ALLOWED_DECISION, id="allow-no_rules-grants_nothing"),
    pytest.param([deny("d", ())], TLS, DEFAULT_ALLOW, id="deny-no_rules-never_matches"),
    pytest.param([allow("a", ((),))], TLS, allowed_by("namespace/a"), id="allow-empty_rule"),
    pytest.param([deny("d", ((),))], TLS, explicit("namespace/d"), id="deny-empty_rule"),
    pytest.param([allow("a", (((),),))], TLS, allowed_by("namespace/a"), id="allow-empty_clause"),
    pytest.param([deny("d", (((),),))], TLS, explicit("namespace/d"), id="deny-empty_clause"),
    pytest.param(
        [allow("a", one(Match()))], TLS, NOT_ALLOWED_DECISION, id="allow-empty_match-skipped"
    ),
    pytest.param(
        [deny("d", one(Match()))], TLS, explicit("namespace/d"), id="deny-empty_match-fail_closed"
    ),
    pytest.param(
        [deny("d", one(Match()))],
        PLAINTEXT,
        explicit("namespace/d"),
        id="deny-empty_match-fail_closed_plaintext",
    ),
    pytest.param(
        [allow("a", (((Match(), Match()),),))],
        TLS,
        NOT_ALLOWED_DECISION,
        id="allow-only_empty_matches",
    ),
    # #61126 shapes: L7 `from` stripped next to an L4 `to`; L7 source next to an L4 source
    pytest.param(
        [deny("d", (((Match(),), (Match(destination_ports=(8080,)),)),))],
        TLS,
        explicit("namespace/d"),
        id="deny-stripped_from_with_port-on_port",
    ),
    pytest.param(
        [deny("d", (((Match(),), (Match(destination_ports=(80,)),)),))],
        TLS,
        DEFAULT_ALLOW,
        id="deny-stripped_from_with_port-other_port",
    ),
    pytest.param(
        [deny("d", (((Match(), Match(namespaces=(exact("x"),))),),))],
        TLS,
        explicit("namespace/d"),
        id="deny-stripped_source_beside_l4_source",
    ),
    pytest.param(
        [allow("a", (((Match(), Match(namespaces=(exact("namespace"),))),),))],
        TLS,
        allowed_by("namespace/a"),
        id="allow-stripped_source_beside_l4_source-match",
    ),
    pytest.param(
        [allow("a", (((Match(), Match(namespaces=(exact("x"),))),),))],
        TLS,
        NOT_ALLOWED_DECISION,
        id="allow-stripped_source_beside_l4_source-no_match",
    ),
    pytest.param(
        [allow("a", (((Match(),), (Match(destination_ports=(8080,)),)),))],
        TLS,
        NOT_ALLOWED_DECISION,
        id="allow-stripped_from_with_port",
    ),
    pytest.param(
        [allow("a", (((Match(),),), ((Match(destination_ports=(8080,)),),)))],
        TLS,
        allowed_by("namespace/a"),
        id="allow-dead_rule_does_not_sink_other_rules",
    ),
    # dry-run: logged, never enforced
    pytest.param(
        [deny("dd", ALLOW_ALL, dry_run=True)],
        TLS,
        Decision(
            True,
            "no allow policies, allow",
            None,
            ("dry-run: deny policy match policy=namespace/dd", *DEFAULT_ALLOW_LOGS),
        ),
        id="dry_run_deny-not_enforced",
    ),
    pytest.param(
        [deny("dd", MATCH_NONE, dry_run=True)],
        TLS,
        DEFAULT_ALLOW,
        id="dry_run_deny-no_match-no_log",
    ),
    pytest.param(
        [deny("dd", ALLOW_ALL, dry_run=True), deny("d", MATCH_TLS)],
        TLS,
        explicit("namespace/d", "dry-run: deny policy match policy=namespace/dd"),
        id="dry_run_deny-logged_before_enforced_deny",
    ),
    pytest.param(
        [allow("da", MATCH_NONE, dry_run=True)],
        TLS,
        Decision(
            True,
            "no allow policies, allow",
            None,
            ("dry-run: no allow policies match", *DEFAULT_ALLOW_LOGS),
        ),
        id="dry_run_allow-none_match-still_allowed",
    ),
    pytest.param(
        [allow("da", MATCH_TLS, dry_run=True)],
        TLS,
        Decision(
            True,
            "no allow policies, allow",
            None,
            ("dry-run: allow policy match policy=namespace/da", *DEFAULT_ALLOW_LOGS),
        ),
        id="dry_run_allow-match-logged",
    ),
    pytest.param(
        [allow("da", ALLOW_ALL, dry_run=True), allow("a", MATCH_NONE)],
        TLS,
        Decision(
            False,
            NOT_ALLOWED,
            None,
            ("dry-run: allow policy match policy=namespace/da", *NONE_ALLOWED_LOGS),
        ),
        id="dry_run_allow-does_not_grant",
    ),
    pytest.param(
        [allow("da", MATCH_NONE, dry_run=True), allow("a", MATCH_TLS)],
        TLS,
        allowed_by("namespace/a"),
        id="dry_run_allow-no_match_with_enforced_allow-no_dry_log",
    ),
    # IP CIDR and port through evaluate
    pytest.param(
        [deny("d", one(Match(source_ips=("2001:db8::/32",))))],
        V6,
        explicit("namespace/d"),
        id="deny-v6_cidr",
    ),
    pytest.param(
        [deny("d", one(Match(source_ips=("0.0.0.0/0",))))], V6, DEFAULT_ALLOW, id="deny-v4_any_v6"
    ),
    pytest.param(
        [allow("a", one(Match(destination_ips=("127.0.0.0/24",), destination_ports=(8080,))))],
        TLS,
        allowed_by("namespace/a"),
        id="allow-cidr_and_port",
    ),
    pytest.param(
        [allow("a", one(Match(destination_ips=("127.0.0.0/24",), destination_ports=(8080,))))],
        TLS_ALT,
        NOT_ALLOWED_DECISION,
        id="allow-cidr_and_port-wrong_port",
    ),
    pytest.param(
        [deny("d", one(Match(not_destination_ports=(8080,))))],
        TLS_ALT,
        explicit("namespace/d"),
        id="deny-not_port",
    ),
    # RBAC-7 through evaluate
    pytest.param(
        [deny("d", one(Match(service_accounts=(sa("cert-manager", "cert-manager.io"),))))],
        conn("10.0.0.1", "10.0.0.2", 80, CERT_MANAGER),
        explicit("namespace/d"),
        id="deny-sa_with_dot",
    ),
    pytest.param(
        [allow("a", one(Match(service_accounts=(sa("cert-manager", "cert-manager.io"),))))],
        conn("10.0.0.1", "10.0.0.2", 80, CERT_MANAGER_X),
        NOT_ALLOWED_DECISION,
        id="allow-sa_dot_does_not_overmatch",
    ),
]


@pytest.mark.parametrize(("policies", "c", "want"), EVALUATE_CASES)
def test_evaluate(policies: list[Authorization], c: Connection, want: Decision) -> None:
    assert evaluate(policies, c) == want


def test_evaluate_accepts_any_iterable_once() -> None:
    pols = [deny("d", MATCH_NONE), allow("a", MATCH_TLS)]
    assert evaluate(iter(pols), TLS) == allowed_by("namespace/a")


# --- upstream `src/state.rs` assert_rbac tests, with selection by ProxyState ----------------


def workload(uid: str, ns: str, ip: str) -> Workload:
    return Workload(
        uid=uid,
        name="test",
        namespace=ns,
        workload_ips=(ip,),
        trust_domain="cluster.local",
        service_account="defaultacct",
    )


def principal_rules(account: str) -> Rules:
    return one(Match(principals=(exact(f"cluster.local/ns/default/sa/{account}"),)))


def rbac_conn(dst: Workload, account: str) -> Connection:
    who = Identity.parse(f"spiffe://cluster.local/ns/default/sa/{account}")
    return conn("192.168.1.1", dst.workload_ips[0], 8080, who)


def ns1_policy(name: str, action: str, rules: Rules, dry_run: bool = False) -> Authorization:
    return policy(name, rules, action=action, namespace="ns1", scope="Namespace", dry_run=dry_run)


def test_assert_rbac_logic_deny_allow() -> None:
    w1, w2 = workload("1", "ns1", "192.168.0.1"), workload("2", "ns2", "192.168.0.2")
    state = ProxyState.from_snapshot(
        StateSnapshot(
            workloads=(w1, w2),
            policies=(
                ns1_policy("wildcard-allow", "Allow", ((),), dry_run=True),
                ns1_policy("wildcard-deny", "Deny", ((),), dry_run=True),
                ns1_policy("foo", "Allow", principal_rules("defaultacct")),
                ns1_policy("deny", "Deny", principal_rules("denyacct")),
            ),
        )
    )

    def check(w: Workload, account: str) -> Decision:
        return evaluate(state.policies_for_workload(w), rbac_conn(w, account))

    # No policies select ns2: allowed.
    assert check(w2, "not-defaultacct").allowed
    # An ALLOW matches.
    assert check(w1, "defaultacct") == Decision(
        True,
        "allow policy match",
        "ns1/foo",
        (
            "dry-run: deny policy match policy=ns1/wildcard-deny",
            "dry-run: allow policy match policy=ns1/wildcard-allow",
            "allow policy match policy=ns1/foo",
        ),
    )
    # ALLOWs exist, none matches.
    d = check(w1, "not-defaultacct")
    assert (d.allowed, d.reason, d.policy) == (False, NOT_ALLOWED, None)
    # An enforced DENY matches.
    d = check(w1, "denyacct")
    assert (d.allowed, d.reason, d.policy) == (False, "explicitly denied by: ns1/deny", "ns1/deny")


def test_assert_rbac_with_dest_workload_info_and_no_policies() -> None:
    w1 = workload("1", "ns1", "192.168.0.1")
    state = ProxyState.from_snapshot(StateSnapshot(workloads=(w1,)))
    assert evaluate(state.policies_for_workload(w1), rbac_conn(w1, "defaultacct")).allowed


def test_assert_rbac_dry_run_with_real_policies() -> None:
    both = (*principal_rules("defaultacct"), *principal_rules("denyacct"))
    pols = (
        ns1_policy("real-deny", "Deny", principal_rules("denyacct")),
        ns1_policy("dry-run-deny", "Deny", both, dry_run=True),
        ns1_policy("real-allow", "Allow", principal_rules("defaultacct")),
        ns1_policy("dry-run-allow", "Allow", principal_rules("defaultacct"), dry_run=True),
    )
    w1 = workload("1", "ns1", "192.168.0.1")
    d = evaluate(pols, rbac_conn(w1, "defaultacct"))
    assert d.allowed
    assert "dry-run: deny policy match policy=ns1/dry-run-deny" in d.logs
    assert "dry-run: allow policy match policy=ns1/dry-run-allow" in d.logs
    assert evaluate(pols, rbac_conn(w1, "denyacct")).reason == "explicitly denied by: ns1/real-deny"


def test_connection_takes_the_workload_identity() -> None:
    w = workload("1", "ns1", "10.0.0.1")
    pol = allow("p", one(Match(principals=(exact(w.identity().removeprefix("spiffe://")),))))
    assert matches(pol, conn("10.0.0.9", "10.0.0.1", 80, Identity.parse(w.identity())))
    assert matches(pol, conn("10.0.0.9", "10.0.0.1", 80, Identity.from_workload(w)))


# --- properties: an independent reference evaluator, monotonicity ---------------------------


def ref_string(m: StringMatch, s: str) -> bool:
    return {
        "Exact": lambda: s == m.value,
        "Prefix": lambda: s.startswith(m.value),
        "Suffix": lambda: s.endswith(m.value),
        "Presence": lambda: s != "",
    }[m.kind]()


def ref_match(m: Match, c: Connection, is_deny: bool) -> bool:
    if m == Match():
        return is_deny  # the #61126 rule: DENY matches, ALLOW skips
    who = c.src_identity
    src, dst = ipaddress.ip_address(c.src_ip), ipaddress.ip_address(c.dst_ip)

    def inside(ip: Any, cidr: str) -> bool:
        net = ipaddress.ip_network(cidr)
        return ip.version == net.version and ip in net

    def field(pos: Sequence[Any], neg: Sequence[Any], pred: Callable[[Any], bool]) -> bool:
        return (not pos or any(map(pred, pos))) and not any(map(pred, neg))

    principal = str(who).removeprefix("spiffe://") if who else None
    return (
        field(m.source_ips, m.not_source_ips, lambda n: inside(src, n))
        and field(m.destination_ips, m.not_destination_ips, lambda n: inside(dst, n))
        and field(m.destination_ports, m.not_destination_ports, lambda p: p == c.dst_port)
        and field(
            m.namespaces, m.not_namespaces, lambda s: ref_string(s, who.namespace if who else "")
        )
        and field(
            m.principals,
            m.not_principals,
            lambda s: principal is not None and ref_string(s, principal),
        )
        and field(
            m.service_accounts,
            m.not_service_accounts,
            lambda a: (
                who is not None
                and (a.namespace, a.service_account) == (who.namespace, who.service_account)
            ),
        )
    )


def ref_policy(p: Authorization, c: Connection) -> bool:
    is_deny = p.action == "Deny"
    return any(
        all(not clause or any(ref_match(m, c, is_deny) for m in clause) for clause in rule)
        for rule in p.rules
    )


def ref_allowed(policies: Sequence[Authorization], c: Connection) -> bool:
    enforced = [p for p in policies if not p.dry_run]
    if any(p.action == "Deny" and ref_policy(p, c) for p in enforced):
        return False
    allows = [p for p in enforced if p.action == "Allow"]
    return not allows or any(ref_policy(p, c) for p in allows)


def _small(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[Any, ...]]:
    return st.one_of(st.just(()), st.lists(elements, min_size=1, max_size=2).map(tuple))


_WORDS = st.sampled_from(["a", "b", "", "td/ns/a/sa/x", "spiffe://td/ns/a/sa/x", "td/", "/sa/x.y"])
_STRINGS = st.builds(
    StringMatch, kind=st.sampled_from(["Exact", "Prefix", "Suffix", "Presence"]), value=_WORDS
)
_SAS = st.builds(
    ServiceAccountMatch,
    namespace=st.sampled_from(["a", "b"]),
    service_account=st.sampled_from(["x", "x.y", "xXy"]),
)
_CIDRS = st.sampled_from(
    [
        "10.0.0.0/8",
        "10.1.0.0/16",
        "10.1.2.3/32",
        "0.0.0.0/0",
        "2001:db8::/32",
        "::/0",
        "2001:db8::1/128",
    ]
)
_PORTS = st.sampled_from([80, 443, 8080])
_MATCHES = st.builds(
    Match,
    namespaces=_small(_STRINGS),
    not_namespaces=_small(_STRINGS),
    service_accounts=_small(_SAS),
    not_service_accounts=_small(_SAS),
    principals=_small(_STRINGS),
    not_principals=_small(_STRINGS),
    source_ips=_small(_CIDRS),
    not_source_ips=_small(_CIDRS),
    destination_ips=_small(_CIDRS),
    not_destination_ips=_small(_CIDRS),
    destination_ports=_small(_PORTS),
    not_destination_ports=_small(_PORTS),
)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "namespaces": _STRINGS,
    "not_namespaces": _STRINGS,
    "service_accounts": _SAS,
    "not_service_accounts": _SAS,
    "principals": _STRINGS,
    "not_principals": _STRINGS,
    "source_ips": _CIDRS,
    "not_source_ips": _CIDRS,
    "destination_ips": _CIDRS,
    "not_destination_ips": _CIDRS,
    "destination_ports": _PORTS,
    "not_destination_ports": _PORTS,
}
# One field set: the shape the compiler merges across a clause's Matches and across rules.
_ONE_FIELD = st.sampled_from(sorted(_FIELD_VALUES)).flatmap(
    lambda f: st.lists(_FIELD_VALUES[f], min_size=1, max_size=2).map(
        lambda v: Match(**{f: tuple(v)})
    )
)
_SPARSE_MATCHES = st.one_of(
    st.just(Match()),
    _MATCHES,
    _ONE_FIELD,
    st.builds(Match, namespaces=_small(_STRINGS), destination_ports=_small(_PORTS)),
)
_RULES = st.lists(
    st.lists(st.lists(_SPARSE_MATCHES, max_size=3).map(tuple), max_size=2).map(tuple), max_size=3
).map(tuple)
_POLICIES = st.builds(
    Authorization,
    name=st.sampled_from(["p", "q", "r"]),
    namespace=st.just("ns"),
    scope=st.just("Global"),
    action=st.sampled_from(["Allow", "Deny"]),
    dry_run=st.booleans(),
    rules=_RULES,
)
_IDENTITIES = st.one_of(
    st.none(),
    st.builds(
        ident, st.just("td"), st.sampled_from(["a", "b"]), st.sampled_from(["x", "x.y", "xXy"])
    ),
)
_IPS = st.sampled_from(["10.1.2.3", "10.2.0.1", "192.168.0.1", "2001:db8::1", "2001:db9::1"])
_CONNS = st.builds(conn, _IPS, _IPS, _PORTS, _IDENTITIES)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(st.lists(_POLICIES, max_size=4), _CONNS)
def test_evaluate_agrees_with_reference(policies: list[Authorization], c: Connection) -> None:
    assert evaluate(policies, c).allowed is ref_allowed(policies, c)


@PROPERTY
@given(st.lists(_POLICIES, max_size=4), _POLICIES, _CONNS)
def test_adding_a_deny_never_turns_deny_into_allow(
    policies: list[Authorization], extra: Authorization, c: Connection
) -> None:
    extra = policy(extra.name + "-extra", extra.rules, action="Deny", dry_run=extra.dry_run)
    before = evaluate(policies, c)
    after = evaluate([*policies, extra], c)
    assert before.allowed or not after.allowed
    assert evaluate([extra, *policies], c).allowed is after.allowed


@PROPERTY
@given(st.lists(_POLICIES, max_size=4), _POLICIES, _CONNS)
def test_dry_run_policies_never_change_the_decision(
    policies: list[Authorization], extra: Authorization, c: Connection
) -> None:
    shadow = policy(extra.name + "-dry", extra.rules, action=extra.action, dry_run=True)
    assert evaluate([*policies, shadow], c).allowed is evaluate(policies, c).allowed


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.builds(
            "{}.{}.{}.{}/{}".format,
            *[st.integers(0, 300)] * 4,
            st.integers(0, 40),
        ),
        st.builds(
            lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}",
            st.integers(0, 2**128 - 1),
            st.integers(0, 130),
        ),
        st.text(st.sampled_from("0123456789./:abf+-_ \u0661"), max_size=20),
    )
)
def test_cidr_parsing_agrees_with_ipaddress(text: str) -> None:
    try:
        net: Any = ipaddress.ip_network(text, strict=False)
    except ValueError:
        net = None
    for ip in ("10.1.2.3", "0.0.0.0", "255.255.255.255", "2001:db8::1", "::"):
        key = rbac._ip_key(ip)
        want = (
            net is not None
            and ipaddress.ip_address(ip).version == net.version
            and ipaddress.ip_address(ip) in net
        )
        for action in ("Allow", "Deny"):
            got = matches(
                policy("p", one(Match(source_ips=(text,))), action=action), conn(ip, "10.0.0.1", 1)
            )
            if net is None:
                assert got is (action == "Deny")  # unparseable: fails closed
            else:
                assert got is want, (text, ip, key)


# --- speed -----------------------------------------------------------------------------------


def _time_evaluate(pols: list[Authorization], c: Connection) -> tuple[float, float]:
    """(first evaluate, compiling included; mean of the next five), in ms."""
    t0 = time.perf_counter()
    first = evaluate(pols, c)
    t1 = time.perf_counter()
    runs = 5
    for _ in range(runs):
        again = evaluate(pols, c)
    t2 = time.perf_counter()
    assert first.allowed and again == first
    return (t1 - t0) * 1e3, (t2 - t1) / runs * 1e3


def test_ten_thousand_global_deny_policies_evaluate_fast(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def rule(i: int, j: int, two_fields: bool) -> tuple[tuple[Match, ...], ...]:
        cidr = (f"10.{i % 256}.{j}.0/24",)
        if two_fields:  # nothing to merge: one closure call per rule
            return ((Match(source_ips=cidr, destination_ports=(9000 + j,)),),)
        return ((Match(source_ips=cidr),),)

    c = conn("192.168.1.1", "10.0.0.2", 8080, ident("td", "ns", "sa"))
    for label, two_fields in (("source_ips", False), ("source_ips+port", True)):
        pols = [
            deny(
                f"d{i}", tuple(rule(i, j, two_fields) for j in range(10)), namespace="istio-system"
            )
            for i in range(10_000)
        ]
        first, warm = _time_evaluate(pols, c)
        with capsys.disabled():
            print(
                f"\nrbac: 10000 GLOBAL DENY x 10 rules ({label}), none match: "
                f"first evaluate (compiles) {first:.0f} ms, then {warm:.1f} ms per evaluate"
            )
