"""The development CA behind FAKE_CA=true: one persistent root per host, leaves on demand.

Upstream's mock CA (`src/identity/caclient.rs::mock`, `src/tls/mock.rs`) signs with a root
key compiled into the binary. We keep the root in a directory instead (`FAKE_CA_DIR`,
default `/tmp/ztunnel-fake-ca`, DESIGN §3) so that every ztunnel on one host, and every
test, shares one trust root without shipping a private key in the source tree.

The directory is created 0700 and must be owned by us and not writable by anyone else: it
lives in world-writable /tmp, where another user could plant a root of their choosing.
Concurrent first use is serialised with `flock` on a lock file inside it, and each file is
written to a temporary name, fsynced and renamed, so a reader never sees half a file. The
key is written before the certificate, so "certificate present" means "both complete".

Leaves follow the mock (`generate_test_certs_with_root`): subject `O=cluster.local`, KU
digitalSignature + keyEncipherment (critical), EKU serverAuth + clientAuth, one URI SAN,
a random 159-bit serial. Unlike the mock, every leaf gets a fresh ECDSA P-256 key, as a
real CSR would (`src/tls/csr.rs`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.core.errors import ZtunnelError
from ztunnel.core.identity import Identity
from ztunnel.core.ipc import WorkloadCertificate

DEFAULT_DIR = "/tmp/ztunnel-fake-ca"  # FAKE_CA_DIR default (DESIGN §3)
ROOT_CERT_FILE = "root-cert.pem"  # upstream's file names in src/tls/
ROOT_KEY_FILE = "ca-key.pem"
LOCK_FILE = ".lock"
ORGANIZATION = "cluster.local"  # subject O of root and leaves, as the mock
ROOT_VALIDITY = 10 * 365 * 86400.0  # seconds
CLOCK_SKEW = 60.0  # seconds a leaf is backdated, for peers whose clock runs behind


class FakeCAError(ZtunnelError):
    """The fake CA directory is unusable (wrong owner, partial, corrupt, expired)."""

    reason = "fake_ca"


class FakeCA:
    """A root key and certificate that issue workload certificates."""

    __slots__ = ("_key", "_root", "directory", "root_pem")

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        root: x509.Certificate,
        directory: str | None = None,
    ) -> None:
        self._key = key
        self._root = root
        self.directory = directory  # None for an in-memory CA
        self.root_pem = root.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def open(cls, directory: str = DEFAULT_DIR, *, now: float | None = None) -> FakeCA:
        """Load the root from `directory`, creating directory and root on first use."""
        now = time.time() if now is None else now
        _prepare_dir(directory)
        with _locked(os.path.join(directory, LOCK_FILE)):
            key, root = _load_or_create(directory, now)
        return cls(key, root, directory)

    @classmethod
    def ephemeral(cls, *, now: float | None = None) -> FakeCA:
        """A CA that lives only in memory: "a certificate from another root" in tests."""
        key, root = _new_root(time.time() if now is None else now)
        return cls(key, root)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the root certificate (DER), hex."""
        return self._root.fingerprint(hashes.SHA256()).hex()

    def issue(self, identity: str, *, ttl: float, now: float) -> WorkloadCertificate:
        """A leaf for `identity`, valid from `now - CLOCK_SKEW` to `now + ttl` (seconds)."""
        Identity.parse(identity)  # IdentityError: never sign a SAN we would not accept
        return self.issue_for_test(
            identity, not_before=now - CLOCK_SKEW, not_after=now + ttl, uri_sans=None
        )

    def issue_for_test(
        self,
        identity: str,
        *,
        not_before: float,
        not_after: float,
        uri_sans: Sequence[str] | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> WorkloadCertificate:
        """A leaf with any validity and URI SANs (none if empty), unchecked: for tests.

        `uri_sans=None` means `[identity]`; `key` reuses a leaf key instead of a fresh one.
        """
        key = ec.generate_private_key(ec.SECP256R1()) if key is None else key
        sans = [identity] if uri_sans is None else list(uri_sans)
        start, end = int(not_before), int(not_after)  # X.509 times are whole seconds
        leaf = self._sign_leaf(key.public_key(), sans, start, end)
        return WorkloadCertificate(
            identity=identity,
            chain_pem=(leaf.public_bytes(serialization.Encoding.PEM).decode(),),
            key_pem=_key_pem(key).decode(),
            roots_pem=(self.root_pem,),
            not_before=float(start),
            not_after=float(end),
        )

    def sign_crl(
        self, serials: Sequence[int], *, now: float | None = None, ttl: float = 86400.0
    ) -> bytes:
        """A PEM CRL from this root revoking `serials`: for CRL_PATH in demos and tests."""
        now = time.time() if now is None else now
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._root.subject)
            .last_update(_utc(int(now - CLOCK_SKEW)))
            .next_update(_utc(int(now + ttl)))
        )
        for serial in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(_utc(int(now - CLOCK_SKEW)))
                .build()
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def _sign_leaf(
        self, public_key: ec.EllipticCurvePublicKey, sans: list[str], start: int, end: int
    ) -> x509.Certificate:
        builder = (
            leaf_builder(public_key, _name(), start, end)
            .issuer_name(self._root.subject)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            # Not critical: the subject is not empty (RFC 5280 §4.2.1.6), as in the mock.
            uris = [x509.UniformResourceIdentifier(s) for s in sans]
            builder = builder.add_extension(x509.SubjectAlternativeName(uris), critical=False)
        return builder.sign(self._key, hashes.SHA256())


# --- the root ------------------------------------------------------------------------------


def _new_root(now: float) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    root = (
        x509.CertificateBuilder()
        .subject_name(_name())
        .issuer_name(_name())
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(int(now - CLOCK_SKEW)))
        .not_valid_after(_utc(int(now + ROOT_VALIDITY)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(leaf=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, root


def _load_or_create(
    directory: str, now: float
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Under the lock: read the root, or create it if the directory holds neither file."""
    key_path = os.path.join(directory, ROOT_KEY_FILE)
    cert_path = os.path.join(directory, ROOT_CERT_FILE)
    have_key, have_cert = os.path.exists(key_path), os.path.exists(cert_path)
    if not have_key and not have_cert:
        key, root = _new_root(now)
        _write_atomic(key_path, _key_pem(key))
        _write_atomic(cert_path, root.public_bytes(serialization.Encoding.PEM))
        return key, root
    if not (have_key and have_cert):
        present, missing = (key_path, cert_path) if have_key else (cert_path, key_path)
        raise FakeCAError(
            f"fake CA directory {directory} is incomplete: {present} exists but {missing} "
            "does not; remove the directory to create a new root"
        )
    return _read_root(directory, key_path, cert_path, now)


def _read_root(
    directory: str, key_path: str, cert_path: str, now: float
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
        root = x509.load_pem_x509_certificate(_read(cert_path))
    except ValueError as e:
        raise FakeCAError(
            f"fake CA directory {directory} is corrupt ({e}); remove it to create a new root"
        ) from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != root.public_key():
        raise FakeCAError(
            f"fake CA directory {directory} is corrupt: {key_path} does not match "
            f"{cert_path}; remove the directory to create a new root"
        )
    if root.not_valid_after_utc.timestamp() <= now:
        raise FakeCAError(
            f"fake CA root {cert_path} has expired; remove {directory} to create a new root"
        )
    return key, root


# --- files ---------------------------------------------------------------------------------


def _prepare_dir(directory: str) -> None:
    """Create `directory` 0700, then insist that only we can write to it."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        st = os.lstat(directory)
    except OSError as e:
        raise FakeCAError(f"fake CA directory {directory}: {e.strerror}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise FakeCAError(f"fake CA directory {directory} is not a directory")
    if st.st_uid != os.geteuid():
        raise FakeCAError(
            f"fake CA directory {directory} belongs to uid {st.st_uid}, not to us "
            f"(uid {os.geteuid()}); refusing to trust a root someone else may have planted"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise FakeCAError(
            f"fake CA directory {directory} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); use a private directory"
        )


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive `flock` on `path`; the kernel drops it if we die."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise FakeCAError(f"fake CA lock {path}: {e.strerror}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a crashed process that had our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _read(path: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        why = "is a symlink" if e.errno == errno.ELOOP else e.strerror
        raise FakeCAError(f"fake CA file {path}: {why}") from e
    with os.fdopen(fd, "rb") as f:
        return f.read()


# --- small builders ------------------------------------------------------------------------


def _name() -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])


def _utc(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)


def leaf_builder(
    public_key: CertificatePublicKeyTypes,
    subject: x509.Name,
    start: int,
    end: int,
    *,
    client_auth: bool = True,
) -> x509.CertificateBuilder:
    """The leaf profile every issuer here shares (upstream's mock CA, `src/tls/mock.rs`).

    KU digitalSignature + keyEncipherment (critical), EKU serverAuth (+ clientAuth), CA:false,
    a random 159-bit serial, and the leaf's own key identifier: leaf and root share the
    subject O=cluster.local, and without distinct key identifiers OpenSSL takes the leaf
    for self-signed and rejects it. The caller adds issuer, SANs and signs.
    """
    usages = [ExtendedKeyUsageOID.SERVER_AUTH]
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_utc(start))
        .not_valid_after(_utc(end))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(leaf=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, leaf: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=leaf,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=not leaf,
        crl_sign=not leaf,
        encipher_only=False,
        decipher_only=False,
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """PKCS#8, unencrypted: the form upstream's `parse_key` accepts."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
