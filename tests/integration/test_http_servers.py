"""Admin, readiness and stats servers on real loopback sockets."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, Counter

from ztunnel.supervisor.admin import admin_routes
from ztunnel.supervisor.http import (
    HTTPServer,
    Routes,
)
from ztunnel.supervisor.metrics import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    build_registry,
    help_text,
    metrics_routes,
)
from ztunnel.supervisor.readiness import Readiness, readiness_routes
from ztunnel.telemetry import LogControl

HOST = "127.0.0.1"
# Upstream Prometheus' own Accept header (upstream metrics/server.rs test_content_type).
PROMETHEUS_ACCEPT = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;"
    "q=0.6,application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;"
    "escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


def _request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


async def call(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> Reply:
    """http.client is blocking; the server runs on this loop, so the client gets a thread."""
    return await asyncio.to_thread(_request, port, method, path, headers)


@asynccontextmanager
async def serving(routes: Routes, **kwargs: float) -> AsyncIterator[tuple[HTTPServer, int]]:
    server = HTTPServer(routes, "test", **kwargs)
    port = await server.start(HOST, 0)
    try:
        yield server, port
    finally:
        await server.close(grace=1.0)


@pytest.fixture
def log_control() -> Iterator[LogControl]:
    root = logging.getLogger()
    level = root.level
    control = LogControl("access=off,info")
    yield control
    control.set("info")
    root.setLevel(level)


class Quitter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def admin(log_control: LogControl, on_quit: Callable[[], Awaitable[None] | None]) -> Routes:
    return admin_routes(
        config_dump=lambda: {"workloads": [], "config": {"proxyMode": "dedicated"}},
        log_control=log_control,
        on_quit=on_quit,
        quit_timeout=0.2,
    )


# -- admin -------------------------------------------------------------------------------------


async def test_index_lists_the_endpoints(log_control: LogControl) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        reply = await call(port, "GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    for path in ("config_dump", "logging", "quitquitquit"):
        assert f'href="{path}"' in reply.text
    assert "pprof" not in reply.text


@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
async def test_config_dump_is_pretty_json_for_any_method(
    log_control: LogControl, method: str
) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        reply = await call(port, method, "/config_dump")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert json.loads(reply.body) == {"workloads": [], "config": {"proxyMode": "dedicated"}}
    assert '\n  "config": {\n    "proxyMode": "dedicated"\n  }' in reply.text


async def test_config_dump_failure_is_500_with_the_error_text(log_control: LogControl) -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("state unavailable")

    routes = admin_routes(config_dump=broken, log_control=log_control, on_quit=Quitter())
    async with serving(routes) as (_, port):
        reply = await call(port, "GET", "/config_dump")
    assert (reply.status, reply.body) == (500, b"state unavailable")


async def test_logging_rejects_get_with_help(log_control: LogControl) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        reply = await call(port, "GET", "/logging")
    assert reply.status == 405
    assert reply.text.startswith("Invalid HTTP method\n")
    assert "usage: POST /logging?level=<level>" in reply.text


async def test_logging_post_changes_levels(log_control: LogControl) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        listed = await call(port, "POST", "/logging")
        appended = await call(port, "POST", "/logging?level=access=debug")
        reset = await call(port, "POST", "/logging?reset&level=debug")
        reset_only = await call(port, "POST", "/logging?reset=true")
        empty_level = await call(port, "POST", "/logging?level=")
    assert (listed.status, listed.text) == (200, "current log level is access=off,info\n")
    assert listed.headers["content-type"] == "text/plain"
    assert appended.text == "current log level is access=debug,info\n"
    # upstream admin.rs::test_change_log_level: reset then append
    assert reset.text == "current log level is access=off,debug\n"
    assert reset_only.text == "current log level is access=off,info\n"
    assert empty_level.text == "current log level is access=off,info\n"


@pytest.mark.parametrize("level", ["verbose", "access:debug", "access=loud", "info,"])
async def test_logging_invalid_level_is_400(log_control: LogControl, level: str) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        reply = await call(port, "POST", f"/logging?level={level}")
    assert reply.status == 400
    assert reply.text.startswith(f"Invalid level provided: {level}\n")
    assert "hint: loglevel:" in reply.text
    assert log_control.current() == "access=off,info"


async def test_quitquitquit_post_triggers_shutdown(log_control: LogControl) -> None:
    quitter = Quitter()
    async with serving(admin(log_control, quitter)) as (_, port):
        reply = await call(port, "POST", "/quitquitquit")
    assert (reply.status, reply.text) == (200, "shutdown now\n")
    assert quitter.calls == 1


async def test_quitquitquit_awaits_an_async_trigger_within_the_deadline(
    log_control: LogControl,
) -> None:
    started = asyncio.Event()

    async def slow_quit() -> None:
        started.set()
        await asyncio.sleep(30)

    async with serving(admin(log_control, slow_quit)) as (_, port):
        reply = await call(port, "POST", "/quitquitquit")
    assert started.is_set()
    assert (reply.status, reply.text) == (200, "shutdown now\n")


async def test_quitquitquit_get_is_405_without_body(log_control: LogControl) -> None:
    quitter = Quitter()
    async with serving(admin(log_control, quitter)) as (_, port):
        reply = await call(port, "GET", "/quitquitquit")
    assert (reply.status, reply.body) == (405, b"")
    assert quitter.calls == 0


@pytest.mark.parametrize("path", ["/nope", "/debug/pprof/profile", "/debug/pprof/heap"])
async def test_unknown_admin_paths_are_404_empty(log_control: LogControl, path: str) -> None:
    async with serving(admin(log_control, Quitter())) as (_, port):
        reply = await call(port, "GET", path)
    assert (reply.status, reply.body) == (404, b"")
    assert "content-type" not in reply.headers


# -- readiness ---------------------------------------------------------------------------------


async def test_readiness_follows_pending_tasks() -> None:
    readiness = Readiness()
    readiness.register("state manager")
    readiness.register("proxy")
    async with serving(readiness_routes(readiness)) as (_, port):
        both = await call(port, "GET", "/healthz/ready")
        readiness.mark_ready("state manager")
        one = await call(port, "GET", "/healthz/ready")
        readiness.mark_ready("proxy")
        ready = await call(port, "GET", "/healthz/ready")
        readiness.rearm("workload proxy manager")
        again = await call(port, "GET", "/healthz/ready")
    assert (both.status, both.text) == (500, "not ready, pending: proxy, state manager\n")
    assert (one.status, one.text) == (500, "not ready, pending: proxy\n")
    assert (ready.status, ready.text) == (200, "ready\n")
    assert ready.headers["content-type"] == "text/plain"
    assert (again.status, again.text) == (500, "not ready, pending: workload proxy manager\n")
    assert not readiness.is_ready()


async def test_readiness_method_and_path_errors() -> None:
    async with serving(readiness_routes(Readiness())) as (_, port):
        post = await call(port, "POST", "/healthz/ready")
        other = await call(port, "GET", "/healthz/live")
    assert (post.status, post.body) == (405, b"")
    assert (other.status, other.body) == (404, b"")


# -- metrics -----------------------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    reg = build_registry("1.24.0")
    counter = Counter(
        "istio_xds_message",
        help_text("istio_xds_message", "Total number of messages received"),
        ["url"],
        registry=reg,
    )
    counter.labels(url="type.googleapis.com/istio.workload.Address").inc()
    return reg


async def test_metrics_default_to_the_classic_text_format(registry: CollectorRegistry) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        reply = await call(port, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == TEXT_CONTENT_TYPE
    assert "content-encoding" not in reply.headers
    assert 'istio_build{component="ztunnel",tag="1.24.0"} 1.0' in reply.text
    assert "# EOF" not in reply.text


@pytest.mark.parametrize(
    "accept", [PROMETHEUS_ACCEPT, "application/json, application/openmetrics-text"]
)
async def test_metrics_negotiate_openmetrics(registry: CollectorRegistry, accept: str) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        reply = await call(port, "POST", "/stats/prometheus", {"Accept": accept})
    assert reply.status == 200
    assert reply.headers["content-type"] == OPENMETRICS_CONTENT_TYPE
    assert reply.text.endswith("# EOF\n")
    assert "# HELP istio_build Istio component build info.\n" in reply.text


@pytest.mark.parametrize("encoding", ["gzip", "br;q=1.0, gzip;q=0.8", "*"])
async def test_metrics_are_gzipped_when_accepted(
    registry: CollectorRegistry, encoding: str
) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        reply = await call(port, "GET", "/metrics", {"Accept-Encoding": encoding})
    assert reply.headers["content-encoding"] == "gzip"
    assert reply.headers["vary"] == "accept-encoding"
    assert b"istio_build{" in gzip.decompress(reply.body)


async def test_metrics_have_no_created_series(registry: CollectorRegistry) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        text = await call(port, "GET", "/metrics")
        om = await call(port, "GET", "/metrics", {"Accept": "application/openmetrics-text"})
    assert "istio_xds_message_total{" in text.text
    assert "_created" not in text.text and "_created" not in om.text


async def test_process_metrics_count_open_fds(registry: CollectorRegistry) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        reply = await call(port, "GET", "/metrics")
    values = {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in reply.text.splitlines())
        if name.startswith("process_")
    }
    assert values["process_open_fds"] > 0
    assert values["process_max_fds"] >= values["process_open_fds"]
    assert values["process_resident_memory_bytes"] > 0


async def test_metric_help_texts_follow_the_stability_rule(registry: CollectorRegistry) -> None:
    async with serving(metrics_routes(registry)) as (_, port):
        reply = await call(port, "GET", "/metrics", {"Accept": "application/openmetrics-text"})
    helps = dict(
        line.removeprefix("# HELP ").split(" ", 1)
        for line in reply.text.splitlines()
        if line.startswith("# HELP ")
    )
    stable = {"istio_build", "process_open_fds", "process_max_fds"}
    assert stable <= helps.keys()
    for name, text in helps.items():
        assert ("unstable" in text) == (name not in stable), (name, text)
