"""Prometheus metrics of one server, in a registry of the app's own (no global state).

Three sources: the HTTP layer (request counts, latencies, tokens, per-adapter
traffic), the backend's resolution listener (first-request resolutions), and a
collector that reads the engine's counters at scrape time (running/waiting
requests, KV-cache use, LoRA cache hits, loads, evictions, downloads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from loraplex.resolvers.cache import DOWNLOAD_LISTENERS
from loraplex.resolvers.eviction import EVICTION_LISTENERS, OVER_BOUND_LISTENERS

logger = logging.getLogger(__name__)

PREFIX = "loraplex_"
VLLM_PREFIX = "vllm:"   # vLLM's names of what routers and autoscalers read (VLLMEngineCollector, ServerMetrics.vllm)
OTHER_ADAPTERS = "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# Finer where decode steps lie (5-30 ms on a GPU): a tail of 1.5 or 2 steps must be told apart.
INTER_TOKEN_BUCKETS = (0.0025, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.04, 0.05,
                       0.075, 0.1, 0.25, 0.5, 1, 2.5)


class BoundedLabels:
    """Maps adapter names to label values: the first `max_names` names seen keep their
    own label, later ones share OTHER_ADAPTERS, so label cardinality stays bounded."""

    def __init__(self, max_names: int) -> None:
        self.max_names = max_names
        self._names: set[str] = set()

    def __call__(self, name: str) -> str:
        if name in self._names:
            return name
        if len(self._names) < self.max_names:
            self._names.add(name)
            return name
        return OTHER_ADAPTERS


def read_stats(source: Callable[[], dict]) -> dict:
    """The engine's stats for a scrape; {} when they cannot be read (a scrape never fails for it)."""
    try:
        return source() or {}
    except Exception:   # noqa: BLE001 - logged; the scrape goes on without them
        logger.exception("reading engine stats for /metrics failed")
        return {}


class EngineStatsCollector:
    """Reads `stats_source()` (a flat dict of numbers) at scrape time.

    Keys ending in `_total` become counters, the rest gauges; a key may carry one
    label as "name{label=value}" (e.g. "lora_cache_hits_total{tier=cpu}").
    """

    def __init__(self, stats_source: Callable[[], dict]) -> None:
        self.stats_source = stats_source

    def collect(self):
        stats = read_stats(self.stats_source)
        families: dict[str, Any] = {}
        for key, value in sorted(stats.items()):
            name, labels = key, {}
            if "{" in key and key.endswith("}"):
                name, label_text = key[:-1].split("{", 1)
                label, _, label_value = label_text.partition("=")
                labels = {label: label_value}
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            family = families.get(name)
            if family is None:
                doc = f"engine statistic {name}"
                is_counter = name.endswith("_total")
                cls = CounterMetricFamily if is_counter else GaugeMetricFamily
                family_name = PREFIX + (name[: -len("_total")] if is_counter else name)
                family = families[name] = cls(family_name, doc, labels=list(labels))
            family.add_metric(list(labels.values()), float(value))
        yield from families.values()


class VLLMEngineCollector:
    """vLLM's names for the engine's state, read at scrape time, labelled with the served model's
    name as vLLM labels them: what the Gateway API inference extension's endpoint picker, KEDA
    autoscalers and vLLM dashboards read. `vllm:lora_requests_info` is vLLM's LoRA gauge: its
    labels name the adapters of running and waiting requests and max_lora, its value is when
    that was true (the picker keeps the newest)."""

    def __init__(self, stats_source: Callable[[], dict], model_name: str) -> None:
        self.stats_source = stats_source
        self.model_name = model_name

    def collect(self):
        stats = read_stats(self.stats_source)
        label = [self.model_name]
        gauges = {"num_requests_running": "num_requests_running", "num_requests_waiting": "num_requests_waiting",
                  "kv_cache_usage_perc": "kv_cache_usage_perc", "gpu_cache_usage_perc": "kv_cache_usage_perc"}
        for name, key in gauges.items():
            if key in stats:
                family = GaugeMetricFamily(VLLM_PREFIX + name, f"vLLM's {name}", labels=["model_name"])
                family.add_metric(label, float(stats[key]))
                yield family
        if "num_preemptions_total" in stats:
            family = CounterMetricFamily(VLLM_PREFIX + "num_preemptions", "vLLM's num_preemptions",
                                         labels=["model_name"])
            family.add_metric(label, float(stats["num_preemptions_total"]))
            yield family
        if "lora_max_loras" in stats:
            family = GaugeMetricFamily(VLLM_PREFIX + "lora_requests_info", "running and waiting requests' adapters",
                                       labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            family.add_metric([str(int(stats["lora_max_loras"])), stats.get("lora_running_adapters", ""),
                               stats.get("lora_waiting_adapters", "")], time.time())
            yield family


class ServerMetrics:
    def __init__(self, *, max_adapter_labels: int = 32) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = BoundedLabels(max_adapter_labels)
        r = self.registry
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP requests by route and status",
                                     ["route", "method", "status"], registry=r)
        self.requests_finished = Counter(PREFIX + "request_success", "generation requests finished, "
                                         "by finish reason", ["finish_reason"], registry=r)
        self.in_flight = Gauge(PREFIX + "http_requests_in_flight",
                               "HTTP requests being served now (streams until their end)", registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "time to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.per_token = Histogram(PREFIX + "time_per_output_token_seconds",
                                   "mean time between output tokens of a request",
                                   buckets=PER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "request latency, end to end",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram(PREFIX + "inter_token_latency_seconds",
                                     "time between a request's successive outputs of new tokens",
                                     buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens processed", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=r)
        self.adapter_requests = Counter(PREFIX + "lora_requests", "generation requests per model "
                                        "(base or adapter)", ["model"], registry=r)
        self.adapter_tokens = Counter(PREFIX + "lora_generation_tokens", "tokens generated per model",
                                      ["model"], registry=r)
        self.resolutions = Counter(PREFIX + "lora_resolutions", "first-request adapter resolutions "
                                   "by resolver and outcome", ["resolver", "outcome"], registry=r)
        self.resolution_seconds = Histogram(PREFIX + "lora_resolution_seconds",
                                            "time to resolve (and download) an adapter",
                                            ["resolver"], buckets=LATENCY_BUCKETS, registry=r)
        self.adapters_served = Gauge(PREFIX + "lora_adapters_served",
                                     "adapters the server knows by name", registry=r)

        self.downloads = Counter(PREFIX + "lora_downloads", "adapters downloaded by remote resolvers",
                                 registry=r)
        self.download_bytes = Counter(PREFIX + "lora_download_bytes", "bytes of adapters downloaded",
                                      registry=r)
        self.download_seconds = Histogram(PREFIX + "lora_download_seconds", "time to download an adapter",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.cache_evictions = Counter(PREFIX + "lora_cache_evictions", "adapters evicted from the "
                                       "download cache by its size bound", registry=r)
        self.cache_over_bound = Counter(PREFIX + "lora_cache_over_bound", "evictions that left the download "
                                        "cache over its bound: every adapter left is in use", registry=r)
        self.first_request_loads = Counter(PREFIX + "lora_first_request_loads", "adapters resolved and "
                                           "loaded on a first request, by outcome", ["outcome"], registry=r)
        # vLLM's names of the request metrics (and VLLMEngineCollector's of the engine's), labelled
        # with the served model's name: dashboards and autoscalers built for vLLM read them.
        self.vllm = {
            "prompt_tokens": Counter(VLLM_PREFIX + "prompt_tokens", "prompt tokens", ["model_name"], registry=r),
            "generation_tokens": Counter(VLLM_PREFIX + "generation_tokens", "generated tokens", ["model_name"],
                                         registry=r),
            "request_success": Counter(VLLM_PREFIX + "request_success", "finished requests by reason",
                                       ["model_name", "finished_reason"], registry=r),
            "ttft": Histogram(VLLM_PREFIX + "time_to_first_token_seconds", "time to first token", ["model_name"],
                              buckets=LATENCY_BUCKETS, registry=r),
            "tpot": Histogram(VLLM_PREFIX + "time_per_output_token_seconds", "mean time between output tokens",
                              ["model_name"], buckets=PER_TOKEN_BUCKETS, registry=r),
            "itl": Histogram(VLLM_PREFIX + "inter_token_latency_seconds", "time between output tokens",
                             ["model_name"], buckets=INTER_TOKEN_BUCKETS, registry=r),
            "e2e": Histogram(VLLM_PREFIX + "e2e_request_latency_seconds", "request latency, end to end",
                             ["model_name"], buckets=LATENCY_BUCKETS, registry=r)}
        self.model_name = "unknown"              # the served model's (first) name, once attached

    def attach_backend(self, backend) -> None:
        """Listen to the backend's resolver chain and first-request loads, and read the
        engine's counters (backend.engine_stats()) at scrape time."""
        self.adapters_served.set_function(lambda: len(backend.list_adapters()))
        backend.resolution_listeners.append(
            lambda name, outcome, seconds: self.first_request_loads.labels(outcome).inc())
        chain = backend.resolver_chain
        if chain is not None and hasattr(chain, "add_listener"):
            chain.add_listener(self.observe_resolution)
        self.registry.register(EngineStatsCollector(backend.engine_stats))
        self.model_name = backend.base_model_name
        self.registry.register(VLLMEngineCollector(backend.engine_stats, self.model_name))
        DOWNLOAD_LISTENERS.append(self.observe_download)
        EVICTION_LISTENERS.append(self.observe_eviction)
        OVER_BOUND_LISTENERS.append(self.observe_over_bound)

    def detach(self) -> None:
        """Stop listening to process-wide hooks (at server shutdown)."""
        for listeners, listener in ((DOWNLOAD_LISTENERS, self.observe_download),
                                    (EVICTION_LISTENERS, self.observe_eviction),
                                    (OVER_BOUND_LISTENERS, self.observe_over_bound)):
            while listener in listeners:
                listeners.remove(listener)

    def observe_eviction(self, lora_name: str, num_bytes: int) -> None:
        self.cache_evictions.inc()

    def observe_over_bound(self, root: str, total_bytes: int, max_bytes: int) -> None:
        self.cache_over_bound.inc()

    def observe_download(self, lora_name: str, num_bytes: int, seconds: float) -> None:
        self.downloads.inc()
        self.download_bytes.inc(num_bytes)
        self.download_seconds.observe(seconds)

    # ---- hooks called by the HTTP layer and the backend -------------------------
    def observe_http(self, route: str, method: str, status: int) -> None:
        self.http_requests.labels(route, method, str(status)).inc()

    def observe_prompt_run(self, model: str, run) -> None:
        """Record one finished engine request (a generation.PromptRun)."""
        label = self.adapter_label(model)
        self.adapter_requests.labels(label).inc()
        self.prompt_tokens.inc(len(run.prompt_token_ids))
        self.generation_tokens.inc(run.num_output_tokens)
        self.adapter_tokens.labels(label).inc(run.num_output_tokens)
        for reason in run.finish_reasons:
            self.requests_finished.labels(reason).inc()
        vllm, served = self.vllm, self.model_name
        vllm["prompt_tokens"].labels(served).inc(len(run.prompt_token_ids))
        vllm["generation_tokens"].labels(served).inc(run.num_output_tokens)
        for reason in run.finish_reasons:
            vllm["request_success"].labels(served, reason).inc()
        end = run.finished_at or run.started
        self.e2e.observe(end - run.started)
        vllm["e2e"].labels(served).observe(end - run.started)
        if run.first_token_at is not None:
            self.ttft.observe(run.first_token_at - run.started)
            vllm["ttft"].labels(served).observe(run.first_token_at - run.started)
            if run.num_output_tokens > 1:
                per_token = (end - run.first_token_at) / (run.num_output_tokens - 1)
                self.per_token.observe(per_token)
                vllm["tpot"].labels(served).observe(per_token)
        itl = vllm["itl"].labels(served)
        for gap in run.token_gaps:
            self.inter_token.observe(gap)
            itl.observe(gap)

    def observe_resolution(self, resolver: str, outcome: str, seconds: float) -> None:
        self.resolutions.labels(resolver, outcome).inc()
        self.resolution_seconds.labels(resolver).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
