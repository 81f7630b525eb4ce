"""The Istio CA client against an in-process TLS gRPC CA (controlplane.ca_server) and fakes.

Mirrors upstream `src/identity/caclient.rs` tests (`fetch_certificate`, `empty_chain`,
`wrong_identity`, root reload) and adds request-metadata, transport and CA-side checks.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # C-core logs every failed handshake

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.ca_server import CAService, register
from controlplane.tls import Root
from ztunnel.core import ipc
from ztunnel.core.config import Config
from ztunnel.core.csr import new_csr
from ztunnel.core.errors import ConfigError
from ztunnel.fakeca import FakeCA
from ztunnel.gen import citadel_pb2, citadel_pb2_grpc
from ztunnel.supervisor.caclient import (
    CAClient,
    CAError,
    CAResponseError,
    certificate_from_response,
    grpc_target,
)
from ztunnel.supervisor.certs import Backoff, CertificateUnavailable, CertManager

pytestmark = pytest.mark.timeout(20)

ID = "spiffe://cluster.local/ns/default/sa/app"
OTHER = "spiffe://cluster.local/ns/default/sa/wrong-sa"
NO_MESH = "/nonexistent/mesh"

Answer = Callable[[citadel_pb2.IstioCertificateRequest], list[str]]


class Canned(citadel_pb2_grpc.IstioCertificateServiceServicer):
    """A CA that answers whatever `answer` builds from the request."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer

    async def CreateCertificate(
        self,
        request: citadel_pb2.IstioCertificateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> citadel_pb2.IstioCertificateResponse:
        return citadel_pb2.IstioCertificateResponse(cert_chain=self.answer(request))


@dataclass
class Lab:
    """A CA directory, its root file, and the TLS CA servers a test started."""

    ca_dir: str
    root_file: str
    servers: list[grpc.aio.Server] = field(default_factory=list)

    async def serve(
        self,
        servicer: Canned | None = None,
        *,
        port: int = 0,
        dns_names: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
        **ca_options: Any,
    ) -> tuple[int, CAService | None]:
        server = grpc.aio.server()
        service: CAService | None = None
        if servicer is None:
            service = register(server, ca_dir=self.ca_dir, **ca_options)
        else:
            citadel_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)
        serving = Root.open(self.ca_dir).issue_serving(dns_names=dns_names, ips=ips)
        creds = grpc.ssl_server_credentials([(serving.key_pem, serving.cert_pem)])
        bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
        await server.start()
        self.servers.append(server)
        return bound, service

    @property
    def root_pem(self) -> bytes:
        with open(self.root_file, "rb") as f:
            return f.read()

    def config(self, port: int, **env: str) -> Config:
        values = {
            "CA_ADDRESS": f"https://127.0.0.1:{port}",
            "CA_ROOT_CA": self.root_file,
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": "default/app/app",
            "SECRET_TTL": "1h",
        }
        values.update(env)
        return Config.from_env(values, cpu_count=1, mesh_config_path=NO_MESH)


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    ca_dir = str(tmp_path / "ca")
    FakeCA.open(ca_dir)
    lab = Lab(ca_dir=ca_dir, root_file=os.path.join(ca_dir, "root-cert.pem"))
    yield lab
    for server in lab.servers:
        await server.stop(None)


async def _fetch(config: Config, identity: str = ID) -> Any:
    client = CAClient(config)
    try:
        return await client.fetch(identity)
    finally:
        await client.close()


def _leaf(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode())


def _write(path: str, data: bytes) -> None:
    """Replace `path` the way a ConfigMap update does: a new file renamed over the old."""
    tmp = f"{path}.new"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


# --- success and request contents -----------------------------------------------------------


async def test_fetch_returns_leaf_key_root_and_validity(lab: Lab) -> None:
    port, service = await lab.serve()
    assert service is not None
    cert = await _fetch(lab.config(port))
    assert cert.identity == ID
    assert len(cert.chain_pem) == 1
    assert cert.roots_pem == (lab.root_pem.decode(),)
    leaf = _leaf(cert.chain_pem[0])
    key = serialization.load_pem_private_key(cert.key_pem.encode(), password=None)
    assert leaf.public_key() == key.public_key()
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert cert.not_before == leaf.not_valid_before_utc.timestamp()
    assert cert.not_after - cert.not_before == 3600 + 60  # SECRET_TTL, backdated 60 s
    assert service.issued == 1
    assert service.calls[-1].validity_duration == 3600


async def test_token_clusterid_and_ca_headers_reach_the_ca(lab: Lab, tmp_path: Path) -> None:
    port, service = await lab.serve(require_token="s3cret")
    assert service is not None
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    config = lab.config(port, AUTH_TOKEN=str(token), CLUSTER_ID="east", CA_HEADER_TENANT="blue")
    client = CAClient(config)
    try:
        await client.fetch(ID)
        meta = dict(service.calls[-1].metadata)
        assert meta["authorization"] == "<redacted>"  # present and accepted
        assert meta["clusterid"] == "east"
        assert meta["tenant"] == "blue"
        token.write_text("rotated-but-wrong")  # the file is re-read on every call
        with pytest.raises(CAError, match="UNAUTHENTICATED"):
            await client.fetch(ID)
    finally:
        await client.close()


async def test_static_token_is_sent(lab: Lab) -> None:
    port, service = await lab.serve(require_token="literal")
    await _fetch(lab.config(port, AUTH_TOKEN="literal"))
    assert service is not None and service.issued == 1


async def test_no_token_no_authorization_or_clusterid(lab: Lab) -> None:
    port, service = await lab.serve()
    await _fetch(lab.config(port, CLUSTER_ID="east"))
    assert service is not None
    names = {k for k, _ in service.calls[-1].metadata}
    assert "authorization" not in names and "clusterid" not in names


async def test_ca_requiring_a_token_rejects_a_call_without_one(lab: Lab) -> None:
    port, service = await lab.serve(require_token="s3cret")
    with pytest.raises(CAError, match=r"signing gRPC error \(UNAUTHENTICATED\)"):
        await _fetch(lab.config(port))
    assert service is not None and service.failures == 1


async def test_empty_token_file_is_an_error(lab: Lab, tmp_path: Path) -> None:
    port, _ = await lab.serve()
    token = tmp_path / "token"
    token.write_text("")
    with pytest.raises(CAError, match="exists, but was empty"):
        await _fetch(lab.config(port, AUTH_TOKEN=str(token)))


@pytest.mark.parametrize(("mode", "expected"), [("shared", ID), ("dedicated", None)])
async def test_impersonated_identity_only_in_shared_mode(
    lab: Lab, mode: str, expected: str | None
) -> None:
    port, service = await lab.serve()
    await _fetch(lab.config(port, PROXY_MODE=mode))
    assert service is not None
    assert service.calls[-1].impersonated == expected


# --- response handling ----------------------------------------------------------------------


def _signer(lab: Lab) -> CAService:
    return CAService(Root.open(lab.ca_dir))


@pytest.mark.parametrize("mode", ["shared", "dedicated"])
async def test_certificate_for_another_identity_is_rejected(lab: Lab, mode: str) -> None:
    # Upstream checks the SAN in shared mode only (`wrong_identity`); we check it always.
    signer = _signer(lab)

    def other_identity(request: citadel_pb2.IstioCertificateRequest) -> list[str]:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        return signer.sign(csr.public_key(), OTHER, 3600)  # our key, another name

    port, _ = await lab.serve(Canned(other_identity))
    with pytest.raises(CAResponseError, match=f"did not find expected SAN: {ID}"):
        await _fetch(lab.config(port, PROXY_MODE=mode))


async def test_empty_chain_is_rejected(lab: Lab) -> None:
    port, _ = await lab.serve(Canned(lambda _: []))
    with pytest.raises(CAResponseError, match="chain returned from CA is empty"):
        await _fetch(lab.config(port))


async def test_leaf_without_root_is_rejected(lab: Lab) -> None:
    signer = _signer(lab)

    def leaf_only(request: citadel_pb2.IstioCertificateRequest) -> list[str]:
        csr = x509.load_pem_x509_csr(request.csr.encode())
        return signer.sign(csr.public_key(), ID, 3600)[:1]

    port, _ = await lab.serve(Canned(leaf_only))
    with pytest.raises(CAResponseError, match="no root certificate present"):
        await _fetch(lab.config(port))


async def test_certificate_for_another_key_is_rejected(lab: Lab) -> None:
    fake = FakeCA.open(lab.ca_dir)

    def other_key(_: citadel_pb2.IstioCertificateRequest) -> list[str]:
        cert = fake.issue(ID, ttl=3600, now=time.time())  # right name, a key we do not hold
        return [*cert.chain_pem, *cert.roots_pem]

    port, _ = await lab.serve(Canned(other_key))
    with pytest.raises(CAResponseError, match="does not carry our CSR's key"):
        await _fetch(lab.config(port))


def test_last_element_may_hold_several_roots_and_the_middle_intermediates(
    tmp_path: Path,
) -> None:
    root, other = Root.open(str(tmp_path / "ca")), FakeCA.ephemeral()
    csr_pem, key_pem = new_csr(ID)
    public = x509.load_pem_x509_csr(csr_pem.encode()).public_key()
    leaf_pem, root_pem = CAService(root).sign(public, ID, 600)
    chain = [leaf_pem, other.root_pem, root_pem + other.root_pem]
    cert = certificate_from_response(ID, key_pem, chain)
    assert cert.chain_pem == (leaf_pem, other.root_pem)
    assert cert.roots_pem == (root_pem, other.root_pem)


def test_garbage_in_the_chain_is_a_response_error() -> None:
    _, key_pem = new_csr(ID)
    with pytest.raises(CAResponseError, match="leaf certificate parse"):
        certificate_from_response(ID, key_pem, ["not a pem", FakeCA.ephemeral().root_pem])


# --- transport -----------------------------------------------------------------------------


async def test_root_file_change_rebuilds_the_channel(lab: Lab) -> None:
    port, _ = await lab.serve()
    client = CAClient(lab.config(port))
    original = lab.root_pem
    foreign = FakeCA.ephemeral().root_pem.encode()
    try:
        await client.fetch(ID)
        await client.fetch(ID)
        assert client.generation == 1  # unchanged file: same channel
        _write(lab.root_file, original + foreign)  # root rotation: A -> A+B
        await client.fetch(ID)
        assert client.generation == 2
        _write(lab.root_file, foreign)  # only B: our server is no longer trusted
        with pytest.raises(CAError, match="UNAVAILABLE"):
            await client.fetch(ID)
        assert client.generation == 3
    finally:
        await client.close()


async def test_unreadable_root_change_keeps_the_old_channel(lab: Lab) -> None:
    port, _ = await lab.serve()
    client = CAClient(lab.config(port))
    try:
        await client.fetch(ID)
        _write(lab.root_file, b"half-written")
        await client.fetch(ID)  # warns, keeps the working channel
        assert client.generation == 1
    finally:
        await client.close()


async def test_alt_ca_hostname_is_the_name_verified(lab: Lab) -> None:
    port, _ = await lab.serve(dns_names=("istiod.istio-system.svc",), ips=())
    with pytest.raises(CAError, match="UNAVAILABLE"):
        await _fetch(lab.config(port))  # 127.0.0.1 is not in the server certificate
    cert = await _fetch(lab.config(port, ALT_CA_HOSTNAME="istiod.istio-system.svc"))
    assert cert.identity == ID


async def test_system_roots_do_not_trust_the_development_ca(lab: Lab) -> None:
    port, _ = await lab.serve()
    with pytest.raises(CAError, match="UNAVAILABLE"):
        await _fetch(lab.config(port, CA_ROOT_CA="SYSTEM"))


async def test_static_pem_root(lab: Lab) -> None:
    port, _ = await lab.serve()
    cert = await _fetch(lab.config(port, CA_ROOT_CA=lab.root_pem.decode()))
    assert cert.identity == ID


async def test_root_value_that_is_neither_file_nor_pem_fails_each_fetch(lab: Lab) -> None:
    port, _ = await lab.serve()
    with pytest.raises(CAError, match="neither a file, SYSTEM nor PEM"):
        await _fetch(lab.config(port, CA_ROOT_CA="/no/such/root.pem"))


async def test_ca_restart_is_reached_without_waiting_for_grpc_backoff(lab: Lab) -> None:
    port, _ = await lab.serve()
    client = CAClient(lab.config(port))
    try:
        await client.fetch(ID)
        await lab.servers.pop().stop(None)
        for _ in range(3):
            with pytest.raises(CAError, match="UNAVAILABLE"):
                await client.fetch(ID)
        await lab.serve(port=port)
        started = time.monotonic()
        await client.fetch(ID)
        assert time.monotonic() - started < 2.0
    finally:
        await client.close()


def test_config_errors() -> None:
    base = {"FAKE_CA": "true", "PROXY_MODE": "shared"}
    fake = Config.from_env(base, cpu_count=1, mesh_config_path=NO_MESH)
    with pytest.raises(ConfigError, match="CA_ADDRESS must be set"):
        CAClient(fake)
    plain = Config.from_env(
        {"CA_ADDRESS": "http://istiod:15010"}, cpu_count=1, mesh_config_path=NO_MESH
    )
    with pytest.raises(ConfigError, match="only https"):
        CAClient(plain)


async def test_unreadable_root_file_is_a_start_error(lab: Lab, tmp_path: Path) -> None:
    root = tmp_path / "root.pem"
    root.write_text("not a certificate")
    config = lab.config(1, CA_ROOT_CA=str(root))
    assert config.ca_root_ca.kind == "file"
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        CAClient(config)
    root.unlink()
    with pytest.raises(ConfigError, match="No such file"):
        CAClient(config)


@pytest.mark.parametrize(
    ("address", "target"),
    [
        ("https://istiod.istio-system.svc:15012", "istiod.istio-system.svc:15012"),
        ("https://istiod", "istiod:443"),
        ("HTTPS://Localhost:15012/", "localhost:15012"),
        ("https://[::1]:15012", "[::1]:15012"),
        ("https://10.0.0.1", "10.0.0.1:443"),
    ],
)
def test_grpc_target(address: str, target: str) -> None:
    assert grpc_target(address) == target


# --- the CA server's own checks -----------------------------------------------------------------


async def _raw_call(
    port: int, root: bytes, request: citadel_pb2.IstioCertificateRequest
) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        stub = citadel_pb2_grpc.IstioCertificateServiceStub(channel)
        try:
            await stub.CreateCertificate(request, timeout=5)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_ca_refuses_mismatched_impersonation_foreign_domain_and_bad_csr(lab: Lab) -> None:
    port, service = await lab.serve()
    root = lab.root_pem
    csr, _ = new_csr(ID)
    mismatched = citadel_pb2.IstioCertificateRequest(csr=csr)
    mismatched.metadata.update({"ImpersonatedIdentity": OTHER})
    foreign = citadel_pb2.IstioCertificateRequest(csr=new_csr("spiffe://evil.io/ns/a/sa/b")[0])
    garbage = citadel_pb2.IstioCertificateRequest(csr="-----BEGIN CERTIFICATE REQUEST-----")
    two_sans = citadel_pb2.IstioCertificateRequest(csr=_csr_with_sans([ID, OTHER]))
    no_san = citadel_pb2.IstioCertificateRequest(csr=_csr_with_sans([]))
    assert await _raw_call(port, root, mismatched) == grpc.StatusCode.PERMISSION_DENIED
    assert await _raw_call(port, root, foreign) == grpc.StatusCode.PERMISSION_DENIED
    assert await _raw_call(port, root, garbage) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _raw_call(port, root, two_sans) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _raw_call(port, root, no_san) == grpc.StatusCode.INVALID_ARGUMENT
    matching = citadel_pb2.IstioCertificateRequest(csr=csr)
    matching.metadata.update({"ImpersonatedIdentity": ID})
    assert await _raw_call(port, root, matching) == grpc.StatusCode.OK
    assert service is not None and (service.issued, service.failures) == (1, 5)


def _csr_with_sans(uris: list[str]) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        names = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def test_ca_signs_only_identities_it_knows(lab: Lab) -> None:
    port, _ = await lab.serve(known_identities=lambda: {ID})
    assert (await _fetch(lab.config(port))).identity == ID
    with pytest.raises(CAError, match="PERMISSION_DENIED"):
        await _fetch(lab.config(port), OTHER)


async def test_ca_validity_is_capped_at_24h(lab: Lab) -> None:
    port, _ = await lab.serve()
    cert = await _fetch(lab.config(port, SECRET_TTL="72h"))
    assert cert.not_after - cert.not_before == 24 * 3600 + 60


async def test_ca_fault_hooks(lab: Lab) -> None:
    port, service = await lab.serve()
    assert service is not None
    client = CAClient(lab.config(port))
    try:
        service.fail_next = 2
        for _ in range(2):
            with pytest.raises(CAError, match="injected failure"):
                await client.fetch(ID)
        await client.fetch(ID)
        service.available = False
        with pytest.raises(CAError, match="outage"):
            await client.fetch(ID)
        service.available = True
        await client.fetch(ID)
    finally:
        await client.close()
    assert (service.issued, service.failures) == (2, 3)


async def test_cert_manager_over_the_ca_client_retries_through_failures(lab: Lab) -> None:
    port, service = await lab.serve()
    assert service is not None
    service.fail_next = 2
    published: list[ipc.CertificatesChanged] = []
    client = CAClient(lab.config(port))
    manager = CertManager(
        client, published.append, backoff=Backoff(initial=0.02, jitter=0.0, cap=0.05)
    )
    try:
        manager.want({ID})
        cert = await _eventually(lambda: manager.get(ID))
    finally:
        manager.stop()
        await client.close()
    assert cert.identity == ID
    assert (service.issued, service.failures) == (1, 2)
    assert [m.updated for m in published] == [(cert,)]


async def _eventually(call: Callable[[], Awaitable[ipc.WorkloadCertificate]]) -> Any:
    deadline = time.monotonic() + 5
    while True:
        try:
            return await call()
        except CertificateUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)


# --- measurement ---------------------------------------------------------------------------


async def _median(n: int, call: Callable[[], Awaitable[object]]) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def test_csr_round_trip_time(lab: Lab) -> None:
    """Not an assertion on speed: prints CSR generation + CreateCertificate over TLS."""
    port, _ = await lab.serve()
    client = CAClient(lab.config(port))
    try:
        await client.fetch(ID)  # connect and handshake once
        median = await _median(20, lambda: client.fetch(ID))
    finally:
        await client.close()
    print(f"\nCSR round trip (loopback TLS, median of 20): {median * 1000:.2f} ms")
