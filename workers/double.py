"""Double HBONE (upstream §9.9): an inner mTLS + HTTP/2 tunnel inside an outer pooled stream.

A destination on another network is reached through that network's gateway. The outer
tunnel is an ordinary pooled HBONE stream to the gateway, CONNECT `<service host>:<port>`.
Inside it, the inner tunnel is a TLS connection with the source workload's certificate,
verified against the service's SANs only, carrying HTTP/2 and one CONNECT with the same
authority plus `x-forwarded-network`. Inner tunnels are never pooled: one per connection.

The inner TLS bytes travel as the outer stream's DATA. uvloop cannot layer TLS over
anything but its own socket transports, so the standard library's `asyncio.sslproto`
SSLProtocol does the record work, between two small adapters: `_OverStream` is the
transport it writes through (into the outer stream's TunnelLeg), `_IntoTLS` the transport
that TunnelLeg delivers the outer stream's bytes to (the SSLProtocol's input). Each side's
close, EOF, reset and backpressure map onto the other's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import protocols, sslproto
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from workers.pool import HANDSHAKE_TIMEOUT, HBONEClientProtocol, Pool, PoolError, WorkloadKey
from workers.tunnel import TunnelLeg
from ztunnel.core import hbone as core

if TYPE_CHECKING:
    from ztunnel.core.ipc import WorkloadCertificate

log = logging.getLogger(__name__)

RESPONSE_TIMEOUT = 10.0
FORWARDED_NETWORK = "x-forwarded-network"


class _SSLProtocol(sslproto.SSLProtocol):
    # The standard library allocates max_size bytes of input buffer per connection (256 KiB);
    # two TLS records' worth is plenty, and inner tunnels are one per proxied connection.
    max_size = 32 * 1024


class InnerClientProtocol(HBONEClientProtocol):
    """The inner HTTP/2 connection: one stream, closed as soon as that stream is done."""

    response_baggage = core.Baggage()

    def on_event(self, ev: core.Event) -> None:
        if isinstance(ev, core.ResponseReceived):
            values = [v for k, v in ev.headers if k == "baggage"]
            if values:
                self.response_baggage = core.parse_baggage(",".join(values))
        super().on_event(ev)

    def on_stream_closed(self) -> None:
        if not self.legs and not self.closed:
            self.close()


class InnerTunnel:
    """One inner TLS connection riding an outer HBONE stream."""

    def __init__(
        self, pool: Pool, key: WorkloadKey, settings: core.H2Settings, context: ssl.SSLContext
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.outer_leg = TunnelLeg(self._outer_done)
        self.inner = InnerClientProtocol(pool, key, 1, settings)
        self.handshake: asyncio.Future[None] = loop.create_future()
        self._ssl: Any = _SSLProtocol(
            loop,
            self.inner,
            context,
            self.handshake,
            server_side=False,
            server_hostname=None,
            ssl_handshake_timeout=int(HANDSHAKE_TIMEOUT),
        )
        self._into_tls = _IntoTLS(self)
        self._over_stream = _OverStream(self)
        self.ssl_lost = False
        self.leg_lost = False
        self.on_done: Callable[[], None] | None = None

    def start(self) -> None:
        """The outer stream is answered: take its bytes, begin the inner handshake."""
        self.outer_leg.attach(self._into_tls)
        self._ssl.connection_made(self._over_stream)

    # -- the two directions ----------------------------------------------------------------

    def feed_tls(self, data: bytes) -> None:
        if not self.ssl_lost:
            protocols._feed_data_to_buffered_proto(self._ssl, data)  # type: ignore[attr-defined]

    def tls_eof(self) -> None:
        if not self.ssl_lost:
            self._ssl.eof_received()

    def pause_tls_output(self) -> None:
        if not self.ssl_lost:
            self._ssl.pause_writing()

    def resume_tls_output(self) -> None:
        if not self.ssl_lost:
            self._ssl.resume_writing()

    def lost(self, exc: Exception | None) -> None:
        """Both ends of the pipe are gone (soon after a close or abort, as transports do)."""
        if not self.ssl_lost:
            self.ssl_lost = True
            self._ssl.connection_lost(exc)
        if not self.leg_lost:
            self.leg_lost = True
            self.outer_leg.connection_lost(exc)

    def abort(self) -> None:
        self.outer_leg.abort()

    def _outer_done(self, _: TunnelLeg) -> None:
        if self.on_done is not None:
            self.on_done()


class _IntoTLS(asyncio.Transport):
    """The 'transport' of the outer stream's TunnelLeg: what it writes goes into the TLS."""

    def __init__(self, tunnel: InnerTunnel) -> None:
        super().__init__()
        self._t = tunnel
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._t.feed_tls(bytes(data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self._t.tls_eof()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._finish(None)

    def abort(self) -> None:
        self._finish(ConnectionResetError("inner tunnel aborted"))

    def _finish(self, exc: Exception | None) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._t.lost, exc)

    def pause_reading(self) -> None:  # the outer stream is full: the TLS must stop writing
        self._t.pause_tls_output()

    def resume_reading(self) -> None:
        self._t.resume_tls_output()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _OverStream(asyncio.Transport):
    """The transport of the SSLProtocol: TLS records become the outer stream's DATA."""

    def __init__(self, tunnel: InnerTunnel) -> None:
        super().__init__()
        self._t = tunnel
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing:
            self._t.outer_leg.data_received(bytes(data))

    def close(self) -> None:
        """TLS is shut down: END_STREAM on the outer stream, then the pipe is gone."""
        if not self._closing:
            self._closing = True
            self._t.outer_leg.eof_received()
            asyncio.get_running_loop().call_soon(self._t.lost, None)

    def abort(self) -> None:
        if not self._closing:
            self._closing = True
            self._t.abort()

    def _force_close(self, exc: BaseException | None) -> None:
        self.abort()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:  # TLS has enough input: withhold the outer stream's credit
        self._t.outer_leg.pause_writing()

    def resume_reading(self) -> None:
        self._t.outer_leg.resume_writing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def open_double(
    pool: Pool,
    *,
    outer_key: WorkloadKey,
    inner_key: WorkloadKey,
    cert: WorkloadCertificate,
    authority: str,
    headers: list[tuple[str, str]],
    network: str,
    leg: TunnelLeg,
) -> tuple[InnerTunnel, int]:
    """Outer stream, inner handshake, inner CONNECT; the inner status (0: no answer).

    PoolError when the outer connection or the inner TLS cannot be had. On a non-200 the
    tunnel is already torn down.
    """
    outer = await pool.checkout(outer_key, cert)
    tunnel = InnerTunnel(pool, inner_key, pool.settings, pool.contexts.client(cert))
    status = await _answer(lambda cb: outer.open(authority, headers, tunnel.outer_leg, cb))
    if status != 200:
        tunnel.abort()
        raise PoolError(f"gateway answered {status or 'nothing'}", "CONNECT")
    tunnel.start()
    try:
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            await tunnel.handshake
    except (OSError, TimeoutError) as e:
        tunnel.abort()
        why = str(e) or type(e).__name__
        raise PoolError(f"inner tls handshake failed: {why}", "TLS_FAILURE") from e
    inner = tunnel.inner
    if inner.error is not None:
        tunnel.abort()
        raise PoolError(inner.error, inner.error_flag)
    inner_headers = [*headers, (FORWARDED_NETWORK, network)]
    status = await _answer(lambda cb: inner.open(authority, inner_headers, leg, cb))
    if status != 200:
        tunnel.abort()
    return tunnel, status


async def _answer(send: Callable[[Callable[[int], None]], None]) -> int:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_response(status: int) -> None:
        if not fut.done():
            fut.set_result(status)

    send(on_response)
    try:
        async with asyncio.timeout(RESPONSE_TIMEOUT):
            return await fut
    except TimeoutError:
        return 0
