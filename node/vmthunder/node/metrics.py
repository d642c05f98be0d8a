"""The node agent's Prometheus metrics.

Per image, the same figures the agent writes into its ImageReplica status (read at scrape time
from the agent's last statuses, so a scrape never touches the kernel), plus what only the agent
sees: its round latency and how often a replica changed parents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from vmthunder.operator.model import REPLICA_PHASES

ROUND_SECONDS = Histogram(
    "vmthunder_agent_round_seconds", "One reconcile round of the node agent",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REPARENTS = Counter(
    "vmthunder_agent_reparents", "Times a replica's attached parent changed", ["image"])


class ReplicaCollector(Collector):
    """Renders `statuses()` (image -> the replica status last written) as metrics."""

    def __init__(self, statuses: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
        self.statuses = statuses

    def collect(self) -> Iterator[Metric]:
        hydrated = GaugeMetricFamily("vmthunder_agent_hydrated_regions",
                                     "Regions of the image in the local cache", labels=["image"])
        total = GaugeMetricFamily("vmthunder_agent_total_regions",
                                  "Regions of the image", labels=["image"])
        from_parent = CounterMetricFamily("vmthunder_agent_bytes_from_parent",
                                          "Bytes read from the parent's export", labels=["image"])
        served = CounterMetricFamily("vmthunder_agent_bytes_served",
                                     "Bytes served to children from this node's export",
                                     labels=["image"])
        phase = GaugeMetricFamily("vmthunder_agent_replica_phase",
                                  "1 for the replica's current phase", labels=["image", "phase"])
        for image, s in sorted(self.statuses().items()):
            hydrated.add_metric([image], int(s.get("hydratedRegions", 0)))
            total.add_metric([image], int(s.get("totalRegions", 0)))
            from_parent.add_metric([image], int(s.get("bytesFromParent", 0)))
            served.add_metric([image], int(s.get("bytesServed", 0)))
            for p in REPLICA_PHASES:
                phase.add_metric([image, p], 1 if s.get("phase") == p else 0)
        yield from (hydrated, total, from_parent, served, phase)


def register(statuses: Callable[[], Mapping[str, Mapping[str, Any]]]) -> None:
    REGISTRY.register(ReplicaCollector(statuses))
