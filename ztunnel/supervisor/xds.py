"""Delta xDS client: Address and Authorization resources from istiod into the supervisor's state.

Upstream: `src/xds/client.rs` (AdsClient), `src/xds.rs` (handlers), reference §7. One
`DeltaAggregatedResources` stream at a time over TLS to XDS_ADDRESS. Each response is decoded
resource by resource (`ztunnel.core.convert`): the good ones become one StateDelta handed to
`on_update`, the bad ones are named in the NACK's `error_detail` (partial apply, as upstream).
Readiness: `on_synced` fires once every wildcard type has been ACKed once; a lost stream
leaves the state alone (the data plane keeps serving the last config) and reconnects with
backoff, echoing the versions it holds in `initial_resource_versions`.

Deliberate differences from upstream:
* Every termination sleeps: upstream reconnects at once after "other" errors (a missing root
  cert, a send failure) and after a clean end of stream, which can spin (reference §19.6).
  Here the delay doubles from 10 ms up to 15 s unless the stream was healthy (it delivered at
  least one response), in which case it is reset, and it is jittered down by up to half.
* gRPC Python verifies exactly one server name: ALT_XDS_HOSTNAME, when set, replaces the
  XDS_ADDRESS host instead of being tried after it.
* `request()` waits at most `timeout` (upstream's on-demand wait has none, §19.7) and
  answers True also when the name shows up as an alias of a pushed resource.
* TCP keepalive (upstream 300 s / 75 s / 9) is left to the OS: gRPC Python has no knob for it;
  the HTTP/2 keepalive (ping every 30 s, 10 s timeout) is set and catches dead peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import grpc
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry, Counter

from ztunnel.core.config import Config
from ztunnel.core.convert import decode_address, decode_authorization
from ztunnel.core.errors import ResourceRejected, ZtunnelError
from ztunnel.core.model import Authorization, Service, StateDelta, Workload
from ztunnel.core.state import ProxyState
from ztunnel.gen import xds_pb2, xds_pb2_grpc
from ztunnel.supervisor.metrics import help_text

log = logging.getLogger(__name__)

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
WATCHED_TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)  # subscribed in this order

INITIAL_BACKOFF = 0.010  # seconds (upstream INITIAL_BACKOFF)
MAX_BACKOFF = 15.0  # seconds (upstream MAX_BACKOFF)
CONNECT_TIMEOUT = 5.0  # seconds to reach READY (upstream connect timeout)
MAX_MESSAGE_BYTES = 200 << 20  # upstream max_decoding_message_size
KEEPALIVE_TIME_MS = 30_000  # HTTP/2 ping interval (src/tls/control.rs)
KEEPALIVE_TIMEOUT_MS = 10_000
DEFAULT_INSTANCE_IP = "1.1.1.1"  # upstream DEFAULT_IP

Request = xds_pb2.DeltaDiscoveryRequest
Response = xds_pb2.DeltaDiscoveryResponse
Call = grpc.aio.StreamStreamCall[Request, Response]
Decoded = Workload | Service | Authorization

# A gRPC status on an established stream that upstream treats as a routine reconnect.
_RECONNECT_CODES = (
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
)
# tonic's wording, and gRPC C-core's for the same event (the server sent GOAWAY).
_RECONNECT_UNAVAILABLE = ("transport is closing", "received prior goaway", "GOAWAY received")


class XDSError(ZtunnelError):
    """The stream could not be attempted (trust roots, token, address)."""

    reason = "xds"


# --- pure pieces ------------------------------------------------------------------------------


class Backoff:
    """Delays between connection attempts: x2 from 10 ms to 15 s, reset after a healthy stream.

    The delay is jittered into [d/2, d], so the cap is never exceeded and many ztunnels that
    lost the same istiod do not reconnect in lockstep.
    """

    def __init__(
        self,
        initial: float = INITIAL_BACKOFF,
        maximum: float = MAX_BACKOFF,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.current = initial
        self._rng = rng

    def next(self, *, healthy: bool) -> float:
        """The sleep before the next attempt, given how the last stream went."""
        self.current = self.initial if healthy else min(self.maximum, self.current * 2)
        return self.current * (0.5 + 0.5 * self._rng())


@dataclass(frozen=True, slots=True)
class Termination:
    """How one stream ended: the metric reason, whether it had been healthy, and why."""

    reason: str  # ConnectionError | Error | Reconnect | Complete
    healthy: bool
    detail: str


def classify(err: grpc.aio.AioRpcError, *, established: bool) -> str:
    """The `istio_xds_connection_terminations_total` reason for a failed stream (§7.7)."""
    if not established:
        return "ConnectionError"
    code, details = err.code(), err.details() or ""
    if code in _RECONNECT_CODES:
        return "Reconnect"
    if code == grpc.StatusCode.UNAVAILABLE and any(m in details for m in _RECONNECT_UNAVAILABLE):
        return "Reconnect"
    return "Error"


def build_node(config: Config) -> xds_pb2.Node:
    """Upstream `Config::node`: the id istiod parses and the metadata it reads (§7.2)."""
    ip = config.instance_ip or DEFAULT_INSTANCE_IP
    pod, ns = config.pod_name or "", config.pod_namespace or ""
    metadata = struct_pb2.Struct()
    metadata.update(
        {"NAME": pod, "NAMESPACE": ns, "INSTANCE_IPS": ip, "NODE_NAME": config.node_name or ""}
    )
    metadata.update(dict(config.proxy_metadata))
    # Parsed JSON (unparseable values were dropped with a warning by Config) fits a Struct.
    metadata.update(cast(dict[str, Any], dict(config.metajson)))
    return xds_pb2.Node(id=f"ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local", metadata=metadata)


def grpc_target(address: str) -> str:
    """`https://host[:port]` -> the `host:port` gRPC dials (port 443 when absent)."""
    parts = urlsplit(address)
    if parts.scheme != "https":
        raise XDSError(f"XDS_ADDRESS={address}: only https is supported")
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{parts.port or 443}"


def removal_delta(type_url: str, names: Iterable[str], state: ProxyState) -> StateDelta:
    """Removed names as a StateDelta; names the state does not hold are dropped (§7.4).

    An Address name is a workload uid if such a workload exists, else a `namespace/hostname`
    service key; an Authorization name is the policy's `namespace/name`.
    """
    workloads: list[str] = []
    services: list[str] = []
    policies: list[str] = []
    for name in names:
        if type_url == AUTHORIZATION_TYPE:
            target = policies if state.policy_by_key(name) is not None else None
        elif state.workload_by_uid(name) is not None:
            target = workloads
        else:
            target = services if state.service_by_key(name) is not None else None
        if target is None:
            log.debug("ignoring removal of unknown resource %s", name)
            continue
        target.append(name)
    return StateDelta(
        removed_workloads=tuple(workloads),
        removed_services=tuple(services),
        removed_policies=tuple(policies),
    )


def upsert_delta(objects: Iterable[Decoded]) -> StateDelta:
    workloads: list[Workload] = []
    services: list[Service] = []
    policies: list[Authorization] = []
    for obj in objects:
        if isinstance(obj, Workload):
            workloads.append(obj)
        elif isinstance(obj, Service):
            services.append(obj)
        else:
            policies.append(obj)
    return StateDelta(
        workloads=tuple(workloads), services=tuple(services), policies=tuple(policies)
    )


def _decode(type_url: str, res: xds_pb2.Resource) -> Decoded:
    if not res.HasField("resource"):
        raise ResourceRejected(res.name, "XDS payload without resource")
    if type_url == ADDRESS_TYPE:
        return decode_address(res.name, res.resource.value)
    return decode_authorization(res.name, res.resource.value)


# --- metrics ----------------------------------------------------------------------------------


class _Metrics:
    """`istio_xds_*` (upstream `src/xds/metrics.rs`); counts nowhere without a registry."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.terminations: Counter | None = None
        self.messages: Counter | None = None
        self.message_bytes: Counter | None = None
        if registry is None:
            return
        self.terminations = Counter(
            "istio_xds_connection_terminations",
            help_text(
                "istio_xds_connection_terminations",
                "The total number of completed connections to xds server (unstable)",
            ),
            ["reason"],
            registry=registry,
        )
        self.messages = Counter(
            "istio_xds_message",
            help_text("istio_xds_message", "Total number of messages received (unstable)"),
            ["url"],
            registry=registry,
        )
        self.message_bytes = Counter(
            "istio_xds_message_bytes",
            help_text("istio_xds_message_bytes", "Total number of bytes received (unstable)"),
            ["url"],
            registry=registry,
        )

    def terminated(self, reason: str) -> None:
        if self.terminations is not None:
            self.terminations.labels(reason=reason).inc()

    def received(self, response: Response) -> None:
        if self.messages is None or self.message_bytes is None:
            return
        size = sum(len(r.resource.value) for r in response.resources)
        self.messages.labels(url=response.type_url).inc()
        self.message_bytes.labels(url=response.type_url).inc(size)


# --- the client -------------------------------------------------------------------------------


class XDSClient:
    def __init__(
        self,
        config: Config,
        *,
        state: Callable[[], ProxyState],
        on_update: Callable[[StateDelta], None],
        on_synced: Callable[[], None],
        registry: CollectorRegistry | None,
    ) -> None:
        if config.xds_address is None:
            raise XDSError("XDSClient needs XDS_ADDRESS")
        self._config = config
        self._address = config.xds_address
        self._state = state
        self._on_update = on_update
        self._on_synced = on_synced
        self._metrics = _Metrics(registry)
        self._node = build_node(config)
        self._on_demand = config.xds_on_demand
        # Accepted resources per type: name -> version, echoed on reconnect. Rejected
        # resources are not recorded, so the server sends them again after a reconnect.
        self._known: dict[str, dict[str, str]] = {t: {} for t in WATCHED_TYPES}
        # Types whose first ACK gates readiness: every wildcard subscription (§7.5).
        self._expect = {t for t in WATCHED_TYPES if not (self._on_demand and t == ADDRESS_TYPE)}
        self._synced = False
        self._pending: dict[str, list[asyncio.Future[None]]] = {}
        self.backoff = Backoff()
        self._call: Call | None = None
        self._write_lock = asyncio.Lock()
        self._connection_id = 0
        self._status = "idle"
        self._last_error: str | None = None
        self._last_delay = 0.0
        self._connected_since: float | None = None
        self._nonces: dict[str, str] = {}

    # -- public API ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a stream to the server until cancelled."""
        log.info("starting xDS client to %s", self._address)
        while True:
            self._connection_id += 1
            try:
                end = await self._run_once()
            except Exception as e:  # the one catch-all: log it, count it, reconnect
                log.error("xDS connection %d failed", self._connection_id, exc_info=True)
                end = Termination("Error", False, f"{type(e).__name__}: {e}")
            self._metrics.terminated(end.reason)
            self._last_delay = self.backoff.next(healthy=end.healthy)
            self._last_error = None if end.reason == "Complete" else end.detail
            self._status = "backoff"
            level = logging.DEBUG if end.reason in ("Reconnect", "Complete") else logging.WARNING
            log.log(
                level,
                "xDS connection %d ended (%s): %s; retrying in %.3fs",
                self._connection_id,
                end.reason,
                end.detail,
                self._last_delay,
            )
            await asyncio.sleep(self._last_delay)

    async def request(self, name: str, timeout: float = 5.0) -> bool:  # noqa: ASYNC109
        """On-demand: subscribe to Address `name` and wait for a response naming it.

        `name` is `network/ip`, a workload uid or `namespace/hostname`. True once a response
        names it (as a resource, an alias or a removal); False after `timeout` seconds, or at
        once when on-demand is off (then every address is pushed anyway).
        """
        if not self._on_demand:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(name, []).append(waiter)
        # Not yet held: an empty version makes a reconnect ask for it again (upstream
        # `add_pending_resource`), without clobbering a version already held.
        self._known[ADDRESS_TYPE].setdefault(name, "")
        log.info("on-demand request for %s", name)
        try:
            await self._send(Request(type_url=ADDRESS_TYPE, resource_names_subscribe=[name]))
        except grpc.aio.AioRpcError as e:
            log.debug("on-demand request for %s not sent now (%s), will ask on reconnect", name, e)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            return False
        finally:
            waiters = self._pending.get(name, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._pending.pop(name, None)
        return True

    def dump(self) -> dict[str, object]:
        """Connection state for debugging (admin output, tests)."""
        return {
            "address": self._address,
            "status": self._status,
            "connectionId": self._connection_id,
            "connectedSince": self._connected_since,
            "lastError": self._last_error,
            "nextRetrySeconds": round(self._last_delay, 6),
            "synced": self._synced,
            "awaitingFirstAck": sorted(self._expect),
            "onDemand": self._on_demand,
            "knownResources": {t: len(names) for t, names in self._known.items()},
            "lastNonces": dict(self._nonces),
            "pendingOnDemand": sorted(self._pending),
        }

    # -- one stream ------------------------------------------------------------------------------

    async def _run_once(self) -> Termination:
        self._status = "connecting"
        try:
            target = grpc_target(self._address)
            credentials = self._credentials()
            metadata = self._metadata()
        except (OSError, ValueError, XDSError) as e:  # ValueError: a token that is not UTF-8
            return Termination("Error", False, str(e))
        channel = grpc.aio.secure_channel(target, credentials, options=self._channel_options())
        try:
            if not await _wait_connectable(channel, CONNECT_TIMEOUT):
                return Termination(
                    "ConnectionError", False, f"no connection to {target} in {CONNECT_TIMEOUT}s"
                )
            stub = xds_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            call = stub.DeltaAggregatedResources(None, metadata=metadata)
            return await self._stream(call)
        finally:
            self._call = None
            self._connected_since = None
            await channel.close(None)

    async def _stream(self, call: Call) -> Termination:
        established = healthy = False
        try:
            self._call = call
            for req in self._initial_requests():
                await self._send(req)
            await call.initial_metadata()
            established = not call.done()
            if established:
                self._on_established()
            while isinstance(response := await call.read(), Response):  # else grpc.aio.EOF
                if not established:
                    established = True
                    self._on_established()
                await self._send(self._handle(response))
                healthy = True
        except grpc.aio.AioRpcError as e:
            reason = classify(e, established=established)
            return Termination(reason, healthy, _describe(e))
        return Termination("Complete", healthy, "stream ended by the server")

    def _on_established(self) -> None:
        self._status = "connected"
        self._connected_since = time.time()
        log.info("xDS connection %d: stream established", self._connection_id)

    async def _send(self, req: Request) -> None:
        call = self._call
        if call is None or call.done():
            return  # not connected: the next connection's initial requests cover it
        # The call may end meanwhile; reading it then reports why.
        async with self._write_lock:
            with contextlib.suppress(asyncio.InvalidStateError):
                await call.write(req)

    def _initial_requests(self) -> list[Request]:
        out = []
        for type_url in WATCHED_TYPES:
            req = Request(type_url=type_url, initial_resource_versions=self._known[type_url])
            req.node.CopyFrom(self._node)
            if self._on_demand and type_url == ADDRESS_TYPE:
                # xDS cannot subscribe to nothing: subscribe and unsubscribe the wildcard.
                req.resource_names_subscribe.append("*")
                req.resource_names_unsubscribe.append("*")
            out.append(req)
        return out

    # -- one response ----------------------------------------------------------------------------

    def _handle(self, response: Response) -> Request:
        """Apply a response; return its ACK, or NACK naming every rejected resource."""
        type_url = response.type_url
        self._metrics.received(response)
        self._nonces[type_url] = response.nonce
        log.debug(
            "received %s: %d resources, %d removed (nonce %s)",
            type_url,
            len(response.resources),
            len(response.removed_resources),
            response.nonce,
        )
        reply = Request(type_url=type_url, response_nonce=response.nonce)
        if type_url not in self._known:
            log.error("received unknown xDS type %s; acknowledging it", type_url)
            return reply
        rejects = self._apply(type_url, response)
        self._notify(response)
        if rejects:
            reply.error_detail.message = "; ".join(str(r) for r in rejects)
            log.error(
                "NACK %s (nonce %s): %s", type_url, response.nonce, reply.error_detail.message
            )
            return reply
        if type_url in self._expect:
            self._expect.discard(type_url)
            if not self._expect and not self._synced:
                self._synced = True
                log.info("initial xDS sync complete")
                self._on_synced()
        return reply

    def _apply(self, type_url: str, response: Response) -> list[ResourceRejected]:
        accepted: list[tuple[xds_pb2.Resource, Decoded]] = []
        rejects: list[ResourceRejected] = []
        for res in response.resources:
            try:
                accepted.append((res, _decode(type_url, res)))
            except ResourceRejected as e:
                rejects.append(e)
        upserts = upsert_delta(obj for _, obj in accepted)
        removals = removal_delta(type_url, response.removed_resources, self._state())
        delta = StateDelta(
            workloads=upserts.workloads,
            services=upserts.services,
            policies=upserts.policies,
            removed_workloads=removals.removed_workloads,
            removed_services=removals.removed_services,
            removed_policies=removals.removed_policies,
        )
        if not delta.is_empty():
            self._on_update(delta)
        known = self._known[type_url]
        for name in response.removed_resources:
            known.pop(name, None)
        for res, _ in accepted:
            known[res.name] = res.version
        return rejects

    def _notify(self, response: Response) -> None:
        """Wake on-demand waiters for every name the response mentions."""
        if not self._pending:
            return
        names = set(response.removed_resources)
        for res in response.resources:
            names.add(res.name)
            names.update(res.aliases)
        for name in names & self._pending.keys():
            for waiter in self._pending.pop(name):
                if not waiter.done():
                    waiter.set_result(None)

    # -- connection parameters ------------------------------------------------------------------

    def _credentials(self) -> grpc.ChannelCredentials:
        """Trust roots from XDS_ROOT_CA, read afresh for every connection."""
        root = self._config.xds_root_ca
        if root.kind == "system":
            return grpc.ssl_channel_credentials()
        if root.kind == "file":
            with open(root.value, "rb") as f:
                return grpc.ssl_channel_credentials(root_certificates=f.read())
        return grpc.ssl_channel_credentials(root_certificates=root.value.encode())

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        """Bearer token (a file is read afresh per connection) and XDS_HEADER_* pairs."""
        auth = self._config.auth_token
        out: list[tuple[str, str]] = []
        if auth.kind != "none":
            token = auth.value
            if auth.kind == "file":
                with open(auth.value, encoding="utf-8") as f:
                    token = f.read().strip()  # a trailing newline is not part of the token
                if not token:
                    raise XDSError(f"token file {auth.value} exists, but was empty")
            out += [("authorization", f"Bearer {token}"), ("clusterid", self._config.cluster_id)]
        out += self._config.xds_headers
        return tuple(out)

    def _channel_options(self) -> list[tuple[str, str | int]]:
        options: list[tuple[str, str | int]] = [
            ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),  # keep pinging an idle stream
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 0),
        ]
        if self._config.alt_xds_hostname:
            options.append(("grpc.ssl_target_name_override", self._config.alt_xds_hostname))
        return options


async def _wait_connectable(channel: grpc.aio.Channel, within: float) -> bool:
    """Wait until the channel is READY or has failed (the RPC then reports why); False if
    neither happens within `within` seconds (a black-holed address)."""
    settled = (
        grpc.ChannelConnectivity.READY,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    )
    state = channel.get_state(try_to_connect=True)
    try:
        async with asyncio.timeout(within):
            while state not in settled:
                await channel.wait_for_state_change(state)
                state = channel.get_state(try_to_connect=True)
    except TimeoutError:
        return False
    return True


def _describe(err: grpc.aio.AioRpcError) -> str:
    """Upstream's DisplayStatus: code and message, with a hint for authentication failures."""
    text = f"status: {err.code().name}, message: {err.details()!r}"
    if "authentication failure" in (err.details() or ""):
        text += " (hint: check the control plane logs for more information)"
    return text
