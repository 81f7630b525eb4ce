"""The DNS proxy of a worker (15053, UDP and TCP): sockets and the forwarder around `core.dns`.

Each worker binds its own SO_REUSEPORT UDP socket and TCP listener on localhost (upstream
`src/dns/server.rs`); the kernel spreads clients across workers. A query is parsed and
decided by `ztunnel.core.dns`; mesh answers go straight back from the protocol callback,
everything else is forwarded to the nameservers of ztunnel's own resolv.conf (search list
ignored: the client already applied its own) on a task of its own.

Forwarding: UDP from a fresh socket per query (a random source port and a random id, the
usual spoofing defences), TCP when the reply is truncated, 5 s for the whole query across
the nameservers in order; network and I/O errors become SERVFAIL. The upstream reply is
passed through unchanged but for the id, AA (cleared) and RA (set), as upstream answers
forwarded queries; it is re-rendered only when it is larger than the client's UDP limit
(then truncated with TC set).

Metrics and the upstream quirk they keep: as hickory's resolver reports NXDOMAIN and
NOERROR-without-answers as lookup errors, `istio_dns_upstream_failures_total` counts those
as well as transport failures, and the access log says `forwarding failed (...)` for them.
The reply itself is still the upstream's.

Deliberate limits (hardening §4.7): at most MAX_PENDING queries waiting on upstream or on
the client workload per worker (beyond: SERVFAIL at once), 32 queries in flight per TCP
connection (then reading pauses), idle TCP connections closed after 5 s.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from workers.metrics import WorkerMetrics
from workers.tasks import TaskSet
from ztunnel import sockets
from ztunnel.core import dns as core
from ztunnel.core.config import Config
from ztunnel.core.metrics import Labels
from ztunnel.core.model import Workload
from ztunnel.core.state import ProxyState

log = logging.getLogger(__name__)
access_log = logging.getLogger("dns")  # upstream's target `dns`

RESOLV_CONF = "/etc/resolv.conf"
LO_DISABLE_IPV6 = "/proc/sys/net/ipv6/conf/lo/disable_ipv6"
FORWARD_TIMEOUT = 5.0  # seconds for one forwarded query, every nameserver and retry included
TCP_REQUEST_TIMEOUT = 5.0  # seconds a client TCP connection may sit without a request
CLIENT_WAIT = 5.0  # seconds to wait for the local workload (upstream LocalWorkloadFetcher)
CLIENT_POLL = 0.05  # seconds between looks at the state while waiting for it
MAX_PENDING = 1024  # queries per worker waiting on upstream or on the client workload
TCP_MAX_INFLIGHT = 32  # queries in flight per TCP connection (upstream response buffer 32)
CACHE_ENTRIES = 4096  # decided queries remembered per state version
MAX_ROTATIONS = 16  # answers with more addresses are shuffled and rendered every time
_BIND_RETRIES = 8  # ephemeral port (tests): the UDP port may be taken, pick another

Protocol = Literal["udp", "tcp"]
Reply = Callable[[bytes], None]
SocketFactory = Callable[[socket.AddressFamily, socket.SocketKind], Awaitable[socket.socket]]
BoundPair = tuple[socket.socket, socket.socket]  # (TCP listener, UDP socket) on one address


def ipv6_on_localhost(path: str = LO_DISABLE_IPV6) -> bool:
    """Whether `::1` is usable: IPv6 is not disabled on lo (`ipv6_enabled_on_localhost`)."""
    try:
        return Path(path).read_text().strip() == "0"
    except OSError:
        return False


def bind_hosts(config: Config, *, lo_ipv6: bool | None = None) -> list[str]:
    """Where the DNS proxy listens: the DNS_PROXY_ADDR host, else 127.0.0.1 and (when IPv6
    is enabled and usable on lo) ::1. In a pod netns, pass `lo_ipv6` as checked there
    (`ipv6_on_localhost` run inside it): upstream re-checks per pod."""
    host = config.dns_proxy_addr.host
    if host is not None:
        return [host]
    usable = ipv6_on_localhost() if lo_ipv6 is None else lo_ipv6
    if config.ipv6_enabled and usable:
        return ["127.0.0.1", "::1"]
    return ["127.0.0.1"]


def read_resolv_conf(path: str) -> core.ResolvConf:
    try:
        return core.parse_resolv_conf(Path(path).read_text())
    except OSError as e:
        log.warning("dns: cannot read %s (%s); forwarding to 127.0.0.1", path, e.strerror)
        return core.ResolvConf()


# --- forwarder -------------------------------------------------------------------------------


class ForwardError(Exception):
    """No usable reply from any nameserver; `str()` is the access log's reason."""


@dataclass(frozen=True, slots=True)
class Nameserver:
    family: socket.AddressFamily
    address: tuple[str, int] | tuple[str, int, int, int]  # a socket address, scope resolved

    @classmethod
    def parse(cls, ip: str, port: int = 53) -> Nameserver:
        info = socket.getaddrinfo(
            ip, port, type=socket.SOCK_DGRAM, flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        )[0]
        address = info[4]
        assert isinstance(address[0], str)  # AF_INET / AF_INET6 addresses
        return cls(info[0], address)


class Forwarder:
    """Sends a query to the nameservers in order until one answers (`SystemForwarder`).

    `socket_factory` creates the upstream sockets; in a pod netns it must create them there
    (e.g. `lambda family, kind: executor.run(socket.socket, family, kind)`), as upstream's
    per-pod socket factory does. By default they are made in the worker's own netns.
    """

    def __init__(
        self,
        nameservers: Sequence[Nameserver],
        *,
        timeout: float = FORWARD_TIMEOUT,
        mark: int | None = None,
        tcp_only: bool = False,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.nameservers = tuple(nameservers) or (Nameserver.parse("127.0.0.1"),)
        self.timeout = timeout
        self.mark = mark
        self.tcp_only = tcp_only
        self.socket_factory = socket_factory

    @classmethod
    def from_resolv_conf(
        cls,
        resolv: core.ResolvConf,
        *,
        timeout: float,
        mark: int | None,
        socket_factory: SocketFactory | None = None,
    ) -> Forwarder:
        servers = [Nameserver.parse(ip) for ip in resolv.nameservers]
        return cls(
            servers,
            timeout=timeout,
            mark=mark,
            tcp_only=resolv.use_vc,
            socket_factory=socket_factory,
        )

    async def forward(self, wire: bytes) -> bytes:
        """The upstream reply to the query `wire`, under `wire`'s id; ForwardError if none."""
        loop = asyncio.get_running_loop()
        qend = core.question_end(wire) or len(wire)
        query = core.with_id(wire, secrets.randbits(16))
        deadline = loop.time() + self.timeout
        reason = "no nameservers"
        for left in range(len(self.nameservers), 0, -1):
            server = self.nameservers[-left]
            try:
                reply = await self._ask(server, query, qend, deadline, left)
            except TimeoutError:
                reason = "request timed out"
            except EOFError:
                reason = "connection closed by upstream"
            except OSError as e:
                reason = f"io error: {e.strerror or e}"
            else:
                return core.as_forwarded(reply, wire)
        raise ForwardError(reason)

    async def _ask(
        self, server: Nameserver, query: bytes, qend: int, deadline: float, left: int
    ) -> bytes:
        loop = asyncio.get_running_loop()
        budget = (deadline - loop.time()) / left
        if budget <= 0:
            raise TimeoutError
        if self.tcp_only:
            return await self._tcp(server, query, qend, budget)
        reply = await self._udp(server, query, qend, budget)
        if not core.truncated(reply):
            return reply
        try:
            return await self._tcp(server, query, qend, (deadline - loop.time()) / left)
        except (OSError, EOFError, TimeoutError) as e:
            log.debug("dns: tcp retry of a truncated reply failed: %s", e)
            return reply  # the client retries over TCP itself

    async def _socket(self, server: Nameserver, kind: socket.SocketKind) -> socket.socket:
        if self.socket_factory is None:
            sock = socket.socket(server.family, kind)
        else:
            sock = await self.socket_factory(server.family, kind)
        try:
            sock.setblocking(False)
            if self.mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, sockets.SO_MARK, self.mark)
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise
        return sock

    async def _udp(self, server: Nameserver, query: bytes, qend: int, budget: float) -> bytes:
        loop = asyncio.get_running_loop()
        sock = await self._socket(server, socket.SOCK_DGRAM)
        try:
            sock.connect(server.address)  # only the nameserver's datagrams are delivered
        except OSError:
            sock.close()
            raise
        fut: asyncio.Future[bytes] = loop.create_future()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamDatagram(fut, query, qend), sock=sock
            )
        except BaseException:
            sock.close()
            raise
        try:
            transport.sendto(query)
            async with asyncio.timeout(budget):
                return await fut
        finally:
            if not fut.done():
                fut.cancel()
            transport.close()

    async def _tcp(self, server: Nameserver, query: bytes, qend: int, budget: float) -> bytes:
        loop = asyncio.get_running_loop()
        sock = await self._socket(server, socket.SOCK_STREAM)
        async with asyncio.timeout(budget):
            try:
                await loop.sock_connect(sock, server.address)
                reader, writer = await asyncio.open_connection(sock=sock)
            except BaseException:
                sock.close()
                raise
            try:
                writer.write(len(query).to_bytes(2, "big") + query)
                while True:
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    reply = await reader.readexactly(size)
                    if core.reply_matches(reply, query, qend):
                        return reply
            finally:
                writer.close()


class _UpstreamDatagram(asyncio.DatagramProtocol):
    """Resolves `fut` with the first datagram that answers `query`; ICMP errors fail it."""

    def __init__(self, fut: asyncio.Future[bytes], query: bytes, qend: int) -> None:
        self.fut = fut
        self.query = query
        self.qend = qend

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        if not self.fut.done() and core.reply_matches(data, self.query, self.qend):
            self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)  # e.g. ECONNREFUSED: nothing listens upstream

    def connection_lost(self, exc: Exception | None) -> None:
        # Our own close comes after the future is settled; anything else is an error, never
        # a cancellation (that would cancel the forwarding task instead of failing it).
        if not self.fut.done():
            self.fut.set_exception(exc or ConnectionResetError("upstream socket closed"))


# --- decided-query cache ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Asked:
    """What answering or forwarding needs to know of a query beyond its bytes."""

    query_type: str  # access log fields
    domain: str
    udp_limit: int  # bytes

    @classmethod
    def of(cls, query: core.Query) -> _Asked:
        return cls(query.type_text, query.name.to_text(), query.udp_limit)


@dataclass(frozen=True, slots=True)
class _Decided:
    """What a query (less its id) was decided to be, for one client and one state.

    A mesh answer keeps one rendering per rotation of its (shuffled) addresses, filled in
    as they are first drawn, from byte 2 on: every address comes first equally often.
    """

    client: Workload
    asked: _Asked
    labels: Labels
    answer: core.Answer | None  # None: forwarded
    renderings: list[bytes | None]


class _DecisionCache:
    """Parsing and answering cost 150-400 us in dnspython; a repeated query costs a lookup.

    Kept only for the state object a decision was made from (a new state, i.e. any delta,
    empties it) and for answers of at most MAX_ROTATIONS addresses.
    """

    __slots__ = ("_entries", "_state")

    def __init__(self) -> None:
        self._entries: dict[tuple[Protocol, bytes], _Decided] = {}
        self._state: ProxyState | None = None

    def get(
        self, proto: Protocol, wire: bytes, client: Workload, state: ProxyState
    ) -> _Decided | None:
        if state is not self._state:
            self._entries.clear()
            self._state = state
            return None
        hit = self._entries.get((proto, wire[2:]))
        return hit if hit is not None and hit.client is client else None

    def put(self, proto: Protocol, wire: bytes, state: ProxyState, decided: _Decided) -> None:
        if state is not self._state:
            self._entries.clear()
            self._state = state
        if len(self._entries) >= CACHE_ENTRIES:
            self._entries.clear()
        self._entries[proto, wire[2:]] = decided


# --- server ----------------------------------------------------------------------------------


class DNSServer:
    """UDP + TCP DNS on localhost for the workload(s) of this worker's proxy."""

    def __init__(
        self,
        config: Config,
        proxy_local_workload: Callable[[], Workload | None],
        state: Callable[[], ProxyState],
        metrics: WorkerMetrics,
        tasks: TaskSet,
        *,
        resolv_conf: str = RESOLV_CONF,
        forward_timeout: float = FORWARD_TIMEOUT,
        client_wait: float = CLIENT_WAIT,
        rng: random.Random | None = None,
        socket_factory: SocketFactory | None = None,
    ) -> None:
        self.config = config
        self._local_workload = proxy_local_workload
        self._state = state
        self._metrics = metrics
        self._tasks = tasks
        resolv = read_resolv_conf(resolv_conf)
        self.settings = core.Settings.from_config(config, resolv)
        self.forwarder = Forwarder.from_resolv_conf(
            resolv, timeout=forward_timeout, mark=config.packet_mark, socket_factory=socket_factory
        )
        self._client_wait = client_wait
        self._rng = rng or random.Random()
        self._cache = _DecisionCache()
        self._pending = 0
        self._closed = False
        self._udp_socks: list[socket.socket] = []
        self._servers: list[asyncio.Server] = []
        self._udp_transports: list[asyncio.DatagramTransport] = []
        self._conns: set[_TCPConnection] = set()
        self.addresses: list[tuple[str, int]] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def bind(self, host_list: Sequence[str], port: int) -> None:
        """Bind UDP and TCP on every host (same port); raises sockets.BindError.

        Nothing is read until `start_serving`: early queries wait in the socket buffers.
        Port 0 picks one free port for all of them (tests). In a pod netns, create the
        sockets there with `bind_pairs` and hand them to `attach` instead.
        """
        mark = self.config.packet_mark if self.config.proxy_mode == "shared" else None
        await self.attach(bind_pairs(host_list, port, mark))

    async def attach(self, pairs: Sequence[BoundPair]) -> None:
        """Serve on sockets bound elsewhere (`bind_pairs`), from `start_serving` on."""
        loop = asyncio.get_running_loop()
        for tcp, udp in pairs:
            host, port = tcp.getsockname()[:2]
            self.addresses.append((host, port))
            self._udp_socks.append(udp)
            server = await loop.create_server(
                lambda: _TCPConnection(self),
                sock=tcp,
                start_serving=False,
                backlog=sockets.LISTEN_BACKLOG,
            )
            self._servers.append(server)

    async def start_serving(self) -> None:
        loop = asyncio.get_running_loop()
        for server in self._servers:
            await server.start_serving()
        while self._udp_socks and not self._closed:
            sock = self._udp_socks.pop(0)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _ServerDatagram(self), sock=sock
            )
            self._udp_transports.append(transport)
        log.info("dns: listening on %s", ", ".join(sockets.format_addr(*a) for a in self.addresses))

    def close(self) -> None:
        """Stop listening and drop client connections; pending forwards are the TaskSet's."""
        self._closed = True
        for server in self._servers:
            server.close()
        for transport in self._udp_transports:
            transport.close()
        for sock in self._udp_socks:
            sock.close()
        self._udp_socks.clear()
        for conn in tuple(self._conns):
            conn.close()

    # -- queries ----------------------------------------------------------------------------

    def handle(self, wire: bytes, proto: Protocol, reply: Reply) -> bool:
        """Answer `wire` through `reply` now or later; False if it was dropped (no reply)."""
        client = self._local_workload()
        state = self._state()
        if client is not None:
            hit = self._cache.get(proto, wire, client, state)
            if hit is not None:
                self._serve_cached(hit, wire, proto, reply)
                return True
        parsed = core.parse_query(wire, tcp=proto == "tcp")
        if parsed is None:
            return False
        if isinstance(parsed, core.Reply):
            reply(parsed.wire)
            return True
        if client is None:
            self._wait_for_client(parsed, proto, reply)
            return True
        try:
            self._decide(parsed, client, state, proto, reply)
        except Exception:  # the edge of every query: never let one break the listener
            log.exception("dns: failed to answer a %s query", proto)
            reply(core.servfail(parsed, "internal error").wire)
        return True

    def _decide(
        self, query: core.Query, client: Workload, state: ProxyState, proto: Protocol, reply: Reply
    ) -> None:
        decision = core.answer(query, client, state, self.settings, self._rng)
        labels = core.dns_labels(core.query_type_label(query.rdtype), proto, client)
        asked = _Asked.of(query)
        if isinstance(decision, core.Forward):
            self._cache.put(proto, query.wire, state, _Decided(client, asked, labels, None, []))
            self._start_forward(
                query.wire, asked, client=client, labels=labels, proto=proto, reply=reply
            )
            return
        self._metrics.inc(core.REQUESTS, labels)
        if isinstance(decision, core.Reply):
            reply(decision.wire)
            self._log(client, asked, decision.result, 0)
            return
        out = decision.render(self._max_size(asked, proto))
        reply(out)
        self._log(client, asked, decision.result, decision.endpoints)
        if decision.endpoints <= MAX_ROTATIONS:
            renderings: list[bytes | None] = [None] * max(decision.endpoints, 1)
            renderings[0] = out[2:]
            decided = _Decided(client, asked, labels, decision, renderings)
            self._cache.put(proto, query.wire, state, decided)

    def _serve_cached(self, hit: _Decided, wire: bytes, proto: Protocol, reply: Reply) -> None:
        if hit.answer is None:
            self._start_forward(
                wire, hit.asked, client=hit.client, labels=hit.labels, proto=proto, reply=reply
            )
            return
        self._metrics.inc(core.REQUESTS, hit.labels)
        k = self._rng.randrange(len(hit.renderings))
        rendered = hit.renderings[k]
        if rendered is None:
            rendered = hit.renderings[k] = hit.answer.render(self._max_size(hit.asked, proto), k)[
                2:
            ]
        reply(wire[:2] + rendered)
        self._log(hit.client, hit.asked, hit.answer.result, hit.answer.endpoints)

    @staticmethod
    def _max_size(asked: _Asked, proto: Protocol) -> int:
        return asked.udp_limit if proto == "udp" else core.MAX_MESSAGE

    # -- waiting for the client workload ------------------------------------------------------

    def _wait_for_client(self, query: core.Query, proto: Protocol, reply: Reply) -> None:
        if self._client_wait <= 0 or self._pending >= MAX_PENDING:
            self._unknown_client(query, proto, reply)
            return
        self._pending += 1
        self._tasks.spawn(self._await_client(query, proto, reply), name="dns-client")

    async def _await_client(self, query: core.Query, proto: Protocol, reply: Reply) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._client_wait
        try:
            client = self._local_workload()
            while client is None and loop.time() < deadline:
                await asyncio.sleep(CLIENT_POLL)
                client = self._local_workload()
            if client is None:
                self._unknown_client(query, proto, reply)
            else:
                self._decide(query, client, self._state(), proto, reply)
        except Exception:  # this task's one catch-all
            log.exception("dns: failed to answer a %s query", proto)
            reply(core.servfail(query, "internal error").wire)
        finally:
            self._pending -= 1

    def _unknown_client(self, query: core.Query, proto: Protocol, reply: Reply) -> None:
        """Upstream: SERVFAIL, counted in istio_dns_requests_total with an unknown source."""
        labels = core.dns_labels(core.query_type_label(query.rdtype), proto, None)
        self._metrics.inc(core.REQUESTS, labels)
        reply(core.servfail(query, "unknown source").wire)
        self._log(None, _Asked.of(query), "unknown source", 0)

    # -- forwarding -------------------------------------------------------------------------

    def _start_forward(
        self,
        wire: bytes,
        asked: _Asked,
        *,
        client: Workload,
        labels: Labels,
        proto: Protocol,
        reply: Reply,
    ) -> None:
        self._metrics.inc(core.REQUESTS, labels)
        self._metrics.inc(core.UPSTREAM_REQUESTS, labels)
        if self._pending >= MAX_PENDING:
            self._metrics.inc(core.UPSTREAM_FAILURES, labels)
            reply(core.servfail_wire(wire))
            self._log(client, asked, "forwarding failed (too many pending queries)", 0)
            return
        self._pending += 1
        coro = self._forward(wire, asked, client=client, labels=labels, proto=proto, reply=reply)
        self._tasks.spawn(coro, name="dns-forward")

    async def _forward(
        self,
        wire: bytes,
        asked: _Asked,
        *,
        client: Workload,
        labels: Labels,
        proto: Protocol,
        reply: Reply,
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            try:
                upstream = await self.forwarder.forward(wire)
            except ForwardError as e:
                self._observe(labels, loop.time() - start, failed=True)
                reply(core.servfail_wire(wire))
                return self._log(client, asked, f"forwarding failed ({e})", 0)
            rcode, count = core.reply_summary(upstream)
            failed = rcode != 0 or count == 0  # hickory reports both as lookup errors
            self._observe(labels, loop.time() - start, failed=failed)
            out = upstream if proto == "tcp" else core.fit_udp(upstream, asked.udp_limit)
            if out is None:
                reply(core.servfail_wire(wire))
                return self._log(client, asked, "forwarding failed (malformed reply)", 0)
            reply(out)
            result = f"forwarding failed ({_why(rcode)})" if failed else "forwarded"
            self._log(client, asked, result, count)
        except Exception:  # this task's one catch-all
            log.exception("dns: forwarding a %s query failed", proto)
            reply(core.servfail_wire(wire))
        finally:
            self._pending -= 1

    def _observe(self, labels: Labels, seconds: float, *, failed: bool) -> None:
        for family, series, value in core.duration_samples(labels, seconds):
            self._metrics.inc(family, series, value)
        if failed:
            self._metrics.inc(core.UPSTREAM_FAILURES, labels)

    def _log(self, client: Workload | None, asked: _Asked, result: str, endpoints: int) -> None:
        """Upstream's DNS access log: target `dns`, DEBUG, fields only."""
        if not access_log.isEnabledFor(logging.DEBUG):
            return
        fields = {
            "src.workload": (client.name if client else "") or "unknown",
            "src.namespace": (client.namespace if client else "") or "unknown",
            "query": asked.query_type,
            "domain": asked.domain,
            "result": result,
            "endpoints": endpoints,
        }
        access_log.debug("", extra={"fields": fields})

    # -- connections ------------------------------------------------------------------------

    def _track(self, conn: _TCPConnection, *, opened: bool) -> None:
        if opened:
            self._conns.add(conn)
        else:
            self._conns.discard(conn)


def _why(rcode: int) -> str:
    if rcode == 0:
        return "no records found"
    return f"response code {core.rcode_text(rcode)}"


def bind_pairs(host_list: Sequence[str], port: int, mark: int | None = None) -> list[BoundPair]:
    """A TCP listener and a UDP socket (SO_REUSEPORT) per host, all on one port; port 0
    picks a free one. Synchronous, so it can run on a thread inside a pod netns. On a
    failure nothing stays bound and sockets.BindError is raised."""
    pairs: list[BoundPair] = []
    try:
        for host in host_list:
            pairs.append(_bind_pair(host, port, mark))
            port = pairs[-1][0].getsockname()[1]
    except BaseException:
        for tcp, udp in pairs:
            tcp.close()
            udp.close()
        raise
    return pairs


def _bind_pair(host: str, port: int, mark: int | None) -> BoundPair:
    """A TCP listener and a UDP socket on the same host:port (both SO_REUSEPORT)."""
    tries = _BIND_RETRIES if port == 0 else 1
    for attempt in range(tries):
        tcp = sockets.bind_listener(host, port, mark=mark)
        try:
            return tcp, _bind_udp(host, tcp.getsockname()[1], mark)
        except sockets.BindError as e:
            tcp.close()
            if e.errno != errno.EADDRINUSE or attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _bind_udp(host: str, port: int, mark: int | None) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if mark is not None:
            sock.setsockopt(socket.SOL_SOCKET, sockets.SO_MARK, mark)
        sock.bind((host, port))
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        what = "address already in use" if e.errno == errno.EADDRINUSE else e.strerror
        raise sockets.BindError(
            e.errno, f"failed to bind {sockets.format_addr(host, port)} (udp): {what}"
        ) from e
    return sock


# --- protocols -------------------------------------------------------------------------------


class _ServerDatagram(asyncio.DatagramProtocol):
    """The UDP listener: one query per datagram, answered to its source."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # uvloop's is no subclass

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        transport = self.transport
        if transport is None or addr[1] == 0:
            return  # port 0 cannot be answered

        def reply(wire: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(wire, addr)

        self.server.handle(data, "udp", reply)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors about earlier replies: the clients went away


class _TCPConnection(asyncio.Protocol):
    """Length-prefixed queries (RFC 7766); replies may come out of order."""

    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inflight = 0
        self.eof = False
        self.reading = True
        self.writable = True
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.server._track(self, opened=True)
        self._touch()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(TCP_REQUEST_TIMEOUT, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2 and self.transport is not None:
            size = int.from_bytes(self.buf[:2], "big")
            if len(self.buf) < 2 + size:
                break
            message = bytes(self.buf[2 : 2 + size])
            del self.buf[: 2 + size]
            self._touch()
            self.inflight += 1
            if not self.server.handle(message, "tcp", self._reply):
                self.close()  # not even a DNS header: this is not a DNS client
                return
        self._flow()

    def eof_received(self) -> bool:
        self.eof = True
        return self.inflight > 0  # keep the write side open for the answers still due

    def pause_writing(self) -> None:
        self.writable = False
        self._flow()

    def resume_writing(self) -> None:
        self.writable = True
        self._flow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._track(self, opened=False)
        self.transport = None
        if self.timer is not None:
            self.timer.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _reply(self, wire: bytes) -> None:
        self.inflight -= 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(len(wire).to_bytes(2, "big") + wire)
        self._touch()
        if self.eof and self.inflight == 0:
            transport.close()
        else:
            self._flow()

    def _flow(self) -> None:
        """Read while few queries are in flight and the client reads its answers."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        want = self.writable and self.inflight < TCP_MAX_INFLIGHT and not self.eof
        if want != self.reading:
            self.reading = want
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    def _touch(self) -> None:
        self.last = asyncio.get_running_loop().time()

    def _check_idle(self) -> None:
        """Close after TCP_REQUEST_TIMEOUT without a request (upstream's request timeout)."""
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        idle = loop.time() - self.last
        if self.inflight == 0 and idle >= TCP_REQUEST_TIMEOUT:
            self.transport.close()
            return
        self.timer = loop.call_later(max(TCP_REQUEST_TIMEOUT - idle, 0.1), self._check_idle)
