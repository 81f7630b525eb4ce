"""The FAKE_CA development root: persistence, sharing between processes, leaf contents."""

from __future__ import annotations

import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.core.identity import IdentityError
from ztunnel.fakeca import (
    CLOCK_SKEW,
    LOCK_FILE,
    ROOT_CERT_FILE,
    ROOT_KEY_FILE,
    FakeCA,
    FakeCAError,
)

pytestmark = pytest.mark.timeout(60)

NOW = 1_800_000_000.0
ID = "spiffe://cluster.local/ns/default/sa/app"


def _leaf(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_open_creates_private_directory_and_files(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    FakeCA.open(str(directory), now=NOW)
    assert _mode(directory) == 0o700
    for name in (ROOT_CERT_FILE, ROOT_KEY_FILE, LOCK_FILE):
        assert _mode(directory / name) == 0o600
    assert sorted(os.listdir(directory)) == sorted([ROOT_CERT_FILE, ROOT_KEY_FILE, LOCK_FILE])


def test_open_reuses_the_root(tmp_path: Path) -> None:
    first = FakeCA.open(str(tmp_path), now=NOW)
    second = FakeCA.open(str(tmp_path), now=NOW + 86400)
    assert first.fingerprint == second.fingerprint
    assert first.root_pem == second.root_pem


def _open_after_barrier(directory: str, barrier: Any, results: Any) -> None:
    barrier.wait(timeout=30)  # all four race for the first open at once
    results.put(FakeCA.open(directory).fingerprint)


def test_concurrent_first_opens_from_four_processes_agree(tmp_path: Path) -> None:
    directory = str(tmp_path / "shared")
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_open_after_barrier, args=(directory, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    fingerprints = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    assert len(set(fingerprints)) == 1
    assert FakeCA.open(directory).fingerprint == fingerprints[0]
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_root_is_a_ca_with_long_validity(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    root = x509.load_pem_x509_certificate(ca.root_pem.encode())
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = root.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign
    assert root.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    assert root.not_valid_after_utc.timestamp() - NOW >= 9 * 365 * 86400
    public = root.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"


def test_issued_leaf_matches_upstream_mock(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    cert = ca.issue(ID, ttl=86400, now=NOW)
    leaf = _leaf(cert.chain_pem[0])
    root = x509.load_pem_x509_certificate(cert.roots_pem[0].encode())

    leaf.verify_directly_issued_by(root)
    assert cert.identity == ID
    assert len(cert.chain_pem) == 1 and cert.roots_pem == (ca.root_pem,)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert len(list(san.value)) == 1
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert leaf.serial_number > 0 and leaf.serial_number.bit_length() <= 159
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == (
        "cluster.local"
    )
    public = leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"


def test_issued_validity_is_ttl_with_backdated_start(tmp_path: Path) -> None:
    cert = FakeCA.open(str(tmp_path), now=NOW).issue(ID, ttl=3600, now=NOW + 0.7)
    leaf = _leaf(cert.chain_pem[0])
    assert cert.not_before == NOW - CLOCK_SKEW
    assert cert.not_after == NOW + 3600
    assert leaf.not_valid_before_utc.timestamp() == cert.not_before
    assert leaf.not_valid_after_utc.timestamp() == cert.not_after


def test_every_issue_has_a_fresh_key_and_serial(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    a, b = (ca.issue(ID, ttl=60, now=NOW) for _ in range(2))
    assert a.key_pem != b.key_pem
    assert _leaf(a.chain_pem[0]).serial_number != _leaf(b.chain_pem[0]).serial_number
    assert a.key_pem.startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8


def test_issue_refuses_an_invalid_identity(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    with pytest.raises(IdentityError):
        ca.issue("spiffe://cluster.local/ns/a/sa/b\x00", ttl=60, now=NOW)


def test_issue_for_test_writes_any_sans(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    sans = ["spiffe://cluster.local/ns/a/sa/b\x00x", ID]
    cert = ca.issue_for_test(ID, not_before=NOW, not_after=NOW + 1, uri_sans=sans)
    san = _leaf(cert.chain_pem[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == sans
    bare = ca.issue_for_test(ID, not_before=NOW, not_after=NOW + 1, uri_sans=[])
    with pytest.raises(x509.ExtensionNotFound):
        _leaf(bare.chain_pem[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issue_for_test_can_reuse_a_key(tmp_path: Path) -> None:
    ca = FakeCA.open(str(tmp_path), now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    a = ca.issue_for_test(ID, not_before=NOW, not_after=NOW + 1, key=key)
    b = ca.issue_for_test(ID, not_before=NOW, not_after=NOW + 1, key=key)
    assert a.key_pem == b.key_pem
    assert _leaf(a.chain_pem[0]).public_key() == key.public_key()


def test_ephemeral_ca_is_another_in_memory_root(tmp_path: Path) -> None:
    persistent = FakeCA.open(str(tmp_path), now=NOW)
    other = FakeCA.ephemeral(now=NOW)
    assert other.directory is None
    assert other.fingerprint != persistent.fingerprint
    assert other.fingerprint != FakeCA.ephemeral(now=NOW).fingerprint
    leaf = _leaf(other.issue(ID, ttl=60, now=NOW).chain_pem[0])
    root = x509.load_pem_x509_certificate(persistent.root_pem.encode())
    with pytest.raises(InvalidSignature):
        leaf.verify_directly_issued_by(root)


@pytest.mark.parametrize(
    ("files", "needle"),
    [
        ({ROOT_CERT_FILE: b"garbage"}, ROOT_KEY_FILE),  # partial: key missing
        ({ROOT_KEY_FILE: b"garbage"}, ROOT_CERT_FILE),  # partial: certificate missing
        ({ROOT_CERT_FILE: b"garbage", ROOT_KEY_FILE: b"garbage"}, "corrupt"),
    ],
)
def test_partial_or_corrupt_directory_names_the_path(
    tmp_path: Path, files: dict[str, bytes], needle: str
) -> None:
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o700)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    with pytest.raises(FakeCAError) as info:
        FakeCA.open(str(directory), now=NOW)
    assert str(directory) in str(info.value)
    assert needle in str(info.value)


def test_key_not_matching_the_root_is_corrupt(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    FakeCA.open(str(a), now=NOW)
    FakeCA.open(str(b), now=NOW)
    (a / ROOT_KEY_FILE).write_bytes((b / ROOT_KEY_FILE).read_bytes())
    with pytest.raises(FakeCAError, match="does not match"):
        FakeCA.open(str(a), now=NOW)


def test_expired_root_is_refused(tmp_path: Path) -> None:
    FakeCA.open(str(tmp_path), now=NOW)
    with pytest.raises(FakeCAError, match="expired"):
        FakeCA.open(str(tmp_path), now=NOW + 11 * 365 * 86400)


def test_directory_writable_by_others_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir()
    directory.chmod(0o777)
    with pytest.raises(FakeCAError, match="writable"):
        FakeCA.open(str(directory), now=NOW)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_directory_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(FakeCAError, match="belongs to uid 65534"):
        FakeCA.open(str(directory), now=NOW)


def test_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(FakeCAError) as info:
        FakeCA.open(str(path), now=NOW)
    assert str(path) in str(info.value)


def test_symlinked_root_file_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    FakeCA.open(str(directory), now=NOW)
    planted = tmp_path / "planted.pem"
    planted.write_text(FakeCA.ephemeral(now=NOW).root_pem)
    (directory / ROOT_CERT_FILE).unlink()
    (directory / ROOT_CERT_FILE).symlink_to(planted)
    with pytest.raises(FakeCAError, match="symlink"):
        FakeCA.open(str(directory), now=NOW)
