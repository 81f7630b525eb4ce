"""HBONE over HTTP/2: the sans-IO client and server cores (bytes in, events out).

One HTTP/2 CONNECT stream per proxied TCP connection, many streams on one mutual-TLS
connection (upstream `src/proxy/h2/client.rs`, `src/proxy/h2/server.rs`,
`src/proxy/inbound.rs`). The shared machinery is in `hbone_connection`; per-stream buffers
and credit in `hbone_streams`; frame limits in `hbone_frames`; header values in
`hbone_headers`. Importing this module patches hyperframe's frame repr (see
`hbone_connection`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import h2.events as h2e
from h2.errors import ErrorCodes
from h2.exceptions import NoAvailableStreamIDError, NoSuchStreamError

from ztunnel.core.errors import ZtunnelError
from ztunnel.core.hbone_connection import PHASES, HBONEConnection, Phase
from ztunnel.core.hbone_events import (
    ConnectionTerminated,
    ConnectRequested,
    DataReceived,
    Event,
    H2Settings,
    RequestRejected,
    ResponseReceived,
    SettingsChanged,
    StreamEnded,
    StreamReset,
    StreamWritable,
)
from ztunnel.core.hbone_headers import (
    Baggage,
    TraceParent,
    baggage_header,
    encode_headers,
    format_authority,
    forwarded_header,
    parse_authority,
    parse_baggage,
    parse_connect_head,
    parse_forwarded_host,
    parse_response_head,
)

__all__ = [
    "Baggage",
    "ConnectRequested",
    "ConnectionTerminated",
    "DataReceived",
    "Event",
    "H2Settings",
    "HBONEClient",
    "HBONEConnection",
    "HBONEServer",
    "RequestRejected",
    "ResponseReceived",
    "SettingsChanged",
    "StreamEnded",
    "StreamReset",
    "StreamUnavailable",
    "StreamWritable",
    "TraceParent",
    "baggage_header",
    "format_authority",
    "forwarded_header",
    "parse_authority",
    "parse_baggage",
    "parse_forwarded_host",
]

_STATUS_200 = (b":status", b"200")


class StreamUnavailable(ZtunnelError):
    """open_stream on a connection that is draining, dead or at its stream limit."""

    reason = "stream_unavailable"


class HBONEClient(HBONEConnection):
    """Client end: opens CONNECT streams, at most min(pool limit, peer's limit) at a time."""

    client_side = True

    def __init__(self, settings: H2Settings, *, max_streams: int | None = None) -> None:
        """`max_streams`: the pool's per-connection limit (default: max_concurrent_streams)."""
        super().__init__(settings)
        self.max_streams = settings.max_concurrent_streams if max_streams is None else max_streams

    def available_streams(self) -> int:
        """How many more streams may be opened now (0 once draining or dead)."""
        if self._phase is not Phase.OPEN:
            return 0
        peer_limit = self._h2.remote_settings.max_concurrent_streams
        return max(0, min(self.max_streams, peer_limit) - self._book.open)

    def open_stream(self, authority: str, headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send `CONNECT authority` with `headers` (baggage, forwarded, traceparent, ...)."""
        if self.available_streams() <= 0:
            raise StreamUnavailable(f"no stream available ({self._phase.value})")
        if parse_authority(authority) is None:
            raise ValueError(f"invalid HBONE authority {authority!r}")
        block = [(b":method", b"CONNECT"), (b":authority", authority.encode("ascii"))]
        block += encode_headers(headers)
        try:
            stream_id = self._h2.get_next_available_stream_id()
        except NoAvailableStreamIDError as e:  # 2^30 streams on one connection
            self._phase = PHASES[(self._phase, "goaway")]
            raise StreamUnavailable("stream ids exhausted") from e
        self._h2.send_headers(stream_id, block)
        self._book.add(stream_id, answered=True)
        return stream_id

    def _on_response(self, ev: h2e.ResponseReceived, events: list[Event]) -> None:
        sid = ev.stream_id
        if sid not in self._book.streams:
            return
        head = parse_response_head(ev.headers or ())
        if head is None:
            self.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            events.append(StreamReset(sid, ErrorCodes.PROTOCOL_ERROR, False))
            return
        events.append(ResponseReceived(sid, head[0], head[1]))


class HBONEServer(HBONEConnection):
    """Server end: validates CONNECT requests; the glue answers with `respond`."""

    client_side = False

    def respond(self, stream_id: int, status: int, headers: Sequence[tuple[str, str]] = ()) -> None:
        """200 opens the tunnel; any other status ends the stream."""
        st = self._book.streams.get(stream_id)
        if st is None or self._phase is Phase.DEAD:
            return
        block = [_STATUS_200 if status == 200 else (b":status", b"%d" % status)]
        block += encode_headers(headers)
        if st.answered:
            raise ValueError(f"stream {stream_id} already answered")
        st.answered = True
        try:
            if status == 200:
                self._h2.send_headers(stream_id, block)
                if st.out or st.end_pending:  # the upstream spoke (or closed) first
                    self._book.push(st, self._deferred)
                return
            self._book.pop(stream_id)
            self._send_error(stream_id, block)
        except NoSuchStreamError:
            self._forget(stream_id)

    def _send_error(self, stream_id: int, block: list[tuple[bytes, bytes]]) -> None:
        # RFC 9113 §8.1: a complete response, then RST_STREAM(NO_ERROR) so the client stops
        # sending. h2 raises StreamClosedError when the client already reset the stream in
        # the read being handled, or (for the reset) had already ended its side.
        with contextlib.suppress(NoSuchStreamError):
            self._h2.send_headers(stream_id, block, end_stream=True)
            self._h2.reset_stream(stream_id, ErrorCodes.NO_ERROR)

    def _on_request(self, ev: h2e.RequestReceived, events: list[Event]) -> None:
        sid = ev.stream_id
        # After our GOAWAY every new stream is above its last_stream_id.
        if self._phase is not Phase.OPEN or self._book.open >= self.settings.max_concurrent_streams:
            with contextlib.suppress(NoSuchStreamError):
                self._h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        head = parse_connect_head(ev.headers or ())
        if isinstance(head, str):
            self._send_error(sid, [(b":status", b"400")])
            events.append(RequestRejected(sid, 400, head))
            return
        self._book.add(sid, answered=False)
        self._batch_new.add(sid)
        events.append(ConnectRequested(sid, head[0], head[1]))
