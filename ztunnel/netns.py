"""Network namespaces: setns(2) for one thread, a thread that lives in a pod netns, fd checks.

In shared (in-pod) mode ztunnel serves each pod from inside the pod's network namespace:
its listeners and its outbound sockets must be *created* there (reference §14.3). A
socket keeps the namespace it was created in, whichever thread uses it afterwards, and
the namespace is a property of the OS thread (not the process). So a worker never
switches its event-loop thread; it gives each pod a `NetnsExecutor`, a single thread
that entered the pod netns once and creates sockets for the loop.

Python 3.11 has no `os.setns` (3.12 adds it), hence ctypes. Upstream: src/inpod/netns.rs
(`InpodNetns`, `NetnsID`) and src/inpod/protocol.rs (`validate_ns`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, TypeVar

from ztunnel.core.errors import ZtunnelError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000  # linux/sched.h
NS_GET_NSTYPE = 0xB703  # _IO(NSIO=0xb7, 0x3), linux/nsfs.h; Linux >= 4.11
NSFS_MAGIC = 0x6E736673  # linux/magic.h
THREAD_NETNS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int
_libc.fstatfs.argtypes = (ctypes.c_int, ctypes.c_void_p)
_libc.fstatfs.restype = ctypes.c_int
# struct statfs is 120 bytes on 64-bit Linux (84 on 32-bit); f_type, a long, comes first.
_STATFS_SIZE = 256


class NetnsError(ZtunnelError):
    """An fd that is not a network namespace, or a namespace that cannot be entered."""

    reason = "netns"


class NetnsID(NamedTuple):
    """A namespace's identity, (st_dev, st_ino) of its nsfs inode (upstream `NetnsID`).

    Two fds name the same namespace iff their ids are equal (cilium, vishvananda/netns).
    """

    dev: int
    ino: int


def netns_id(fd: int) -> NetnsID:
    st = os.fstat(fd)
    return NetnsID(st.st_dev, st.st_ino)


def current_netns_fd() -> int:
    """A new close-on-exec fd for the calling thread's network namespace."""
    return os.open(THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def current_netns_id() -> NetnsID:
    st = os.stat(THREAD_NETNS)
    return NetnsID(st.st_dev, st.st_ino)


def validate(fd: int) -> None:
    """Raise NetnsError unless `fd` is a network-namespace fd.

    NS_GET_NSTYPE answers on kernels >= 4.11; elsewhere (ENOTTY from an older nsfs) the
    filesystem must still be nsfs. Upstream's `validate_ns` also accepts procfs (namespace
    files before Linux 3.19), but that lets any /proc file through, and upstream only logs
    the result; here it gates the Add. A pipe, socket or regular file fails both checks.
    """
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError as e:
        if e.errno == errno.EBADF:
            raise NetnsError(f"fd {fd} is not open") from None
        magic = _fs_magic(fd)
        if magic != NSFS_MAGIC:
            raise NetnsError(
                f"fd {fd} is not a network namespace (filesystem 0x{magic:x})"
            ) from None
        return
    if nstype != CLONE_NEWNET:
        raise NetnsError(f"fd {fd} is a namespace of another type (0x{nstype:x})")


def _fs_magic(fd: int) -> int:
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"fstatfs(fd {fd}): {os.strerror(err)}")
    return ctypes.c_long.from_buffer(buf).value


def enter(fd: int) -> None:
    """Move the calling OS thread into the network namespace `fd` (setns(2)).

    Only this thread moves; other threads, and sockets created before, keep theirs.
    Needs CAP_SYS_ADMIN in the namespace's owning user namespace.
    """
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns(fd {fd}, CLONE_NEWNET): {os.strerror(err)}")


@contextlib.contextmanager
def entered(fd: int) -> Iterator[None]:
    """Run a block with the calling thread inside `fd`, then return it to where it was.

    Upstream's `InpodNetns::run`. Never use it on an event-loop thread: anything the loop
    creates meanwhile (a resolver socket, an accepted connection is fine) would land in
    the pod. Returning cannot fail short of a kernel bug; if it does, the thread is
    unusable, so the error propagates rather than leaving it in the pod silently.
    """
    home = current_netns_fd()
    try:
        enter(fd)
        try:
            yield
        finally:
            enter(home)
    finally:
        os.close(home)


def verify_setns() -> None:
    """Fail early without the privileges in-pod mode needs (upstream `verify_syscalls`)."""
    home = current_netns_fd()
    try:
        enter(home)  # a no-op switch that still needs CAP_SYS_ADMIN
    finally:
        os.close(home)


class NetnsExecutor:
    """A single thread living inside one network namespace, to create sockets there.

    The executor keeps its own duplicate of `netns_fd`: the caller may close its fd. The
    thread enters the namespace before its first job and never leaves, so every job runs
    there; a job that fails to enter raises NetnsError and the next job tries again.

        ex = NetnsExecutor(fd, name=f"pod-{uid}")
        sock = await ex.run(socket.socket, socket.AF_INET, socket.SOCK_STREAM)

    A socket created by a job may be used from any thread (the event loop) afterwards.
    """

    def __init__(self, netns_fd: int, *, name: str = "netns") -> None:
        validate(netns_fd)
        self._fd = os.dup(netns_fd)  # close-on-exec, like every fd Python creates
        self.id = netns_id(self._fd)
        self._entered = False
        self._lock = threading.Lock()
        self._closed = False
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    def __repr__(self) -> str:
        return f"NetnsExecutor(dev={self.id.dev}, ino={self.id.ino})"

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closed:
                raise NetnsError("netns executor is closed")
            return self._pool.submit(self._in_netns, fn, *args)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` inside the namespace without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        """Run `fn(*args)` inside the namespace and wait (never from an event loop)."""
        return self.submit(fn, *args).result(timeout)

    def _in_netns(self, fn: Callable[..., T], *args: Any) -> T:
        # Only the executor's one thread gets here, so `_entered` needs no lock.
        if not self._entered:
            enter(self._fd)
            self._entered = True
        return fn(*args)

    def close(self, *, wait: bool = True) -> None:
        """Stop the thread once queued jobs ran, then release the fd; `wait` blocks for it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # The last job closes the fd on the executor's own thread: no job can still be
            # about to enter the namespace with it.
            self._pool.submit(os.close, self._fd)
        self._pool.shutdown(wait=wait)

    def __enter__(self) -> NetnsExecutor:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
