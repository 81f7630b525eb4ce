"""Worker metrics aggregated in the supervisor and exposed through prometheus-client.

Workers push counter deltas and absolute gauge values (ipc.MetricsPush). Counters sum
forever, so what a dead worker pushed stays; its gauges are dropped with it, since its
sockets died too. Upstream encodes the optional region/zone labels only when a workload
applied, so label sets vary within a family: a custom collector, not `Counter.labels()`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from ztunnel.core import ipc
from ztunnel.core import metrics as m

Key = tuple[str, m.Labels]


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: str  # "counter" | "gauge"
    help: str


# Upstream HELP texts (src/proxy/metrics.rs); "(unstable)" marks the unstable ones.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(m.TCP_OPENED, "counter", "The total number of TCP connections opened"),
        Family(m.TCP_CLOSED, "counter", "The total number of TCP connections closed"),
        Family(
            m.TCP_RECEIVED,
            "counter",
            "The size of total bytes received during request in case of a TCP connection",
        ),
        Family(
            m.TCP_SENT,
            "counter",
            "The size of total bytes sent during response in case of a TCP connection",
        ),
        Family(
            m.TCP_FAILED,
            "counter",
            "The total number of TCP connections that failed to establish (unstable)",
        ),
        Family(m.TCP_SOCKETS_OPEN, "gauge", "The current number of open TCP sockets (unstable)"),
        Family(
            m.ON_DEMAND_DNS,
            "counter",
            "The total number of requests that used on-demand DNS (unstable)",
        ),
        Family(
            "istio_crl_policy_rejections",
            "counter",
            "The total number of connections rejected or closed because a certificate in the "
            "peer's chain is revoked (unstable)",
        ),
        Family(
            "istio_crl_untracked_connections",
            "counter",
            "The total number of connections that could not be tracked for CRL re-checks "
            "(unstable)",
        ),
        Family("istio_dns_requests", "counter", "Total number of DNS requests (unstable)"),
        Family(
            "istio_dns_upstream_requests",
            "counter",
            "Total number of DNS requests forwarded to upstream (unstable)",
        ),
        Family(
            "istio_dns_upstream_failures",
            "counter",
            "Total number of DNS requests that failed to forward upstream (unstable)",
        ),
        Family(
            "istio_dns_upstream_request_duration_seconds",
            "histogram",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
        ),
    )
}
_HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


class WorkerMetricsCollector(Collector):
    """Sums of every worker's pushes, served by the supervisor's registry."""

    def __init__(self) -> None:
        self._counters: defaultdict[Key, float] = defaultdict(float)
        self._gauges: dict[str, dict[Key, float]] = {}

    def apply(self, worker: str, push: ipc.MetricsPush) -> None:
        for c in push.counters:
            self._counters[c.family, c.labels] += c.value
        self._gauges[worker] = {(g.family, g.labels): g.value for g in push.gauges}

    def forget_worker(self, worker: str) -> None:
        self._gauges.pop(worker, None)

    def counter_value(self, family: str, **labels: str) -> float:
        """Sum of a counter over series whose labels include `labels` (tests, debugging)."""
        want = set(labels.items())
        return sum(v for (f, ls), v in self._counters.items() if f == family and want <= set(ls))

    def describe(self) -> list[Metric]:
        return []  # families come and go with traffic; never pre-declared

    def collect(self) -> Iterator[Metric]:
        series: defaultdict[str, dict[m.Labels, float]] = defaultdict(dict)
        for (family, labels), v in self._counters.items():
            series[family][labels] = v
        for per_worker in self._gauges.values():
            for (family, labels), v in per_worker.items():
                fam = series[family]
                fam[labels] = fam.get(labels, 0.0) + v
        histograms: defaultdict[str, list[tuple[str, dict[m.Labels, float]]]] = defaultdict(list)
        for name in sorted(series):
            base = _histogram_base(name)
            if base is not None:
                histograms[base].append((name, series[name]))
            else:
                yield _metric(name, series[name])
        for base, parts in sorted(histograms.items()):
            metric = Metric(base, FAMILIES[base].help, "histogram")
            for name, values in parts:
                metric.samples += [Sample(name, dict(ls), v) for ls, v in values.items()]
            yield metric


def _histogram_base(name: str) -> str | None:
    """Histograms arrive as `<base>_bucket` / `_sum` / `_count` counter increments."""
    for part in _HISTOGRAM_PARTS:
        base = name.removesuffix(part)
        if base != name and FAMILIES.get(base, Family(base, "", "")).kind == "histogram":
            return base
    return None


def _metric(name: str, values: dict[m.Labels, float]) -> Metric:
    family = FAMILIES.get(name) or Family(name, "counter", f"{name} (unstable)")
    metric = Metric(name, family.help, family.kind)
    suffix = "_total" if family.kind == "counter" else ""
    for labels, v in values.items():
        metric.samples.append(Sample(name + suffix, dict(labels), v))
    return metric
