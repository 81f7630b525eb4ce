"""Network-namespace helpers: fd validation and identity (any user), setns and the executor (root).

The root tests make anonymous namespaces with unshare(2) on a throwaway thread and hold
them by fd only: nothing is named, so nothing can be left behind.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import socket
import struct
import sys
import threading
from collections.abc import Iterator

import pytest

from ztunnel import netns

pytestmark = pytest.mark.timeout(20)

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="creating network namespaces needs root (CI runs as root)"
)

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def _new_netns() -> int:
    """An fd for a fresh network namespace (loopback up), made on a thread that then exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[int | BaseException] = []

    def make() -> None:
        try:
            if libc.unshare(netns.CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            _loopback_up()
            out.append(netns.current_netns_fd())
        except BaseException as e:
            out.append(e)

    t = threading.Thread(target=make)
    t.start()
    t.join(10)
    if isinstance(out[0], BaseException):
        raise out[0]
    return out[0]


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        ifr = bytearray(struct.pack("16sH14x", b"lo", 0))
        fcntl.ioctl(s, SIOCGIFFLAGS, ifr)
        flags = struct.unpack_from("H", ifr, 16)[0]
        struct.pack_into("H", ifr, 16, flags | IFF_UP)
        fcntl.ioctl(s, SIOCSIFFLAGS, ifr)


def _inode(link: str) -> int:
    # "net:[4026531840]"
    return int(link.split("[", 1)[1].rstrip("]"))


@pytest.fixture
def pod_netns() -> Iterator[int]:
    fd = _new_netns()
    yield fd
    os.close(fd)


# --- any user -----------------------------------------------------------------------------------


def test_own_netns_fd_is_valid_and_identified() -> None:
    fd = netns.current_netns_fd()
    try:
        netns.validate(fd)
        st = os.stat("/proc/self/ns/net")
        assert netns.netns_id(fd) == (st.st_dev, st.st_ino) == netns.current_netns_id()
    finally:
        os.close(fd)


@pytest.mark.parametrize("path", [__file__, "/dev/null", "/proc/self/cmdline"])
def test_regular_file_is_not_a_netns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(netns.NetnsError, match="not a network namespace"):
            netns.validate(fd)
    finally:
        os.close(fd)


def test_pipe_and_socket_are_not_a_netns() -> None:
    r, w = os.pipe()
    s = socket.socket()
    try:
        for fd in (r, w, s.fileno()):
            with pytest.raises(netns.NetnsError, match="not a network namespace"):
                netns.validate(fd)
    finally:
        os.close(r)
        os.close(w)
        s.close()


def test_namespace_of_another_type_is_not_a_netns() -> None:
    fd = os.open("/proc/self/ns/mnt", os.O_RDONLY)
    try:
        with pytest.raises(netns.NetnsError, match="another type"):
            netns.validate(fd)
    finally:
        os.close(fd)


def test_closed_fd_is_refused() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(netns.NetnsError, match="not open"):
        netns.validate(r)


def test_executor_refuses_a_non_netns_fd() -> None:
    r, w = os.pipe()
    try:
        with pytest.raises(netns.NetnsError):
            netns.NetnsExecutor(r)
    finally:
        os.close(r)
        os.close(w)


# --- root ---------------------------------------------------------------------------------------


@needs_root
def test_verify_setns_succeeds_as_root() -> None:
    netns.verify_setns()


@needs_root
def test_executor_runs_inside_the_netns_and_main_thread_stays(pod_netns: int) -> None:
    main_before = os.readlink("/proc/thread-self/ns/net")
    want = netns.netns_id(pod_netns)
    with netns.NetnsExecutor(pod_netns, name="pod-test") as ex:
        inside = ex.call(os.readlink, "/proc/thread-self/ns/net", timeout=5)
        again = ex.call(os.readlink, "/proc/thread-self/ns/net", timeout=5)
        assert ex.id == want
    assert _inode(inside) == want.ino == _inode(again)
    assert os.readlink("/proc/thread-self/ns/net") == main_before != inside


@needs_root
def test_executor_keeps_its_own_fd(pod_netns: int) -> None:
    dup = os.dup(pod_netns)
    ex = netns.NetnsExecutor(dup)
    os.close(dup)  # the caller's copy may go at once
    try:
        inside = ex.call(os.readlink, "/proc/thread-self/ns/net", timeout=5)
    finally:
        ex.close()
    assert _inode(inside) == netns.netns_id(pod_netns).ino


@needs_root
async def test_listener_created_by_the_executor_lives_in_the_pod(pod_netns: int) -> None:
    def listener() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        return s

    with netns.NetnsExecutor(pod_netns) as ex:
        srv = await ex.run(listener)
    with srv:
        port = srv.getsockname()[1]
        # From this (root netns) thread, the pod's loopback is another world.
        with (
            pytest.raises(ConnectionRefusedError),
            socket.create_connection(("127.0.0.1", port), 2),
        ):
            pass
        # A process that joins the pod netns reaches it.
        probe = (
            "import socket, sys; from ztunnel import netns; "
            "netns.enter(int(sys.argv[1])); "
            "socket.create_connection(('127.0.0.1', int(sys.argv[2])), 5).sendall(b'hi')"
        )
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-c", probe, str(pod_netns), str(port)),
            pass_fds=(pod_netns,),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, err
        srv.settimeout(5)
        conn, _ = srv.accept()
        with conn:
            assert conn.recv(2) == b"hi"


@needs_root
def test_entered_switches_and_returns(pod_netns: int) -> None:
    def work() -> tuple[str, str, str]:
        before = os.readlink("/proc/thread-self/ns/net")
        with netns.entered(pod_netns):
            inside = os.readlink("/proc/thread-self/ns/net")
        return before, inside, os.readlink("/proc/thread-self/ns/net")

    out: list[tuple[str, str, str]] = []
    t = threading.Thread(target=lambda: out.append(work()))
    t.start()
    t.join(5)
    before, inside, after = out[0]
    assert before == after != inside
    assert _inode(inside) == netns.netns_id(pod_netns).ino


@needs_root
def test_closed_executor_refuses_work(pod_netns: int) -> None:
    ex = netns.NetnsExecutor(pod_netns)
    ex.close()
    ex.close()  # idempotent
    with pytest.raises(netns.NetnsError, match="closed"):
        ex.submit(os.getpid)
