"""SPIFFE identity parsing (upstream src/identity/manager.rs, made strict: hardening TLS-9)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.core.errors import ZtunnelError
from ztunnel.core.identity import Identity, IdentityError
from ztunnel.core.model import Workload

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    ("uri", "identity"),
    [
        (
            "spiffe://cluster.local/ns/default/sa/default",
            Identity("cluster.local", "default", "default"),
        ),
        ("spiffe://td/ns/istio-system/sa/ztunnel", Identity("td", "istio-system", "ztunnel")),
        (
            "spiffe://a.b-c_d/ns/x.y/sa/cert-manager.io",
            Identity("a.b-c_d", "x.y", "cert-manager.io"),
        ),
        ("spiffe://cluster.local/ns/sa/sa/ns", Identity("cluster.local", "sa", "ns")),
    ],
)
def test_valid_identity_parses(uri: str, identity: Identity) -> None:
    assert Identity.parse(uri) == identity
    assert str(identity) == uri


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "spiffe://",
        "cluster.local/ns/a/sa/b",  # no prefix
        "SPIFFE://cluster.local/ns/a/sa/b",  # prefix is case-sensitive, as upstream
        "spiffe:/cluster.local/ns/a/sa/b",
        "https://cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa",  # too few parts
        "spiffe://cluster.local/ns/a/sa/b/c",  # too many
        "spiffe://cluster.local/ns/a/sa/b/",  # trailing slash
        "spiffe://cluster.local/sa/a/ns/b",  # literals swapped
        "spiffe://cluster.local/NS/a/sa/b",
        "spiffe:///ns/a/sa/b",  # empty trust domain
        "spiffe://cluster.local/ns//sa/b",  # empty namespace
        "spiffe://cluster.local/ns/a/sa/",  # empty service account
        "spiffe://cluster.local/ns/a/sa/b\x00x",  # TLS-9: embedded NUL
        "spiffe://cluster.local/ns/a\x00/sa/b",
        "spiffe://cluster.local\x00.evil/ns/a/sa/b",
        "spiffe://cluster.local/ns/a/sa/b\n",
        "spiffe://cluster.local/ns/a/sa/b\r\nx",
        "spiffe://cluster.local/ns/a\t/sa/b",
        "spiffe://cluster.local/ns/a b/sa/b",
        "spiffe://cluster.local/ns/a/sa/b\x7f",
        "spiffe://cluster.local/ns/a/sa/b\u00a0",  # non-ASCII space
        "spiffe://cluster.local/ns/\u0430/sa/b",  # Cyrillic look-alike
        "spiffe://cluster.local/ns/a/sa/b%00",  # percent-encoding
        "spiffe://cluster.local/ns/a%2Fb/sa/c",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "spiffe://cluster.local/ns/a/sa/b#frag",
        "spiffe://cluster.local/ns/../sa/b",  # dot segments
        "spiffe://cluster.local/ns/./sa/b",
        "spiffe://user@cluster.local/ns/a/sa/b",  # userinfo
        "spiffe://cluster.local:443/ns/a/sa/b",  # port
    ],
)
def test_invalid_identity_rejected(uri: str) -> None:
    with pytest.raises(IdentityError):
        Identity.parse(uri)


def test_identity_error_is_a_ztunnel_error_with_stable_reason() -> None:
    with pytest.raises(ZtunnelError) as info:
        Identity.parse("nope")
    assert info.value.reason == "identity"


def test_error_message_does_not_echo_the_input() -> None:
    with pytest.raises(IdentityError) as info:
        Identity.parse("spiffe://cluster.local/ns/a/sa/b\r\nforged log line")
    assert "forged" not in str(info.value)
    assert "\n" not in str(info.value)


def test_construction_validates_parts() -> None:
    with pytest.raises(IdentityError):
        Identity("cluster.local", "a/b", "c")
    with pytest.raises(IdentityError):
        Identity("cluster.local", "", "c")


def test_from_workload_uses_trust_domain_namespace_and_service_account() -> None:
    w = Workload(namespace="ns1", trust_domain="example.org", service_account="sa1")
    identity = Identity.from_workload(w)
    assert identity == Identity("example.org", "ns1", "sa1")
    assert str(identity) == w.identity()


def test_identity_is_hashable_and_frozen() -> None:
    a = Identity.parse("spiffe://td/ns/a/sa/b")
    assert {a: 1}[Identity("td", "a", "b")] == 1
    with pytest.raises(AttributeError):
        a.namespace = "x"  # type: ignore[misc]


_PART_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="%?#/")
_part = st.text(_PART_CHARS, min_size=1, max_size=20).filter(lambda p: p not in (".", ".."))
_trust_domain = _part.filter(lambda p: "@" not in p and ":" not in p)


@given(_trust_domain, _part, _part)
def test_round_trip(td: str, ns: str, sa: str) -> None:
    identity = Identity(td, ns, sa)
    assert Identity.parse(str(identity)) == identity


@given(
    _part,
    st.characters(max_codepoint=0x20) | st.sampled_from("\x7f\x85\u2028%?#"),
    st.integers(min_value=0, max_value=20),
)
def test_any_control_whitespace_or_uri_special_character_is_rejected(
    ns: str, bad: str, at: int
) -> None:
    at = min(at, len(ns))
    with pytest.raises(IdentityError):
        Identity.parse(f"spiffe://cluster.local/ns/{ns[:at]}{bad}{ns[at:]}/sa/b")
