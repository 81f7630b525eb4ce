"""A network (east-west) gateway for double-HBONE tests, written without the product's code.

An HBONE server on plain `ssl` + `h2`: it terminates the outer tunnel (mutual TLS with its
own workload certificate, a client certificate from the same roots required) and pipes each
CONNECT stream's bytes to one fixed `upstream`, the destination node's 15008, as Istio's
east-west gateway does for `<service host>:<port>` authorities. It records what it saw:
`accepted` TLS connections, the CONNECT `requests` (headers), each client's `peer_certs`.

Its event loop runs on a thread of its own; `prepare` runs first on that thread (the netns
tests pass a function that enters the gateway node's namespace, so the listener and the
upstream sockets live there).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from ztunnel.core.ipc import WorkloadCertificate

TIMEOUT = 5.0  # seconds to start or stop the gateway's event loop


class HBONEGateway:
    def __init__(
        self,
        cert: WorkloadCertificate,
        *,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.load_verify_locations(cadata="".join(cert.roots_pem))
        with tempfile.TemporaryDirectory() as d:
            chain, key = Path(d, "chain.pem"), Path(d, "key.pem")
            chain.write_text("".join(cert.chain_pem))
            key.write_text(cert.key_pem)
            self.context.load_cert_chain(str(chain), str(key))
        self.context.set_alpn_protocols(["h2"])
        self.upstream = upstream
        self.requests: list[dict[str, str]] = []
        self.peer_certs: list[Any] = []
        self.accepted = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._prepared: list[BaseException | None] = []
        self._thread = threading.Thread(
            target=self._run, args=(prepare,), daemon=True, name="gateway"
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(listen), self._loop).result(TIMEOUT)

    def _run(self, prepare: Callable[[], None] | None) -> None:
        try:
            if prepare is not None:
                prepare()
        except BaseException as e:  # reported by _start, on the caller's thread
            self._prepared.append(e)
        else:
            self._prepared.append(None)
        self._loop.run_forever()

    async def _start(self, listen: tuple[str, int]) -> None:
        if self._prepared[0] is not None:
            raise self._prepared[0]
        self._server = await asyncio.start_server(self._serve, *listen, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.peer_certs.append(writer.get_extra_info("peercert"))
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        upstreams: dict[int, asyncio.StreamWriter] = {}
        pumps: set[asyncio.Task[None]] = set()

        async def pump(sid: int, up: asyncio.StreamReader) -> None:
            with contextlib.suppress(ConnectionError, h2.exceptions.H2Error):
                while chunk := await up.read(16384):
                    conn.send_data(sid, chunk)
                    writer.write(conn.data_to_send())
                conn.end_stream(sid)
                writer.write(conn.data_to_send())

        try:
            while data := await reader.read(65536):
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        self.requests.append({str(k): str(v) for k, v in ev.headers})
                        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
                        upstreams[ev.stream_id] = up_writer
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                        task = asyncio.get_running_loop().create_task(pump(ev.stream_id, up_reader))
                        pumps.add(task)
                    elif isinstance(ev, h2.events.DataReceived):
                        up = upstreams.get(ev.stream_id)
                        if up is not None:
                            up.write(ev.data)
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamEnded):
                        up = upstreams.get(ev.stream_id)
                        if up is not None and up.can_write_eof():
                            up.write_eof()
                    elif isinstance(ev, h2.events.StreamReset):
                        up = upstreams.pop(ev.stream_id, None)
                        if up is not None:
                            up.close()
                writer.write(conn.data_to_send())
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            for task in pumps:
                task.cancel()
            for up in upstreams.values():
                up.close()
            writer.close()

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(TIMEOUT)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()
