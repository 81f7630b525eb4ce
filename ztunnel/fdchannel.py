"""Supervisor <-> worker fd channel: pod netns fds over AF_UNIX SOCK_SEQPACKET (SCM_RIGHTS).

ZeroMQ cannot carry descriptors (DESIGN §1), so each worker gets one socketpair end from
the supervisor. Every packet is one msgspec-encoded header, plus up to `MAX_FDS` fds:

    supervisor -> worker   PodAdded (+ the pod's netns fd), PodRemoved
    worker -> supervisor   PodAcked (a per-pod proxy started, or why not)

Wiring (supervisor side):

    parent, child = fdchannel.pair()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers", ..., "--fd-channel", str(child.fileno()),
        pass_fds=(child.fileno(),))       # pass_fds clears close-on-exec in the child only
    child.close()                          # the worker holds its own copy now

and in the worker `sock = fdchannel.from_fd(args.fd_channel)`. A restarted worker gets a
fresh pair and a `PodAdded` for every pod the supervisor still runs. The kernel installs
a new descriptor in the receiver for every fd sent, so the sender keeps (and later
closes) its own; the receiver owns what `recv` returns.

The socket helpers here (`recv_packet`, `send_packet`) are also the ZDS client's.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

from ztunnel.core.errors import ZtunnelError

SCHEMA_VERSION = 1
MAX_HEADER = 4096  # bytes per packet; headers are a few hundred bytes
MAX_FDS = 4  # descriptors per packet; PodAdded carries one
_FD_SIZE = array.array("i").itemsize


class FdChannelError(ZtunnelError):
    """A packet that cannot be used (too big, truncated, undecodable); its fds are closed."""

    reason = "fdchannel"


class ChannelClosed(FdChannelError):
    """The peer closed its end (a worker or the supervisor went away)."""

    reason = "fdchannel_closed"


# --- messages -----------------------------------------------------------------------------------


class _Msg(msgspec.Struct, frozen=True, kw_only=True, tag_field="t"):
    schema: int = SCHEMA_VERSION


class PodAdded(_Msg, frozen=True, kw_only=True, tag="pod_added"):
    """Serve pod `uid` inside the netns sent with this header (exactly one fd)."""

    uid: str
    name: str
    namespace: str
    service_account: str
    netns_id: tuple[int, int]  # (st_dev, st_ino), ztunnel.netns.NetnsID


class PodRemoved(_Msg, frozen=True, kw_only=True, tag="pod_removed"):
    """Stop serving pod `uid` at once (DelWorkload drains immediately); no fd."""

    uid: str


class PodAcked(_Msg, frozen=True, kw_only=True, tag="pod_acked"):
    """Worker -> supervisor: the proxy for `uid` is up (error "") or could not start."""

    uid: str
    error: str = ""


Message = PodAdded | PodRemoved | PodAcked

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(header: bytes) -> Message:
    """Raises FdChannelError for bytes that are not a message of this schema."""
    try:
        msg: Message = _decoder.decode(header)
    except msgspec.DecodeError as e:
        raise FdChannelError(f"undecodable fd channel header: {e}") from None
    if msg.schema != SCHEMA_VERSION:
        raise FdChannelError(f"fd channel schema {msg.schema}, expected {SCHEMA_VERSION}")
    return msg


# --- sockets ------------------------------------------------------------------------------------


def pair() -> tuple[socket.socket, socket.socket]:
    """(supervisor end, worker end). Both close-on-exec: pass the worker's with `pass_fds`."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent.setblocking(False)
    return parent, child


def from_fd(fd: int) -> socket.socket:
    """The worker's end from the inherited fd number, non-blocking and close-on-exec."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fd)
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class Packet:
    """One received packet. `data == b""` with no fds is end-of-stream on SEQPACKET."""

    data: bytes
    fds: list[int]
    truncated: bool  # MSG_TRUNC or MSG_CTRUNC: payload or fds were cut by the kernel


async def recv_packet(sock: socket.socket, max_bytes: int, max_fds: int) -> Packet:
    """Receive one packet from a non-blocking socket without blocking the loop.

    Uses MSG_CMSG_CLOEXEC so no received fd can leak into a process we exec. Room is made
    for `max_fds` descriptors; more make the kernel set MSG_CTRUNC (and close the rest).
    """
    ancbuf = socket.CMSG_SPACE(max_fds * _FD_SIZE)
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(max_bytes, ancbuf, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await wait_io(sock, write=False)
            continue
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                whole = len(cdata) - len(cdata) % _FD_SIZE
                fds.extend(array.array("i", cdata[:whole]))
        truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
        return Packet(data=data, fds=fds, truncated=truncated)


def send_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one packet now; raises BlockingIOError if a non-blocking socket is full."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


async def asend_packet(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one packet, waiting for room in the socket buffer without blocking the loop."""
    while True:
        try:
            send_packet(sock, data, fds)
            return
        except (BlockingIOError, InterruptedError):
            await wait_io(sock, write=True)


async def wait_io(sock: socket.socket, *, write: bool) -> None:
    """Wait until a non-blocking socket is readable (or writable) on the running loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    if write:
        loop.add_writer(fd, _wake, fut)
    else:
        loop.add_reader(fd, _wake, fut)
    try:
        await fut
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _check(header: bytes, fds: Sequence[int]) -> None:
    if len(header) > MAX_HEADER:
        raise FdChannelError(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
    if len(fds) > MAX_FDS:
        raise FdChannelError(f"{len(fds)} fds exceed {MAX_FDS} per packet")


def send(sock: socket.socket, header: bytes, fds: Sequence[int] = ()) -> None:
    """Send a header and fds (the caller keeps its own fds). BlockingIOError if full."""
    _check(header, fds)
    send_packet(sock, header, fds)


async def asend(sock: socket.socket, header: bytes, fds: Sequence[int] = ()) -> None:
    """`send`, waiting for room in the socket buffer."""
    _check(header, fds)
    await asend_packet(sock, header, fds)


async def recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The next (header, fds); the caller owns the fds.

    Raises ChannelClosed at end of stream and FdChannelError for a truncated packet; in
    both cases any fds that came with it are closed first.
    """
    packet = await recv_packet(sock, MAX_HEADER, MAX_FDS)
    if packet.truncated:
        close_fds(packet.fds)
        raise FdChannelError("truncated fd channel packet")
    if not packet.data:
        close_fds(packet.fds)
        raise ChannelClosed("fd channel closed by peer")
    return packet.data, packet.fds


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
