"""Data-plane mTLS: real OpenSSL handshakes between our contexts, pumped through MemoryBIOs.

Mirrors upstream src/tls/workload.rs / certificate.rs behaviour and hardening §4.3.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import time
from pathlib import Path

import pytest

from ztunnel import tls
from ztunnel.core.identity import Identity
from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(30)

TD = "cluster.local"
SERVER_ID = "spiffe://cluster.local/ns/server-ns/sa/server"
CLIENT_ID = "spiffe://cluster.local/ns/client-ns/sa/client"
DAY = 86400.0

X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
# A peer with no intermediates sends its root too (OpenSSL completes the chain from its
# verify store), so a foreign chain ends in an untrusted self-signed root: 19, else 20.
UNTRUSTED_ISSUER = (
    X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN,
    X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY,
)


@pytest.fixture(scope="module")
def ca() -> FakeCA:
    return FakeCA.ephemeral()


@pytest.fixture(scope="module")
def foreign_ca() -> FakeCA:
    return FakeCA.ephemeral()


def _issue(ca: FakeCA, identity: str, **kw: object) -> WorkloadCertificate:
    now = time.time()
    if not kw:
        return ca.issue(identity, ttl=DAY, now=now)
    args: dict[str, object] = {"not_before": now - 60, "not_after": now + DAY}
    args.update(kw)
    return ca.issue_for_test(identity, **args)  # type: ignore[arg-type]


class Link:
    """A client and a server SSLObject joined by two pairs of MemoryBIOs."""

    def __init__(self, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
        self.s_in, self.s_out, self.c_in, self.c_out = (ssl.MemoryBIO() for _ in range(4))
        self.server = server_ctx.wrap_bio(self.s_in, self.s_out, server_side=True)
        # server_hostname=None: no SNI, as upstream (it sends the dummy 0.0.0.0).
        self.client = client_ctx.wrap_bio(self.c_in, self.c_out, server_hostname=None)
        self.errors: dict[str, ssl.SSLError] = {}
        self.done: set[str] = set()

    def flush(self) -> bool:
        moved = False
        for src, dst in ((self.c_out, self.s_in), (self.s_out, self.c_in)):
            data = src.read()
            if data:
                dst.write(data)
                moved = True
        return moved

    def handshake(self) -> Link:
        for _ in range(20):  # a TLS 1.3 handshake needs three flights
            for name, obj in (("client", self.client), ("server", self.server)):
                if name in self.done or name in self.errors:
                    continue
                try:
                    obj.do_handshake()
                    self.done.add(name)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as e:
                    self.errors[name] = e
            if not self.flush():
                break
        return self

    @property
    def ok(self) -> bool:
        return self.done == {"client", "server"} and not self.errors

    def client_sees_failure(self) -> bool:
        """Whether the client's next read fails (TLS 1.3: it finished before the server)."""
        self.flush()
        try:
            self.client.read()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError:
            return True
        return False


def _replace(cert: WorkloadCertificate, **changes: object) -> WorkloadCertificate:
    fields = {f: getattr(cert, f) for f in cert.__struct_fields__}
    fields.update(changes)
    return WorkloadCertificate(**fields)


def _link(server: WorkloadCertificate, client: WorkloadCertificate) -> Link:
    return Link(tls.server_context(server), tls.client_context(client)).handshake()


@pytest.fixture(scope="module")
def server_cert(ca: FakeCA) -> WorkloadCertificate:
    return _issue(ca, SERVER_ID)


@pytest.fixture(scope="module")
def client_cert(ca: FakeCA) -> WorkloadCertificate:
    return _issue(ca, CLIENT_ID)


# --- success --------------------------------------------------------------------------------


def test_mutual_tls_negotiates_tls13_aes_gcm_and_h2(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, client_cert)
    assert link.ok
    for side in (link.client, link.server):
        assert side.version() == "TLSv1.3"
        cipher = side.cipher()
        assert cipher is not None and cipher[0] == "TLS_AES_256_GCM_SHA384"
        assert side.selected_alpn_protocol() == "h2"
    assert tls.verify_outbound(link.client, expected=[SERVER_ID]) == Identity.parse(SERVER_ID)
    assert tls.verify_inbound(link.server, trust_domain=TD) == Identity.parse(CLIENT_ID)


def test_application_data_flows_after_verification(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, client_cert)
    link.client.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    link.flush()
    assert link.server.read() == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    link.server.write(b"ok")
    link.flush()
    assert link.client.read() == b"ok"


def test_server_issues_no_session_tickets(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    def ticket_after_exchange(server_ctx: ssl.SSLContext) -> bool:
        link = Link(server_ctx, tls.client_context(client_cert)).handshake()
        link.server.write(b"x")
        link.flush()
        link.client.read()
        session = link.client.session
        return session is not None and session.has_ticket

    assert not ticket_after_exchange(tls.server_context(server_cert))
    control = tls.server_context(server_cert)
    control.num_tickets = 2  # OpenSSL's default: OP_NO_TICKET alone does not stop them
    assert ticket_after_exchange(control)


def test_client_sends_no_sni(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    seen: list[str | None] = []
    server_ctx = tls.server_context(server_cert)
    server_ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)
    assert Link(server_ctx, tls.client_context(client_cert)).handshake().ok
    assert seen == [None]


def test_server_sans_match_any_expected_identity(ca: FakeCA) -> None:
    other = "spiffe://cluster.local/ns/x/sa/y"
    server = _issue(ca, SERVER_ID, uri_sans=[other, SERVER_ID])
    link = _link(server, _issue(ca, CLIENT_ID))
    expected = {"spiffe://cluster.local/ns/nope/sa/nope", SERVER_ID}
    assert tls.verify_outbound(link.client, expected=expected) == Identity.parse(SERVER_ID)


# --- handshake rejections ------------------------------------------------------------------


def test_client_without_certificate_is_refused(
    server_cert: WorkloadCertificate,
) -> None:
    bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    bare.check_hostname = False
    bare.load_verify_locations(cadata=server_cert.roots_pem[0])
    bare.set_alpn_protocols(["h2"])
    link = Link(tls.server_context(server_cert), bare).handshake()
    assert "server" in link.errors
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(link.errors["server"])
    assert link.client_sees_failure()


def test_client_certificate_from_another_root_is_refused(
    server_cert: WorkloadCertificate, foreign_ca: FakeCA
) -> None:
    # The client trusts the mesh root (it is public) but holds a foreign certificate.
    foreign = _issue(foreign_ca, CLIENT_ID)
    client = _replace(foreign, roots_pem=server_cert.roots_pem)
    link = _link(server_cert, client)
    assert "client" in link.done
    err = link.errors["server"]
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert err.verify_code in UNTRUSTED_ISSUER
    assert link.client_sees_failure()


def test_server_certificate_from_another_root_is_refused(
    client_cert: WorkloadCertificate, foreign_ca: FakeCA
) -> None:
    link = _link(_issue(foreign_ca, SERVER_ID), client_cert)
    err = link.errors["client"]
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert err.verify_code in UNTRUSTED_ISSUER
    assert "server" not in link.done


@pytest.mark.parametrize(
    ("offset", "code"),
    [
        ((-2 * DAY, -DAY), X509_V_ERR_CERT_HAS_EXPIRED),
        ((DAY, 2 * DAY), X509_V_ERR_CERT_NOT_YET_VALID),
    ],
    ids=["expired", "not-yet-valid"],
)
@pytest.mark.parametrize("bad_side", ["client", "server"])
def test_certificate_outside_its_validity_is_refused(
    ca: FakeCA, offset: tuple[float, float], code: int, bad_side: str
) -> None:
    now = time.time()
    validity = {"not_before": now + offset[0], "not_after": now + offset[1]}
    server = _issue(ca, SERVER_ID, **validity) if bad_side == "server" else _issue(ca, SERVER_ID)
    client = _issue(ca, CLIENT_ID, **validity) if bad_side == "client" else _issue(ca, CLIENT_ID)
    link = _link(server, client)
    verifier = "client" if bad_side == "server" else "server"
    err = link.errors[verifier]
    assert isinstance(err, ssl.SSLCertVerificationError)
    assert err.verify_code == code


def test_tls12_only_client_is_refused(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    old = tls.client_context(client_cert, tls12=True)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    link = Link(tls.server_context(server_cert), old).handshake()
    assert "UNSUPPORTED_PROTOCOL" in str(link.errors["server"])
    assert "client" in link.errors


def test_tls12_enabled_on_both_sides_negotiates_ecdhe_aes_gcm(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    server_ctx = tls.server_context(server_cert, tls12=True)
    client_ctx = tls.client_context(client_cert, tls12=True)
    client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    link = Link(server_ctx, client_ctx).handshake()
    assert link.ok
    assert link.server.version() == "TLSv1.2"
    cipher = link.server.cipher()
    assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    assert tls.verify_inbound(link.server, trust_domain=TD, tls12=True) == Identity.parse(CLIENT_ID)
    with pytest.raises(tls.TLSPolicyError):
        tls.check_session(link.server)


# --- identity checks after the handshake -------------------------------------------------


def test_server_san_not_expected_is_rejected(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, client_cert)
    assert link.ok  # Python's ssl cannot check URI SANs in the handshake
    with pytest.raises(tls.TLSIdentityError) as info:
        tls.verify_outbound(link.client, expected=["spiffe://cluster.local/ns/other/sa/other"])
    assert info.value.reason == "identity"
    with pytest.raises(tls.TLSIdentityError):
        tls.verify_outbound(link.client, expected=[])


def test_expected_identity_matches_exactly_not_by_prefix(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, client_cert)
    for near in (SERVER_ID + "x", SERVER_ID[:-1], SERVER_ID.upper(), SERVER_ID + "/"):
        with pytest.raises(tls.TLSIdentityError):
            tls.verify_server_identity(link.client, [near])


def test_client_in_another_trust_domain_is_rejected(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, _issue(ca, "spiffe://other.domain/ns/client-ns/sa/client"))
    assert link.ok
    with pytest.raises(tls.TLSIdentityError, match=r"trust domain cluster\.local"):
        tls.verify_inbound(link.server, trust_domain=TD)


def test_san_with_nul_gives_no_identity(ca: FakeCA, client_cert: WorkloadCertificate) -> None:
    nul = "spiffe://cluster.local/ns/server-ns/sa/server\x00.evil"
    link = _link(_issue(ca, SERVER_ID, uri_sans=[nul]), client_cert)
    assert link.ok
    peer = link.client.getpeercert()
    assert peer is not None and peer["subjectAltName"] == (("URI", nul),)  # NUL kept intact
    assert tls.peer_identities(link.client) == []
    with pytest.raises(tls.TLSIdentityError):
        tls.verify_outbound(link.client, expected=[SERVER_ID, nul])


def test_client_with_only_a_bad_san_is_rejected(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    client = _issue(ca, CLIENT_ID, uri_sans=["spiffe://cluster.local/ns/a/sa/b\x00"])
    link = _link(server_cert, client)
    with pytest.raises(tls.TLSIdentityError):
        tls.verify_inbound(link.server, trust_domain=TD)


def test_certificate_without_uri_san_is_rejected(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    link = _link(server_cert, _issue(ca, CLIENT_ID, uri_sans=[]))
    assert link.ok
    assert tls.peer_identities(link.server) == []
    with pytest.raises(tls.TLSIdentityError):
        tls.verify_inbound(link.server, trust_domain=TD)


def test_first_parseable_of_several_sans_is_the_peer_identity(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    first = "spiffe://cluster.local/ns/first/sa/one"
    second = "spiffe://cluster.local/ns/second/sa/two"
    client = _issue(ca, first, uri_sans=["https://example.com/", first, second])
    link = _link(server_cert, client)
    assert tls.peer_identities(link.server) == [Identity.parse(first), Identity.parse(second)]
    assert tls.verify_inbound(link.server, trust_domain=TD) == Identity.parse(first)


def test_inbound_identity_is_the_first_in_our_trust_domain(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    foreign = "spiffe://evil.domain/ns/a/sa/b"
    ours = "spiffe://cluster.local/ns/c/sa/d"
    link = _link(server_cert, _issue(ca, ours, uri_sans=[foreign, ours]))
    assert tls.peer_identities(link.server)[0] == Identity.parse(foreign)
    assert tls.verify_inbound(link.server, trust_domain=TD) == Identity.parse(ours)


# --- ALPN ------------------------------------------------------------------------------------


def test_client_without_alpn_is_served_with_prior_knowledge(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    client_ctx = tls.client_context(client_cert)
    client_ctx.set_alpn_protocols([])
    link = Link(tls.server_context(server_cert), client_ctx).handshake()
    assert link.ok
    assert link.server.selected_alpn_protocol() is None
    assert tls.alpn_ok(link.server)
    assert tls.verify_inbound(link.server, trust_domain=TD) == Identity.parse(CLIENT_ID)


def test_client_offering_only_http11_gets_no_alpn(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    # OpenSSL servers select nothing rather than fail (rustls fails); the h2 layer then
    # holds the client to the HTTP/2 preface.
    client_ctx = tls.client_context(client_cert)
    client_ctx.set_alpn_protocols(["http/1.1"])
    link = Link(tls.server_context(server_cert), client_ctx).handshake()
    assert link.ok
    assert link.server.selected_alpn_protocol() is None


def test_server_selecting_other_alpn_is_rejected(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    server_ctx = tls.server_context(server_cert)
    server_ctx.set_alpn_protocols(["http/1.1"])
    client_ctx = tls.client_context(client_cert)
    client_ctx.set_alpn_protocols(["h2", "http/1.1"])
    link = Link(server_ctx, client_ctx).handshake()
    assert link.client.selected_alpn_protocol() == "http/1.1"
    assert not tls.alpn_ok(link.client)
    with pytest.raises(tls.TLSPolicyError, match="ALPN"):
        tls.verify_outbound(link.client, expected=[SERVER_ID])


class _Session:
    """The negotiated parameters of a session that our contexts cannot produce."""

    def __init__(self, version: str, cipher: str, alpn: str | None = "h2") -> None:
        self._version, self._cipher, self._alpn = version, cipher, alpn

    def version(self) -> str:
        return self._version

    def cipher(self) -> tuple[str, str, int]:
        return (self._cipher, self._version, 256)

    def selected_alpn_protocol(self) -> str | None:
        return self._alpn


@pytest.mark.parametrize(
    "session",
    [
        _Session("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256"),
        _Session("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384"),
        _Session("TLSv1.1", "ECDHE-ECDSA-AES256-SHA"),
        _Session("TLSv1.3", "TLS_AES_128_GCM_SHA256", alpn="http/1.1"),
    ],
    ids=["chacha20", "tls12", "tls11", "alpn-http11"],
)
def test_session_outside_policy_is_rejected(session: _Session) -> None:
    with pytest.raises(tls.TLSPolicyError):
        tls.check_session(session)  # type: ignore[arg-type]


def test_aes_128_gcm_is_within_policy() -> None:
    tls.check_session(_Session("TLSv1.3", "TLS_AES_128_GCM_SHA256"))  # type: ignore[arg-type]
    tls.check_session(_Session("TLSv1.3", "TLS_AES_256_GCM_SHA384", alpn=None))  # type: ignore[arg-type]


# --- loading our certificate ------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_loading_leaves_no_descriptor_open(server_cert: WorkloadCertificate) -> None:
    tls.server_context(server_cert)
    before = _open_fds()
    for _ in range(5):
        tls.client_context(server_cert)
    assert _open_fds() == before


def test_without_memfd_a_private_temporary_directory_is_used_and_removed(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    server_cert: WorkloadCertificate,
    client_cert: WorkloadCertificate,
) -> None:
    monkeypatch.delattr(os, "memfd_create")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    link = Link(tls.server_context(server_cert), tls.client_context(client_cert)).handshake()
    assert link.ok
    assert list(tmp_path.iterdir()) == []


def test_key_not_matching_the_certificate_is_a_config_error(ca: FakeCA) -> None:
    a, b = _issue(ca, SERVER_ID), _issue(ca, SERVER_ID)
    mixed = _replace(a, key_pem=b.key_pem)
    with pytest.raises(tls.TLSConfigError) as info:
        tls.server_context(mixed)
    assert "PRIVATE KEY" not in str(info.value)
    assert b.key_pem not in str(info.value)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("roots_pem", (), "no root certificate present"),
        ("roots_pem", ("not a pem",), "roots"),
        ("chain_pem", (), "empty chain"),
        ("chain_pem", ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",), ""),
    ],
)
def test_unusable_certificate_is_a_config_error(
    server_cert: WorkloadCertificate, field: str, value: tuple[str, ...], message: str
) -> None:
    with pytest.raises(tls.TLSConfigError, match=message or None):
        tls.client_context(_replace(server_cert, **{field: value}))


# --- the context cache ------------------------------------------------------------------------


def test_context_cache_reuses_per_certificate_and_side(
    ca: FakeCA, server_cert: WorkloadCertificate
) -> None:
    cache = tls.ContextCache(max_size=4)
    server = cache.server(server_cert)
    assert cache.server(server_cert) is server
    assert cache.client(server_cert) is not server
    rotated = _issue(ca, SERVER_ID)
    assert cache.server(rotated) is not server
    assert len(cache) == 3


def test_context_cache_is_bounded_lru(ca: FakeCA) -> None:
    cache = tls.ContextCache(max_size=2)
    certs = [_issue(ca, f"spiffe://cluster.local/ns/n{i}/sa/s") for i in range(3)]
    first = cache.client(certs[0])
    cache.client(certs[1])
    assert cache.client(certs[0]) is first  # refreshes certs[0]
    cache.client(certs[2])  # evicts certs[1]
    assert len(cache) == 2
    assert cache.client(certs[0]) is first


def test_context_cache_forgets_an_identity(
    server_cert: WorkloadCertificate, client_cert: WorkloadCertificate
) -> None:
    cache = tls.ContextCache()
    cache.server(server_cert)
    cache.client(server_cert)
    cache.client(client_cert)
    cache.forget(SERVER_ID)
    assert len(cache) == 1
