"""Small HTTP/1.1 server (h11 over asyncio streams) behind the admin, stats and readiness ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from urllib.parse import parse_qsl, urlsplit

import h11

from ztunnel.telemetry import Unquoted

logger = logging.getLogger(__name__)

# Upstream `hyper_util::Server` builds its http1 connections with a 2 s header read timeout
# and an 8 KiB max buffer (reference §3.1).
HEADER_READ_TIMEOUT = 2.0  # seconds
MAX_HEADER_BYTES = 8 * 1024  # bytes
# Not in upstream (hyper keeps idle keep-alive connections forever); a bound stops idle
# clients from pinning sockets in the supervisor.
IDLE_TIMEOUT = 60.0  # seconds
# Admin requests carry no meaningful body; anything larger is refused with 413.
MAX_BODY_BYTES = 1024 * 1024  # bytes
# How long `close()` lets in-flight requests finish before cancelling them.
CLOSE_TIMEOUT = 5.0  # seconds
_READ_CHUNK = 64 * 1024
_LINGER = 1.0  # seconds spent discarding input after an error response


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request, as handlers see it."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]  # names lowercased; repeated headers joined with ", "
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Response:
    """What a handler returns; `content-length` and `date` are added by the server."""

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def text(cls, status: int, body: str) -> Response:
        """A `text/plain` response, like upstream's `plaintext_response`."""
        return cls(status, body.encode(), "text/plain")

    @classmethod
    def empty(cls, status: int) -> Response:
        """A response without body or content type, like upstream's `empty_response`."""
        return cls(status)


Handler = Callable[[Request], Awaitable[Response]]
Routes = Mapping[str, Handler]


class _ConnectionDone(Exception):
    """The peer went away, timed out or broke the protocol: close without answering more."""


class HTTPServer:
    """Serves `routes` (exact path match) on one port over one or more local addresses."""

    def __init__(
        self,
        routes: Routes,
        name: str,
        *,
        header_timeout: float = HEADER_READ_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.routes = routes
        self.name = name
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.closing = False
        self._servers: list[asyncio.Server] = []
        self._connections: set[_Connection] = set()

    async def start(self, host: str | list[str], port: int) -> int:
        """Bind every host on `port` (0 = pick one, shared by all hosts) and return the port.

        Hosts are literal addresses. asyncio binds IPv6 sockets with IPV6_V6ONLY, so `::`
        covers IPv6 only: list `0.0.0.0` too for both families. A bind failure propagates
        as `OSError` (EADDRINUSE: port already in use) after closing what was bound.
        """
        hosts = [host] if isinstance(host, str) else list(host)
        try:
            for h in hosts:
                server = await asyncio.start_server(self._accepted, h, port)
                self._servers.append(server)
                port = port or _bound_port(server)
        except OSError:
            await self._stop_listening()
            raise
        for address in self.addresses:
            fields = {"address": Unquoted(_format_address(address)), "component": self.name}
            logger.info("listener established", extra={"fields": fields})
        return port

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """(host, port) of every listening socket."""
        return [s.getsockname()[:2] for srv in self._servers for s in srv.sockets]

    async def close(self, grace: float = CLOSE_TIMEOUT) -> None:
        """Stop accepting, close idle connections and let in-flight requests finish.

        Requests still running after `grace` seconds are cancelled.
        """
        self.closing = True
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for conn in list(self._connections):
            conn.close_if_idle()
        await self._finish_connections(grace)
        # On Python >= 3.12 wait_closed() also waits for the connections, hence last.
        for server in servers:
            await server.wait_closed()

    async def _finish_connections(self, grace: float) -> None:
        tasks = [c.task for c in self._connections if c.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _stop_listening(self) -> None:
        servers, self._servers = self._servers, []
        for server in servers:
            server.close()
        for server in servers:
            await server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Connection(self, reader, writer)
        if self.closing:
            writer.close()
            return
        self._connections.add(conn)
        try:
            await conn.serve()
        finally:
            self._connections.discard(conn)

    async def dispatch(self, request: Request) -> Response:
        """Route one request; a handler exception becomes a 500 carrying its text (upstream)."""
        handler = self.routes.get(request.path)
        if handler is None:
            return Response.empty(404)
        try:
            return await handler(request)
        except Exception as exc:
            logger.warning(
                "%s: %s %s failed", self.name, request.method, request.path, exc_info=True
            )
            return Response(500, str(exc).encode())


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bound_port(server: asyncio.Server) -> int:
    port: int = server.sockets[0].getsockname()[1]
    return port


def _new_protocol() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(slots=True, eq=False)
class _Connection:
    """One accepted connection: a loop of request, dispatch, response over h11."""

    server: HTTPServer
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    protocol: h11.Connection = field(default_factory=_new_protocol)
    task: asyncio.Task[None] | None = None
    idle: bool = False

    def close_if_idle(self) -> None:
        # Closing our transport makes the pending read return EOF, which h11 turns into
        # ConnectionClosed; a connection busy with a request finishes it and then closes.
        if self.idle:
            self.writer.close()

    async def serve(self) -> None:
        self.task = asyncio.current_task()
        _set_nodelay(self.writer)
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + self.server.header_timeout
        try:
            await self._serve_requests(first_deadline)
        except _ConnectionDone:
            pass
        except (ConnectionError, TimeoutError) as exc:
            logger.debug("%s: connection closed: %r", self.server.name, exc)
        except Exception:
            logger.exception("%s: connection failed", self.server.name)
        finally:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def _serve_requests(self, first_deadline: float) -> None:
        deadline: float | None = first_deadline
        while True:
            head = await self._read_head(deadline)
            if head is None:
                return
            await self._handle(head)
            if self.protocol.our_state is h11.MUST_CLOSE or self.server.closing:
                return
            self.protocol.start_next_cycle()
            deadline = None

    async def _read_head(self, deadline: float | None) -> h11.Request | None:
        """Wait for the next request head; `deadline` None = keep-alive wait for a new one."""
        loop = asyncio.get_running_loop()
        wait_until = deadline if deadline is not None else loop.time() + self.server.idle_timeout
        if not self.protocol.trailing_data[0]:
            self.idle = True
            try:
                await self._receive(wait_until)
            finally:
                self.idle = False
        if deadline is None:
            deadline = loop.time() + self.server.header_timeout
        event = await self._next_event(deadline)
        if not isinstance(event, h11.Request):
            return None
        # h11 bounds only an incomplete head; a complete one that arrived in a single read
        # must respect the same limit (hyper's 8 KiB buffer covers both).
        if _head_size(event) > MAX_HEADER_BYTES:
            await self._reject(431, "Request Header Fields Too Large")
            raise _ConnectionDone
        return event

    async def _receive(self, deadline: float) -> None:
        async with asyncio.timeout_at(deadline):
            data = await self.reader.read(_READ_CHUNK)
        self.protocol.receive_data(data)

    async def _next_event(self, deadline: float) -> h11.Event:
        while True:
            try:
                event = self.protocol.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(exc.error_status_hint, str(exc))
                raise _ConnectionDone from exc
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:
                raise _ConnectionDone
            await self._receive(deadline)

    async def _handle(self, head: h11.Request) -> None:
        body = None if _declared_length(head) > MAX_BODY_BYTES else await self._read_body()
        if body is None:
            await self._reject(413, "request body too large")
            raise _ConnectionDone
        response = await self.server.dispatch(_request(head, body))
        await self._send(response, head.method == b"HEAD")

    async def _read_body(self) -> bytes | None:
        if self.protocol.they_are_waiting_for_100_continue:
            continue_ = h11.InformationalResponse(status_code=100, headers=[])
            await self._write(self.protocol.send(continue_) or b"")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.server.idle_timeout
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(deadline)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if not isinstance(event, h11.Data):
                raise _ConnectionDone
            size += len(event.data)
            if size > MAX_BODY_BYTES:
                return None
            chunks.append(bytes(event.data))

    async def _send(self, response: Response, head_only: bool) -> None:
        await self._write(self._encode(response, head_only=head_only, close=self.server.closing))

    async def _reject(self, status: int, reason: str) -> None:
        """Answer a request we will not serve, then the caller closes the connection."""
        logger.debug("%s: rejecting request with %d: %s", self.server.name, status, reason)
        if self.protocol.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = Response.text(status, f"{reason}\n")
        await self._write(self._encode(response, head_only=False, close=True))
        await self._linger()

    async def _linger(self) -> None:
        """Half-close, then discard what the client still sends for a moment.

        Closing with unread input makes the kernel answer with RST, which can destroy the
        error response before the client reads it.
        """
        if not self.writer.can_write_eof():
            return
        self.writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(_LINGER):
                while await self.reader.read(_READ_CHUNK):
                    pass

    def _encode(self, response: Response, *, head_only: bool, close: bool) -> bytes:
        headers = _response_headers(response, close=close)
        events: list[h11.Event] = [h11.Response(status_code=response.status, headers=headers)]
        if response.body and not head_only:
            events.append(h11.Data(data=response.body))
        events.append(h11.EndOfMessage())
        return b"".join(self.protocol.send(e) or b"" for e in events)

    async def _write(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def _head_size(head: h11.Request) -> int:
    """Bytes of the request head on the wire (request line, headers, blank line)."""
    line = len(head.method) + len(head.target) + len(b"  HTTP/1.1\r\n")
    return line + sum(len(n) + len(v) + 4 for n, v in head.headers) + 2


def _declared_length(head: h11.Request) -> int:
    for name, value in head.headers:
        if name == b"content-length":
            return int(value)  # h11 has validated it
    return 0


def _request(head: h11.Request, body: bytes) -> Request:
    target = head.target.decode("latin-1")
    parts = urlsplit(target)
    headers: dict[str, str] = {}
    for name, value in head.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return Request(
        method=head.method.decode("ascii"),
        path=parts.path or "/",
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers=headers,
        body=body,
    )


def _response_headers(response: Response, *, close: bool) -> list[tuple[str, str]]:
    headers = [("content-length", str(len(response.body)))]
    if response.content_type is not None:
        headers.append(("content-type", response.content_type))
    headers.append(("date", formatdate(usegmt=True)))
    headers.extend(response.headers)
    if close:
        headers.append(("connection", "close"))
    return headers
