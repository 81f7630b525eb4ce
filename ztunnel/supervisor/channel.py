"""The supervisor's end of the state channel: PUB for sequenced updates, ROUTER for the rest.

Both sockets are ipc:// endpoints in a 0700 runtime directory, created with umask 077 so
only ztunnel's user can connect (hardening: never pickle, never world-writable sockets).
"""

from __future__ import annotations

import logging
import os

import msgspec
import zmq
import zmq.asyncio

from ztunnel.core import ipc
from ztunnel.core.errors import SchemaMismatch

log = logging.getLogger(__name__)

PUB_HWM = 100_000  # updates queued per slow worker before ZeroMQ drops (then: gap -> resync)


class StateChannel:
    def __init__(self, runtime_dir: str) -> None:
        self.runtime_dir = runtime_dir
        self.pub_endpoint = f"ipc://{runtime_dir}/state.pub"
        self.router_endpoint = f"ipc://{runtime_dir}/control.router"
        self._ctx = zmq.asyncio.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        old = os.umask(0o077)
        try:
            self._pub.bind(self.pub_endpoint)
            self._router.bind(self.router_endpoint)
        finally:
            os.umask(old)

    def publish(self, msg: ipc.Published) -> None:
        self._pub.send(ipc.encode(msg))

    def send(self, identity: bytes, msg: ipc.ToWorker) -> None:
        try:
            self._router.send_multipart((identity, ipc.encode(msg)), flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("worker %s not reading its control channel; message dropped", identity)

    async def recv(self) -> tuple[bytes, ipc.FromWorker]:
        """The next well-formed message from any worker; bad ones are logged and skipped."""
        while True:
            frames = await self._router.recv_multipart()
            if len(frames) != 2:
                log.warning("malformed control message with %d frames dropped", len(frames))
                continue
            try:
                return frames[0], ipc.decode_from_worker(frames[1])
            except (msgspec.DecodeError, SchemaMismatch) as e:
                log.warning("bad control message from %r dropped: %s", frames[0], e)

    def close(self) -> None:
        self._pub.close(linger=0)
        self._router.close(linger=0)
        self._ctx.term()
