"""The real `ztunnel` fed over delta xDS by the real local control plane (`python -m controlplane`).

Every ztunnel listener here is on a 25xxx port so these tests never collide with the ones that
use upstream's defaults. Only paths that need no HBONE peer are exercised (HBONE next hops
always dial 15008): SOCKS5 to plain-TCP workloads and passthrough, readiness, config_dump and
metrics. Timings are printed (run with `-s`), never asserted beyond generous bounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import (
    EXAMPLE_CONFIG,
    LOCALHOST,
    PROJECT_ROOT,
    EchoServer,
    HarnessError,
    LogBuffer,
    LogLine,
    ZtunnelProcess,
    echo_once,
    poll_until,
    socks5_connect,
    sum_samples,
    wait_ports_free,
    ztunnel_env,
)

from controlplane import server as cp_server
from controlplane.resources import ADDRESS_TYPE, resource, workload_to_proto
from controlplane.tls import Root
from ztunnel.core.model import Workload
from ztunnel.gen import workload_pb2, xds_pb2

PORTS = {
    "ZTUNNEL_OUTBOUND_PORT": "25001",
    "ZTUNNEL_INBOUND_PLAINTEXT_PORT": "25006",
    "ZTUNNEL_INBOUND_PORT": "25008",
    "ZTUNNEL_SOCKS5_PORT": "25080",
    "ZTUNNEL_READINESS_PORT": "25021",
    "PROXY_CONFIG": json.dumps({"proxyAdminPort": 25000, "statsPort": 25020}),
}
PORT_NUMBERS = (25001, 25006, 25008, 25080, 25021, 25000, 25020)
NEW_IP = "127.0.0.5"
TCP_WORKLOAD_IP = "127.0.0.2"  # a loopback address examples/localhost.yaml does not use
# Worker processes per ztunnel; XDS_TEST_WORKERS=8 measures the fan-out with more of them.
WORKERS = int(os.environ.get("XDS_TEST_WORKERS", "2"))
CP_START_TIMEOUT = 15.0
SYNC_TIMEOUT = 15.0  # seconds: ztunnel start plus first sync
RESYNC_TIMEOUT = 20.0  # a reconnect may wait out a backoff (<= 15 s) first
_APPLIED = re.compile(r"state version (\d+) applied by all (\d+) workers \(([\d.]+) ms after")

EXTRA_WORKLOAD = f"""
- uid: cluster1//v1/Pod/default/extra
  name: extra
  namespace: default
  serviceAccount: extra
  workloadName: extra-deploy
  workloadIps: ["{NEW_IP}"]
  protocol: TCP
  node: local
  services: {{}}
"""


# ---------------------------------------------------------------------------------------------
# The control plane, as a process and in a thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
        return port


class ControlPlaneProcess:
    """`python -m controlplane` in its own process group."""

    def __init__(self, config: Path, ca_dir: Path, port: int) -> None:
        self.port = port
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
        env["PYTHONPATH"] = str(PROJECT_ROOT)
        argv = [
            sys.executable,
            "-m",
            "controlplane",
            *("--config", str(config), "--listen", f"{LOCALHOST}:{port}"),
            *("--ca-dir", str(ca_dir), "--no-ca"),
        ]
        self.logs = LogBuffer()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=PROJECT_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.logs.follow(self.proc.stdout, "stdout")
        self.logs.follow(self.proc.stderr, "stderr")
        self.logs.wait_for(
            lambda ln: "control plane listening on" in ln.text, CP_START_TIMEOUT, "listening"
        )

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


class ThreadedControlPlane:
    """The control plane on an event loop in a thread of the test: lets a test `inject`."""

    def __init__(self, config: Path, ca_dir: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        start = cp_server.start(
            str(config), ca_dir=str(ca_dir), listen=f"{LOCALHOST}:0", with_ca=False
        )
        self.cp = asyncio.run_coroutine_threadsafe(start, self.loop).result(CP_START_TIMEOUT)
        self.port = self.cp.port

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.cp.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture
def mesh_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "mesh.yaml"
    path.write_text(EXAMPLE_CONFIG.read_text())
    return path


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    return tmp_path / "ca"


@pytest.fixture
def control_planes() -> Iterator[list[ControlPlaneProcess]]:
    started: list[ControlPlaneProcess] = []
    yield started
    for cp in started:
        cp.kill()


StartZtunnel = Callable[..., ZtunnelProcess]


@pytest.fixture
def xds_ztunnel(ca_dir: Path, tmp_path: Path) -> Iterator[StartZtunnel]:
    started: list[ZtunnelProcess] = []

    def start(
        port: int,
        *,
        ready: bool = True,
        workers: int = WORKERS,
        extra: dict[str, str] | None = None,
    ) -> ZtunnelProcess:
        env = ztunnel_env(
            {
                **(extra or {}),
                **PORTS,
                "ZTUNNEL_WORKERS": str(workers),
                "XDS_ADDRESS": f"https://{LOCALHOST}:{port}",
                "XDS_ROOT_CA": str(ca_dir / "root-cert.pem"),
                "ISTIO_META_DNS_CAPTURE": "false",  # no DNS listener on the shared 15053
                "FAKE_CA_DIR": str(tmp_path / "fake-ca"),  # a root of our own
                "GRPC_VERBOSITY": "ERROR",
            }
        )
        if "LOCAL_XDS_PATH" not in (extra or {}):
            del env["LOCAL_XDS_PATH"]  # everything comes over xDS
        wait_ports_free(PORT_NUMBERS, 15.0)
        zt = ZtunnelProcess(env)
        started.append(zt)
        if ready:
            zt.wait_ready(SYNC_TIMEOUT)
        return zt

    yield start
    for zt in started:
        zt.kill()
    wait_ports_free(PORT_NUMBERS, 15.0)


def applied_versions(zt: ZtunnelProcess) -> list[tuple[int, LogLine]]:
    out = []
    for line in zt.logs.lines():
        m = _APPLIED.search(line.text)
        if m is not None:
            out.append((int(m.group(1)), line))
    return out


def wait_applied_after(zt: ZtunnelProcess, version: int, timeout: float) -> LogLine:
    def newer(line: LogLine) -> bool:
        m = _APPLIED.search(line.text)
        return m is not None and int(m.group(1)) > version

    return zt.wait_for_log(newer, timeout, f"a state version above {version} on every worker")


def workload_uids(zt: ZtunnelProcess) -> set[str]:
    return {w["uid"] for w in zt.config_dump()["workloads"]}


def readiness(zt: ZtunnelProcess) -> tuple[int, str] | None:
    reply = zt.try_readiness()
    return None if reply is None else (reply.status, reply.body)


def socks5_echo(zt: ZtunnelProcess, echo: EchoServer) -> None:
    with socks5_connect(LOCALHOST, zt.ports.socks5, echo.host, echo.port) as conn:
        assert echo_once(conn, b"hello") == b"hello"


def add_extra_workload(path: Path) -> None:
    text = path.read_text()
    cut = text.index("policies:")
    path.write_text(text[:cut] + EXTRA_WORKLOAD.lstrip("\n") + text[cut:])


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.timeout(90)
def test_not_ready_until_the_first_sync_then_ready(
    xds_ztunnel: StartZtunnel,
    control_planes: list[ControlPlaneProcess],
    mesh_yaml: Path,
    ca_dir: Path,
) -> None:
    port = free_port()
    # The control plane is not up yet. Its root must exist already: XDS_ROOT_CA names a file
    # only if the path exists when ztunnel starts (else the text is taken as inline PEM).
    Root.open(str(ca_dir))
    zt = xds_ztunnel(port, ready=False)
    only_state = (500, "not ready, pending: state manager\n")
    # Workers come up and ack the (empty) state; the xDS sync is what stays pending.
    poll_until(
        lambda: True if readiness(zt) == only_state else None,
        SYNC_TIMEOUT,
        f"readiness {only_state} while the control plane is down",
    )
    time.sleep(1.0)  # and it stays so through several reconnect attempts
    assert readiness(zt) == only_state
    started = time.monotonic()
    control_planes.append(ControlPlaneProcess(mesh_yaml, ca_dir, port))
    listening = time.monotonic()
    zt.wait_ready(RESYNC_TIMEOUT)
    ready = time.monotonic()
    print(
        f"\nready {ready - listening:.2f}s after the control plane listened "
        f"({ready - started:.2f}s after it was launched; reconnect backoff included)"
    )
    assert readiness(zt) == (200, "ready\n")
    uids = workload_uids(zt)
    assert "cluster1//v1/Pod/default/local-tcp" in uids
    terminations = zt.metric_value("istio_xds_connection_terminations_total")
    assert terminations >= 1  # the refused attempts while it was down


@pytest.mark.timeout(90)
def test_yaml_edit_reaches_config_dump_and_changes_what_workers_do(
    xds_ztunnel: StartZtunnel,
    control_planes: list[ControlPlaneProcess],
    mesh_yaml: Path,
    ca_dir: Path,
) -> None:
    port = free_port()
    cp = ControlPlaneProcess(mesh_yaml, ca_dir, port)
    control_planes.append(cp)
    zt = xds_ztunnel(port)
    assert zt.metric_value("istio_xds_message_total", url=ADDRESS_TYPE) >= 1
    with EchoServer(host=NEW_IP) as echo:
        # Unknown address: passthrough, no destination workload.
        socks5_echo(zt, echo)
        line = zt.wait_for_log(
            lambda ln: ln.is_access() and ln.fields.get("dst.addr") == f"{NEW_IP}:{echo.port}",
            5.0,
            "the passthrough access log",
        )
        assert "dst.workload" not in line.fields
        last = max(v for v, _ in applied_versions(zt))

        add_extra_workload(mesh_yaml)
        edited_at = time.time()
        applied = wait_applied_after(zt, last, 10.0)
        m = _APPLIED.search(applied.text)
        assert m is not None
        served = cp.logs.wait_for(
            lambda ln: "serving config version 2" in ln.text, 5.0, "the control plane's reload"
        )
        applied_at, served_at = applied.timestamp, served.timestamp
        assert applied_at is not None and served_at is not None
        print(
            f"\nYAML edit -> state version {m.group(1)} applied by all {m.group(2)} workers: "
            f"{(applied_at - edited_at) * 1000:.0f} ms = file poll (250 ms period) "
            f"{(served_at - edited_at) * 1000:.0f} ms + push, apply and fan-out "
            f"{(applied_at - served_at) * 1000:.1f} ms (publish -> all workers {m.group(3)} ms)"
        )
        assert "cluster1//v1/Pod/default/extra" in workload_uids(zt)

        socks5_echo(zt, echo)
        line = zt.wait_for_log(
            lambda ln: (
                ln.is_access()
                and ln.fields.get("dst.addr") == f"{NEW_IP}:{echo.port}"
                and "dst.workload" in ln.fields
            ),
            5.0,
            "the access log naming the new workload",
        )
        assert line.fields["dst.workload"] == "extra"

    def counted() -> float | None:
        text = zt.metrics()
        n = sum_samples(
            text, "istio_tcp_connections_opened_total", destination_workload="extra-deploy"
        )
        return n if n >= 1 else None

    poll_until(counted, 5.0, "metrics labelled with the new workload", interval=0.1)


@pytest.mark.timeout(90)
def test_malformed_resource_is_nacked_and_the_valid_ones_apply(
    xds_ztunnel: StartZtunnel, mesh_yaml: Path, ca_dir: Path
) -> None:
    cp = ThreadedControlPlane(mesh_yaml, ca_dir)
    try:
        zt = xds_ztunnel(cp.port)
        good = [
            Workload(
                uid=f"cluster1//v1/Pod/default/good{i}",
                name=f"good{i}",
                namespace="default",
                workload_ips=(f"127.0.1.{i + 1}",),
            )
            for i in range(9)
        ]
        bad = xds_pb2.Resource(name="cluster1//v1/Pod/default/bad", version="x")
        bad.resource.type_url = ADDRESS_TYPE
        bad.resource.value = b"\x0a\x05\xff"  # truncated bytes: not an Address
        resources = [
            resource(w.uid, workload_pb2.Address(workload=workload_to_proto(w))) for w in good
        ]
        last = max(v for v, _ in applied_versions(zt))
        cp.call(lambda: cp.cp.xds.inject(ADDRESS_TYPE, [*resources, bad]))
        wait_applied_after(zt, last, 10.0)

        def nack() -> str | None:
            infos = cp.call(cp.cp.xds.streams)
            return infos[0].last_nack.message if infos and infos[0].last_nack else None

        message = poll_until(nack, 5.0, "the NACK")
        assert message.startswith("cluster1//v1/Pod/default/bad: decode")
        assert "good" not in message
        uids = workload_uids(zt)
        assert {w.uid for w in good} <= uids
        assert bad.name not in uids
        assert readiness(zt) == (200, "ready\n")
    finally:
        cp.close()


@pytest.mark.timeout(120)
def test_control_plane_restart_keeps_connections_and_readiness_then_resyncs(
    xds_ztunnel: StartZtunnel,
    control_planes: list[ControlPlaneProcess],
    mesh_yaml: Path,
    ca_dir: Path,
) -> None:
    port = free_port()
    first = ControlPlaneProcess(mesh_yaml, ca_dir, port)
    control_planes.append(first)
    zt = xds_ztunnel(port)
    before = workload_uids(zt)
    # 127.0.0.2 is the plain-TCP workload `local-tcp` of examples/localhost.yaml.
    with EchoServer(host=TCP_WORKLOAD_IP) as echo:
        conn = socks5_connect(LOCALHOST, zt.ports.socks5, echo.host, echo.port)
        with conn:
            assert echo_once(conn, b"before") == b"before"
            first.kill()
            killed_at = time.monotonic()
            # Outage: the open connection works, new ones too, state and readiness stay.
            for _ in range(5):
                time.sleep(0.3)
                assert readiness(zt) == (200, "ready\n")
                assert echo_once(conn, b"during") == b"during"
            socks5_echo(zt, echo)
            assert workload_uids(zt) == before
            add_extra_workload(mesh_yaml)  # changed while the control plane was down
            restarted_at = time.monotonic()
            control_planes.append(ControlPlaneProcess(mesh_yaml, ca_dir, port))

            def resynced() -> bool | None:
                return True if "cluster1//v1/Pod/default/extra" in workload_uids(zt) else None

            try:
                poll_until(resynced, RESYNC_TIMEOUT, "the resync after the restart", 0.05)
            except HarnessError:
                print(zt.logs.tail())
                raise
            now = time.monotonic()
            print(
                f"\ncontrol plane down {restarted_at - killed_at:.2f}s; resynced "
                f"{now - restarted_at:.2f}s after it came back"
            )
            assert echo_once(conn, b"after") == b"after"
    assert readiness(zt) == (200, "ready\n")
    assert workload_uids(zt) == before | {"cluster1//v1/Pod/default/extra"}
    assert zt.metric_value("istio_xds_connection_terminations_total") >= 1


@pytest.mark.timeout(90)
def test_on_demand_address_is_fetched_when_a_worker_misses_it(
    xds_ztunnel: StartZtunnel,
    control_planes: list[ControlPlaneProcess],
    mesh_yaml: Path,
    ca_dir: Path,
) -> None:
    """XDS_ON_DEMAND: nothing is subscribed up front; a miss asks for `network/ip`."""
    add_extra_workload(mesh_yaml)
    port = free_port()
    control_planes.append(ControlPlaneProcess(mesh_yaml, ca_dir, port))
    # On demand, ztunnel learns only what it asks for: its own workload comes from a local file.
    local = mesh_yaml.with_name("local.yaml")
    local.write_text(
        "workloads:\n"
        "- {uid: cluster1//v1/Pod/default/local, name: local, namespace: default,\n"
        "   serviceAccount: default, workloadIps: [127.0.0.1], protocol: HBONE, services: {}}\n"
    )
    zt = xds_ztunnel(port, extra={"XDS_ON_DEMAND": "true", "LOCAL_XDS_PATH": str(local)})
    assert "cluster1//v1/Pod/default/extra" not in workload_uids(zt)
    with EchoServer(host=NEW_IP) as echo:
        socks5_echo(zt, echo)
        line = zt.wait_for_log(
            lambda ln: ln.is_access() and ln.fields.get("dst.addr") == f"{NEW_IP}:{echo.port}",
            10.0,
            "the access log of the connection",
        )
    # The worker waited for the fetch, so this first connection already knows its workload.
    assert line.fields.get("dst.workload") == "extra"
    assert "cluster1//v1/Pod/default/extra" in workload_uids(zt)
