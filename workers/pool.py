"""The HBONE connection pool of one proxy (`src/proxy/pool.rs`).

Connections are keyed like upstream's WorkloadKey (source identity, expected destination
identities, next hop, downstream source IP). A pooled connection carries streams up to
min(POOL_MAX_STREAMS_PER_CONNECTION, the peer's MAX_CONCURRENT_STREAMS); a full one stays
open but takes no new streams, and the next request opens another. One handshake per key
at a time: concurrent requesters for a new destination wait for it instead of storming.
Broken or GOAWAY'd connections are skipped and dropped; idle ones are released after
POOL_UNUSED_RELEASE_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from workers.revocation import REVOKED_FLAG, Revocation
from workers.tunnel import H2Protocol, TunnelLeg
from ztunnel import tls
from ztunnel.core import hbone as core
from ztunnel.core.config import Config
from ztunnel.core.errors import ZtunnelError
from ztunnel.core.ipc import WorkloadCertificate

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # upstream CONNECTION_TIMEOUT
HANDSHAKE_TIMEOUT = 10.0


class PoolError(ZtunnelError):
    """Could not get an HBONE connection; `flag` is the response_flags label."""

    def __init__(self, message: str, flag: str) -> None:
        super().__init__(message)
        self.flag = flag


@dataclass(frozen=True, slots=True)
class WorkloadKey:
    src_id: str
    dst_ids: tuple[str, ...]
    dst: tuple[str, int]
    src: str


def h2_settings(config: Config, *, server: bool) -> core.H2Settings:
    """Upstream's HTTP/2 settings from HTTP2_* (src/proxy/h2/{client,server}.rs)."""
    sizes = {
        "frame_size": config.http2_frame_size,
        "stream_window": config.http2_stream_window_size,
        "connection_window": config.http2_connection_window_size,
    }
    if server:
        return core.H2Settings.server(**sizes)
    return core.H2Settings.client(**sizes, max_streams=config.pool_max_streams_per_connection)


class HBONEClientProtocol(H2Protocol):
    """A pooled client connection; verifies the server's SPIFFE identity before any byte."""

    def __init__(
        self, pool: Pool, key: WorkloadKey, max_streams: int, settings: core.H2Settings
    ) -> None:
        self.client = core.HBONEClient(settings, max_streams=max_streams)
        super().__init__(self.client)
        self.pool = pool
        self.key = key
        self.error: str | None = None
        self.error_flag = "IDENTITY_ERROR"  # the response_flags of `error`
        self.peer_identity: str | None = None
        self.waiting: dict[int, Callable[[int], None]] = {}
        self.idle_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        session = transport.get_extra_info("ssl_object")
        try:
            identity = tls.verify_outbound(session, expected=self.key.dst_ids)
        except tls.TLSError as e:
            self.error = str(e)
            transport.abort()  # type: ignore[attr-defined]
            return
        revocation = self.pool.revocation
        if revocation is not None and (revoked := revocation.admit(self, session, "source")):
            self.error, self.error_flag = f"tls handshake failed: {revoked}", REVOKED_FLAG
            transport.abort()  # type: ignore[attr-defined]
            return
        self.peer_identity = str(identity)
        super().connection_made(transport)

    def usable(self) -> bool:
        return (
            not self.closed
            and self.error is None
            and self.client.is_usable()
            and self.client.available_streams() > 0
        )

    def open(
        self,
        authority: str,
        headers: list[tuple[str, str]],
        leg: TunnelLeg,
        on_response: Callable[[int], None],
    ) -> None:
        stream_id = self.client.open_stream(authority, headers)
        leg.bind_stream(self, stream_id)
        self.waiting[stream_id] = on_response
        if self.idle_handle is not None:
            self.idle_handle.cancel()
            self.idle_handle = None
        self.flush()

    def on_event(self, ev: core.Event) -> None:
        if isinstance(ev, core.ResponseReceived):
            callback = self.waiting.pop(ev.stream_id, None)
            if callback is not None:
                callback(ev.status)

    def on_stream_closed(self) -> None:
        if not self.legs:
            self.pool.idle(self)

    def on_stream_reset(self, stream_id: int) -> None:
        callback = self.waiting.pop(stream_id, None)
        if callback is not None:
            callback(0)

    def on_closed(self) -> None:
        if self.pool.revocation is not None:
            self.pool.revocation.forget(self)
        for callback in self.waiting.values():
            callback(0)
        self.waiting.clear()
        self.pool.remove(self)


class Pool:
    def __init__(
        self,
        config: Config,
        contexts: tls.ContextCache,
        new_socket: Callable[[str], Awaitable[socket.socket]],
        revocation: Revocation | None = None,
    ) -> None:
        self.config = config
        self.revocation = revocation
        self.contexts = contexts
        self.new_socket = new_socket
        self.conns: dict[WorkloadKey, list[HBONEClientProtocol]] = {}
        self._connecting: dict[WorkloadKey, asyncio.Future[None]] = {}
        self.settings = h2_settings(config, server=False)
        self.handshakes = 0  # connections established, for tests and metrics

    async def checkout(self, key: WorkloadKey, cert: WorkloadCertificate) -> HBONEClientProtocol:
        while True:
            for conn in self.conns.get(key, ()):
                if conn.usable():
                    return conn
            pending = self._connecting.get(key)
            if pending is None:
                return await self._connect_once(key, cert)
            await asyncio.shield(pending)  # another request is connecting this key: wait, re-check

    async def _connect_once(
        self, key: WorkloadKey, cert: WorkloadCertificate
    ) -> HBONEClientProtocol:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connecting[key] = fut
        try:
            conn = await self._connect(key, cert)
        except BaseException as e:
            fut.set_exception(e if isinstance(e, PoolError) else PoolError(str(e), "CONNECT"))
            fut.exception()  # waiters re-raise; mark retrieved
            raise
        else:
            self.conns.setdefault(key, []).append(conn)
            fut.set_result(None)
            return conn
        finally:
            self._connecting.pop(key, None)

    async def _connect(self, key: WorkloadKey, cert: WorkloadCertificate) -> HBONEClientProtocol:
        loop = asyncio.get_running_loop()
        ip, port = key.dst
        sock = await self.new_socket(ip)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.sock_connect(sock, (ip, port))
        except TimeoutError:
            sock.close()
            raise PoolError(
                "connection timed out, maybe a NetworkPolicy is blocking HBONE port 15008",
                "NETWORK_POLICY",
            ) from None
        except OSError as e:
            sock.close()
            raise PoolError(f"io error: {e.strerror} (os error {e.errno})", "CONNECT") from e
        max_streams = self.config.pool_max_streams_per_connection
        try:
            _, proto = await loop.create_connection(
                lambda: HBONEClientProtocol(self, key, max_streams, self.settings),
                sock=sock,
                ssl=self.contexts.client(cert),
                server_hostname="",
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            )
        except (ssl.SSLError, OSError, TimeoutError) as e:
            sock.close()
            raise PoolError(f"tls handshake failed: {e}", "TLS_FAILURE") from e
        if proto.error is not None:
            raise PoolError(proto.error, proto.error_flag)
        self.handshakes += 1
        return proto

    def idle(self, conn: HBONEClientProtocol) -> None:
        if conn.idle_handle is None and not conn.closed:
            timeout = self.config.pool_unused_release_timeout
            conn.idle_handle = asyncio.get_running_loop().call_later(timeout, self._evict, conn)

    def _evict(self, conn: HBONEClientProtocol) -> None:
        conn.idle_handle = None
        if conn.legs:
            return
        self.remove(conn)
        conn.close()

    def remove(self, conn: HBONEClientProtocol) -> None:
        conns = self.conns.get(conn.key)
        if conns is not None and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.conns[conn.key]

    def connection_count(self) -> int:
        return sum(len(c) for c in self.conns.values())

    def close(self) -> None:
        for conns in tuple(self.conns.values()):
            for conn in tuple(conns):
                conn.close()
        self.conns.clear()
