"""CSRs for workload identities: upstream `src/tls/csr.rs` (`test_csr`) and its profile."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from ztunnel.core.csr import new_csr
from ztunnel.core.identity import IdentityError

pytestmark = pytest.mark.timeout(20)

ID = "spiffe://td/ns/ns1/sa/sa1"


def _csr(pem: str) -> x509.CertificateSigningRequest:
    assert pem.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    return x509.load_pem_x509_csr(pem.encode())


def test_csr_has_empty_subject_one_critical_uri_san_and_valid_signature() -> None:
    csr_pem, _ = new_csr(ID)
    csr = _csr(csr_pem)
    assert csr.is_signature_valid
    assert list(csr.subject) == []
    assert len(csr.extensions) == 1
    ext = csr.extensions[0]
    assert ext.critical
    assert isinstance(ext.value, x509.SubjectAlternativeName)
    assert list(ext.value) == [x509.UniformResourceIdentifier(ID)]


def test_csr_is_ecdsa_p256_with_sha256() -> None:
    csr = _csr(new_csr(ID)[0])
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)


def test_key_is_unencrypted_pkcs8_matching_the_csr() -> None:
    csr_pem, key_pem = new_csr(ID)
    assert key_pem.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, not "EC PRIVATE KEY"
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    assert key.public_key() == _csr(csr_pem).public_key()


def test_every_csr_has_a_fresh_key() -> None:
    assert new_csr(ID)[1] != new_csr(ID)[1]


@pytest.mark.parametrize(
    "identity",
    [
        "td/ns/ns/sa/sa",
        "spiffe://td/ns/ns/sa",
        "spiffe://td/ns/ns/sa/sa/",
        "spiffe://td/ns/a b/sa/sa",
        "",
    ],
)
def test_refuses_identities_we_would_not_accept(identity: str) -> None:
    with pytest.raises(IdentityError):
        new_csr(identity)


_PART = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=20).filter(
    lambda s: s not in (".", "..")
)


@given(td=_PART, ns=_PART, sa=_PART)
def test_san_round_trips_any_valid_identity(td: str, ns: str, sa: str) -> None:
    identity = f"spiffe://{td}/ns/{ns}/sa/{sa}"
    csr = _csr(new_csr(identity)[0])
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
