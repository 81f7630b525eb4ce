"""Certificate signing requests for workload identities (upstream `src/tls/csr.rs`).

Upstream's request, field by field: a fresh ECDSA P-256 key, a SHA-256 signature, an empty
subject (rcgen would otherwise add `CN=rcgen self signed cert`), and exactly one extension,
a critical SubjectAlternativeName holding one URI, the SPIFFE identity. The SAN is critical
because the subject is empty (RFC 5280 §4.2.1.6). The key is returned as unencrypted
PKCS#8 PEM, the only form `parse_key` accepts upstream.

Pure apart from the key's randomness, which comes from the OS through `cryptography`.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ztunnel.core.identity import Identity


def new_csr(identity: str) -> tuple[str, str]:
    """A CSR for `identity` and its private key: `(csr_pem, key_pem)`.

    Raises IdentityError when `identity` is not a SPIFFE identity we accept: we never ask a
    CA for a name we would refuse to present or to trust.
    """
    Identity.parse(identity)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key_pem.decode()
