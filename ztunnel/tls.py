"""Data-plane mTLS for HBONE: SSL contexts from workload certificates, SPIFFE peer checks.

Upstream: `src/tls/certificate.rs` (server_config / client_config), `src/tls/workload.rs`
(TrustDomainVerifier, IdentityVerifier), `src/tls/lib.rs` (versions and suites).

Python's `ssl` verifies the chain, validity and EKU but cannot check URI SANs inside the
handshake (hardening §1.3). So both contexts use CERT_REQUIRED with `check_hostname=False`,
and the caller MUST run `verify_inbound` / `verify_outbound` on the SSL object after the
handshake and before it reads or writes a single application byte; on TLSError it closes.
Upstream fails the handshake itself; with TLS 1.3 a client has already finished its side
when the server judges its certificate, so both designs look alike on the wire: the peer
sees the connection close (upstream test `trust_domain_mismatch_rejected` expects a reset).

Policy, and where Python makes us differ:
- TLS 1.3 only; `tls12=True` (upstream TLS12_ENABLED) adds 1.2 with ECDHE AES-GCM.
- TLS 1.3 suites: upstream offers only AES-256-GCM and AES-128-GCM. Python 3.11 has no
  `set_ciphersuites`, so OpenSSL's default list (which adds ChaCha20-Poly1305) is offered.
  The server prefers its own order (AES-256-GCM first), so ChaCha20 is chosen only for a
  peer that offers nothing else, and `check_session` then rejects it: same outcome as
  upstream, one round trip later.
- Key exchange groups: OpenSSL defaults (X25519, P-256, P-384, ...). `set_ecdh_curve`
  would pin a single group, which makes peers that key-share another group pay a
  HelloRetryRequest; upstream's default provider also offers X25519.
- No session resumption: the server issues no tickets (`num_tickets = 0`, OP_NO_TICKET)
  and clients never pass `session=`. No compression, no renegotiation.
- No SNI (upstream sends the dummy `0.0.0.0`): wrap with `server_hostname=None`; asyncio
  and uvloop send none when given `server_hostname=""`.
- ALPN: both sides offer only `h2`. A peer that negotiates no ALPN is accepted and spoken
  to with HTTP/2 prior knowledge (rustls behaviour, upstream §8.7); a negotiated protocol
  other than `h2` is rejected (`alpn_ok`). Unlike rustls, an OpenSSL server cannot refuse a
  client that offered ALPN without `h2` (it just selects nothing): such a client is then
  held to the HTTP/2 preface by the h2 layer, so there is still no HTTP/1.1 service.

Loading our chain and key: `SSLContext.load_cert_chain` only takes paths. We hand OpenSSL
two anonymous memory files (`memfd_create`) through `/proc/self/fd/N`, so key material
never touches a file system and nothing is left behind after a crash. Measured: ~0.8 ms
per context against ~2 ms for a private 0700 temporary directory, which remains the
fallback where memfd or /proc is unavailable (files unlinked right after loading).
"""

from __future__ import annotations

import _ssl
import contextlib
import errno
import os
import ssl
import tempfile
from collections import OrderedDict
from collections.abc import Collection, Iterator

from ztunnel.core.errors import ZtunnelError
from ztunnel.core.identity import Identity, IdentityError
from ztunnel.core.ipc import WorkloadCertificate

ALPN_H2 = "h2"
TLS13_CIPHERSUITES = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")  # src/tls/lib.rs
TLS12_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"
)
_OPTIONS = ssl.OP_NO_COMPRESSION | ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION

SSLSession = ssl.SSLObject | ssl.SSLSocket


class TLSError(ZtunnelError):
    """Root of the data-plane TLS errors."""

    reason = "tls"


class TLSConfigError(TLSError):
    """Our own certificate, key or roots cannot be loaded into a context."""

    reason = "tls_config"


class TLSPolicyError(TLSError):
    """The handshake negotiated a version, suite or ALPN protocol we do not allow."""

    reason = "tls_policy"


class TLSIdentityError(TLSError):
    """The peer's SPIFFE identity is not one we accept (upstream SanError / SanTrustDomainError)."""

    reason = "identity"


# --- contexts ------------------------------------------------------------------------------


def server_context(cert: WorkloadCertificate, *, tls12: bool = False) -> ssl.SSLContext:
    """The HBONE server (15008) context: presents `cert`, requires a client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0  # TLS 1.3 sends tickets despite OP_NO_TICKET unless this is 0
    _configure(ctx, cert, tls12)
    return ctx


def client_context(cert: WorkloadCertificate, *, tls12: bool = False) -> ssl.SSLContext:
    """The HBONE client context: presents `cert`; the server SAN is checked afterwards."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # URI SANs are checked by verify_outbound instead
    _configure(ctx, cert, tls12)
    return ctx


def _configure(ctx: ssl.SSLContext, cert: WorkloadCertificate, tls12: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= _OPTIONS
    ctx.set_ciphers(TLS12_CIPHERS)  # the TLS 1.2 list only; see the module docstring
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.verify_mode = ssl.CERT_REQUIRED
    # Pinned, so that a newer Python's defaults (3.13 adds X509_STRICT and
    # PARTIAL_CHAIN) do not change which peers we accept.
    ctx.verify_flags = ssl.VERIFY_X509_TRUSTED_FIRST
    _load_roots(ctx, cert)
    _load_chain(ctx, cert)


def _load_roots(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    if not cert.roots_pem:
        raise TLSConfigError(f"certificate for {cert.identity}: no root certificate present")
    try:
        ctx.load_verify_locations(cadata="\n".join(cert.roots_pem))
    except (ssl.SSLError, ValueError) as e:
        raise TLSConfigError(f"roots for {cert.identity} unusable: {e}") from e


def _load_chain(ctx: ssl.SSLContext, cert: WorkloadCertificate) -> None:
    if not cert.chain_pem:
        raise TLSConfigError(f"certificate for {cert.identity}: empty chain")
    chain = "\n".join(cert.chain_pem).encode()
    key = cert.key_pem.encode()
    try:
        try:
            with _memfd_paths(chain, key) as (chain_path, key_path):
                ctx.load_cert_chain(chain_path, key_path)
        except ssl.SSLError:
            raise
        except OSError:  # no memfd_create or no /proc: a private directory instead
            with _tempdir_paths(chain, key) as (chain_path, key_path):
                ctx.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as e:
        # ssl.SSLError is an OSError, hence the re-raise above. The message names the
        # OpenSSL reason only; it never contains the key.
        raise TLSConfigError(f"certificate or key for {cert.identity} unusable: {e}") from e


@contextlib.contextmanager
def _memfd_paths(chain: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    create = getattr(os, "memfd_create", None)  # Linux only
    if create is None:
        raise OSError(errno.ENOSYS, "memfd_create is unavailable")
    fds: list[int] = []
    try:
        for data in (chain, key):
            fd = create("ztunnel-tls", os.MFD_CLOEXEC)
            fds.append(fd)
            _write_all(fd, data)
        yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def _tempdir_paths(chain: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    # mkdtemp makes the directory 0700 under $TMPDIR (the chart's /tmp emptyDir).
    with tempfile.TemporaryDirectory(prefix="ztunnel-tls-") as directory:
        paths = (os.path.join(directory, "chain.pem"), os.path.join(directory, "key.pem"))
        for path, data in zip(paths, (chain, key), strict=True):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
        yield paths


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class ContextCache:
    """Bounded LRU of contexts per (side, identity, leaf certificate).

    The leaf PEM stands in for the serial: it changes on every rotation, and a str caches
    its hash, so a lookup with the same certificate object costs one dict probe.
    """

    def __init__(self, *, max_size: int = 256, tls12: bool = False) -> None:
        self.max_size = max_size
        self.tls12 = tls12
        self._contexts: OrderedDict[tuple[bool, str, str], ssl.SSLContext] = OrderedDict()

    def server(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(True, cert)

    def client(self, cert: WorkloadCertificate) -> ssl.SSLContext:
        return self._get(False, cert)

    def forget(self, identity: str) -> None:
        """Drop every context of `identity` (its certificate was removed)."""
        for key in [k for k in self._contexts if k[1] == identity]:
            del self._contexts[key]

    def __len__(self) -> int:
        return len(self._contexts)

    def _get(self, server_side: bool, cert: WorkloadCertificate) -> ssl.SSLContext:
        key = (server_side, cert.identity, cert.chain_pem[0] if cert.chain_pem else "")
        ctx = self._contexts.get(key)
        if ctx is not None:
            self._contexts.move_to_end(key)
            return ctx
        make = server_context if server_side else client_context
        ctx = make(cert, tls12=self.tls12)
        self._contexts[key] = ctx
        if len(self._contexts) > self.max_size:
            self._contexts.popitem(last=False)
        return ctx


# --- after the handshake -------------------------------------------------------------------


def peer_identities(session: SSLSession) -> list[Identity]:
    """The verified peer certificate's URI SANs that parse as SPIFFE ids, in order.

    The first is upstream's peer identity (`tls::identity`); for an accepted connection
    use what `verify_inbound` returns. SANs that do not parse (NUL, not SPIFFE, ...) are
    skipped, as upstream does.
    """
    identities = []
    for uri in _uri_sans(session):
        with contextlib.suppress(IdentityError):
            identities.append(Identity.parse(uri))
    return identities


def _uri_sans(session: SSLSession) -> list[str]:
    cert = session.getpeercert()  # the dict form: only ever filled for a verified peer
    names = cert.get("subjectAltName", ()) if cert else ()
    uris = []
    for entry in names:
        if isinstance(entry, tuple) and len(entry) == 2 and entry[0] == "URI":
            value = entry[1]
            if isinstance(value, str):
                uris.append(value)
    return uris


def verify_server_identity(session: SSLSession, expected: Collection[str]) -> Identity:
    """The server identity equal to one of `expected` (upstream `verify_full_san`).

    `expected` is the destination's `upstream_sans`: service SANs plus the workload
    identity. Any one match suffices.
    """
    identities = peer_identities(session)
    for identity in identities:
        if str(identity) in expected:
            return identity
    raise TLSIdentityError(
        f"server identities {[str(i) for i in identities]} match none of {sorted(expected)}"
    )


def verify_client_trust_domain(session: SSLSession, trust_domain: str) -> Identity:
    """The client's first identity in `trust_domain` (upstream TrustDomainVerifier).

    Upstream accepts a client with some SAN in our trust domain and then authorizes the
    first parseable SAN, whatever its trust domain. We return the first one in our trust
    domain instead, so that a multi-SAN certificate cannot pass this check with one
    identity and face policy with another; with one SAN, as every Istio CA issues, the
    two agree.
    """
    identities = peer_identities(session)
    for identity in identities:
        if identity.trust_domain == trust_domain:
            return identity
    raise TLSIdentityError(
        f"no client identity in trust domain {trust_domain}: {[str(i) for i in identities]}"
    )


def verified_chain(session: SSLSession) -> list[bytes] | None:
    """The peer's chain as OpenSSL verified it (DER, leaf first, trust anchor last).

    Python 3.11 has no public API for it (3.13 adds `get_verified_chain`); the `_ssl` object
    has had the method since 3.10. None if this Python does not offer it.
    """
    sslobj = getattr(session, "_sslobj", None)
    getter = getattr(sslobj, "get_verified_chain", None)
    if getter is None:
        return None
    return [c.public_bytes(_ssl.ENCODING_DER) for c in getter()]


def alpn_ok(session: SSLSession) -> bool:
    """`h2`, or no ALPN at all (HTTP/2 with prior knowledge, as rustls allows)."""
    return session.selected_alpn_protocol() in (None, ALPN_H2)


def check_session(session: SSLSession, *, tls12: bool = False) -> None:
    """Raise TLSPolicyError unless version, suite and ALPN are within our policy."""
    version = session.version()
    if version != "TLSv1.3" and not (tls12 and version == "TLSv1.2"):
        raise TLSPolicyError(f"negotiated {version}, want TLSv1.3")
    cipher = session.cipher()
    if version == "TLSv1.3" and (cipher is None or cipher[0] not in TLS13_CIPHERSUITES):
        raise TLSPolicyError(f"negotiated suite {cipher and cipher[0]} is not AES-GCM")
    if not alpn_ok(session):
        raise TLSPolicyError(f"negotiated ALPN {session.selected_alpn_protocol()!r}, want h2")


def verify_inbound(session: SSLSession, *, trust_domain: str, tls12: bool = False) -> Identity:
    """Every check for an accepted HBONE connection; returns the client identity."""
    check_session(session, tls12=tls12)
    return verify_client_trust_domain(session, trust_domain)


def verify_outbound(
    session: SSLSession, *, expected: Collection[str], tls12: bool = False
) -> Identity:
    """Every check for an HBONE connection we opened; returns the matched server identity."""
    check_session(session, tls12=tls12)
    return verify_server_identity(session, expected)
