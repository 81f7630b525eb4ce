"""The supervisor -> worker fd channel: headers, bounds, and fds that work on the other side."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Iterator

import msgspec
import pytest

from ztunnel import fdchannel
from ztunnel.fdchannel import PodAcked, PodAdded, PodRemoved

pytestmark = pytest.mark.timeout(20)

ADDED = PodAdded(
    uid="6f1c",
    name="web",
    namespace="default",
    service_account="web-sa",
    netns_id=(4, 4026532000),
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    parent, child = fdchannel.pair()
    child.setblocking(False)
    yield parent, child
    parent.close()
    child.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("msg", [ADDED, PodRemoved(uid="6f1c"), PodAcked(uid="6f1c", error="")])
def test_headers_round_trip(msg: fdchannel.Message) -> None:
    assert fdchannel.decode(fdchannel.encode(msg)) == msg


def test_header_of_another_schema_is_refused() -> None:
    raw = msgspec.msgpack.encode({"t": "pod_removed", "uid": "u", "schema": 2})
    with pytest.raises(fdchannel.FdChannelError, match="schema 2"):
        fdchannel.decode(raw)


@pytest.mark.parametrize("raw", [b"", b"\xc1", msgspec.msgpack.encode({"t": "nope"})])
def test_undecodable_header_is_refused(raw: bytes) -> None:
    with pytest.raises(fdchannel.FdChannelError):
        fdchannel.decode(raw)


async def test_fd_arrives_usable_with_its_header(pair: tuple[socket.socket, socket.socket]) -> None:
    parent, child = pair
    r, w = os.pipe()
    try:
        fdchannel.send(parent, fdchannel.encode(ADDED), [w])
        header, fds = await fdchannel.recv(child)
    finally:
        os.close(w)
    assert fdchannel.decode(header) == ADDED
    assert len(fds) == 1 and fds[0] != w
    assert os.get_inheritable(fds[0]) is False  # MSG_CMSG_CLOEXEC
    os.write(fds[0], b"through the passed fd")
    os.close(fds[0])
    assert os.read(r, 100) == b"through the passed fd"
    os.close(r)


async def test_both_directions_and_no_fds(pair: tuple[socket.socket, socket.socket]) -> None:
    parent, child = pair
    await fdchannel.asend(child, fdchannel.encode(PodAcked(uid="u", error="bind failed")))
    header, fds = await fdchannel.recv(parent)
    assert fds == [] and fdchannel.decode(header) == PodAcked(uid="u", error="bind failed")


def test_send_refuses_oversized_headers_and_too_many_fds(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent, _ = pair
    with pytest.raises(fdchannel.FdChannelError, match="exceeds"):
        fdchannel.send(parent, b"x" * (fdchannel.MAX_HEADER + 1))
    with pytest.raises(fdchannel.FdChannelError, match="fds exceed"):
        fdchannel.send(parent, b"h", [0] * (fdchannel.MAX_FDS + 1))


@pytest.mark.parametrize(
    ("size", "nfds"),
    [(fdchannel.MAX_HEADER + 1, 1), (10, fdchannel.MAX_FDS + 3)],
    ids=["oversized header", "too many fds"],
)
async def test_truncated_packets_raise_and_close_every_fd(
    pair: tuple[socket.socket, socket.socket], size: int, nfds: int
) -> None:
    parent, child = pair
    fd = os.open("/dev/null", os.O_RDONLY)
    before = _fd_count()
    # Bypass send()'s own bounds, as a buggy or hostile peer would.
    parent.sendmsg(
        [b"x" * size], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * nfds))]
    )
    with pytest.raises(fdchannel.FdChannelError, match="truncated"):
        await fdchannel.recv(child)
    assert _fd_count() == before
    os.close(fd)


async def test_peer_close_is_channel_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    parent, child = pair
    parent.close()
    with pytest.raises(fdchannel.ChannelClosed):
        await fdchannel.recv(child)


async def test_recv_waits_without_blocking_the_loop_and_survives_cancel(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    parent, child = pair
    waiting = asyncio.create_task(fdchannel.recv(child))
    await asyncio.sleep(0.02)  # the loop keeps running while recv waits
    assert not waiting.done()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    fdchannel.send(parent, fdchannel.encode(PodRemoved(uid="a")))
    header, _ = await asyncio.wait_for(fdchannel.recv(child), 2)
    assert fdchannel.decode(header) == PodRemoved(uid="a")


async def test_asend_waits_for_room(pair: tuple[socket.socket, socket.socket]) -> None:
    parent, child = pair
    header = fdchannel.encode(PodRemoved(uid="x" * 1000))
    sent = 0
    while True:
        try:
            fdchannel.send(parent, header)
        except BlockingIOError:
            break
        sent += 1
    late = asyncio.create_task(fdchannel.asend(parent, header))
    await asyncio.sleep(0.02)
    assert not late.done()
    for _ in range(sent + 1):
        await fdchannel.recv(child)
    await asyncio.wait_for(late, 2)


WORKER = """
import asyncio, os, sys
from ztunnel import fdchannel
sock = fdchannel.from_fd(int(sys.argv[1]))
async def main():
    header, fds = await fdchannel.recv(sock)
    msg = fdchannel.decode(header)
    os.write(fds[0], f"{msg.uid} served in pid {os.getpid()}".encode())
    os.close(fds[0])
    await fdchannel.asend(sock, fdchannel.encode(fdchannel.PodAcked(uid=msg.uid)))
asyncio.run(main())
"""


async def test_worker_end_passed_with_pass_fds_receives_usable_fds() -> None:
    parent, child = fdchannel.pair()
    r, w = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            str(child.fileno()),
            pass_fds=(child.fileno(),),
            stderr=subprocess.PIPE,
        )
        child.close()  # the worker has its own copy
        fdchannel.send(parent, fdchannel.encode(ADDED), [w])
        os.close(w)
        header, _ = await asyncio.wait_for(fdchannel.recv(parent), 10)
        assert fdchannel.decode(header) == PodAcked(uid=ADDED.uid)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, err
        assert os.read(r, 200) == f"{ADDED.uid} served in pid {proc.pid}".encode()
    finally:
        os.close(r)
        parent.close()
