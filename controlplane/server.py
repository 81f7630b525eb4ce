"""The control plane's one gRPC server: delta xDS and the Istio CA on one TLS port, as istiod.

`start()` brings it up inside the running event loop and returns a handle with the bound port,
so tests can run it in-process on `127.0.0.1:0`; `python -m controlplane` runs it standalone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc

from controlplane import ca_server
from controlplane.tls import Root
from controlplane.xds_server import XDSServer
from ztunnel.gen import xds_pb2_grpc

log = logging.getLogger(__name__)

# Clients ping every 30 s (upstream's HTTP/2 keepalive); gRPC servers by default answer pings
# without data more often than every 5 minutes with GOAWAY "too_many_pings".
SERVER_OPTIONS = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_receive_message_length", 16 << 20),
)


@dataclass(slots=True)
class ControlPlane:
    """A running control plane: its gRPC server, the services and where it listens."""

    server: grpc.aio.Server
    xds: XDSServer
    ca: ca_server.CAService | None
    port: int
    root_pem: bytes
    _watch: asyncio.Task[None]

    async def stop(self, grace: float | None = 1.0) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch
        await self.server.stop(grace)


async def start(
    config_path: str | None,
    *,
    ca_dir: str,
    listen: str = "127.0.0.1:15012",
    require_token: str | None = None,
    trust_domain: str = "cluster.local",
    with_ca: bool = True,
) -> ControlPlane:
    """Serve `config_path` (LOCAL_XDS YAML) over delta xDS, plus the CA unless `with_ca=False`.

    Raises ConfigError for an invalid config, RuntimeError if `listen` cannot be bound.
    """
    root = Root.open(ca_dir)
    serving = root.issue_serving()
    xds = XDSServer(config_path, require_token=require_token)
    xds.load()
    server = grpc.aio.server(options=SERVER_OPTIONS)
    xds_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(xds, server)
    ca = None
    if with_ca:
        ca = ca_server.register(
            server, ca_dir=ca_dir, trust_domain=trust_domain, require_token=require_token
        )
    credentials = grpc.ssl_server_credentials([(serving.key_pem, serving.cert_pem)])
    port = server.add_secure_port(listen, credentials)
    if port == 0:  # older gRPC releases report a failed bind this way instead of raising
        raise RuntimeError(f"failed to bind {listen}")
    await server.start()
    watch = asyncio.get_running_loop().create_task(xds.watch(), name="controlplane-config-watch")
    watch.add_done_callback(_log_crash)
    host = listen.rpartition(":")[0]
    log.info("control plane listening on %s:%d (xDS%s)", host, port, ", CA" if with_ca else "")
    return ControlPlane(server, xds, ca, port, serving.root_pem, watch)


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task %s failed", task.get_name(), exc_info=exc)
