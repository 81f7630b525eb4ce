"""Mesh pieces for namespace tests: ztunnel on a "node", echo servers, config, certificates.

Builds on `netns` (namespaces) and the loopback harness (`tests/integration/harness.py`:
log parsing, metric parsing, deadlines). Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent / "integration"))

from harness import (  # noqa: E402
    PROJECT_ROOT,
    HarnessError,
    HTTPReply,
    LogBuffer,
    LogLine,
    Ports,
    http_request,
    poll_until,
    recv_exact,
    send_and_drain,
    sum_samples,
    ztunnel_argv,
    ztunnel_env,
)
from netns import Netns  # noqa: E402

from ztunnel.core.ipc import WorkloadCertificate  # noqa: E402
from ztunnel.fakeca import FakeCA  # noqa: E402

__all__ = [  # re-exported from the loopback harness
    "PROJECT_ROOT",
    "HTTPReply",
    "HarnessError",
    "LogBuffer",
    "LogLine",
    "poll_until",
    "recv_exact",
    "send_and_drain",
]

TRUST_DOMAIN = "cluster.local"
PACKET_MARK = 1337
WORKERS = 2
START_TIMEOUT = 20.0  # seconds: interpreter, supervisor and two workers, cold
IO_TIMEOUT = 10.0  # seconds for one socket operation through the mesh
METRICS_TIMEOUT = 10.0  # seconds: workers push metric deltas about once a second
CERT_TTL = 3600.0  # seconds

T = TypeVar("T")


def spiffe(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


# ---------------------------------------------------------------------------------------------
# Local config


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """One workload of the local config (LOCAL_XDS_PATH), in upstream's YAML words."""

    name: str
    ip: str
    node: str
    protocol: str = "HBONE"
    namespace: str = "default"
    service_account: str = ""
    canonical_name: str = ""  # the app label; metrics' *_canonical_service and *_app
    canonical_revision: str = ""  # the version label; *_canonical_revision and *_version
    services: Mapping[str, Mapping[int, int]] = field(default_factory=dict)

    @property
    def sa(self) -> str:
        return self.service_account or self.name

    @property
    def identity(self) -> str:
        return spiffe(self.namespace, self.sa)

    @property
    def info(self) -> str:
        """PROXY_WORKLOAD_INFO for a dedicated ztunnel serving this workload."""
        return f"{self.namespace}/{self.name}/{self.sa}"

    def to_yaml(self) -> dict[str, Any]:
        return {
            "uid": f"cluster1//v1/Pod/{self.namespace}/{self.name}",
            "name": self.name,
            "workloadName": self.name,
            "namespace": self.namespace,
            "serviceAccount": self.sa,
            "workloadIps": [self.ip],
            "protocol": self.protocol,
            "node": self.node,
            "network": "",
            "canonicalName": self.canonical_name,
            "canonicalRevision": self.canonical_revision,
            "services": {k: dict(v) for k, v in self.services.items()},
        }


def write_local_config(path: Path, workloads: Sequence[WorkloadSpec]) -> Path:
    """JSON is YAML: one file every ztunnel of the test reads."""
    path.write_text(json.dumps({"workloads": [w.to_yaml() for w in workloads]}, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# ztunnel inside a namespace


class LoopThread:
    """An event loop on a thread of its own, for the fake CNI's ZDS server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="cni")
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class NodeZtunnel:
    """One `ztunnel` (supervisor plus workers) running inside a node namespace."""

    def __init__(self, ns: Netns, env: Mapping[str, str]) -> None:
        self.ns = ns
        self.env = ztunnel_env(env)
        self.ports = Ports.from_env(self.env)
        self.logs = LogBuffer()
        self.proc = ns.popen(
            ztunnel_argv(),
            env=self.env,
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            self.logs.follow(self.proc.stdout, "stdout"),
            self.logs.follow(self.proc.stderr, "stderr"),
        ]

    @classmethod
    def dedicated(
        cls,
        ns: Netns,
        workload: WorkloadSpec,
        config: Path,
        ca_dir: str,
        extra: Mapping[str, str] | None = None,
    ) -> NodeZtunnel:
        env = {
            "PROXY_MODE": "dedicated",
            "PROXY_WORKLOAD_INFO": workload.info,
            "FAKE_CA": "true",
            "FAKE_CA_DIR": ca_dir,
            "XDS_ADDRESS": "",
            "LOCAL_XDS_PATH": str(config),
            "ZTUNNEL_WORKERS": str(WORKERS),
            "PACKET_MARK": str(PACKET_MARK),
            "LOG_FORMAT": "json",
            "UNSTABLE_ENABLE_SOCKS5": "false",
            "NODE_NAME": workload.node,
            **(extra or {}),
        }
        return cls(ns, env)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        last: HTTPReply | None = None
        while time.monotonic() < deadline:
            if not self.running():
                raise HarnessError(
                    f"ztunnel in {self.ns.name} exited with {self.proc.returncode}; "
                    f"output:\n{self.logs.tail()}"
                )
            last = self._try(self.ports.readiness, "/healthz/ready")
            if last is not None and last.status == 200:
                return
            time.sleep(0.05)
        raise HarnessError(
            f"ztunnel in {self.ns.name} not ready after {timeout:.0f}s (last: {last}); "
            f"output:\n{self.logs.tail()}"
        )

    def _try(self, port: int, path: str) -> HTTPReply | None:
        try:
            return self.http_get(port, path, timeout=1.0)
        except (OSError, http.client.HTTPException):
            return None

    def http_get(self, port: int, path: str, timeout: float = IO_TIMEOUT) -> HTTPReply:
        """GET from inside the node namespace (15020/15021 bind the `::` wildcard)."""
        return self.ns.call(http_request, "GET", "::1", port, path, timeout)

    def metrics(self) -> str:
        reply = self.http_get(self.ports.stats, "/metrics")
        assert reply.status == 200, reply
        return reply.body

    def metric(self, name: str, **labels: str) -> float:
        return sum_samples(self.metrics(), name, **labels)

    def wait_metric(
        self, name: str, expected: float, timeout: float = METRICS_TIMEOUT, **labels: str
    ) -> float:
        """Poll /metrics until the sum of `name{labels}` equals `expected`."""
        seen: list[float] = []

        def probe() -> float | None:
            value = self.metric(name, **labels)
            seen.append(value)
            return value if value == expected else None

        try:
            return poll_until(probe, timeout, f"{name}{labels} == {expected}", interval=0.2)
        except HarnessError as e:
            raise HarnessError(f"{e}; last value {seen[-1:]}") from None

    def access_logs(self, message: str = "connection complete") -> list[LogLine]:
        return self.logs.find(lambda line: line.is_access(message))

    def wait_access(
        self,
        timeout: float = IO_TIMEOUT,
        message: str = "connection complete",
        **fields: str,
    ) -> LogLine:
        """The first access-log line whose fields include `fields` (dots spelt `_`)."""
        want = {k.replace("__", "."): v for k, v in fields.items()}

        def match(line: LogLine) -> bool:
            return line.is_access(message) and all(line.fields.get(k) == v for k, v in want.items())

        return self.logs.wait_for(match, timeout, f"access log {message!r} with {want}")

    def save_logs(self, path: Path) -> None:
        path.write_text("".join(f"[{line.stream}] {line.text}\n" for line in self.logs.lines()))

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        for thread in self._readers:
            thread.join(timeout=5)


class LogKeeper:
    """Writes every registered ztunnel's output under the test's tmp_path at teardown, and
    prints the tails when the test failed (pytest shows them with the failure)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ztunnels: dict[str, NodeZtunnel] = {}

    def add(self, name: str, zt: NodeZtunnel) -> NodeZtunnel:
        self._ztunnels[name] = zt
        return zt

    def finish(self, failed: bool) -> None:
        for name, zt in self._ztunnels.items():
            path = self.directory / f"ztunnel-{name}.log"
            zt.save_logs(path)
            if failed:
                print(f"--- ztunnel {name} ({zt.ns.name}), full log in {path}")
                print(zt.logs.tail(60))


# ---------------------------------------------------------------------------------------------
# Backends


class EchoServer:
    """A threaded TCP server: echoes what it reads (`double`: writes it twice), FIN on EOF.

    With `reply_after_eof` it holds everything until the client's FIN: a client that still
    receives it all after shutting down writing proves half-close crossed the tunnel.

    `double` is upstream's ReadDoubleWrite (tests/namespaced.rs): 11 bytes in, 22 out. The
    listener is created inside `ns`; connection threads run on the (bound) sockets.
    """

    def __init__(
        self,
        ns: Netns,
        host: str,
        port: int,
        *,
        double: bool = False,
        reply_after_eof: bool = False,
    ) -> None:
        self.double = double
        self.reply_after_eof = reply_after_eof
        self.host, self.port = host, port
        self._listener: socket.socket = ns.call(_listen, host, port)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self.accepted = 0
        self._closed = threading.Event()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="echo")
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(60.0)
            with self._lock:
                self._conns.add(conn)
                self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            held = bytearray()
            while data := conn.recv(65536):
                reply = data + data if self.double else data
                if self.reply_after_eof:
                    held += reply
                else:
                    conn.sendall(reply)
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
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(timeout=2)


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.settimeout(0.2)
    return sock


# ---------------------------------------------------------------------------------------------
# Clients


def connect(ns: Netns, host: str, port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
    """A TCP connection made from inside `ns` (so its capture rules apply)."""
    sock: socket.socket = ns.call(socket.create_connection, (host, port), timeout)
    sock.settimeout(timeout)
    return sock


def recv_until_eof(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    buf = bytearray()
    while len(buf) <= limit:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise HarnessError(f"more than {limit} bytes without EOF")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True, slots=True)
class CertFiles:
    """A workload certificate written out for third-party TLS stacks."""

    cert: Path  # leaf chain
    key: Path
    ca: Path  # trust roots


def write_cert(directory: Path, stem: str, cert: WorkloadCertificate) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    files = CertFiles(
        directory / f"{stem}.crt", directory / f"{stem}.key", directory / f"{stem}-ca.crt"
    )
    files.cert.write_text("".join(cert.chain_pem))
    fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cert.key_pem)
    files.ca.write_text("".join(cert.roots_pem))
    return files


@contextlib.contextmanager
def private_ca_dir() -> Iterator[tuple[str, FakeCA]]:
    """A FAKE_CA_DIR of our own (0700, ours): tests do not depend on the host's shared root."""
    with tempfile.TemporaryDirectory(prefix="zte2e-ca-") as parent:
        directory = os.path.join(parent, "ca")
        yield directory, FakeCA.open(directory)


def issue(ca: FakeCA, identity: str) -> WorkloadCertificate:
    return ca.issue(identity, ttl=CERT_TTL, now=time.time())
