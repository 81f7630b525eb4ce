"""Fixtures for tests that run the real `ztunnel` command on loopback."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
from harness import (
    EchoServer,
    Ports,
    StartZtunnel,
    ZtunnelProcess,
    wait_ports_free,
    ztunnel_env,
)

DEFAULT_WORKERS = 2
PORT_RELEASE_TIMEOUT = 15.0  # seconds: a previous ztunnel may still be draining


@pytest.fixture
def ztunnel() -> Iterator[StartZtunnel]:
    """Start ztunnel with env overrides; every process group it started is killed at teardown.

    Tests share the default ports, so a start first waits for them to be free (unless the
    test holds one on purpose) and the teardown waits until they are released again.
    """
    started: list[ZtunnelProcess] = []

    def start(
        env: Mapping[str, str] | None = None,
        *,
        workers: int = DEFAULT_WORKERS,
        ready: bool = True,
        wait_for_ports: bool = True,
    ) -> ZtunnelProcess:
        full_env = ztunnel_env({"ZTUNNEL_WORKERS": str(workers), **(env or {})})
        if wait_for_ports:
            wait_ports_free(Ports.from_env(full_env).all(), PORT_RELEASE_TIMEOUT)
        proc = ZtunnelProcess(full_env)
        started.append(proc)
        if ready:
            proc.wait_ready()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
        for proc in started:
            wait_ports_free(proc.ports.all(), PORT_RELEASE_TIMEOUT)


@pytest.fixture
def echo_server() -> Iterator[EchoServer]:
    with EchoServer() as server:
        yield server
