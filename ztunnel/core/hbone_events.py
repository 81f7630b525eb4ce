"""Events the HBONE connection core emits, and the HTTP/2 settings it is built with."""

from __future__ import annotations

from dataclasses import dataclass

from ztunnel.core.hbone_headers import Headers

_MAX_WINDOW = (1 << 31) - 1


@dataclass(frozen=True, slots=True, kw_only=True)
class H2Settings:
    """HTTP/2 parameters of one HBONE connection (upstream `src/proxy/h2/{client,server}.rs`).

    Sizes in bytes, times in seconds. Built by the caller from `Config.http2_*`.
    `max_concurrent_streams` is what a server advertises and, on a client, the local pool
    limit per connection (`POOL_MAX_STREAMS_PER_CONNECTION`, upstream 100).
    `max_send_buffer` is the per-stream high-water mark of flow-control-blocked bytes at which
    the glue pauses the stream's source (upstream: client = stream window, server 400 KiB);
    StreamWritable comes once the buffer is back under a quarter of it.
    """

    frame_size: int = 1 << 20  # HTTP2_FRAME_SIZE, upstream 1 MiB
    stream_window: int = 4 << 20  # HTTP2_STREAM_WINDOW_SIZE, upstream 4 MiB
    connection_window: int = 16 << 20  # HTTP2_CONNECTION_WINDOW_SIZE, upstream 16 MiB
    max_concurrent_streams: int = 200  # server: upstream max_concurrent_streams(200)
    max_header_list_size: int = 64 << 10  # server 64 KiB, client 16 KiB
    max_send_buffer: int = 400 << 10  # server 400 KiB (hyper's default), client 4 MiB
    ping_interval: float = 10.0  # upstream PING_INTERVAL
    ping_timeout: float = 20.0  # upstream PING_TIMEOUT

    def __post_init__(self) -> None:
        if not 1 << 14 <= self.frame_size < 1 << 24:
            raise ValueError(f"frame_size {self.frame_size} outside 16384..16777215")
        for name in ("stream_window", "connection_window"):
            if not 65535 <= getattr(self, name) <= _MAX_WINDOW:
                raise ValueError(f"{name} outside 65535..2^31-1")
        if self.max_concurrent_streams < 1 or self.max_send_buffer < 1:
            raise ValueError("max_concurrent_streams and max_send_buffer must be positive")
        if self.ping_interval <= 0 or self.ping_timeout <= 0:
            raise ValueError("ping_interval and ping_timeout must be positive")

    @classmethod
    def client(
        cls,
        *,
        frame_size: int = 1 << 20,
        stream_window: int = 4 << 20,
        connection_window: int = 16 << 20,
        max_streams: int = 100,
    ) -> H2Settings:
        """Upstream's client builder: pool limit as stream limit, 16 KiB header list."""
        return cls(
            frame_size=frame_size,
            stream_window=stream_window,
            connection_window=connection_window,
            max_concurrent_streams=max_streams,
            max_header_list_size=16 << 10,
            max_send_buffer=stream_window,
        )

    @classmethod
    def server(
        cls,
        *,
        frame_size: int = 1 << 20,
        stream_window: int = 4 << 20,
        connection_window: int = 16 << 20,
    ) -> H2Settings:
        """Upstream's server builder: 200 streams, 64 KiB header list, 400 KiB send buffer."""
        return cls(
            frame_size=frame_size, stream_window=stream_window, connection_window=connection_window
        )


@dataclass(frozen=True, slots=True)
class ConnectRequested:
    """Server: a well-formed CONNECT arrived; answer with `respond`."""

    stream_id: int
    authority: str
    headers: Headers


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """Server: the core itself answered a bad request (and the stream is gone)."""

    stream_id: int
    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """Client: the response head for a CONNECT; anything but 200 is a failed tunnel."""

    stream_id: int
    status: int
    headers: Headers


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Tunnel bytes; `acknowledge(stream_id, n)` once they are written onwards.

    Padding is credited on arrival, so `n` counts data bytes; acknowledging
    `flow_controlled_length` instead is harmless (clamped to what is outstanding).
    """

    stream_id: int
    data: bytes
    flow_controlled_length: int


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream (END_STREAM): shut down the write side onwards."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone (RST_STREAM either way, or its connection died): abort onwards."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """A stream's send buffer drained below the low-water mark: resume reading its source."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """No new streams on this connection. Streams that died with it got StreamReset first."""

    error_code: int
    last_stream_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class SettingsChanged:
    """The peer changed SETTINGS_MAX_CONCURRENT_STREAMS."""

    max_concurrent_streams: int


Event = (
    ConnectRequested
    | RequestRejected
    | ResponseReceived
    | DataReceived
    | StreamEnded
    | StreamReset
    | StreamWritable
    | ConnectionTerminated
    | SettingsChanged
)
