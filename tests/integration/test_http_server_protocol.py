"""The HTTP/1.1 server under the admin ports: keep-alive, timeouts, limits, drain, binding."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from ztunnel.supervisor.http import (
    HEADER_READ_TIMEOUT,
    MAX_BODY_BYTES,
    MAX_HEADER_BYTES,
    HTTPServer,
    Request,
    Response,
    Routes,
)
from ztunnel.supervisor.metrics import build_registry, metrics_routes
from ztunnel.supervisor.readiness import Readiness, readiness_routes

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


async def call(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """http.client is blocking; the server runs on this loop, so the client gets a thread."""
    return await asyncio.to_thread(_request, port, method, path, headers)


@asynccontextmanager
async def serving(routes: Routes, **kwargs: float) -> AsyncIterator[tuple[HTTPServer, int]]:
    server = HTTPServer(routes, "test", **kwargs)
    port = await server.start(HOST, 0)
    try:
        yield server, port
    finally:
        await server.close(grace=1.0)


async def echo(req: Request) -> Response:
    payload = {"method": req.method, "query": dict(req.query), "headers": dict(req.headers)}
    payload["body"] = req.body.decode()
    return Response(200, json.dumps(payload).encode(), "application/json")


async def test_requests_reach_handlers_parsed() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reply = await call(port, "GET", "/echo?level=debug&reset&x=a%20b", {"X-Thing": "One"})
    got = json.loads(reply.body)
    assert got["query"] == {"level": "debug", "reset": "", "x": "a b"}
    assert got["headers"]["x-thing"] == "One"
    assert got["method"] == "GET"


def test_default_limits_match_upstream() -> None:
    assert HEADER_READ_TIMEOUT == 2.0
    assert MAX_HEADER_BYTES == 8192


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    def two_requests(port: int) -> tuple[int, int, bool]:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        conn.request("POST", "/echo", body=b"first")
        first = conn.getresponse()
        first.read()
        sock = conn.sock
        conn.request("GET", "/echo")
        second = conn.getresponse()
        second.read()
        same = conn.sock is sock and sock is not None
        conn.close()
        return first.status, second.status, same

    async with serving({"/echo": echo}) as (_, port):
        assert await asyncio.to_thread(two_requests, port) == (200, 200, True)


async def read_until_eof(reader: asyncio.StreamReader, limit: float) -> bytes:
    async with asyncio.timeout(limit):
        return await reader.read()


async def test_slow_header_client_is_cut_after_the_timeout() -> None:
    async with serving({"/echo": echo}, header_timeout=0.3) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        started = time.monotonic()
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        data = await read_until_eof(reader, 5)
        elapsed = time.monotonic() - started
        writer.close()
    assert data == b""
    assert 0.25 <= elapsed < 3


async def test_silent_client_is_cut_after_the_timeout() -> None:
    async with serving({"/echo": echo}, header_timeout=0.3) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        assert await read_until_eof(reader, 5) == b""
        writer.close()


async def test_oversized_header_is_rejected_with_431() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
        data = await read_until_eof(reader, 5)
        writer.close()
    assert data.startswith(b"HTTP/1.1 431 ")
    assert b"connection: close" in data.lower()


async def test_malformed_request_is_rejected_with_400() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        data = await read_until_eof(reader, 5)
        writer.close()
    assert data.startswith(b"HTTP/1.1 400 ")


async def test_head_gets_headers_without_body() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reply = await call(port, "HEAD", "/echo")
    assert reply.status == 200 and reply.body == b""
    assert int(reply.headers["content-length"]) > 0


async def test_close_finishes_in_flight_requests() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def slow(_: Request) -> Response:
        entered.set()
        await release.wait()
        return Response.text(200, "done\n")

    server = HTTPServer({"/slow": slow}, "test")
    port = await server.start(HOST, 0)
    pending = asyncio.ensure_future(call(port, "GET", "/slow"))
    await asyncio.wait_for(entered.wait(), 5)
    closing = asyncio.ensure_future(server.close(grace=5))
    await asyncio.sleep(0.05)
    assert not closing.done()
    with pytest.raises(OSError):
        await asyncio.open_connection(HOST, port)
    release.set()
    reply = await asyncio.wait_for(pending, 5)
    await asyncio.wait_for(closing, 5)
    assert (reply.status, reply.text) == (200, "done\n")
    assert reply.headers["connection"] == "close"


async def test_close_drops_idle_keep_alive_connections() -> None:
    server = HTTPServer({"/echo": echo}, "test")
    port = await server.start(HOST, 0)
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.wait_for(server.close(grace=5), 2)
    rest = await read_until_eof(reader, 5)
    writer.close()
    assert b'"method": "GET"' in rest


async def test_handler_errors_become_500_with_the_error_text() -> None:
    async def broken(_: Request) -> Response:
        raise ValueError("no such thing")

    async with serving({"/broken": broken}) as (_, port):
        reply = await call(port, "GET", "/broken")
    assert (reply.status, reply.body) == (500, b"no such thing")


async def test_port_in_use_is_an_os_error() -> None:
    holder = socket.socket()
    holder.bind((HOST, 0))
    holder.listen()
    try:
        server = HTTPServer({}, "test")
        with pytest.raises(OSError):
            await server.start(HOST, holder.getsockname()[1])
        assert server.addresses == []
    finally:
        holder.close()


async def test_all_hosts_share_the_picked_port() -> None:
    server = HTTPServer({"/echo": echo}, "test")
    port = await server.start([HOST, "127.0.0.2"], 0)
    try:
        assert sorted(server.addresses) == [(HOST, port), ("127.0.0.2", port)]
        reply = await call(port, "GET", "/echo")
        assert reply.status == 200
    finally:
        await server.close()


async def test_oversized_chunked_body_is_rejected_with_413() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"b" * 65536
        for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        writer.write(b"0\r\n\r\n")
        data = await read_until_eof(reader, 5)
        writer.close()
    assert data.startswith(b"HTTP/1.1 413 ")


async def test_header_just_under_the_limit_is_served() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reply = await call(port, "GET", "/echo", {"X-Big": "a" * 7000})
    assert reply.status == 200


async def test_oversized_header_sent_in_pieces_is_rejected() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(5):
            writer.write(b"a" * 4000)
            await writer.drain()
        data = await read_until_eof(reader, 5)
        writer.close()
    assert data.startswith(b"HTTP/1.1 431 ")


async def test_oversized_body_is_rejected_with_413() -> None:
    async with serving({"/echo": echo}) as (_, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        size = MAX_BODY_BYTES + 1
        writer.write(f"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        data = await read_until_eof(reader, 5)
        writer.close()
    assert data.startswith(b"HTTP/1.1 413 ")


async def metrics_and_readiness_scenario() -> None:
    routes = {**metrics_routes(build_registry("1.24.0")), **readiness_routes(Readiness())}
    async with serving(routes) as (_, port):
        metrics = await call(port, "GET", "/metrics", {"Accept-Encoding": "gzip"})
        ready = await call(port, "GET", "/healthz/ready")
    assert (metrics.status, ready.status) == (200, 200)
    assert b"istio_build{" in gzip.decompress(metrics.body)


@pytest.mark.parametrize(
    "scenario",
    [
        metrics_and_readiness_scenario,
        test_keep_alive_serves_two_requests_on_one_connection,
        test_slow_header_client_is_cut_after_the_timeout,
        test_oversized_header_sent_in_pieces_is_rejected,
        test_close_finishes_in_flight_requests,
        test_close_drops_idle_keep_alive_connections,
    ],
    ids=lambda f: f.__name__,
)
def test_scenarios_also_run_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
