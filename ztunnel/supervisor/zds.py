"""ZDS client: pods and their netns fds from the istio-cni node agent (shared/in-pod mode).

Upstream: src/inpod/workloadmanager.rs, protocol.rs, statemanager.rs; reference §14.
ztunnel connects to INPOD_UDS (AF_UNIX SOCK_SEQPACKET), says `ZdsHello{V1}`, then answers
every request with an ack. Adds start a per-pod proxy through the `PodHandler` (which
forwards the fd to the workers); `SnapshotSent` drops proxies of pods that were not
re-sent since the connection began; after it, Del stops a proxy at once.

Readiness: `readiness_pending(True)` from the start, on every disconnect and while a
proxy is pending; `readiness_pending(False)` once the snapshot is in and nothing is
pending (upstream's "workload proxy manager" task).

Deliberate differences from upstream:
* A protocol error (Keep after the snapshot, a second snapshot, Add without
  workload_info) is NACKed and the connection dropped, then re-established with backoff;
  upstream exits the process with status 1, which would take every pod's proxy with it.
* Every reconnect waits (10 ms doubling to 15 s, ±20 % jitter; reset by a snapshot), so a
  node agent that keeps sending garbage cannot spin us.
* An Add whose fd is not a network namespace is NACKed as a start failure and not retried:
  upstream only logs `validate_ns` and would retry the unusable fd every 5 s forever
  (ztunnel#1284). The connection is kept and the pod is not pending.
* A zero-length packet reads as end of stream, as upstream's recvmsg loop does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from collections.abc import Callable
from typing import NamedTuple, Protocol

from ztunnel import fdchannel
from ztunnel.core import zds
from ztunnel.core.config import WorkloadInfo
from ztunnel.netns import NetnsError, NetnsID, netns_id, validate

log = logging.getLogger(__name__)

READINESS_TASK = "workload proxy manager"  # upstream's readiness task name
MAX_FDS = 8  # room to count (then close) extra fds; more still set MSG_CTRUNC


class PodHandler(Protocol):
    """What ZDS drives: the supervisor's per-pod proxy bookkeeping."""

    async def add(self, uid: str, info: WorkloadInfo, netns_fd: int) -> None:
        """Start the proxy for pod `uid`; raise to NACK with `failure to start proxy : …`.

        `netns_fd` is borrowed for the duration of the call: `os.dup` it to keep it (the
        kernel duplicates it anyway when it is sent to a worker). The client closes its copy.
        """
        ...

    async def delete(self, uid: str) -> None:
        """Stop the proxy of pod `uid` at once (upstream drains it with DrainMode::Immediate)."""
        ...

    def known(self) -> set[str]:
        """The uids whose proxies are running."""
        ...


class _Pending(NamedTuple):
    info: WorkloadInfo
    fd: int  # owned by the client until the retry succeeds or the pod goes
    id: NetnsID


class ZDSClient:
    def __init__(
        self,
        path: str,
        handler: PodHandler,
        *,
        readiness_pending: Callable[[bool], None],
        rng: Callable[[], float] = random.random,
        retry_interval: float = zds.PENDING_RETRY,
    ) -> None:
        self.path = path
        self.handler = handler
        self._readiness_pending = readiness_pending
        self._rng = rng
        self._retry_interval = retry_interval
        self._backoff = zds.ReconnectBackoff()
        self._state = zds.SnapshotState()
        self._ids: dict[str, NetnsID] = {}  # netns of each proxy this client started
        self._pending: dict[str, _Pending] = {}
        self._retry_at: float | None = None
        self._not_ready: bool | None = None
        self.connections = 0  # completed hellos, for logs and tests

    @property
    def ready(self) -> bool:
        return self._state.ready

    @property
    def pending(self) -> frozenset[str]:
        return self._state.pending

    async def run(self) -> None:
        """Connect, serve, reconnect: forever, until cancelled."""
        self._set_not_ready(True)
        try:
            while True:
                sock = await self._connect()
                try:
                    await self._serve_connection(sock)
                    log.info("node agent closed the ZDS connection")
                except (OSError, zds.ZdsError) as e:
                    log.warning("ZDS connection ended: %s", e)
                finally:
                    sock.close()
                    self._disconnected()
                await asyncio.sleep(self._backoff.next_delay(self._rng()))
        finally:
            self._clear_pending()

    # -- connection -----------------------------------------------------------------------------

    async def _connect(self) -> socket.socket:
        while True:
            try:
                return await _connect_seqpacket(self.path)
            except OSError as e:
                delay = self._backoff.next_delay(self._rng())
                log.warning(
                    "failed to connect to the Istio CNI node agent over %s, is the node agent "
                    "healthy? details: %s. retrying in %.3fs",
                    self.path,
                    e,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _serve_connection(self, sock: socket.socket) -> None:
        self._state.on_connect()
        await fdchannel.asend_packet(sock, zds.encode_hello())
        self.connections += 1
        log.info("connected to the node agent at %s", self.path)
        while True:
            packet = await self._recv(sock)
            if not packet.data and not packet.fds and not packet.truncated:
                return  # end of stream
            req = zds.parse_request(packet.data, packet.fds, truncated=packet.truncated)
            if isinstance(req, zds.ZdsError):
                zds.close_fds(packet.fds)
                log.error("bad ZDS message: %s", req)
                await self._send_ack(sock, req.ack_error)
                raise req
            error = await self._handle(req)
            self._check_ready()
            if isinstance(error, zds.ZdsError):
                await self._send_ack(sock, error.ack_error)
                raise error
            await self._send_ack(sock, error)

    async def _recv(self, sock: socket.socket) -> fdchannel.Packet:
        """The next packet; meanwhile retries pending proxies every `retry_interval`."""
        loop = asyncio.get_running_loop()
        while True:
            if self._retry_at is None:
                return await fdchannel.recv_packet(sock, zds.MAX_MESSAGE, MAX_FDS)
            try:
                # recv_packet consumes nothing until recvmsg succeeds: safe to time out.
                async with asyncio.timeout_at(self._retry_at):
                    return await fdchannel.recv_packet(sock, zds.MAX_MESSAGE, MAX_FDS)
            except TimeoutError:
                pass
            self._retry_at = None
            await self._retry_pending()
            if self._pending:
                self._retry_at = loop.time() + self._retry_interval
            self._check_ready()

    async def _send_ack(self, sock: socket.socket, error: str) -> None:
        await fdchannel.asend_packet(sock, zds.encode_ack(error))

    def _disconnected(self) -> None:
        # Upstream clears pending on the next connection (reset_snapshot): the snapshot
        # re-sends every pod, with a fresh fd.
        self._clear_pending()
        self._set_not_ready(True)

    # -- requests ---------------------------------------------------------------------------------

    async def _handle(self, req: zds.Request) -> str | zds.ZdsProtocolError:
        """The ack error ("" = ACK), or a protocol error that ends the connection."""
        match req:
            case zds.AddWorkload(uid=uid, info=info, netns_fd=fd):
                try:
                    return await self._on_add(uid, info, fd)
                finally:
                    os.close(fd)
            case zds.KeepWorkload(uid=uid):
                log.info("pod keep received, uid=%s", uid)
                return self._state.on_keep(uid) or ""
            case zds.DelWorkload(uid=uid):
                log.info("pod delete request, uid=%s", uid)
                self._drop_pending(uid)
                if self._state.on_del(uid):
                    await self._delete(uid)
                return ""
            case zds.SnapshotSent():
                drain = self._state.on_snapshot(self.handler.known())
                if isinstance(drain, zds.ZdsProtocolError):
                    return drain
                log.info("snapshot received; removing %d pods not re-sent", len(drain))
                for uid in sorted(drain):
                    await self._delete(uid)
                self._backoff.reset()
                return ""

    async def _on_add(self, uid: str, info: WorkloadInfo, fd: int) -> str:
        log.info(
            "pod received, starting proxy, uid=%s name=%s namespace=%s",
            uid,
            info.name,
            info.namespace,
        )
        self._state.on_add(uid)
        try:
            validate(fd)
            nid = netns_id(fd)
        except (NetnsError, OSError) as e:
            log.error("pod %s: unusable netns fd: %s", uid, e)
            return zds.start_failure(str(e))
        self._drop_pending(uid)  # the latest Add wins
        return await self._add(uid, info, fd, nid)

    async def _add(self, uid: str, info: WorkloadInfo, fd: int, nid: NetnsID) -> str:
        if uid in self.handler.known():
            if self._ids.get(uid) == nid:
                self._state.on_started(uid)
                return ""  # idempotent: same pod, same netns
            # A new sandbox (netns) for the same pod: replace the proxy (statemanager.rs).
            log.info("pod %s has a new netns, replacing its proxy", uid)
            await self._delete(uid)
        try:
            await self.handler.add(uid, info, fd)
        except Exception as e:  # the handler's failure is the NACK
            log.error("failed to start proxy for pod %s: %s", uid, e)
            self._keep_pending(uid, info, fd, nid)
            return zds.start_failure(str(e) or type(e).__name__)
        self._ids[uid] = nid
        self._state.on_started(uid)
        return ""

    async def _delete(self, uid: str) -> None:
        self._ids.pop(uid, None)
        if uid not in self.handler.known():
            return
        try:
            await self.handler.delete(uid)
        except Exception:  # a stuck pod must not end the ZDS connection
            log.exception("failed to stop proxy for pod %s", uid)

    # -- pending ----------------------------------------------------------------------------------

    def _keep_pending(self, uid: str, info: WorkloadInfo, fd: int, nid: NetnsID) -> None:
        self._state.on_failed(uid)
        try:
            kept = os.dup(fd)
        except OSError as e:
            log.error("pod %s: cannot keep its netns fd for a retry: %s", uid, e)
            return
        self._drop_pending(uid)
        self._pending[uid] = _Pending(info, kept, nid)
        if self._retry_at is None:
            self._retry_at = asyncio.get_running_loop().time() + self._retry_interval

    async def _retry_pending(self) -> None:
        items, self._pending = self._pending, {}
        for uid, p in items.items():
            log.info("retrying proxy for pod %s", uid)
            try:
                await self._add(uid, p.info, p.fd, p.id)
            finally:
                os.close(p.fd)

    def _drop_pending(self, uid: str) -> None:
        p = self._pending.pop(uid, None)
        if p is not None:
            os.close(p.fd)

    def _clear_pending(self) -> None:
        for uid in list(self._pending):
            self._drop_pending(uid)
        self._retry_at = None

    # -- readiness --------------------------------------------------------------------------------

    def _check_ready(self) -> None:
        self._set_not_ready(not self._state.ready)

    def _set_not_ready(self, value: bool) -> None:
        if value != self._not_ready:
            self._not_ready = value
            log.debug("workload proxy manager is %s", "NOT ready" if value else "ready")
            self._readiness_pending(value)


async def _connect_seqpacket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.setblocking(False)
        try:
            sock.connect(path)
        except (BlockingIOError, InterruptedError):
            # A full backlog: writable once connected, then SO_ERROR says how it went.
            await fdchannel.wait_io(sock, write=True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err)) from None
    except BaseException:
        sock.close()
        raise
    return sock
