"""Worker counters reach the supervisor quickly and survive the worker that counted them."""

from __future__ import annotations

import os
import signal
import time

import pytest
from harness import LOCALHOST, EchoServer, StartZtunnel, poll_until, send_and_drain, socks5_connect

CLOSED = "istio_tcp_connections_closed_total"


def _one_connection(zt_socks5_port: int, echo: EchoServer) -> None:
    with socks5_connect(LOCALHOST, zt_socks5_port, echo.host, echo.port) as conn:
        received, clean = send_and_drain(conn, b"x" * 1000)
    assert clean and received == b"x" * 1000


@pytest.mark.timeout(60)
def test_closed_connection_is_counted_within_two_seconds(ztunnel: StartZtunnel) -> None:
    zt = ztunnel(workers=2)
    with EchoServer() as echo:
        for _ in range(3):
            before = zt.metric_value(CLOSED, reporter="source")
            _one_connection(zt.ports.socks5, echo)
            closed_at = time.monotonic()
            poll_until(
                lambda b=before: zt.metric_value(CLOSED, reporter="source") > b or None,
                3.0,
                "the closed counter",
                interval=0.05,
            )
            elapsed = time.monotonic() - closed_at
            print(f"closed connection visible in /metrics after {elapsed * 1000:.0f} ms")
            assert elapsed < 2.0


@pytest.mark.timeout(90)
def test_counts_survive_killed_workers_and_clean_exits_flush(ztunnel: StartZtunnel) -> None:
    zt = ztunnel(workers=2)
    with EchoServer() as echo:
        for _ in range(4):
            _one_connection(zt.ports.socks5, echo)
        poll_until(lambda: zt.metric_value(CLOSED, reporter="source") >= 4 or None, 5.0, "4 closed")
        # SIGKILL: what the workers had pushed stays with the supervisor.
        old = zt.worker_pids()
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        zt.wait_for_workers(2, timeout=15.0, without=old)
        zt.wait_ready()
        assert zt.metric_value(CLOSED, reporter="source") >= 4
        # A clean exit pushes what was counted since the last heartbeat.
        before = zt.metric_value(CLOSED, reporter="source")
        _one_connection(zt.ports.socks5, echo)
        for pid in zt.worker_pids():
            os.kill(pid, signal.SIGTERM)
        poll_until(
            lambda: zt.metric_value(CLOSED, reporter="source") >= before + 1 or None,
            10.0,
            "the last connection, flushed by the exiting worker",
        )
