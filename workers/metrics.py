"""Per-worker counters: plain dicts keyed by (family, labels), pushed to the supervisor.

An increment costs a dict update (~0.1 us); the supervisor owns the Prometheus registry
(DESIGN §1, "Metrics"). Counters are deltas since the last push; gauges are absolute.
"""

from __future__ import annotations

from collections import defaultdict

from ztunnel.core import ipc
from ztunnel.core.metrics import Labels


class WorkerMetrics:
    __slots__ = ("_counters", "_gauges")

    def __init__(self) -> None:
        self._counters: defaultdict[tuple[str, Labels], float] = defaultdict(float)
        self._gauges: defaultdict[tuple[str, Labels], float] = defaultdict(float)

    def inc(self, family: str, labels: Labels, value: float = 1) -> None:
        self._counters[family, labels] += value

    def gauge_add(self, family: str, labels: Labels, value: float) -> None:
        self._gauges[family, labels] += value

    def take_push(self, *, final: bool = False) -> ipc.MetricsPush:
        """Counter deltas since the last call, and current gauge values."""
        counters = tuple(
            ipc.CounterDelta(family, labels, v) for (family, labels), v in self._counters.items()
        )
        self._counters.clear()
        gauges = tuple(
            ipc.GaugeValue(family, labels, v) for (family, labels), v in self._gauges.items()
        )
        return ipc.MetricsPush(counters=counters, gauges=gauges, final=final)
