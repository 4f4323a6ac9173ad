"""The ingress's /metrics: its own HTTP-layer metrics plus every replica's, labelled by replica.

The ingress runs the server's HTTP layer, so it keeps ServerMetrics' request,
latency, token and per-model families as they are. Everything that happens in an
engine — resolutions, downloads, adapter loads, KV-cache use, the scheduler's
queues — happens in a replica: those families come from the replicas' snapshots,
each sample with a `replica` label, under the same names as on `loraplex serve`.
`loraplex_replica_info{replica, pid, node}` says which process each replica is.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from loraplex.ray.wire import ReplicaSnapshot
from loraplex.server.metrics import PREFIX, ServerMetrics


class ReplicaMetricsCollector:
    def __init__(self, snapshots: Callable[[], list[ReplicaSnapshot]], skip: set[str]) -> None:
        """skip: family names the ingress reports itself (the replicas' copies are empty)."""
        self.snapshots = snapshots
        self.skip = skip

    def collect(self):
        info = GaugeMetricFamily(PREFIX + "replica_info", "one per live replica: its Ray replica id, "
                                 "process id and node", labels=["replica", "pid", "node"])
        families: dict[str, Metric] = {}
        for snapshot in self.snapshots():
            info.add_metric([snapshot.replica_id, str(snapshot.pid), snapshot.node_ip], 1)
            for family in text_string_to_metric_families(snapshot.metrics_text):
                # Text exposition gives a counter's or histogram's creation time as a family of
                # its own, NAME_created: it belongs with NAME.
                if family.name.removesuffix("_created") in self.skip:
                    continue
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "replica": snapshot.replica_id},
                                      sample.value, sample.timestamp)
        yield info
        yield from families.values()


class ClusterMetrics(ServerMetrics):
    def attach_backend(self, backend) -> None:
        """The ingress has no engine, resolver chain or downloads of its own: drop those
        families here and serve the replicas' instead (backend.snapshots: a RayBackend)."""
        for metric in (self.resolutions, self.resolution_seconds, self.adapters_served, self.downloads,
                       self.download_bytes, self.download_seconds, self.first_request_loads):
            self.registry.unregister(metric)
        self.model_name = backend.base_model_name      # the label of the vllm: request families
        own = {family.name for family in self.registry.collect()}
        self.registry.register(ReplicaMetricsCollector(lambda: backend.snapshots, skip=own))
