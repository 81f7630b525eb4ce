"""Network namespaces for end-to-end tests: "nodes" joined by veth pairs, always removed.

A `Network` creates namespaces named `zte2e-<pid>-<label>` (so a later run can tell whose
they are), joins them with veth pairs on benchmark/TEST-NET addresses only, runs commands
and processes inside them with `ip netns exec`, and runs Python callables inside them on
threads that entered the namespace with setns(2). Sockets keep the namespace they were
created in, so a client socket made on such a thread is usable from any thread afterwards.

Cleanup runs from the fixture finalizer and again from `atexit`; namespaces left behind by
runs whose process is gone are removed when the next run starts (`remove_stale`).
Upstream's equivalent is `src/test_helpers/linux.rs` + `netns.rs` (inventory §17.2).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

ROOT_PREFIX = "zte2e-"
PREFIX = f"{ROOT_PREFIX}{os.getpid()}-"
CMD_TIMEOUT = 15.0  # seconds for one `ip` / `iptables` command
CALL_TIMEOUT = 30.0  # seconds for one callable run inside a namespace
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000  # linux/sched.h

# Never a real network: RFC 2544 benchmarking (198.18.0.0/15) and RFC 5737 TEST-NETs.
ALLOWED_RANGES = tuple(
    ipaddress.ip_network(n)
    for n in ("198.18.0.0/15", "192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)

_STALE = re.compile(rf"^{re.escape(ROOT_PREFIX)}(\d+)-")
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """A namespace command failed; carries the command and its stderr."""


def ip_binary() -> str | None:
    return shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None
    )


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = CMD_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    done = subprocess.run(
        list(argv),
        env=None if env is None else {**os.environ, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _ip(*args: str, check: bool = True) -> str:
    binary = ip_binary()
    if binary is None:
        raise NetnsError("no `ip` command (iproute2)")
    return _run([binary, *args], check=check)


# ---------------------------------------------------------------------------------------------
# Availability and stale cleanup


_availability: list[str | None] = []


def unavailable() -> str | None:
    """Why namespace tests cannot run here (None if they can); probed once per process."""
    if not _availability:
        _availability.append(_probe())
    return _availability[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "namespace tests need root to create network namespaces (run as root, as CI does)"
    if ip_binary() is None:
        return "namespace tests need the `ip` command (iproute2; scripts/test installs it)"
    remove_stale()
    name = f"{PREFIX}probe"
    try:
        _ip("netns", "add", name)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as e:
        return f"`ip netns add` does not work here: {e}"
    _ip("netns", "del", name, check=False)
    return None


def list_namespaces() -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(os.listdir(NETNS_DIR))
    return []


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def remove_stale() -> list[str]:
    """Delete `zte2e-<pid>-*` namespaces whose creating process no longer exists.

    Only the names are removed; the kernel frees each namespace once nothing uses it.
    """
    removed = []
    for name in list_namespaces():
        match = _STALE.match(name)
        if match is not None and not _pid_alive(int(match.group(1))):
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


# ---------------------------------------------------------------------------------------------
# One namespace


def enter(name: str) -> None:
    """Move the calling OS thread into namespace `name` (setns(2); Python 3.11 lacks os.setns)."""
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Netns:
    """A network namespace: commands, processes and Python callables inside it."""

    def __init__(self, name: str, label: str) -> None:
        self.name = name
        self.label = label
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self.closed = False

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"

    # -- commands and processes ---------------------------------------------------------------

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        binary = ip_binary()
        assert binary is not None
        return [binary, "netns", "exec", self.name, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = CMD_TIMEOUT,
        env: Mapping[str, str] | None = None,
    ) -> str:
        """Run a command inside the namespace to completion; its stdout. `env` adds to ours."""
        return _run(self.exec_argv(argv), check=check, timeout=timeout, env=env)

    def popen(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the namespace, in a process group of its own.

        `ip netns exec` execs the command, so the Popen pid is the command's: the group it
        leads is killed when the namespace closes.
        """
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(
            self.exec_argv(argv),
            env=dict(env) if env is not None else None,
            start_new_session=True,
            **kwargs,
        )
        with self._lock:
            self._procs.append(proc)
        return proc

    def iptables(self, *args: str) -> str:
        return self.run("iptables", "-w", "5", *args)

    def ss(self, *args: str) -> str:
        return self.run("ss", *args)

    def add_address(self, dev: str, cidr: str) -> None:
        _check_allowed(cidr)
        _ip("-n", self.name, "addr", "add", cidr, "dev", dev)

    # -- Python inside the namespace ----------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
        """Run `fn(*args)` on a thread inside this namespace and return its result."""
        return self.submit(fn, *args).result(timeout)

    def submit(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        with self._lock:
            if self.closed:
                raise NetnsError(f"{self.name} is closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=16,
                    thread_name_prefix=f"netns-{self.label}",
                    initializer=enter,
                    initargs=(self.name,),
                )
            pool = self._pool
        return pool.submit(fn, *args)

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what was started inside, stop the threads, delete the namespace (idempotent)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            procs, self._procs = self._procs, []
            pool, self._pool = self._pool, None
        for proc in procs:
            _kill_group(proc)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        _ip("netns", "del", self.name, check=False)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _check_allowed(cidr: str) -> None:
    addr = ipaddress.ip_interface(cidr).ip
    if not any(addr in net for net in ALLOWED_RANGES):
        raise NetnsError(f"{cidr} is outside the benchmark/TEST-NET ranges tests may use")


# ---------------------------------------------------------------------------------------------
# A set of namespaces and the links between them


_live: set[Network] = set()
_live_lock = threading.Lock()


class Network:
    """Namespaces and veth links created for one test; `close()` removes them all."""

    def __init__(self) -> None:
        self.namespaces: list[Netns] = []
        self._links = 0
        with _live_lock:
            _live.add(self)

    def node(self, label: str) -> Netns:
        """A fresh namespace with loopback up."""
        if unavailable() is not None:
            raise NetnsError(unavailable())
        name = f"{PREFIX}{label}-{len(self.namespaces)}-{id(self) & 0xFFFF:x}"
        _ip("netns", "add", name)
        ns = Netns(name, label)
        self.namespaces.append(ns)
        _ip("-n", name, "link", "set", "lo", "up")
        return ns

    def link(self, a: Netns, a_cidr: str, b: Netns, b_cidr: str) -> tuple[str, str]:
        """A veth pair between `a` and `b`, addressed and up; returns (a's ifname, b's).

        Both ends are created directly inside their namespaces, so a crash never leaves an
        interface behind in the root namespace.
        """
        _check_allowed(a_cidr)
        _check_allowed(b_cidr)
        self._links += 1
        a_if, b_if = f"ve{self._links}-{b.label}"[:15], f"ve{self._links}-{a.label}"[:15]
        _ip(
            *("link", "add", a_if, "netns", a.name, "type", "veth"),
            *("peer", "name", b_if, "netns", b.name),
        )
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            _ip("-n", ns.name, "addr", "add", cidr, "dev", ifname)
            _ip("-n", ns.name, "link", "set", ifname, "up")
        return a_if, b_if

    def close(self) -> None:
        for ns in reversed(self.namespaces):
            ns.close()
        with _live_lock:
            _live.discard(self)

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


@atexit.register
def _close_all() -> None:
    """A run interrupted past its finalizers still removes what it created."""
    with _live_lock:
        networks = list(_live)
    for network in networks:
        with contextlib.suppress(Exception):
            network.close()
    for name in list_namespaces():
        if name.startswith(PREFIX):
            _ip("netns", "del", name, check=False)
