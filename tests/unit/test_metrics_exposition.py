"""Stats endpoint negotiation and the process collector (ztunnel.supervisor.metrics)."""

from __future__ import annotations

import gzip
import subprocess
import sys

import pytest

from ztunnel.supervisor.http import Request
from ztunnel.supervisor.metrics import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    accepts_gzip,
    build_registry,
    count_open_fds,
    help_text,
    metrics_response,
    wants_openmetrics,
)


def get(headers: dict[str, str]) -> Request:
    return Request("GET", "/metrics", {}, headers)


@pytest.mark.parametrize(
    ("accept", "openmetrics"),
    [
        ("", False),
        ("application/json", False),
        ("text/plain;version=0.0.4", False),
        ("application/openmetrics-text; other stuff", True),
        ("application/json, Application/OpenMetrics-Text;q=0.1", True),
    ],
)
def test_openmetrics_is_chosen_by_media_type(accept: str, openmetrics: bool) -> None:
    assert wants_openmetrics(accept) is openmetrics
    response = metrics_response(get({"accept": accept}), build_registry("x"))
    expected = OPENMETRICS_CONTENT_TYPE if openmetrics else TEXT_CONTENT_TYPE
    assert response.content_type == expected


@pytest.mark.parametrize(
    ("encoding", "gzipped"),
    [
        ("", False),
        ("identity", False),
        ("br, zstd", False),
        ("gzip", True),
        ("GZIP;q=0.5", True),
        ("x-gzip", True),
        ("gzip;q=0", False),
        ("*", True),
        ("*, gzip;q=0", False),
        ("*;q=0", False),
        ("gzip;q=bogus", False),
    ],
)
def test_gzip_follows_accept_encoding(encoding: str, gzipped: bool) -> None:
    assert accepts_gzip(encoding) is gzipped
    response = metrics_response(get({"accept-encoding": encoding}), build_registry("x"))
    assert (("content-encoding", "gzip") in response.headers) is gzipped
    body = gzip.decompress(response.body) if gzipped else response.body
    assert b'istio_build{component="ztunnel",tag="x"} 1.0' in body


def test_empty_version_is_reported_as_unknown() -> None:
    assert (
        build_registry("").get_sample_value(
            "istio_build", {"component": "ztunnel", "tag": "unknown"}
        )
        == 1.0
    )


@pytest.mark.parametrize(
    ("name", "text", "rendered"),
    [
        ("istio_tcp_sent_bytes", "The size of total bytes sent", "The size of total bytes sent."),
        ("istio_xds_message", "Total number of messages", "Total number of messages (unstable)."),
        ("istio_dns_requests", "DNS requests (unstable)", "DNS requests (unstable)."),
    ],
)
def test_help_text_marks_unstable_metrics(name: str, text: str, rendered: str) -> None:
    assert help_text(name, text) == rendered


def test_open_fds_are_summed_over_worker_pids() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert count_open_fds(child.pid, own=-1) >= 3
        with_child = build_registry("x", pids=lambda: [child.pid])
        alone = build_registry("x")
        summed = with_child.get_sample_value("process_open_fds") or 0
        own = alone.get_sample_value("process_open_fds") or 0
        assert summed >= own + 3
    finally:
        child.kill()
        child.wait()
    assert count_open_fds(child.pid, own=-1) == 0
