"""The control plane's Istio CA: `istio.v1.auth.IstioCertificateService/CreateCertificate`.

Signs CSRs with the development root in `ca_dir` (the FAKE_CA_DIR layout, so ztunnels with
FAKE_CA and ztunnels talking to this CA share one trust root). It checks what istiod checks,
in its own way:

* the CSR's signature, and exactly one SAN extension holding exactly one URI, a SPIFFE
  identity in this CA's trust domain (else INVALID_ARGUMENT / PERMISSION_DENIED);
* with `require_token`, `authorization: Bearer <token>` (else UNAUTHENTICATED);
* with `known_identities`, that the identity belongs to a workload it knows: it signs CSRs
  only for identities it knows (else PERMISSION_DENIED);
* `ImpersonatedIdentity` request metadata (ztunnel's shared mode), when present, must equal
  the CSR's SAN (else PERMISSION_DENIED). istiod instead checks that the caller may act for
  that identity (a pod of it runs on the caller's node) and signs the impersonated name;
  without Kubernetes to ask, we only refuse a request whose two names disagree.

Leaves have the profile of `ztunnel.fakeca` leaves (subject O=cluster.local, KU
digitalSignature + keyEncipherment, EKU serverAuth + clientAuth, random serial, backdated
60 s), are valid for the requested `validity_duration` capped at 24 h (0 or less means 24 h,
as istiod's default workload TTL), and are returned as `[leaf, root]`.

`CAService` counts what it did (`issued`, `failures`), remembers recent calls, and has two
fault hooks for tests: `available = False` answers UNAVAILABLE (a CA outage) and
`fail_next = n` fails the next n calls the same way.
"""

from __future__ import annotations

import collections
import datetime
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from controlplane.tls import Root
from ztunnel.core.identity import Identity, IdentityError
from ztunnel.fakeca import CLOCK_SKEW, ORGANIZATION, leaf_builder
from ztunnel.gen import citadel_pb2, citadel_pb2_grpc

log = logging.getLogger(__name__)

MAX_VALIDITY = 24 * 3600  # seconds; also the default when none is requested
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
MIN_RSA_BITS = 2048
RECENT_CALLS = 64  # calls remembered for tests and debugging


@dataclass(frozen=True, slots=True)
class Call:
    """One CreateCertificate call as the CA saw it (no CSR, no token value)."""

    identity: str | None  # the CSR's URI SAN, None when the CSR was unusable
    impersonated: str | None  # ImpersonatedIdentity metadata
    validity_duration: int  # seconds requested
    metadata: tuple[tuple[str, str], ...]  # gRPC metadata, `authorization` redacted
    code: grpc.StatusCode  # OK or the error returned


class Rejected(Exception):
    """A request this CA refuses, with the gRPC status to answer."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class CAService(citadel_pb2_grpc.IstioCertificateServiceServicer):
    """CreateCertificate signed by the root of a CA directory."""

    def __init__(
        self,
        root: Root,
        *,
        trust_domain: str = "cluster.local",
        require_token: str | None = None,
        known_identities: Callable[[], set[str]] | None = None,
    ) -> None:
        self.root = root
        self.trust_domain = trust_domain
        self.require_token = require_token
        self.known_identities = known_identities
        self.issued = 0
        self.failures = 0
        self.fail_next = 0  # fault hook: fail this many calls with UNAVAILABLE
        self.available = True  # fault hook: False answers every call with UNAVAILABLE
        self.calls: collections.deque[Call] = collections.deque(maxlen=RECENT_CALLS)

    async def CreateCertificate(
        self,
        request: citadel_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> citadel_pb2.IstioCertificateResponse:
        metadata = _metadata(context)
        impersonated = _impersonated(request)
        identity: str | None = None
        try:
            self._check_available()
            self._check_token(metadata)
            csr = _load_csr(request.csr)
            identity = _csr_identity(csr)
            self._check_identity(identity, impersonated)
            chain = self.sign(csr.public_key(), identity, request.validity_duration)
        except Rejected as e:
            self.failures += 1
            self._remember(identity, impersonated, request, metadata, e.code)
            log.info("CreateCertificate refused (%s): %s", e.code.name, e.details)
            await context.abort(e.code, e.details)
        self.issued += 1
        self._remember(identity, impersonated, request, metadata, grpc.StatusCode.OK)
        log.info("issued certificate for %s", identity)
        return citadel_pb2.IstioCertificateResponse(cert_chain=chain)

    def sign(self, public_key: object, identity: str, validity_duration: int) -> list[str]:
        """`[leaf PEM, root PEM]` for `identity` and `public_key`; no checks on the caller."""
        if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "RSA key shorter than 2048 bits")
        if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "CSR key must be ECDSA or RSA")
        ttl = validity_duration if 0 < validity_duration <= MAX_VALIDITY else MAX_VALIDITY
        now = int(time.time())
        leaf = _leaf_builder(public_key, identity, now - int(CLOCK_SKEW), now + ttl)
        leaf = leaf.issuer_name(self.root.cert.subject).add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(self.root.key.public_key()),
            critical=False,
        )
        cert = leaf.sign(self.root.key, hashes.SHA256())
        return [cert.public_bytes(serialization.Encoding.PEM).decode(), self.root.pem.decode()]

    # -- checks ---------------------------------------------------------------------------------

    def _check_available(self) -> None:
        if not self.available:
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "CA unavailable (outage simulated)")
        if self.fail_next > 0:
            self.fail_next -= 1
            raise Rejected(grpc.StatusCode.UNAVAILABLE, "CA unavailable (injected failure)")

    def _check_token(self, metadata: dict[str, str]) -> None:
        if self.require_token is None:
            return
        if metadata.get("authorization") != f"Bearer {self.require_token}":
            raise Rejected(grpc.StatusCode.UNAUTHENTICATED, "authentication failure")

    def _check_identity(self, identity: str, impersonated: str | None) -> None:
        try:
            parsed = Identity.parse(identity)
        except IdentityError as e:
            raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"CSR SAN is not SPIFFE: {e}") from e
        if parsed.trust_domain != self.trust_domain:
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{identity} is not in trust domain {self.trust_domain}",
            )
        if impersonated is not None and impersonated != identity:
            raise Rejected(
                grpc.StatusCode.PERMISSION_DENIED,
                f"ImpersonatedIdentity {impersonated} does not match the CSR SAN {identity}",
            )
        if self.known_identities is not None and identity not in self.known_identities():
            raise Rejected(grpc.StatusCode.PERMISSION_DENIED, f"unknown identity {identity}")

    def _remember(
        self,
        identity: str | None,
        impersonated: str | None,
        request: citadel_pb2.IstioCertificateRequest,
        metadata: dict[str, str],
        code: grpc.StatusCode,
    ) -> None:
        shown = tuple(
            (k, "<redacted>" if k == "authorization" else v) for k, v in sorted(metadata.items())
        )
        self.calls.append(Call(identity, impersonated, request.validity_duration, shown, code))


def register(
    server: grpc.aio.Server,
    *,
    ca_dir: str,
    trust_domain: str = "cluster.local",
    require_token: str | None = None,
    known_identities: Callable[[], set[str]] | None = None,
) -> CAService:
    """Add the CA to `server`, signing with the root in `ca_dir` (created if absent)."""
    service = CAService(
        Root.open(ca_dir),
        trust_domain=trust_domain,
        require_token=require_token,
        known_identities=known_identities,
    )
    citadel_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
    return service


# --- request parsing -----------------------------------------------------------------------


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key] = value
    return out


def _impersonated(request: citadel_pb2.IstioCertificateRequest) -> str | None:
    if not request.HasField("metadata"):
        return None
    field = request.metadata.fields.get(IMPERSONATED_IDENTITY)
    return None if field is None else field.string_value


def _load_csr(pem: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
        csr.public_key()  # a key type cryptography cannot load is refused here
        valid = csr.is_signature_valid
    except (ValueError, UnicodeEncodeError, UnsupportedAlgorithm) as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"invalid CSR: {e}") from e
    if not valid:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "CSR signature is invalid")
    return csr


def _csr_identity(csr: x509.CertificateSigningRequest) -> str:
    """The CSR's only SAN, which must be one URI."""
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "CSR has no SAN") from e
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, f"invalid CSR extensions: {e}") from e
    names = list(san)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "CSR SAN must be exactly one URI")
    return names[0].value


def _leaf_builder(
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, identity: str, start: int, end: int
) -> x509.CertificateBuilder:
    # Not critical: the subject is not empty (RFC 5280 §4.2.1.6), as fakeca leaves.
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)])
    return leaf_builder(public_key, subject, start, end).add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=False
    )


def _utc(seconds: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
