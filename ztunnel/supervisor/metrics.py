"""The supervisor's Prometheus registry and the stats endpoints (port 15020).

Serving follows upstream `src/metrics/server.rs` (reference §3.5) with one deliberate
difference: upstream always sends an OpenMetrics body (only the Content-Type varies), while
we send the classic text exposition to clients that do not ask for OpenMetrics, so that the
body matches its `text/plain; version=0.0.4` label.
"""

from __future__ import annotations

import gzip
import os
import resource
from collections.abc import Callable, Iterable, Iterator
from typing import cast

from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client import exposition as text_exposition
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.registry import Collector

from ztunnel.supervisor.http import Request, Response, Routes

OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# prometheus-client >= 0.22 labels its text output `version=1.0.0`; the body it produces for
# our (legacy-valid) names is the classic 0.0.4 format, which every scraper understands.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# These two are unannotated in prometheus-client.
_openmetrics_latest = cast(
    Callable[[CollectorRegistry], bytes], openmetrics_exposition.generate_latest
)
_disable_created_metrics = cast(Callable[[], None], disable_created_metrics)
# tower-http's default compression predicate skips bodies under 32 bytes.
_MIN_COMPRESS_BYTES = 32

# HELP texts of these metrics must not contain "unstable"; every other HELP must
# (reference §4.1, upstream `tests/direct.rs::test_stats_exist`).
STABLE_METRICS = frozenset(
    {
        "istio_build",
        "istio_tcp_connections_opened",
        "istio_tcp_connections_closed",
        "istio_tcp_received_bytes",
        "istio_tcp_sent_bytes",
        "process_max_fds",
        "process_open_fds",
    }
)

Pids = Callable[[], Iterable[int]]


def help_text(name: str, text: str) -> str:
    """HELP as upstream renders it: `(unstable)` unless stable, then the registry's period."""
    if name in STABLE_METRICS or "unstable" in text:
        return f"{text}."
    return f"{text} (unstable)."


# ---------------------------------------------------------------------------------------------
# Serving


def metrics_routes(registry: CollectorRegistry) -> Routes:
    """The stats server's route table: `/metrics` and `/stats/prometheus`, any method."""

    async def metrics(req: Request) -> Response:
        return metrics_response(req, registry)

    return {"/metrics": metrics, "/stats/prometheus": metrics}


def metrics_response(req: Request, registry: CollectorRegistry) -> Response:
    if wants_openmetrics(req.headers.get("accept", "")):
        body = _openmetrics_latest(registry)
        content_type = OPENMETRICS_CONTENT_TYPE
    else:
        body = text_exposition.generate_latest(registry)
        content_type = TEXT_CONTENT_TYPE
    if len(body) < _MIN_COMPRESS_BYTES:
        return Response(200, body, content_type)
    vary = ("vary", "accept-encoding")
    if not accepts_gzip(req.headers.get("accept-encoding", "")):
        return Response(200, body, content_type, (vary,))
    compressed = gzip.compress(body, compresslevel=6)
    return Response(200, compressed, content_type, (("content-encoding", "gzip"), vary))


def wants_openmetrics(accept: str) -> bool:
    """True if any Accept entry's media type is application/openmetrics-text (upstream).

    Upstream ignores q-values here, and so do we.
    """
    return any(_media_type(entry) == "application/openmetrics-text" for entry in accept.split(","))


def _media_type(entry: str) -> str:
    return entry.split(";", 1)[0].strip().lower()


def accepts_gzip(accept_encoding: str) -> bool:
    """`gzip` (or `x-gzip`, or `*` unless gzip is refused) with a non-zero q-value."""
    codings = dict(_coding(entry) for entry in accept_encoding.split(",") if entry.strip())
    for name in ("gzip", "x-gzip"):
        if name in codings:
            return codings[name] > 0
    return codings.get("*", 0.0) > 0


def _coding(entry: str) -> tuple[str, float]:
    name, *params = (p.strip() for p in entry.split(";"))
    q = 1.0
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            q = _qvalue(value)
    return name.lower(), q


def _qvalue(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        return 0.0


# ---------------------------------------------------------------------------------------------
# Registry


def build_registry(istio_version: str, *, pids: Pids | None = None) -> CollectorRegistry:
    """A registry with `istio_build` and process metrics summed over supervisor + workers.

    `pids` returns the pids to sum over (the supervisor's own and the live workers'); by
    default only this process. `_created` series are disabled process-wide: upstream exposes
    none.
    """
    _disable_created_metrics()
    registry = CollectorRegistry()
    build = Gauge(
        "istio_build",
        help_text("istio_build", "Istio component build info"),
        ["component", "tag"],
        registry=registry,
    )
    build.labels(component="ztunnel", tag=istio_version or "unknown").set(1)
    registry.register(ProcessMetrics(pids or _own_pid))
    return registry


def _own_pid() -> list[int]:
    return [os.getpid()]


class ProcessMetrics(Collector):
    """`process_*` metrics over several processes (upstream `src/metrics/process.rs`).

    Open fds and CPU/RSS are summed over the pids; `process_max_fds` is this process's
    RLIMIT_NOFILE soft limit. Pids that vanish while being read are skipped.
    """

    def __init__(self, pids: Pids) -> None:
        self._pids = pids

    def describe(self) -> Iterator[Metric]:
        yield from _families(0, 0, 0.0, 0)

    def collect(self) -> Iterator[Metric]:
        own = os.getpid()
        pids = sorted(set(self._pids()) | {own})
        open_fds = sum(count_open_fds(pid, own) for pid in pids)
        max_fds = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cpu, rss = 0.0, 0
        for pid in pids:
            pid_cpu, pid_rss = read_stat(pid)
            cpu += pid_cpu
            rss += pid_rss
        yield from _families(open_fds, max_fds, cpu, rss)


def _families(open_fds: int, max_fds: int, cpu: float, rss: int) -> Iterator[Metric]:
    # Upstream encodes these two descriptors directly, so their HELP has no trailing period.
    yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors", open_fds)
    yield GaugeMetricFamily("process_max_fds", "Maximum number of file descriptors", max_fds)
    yield CounterMetricFamily(
        "process_cpu_seconds",
        help_text("process_cpu_seconds", "Total user and system CPU time spent in seconds"),
        cpu,
    )
    yield GaugeMetricFamily(
        "process_resident_memory_bytes",
        help_text("process_resident_memory_bytes", "Resident memory size in bytes"),
        rss,
    )


def count_open_fds(pid: int, own: int) -> int:
    """Entries in /proc/<pid>/fd; for ourselves minus the fd the listing itself uses."""
    try:
        count = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0
    return count - 1 if pid == own else count


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, resident bytes) from /proc/<pid>/stat; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0, 0
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    # Counting from field 3 (state): utime is field 14, stime 15, rss 24 (proc(5)).
    utime, stime, rss = int(fields[11]), int(fields[12]), int(fields[21])
    return (utime + stime) / _CLOCK_TICKS, rss * _PAGE_SIZE
