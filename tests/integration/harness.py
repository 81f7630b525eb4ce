"""Runs the real `ztunnel` command on loopback and gives tests its logs, ports and workers.

Everything here blocks with an explicit deadline: the processes under test are real, so a
wait without one would turn a product hang into a hung test run.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = PROJECT_ROOT / "examples" / "localhost.yaml"

# scripts/run's embedded default: dedicated mode for `default/local`, no istiod, dev CA.
BASE_ENV: Mapping[str, str] = {
    "PROXY_MODE": "dedicated",
    "PROXY_WORKLOAD_INFO": "default/local/default",
    "FAKE_CA": "true",
    "XDS_ADDRESS": "",
    "LOCAL_XDS_PATH": str(EXAMPLE_CONFIG),
    "UNSTABLE_ENABLE_SOCKS5": "true",
}
# Only what the interpreter needs survives from the runner's environment: a stray
# LOG_LEVEL or ZTUNNEL_WORKERS in a developer's shell must not change what a test sees.
_INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV", "PYTHONHASHSEED")

# Stats (15020) and readiness (15021) bind the `::` wildcard; reach them over IPv6
# loopback. Their IPv4 reachability is a test of its own (test_supervisor).
WILDCARD_HOST = "::1"
LOCALHOST = "127.0.0.1"
# A loopback address no workload or service of examples/localhost.yaml uses (they hold
# 127.0.0.1 and 127.0.0.2): backends here are outside the mesh, reached by passthrough.
OUTSIDE_MESH = "127.0.0.3"

START_TIMEOUT = 15.0  # seconds for a cold start (interpreter + workers) to turn ready
IO_TIMEOUT = 5.0  # seconds for any single socket operation against the proxy


class HarnessError(AssertionError):
    """A wait ran past its deadline or the process did something the harness cannot use."""


def poll_until(
    probe: Callable[[], T | None], timeout: float, what: str, interval: float = 0.02
) -> T:
    """Call `probe` until it returns something other than None; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise HarnessError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Ports


@dataclass(frozen=True, slots=True)
class Ports:
    """The ports one ztunnel listens on, after env overrides."""

    outbound: int = 15001
    inbound_plaintext: int = 15006
    inbound: int = 15008
    socks5: int = 15080
    readiness: int = 15021
    admin: int = 15000
    stats: int = 15020

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Ports:
        proxy_config = json.loads(env.get("PROXY_CONFIG") or "{}")
        d = cls()
        return cls(
            outbound=int(env.get("ZTUNNEL_OUTBOUND_PORT", d.outbound)),
            inbound_plaintext=int(env.get("ZTUNNEL_INBOUND_PLAINTEXT_PORT", d.inbound_plaintext)),
            inbound=int(env.get("ZTUNNEL_INBOUND_PORT", d.inbound)),
            socks5=int(env.get("ZTUNNEL_SOCKS5_PORT", d.socks5)),
            readiness=int(env.get("ZTUNNEL_READINESS_PORT", d.readiness)),
            admin=int(proxy_config.get("proxyAdminPort", d.admin)),
            stats=int(proxy_config.get("statsPort", d.stats)),
        )

    def all(self) -> tuple[int, ...]:
        return (
            self.outbound,
            self.inbound_plaintext,
            self.inbound,
            self.socks5,
            self.readiness,
            self.admin,
            self.stats,
        )


def port_is_free(port: int) -> bool:
    """True if a dual-stack wildcard bind of `port` succeeds, as ztunnel's own probe does.

    SO_REUSEADDR (like ztunnel) so TIME_WAIT leftovers of earlier tests do not count; a
    listener on any local address of either family does.
    """
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return False
        raise
    finally:
        sock.close()
    return True


def wait_ports_free(ports: Iterable[int], timeout: float = 10.0) -> None:
    pending = list(ports)
    poll_until(
        lambda: True if all(port_is_free(p) for p in pending) else None,
        timeout,
        f"ports {pending} to be released",
        interval=0.05,
    )


# ---------------------------------------------------------------------------------------------
# Logs


@dataclass(frozen=True, slots=True)
class LogLine:
    """One output line, parsed when it is a ztunnel log record (plain or JSON)."""

    stream: str  # "stdout" or "stderr"
    text: str
    level: str = ""
    target: str = ""
    message: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)
    process: str = ""  # "supervisor" or "worker<i>"; JSON lines only

    @classmethod
    def parse(cls, stream: str, text: str) -> LogLine:
        if stream == "stdout" and text.startswith("{"):
            with contextlib.suppress(ValueError):
                return cls._from_json(text)
        if stream == "stdout" and text.count("\t") >= 2:
            return cls._from_plain(text)
        return cls(stream, text)

    @classmethod
    def _from_json(cls, text: str) -> LogLine:
        obj = json.loads(text)
        fields = {
            k: _json_text(v)
            for k, v in obj.items()
            if k not in ("level", "time", "scope", "message", "process")
        }
        return cls(
            "stdout",
            text,
            str(obj.get("level", "")),
            str(obj.get("scope", "")),
            str(obj.get("message", "")),
            fields,
            str(obj.get("process", "")),
        )

    @classmethod
    def _from_plain(cls, text: str) -> LogLine:
        # `<time>\t<level>\t<target>[\t<message>\t][<k=v ...>]`; quoted values escape tabs,
        # so the last tab separates the message from the fields.
        _, level, target, *rest = text.split("\t", 3)
        message, sep, field_text = (rest[0] if rest else "").rpartition("\t")
        if not sep:
            message, field_text = "", rest[0] if rest else ""
        return cls("stdout", text, level, target, message, _plain_fields(field_text))

    @property
    def timestamp(self) -> float | None:
        """The record's own wall-clock time (`time.time()` scale), if it has one."""
        if self.level == "":
            return None
        raw = json.loads(self.text)["time"] if self.text.startswith("{") else self.text[:27]
        try:
            return datetime.fromisoformat(raw).timestamp()
        except ValueError:
            return None

    def is_access(self, message: str = "connection complete") -> bool:
        return self.target == "access" and self.message == message


_PLAIN_FIELD = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|\S*)')


def _plain_fields(text: str) -> dict[str, str]:
    out = {}
    for key, raw in _PLAIN_FIELD.findall(text):
        out[key] = json.loads(raw) if raw.startswith('"') else raw
    return out


def _json_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class LogBuffer:
    """Lines of a process's stdout and stderr, appended by reader threads, waitable."""

    def __init__(self) -> None:
        self._lines: list[LogLine] = []
        self._cond = threading.Condition()
        self._open_streams = 0

    def follow(self, stream: IO[bytes], name: str) -> threading.Thread:
        with self._cond:
            self._open_streams += 1
        thread = threading.Thread(
            target=self._read, args=(stream, name), name=f"ztunnel-{name}", daemon=True
        )
        thread.start()
        return thread

    def _read(self, stream: IO[bytes], name: str) -> None:
        try:
            for raw in iter(stream.readline, b""):
                line = LogLine.parse(name, raw.decode("utf-8", "replace").rstrip("\n"))
                with self._cond:
                    self._lines.append(line)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._open_streams -= 1
                self._cond.notify_all()

    def lines(self) -> list[LogLine]:
        with self._cond:
            return list(self._lines)

    def find(self, predicate: Callable[[LogLine], bool]) -> list[LogLine]:
        return [line for line in self.lines() if predicate(line)]

    def wait_for(
        self, predicate: Callable[[LogLine], bool], timeout: float, what: str = "a log line"
    ) -> LogLine:
        """The first line (already seen or still to come) matching `predicate`."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self._lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self._lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._open_streams == 0:
                    break
                self._cond.wait(remaining)
        raise HarnessError(f"no {what} within {timeout:.1f}s; output:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        return "\n".join(f"[{line.stream}] {line.text}" for line in self.lines()[-n:])


# ---------------------------------------------------------------------------------------------
# HTTP and metrics


@dataclass(frozen=True, slots=True)
class HTTPReply:
    status: int
    body: str


def http_request(
    method: str, host: str, port: int, path: str, timeout: float = IO_TIMEOUT
) -> HTTPReply:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return HTTPReply(resp.status, resp.read().decode("utf-8", "replace"))
    finally:
        conn.close()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of exactly `name` in Prometheus text exposition."""
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match.group(1) != name:
            continue
        labels = {k: json.loads(f'"{v}"') for k, v in _LABEL.findall(match.group(2) or "")}
        yield labels, float(match.group(3))


def sum_samples(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for got, value in metric_samples(text, name)
        if all(got.get(k) == v for k, v in labels.items())
    )


# ---------------------------------------------------------------------------------------------
# /proc: worker processes and socket ownership


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                out.extend(int(p) for p in f.read().split())
    return out


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, process group) of a live pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2])


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode() for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def is_worker_cmdline(argv: list[str]) -> bool:
    return "-m" in argv and "workers" in argv and "--index" in argv


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of group `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is not None and stat[1] == pgid and stat[0] != "Z":
            members.append(int(entry))
    return members


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


@dataclass(frozen=True, slots=True)
class TCPEntry:
    local_port: int
    remote_port: int
    state: int
    inode: int


TCP_ESTABLISHED = 1
TCP_LISTEN = 10


def tcp_table() -> list[TCPEntry]:
    """Every TCP socket of this network namespace, from /proc/net/tcp and tcp6."""
    entries = []
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            next(f)
            for row in f:
                cols = row.split()
                local, remote = cols[1], cols[2]
                entries.append(
                    TCPEntry(
                        local_port=int(local.rsplit(":", 1)[1], 16),
                        remote_port=int(remote.rsplit(":", 1)[1], 16),
                        state=int(cols[3], 16),
                        inode=int(cols[9]),
                    )
                )
    return entries


def socket_owners(pids: Iterable[int], local_port: int) -> dict[int, int]:
    """{remote port: pid} for established sockets on `local_port` held by one of `pids`."""
    owner_of = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    return {
        e.remote_port: owner_of[e.inode]
        for e in tcp_table()
        if e.local_port == local_port and e.state == TCP_ESTABLISHED and e.inode in owner_of
    }


def listening_backlogs(port: int) -> list[int]:
    """The accept-queue limit of every listener on `port` (`ss -ltn`'s Send-Q column)."""
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=5, check=True
    ).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# The ztunnel process


def ztunnel_argv(*args: str) -> list[str]:
    """The installed `ztunnel` console script beside this interpreter, else `-m ztunnel`."""
    script = Path(sys.executable).with_name("ztunnel")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script), *args]
    return [sys.executable, "-m", "ztunnel", *args]


def ztunnel_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    # The project is importable from its checkout whether or not it is pip-installed;
    # workers are started as `python -m workers` and need the same path.
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    env.update(BASE_ENV)
    env.update(overrides or {})
    return env


class ZtunnelProcess:
    """One `ztunnel` (supervisor plus workers) in its own process group."""

    def __init__(self, env: Mapping[str, str], args: Iterable[str] = ()) -> None:
        self.env = dict(env)
        self.ports = Ports.from_env(self.env)
        self.logs = LogBuffer()
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            ztunnel_argv(*args),
            env=self.env,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a process group of its own: cleanup reaches workers
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            self.logs.follow(self.proc.stdout, "stdout"),
            self.logs.follow(self.proc.stderr, "stderr"),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll /healthz/ready until 200; fail at once if the process exits."""
        deadline = time.monotonic() + timeout
        last: HTTPReply | None = None
        while time.monotonic() < deadline:
            if not self.running():
                raise HarnessError(
                    f"ztunnel exited with {self.proc.returncode} before it was ready; "
                    f"output:\n{self.logs.tail()}"
                )
            last = self.try_readiness()
            if last is not None and last.status == 200:
                return
            time.sleep(0.05)
        raise HarnessError(
            f"ztunnel not ready after {timeout:.1f}s (last answer: {last}); "
            f"output:\n{self.logs.tail()}"
        )

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"ztunnel still running {timeout:.1f}s later; output:\n{self.logs.tail()}"
            ) from None
        self._join_readers()
        return code

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the supervisor and wait for its exit status."""
        self.signal(sig)
        return self.wait_exit(timeout)

    def signal(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group, supervisor and workers alike, and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self.wait_group_gone(5)
        self._join_readers()

    def group_members(self) -> list[int]:
        return process_group_members(self.pid)

    def wait_group_gone(self, timeout: float) -> None:
        poll_until(
            lambda: True if not self.group_members() else None,
            timeout,
            f"process group {self.pid} to exit",
            interval=0.05,
        )

    def _join_readers(self) -> None:
        for thread in self._readers:
            thread.join(timeout=5)

    # -- workers ----------------------------------------------------------------------------

    def worker_pids(self) -> list[int]:
        """Live worker processes (children running `python -m workers`), sorted."""
        return sorted(
            pid
            for pid in _children(self.pid)
            if (stat := _stat(pid)) is not None
            and stat[0] != "Z"
            and is_worker_cmdline(_cmdline(pid))
        )

    def wait_for_workers(
        self, count: int, timeout: float = 10.0, without: Iterable[int] = ()
    ) -> list[int]:
        """Exactly `count` live workers, none of them in `without`."""
        excluded = set(without)

        def probe() -> list[int] | None:
            pids = self.worker_pids()
            return pids if len(pids) == count and not excluded & set(pids) else None

        return poll_until(probe, timeout, f"{count} workers other than {sorted(excluded)}")

    def connection_owners(self, port: int) -> dict[int, int]:
        """{client port: worker pid} for connections the workers accepted on `port`."""
        return socket_owners(self.worker_pids(), port)

    # -- HTTP endpoints ---------------------------------------------------------------------

    def http_get(self, port: int, path: str, host: str = LOCALHOST) -> HTTPReply:
        return http_request("GET", host, port, path)

    def try_readiness(self) -> HTTPReply | None:
        """The readiness answer, or None while nothing listens yet."""
        try:
            return http_request("GET", WILDCARD_HOST, self.ports.readiness, "/healthz/ready", 1.0)
        except (ConnectionError, TimeoutError, http.client.HTTPException):
            return None

    def metrics(self) -> str:
        reply = self.http_get(self.ports.stats, "/metrics", host=WILDCARD_HOST)
        assert reply.status == 200, reply
        return reply.body

    def metric_value(self, name: str, **labels: str) -> float:
        """The sum of every sample of `name` whose labels include `labels`."""
        return sum_samples(self.metrics(), name, **labels)

    def config_dump(self) -> dict[str, Any]:
        reply = self.http_get(self.ports.admin, "/config_dump")
        assert reply.status == 200, reply
        dump: dict[str, Any] = json.loads(reply.body)
        return dump

    def quit(self) -> HTTPReply:
        return http_request("POST", LOCALHOST, self.ports.admin, "/quitquitquit")

    # -- logs -------------------------------------------------------------------------------

    def wait_for_log(
        self, predicate: Callable[[LogLine], bool], timeout: float = 5.0, what: str = "log line"
    ) -> LogLine:
        return self.logs.wait_for(predicate, timeout, what)

    def wait_for_message(self, fragment: str, timeout: float = 5.0) -> LogLine:
        return self.logs.wait_for(lambda line: fragment in line.text, timeout, repr(fragment))


class StartZtunnel(Protocol):
    """The `ztunnel` fixture: start one with env overrides (conftest.py)."""

    def __call__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = ...,
        ready: bool = ...,
        wait_for_ports: bool = ...,
    ) -> ZtunnelProcess: ...


def run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 30.0) -> CLIResult:
    """Run `ztunnel ARGS` to completion (for commands that exit on their own)."""
    argv = ztunnel_argv(*args)
    done = subprocess.run(
        argv,
        env=ztunnel_env(env),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return CLIResult(done.returncode, done.stdout, done.stderr)


@dataclass(frozen=True, slots=True)
class CLIResult:
    code: int
    stdout: str
    stderr: str


# ---------------------------------------------------------------------------------------------
# Backends and clients


class EchoServer:
    """A threaded TCP echo server: writes `greeting` on accept, echoes, half-closes on EOF.

    With `reply_after_eof` it holds everything until the client's FIN and only then echoes
    it: a client that still receives it all after shutting down writing proves half-close.
    Connections stay open as long as the client keeps them; `peers` records who connected.
    """

    def __init__(
        self, host: str = OUTSIDE_MESH, greeting: bytes = b"", *, reply_after_eof: bool = False
    ) -> None:
        self.greeting = greeting
        self.reply_after_eof = reply_after_eof
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(256)
        self._listener.settimeout(0.1)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._peers: list[tuple[str, int]] = []
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, name="echo-accept", daemon=True)
        self._acceptor.start()

    @property
    def peers(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._peers)

    def wait_for_peers(self, count: int, timeout: float = IO_TIMEOUT) -> list[tuple[str, int]]:
        return poll_until(
            lambda: p if len(p := self.peers) >= count else None, timeout, f"{count} peers"
        )

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            with self._lock:
                self._peers.append((peer[0], peer[1]))
                self._conns.add(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self.greeting:
                conn.sendall(self.greeting)
            held = bytearray()
            while data := conn.recv(65536):
                if self.reply_after_eof:
                    held += data
                else:
                    conn.sendall(data)
            conn.sendall(held)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=2)
        for thread in threads:
            thread.join(timeout=2)

    def __enter__(self) -> EchoServer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Socks5Refused(ConnectionError):
    """The SOCKS5 server answered the CONNECT with a non-zero reply code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"socks5 reply code {code}")
        self.code = code


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def socks5_connect(
    host: str, port: int, target_ip: str, target_port: int, timeout: float = IO_TIMEOUT
) -> socket.socket:
    """A socket through a SOCKS5 proxy (RFC 1928, no auth, CONNECT to an IP literal)."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(b"\x05\x01\x00")
        if recv_exact(sock, 2) != b"\x05\x00":
            raise ConnectionError("socks5 server refused the no-auth method")
        addr = ipaddress.ip_address(target_ip)
        atyp = b"\x01" if addr.version == 4 else b"\x04"
        sock.sendall(b"\x05\x01\x00" + atyp + addr.packed + struct.pack("!H", target_port))
        version, code, _, reply_atyp = recv_exact(sock, 4)
        if version != 5:
            raise ConnectionError(f"not a socks5 reply: version {version}")
        recv_exact(sock, {1: 4, 4: 16}.get(reply_atyp, 0) + 2)
        if code != 0:
            raise Socks5Refused(code)
    except BaseException:
        sock.close()
        raise
    return sock


def connection_ended(conn: socket.socket, timeout: float) -> bool:
    """True once the peer closed or reset the connection; False if still open at `timeout`."""
    conn.settimeout(timeout)
    try:
        return conn.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def echo_once(sock: socket.socket, payload: bytes = b"ping") -> bytes:
    sock.sendall(payload)
    return recv_exact(sock, len(payload))


def send_and_drain(
    sock: socket.socket, payload: bytes, timeout: float = 20.0
) -> tuple[bytes, bool]:
    """Send `payload` then shut down writing while reading until EOF, concurrently.

    Returns (everything received, whether the peer ended with a clean EOF).
    """
    sock.settimeout(timeout)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            errors.append(e)

    sender = threading.Thread(target=send, name="send-and-drain", daemon=True)
    sender.start()
    received = bytearray()
    deadline = time.monotonic() + timeout
    clean_eof = False
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                clean_eof = True
                break
            received += chunk
    except OSError:
        clean_eof = False
    sender.join(timeout=max(0.0, deadline - time.monotonic()))
    if errors:
        raise errors[0]
    return bytes(received), clean_eof


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# iptables capture (root only)

REDIRECT_COMMENT_PREFIX = "ztunnel-test-"


def can_redirect() -> str | None:
    """Why capture tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root to add iptables nat rules"
    if shutil.which("iptables") is None:
        return "needs iptables on PATH (scripts/test installs it)"
    return None


def _iptables(*args: str, check: bool = True) -> str:
    done = subprocess.run(
        ["iptables", "-w", "5", "-t", "nat", *args],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if check and done.returncode != 0:
        raise HarnessError(f"iptables {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def _remove_stale_redirects() -> None:
    """Delete rules left by test runs whose process is gone (a killed runner skips cleanup)."""
    for rule in _iptables("-S", "OUTPUT").splitlines():
        match = re.search(rf"--comment {REDIRECT_COMMENT_PREFIX}(\d+)\b", rule)
        if match is not None and not Path(f"/proc/{match.group(1)}").exists():
            _iptables("-D", *shlex.split(rule)[1:], check=False)


@contextlib.contextmanager
def redirect_to_outbound(
    dst_ip: str, dst_port: int, outbound_port: int, mark: int
) -> Iterator[None]:
    """Capture this host's TCP to `dst_ip`:`dst_port` into the outbound listener.

    Packets carrying `mark` (ztunnel's own upstream sockets, PACKET_MARK) are left alone,
    as the istio-cni rules do, so the proxied connection is not captured again.
    """
    _remove_stale_redirects()
    rule = (
        "OUTPUT",
        *("-p", "tcp", "-d", dst_ip, "--dport", str(dst_port)),
        *("-m", "mark", "!", "--mark", str(mark)),
        *("-m", "comment", "--comment", f"{REDIRECT_COMMENT_PREFIX}{os.getpid()}"),
        *("-j", "REDIRECT", "--to-ports", str(outbound_port)),
    )
    _iptables("-A", *rule)
    try:
        yield
    finally:
        _iptables("-D", *rule, check=False)
