"""The control plane's serving certificate: a DNS/IP-SAN leaf signed by the CA directory's root.

gRPC clients verify the server name (the host of XDS_ADDRESS, or ALT_XDS_HOSTNAME), so
unlike workload certificates (URI SANs only, `ztunnel.fakeca`) this leaf carries the names
istiod answers to plus the loopback names a laptop uses. The root is the one
`FakeCA.open(ca_dir)` keeps in `<ca_dir>/root-cert.pem` and `<ca_dir>/ca-key.pem`, so
ztunnels trust the control plane with `XDS_ROOT_CA=<ca_dir>/root-cert.pem`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ztunnel.fakeca import ROOT_CERT_FILE, ROOT_KEY_FILE, FakeCA, leaf_builder

# istiod's in-cluster names (its certificate carries them, `pilot/pkg/bootstrap/certcontroller.go`)
# plus what `XDS_ADDRESS=https://localhost:15012` (upstream's out-of-cluster default) needs.
DEFAULT_DNS_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "localhost",
)
DEFAULT_IPS = ("127.0.0.1", "::1")
SERVING_TTL = 365 * 86400.0  # seconds; the control plane re-issues on every start anyway
CLOCK_SKEW = 60.0  # seconds the leaf is backdated


@dataclass(frozen=True, slots=True)
class ServingCertificate:
    """PEM bytes for `grpc.ssl_server_credentials` and for clients' trust roots."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    root_pem: bytes


@dataclass(frozen=True, slots=True)
class Root:
    """A CA key and certificate that can sign serving certificates."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    cert: x509.Certificate

    @classmethod
    def open(cls, ca_dir: str) -> Root:
        """The root of `ca_dir`, created (0700, as FAKE_CA_DIR) if the directory has none."""
        FakeCA.open(ca_dir)  # creates or validates the directory and the root, under its lock
        with open(os.path.join(ca_dir, ROOT_KEY_FILE), "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(os.path.join(ca_dir, ROOT_CERT_FILE), "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_dir}/{ROOT_KEY_FILE}: not an EC key")
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue_serving(
        self,
        *,
        dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
        ips: Sequence[str] = DEFAULT_IPS,
        ttl: float = SERVING_TTL,
        now: float | None = None,
    ) -> ServingCertificate:
        """A fresh P-256 key and a serverAuth leaf naming `dns_names` and `ips`."""
        now = time.time() if now is None else now
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        # A subject of its own: a leaf whose subject equals the root's looks self-issued.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "istiod")])
        start, end = int(now - CLOCK_SKEW), int(now + ttl)
        leaf = (
            leaf_builder(public, subject, start, end, client_auth=False)
            .issuer_name(self.cert.subject)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return ServingCertificate(
            cert_pem=leaf.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem,
            root_pem=self.pem,
        )


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(int(seconds), tz=datetime.UTC)
