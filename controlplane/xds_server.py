"""Delta ADS server: serves the YAML config's workloads, services and policies as istiod would.

One `DeltaAggregatedResources` stream per client. Per stream and type URL it tracks the
subscription (wildcard, or explicit names for on-demand clients) and the version of every
resource the client holds, seeded from `initial_resource_versions` on the first request, so a
reconnecting client is sent only what changed and told what disappeared (istiod's
`pilot/pkg/xds/delta.go` does the same). The YAML file is polled; an edit is pushed to every
stream as one response per type with upserts and `removed_resources`. A file that fails to
parse is logged and the last good config keeps being served.

ACKs and NACKs are logged and the NACKs kept per stream (`streams()`), for tests and for
whoever runs the control plane by hand. `inject` adds raw, possibly malformed, resources on top
of the config's: a test hook for the client's per-resource NACK handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field

import grpc
from google.protobuf import json_format, struct_pb2

from controlplane.resources import TYPE_URLS, resources_of, version_of
from ztunnel.core.errors import ConfigError
from ztunnel.core.localconfig import load_local_config
from ztunnel.core.model import StateSnapshot
from ztunnel.filewatch import SettledChange
from ztunnel.gen import xds_pb2, xds_pb2_grpc

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.1  # seconds between checks of the config file's mtime and size (a stat)
WILDCARD = "*"
KEPT_NACKS = 64  # per stream, newest last

Request = xds_pb2.DeltaDiscoveryRequest
Response = xds_pb2.DeltaDiscoveryResponse
Context = grpc.aio.ServicerContext[Request, Response]


@dataclass(frozen=True, slots=True)
class Nack:
    type_url: str
    nonce: str
    message: str


@dataclass(slots=True)
class StreamInfo:
    """What a test or an operator may want to know about one client stream."""

    id: int
    peer: str
    metadata: dict[str, str]
    node_id: str = ""
    node_metadata: dict[str, object] = field(default_factory=dict)
    acks: int = 0
    nacks: deque[Nack] = field(default_factory=lambda: deque(maxlen=KEPT_NACKS))

    @property
    def last_nack(self) -> Nack | None:
        return self.nacks[-1] if self.nacks else None


class Catalog:
    """The resources being served, per type URL, with their aliases resolved to names."""

    def __init__(self, by_type: Mapping[str, Mapping[str, xds_pb2.Resource]], generation: int):
        self.by_type = by_type
        self.generation = generation
        self._aliases: dict[str, dict[str, set[str]]] = {}
        for type_url, resources in by_type.items():
            index = self._aliases.setdefault(type_url, {})
            for name, res in resources.items():
                for alias in res.aliases:
                    index.setdefault(alias, set()).add(name)

    def lookup(self, type_url: str, name: str) -> set[str]:
        """Resource names `name` stands for: itself if served, plus what it aliases."""
        found = set(self._aliases.get(type_url, {}).get(name, ()))
        if name in self.by_type.get(type_url, {}):
            found.add(name)
        return found

    def matching(self, type_url: str, sub: Subscription) -> dict[str, xds_pb2.Resource]:
        resources = self.by_type.get(type_url, {})
        if sub.wildcard:
            return dict(resources)
        return {n: resources[n] for name in sub.names for n in self.lookup(type_url, name)}


@dataclass(slots=True)
class Subscription:
    """One type URL on one stream: what the client asked for and what it holds."""

    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    sent: dict[str, str] = field(default_factory=dict)  # name -> version the client holds

    def update(self, req: Request, *, first: bool) -> list[str]:
        """Apply the request's (un)subscriptions; returns explicit names newly asked for."""
        subscribe = list(req.resource_names_subscribe)
        if first and not subscribe:
            self.wildcard = True  # legacy wildcard: an initial request naming nothing
        added = []
        for name in subscribe:
            if name == WILDCARD:
                self.wildcard = True
            elif name not in self.names:
                self.names.add(name)
                added.append(name)
        for name in req.resource_names_unsubscribe:
            if name == WILDCARD:
                self.wildcard = False
            else:
                self.names.discard(name)
                self.sent.pop(name, None)  # the client forgets it by itself
        if first:
            self.sent = dict(req.initial_resource_versions)
            if not self.wildcard:
                # A reconnecting on-demand client re-subscribes by echoing what it holds.
                self.names.update(self.sent)
        return added

    def diff(
        self, catalog: Catalog, type_url: str, asked: Iterable[str] = ()
    ) -> tuple[list[xds_pb2.Resource], list[str]]:
        """(upserts, removals) that bring the client to the catalog, and record them sent."""
        want = catalog.matching(type_url, self)
        upserts = [r for n, r in want.items() if self.sent.get(n) != r.version]
        removed = [n for n in self.sent if n not in want]
        # An explicit name that matches nothing is answered as removed, so a client waiting
        # on it (on-demand) learns that it does not exist.
        removed += [n for n in asked if not catalog.lookup(type_url, n) and n not in removed]
        for r in upserts:
            self.sent[r.name] = r.version
        for n in removed:
            self.sent.pop(n, None)
        return upserts, removed


_CHANGED = object()  # inbox marker: the catalog changed


class _Stream:
    def __init__(self, info: StreamInfo) -> None:
        self.info = info
        self.subs: dict[str, Subscription] = {}
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.change_queued = False
        self._nonces = itertools.count(1)

    def notify_changed(self) -> None:
        if not self.change_queued:
            self.change_queued = True
            self.inbox.put_nowait(_CHANGED)

    def on_request(self, req: Request, catalog: Catalog) -> list[Response]:
        if req.response_nonce:
            self._record_reply(req)
        if req.HasField("node") and not self.info.node_id:
            self.info.node_id = req.node.id
            self.info.node_metadata = _struct_to_dict(req.node.metadata)
        if req.type_url not in TYPE_URLS:
            log.warning("stream %d: request for unknown type %s", self.info.id, req.type_url)
            return []
        sub = self.subs.get(req.type_url)
        first = sub is None
        if sub is None:
            sub = self.subs[req.type_url] = Subscription()
        changes = bool(req.resource_names_subscribe or req.resource_names_unsubscribe)
        if not first and not changes:
            return []  # a plain ACK/NACK
        asked = sub.update(req, first=first)
        upserts, removed = sub.diff(catalog, req.type_url, asked)
        if first or upserts or removed:
            return [self._response(req.type_url, catalog, upserts, removed)]
        return []

    def on_change(self, catalog: Catalog) -> list[Response]:
        self.change_queued = False
        out = []
        for type_url, sub in self.subs.items():
            upserts, removed = sub.diff(catalog, type_url)
            if upserts or removed:
                out.append(self._response(type_url, catalog, upserts, removed))
        return out

    def _response(
        self,
        type_url: str,
        catalog: Catalog,
        upserts: list[xds_pb2.Resource],
        removed: list[str],
    ) -> Response:
        nonce = f"{self.info.id}-{next(self._nonces)}"
        log.debug(
            "stream %d: pushing %s: %d resources, %d removed (nonce %s)",
            self.info.id,
            type_url,
            len(upserts),
            len(removed),
            nonce,
        )
        return Response(
            system_version_info=str(catalog.generation),
            type_url=type_url,
            nonce=nonce,
            resources=upserts,
            removed_resources=removed,
        )

    def _record_reply(self, req: Request) -> None:
        if req.HasField("error_detail") and req.error_detail.message:
            nack = Nack(req.type_url, req.response_nonce, req.error_detail.message)
            self.info.nacks.append(nack)
            log.warning(
                "stream %d: NACK %s nonce %s: %s",
                self.info.id,
                req.type_url,
                req.response_nonce,
                nack.message,
            )
        else:
            self.info.acks += 1
            log.debug("stream %d: ACK %s nonce %s", self.info.id, req.type_url, req.response_nonce)


class XDSServer(xds_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """The delta ADS servicer; `load()` once, then `watch()` in a task of the serving loop."""

    def __init__(self, config_path: str | None, *, require_token: str | None = None) -> None:
        self.config_path = config_path
        self.require_token = require_token
        self.snapshot = StateSnapshot()
        self._injected: dict[str, dict[str, xds_pb2.Resource]] = {t: {} for t in TYPE_URLS}
        self._generations = itertools.count(1)
        self._catalog = Catalog({t: {} for t in TYPE_URLS}, 0)
        self._streams: dict[int, _Stream] = {}
        self._stream_ids = itertools.count(1)
        self._change: SettledChange | None = None

    # -- the served config ----------------------------------------------------------------------

    def load(self) -> None:
        """Read the config file (ConfigError if it is invalid) and serve it."""
        if self.config_path is None:
            self.set_snapshot(StateSnapshot())
            return
        self._change = SettledChange(self.config_path)
        self.set_snapshot(load_local_config(self.config_path))

    def set_snapshot(self, snap: StateSnapshot) -> None:
        self.snapshot = snap
        self._rebuild()
        log.info(
            "serving config version %d: %d workloads, %d services, %d policies",
            self._catalog.generation,
            len(snap.workloads),
            len(snap.services),
            len(snap.policies),
        )

    def inject(self, type_url: str, resources: Iterable[xds_pb2.Resource]) -> None:
        """Serve raw resources beside the config's (a resource without version gets a hash)."""
        for res in resources:
            copy = xds_pb2.Resource()
            copy.CopyFrom(res)
            if not copy.version:
                copy.version = version_of(copy.SerializeToString(deterministic=True))
            self._injected.setdefault(type_url, {})[copy.name] = copy
        self._rebuild()

    def clear_injected(self) -> None:
        self._injected = {t: {} for t in TYPE_URLS}
        self._rebuild()

    def _rebuild(self) -> None:
        by_type = resources_of(self.snapshot)
        for type_url, extra in self._injected.items():
            by_type.setdefault(type_url, {}).update(extra)
        self._catalog = Catalog(by_type, next(self._generations))
        for stream in self._streams.values():
            stream.notify_changed()

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """Serve every valid edit of the config file until cancelled."""
        if self.config_path is None:
            return
        change = self._change or SettledChange(self.config_path)
        while True:
            await asyncio.sleep(interval)
            if not change.poll():
                continue
            try:
                snap = load_local_config(self.config_path)
            except ConfigError as e:
                log.error("config changed but is invalid, serving the last good one: %s", e)
                continue
            self.set_snapshot(snap)

    # -- streams --------------------------------------------------------------------------------

    def streams(self) -> list[StreamInfo]:
        """The connected streams, oldest first."""
        return [s.info for s in self._streams.values()]

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Request], context: Context
    ) -> AsyncIterator[Response]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        if self.require_token is not None and not _token_ok(metadata, self.require_token):
            log.warning("rejecting xDS stream from %s: bad or missing token", context.peer())
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "authentication failure")
        stream = _Stream(StreamInfo(next(self._stream_ids), context.peer(), metadata))
        self._streams[stream.info.id] = stream
        log.info("stream %d: connected from %s", stream.info.id, stream.info.peer)
        # Headers right away: the client counts the stream as established from here.
        await context.send_initial_metadata(())
        reader = asyncio.get_running_loop().create_task(
            _read_requests(request_iterator, stream.inbox), name=f"xds-stream-{stream.info.id}"
        )
        try:
            while (item := await stream.inbox.get()) is not None:
                if item is _CHANGED:
                    responses = stream.on_change(self._catalog)
                else:
                    assert isinstance(item, Request)
                    responses = stream.on_request(item, self._catalog)
                for response in responses:
                    yield response
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            del self._streams[stream.info.id]
            log.info("stream %d: closed", stream.info.id)

    async def StreamAggregatedResources(
        self,
        request_iterator: AsyncIterator[xds_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[xds_pb2.DiscoveryRequest, xds_pb2.DiscoveryResponse],
    ) -> AsyncIterator[xds_pb2.DiscoveryResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "only delta xDS is served")
        yield xds_pb2.DiscoveryResponse()  # unreachable: makes this an async generator


async def _read_requests(requests: AsyncIterator[Request], inbox: asyncio.Queue[object]) -> None:
    """Move the client's requests into the stream's inbox; None once the client is done."""
    try:
        async for req in requests:
            inbox.put_nowait(req)
    except (grpc.aio.AioRpcError, grpc.aio.AbortError) as e:
        log.debug("request stream ended: %s", e)
    finally:
        inbox.put_nowait(None)


def _token_ok(metadata: Mapping[str, str], token: str) -> bool:
    return metadata.get("authorization") == f"Bearer {token}"


def _struct_to_dict(struct: struct_pb2.Struct) -> dict[str, object]:
    return json_format.MessageToDict(struct)
