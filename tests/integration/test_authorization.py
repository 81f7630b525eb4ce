"""L4 authorization on a real ztunnel: HBONE 401s, plaintext closes, live re-evaluation.

The ztunnel proxies workload `default/local` at 127.0.0.1 (HBONE); raw HBONE clients with
FAKE_CA certificates for other identities CONNECT into its 15008 as remote ztunnels would.
Policies live in the LOCAL_XDS_PATH file, which ztunnel watches, so a test can change them.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import LOCALHOST, EchoServer, LogLine, redirect_to_outbound
from tests.integration.hbone_client import HBONEStream, mint

GOOD = "spiffe://cluster.local/ns/default/sa/good"
BAD = "spiffe://cluster.local/ns/default/sa/bad"
WORKLOAD = {
    "uid": "cluster1//v1/Pod/default/local",
    "name": "local",
    "namespace": "default",
    "serviceAccount": "default",
    "workloadIps": [LOCALHOST],
    "protocol": "HBONE",
    "services": {},
}


def _policy(name: str, action: str, match: dict[str, object]) -> dict[str, object]:
    return {
        "name": name,
        "namespace": "default",
        "scope": "Namespace",
        "action": action,
        "dryRun": False,
        "rules": [[[match]]],
    }


def _write(path: Path, policies: list[dict[str, object]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"workloads": [WORKLOAD], "policies": policies}))
    os.replace(tmp, path)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "local.yaml"
    _write(path, [])
    return path


@pytest.fixture
def echoes() -> Iterator[tuple[EchoServer, EchoServer]]:
    with EchoServer(LOCALHOST) as a, EchoServer(LOCALHOST) as b:
        yield a, b


def _stream(identity: str, port: int) -> tuple[HBONEStream, int]:
    s = HBONEStream(LOCALHOST, 15008, mint(identity))
    return s, s.connect(f"{LOCALHOST}:{port}")


def _echoes(s: HBONEStream, data: bytes = b"ping") -> bool:
    s.send(data)
    return s.recv_exactly(len(data), timeout=3) == data


def _denials(lines: list[LogLine]) -> list[LogLine]:
    return [
        line
        for line in lines
        if line.is_access() and "policy rejection" in str(line.fields.get("error", ""))
    ]


@pytest.mark.timeout(60)
def test_deny_by_port_blocks_only_that_port(ztunnel, policy_file, echoes) -> None:  # type: ignore[no-untyped-def]
    denied, allowed = echoes
    _write(policy_file, [_policy("deny-port", "Deny", {"destinationPorts": [denied.port]})])
    zt = ztunnel({"LOCAL_XDS_PATH": str(policy_file), "LOG_FORMAT": "json"}, workers=2)
    s1, status1 = _stream(GOOD, denied.port)
    s2, status2 = _stream(GOOD, allowed.port)
    try:
        assert status1 == 401
        assert status2 == 200 and _echoes(s2)
    finally:
        s1.close()
        s2.close()
    line = zt.logs.wait_for(lambda ln: bool(_denials([ln])), timeout=5)
    assert line.fields["error"] == (
        "connection closed due to policy rejection: explicitly denied by: default/deny-port"
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if zt.metric_value("istio_tcp_connections_closed_total", response_flags="DENY") >= 1:
            break
        time.sleep(0.2)
    assert zt.metric_value("istio_tcp_connections_closed_total", response_flags="DENY") == 1


@pytest.mark.timeout(60)
def test_allow_list_by_principal_admits_one_identity_and_rejects_another(
    ztunnel,
    policy_file,
    echoes,  # type: ignore[no-untyped-def]
) -> None:
    echo, _ = echoes
    principal = GOOD.removeprefix("spiffe://")
    _write(policy_file, [_policy("allow-good", "Allow", {"principals": [{"Exact": principal}]})])
    zt = ztunnel({"LOCAL_XDS_PATH": str(policy_file), "LOG_FORMAT": "json"}, workers=2)
    good, good_status = _stream(GOOD, echo.port)
    bad, bad_status = _stream(BAD, echo.port)
    try:
        assert good_status == 200 and _echoes(good)
        assert bad_status == 401
    finally:
        good.close()
        bad.close()
    line = zt.logs.wait_for(lambda ln: bool(_denials([ln])), timeout=5)
    assert line.fields["error"] == (
        "connection closed due to policy rejection: allow policies exist, but none allowed"
    )
    assert line.fields["src.identity"] == BAD


@pytest.mark.timeout(60)
def test_policy_update_closes_now_denied_connection_within_a_second(
    ztunnel,
    policy_file,
    echoes,  # type: ignore[no-untyped-def]
) -> None:
    echo, other = echoes
    zt = ztunnel({"LOCAL_XDS_PATH": str(policy_file), "LOG_FORMAT": "json"}, workers=2)
    victims = [_stream(BAD, echo.port)[0] for _ in range(4)]
    keepers = [_stream(GOOD, other.port)[0] for _ in range(4)]
    try:
        assert all(s.status == 200 and _echoes(s) for s in victims + keepers)
        changed = time.monotonic()
        _write(policy_file, [_policy("deny-bad", "Deny", {"principals": [{"Exact": BAD[9:]}]})])
        for s in victims:
            assert s.wait_closed(timeout=3.0), "denied connection still open"
        # From the file write: the watcher's 0.25 s poll, publish, and the workers' re-check.
        elapsed = time.monotonic() - changed
        print(f"policy change to last denied connection closed: {elapsed * 1000:.0f} ms")
        assert elapsed < 1.0
        assert all(_echoes(s, b"still here") for s in keepers)
    finally:
        for s in victims + keepers:
            s.close()
    closed = zt.logs.wait_for(
        lambda ln: (
            ln.is_access() and ln.fields.get("error") == "connection closed due to policy change"
        ),
        timeout=5,
    )
    assert closed.fields["src.identity"] == BAD


@pytest.mark.timeout(60)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None, reason="needs root and iptables"
)
def test_plaintext_inbound_is_closed_when_denied(ztunnel, policy_file, echoes) -> None:  # type: ignore[no-untyped-def]
    denied, allowed = echoes
    _write(policy_file, [_policy("deny-port", "Deny", {"destinationPorts": [denied.port]})])
    zt = ztunnel(
        {"LOCAL_XDS_PATH": str(policy_file), "LOG_FORMAT": "json", "PACKET_MARK": "1337"}, workers=2
    )
    with (
        redirect_to_outbound(LOCALHOST, denied.port, 15006, 1337),
        redirect_to_outbound(LOCALHOST, allowed.port, 15006, 1337),
    ):
        with socket.create_connection((LOCALHOST, denied.port), timeout=3) as c:
            try:
                c.sendall(b"hello")
                got = c.recv(16)
            except ConnectionResetError:
                got = b""
            assert got == b""  # closed (or reset) without a byte exchanged
        assert denied.peers == []
        with socket.create_connection((LOCALHOST, allowed.port), timeout=3) as c:
            c.sendall(b"hello")
            assert c.recv(16) == b"hello"
    zt.logs.wait_for(lambda ln: bool(_denials([ln])), timeout=5)
