"""Istio CA client: one CreateCertificate call per certificate (`src/identity/caclient.rs`).

The request is upstream's: a fresh CSR (`ztunnel.core.csr`), `validity_duration` =
SECRET_TTL in seconds, and in shared mode the metadata `{"ImpersonatedIdentity": <id>}`,
which asks istiod for a certificate of a pod on this node rather than ztunnel's own. The
gRPC metadata carries `authorization: Bearer <token>` and `clusterid` when a token is
configured (`src/identity/auth.rs`; a token file is re-read on every call, so a rotated
projected token is picked up) and every CA_HEADER_<K> pair.

The response is read as upstream reads it (`tls::WorkloadCertificate::new`): element 0 is
the leaf, the last element holds the root(s), possibly several concatenated PEM blocks, and
anything between is the intermediate chain. An empty chain, or a leaf without a root
element, is an error. The leaf's first URI SAN must equal the identity we asked for.
Upstream checks that only in shared mode; we check it in every mode, and also that the leaf
carries the public key of our CSR: a confused or compromised CA must never make us present
another workload's identity, or a certificate we hold no key for (hardening §1.2, upstream
#167 and #1114).

Transport: a TLS gRPC channel to CA_ADDRESS (scheme stripped, port 443 when absent) trusting
CA_ROOT_CA: a file, re-read when it changes (checked by stat on every fetch, where upstream
watches the directory; either way the channel is rebuilt before the next call), SYSTEM
(gRPC's default roots) or inline PEM. ALT_CA_HOSTNAME becomes
`grpc.ssl_target_name_override`: the name verified (and sent as SNI) instead of the host,
where upstream accepts either name. HTTP/2 keepalive is upstream's (ping every 30 s, 10 s
timeout, `src/tls/control.rs::grpc_connector`); gRPC does not expose its TCP keepalive or
the 5 s connect timeout, so every call has a deadline instead. After a transport failure
the channel is closed and a new one built on the next fetch, so a recovered CA is reached
at once rather than after gRPC's own reconnect backoff (up to 120 s).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2

from ztunnel.core.config import AuthSource, Config, RootCert
from ztunnel.core.csr import new_csr
from ztunnel.core.errors import ConfigError, ZtunnelError
from ztunnel.core.ipc import WorkloadCertificate
from ztunnel.gen import citadel_pb2, citadel_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_PORT = 443  # an https:// CA_ADDRESS without a port, as hyper resolves it
CALL_TIMEOUT = 30.0  # seconds per CreateCertificate; upstream bounds only the connect (5 s)
KEEPALIVE_TIME_MS = 30_000  # HTTP/2 ping interval, upstream `http2_keep_alive_interval`
KEEPALIVE_TIMEOUT_MS = 10_000  # upstream `http2_keep_alive_timeout`
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"  # request metadata key read by istiod

# Statuses the CA itself answered with: the connection is fine, keep the channel.
_ANSWERED = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)


class CAError(ZtunnelError):
    """A certificate could not be obtained from the CA (transport, auth or status)."""

    reason = "ca"


class CAResponseError(CAError):
    """The CA answered with a chain we refuse: empty, rootless, unparsable or not ours."""

    reason = "ca_response"


# --- pure parts ----------------------------------------------------------------------------


def grpc_target(address: str) -> str:
    """`https://host[:port][/...]` as a gRPC target `host:port`; only https is supported."""
    parts = urlsplit(address)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ConfigError(f"CA_ADDRESS={address}: only https://host[:port] addresses are supported")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{parts.port or DEFAULT_PORT}"


def certificate_from_response(
    identity: str, key_pem: str, cert_chain: Sequence[str]
) -> WorkloadCertificate:
    """Check a CreateCertificate answer for `identity` and turn it into a WorkloadCertificate."""
    if not cert_chain:
        raise CAResponseError(f"chain returned from CA is empty for: {identity}")
    if len(cert_chain) < 2:
        # Upstream quirk kept: the CA must return the root as a separate, last element.
        raise CAResponseError("invalid root certificate: no root certificate present")
    leaf = _first_cert(cert_chain[0], "leaf")
    intermediates = [_first_cert(pem, "intermediate") for pem in cert_chain[1:-1]]
    roots = _all_certs(cert_chain[-1])
    if _first_uri_san(leaf) != identity:
        raise CAResponseError(f"did not find expected SAN: {identity}")
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    if leaf.public_key() != key.public_key():
        raise CAResponseError(f"certificate from CA for {identity} does not carry our CSR's key")
    return WorkloadCertificate(
        identity=identity,
        chain_pem=tuple(_pem(c) for c in (leaf, *intermediates)),
        key_pem=key_pem,
        roots_pem=tuple(_pem(c) for c in roots),
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def _all_certs(text: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(text.encode())
    except ValueError as e:
        raise CAResponseError(f"certificate parse: {e}") from e
    if not certs:  # pragma: no cover - cryptography raises instead of returning []
        raise CAResponseError("certificate parse: no certificate")
    return certs


def _first_cert(text: str, what: str) -> x509.Certificate:
    """The first PEM certificate of one chain element, as upstream's `parse_cert` reads it."""
    try:
        return _all_certs(text)[0]
    except CAResponseError as e:
        raise CAResponseError(f"{what} {e}") from e


def _first_uri_san(cert: x509.Certificate) -> str | None:
    """The first URI SAN: the identity upstream reads from a certificate (`tls::identity`)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise CAResponseError(f"leaf certificate extensions: {e}") from e
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _bearer(auth: AuthSource) -> str | None:
    """The bearer token, re-read from its file on every call (projected tokens rotate)."""
    if auth.kind == "none":
        return None
    if auth.kind == "static":
        return auth.value
    try:
        with open(auth.value, "rb") as f:
            token = f.read().strip()
    except OSError as e:
        raise CAError(f"failed to read token file {auth.value}: {e.strerror}") from e
    if not token:
        raise CAError(f"token file {auth.value} exists, but was empty")
    return token.decode("ascii", errors="replace")


# --- trust roots ---------------------------------------------------------------------------


class _Roots:
    """CA_ROOT_CA as bytes for gRPC, remembering which version of a root file was loaded."""

    def __init__(self, root: RootCert) -> None:
        self._root = root
        self._stamp: tuple[int, int, int] | None = None

    def changed(self) -> bool:
        """A root file differs from the one last loaded (or can no longer be read)."""
        if self._root.kind != "file":
            return False
        try:
            return _stamp(self._root.value) != self._stamp
        except OSError:
            return True

    def load(self) -> bytes | None:
        """The PEM roots to trust; None means gRPC's default (system) roots."""
        root = self._root
        if root.kind == "system":
            return None
        if root.kind == "static":
            return _check_roots(root.value.encode(), "value is neither a file, SYSTEM nor PEM")
        try:
            stamp = _stamp(root.value)  # before reading: a later change is seen next time
            with open(root.value, "rb") as f:
                data = f.read()
        except OSError as e:
            raise CAError(f"CA_ROOT_CA {root.value}: {e.strerror}") from e
        data = _check_roots(data, f"{root.value} holds no PEM certificate")
        self._stamp = stamp
        return data


def _stamp(path: str) -> tuple[int, int, int]:
    st = os.stat(path)  # follows symlinks: a Kubernetes ConfigMap swaps its ..data link
    return st.st_ino, st.st_mtime_ns, st.st_size


def _check_roots(data: bytes, why: str) -> bytes:
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAError(f"CA_ROOT_CA {why}") from e
    return data


# --- the client ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Conn:
    """One channel; retired channels close once their last call has finished."""

    channel: grpc.aio.Channel
    stub: citadel_pb2_grpc.IstioCertificateServiceAsyncStub
    inflight: int = 0
    retired: bool = False


class CAClient:
    """CreateCertificate against CA_ADDRESS; implements `certs.CertificateSource`."""

    def __init__(self, config: Config) -> None:
        if config.ca_address is None:
            raise ConfigError("CA_ADDRESS must be set to use a CA (or set FAKE_CA=true)")
        self._target = grpc_target(config.ca_address)
        self._alt_hostname = config.alt_ca_hostname
        self._auth = config.auth_token
        self._cluster_id = config.cluster_id
        self._headers = config.ca_headers
        self._impersonate = config.proxy_mode == "shared"
        self._validity = int(config.secret_ttl)
        self._roots = _Roots(config.ca_root_ca)
        if config.ca_root_ca.kind == "file":
            try:
                self._roots.load()  # an unreadable root file is a start-up error, as upstream
            except CAError as e:
                raise ConfigError(str(e)) from e
        self._conn: _Conn | None = None
        self._generation = 0

    @property
    def generation(self) -> int:
        """How many channels have been built: 1 after the first fetch, +1 per rebuild."""
        return self._generation

    async def fetch(self, identity: str) -> WorkloadCertificate:
        """A new certificate for `identity`; raises CAError (or IdentityError)."""
        csr_pem, key_pem = new_csr(identity)
        request = citadel_pb2.IstioCertificateRequest(
            csr=csr_pem, validity_duration=self._validity, metadata=self._request_metadata(identity)
        )
        metadata = self._call_metadata()
        conn = await self._connection()
        conn.inflight += 1
        try:
            response = await conn.stub.CreateCertificate(
                request, metadata=metadata, timeout=CALL_TIMEOUT
            )
        except grpc.aio.AioRpcError as e:
            if e.code() not in _ANSWERED:
                self._retire(conn)
            raise CAError(f"signing gRPC error ({e.code().name}): {e.details()}") from e
        finally:
            conn.inflight -= 1
            if conn.retired and conn.inflight == 0:
                await conn.channel.close(None)
        return certificate_from_response(identity, key_pem, response.cert_chain)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.retired = True
            await conn.channel.close(None)

    # -- request --------------------------------------------------------------------------------

    def _request_metadata(self, identity: str) -> struct_pb2.Struct | None:
        if not self._impersonate:
            return None
        meta = struct_pb2.Struct()
        meta.update({IMPERSONATED_IDENTITY: identity})
        return meta

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        headers = dict(self._headers)
        token = _bearer(self._auth)
        if token is not None:  # auth wins over a CA_HEADER_ of the same name, as upstream
            headers["authorization"] = f"Bearer {token}"
            headers["clusterid"] = self._cluster_id
        return tuple(headers.items())

    # -- channel --------------------------------------------------------------------------------

    async def _connection(self) -> _Conn:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._connect()
            return conn
        if self._roots.changed():
            try:
                fresh = self._connect()
            except CAError as e:
                # Upstream: warn, keep the old channel, try again on the next fetch.
                log.warning("CA root changed but could not be loaded (%s); keeping channel", e)
                return conn
            log.info("CA root certificate changed; rebuilt the CA channel")
            self._retire(conn)
            self._conn = fresh
            if conn.inflight == 0:
                await conn.channel.close(None)
            return fresh
        return conn

    def _connect(self) -> _Conn:
        credentials = grpc.ssl_channel_credentials(root_certificates=self._roots.load())
        options: list[tuple[str, str | int]] = [
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            # A rebuilt channel must not share a subchannel (and its backoff) with the old one.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if self._alt_hostname:
            options.append(("grpc.ssl_target_name_override", self._alt_hostname))
        channel = grpc.aio.secure_channel(self._target, credentials, options=options)
        self._generation += 1
        stub = citadel_pb2_grpc.IstioCertificateServiceStub(channel)
        return _Conn(channel=channel, stub=stub)

    def _retire(self, conn: _Conn) -> None:
        """Stop using `conn`; the call that leaves it idle closes it."""
        conn.retired = True
        if self._conn is conn:
            self._conn = None
