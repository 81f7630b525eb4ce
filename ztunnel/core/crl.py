"""Certificate revocation lists (CRL_PATH): parse the file, judge a verified peer chain.

Upstream: `src/tls/crl.rs` and `src/tls/revocation.rs` (inventory §8.8). The file holds one or
more PEM `X509 CRL` blocks (other PEM blocks are skipped) or one DER CRL; an empty file, or
PEM without a CRL block, revokes nothing. A certificate of the peer's chain is revoked when
a CRL issued by that certificate's issuer, and signed by the issuer's key as it appears in
the same verified chain, lists its serial number. As upstream (webpki with
`allow_unknown_revocation_status`), a chain with no CRL for some issuer is accepted. An issuer
whose KeyUsage lacks cRLSign cannot revoke (webpki's check).

Decided here, where upstream differs between versions: a CRL past its nextUpdate still
revokes what it lists (a stale CRL must not un-revoke a certificate), and expiry never makes
an otherwise valid chain fail. Trust anchors (the last certificate of a verified chain) are
not checked against CRLs; revoke a root by removing it from the trust bundle.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ztunnel.core.errors import ZtunnelError

if TYPE_CHECKING:
    from cryptography import x509

# `cryptography.x509` is imported where it is used: it adds ~9 MB to every worker process,
# and only a worker with CRL_PATH set ever parses a CRL or a chain.

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)-----END \1-----", re.S)


class CRLError(ZtunnelError):
    """The CRL file cannot be used: names the block and why."""


class RevocationList:
    """Immutable: the CRLs of one version of the file, indexed by issuer name."""

    __slots__ = ("_by_issuer", "_signed", "count", "revoked")

    def __init__(self, crls: Sequence[x509.CertificateRevocationList] = ()) -> None:
        self.count = len(crls)
        self.revoked = sum(len(crl) for crl in crls)
        self._by_issuer: dict[bytes, list[x509.CertificateRevocationList]] = {}
        for crl in crls:
            if len(crl):  # a CRL listing nothing cannot revoke anything
                self._by_issuer.setdefault(crl.issuer.public_bytes(), []).append(crl)
        self._signed: dict[tuple[int, bytes], bool] = {}  # (CRL, issuer DER) -> signature ok

    @classmethod
    def parse(cls, data: bytes) -> RevocationList:
        """The CRLs in `data` (PEM or DER); CRLError naming the bad one."""
        if not data.strip():
            return cls()
        from cryptography import x509  # noqa: PLC0415  (see the module's imports)

        if data.lstrip().startswith(b"-----BEGIN"):
            crls = []
            blocks = [m for m in _PEM_BLOCK.finditer(data) if m.group(1) == b"X509 CRL"]
            for index, block in enumerate(blocks, 1):
                try:
                    crls.append(x509.load_pem_x509_crl(block.group(0)))
                except ValueError as e:
                    raise CRLError(f"CRL {index} of {len(blocks)}: {e}") from None
            return cls(crls)
        try:
            return cls([x509.load_der_x509_crl(data)])
        except ValueError as e:
            raise CRLError(f"not a PEM or DER CRL: {e}") from None

    def __bool__(self) -> bool:
        """True when some certificate can be revoked by these CRLs."""
        return bool(self._by_issuer)

    def check(self, chain: Sequence[bytes]) -> str | None:
        """Why the verified chain (DER, leaf first, anchor last) is revoked, or None."""
        if not self._by_issuer or len(chain) < 2:
            return None
        from cryptography import x509  # noqa: PLC0415  (see the module's imports)

        certs = [x509.load_der_x509_certificate(der) for der in chain]
        for cert, issuer in itertools.pairwise(certs):
            for crl in self._by_issuer.get(cert.issuer.public_bytes(), ()):
                if not self._signed_by(crl, issuer):
                    continue
                if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
                    return (
                        f"certificate serial {cert.serial_number} issued by "
                        f"{cert.issuer.rfc4514_string()} is revoked"
                    )
        return None

    def _signed_by(self, crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
        from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

        key = (id(crl), issuer.public_bytes(Encoding.DER))
        ok = self._signed.get(key)
        if ok is None:
            ok = _may_sign_crls(issuer) and _signature_ok(crl, issuer)
            self._signed[key] = ok
        return ok


def _may_sign_crls(issuer: x509.Certificate) -> bool:
    from cryptography import x509  # noqa: PLC0415  (see the module's imports)

    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return usage.crl_sign


def _signature_ok(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a key type that cannot sign CRLs
        return False
