"""The supervisor as users run it: workers, readiness, start errors, shutdown, the CLI."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from harness import (
    LOCALHOST,
    START_TIMEOUT,
    EchoServer,
    HTTPReply,
    Ports,
    StartZtunnel,
    ZtunnelProcess,
    connection_ended,
    echo_once,
    http_request,
    listening_backlogs,
    poll_until,
    run_cli,
    socks5_connect,
    wait_ports_free,
)

STARTED_WORKER = re.compile(r"started worker (\d+) \(pid (\d+)\)")


def open_echo_connections(
    zt: ZtunnelProcess, echo: EchoServer, count: int, timeout: float = 5.0
) -> list[socket.socket]:
    """`count` SOCKS5 connections to the echo server, each proven to echo."""
    conns = []
    try:
        for i in range(count):
            conn = socks5_connect(LOCALHOST, zt.ports.socks5, echo.host, echo.port, timeout)
            conns.append(conn)
            assert echo_once(conn, f"hello {i}".encode()) == f"hello {i}".encode()
    except BaseException:
        close_all(conns)
        raise
    return conns


def close_all(conns: list[socket.socket]) -> None:
    for conn in conns:
        conn.close()


@contextlib.contextmanager
def echo_connections(
    zt: ZtunnelProcess, echo: EchoServer, count: int
) -> Iterator[list[socket.socket]]:
    conns = open_echo_connections(zt, echo, count)
    try:
        yield conns
    finally:
        close_all(conns)


def owners_of(zt: ZtunnelProcess, conns: list[socket.socket]) -> dict[socket.socket, int]:
    """The worker pid that accepted each client connection on the SOCKS5 port."""
    client_ports = {conn: conn.getsockname()[1] for conn in conns}

    def probe() -> dict[socket.socket, int] | None:
        by_port = zt.connection_owners(zt.ports.socks5)
        if not all(port in by_port for port in client_ports.values()):
            return None
        return {conn: by_port[port] for conn, port in client_ports.items()}

    return poll_until(probe, 5.0, "every connection to be owned by a worker")


def connect_refused(port: int) -> bool:
    try:
        socket.create_connection((LOCALHOST, port), timeout=1.0).close()
    except ConnectionRefusedError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Workers


@pytest.mark.timeout(60)
def test_worker_count_comes_from_env_and_connections_spread_across_workers(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    zt = ztunnel(workers=3)
    pids = zt.wait_for_workers(3)
    zt.wait_for_message("starting 3 worker processes (ZTUNNEL_WORKERS=3)")
    logged = {
        int(m.group(1)): int(m.group(2))
        for line in zt.logs.lines()
        if (m := STARTED_WORKER.search(line.message)) is not None
    }
    assert sorted(logged) == [0, 1, 2]
    assert set(logged.values()) == set(pids)

    with echo_connections(zt, echo_server, 30) as conns:
        owners = owners_of(zt, conns)
        assert set(owners.values()) <= set(pids)
        assert len(set(owners.values())) > 1, f"all 30 connections on one worker: {owners}"


@pytest.mark.timeout(60)
def test_killed_worker_is_replaced_without_disturbing_other_workers_connections(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    zt = ztunnel(workers=3)
    pids = zt.wait_for_workers(3)
    with echo_connections(zt, echo_server, 24) as conns:
        owners = owners_of(zt, conns)
        victim = owners[conns[0]]
        survivors = [c for c in conns if owners[c] != victim]
        doomed = [c for c in conns if owners[c] == victim]
        assert survivors, f"every connection landed on worker {victim}"

        os.kill(victim, signal.SIGKILL)
        new_pids = zt.wait_for_workers(3, timeout=5.0, without=[victim])
        (replacement,) = set(new_pids) - set(pids)
        zt.wait_for_message(f"(pid {victim}) died with signal SIGKILL")

        # The dead worker's connections end; the others carry on with the same owner.
        assert all(connection_ended(c, 2.0) for c in doomed)
        for i, conn in enumerate(survivors):
            conn.settimeout(2.0)
            assert echo_once(conn, f"still here {i}".encode()) == f"still here {i}".encode()
        survivor_owners = owners_of(zt, survivors)
        assert all(survivor_owners[c] == owners[c] for c in survivors)

        # The replacement accepts and serves new connections within a few seconds.
        fresh: list[socket.socket] = []
        try:

            def lands_on_replacement() -> bool | None:
                conn = socks5_connect(
                    LOCALHOST, zt.ports.socks5, echo_server.host, echo_server.port
                )
                fresh.append(conn)
                assert echo_once(conn, b"new") == b"new"
                owner = owners_of(zt, [conn])[conn]
                return True if owner == replacement else None

            poll_until(lands_on_replacement, 5.0, f"a connection served by worker {replacement}")
        finally:
            close_all(fresh)
    zt.wait_ready(5.0)


# ---------------------------------------------------------------------------------------------
# Readiness


@pytest.mark.timeout(60)
def test_readiness_turns_200_only_once_state_is_loaded_and_workers_serve(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    zt = ztunnel(workers=2, ready=False)
    answers: list[HTTPReply] = []

    def ready() -> float | None:
        assert zt.running(), zt.logs.tail()
        reply = zt.try_readiness()
        if reply is not None:
            answers.append(reply)
        return time.time() if reply is not None and reply.status == 200 else None

    ready_at = poll_until(ready, START_TIMEOUT, "readiness 200", interval=0.005)

    # Every worker is serving right now: handshakes do not wait in a backlog.
    workers = zt.worker_pids()
    conns = [
        socks5_connect(LOCALHOST, zt.ports.socks5, echo_server.host, echo_server.port, timeout=1.0)
        for _ in range(8)
    ]
    close_all(conns)
    assert len(workers) == 2
    loaded = zt.wait_for_message("loaded local config: 2 workloads, 2 services, 1 policies", 1.0)
    assert loaded.timestamp is not None and loaded.timestamp <= ready_at

    assert answers[0].status == 500, answers[0]
    assert answers[0].body.startswith("not ready, pending: "), answers[0]
    assert answers[-1] == HTTPReply(200, "ready\n")
    assert all(a.status == 500 and "pending: " in a.body for a in answers[:-1])

    dump = zt.config_dump()
    assert {
        "workloads",
        "services",
        "policies",
        "stagedServices",
        "staticConfig",
        "version",
        "config",
        "certificates",
    } <= set(dump)
    assert sorted(w["uid"] for w in dump["workloads"]) == [
        "cluster1//v1/Pod/default/local",
        "cluster1//v1/Pod/default/local-tcp",
    ]
    assert sorted(s["hostname"] for s in dump["services"]) == [
        "example.com",
        "example2.com",
    ]
    assert [f"{p['namespace']}/{p['name']}" for p in dump["policies"]] == ["default/deny-9999"]


@pytest.mark.timeout(60)
def test_readiness_and_metrics_answer_on_ipv4_loopback(ztunnel: StartZtunnel) -> None:
    zt = ztunnel()
    assert http_request("GET", LOCALHOST, zt.ports.readiness, "/healthz/ready").status == 200
    assert http_request("GET", LOCALHOST, zt.ports.stats, "/metrics").status == 200


@pytest.mark.timeout(60)
@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2) to read backlogs")
def test_data_plane_listeners_keep_their_1024_accept_backlog(ztunnel: StartZtunnel) -> None:
    zt = ztunnel(workers=2)
    for port in (zt.ports.outbound, zt.ports.inbound_plaintext, zt.ports.socks5):
        assert listening_backlogs(port) == [1024, 1024], port


@pytest.mark.timeout(60)
def test_logging_level_change_reaches_the_workers(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    zt = ztunnel({"LOG_FORMAT": "json"}, workers=2)
    reply = http_request("POST", LOCALHOST, zt.ports.admin, "/logging?level=access=debug")
    assert reply == HTTPReply(200, "current log level is access=debug,info\n")

    def opened_on_every_worker() -> bool | None:
        with echo_connections(zt, echo_server, 2):
            pass
        opened = zt.logs.find(lambda line: line.is_access("connection opened"))
        return True if {line.process for line in opened} == {"worker0", "worker1"} else None

    poll_until(opened_on_every_worker, 3.0, "debug access lines from both workers", interval=0.1)


# ---------------------------------------------------------------------------------------------
# Start errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("host", "port"),
    [
        pytest.param("127.0.0.1", Ports().socks5, id="socks5"),
        pytest.param("::", Ports().readiness, id="readiness"),
        pytest.param("::", Ports().outbound, id="outbound"),
    ],
)
def test_port_already_in_use_fails_start_with_status_1(
    ztunnel: StartZtunnel, host: str, port: int
) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wait_ports_free(Ports().all())
    with socket.socket(family, socket.SOCK_STREAM) as squatter:
        # SO_REUSEADDR only skips earlier tests' TIME_WAIT sockets; no SO_REUSEPORT.
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            squatter.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # [::] holds v4 too
        squatter.bind((host, port))
        squatter.listen(1)
        zt = ztunnel(ready=False, wait_for_ports=False)
        assert zt.wait_exit(10.0) == 1, zt.logs.tail()
    errors = zt.logs.find(
        lambda line: (
            str(port) in line.text
            and "address already in use" in line.text.lower()
            and (line.level == "error" or line.stream == "stderr")
        )
    )
    assert errors, zt.logs.tail()
    assert not zt.group_members(), "workers outlived a failed start"


# ---------------------------------------------------------------------------------------------
# Shutdown


@pytest.mark.timeout(60)
def test_sigterm_drains_open_connection_until_termination_deadline(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    zt = ztunnel({"CONNECTION_TERMINATION_DEADLINE": "2s"})
    with echo_connections(zt, echo_server, 1) as (conn,):
        sent_at = time.monotonic()
        zt.signal(signal.SIGTERM)
        zt.wait_for_message("received shutdown request")

        poll_until(
            lambda: True if connect_refused(zt.ports.socks5) else None,
            1.5,
            "new connections to be refused",
        )
        time.sleep(max(0.0, sent_at + 1.0 - time.monotonic()))
        assert zt.running()
        conn.settimeout(1.0)
        assert echo_once(conn, b"draining") == b"draining"

        code = zt.wait_exit(timeout=sent_at + 2.0 + 2.5 - time.monotonic())
        elapsed = time.monotonic() - sent_at
        assert code == 0, zt.logs.tail()
        assert elapsed >= 1.9, f"exited after {elapsed:.2f}s, before the 2s deadline"
        assert connection_ended(conn, 1.0)
    cut = zt.wait_for_log(lambda line: line.is_access(), 1.0, "access log of the cut connection")
    assert cut.fields["error"] == "connection closed due to connection drain"
    zt.wait_for_message("shutdown complete", 1.0)
    assert not zt.group_members()


@pytest.mark.timeout(60)
def test_sigterm_exits_promptly_once_the_last_connection_closes(
    ztunnel: StartZtunnel, echo_server: EchoServer
) -> None:
    # A deadline far beyond the bound below: only the close can end the drain in time.
    zt = ztunnel({"CONNECTION_TERMINATION_DEADLINE": "20s"})
    with echo_connections(zt, echo_server, 1) as (conn,):
        zt.signal(signal.SIGTERM)
        zt.wait_for_message("received shutdown request")
        conn.settimeout(1.0)
        assert echo_once(conn, b"last words") == b"last words"
        conn.close()
        closed_at = time.monotonic()
    assert zt.wait_exit(timeout=1.5) == 0, zt.logs.tail()
    assert time.monotonic() - closed_at < 1.5


@pytest.mark.timeout(60)
def test_quitquitquit_answers_and_exits_0(ztunnel: StartZtunnel) -> None:
    zt = ztunnel()
    assert zt.quit() == HTTPReply(200, "shutdown now\n")
    assert zt.wait_exit(5.0) == 0, zt.logs.tail()
    zt.wait_for_message("shutdown complete", 1.0)


# ---------------------------------------------------------------------------------------------
# CLI


@pytest.mark.timeout(30)
def test_version_command_prints_build_info() -> None:
    result = run_cli("version")
    assert result.code == 0, result
    assert result.stdout.startswith('version.BuildInfo{Version:"'), result


@pytest.mark.timeout(30)
def test_unknown_command_exits_1() -> None:
    result = run_cli("bogus")
    assert result.code == 1, result
    assert "unknown command" in result.stderr


@pytest.mark.timeout(30)
def test_invalid_env_var_fails_start_with_status_1() -> None:
    result = run_cli(env={"FAKE_CA": "True"}, timeout=10.0)
    assert result.code == 1, result
    assert "invalid env var FAKE_CA=True" in result.stderr + result.stdout
