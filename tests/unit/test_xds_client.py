"""The delta xDS client against an in-test ADS server over real TLS, and the control plane's
xDS side it is meant to talk to (model -> proto round trip, versions, pushes, NACKs)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # C-core chatter on every GOAWAY

import grpc
import msgspec
import pytest
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from controlplane import server as cp_server
from controlplane.resources import (
    ADDRESS_TYPE,
    AUTHORIZATION_TYPE,
    resource,
    resources_of,
    service_to_proto,
    workload_to_proto,
)
from controlplane.tls import Root, ServingCertificate
from controlplane.xds_server import Catalog, Subscription, XDSServer
from ztunnel.core.config import Config
from ztunnel.core.convert import decode_address, decode_authorization
from ztunnel.core.localconfig import load_local_config
from ztunnel.core.model import (
    Authorization,
    Match,
    NetworkAddress,
    Service,
    StateDelta,
    StateSnapshot,
    Workload,
)
from ztunnel.core.state import ProxyState
from ztunnel.gen import workload_pb2, xds_pb2, xds_pb2_grpc
from ztunnel.supervisor.xds import Backoff, XDSClient, classify

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "localhost.yaml"
WAIT = 3.0  # seconds any single expected event may take

Request = xds_pb2.DeltaDiscoveryRequest
Response = xds_pb2.DeltaDiscoveryResponse

pytestmark = pytest.mark.timeout(30)


# ---------------------------------------------------------------------------------------------
# Builders


def _workload(uid: str, ip: str, **kw: Any) -> Workload:
    return Workload(
        uid=uid,
        name=uid.rsplit("/", 1)[-1],
        namespace="default",
        workload_ips=(ip,),
        trust_domain="cluster.local",
        service_account="default",
        cluster_id="Kubernetes",
        workload_type="deployment",
        **kw,
    )


def _service(host: str, vip: str) -> Service:
    return Service(
        name=host.split(".", maxsplit=1)[0],
        namespace="default",
        hostname=host,
        vips=(NetworkAddress(address=vip),),
        ports={80: 8080},
    )


def _policy(name: str, port: int) -> Authorization:
    return Authorization(
        name=name,
        namespace="default",
        scope="Namespace",
        action="Deny",
        rules=(((Match(destination_ports=(port,)),),),),
    )


def _addr(obj: Workload | Service, aliases: tuple[str, ...] = ()) -> xds_pb2.Resource:
    if isinstance(obj, Workload):
        return resource(obj.uid, workload_pb2.Address(workload=workload_to_proto(obj)), aliases)
    return resource(obj.key(), workload_pb2.Address(service=service_to_proto(obj)), aliases)


def _auth(p: Authorization) -> xds_pb2.Resource:
    return resources_of(StateSnapshot(policies=(p,)))[AUTHORIZATION_TYPE][p.key()]


def _garbage(name: str, type_url: str = ADDRESS_TYPE) -> xds_pb2.Resource:
    res = xds_pb2.Resource(name=name, version="v-bad")
    res.resource.type_url = type_url
    res.resource.value = b"\xff\xff\xff"
    return res


def _response(
    type_url: str,
    nonce: str,
    resources: list[xds_pb2.Resource] | None = None,
    removed: list[str] | None = None,
) -> Response:
    return Response(
        type_url=type_url, nonce=nonce, resources=resources or [], removed_resources=removed or []
    )


# ---------------------------------------------------------------------------------------------
# The fake ADS server: every stream is scripted by the test


class FakeStream:
    def __init__(self, metadata: Mapping[str, str]) -> None:
        self.metadata = dict(metadata)
        self.requests: asyncio.Queue[Request] = asyncio.Queue()
        self.outbox: asyncio.Queue[Response | tuple[grpc.StatusCode, str] | None] = asyncio.Queue()

    async def next_request(self, within: float = WAIT) -> Request:
        async with asyncio.timeout(within):
            return await self.requests.get()

    async def initial(self) -> tuple[Request, Request]:
        return await self.next_request(), await self.next_request()

    async def exchange(self, response: Response) -> Request:
        """Send a response and return the client's reply (its ACK or NACK)."""
        self.outbox.put_nowait(response)
        return await self.next_request()

    def end(self) -> None:
        self.outbox.put_nowait(None)

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.outbox.put_nowait((code, message))


class FakeADS(xds_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self) -> None:
        self.streams: asyncio.Queue[FakeStream] = asyncio.Queue()
        self.count = 0

    async def next_stream(self, within: float = WAIT) -> FakeStream:
        async with asyncio.timeout(within):
            return await self.streams.get()

    async def DeltaAggregatedResources(
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Request, Response],
    ) -> AsyncIterator[Response]:
        md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        stream = FakeStream(md)
        self.count += 1
        self.streams.put_nowait(stream)
        await context.send_initial_metadata(())

        async def pump() -> None:
            async for req in request_iterator:
                stream.requests.put_nowait(req)

        reader = asyncio.get_running_loop().create_task(pump())
        try:
            while (item := await stream.outbox.get()) is not None:
                if isinstance(item, tuple):
                    await context.abort(*item)
                yield item
        finally:
            reader.cancel()

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[xds_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[xds_pb2.DiscoveryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "")
        yield xds_pb2.DiscoveryResponse()


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> ServingCertificate:
    return Root.open(str(tmp_path_factory.mktemp("ca") / "ca")).issue_serving()


@pytest.fixture
def root_file(tmp_path: Path, serving: ServingCertificate) -> str:
    path = tmp_path / "root-cert.pem"
    path.write_bytes(serving.root_pem)
    return str(path)


@pytest.fixture
async def fake(serving: ServingCertificate) -> AsyncIterator[tuple[FakeADS, int]]:
    ads = FakeADS()
    server = grpc.aio.server()
    xds_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(ads, server)
    creds = grpc.ssl_server_credentials([(serving.key_pem, serving.cert_pem)])
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield ads, port
    finally:
        await server.stop(None)


class Harness:
    """An XDSClient over a ProxyState, recording what it delivers."""

    def __init__(self, config: Config, registry: CollectorRegistry | None = None) -> None:
        self.state = ProxyState.empty()
        self.deltas: list[StateDelta] = []
        self.synced = 0
        self.synced_event = asyncio.Event()
        self.client = XDSClient(
            config,
            state=lambda: self.state,
            on_update=self._apply,
            on_synced=self._on_synced,
            registry=registry,
        )
        self.task = asyncio.get_running_loop().create_task(self.client.run())

    def _apply(self, delta: StateDelta) -> None:
        self.deltas.append(delta)
        self.state = self.state.apply(delta)

    def _on_synced(self) -> None:
        self.synced += 1
        self.synced_event.set()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


StartClient = Callable[..., Harness]


@pytest.fixture
async def start_client(
    fake: tuple[FakeADS, int], root_file: str
) -> AsyncIterator[Callable[..., Harness]]:
    started: list[Harness] = []

    def start(
        env: Mapping[str, str] | None = None,
        registry: CollectorRegistry | None = None,
        port: int | None = None,
    ) -> Harness:
        full = {
            "XDS_ADDRESS": f"https://127.0.0.1:{port or fake[1]}",
            "XDS_ROOT_CA": root_file,
            "FAKE_CA": "true",
            **(env or {}),
        }
        config = Config.from_env(full, cpu_count=1, mesh_config_path="/nonexistent/mesh")
        h = Harness(config, registry)
        started.append(h)
        return h

    yield start
    for h in started:
        await h.stop()


async def _connected(fake: tuple[FakeADS, int], h: Harness) -> tuple[Harness, FakeStream]:
    """`h` once its first stream is up and has sent its initial subscriptions."""
    stream = await fake[0].next_stream()
    await stream.initial()
    return h, stream


async def _eventually(probe: Callable[[], bool], what: str, within: float = WAIT) -> None:
    """Poll `probe` (cheap, in-memory) until true; fail after `within` seconds."""
    try:
        async with asyncio.timeout(within):
            while True:
                if probe():
                    return
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out after {within}s waiting for {what}") from None


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# ---------------------------------------------------------------------------------------------
# Subscriptions, node, metadata


async def test_node_and_metadata_go_on_the_first_request_of_each_type_only(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    start_client(
        {
            "INSTANCE_IP": "10.0.0.9",
            "POD_NAME": "ztunnel-abc",
            "POD_NAMESPACE": "istio-system",
            "NODE_NAME": "node-1",
            "ISTIO_META_FOO": "bar",
            "ISTIO_METAJSON_LABELS": '{"app": "ztunnel", "n": 3}',
        }
    )
    stream = await ads.next_stream()
    addr, auth = await stream.initial()
    assert [addr.type_url, auth.type_url] == [ADDRESS_TYPE, AUTHORIZATION_TYPE]
    for req in (addr, auth):
        assert (
            req.node.id
            == "ztunnel~10.0.0.9~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        )
        assert json_format.MessageToDict(req.node.metadata) == {
            "NAME": "ztunnel-abc",
            "NAMESPACE": "istio-system",
            "INSTANCE_IPS": "10.0.0.9",
            "NODE_NAME": "node-1",
            "FOO": "bar",  # ISTIO_META_FOO
            "LABELS": {"app": "ztunnel", "n": 3.0},  # ISTIO_METAJSON_LABELS
        }
        # wildcard: nothing named either way
        assert list(req.resource_names_subscribe) == []
        assert list(req.resource_names_unsubscribe) == []
    ack = await stream.exchange(_response(ADDRESS_TYPE, "n1"))
    assert ack.response_nonce == "n1"
    assert not ack.HasField("node")
    assert not ack.HasField("error_detail")


async def test_node_id_defaults_instance_ip_to_1_1_1_1(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    start_client()
    addr, _ = await (await ads.next_stream()).initial()
    assert addr.node.id == "ztunnel~1.1.1.1~.~.svc.cluster.local"


async def test_token_file_is_reread_for_every_connection_with_clusterid_and_headers(
    fake: tuple[FakeADS, int], start_client: StartClient, tmp_path: Path
) -> None:
    ads, _ = fake
    token = tmp_path / "istio-token"
    token.write_text("first-token\n")
    start_client({"AUTH_TOKEN": str(token), "CLUSTER_ID": "c1", "XDS_HEADER_TENANT": "blue"})
    first = await ads.next_stream()
    assert first.metadata["authorization"] == "Bearer first-token"
    assert first.metadata["clusterid"] == "c1"
    assert first.metadata["tenant"] == "blue"
    token.write_text("second-token")
    first.abort(grpc.StatusCode.UNAVAILABLE, "transport is closing")
    second = await ads.next_stream()
    assert second.metadata["authorization"] == "Bearer second-token"
    assert second.metadata["tenant"] == "blue"


async def test_no_token_means_no_authorization_header(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    start_client({"XDS_HEADER_X-TEAM": "red"})
    stream = await ads.next_stream()
    assert "authorization" not in stream.metadata
    assert "clusterid" not in stream.metadata
    assert stream.metadata["x-team"] == "red"


# ---------------------------------------------------------------------------------------------
# Responses: apply, ACK, NACK


async def test_update_reaches_on_update_and_is_acked_by_nonce(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    h, stream = await _connected(fake, start_client())
    w = _workload("c//Pod/default/a", "10.0.0.1")
    s = _service("a.example", "10.10.0.1")
    ack = await stream.exchange(_response(ADDRESS_TYPE, "n1", [_addr(w), _addr(s)]))
    assert ack.type_url == ADDRESS_TYPE
    assert ack.response_nonce == "n1"
    assert not ack.HasField("error_detail")
    assert h.deltas == [StateDelta(workloads=(w,), services=(s,))]
    assert h.state.workload_by_uid(w.uid) == w
    ack = await stream.exchange(_response(AUTHORIZATION_TYPE, "n2", [_auth(_policy("p", 9))]))
    assert ack.response_nonce == "n2" and ack.type_url == AUTHORIZATION_TYPE
    assert h.state.policy_by_key("default/p") == _policy("p", 9)


async def test_nack_names_each_bad_resource_while_the_valid_ones_apply(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h, stream = await _connected(fake, start_client())
    good = [_addr(_workload(f"c//Pod/default/w{i}", f"10.0.0.{i}")) for i in range(1, 10)]
    empty = xds_pb2.Resource(name="no-payload", version="v1")
    bad_ip = workload_pb2.Address(
        workload=workload_pb2.Workload(uid="bad-ip", namespace="default", addresses=[b"\x01\x02"])
    )
    reply = await stream.exchange(
        _response(
            ADDRESS_TYPE,
            "n1",
            [*good[:4], _garbage("garbage"), *good[4:], empty, resource("bad-ip", bad_ip)],
        )
    )
    assert reply.response_nonce == "n1"
    assert reply.error_detail.code == 0
    parts = reply.error_detail.message.split("; ")
    assert [p.split(":")[0] for p in parts] == ["garbage", "no-payload", "bad-ip"]
    assert parts[1] == "no-payload: XDS payload without resource"
    assert parts[2] == "bad-ip: failed to parse address, had 2 bytes"
    assert len(h.deltas) == 1
    assert {w.uid for w in h.deltas[0].workloads} == {r.name for r in good}
    # Only accepted resources are echoed after a reconnect, so the bad ones get re-sent.
    stream.abort(grpc.StatusCode.UNAVAILABLE, "transport is closing")
    again = await ads.next_stream()
    addr, _ = await again.initial()
    assert dict(addr.initial_resource_versions) == {r.name: r.version for r in good}


async def test_unknown_type_url_is_acked(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    h, stream = await _connected(fake, start_client())
    reply = await stream.exchange(_response("type.googleapis.com/example.Unknown", "u1"))
    assert reply.response_nonce == "u1"
    assert not reply.HasField("error_detail")
    assert h.deltas == []


async def test_removals_map_to_workloads_or_services_and_unknown_names_are_ignored(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    h, stream = await _connected(fake, start_client())
    w = _workload("c//Pod/default/a", "10.0.0.1")
    s = _service("a.example", "10.10.0.1")
    await stream.exchange(_response(ADDRESS_TYPE, "n1", [_addr(w), _addr(s)]))
    await stream.exchange(_response(AUTHORIZATION_TYPE, "n2", [_auth(_policy("p", 9))]))
    ack = await stream.exchange(
        _response(
            ADDRESS_TYPE,
            "n3",
            removed=[w.uid, s.key(), "default/nothing.example", "no-such-uid", "ns/a/b"],
        )
    )
    assert not ack.HasField("error_detail")
    assert h.deltas[-1] == StateDelta(removed_workloads=(w.uid,), removed_services=(s.key(),))
    await stream.exchange(_response(AUTHORIZATION_TYPE, "n4", removed=["default/p", "x/y"]))
    assert h.deltas[-1] == StateDelta(removed_policies=("default/p",))
    assert h.state.num_workloads == h.state.num_services == h.state.num_policies == 0
    # A response that removes only unknown names changes nothing and reports nothing.
    count = len(h.deltas)
    await stream.exchange(_response(ADDRESS_TYPE, "n5", removed=["gone"]))
    assert len(h.deltas) == count


# ---------------------------------------------------------------------------------------------
# Readiness


async def test_synced_only_once_both_types_are_acked_and_never_on_a_nack(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h, stream = await _connected(fake, start_client())
    await stream.exchange(_response(ADDRESS_TYPE, "n1", [_addr(_workload("u", "10.0.0.1"))]))
    assert h.synced == 0
    nack = await stream.exchange(
        _response(AUTHORIZATION_TYPE, "n2", [_garbage("default/bad", AUTHORIZATION_TYPE)])
    )
    assert nack.error_detail.message.startswith("default/bad: decode")
    assert h.synced == 0
    await stream.exchange(_response(AUTHORIZATION_TYPE, "n3"))
    assert h.synced == 1
    assert h.client.dump()["synced"] is True
    # Reconnects do not gate readiness again.
    stream.abort(grpc.StatusCode.UNAVAILABLE, "transport is closing")
    again = await ads.next_stream()
    await again.initial()
    await again.exchange(_response(ADDRESS_TYPE, "m1"))
    await again.exchange(_response(AUTHORIZATION_TYPE, "m2"))
    assert h.synced == 1


async def test_state_is_untouched_while_disconnected_and_resync_sends_versions(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h, stream = await _connected(fake, start_client())
    resources = [_addr(_workload("u1", "10.0.0.1")), _addr(_service("s.example", "10.1.0.1"))]
    await stream.exchange(_response(ADDRESS_TYPE, "n1", resources))
    policy = _auth(_policy("p", 1))
    await stream.exchange(_response(AUTHORIZATION_TYPE, "n2", [policy]))
    before, deltas = h.state, len(h.deltas)
    stream.end()  # a clean end of stream: "Complete"
    again = await ads.next_stream()
    addr, auth = await again.initial()
    assert h.state is before and len(h.deltas) == deltas
    assert dict(addr.initial_resource_versions) == {r.name: r.version for r in resources}
    assert dict(auth.initial_resource_versions) == {policy.name: policy.version}
    assert addr.HasField("node") and auth.HasField("node")


# ---------------------------------------------------------------------------------------------
# Reconnects, backoff, metrics


def test_backoff_doubles_to_the_cap_and_resets_after_a_healthy_stream() -> None:
    b = Backoff(rng=lambda: 1.0)
    delays = [b.next(healthy=False) for _ in range(13)]
    assert delays[:4] == [0.02, 0.04, 0.08, 0.16]
    assert delays[-1] == 15.0 and max(delays) == 15.0
    assert b.next(healthy=True) == 0.01
    assert b.next(healthy=False) == 0.02


def test_backoff_jitter_stays_between_half_and_the_full_delay() -> None:
    low, high = Backoff(rng=lambda: 0.0), Backoff(rng=lambda: 0.999999)
    for _ in range(12):
        lo, hi = low.next(healthy=False), high.next(healthy=False)
        assert lo == pytest.approx(low.current / 2) and hi <= high.current
    assert high.current == 15.0


@pytest.mark.parametrize(
    ("code", "details", "established", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, "connection refused", False, "ConnectionError"),
        (grpc.StatusCode.UNAUTHENTICATED, "authentication failure", False, "ConnectionError"),
        (grpc.StatusCode.UNAVAILABLE, "transport is closing", True, "Reconnect"),
        (grpc.StatusCode.UNAVAILABLE, "received prior goaway: code: NO_ERROR", True, "Reconnect"),
        (grpc.StatusCode.CANCELLED, "", True, "Reconnect"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "", True, "Reconnect"),
        (grpc.StatusCode.UNKNOWN, "", True, "Reconnect"),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", True, "Error"),
        (grpc.StatusCode.PERMISSION_DENIED, "", True, "Error"),
    ],
)
def test_termination_reason_follows_the_upstream_table(
    code: grpc.StatusCode, details: str, established: bool, reason: str
) -> None:
    err = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, "")
    assert classify(err, established=established) == reason


async def test_metrics_count_messages_bytes_and_terminations(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    registry = CollectorRegistry()
    h = start_client(registry=registry)
    stream = await ads.next_stream()
    await stream.initial()
    resources = [_addr(_workload(f"u{i}", f"10.0.0.{i}")) for i in range(1, 4)]
    await stream.exchange(_response(ADDRESS_TYPE, "n1", resources))
    await stream.exchange(_response(ADDRESS_TYPE, "n2", removed=["u1"]))
    size = sum(len(r.resource.value) for r in resources)
    assert _sample(registry, "istio_xds_message_total", url=ADDRESS_TYPE) == 2
    assert _sample(registry, "istio_xds_message_bytes_total", url=ADDRESS_TYPE) == size
    stream.abort(grpc.StatusCode.UNAVAILABLE, "transport is closing")

    async def established_stream() -> FakeStream:
        # An error after the headers is an "Error", before them a "ConnectionError": wait until
        # the client has seen this stream's headers so that the reason is deterministic.
        s = await ads.next_stream()
        await s.initial()
        await _eventually(lambda: h.client.dump()["status"] == "connected", "established")
        return s

    (await established_stream()).abort(grpc.StatusCode.PERMISSION_DENIED, "nope")
    (await established_stream()).end()
    await ads.next_stream()

    def counted() -> bool:
        return all(
            _sample(registry, "istio_xds_connection_terminations_total", reason=r) == 1
            for r in ("Reconnect", "Error", "Complete")
        )

    await _eventually(counted, "termination metrics")
    for metric in registry.collect():
        if metric.name.startswith("istio_xds"):
            assert "(unstable)" in metric.documentation
    assert h.client.dump()["status"] in ("connecting", "connected")


async def test_refused_connections_back_off_and_count_as_connection_errors(
    start_client: StartClient,
) -> None:
    registry = CollectorRegistry()
    h = start_client(registry=registry, port=1)  # nothing listens on port 1
    await asyncio.sleep(0.6)
    attempts = _sample(
        registry, "istio_xds_connection_terminations_total", reason="ConnectionError"
    )
    # 10 ms doubling, jittered down by at most half: at most ~7 attempts fit in 0.6 s.
    assert 2 <= attempts <= 9
    dump = h.client.dump()
    assert dump["status"] in ("backoff", "connecting")
    assert "Connection refused" in str(dump["lastError"])
    assert float(str(dump["nextRetrySeconds"])) >= 0.04
    assert h.synced == 0


async def test_missing_root_cert_file_backs_off_instead_of_spinning(
    start_client: StartClient, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    # An XDS_ROOT_CA path that exists at start (so it is a file) and is gone afterwards.
    root = tmp_path / "root.pem"
    root.write_text("")
    h = start_client({"XDS_ROOT_CA": str(root)}, registry=registry)
    root.unlink()
    await asyncio.sleep(0.6)
    attempts = _sample(registry, "istio_xds_connection_terminations_total", reason="Error")
    assert 2 <= attempts <= 9
    assert "No such file" in str(h.client.dump()["lastError"])


async def test_healthy_stream_resets_the_backoff(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h = start_client()
    # Several streams that fail before any response: the delay keeps doubling.
    for _ in range(4):
        (await ads.next_stream()).abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    stream = await ads.next_stream()
    grown = h.client.backoff.current
    assert grown >= 0.16
    await stream.initial()
    await stream.exchange(_response(ADDRESS_TYPE, "n1"))
    stream.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
    await ads.next_stream()
    assert h.client.backoff.current == 0.01


async def test_alt_xds_hostname_is_the_name_verified(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    start_client({"ALT_XDS_HOSTNAME": "istiod.istio-system.svc"})
    await ads.next_stream()


async def test_a_name_the_certificate_lacks_is_refused(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    registry = CollectorRegistry()
    start_client({"ALT_XDS_HOSTNAME": "evil.example.com"}, registry=registry)

    def refused() -> bool:
        name = "istio_xds_connection_terminations_total"
        return _sample(registry, name, reason="ConnectionError") >= 2

    await _eventually(refused, "TLS refusals")
    assert ads.count == 0


# ---------------------------------------------------------------------------------------------
# On-demand


ON_DEMAND = {"XDS_ON_DEMAND": "true", "ISTIO_META_DNS_CAPTURE": "false"}


async def test_on_demand_subscribes_to_nothing_and_syncs_on_authorization_alone(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h = start_client(ON_DEMAND)
    stream = await ads.next_stream()
    addr, auth = await stream.initial()
    assert list(addr.resource_names_subscribe) == ["*"]
    assert list(addr.resource_names_unsubscribe) == ["*"]
    assert list(auth.resource_names_subscribe) == []
    await stream.exchange(_response(AUTHORIZATION_TYPE, "n1"))
    assert h.synced == 1


async def test_on_demand_request_resolves_on_a_response_naming_it(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    h, stream = await _connected(fake, start_client(ON_DEMAND))
    w = _workload("c//Pod/default/a", "10.0.0.7")
    by_ip = asyncio.ensure_future(h.client.request("/10.0.0.7"))
    sub = await stream.next_request()
    assert list(sub.resource_names_subscribe) == ["/10.0.0.7"]
    assert not sub.HasField("node")
    # istiod answers with the workload, named by uid, aliased by its address.
    await stream.exchange(_response(ADDRESS_TYPE, "n1", [_addr(w, ("/10.0.0.7",))]))
    assert await by_ip is True
    assert h.state.workload_by_uid(w.uid) == w
    # A removal naming it also answers (the name does not exist).
    missing = asyncio.ensure_future(h.client.request("default/none.example"))
    await stream.next_request()
    await stream.exchange(_response(ADDRESS_TYPE, "n2", removed=["default/none.example"]))
    assert await missing is True
    assert h.client.dump()["pendingOnDemand"] == []


async def test_on_demand_request_times_out_without_an_answer(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h, stream = await _connected(fake, start_client(ON_DEMAND))
    assert await h.client.request("/10.9.9.9", timeout=0.2) is False
    assert h.client.dump()["pendingOnDemand"] == []
    # Asked but unanswered names are echoed with an empty version on reconnect.
    stream.abort(grpc.StatusCode.UNAVAILABLE, "transport is closing")
    addr, _ = await (await ads.next_stream()).initial()
    assert dict(addr.initial_resource_versions) == {"/10.9.9.9": ""}


async def test_request_without_on_demand_mode_returns_false_at_once(
    fake: tuple[FakeADS, int], start_client: StartClient
) -> None:
    ads, _ = fake
    h = start_client()
    await ads.next_stream()
    assert await h.client.request("/10.0.0.1", timeout=1.0) is False


# ---------------------------------------------------------------------------------------------
# The control plane's xDS side: conversion, versions, pushes


def test_model_to_proto_round_trips_through_the_client_conversion() -> None:
    snap = load_local_config(str(EXAMPLE))
    by_type = resources_of(snap)
    for w in snap.workloads:
        got = decode_address(w.uid, by_type[ADDRESS_TYPE][w.uid].resource.value)
        assert got == msgspec.structs.replace(w, workload_type="deployment")
    for s in snap.services:
        assert decode_address(s.key(), by_type[ADDRESS_TYPE][s.key()].resource.value) == s
    for p in snap.policies:
        got_p = decode_authorization(p.key(), by_type[AUTHORIZATION_TYPE][p.key()].resource.value)
        assert got_p == p


RICH_YAML = """
workloads:
- uid: c//Pod/ns1/rich
  name: rich
  namespace: ns1
  workloadIps: ["10.1.0.1", "fd00::1"]
  protocol: HBONE
  networkMode: HostNetwork
  trustDomain: td.example
  serviceAccount: sa1
  network: net1
  workloadName: rich-deploy
  workloadType: pod
  canonicalName: rich
  canonicalRevision: v2
  hostname: rich.example
  node: node-1
  nativeTunnel: true
  status: Unhealthy
  clusterId: c9
  capacity: 5
  authorizationPolicies: ["ns1/p"]
  applicationTunnel: {protocol: PROXY, port: 15088}
  locality: {region: r, zone: z, subzone: s}
  waypoint: {destination: "net1/10.9.0.1", hboneMtlsPort: 15008}
  networkGateway: {destination: "ns1/gw.example", hboneMtlsPort: 15009}
  services:
    "ns1/svc.example": {80: 8080, 443: 8443}
services:
- name: svc
  namespace: ns1
  hostname: svc.example
  vips: ["net1/10.2.0.1", "/fd00::2"]
  cidrVips: [{network: net1, cidr: 10.3.0.0/16}]
  ports: {80: 8080}
  subjectAltNames: ["spiffe://td.example/ns/ns1/sa/sa1"]
  waypoint: {destination: {namespace: ns1, hostname: wp.example}, hboneMtlsPort: 15008}
  weightedWaypoints:
  - destination: {destination: "net1/10.9.0.2", hboneMtlsPort: 15008}
    weight: 3
  loadBalancer: {routingPreferences: [Region, Zone], mode: Failover, healthPolicy: AllowAll}
  ipFamilies: Dual
  canonical: true
  visibility: Namespace
policies:
- name: p
  namespace: ns1
  scope: WorkloadSelector
  action: Deny
  dryRun: true
  rules:
  - - - namespaces: [{Exact: a}, {Prefix: b}]
        notNamespaces: [{Suffix: c}]
        principals: [{Presence: []}]
        serviceAccounts: [{namespace: ns1, serviceAccount: sa1}]
        notServiceAccounts: [{namespace: ns2, serviceAccount: sa2}]
        sourceIps: [10.0.0.0/8]
        notSourceIps: ["fd00::/64"]
        destinationIps: [192.168.1.1/32]
        destinationPorts: [80, 443]
        notDestinationPorts: [9999]
"""


def test_every_yaml_field_survives_the_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rich.yaml"
    path.write_text(RICH_YAML)
    snap = load_local_config(str(path))
    by_type = resources_of(snap)
    (w,) = snap.workloads
    (s,) = snap.services
    (p,) = snap.policies
    assert decode_address(w.uid, by_type[ADDRESS_TYPE][w.uid].resource.value) == w
    assert decode_address(s.key(), by_type[ADDRESS_TYPE][s.key()].resource.value) == s
    assert decode_authorization(p.key(), by_type[AUTHORIZATION_TYPE][p.key()].resource.value) == p
    assert list(by_type[ADDRESS_TYPE][w.uid].aliases) == ["net1/10.1.0.1", "net1/fd00::1"]


def test_versions_are_content_hashes() -> None:
    a = resources_of(StateSnapshot(workloads=(_workload("u", "10.0.0.1"),)))
    b = resources_of(StateSnapshot(workloads=(_workload("u", "10.0.0.1"),)))
    c = resources_of(StateSnapshot(workloads=(_workload("u", "10.0.0.2"),)))
    assert a[ADDRESS_TYPE]["u"].version == b[ADDRESS_TYPE]["u"].version
    assert a[ADDRESS_TYPE]["u"].version != c[ADDRESS_TYPE]["u"].version


@pytest.fixture
async def controlplane(tmp_path: Path) -> AsyncIterator[cp_server.ControlPlane]:
    config = tmp_path / "mesh.yaml"
    config.write_text(EXAMPLE.read_text())
    cp = await cp_server.start(
        str(config), ca_dir=str(tmp_path / "ca"), listen="127.0.0.1:0", with_ca=False
    )
    try:
        yield cp
    finally:
        await cp.stop(None)


@pytest.fixture
def cp_client(
    controlplane: cp_server.ControlPlane, start_client: StartClient, tmp_path: Path
) -> Iterator[Callable[..., Harness]]:
    root = tmp_path / "cp-root.pem"
    root.write_bytes(controlplane.root_pem)

    def start(env: Mapping[str, str] | None = None) -> Harness:
        return start_client({"XDS_ROOT_CA": str(root), **(env or {})}, port=controlplane.port)

    yield start


def _drop_tcp_workload(path: Path) -> None:
    text = path.read_text()
    cut = text.index("# A second localhost")
    path.write_text(text[:cut] + text[text.index("policies:") :])


async def test_client_syncs_from_the_control_plane_and_follows_yaml_edits(
    controlplane: cp_server.ControlPlane, cp_client: Callable[..., Harness]
) -> None:
    h = cp_client()
    async with asyncio.timeout(WAIT):
        await h.synced_event.wait()
    snap = controlplane.xds.snapshot
    assert h.state.num_workloads == len(snap.workloads) == 2
    assert h.state.num_services == 2 and h.state.num_policies == 1
    _drop_tcp_workload(Path(str(controlplane.xds.config_path)))
    await _eventually(lambda: h.state.num_workloads == 1, "the removal to arrive")
    assert h.deltas[-1].removed_workloads == ("cluster1//v1/Pod/default/local-tcp",)
    (info,) = controlplane.xds.streams()
    assert info.node_id == "ztunnel~1.1.1.1~.~.svc.cluster.local"
    await _eventually(lambda: info.acks >= 3, "the ACK of the push")


async def test_injected_bad_resource_is_nacked_by_name_and_the_good_ones_apply(
    controlplane: cp_server.ControlPlane, cp_client: Callable[..., Harness]
) -> None:
    h = cp_client()
    async with asyncio.timeout(WAIT):
        await h.synced_event.wait()
    good = [_addr(_workload(f"inj{i}", f"10.7.0.{i}")) for i in range(9)]
    controlplane.xds.inject(ADDRESS_TYPE, [*good, _garbage("inj-bad")])
    (info,) = controlplane.xds.streams()
    await _eventually(lambda: info.last_nack is not None, "the NACK")
    assert info.last_nack is not None
    assert info.last_nack.message.startswith("inj-bad: decode")
    assert all(h.state.workload_by_uid(f"inj{i}") is not None for i in range(9))


async def test_reconnecting_client_is_sent_only_what_changed(tmp_path: Path) -> None:
    server = XDSServer(None)
    server.set_snapshot(
        StateSnapshot(workloads=(_workload("a", "10.0.0.1"), _workload("b", "10.0.0.2")))
    )
    held = {name: r.version for name, r in resources_of(server.snapshot)[ADDRESS_TYPE].items()}
    server.set_snapshot(
        StateSnapshot(workloads=(_workload("a", "10.0.0.1"), _workload("c", "10.0.0.3")))
    )
    catalog = Catalog(resources_of(server.snapshot), 2)
    sub = Subscription()
    sub.update(Request(type_url=ADDRESS_TYPE, initial_resource_versions=held), first=True)
    upserts, removed = sub.diff(catalog, ADDRESS_TYPE)
    assert [r.name for r in upserts] == ["c"]
    assert removed == ["b"]


def test_on_demand_subscription_resolves_aliases_and_reports_missing_names() -> None:
    w = _workload("a", "10.0.0.1")
    catalog = Catalog(resources_of(StateSnapshot(workloads=(w,))), 1)
    sub = Subscription()
    first = Request(
        type_url=ADDRESS_TYPE, resource_names_subscribe=["*"], resource_names_unsubscribe=["*"]
    )
    sub.update(first, first=True)
    assert sub.diff(catalog, ADDRESS_TYPE) == ([], [])
    asked = sub.update(
        Request(type_url=ADDRESS_TYPE, resource_names_subscribe=["/10.0.0.1", "/10.0.0.9"]),
        first=False,
    )
    upserts, removed = sub.diff(catalog, ADDRESS_TYPE, asked)
    assert [r.name for r in upserts] == ["a"]
    assert removed == ["/10.0.0.9"]


async def test_token_is_required_when_configured(tmp_path: Path, start_client: StartClient) -> None:
    cp = await cp_server.start(
        None,
        ca_dir=str(tmp_path / "ca"),
        listen="127.0.0.1:0",
        with_ca=False,
        require_token="s3cret",
    )
    try:
        root = tmp_path / "root.pem"
        root.write_bytes(cp.root_pem)
        registry = CollectorRegistry()
        start_client({"XDS_ROOT_CA": str(root), "AUTH_TOKEN": "wrong"}, registry, cp.port)
        name = "istio_xds_connection_terminations_total"
        await _eventually(
            lambda: _sample(registry, name, reason="ConnectionError") >= 1, "a refusal"
        )
        good = start_client({"XDS_ROOT_CA": str(root), "AUTH_TOKEN": "s3cret"}, port=cp.port)
        async with asyncio.timeout(WAIT):
            await good.synced_event.wait()
    finally:
        await cp.stop(None)
