"""CRL_PATH contents and chain judgement (`ztunnel.core.crl`), upstream inventory §8.8."""

from __future__ import annotations

import datetime
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.core.crl import CRLError, RevocationList
from ztunnel.fakeca import FakeCA

pytestmark = pytest.mark.timeout(60)

ID = "spiffe://cluster.local/ns/default/sa/client"
NOW = time.time()


def _der(pem: str) -> bytes:
    return x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)


def _chain(ca: FakeCA, identity: str = ID) -> tuple[list[bytes], int]:
    """A leaf from `ca` as OpenSSL hands over a verified chain: leaf, then the root."""
    cert = ca.issue(identity, ttl=3600, now=NOW)
    leaf = x509.load_pem_x509_certificate(cert.chain_pem[0].encode())
    return [_der(cert.chain_pem[0]), _der(ca.root_pem)], leaf.serial_number


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA.ephemeral()


def test_a_revoked_leaf_is_named_and_others_pass(ca: FakeCA) -> None:
    chain, serial = _chain(ca)
    other, _ = _chain(ca, "spiffe://cluster.local/ns/default/sa/server")
    crl = RevocationList.parse(ca.sign_crl([serial, 12345]))
    reason = crl.check(chain)
    assert reason is not None and str(serial) in reason and "is revoked" in reason
    assert crl.check(other) is None
    assert (crl.count, crl.revoked) == (1, 2)


def test_empty_file_and_pem_without_crls_revoke_nothing(ca: FakeCA) -> None:
    chain, _ = _chain(ca)
    for data in (b"", b"\n  \n", ca.root_pem.encode()):
        crl = RevocationList.parse(data)
        assert not crl
        assert crl.check(chain) is None


def test_concatenated_pem_crls_with_other_blocks_between(ca: FakeCA) -> None:
    other_ca = FakeCA.ephemeral()
    chain, serial = _chain(ca)
    other_chain, other_serial = _chain(other_ca)
    data = (
        other_ca.sign_crl([other_serial])
        + ca.root_pem.encode()
        + b"-----BEGIN PRIVATE KEY-----\nnot looked at\n-----END PRIVATE KEY-----\n"
        + ca.sign_crl([serial])
    )
    crl = RevocationList.parse(data)
    assert crl.count == 2
    assert crl.check(chain) is not None
    assert crl.check(other_chain) is not None


def test_der_crl(ca: FakeCA) -> None:
    chain, serial = _chain(ca)
    pem = ca.sign_crl([serial])
    der = x509.load_pem_x509_crl(pem).public_bytes(serialization.Encoding.DER)
    assert RevocationList.parse(der).check(chain) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"not a CRL at all",
        b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        b"\x30\x03\x02\x01\x01",
    ],
)
def test_garbage_is_an_error_naming_the_problem(data: bytes) -> None:
    with pytest.raises(CRLError):
        RevocationList.parse(data)


def test_a_crl_not_signed_by_the_issuer_is_ignored(ca: FakeCA) -> None:
    chain, serial = _chain(ca)
    forger = FakeCA.ephemeral()  # same subject name ("O=cluster.local"), another key
    crl = RevocationList.parse(forger.sign_crl([serial]))
    assert crl  # it lists something...
    assert crl.check(chain) is None  # ...but cannot revoke what `ca` issued


def test_a_stale_crl_still_revokes(ca: FakeCA) -> None:
    chain, serial = _chain(ca)
    stale = ca.sign_crl([serial], now=NOW - 10 * 86400, ttl=3600)  # nextUpdate long past
    assert RevocationList.parse(stale).check(chain) is not None


def test_a_crl_listing_nothing_and_a_lone_certificate_are_fine(ca: FakeCA) -> None:
    chain, _ = _chain(ca)
    assert RevocationList.parse(ca.sign_crl([])).check(chain) is None
    assert RevocationList.parse(ca.sign_crl([1])).check(chain[:1]) is None


# --- a chain with an intermediate -----------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    issuer: str,
    key: ec.EllipticCurvePrivateKey,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    crl_sign: bool = True,
) -> x509.Certificate:
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca and crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(signer, hashes.SHA256())


def _crl(issuer: str, signer: ec.EllipticCurvePrivateKey, serials: list[int]) -> bytes:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_name(issuer))
        .last_update(now)
        .next_update(now + datetime.timedelta(days=1))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


Keys = list[ec.EllipticCurvePrivateKey]


def _three(crl_sign: bool = True) -> tuple[list[x509.Certificate], Keys]:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(3)]
    root = _cert("root", "root", keys[2], keys[2], ca=True)
    inter = _cert("intermediate", "root", keys[1], keys[2], ca=True, crl_sign=crl_sign)
    leaf = _cert("leaf", "intermediate", keys[0], keys[1], ca=False)
    return [leaf, inter, root], keys


def _ders(certs: list[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certs]


def test_a_revoked_intermediate_revokes_the_chain() -> None:
    (leaf, inter, root), keys = _three()
    crl = RevocationList.parse(_crl("root", keys[2], [inter.serial_number]))
    reason = crl.check(_ders([leaf, inter, root]))
    assert reason is not None and str(inter.serial_number) in reason


def test_a_leaf_revoked_by_its_intermediate() -> None:
    (leaf, inter, root), keys = _three()
    crl = RevocationList.parse(_crl("intermediate", keys[1], [leaf.serial_number]))
    assert crl.check(_ders([leaf, inter, root])) is not None
    # The root's key cannot speak for the intermediate.
    forged = RevocationList.parse(_crl("intermediate", keys[2], [leaf.serial_number]))
    assert forged.check(_ders([leaf, inter, root])) is None


def test_an_issuer_without_crl_sign_cannot_revoke() -> None:
    (leaf, inter, root), keys = _three(crl_sign=False)
    crl = RevocationList.parse(_crl("intermediate", keys[1], [leaf.serial_number]))
    assert crl.check(_ders([leaf, inter, root])) is None
