"""The parts of loraplex.ray that need no Ray cluster: errors across the process boundary,
the ingress's view of names, the cluster's /metrics, the deployment options from the flags,
and `serve-ray` refusing bad flags before it starts Ray."""

from __future__ import annotations

import argparse
import asyncio
import pickle

import pytest
from prometheus_client import Counter
from prometheus_client.parser import text_string_to_metric_families

from loraplex.errors import AdapterCapacityError, AdapterNotFoundError, ConfigError, EngineDeadError
from loraplex.ray.application import forwarded_environment, replica_args, replica_gpus, scaling_options
from loraplex.ray.backend import RayBackend
from loraplex.ray.cluster_metrics import ClusterMetrics
from loraplex.ray.wire import AdapterCard, AdapterRoute, ReplicaError, ReplicaSnapshot
from loraplex.server.cli import build_parser, main
from loraplex.server.errors import INVALID_USER_INPUT, HTTPError, exception_to_body
from loraplex.server.metrics import ServerMetrics


def test_replica_errors_keep_their_status_message_and_field_across_pickling():
    for exc, status in ((AdapterNotFoundError("The model 'x' does not exist."), 404),
                        (AdapterCapacityError("all slots pinned"), 503), (EngineDeadError("stopped"), 503),
                        (HTTPError(400, "bad max_tokens", param="max_tokens"), 400), (KeyError("bug"), 500)):
        record = pickle.loads(pickle.dumps(ReplicaError.from_exception(exc)))
        again = record.to_exception()
        assert isinstance(again, HTTPError) and again.status == status == record.status
        assert str(exc).strip("'") in str(again)
    assert ReplicaError.from_exception(AdapterNotFoundError("gone")).param == "model"
    vllm_typed = ReplicaError.from_exception(HTTPError(400, "dup", error_type=INVALID_USER_INPUT)).to_exception()
    assert exception_to_body(vllm_typed)[1]["error"]["type"] == INVALID_USER_INPUT
    assert exception_to_body(ReplicaError.from_exception(KeyError("x")).to_exception())[1]["error"]["type"] == \
        "InternalServerError"
    assert ReplicaError.from_exception(HTTPError(400, "x", param="max_tokens")).param == "max_tokens"


def backend(**kwargs) -> RayBackend:
    options = dict(tokenizer=None, served_model_names=["base", "alias"], model_path="/models/base",
                   static_adapter_names=["static-lora"], allow_runtime_lora_updating=True, enable_lora=True)
    options.update(kwargs)
    return RayBackend(None, None, **options)


def test_the_ingress_routes_names_and_leaves_resolution_to_the_replicas():
    ray_backend = backend()
    assert asyncio.run(ray_backend.lora_request_for("alias")) is None
    assert asyncio.run(ray_backend.lora_request_for(None)) is None
    assert asyncio.run(ray_backend.lora_request_for("static-lora")) == AdapterRoute("static-lora", True)
    assert asyncio.run(ray_backend.lora_request_for("any-new-lora")) == AdapterRoute("any-new-lora", False)
    with pytest.raises(ValueError, match="path component"):
        asyncio.run(ray_backend.lora_request_for("../secrets"))
    with pytest.raises(AdapterNotFoundError, match="does not exist"):   # no resolution on first request
        asyncio.run(backend(allow_runtime_lora_updating=False).lora_request_for("any-new-lora"))
    lenient = backend(skip_model_name_validation=True)   # VLLM_SKIP_MODEL_NAME_VALIDATION
    lenient._cards = {"served-lora": AdapterCard("served-lora", "/c/served-lora", "base")}
    assert asyncio.run(lenient.lora_request_for("served-lora")) == AdapterRoute("served-lora")
    assert asyncio.run(lenient.lora_request_for("nobody-has-it")) is None
    for call in (ray_backend.load_adapter("x", "/tmp/x"), ray_backend.unload_adapter("x")):
        with pytest.raises(HTTPError, match="not available with Ray replicas") as refused:
            asyncio.run(call)
        assert refused.value.status == 501


def replica_metrics_text(loads: int, requests: int) -> str:
    metrics = ServerMetrics()
    Counter("loraplex_lora_loads", "an engine counter", registry=metrics.registry).inc(loads)
    metrics.downloads.inc(2)
    metrics.adapter_requests.labels("sql").inc(requests)   # HTTP-side: zero on real replicas
    return metrics.render().decode()


def snapshot(replica_id: str, pid: int, loads: int, adapters=()) -> ReplicaSnapshot:
    return ReplicaSnapshot(replica_id, pid, "10.0.0.1", list(adapters), replica_metrics_text(loads, 5))


def test_cluster_metrics_are_the_ingress_http_metrics_plus_each_replica_labelled():
    ray_backend = backend()
    ray_backend.snapshots = [snapshot("r1", 11, 3), snapshot("r2", 22, 4)]
    metrics = ClusterMetrics()
    metrics.attach_backend(ray_backend)
    metrics.adapter_requests.labels("upper").inc()
    text = metrics.render().decode()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    by_name = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    assert {(s.labels["replica"], s.value) for s in by_name["loraplex_lora_loads_total"]} == {("r1", 3), ("r2", 4)}
    assert {(s.labels["replica"], s.value) for s in by_name["loraplex_lora_downloads_total"]} == {("r1", 2), ("r2", 2)}
    assert {(s.labels["replica"], s.labels["pid"]) for s in by_name["loraplex_replica_info"]} == {("r1", "11"), ("r2", "22")}
    # The HTTP layer's families are the ingress's own, once, with no replica copies.
    assert [(s.labels, s.value) for s in by_name["loraplex_lora_requests_total"]] == [({"model": "upper"}, 1.0)]
    assert not any("replica" in s.labels for s in by_name.get("loraplex_lora_requests_created", []))
    assert text.count("# TYPE loraplex_lora_downloads_total counter") == 1


def test_models_list_every_adapter_of_the_cluster_once():
    ray_backend = backend()
    ray_backend.directory = type("Directory", (), {})()

    class Snapshots:
        async def remote(self):
            return [snapshot("r1", 1, 0, [AdapterCard("sql", "/cache/sql", "base")]),
                    snapshot("r2", 2, 0, [AdapterCard("sql", "/other/sql", "base"),
                                          AdapterCard("chat", "/cache/chat", "alias")])]

    ray_backend.directory.snapshots = Snapshots()
    asyncio.run(ray_backend.refresh())
    assert [(a.lora_name, a.lora_path) for a in ray_backend.list_adapters()] == \
        [("sql", "/cache/sql"), ("chat", "/cache/chat")]
    assert ray_backend.parent_of("chat") == "alias" and ray_backend.parent_of("unknown") == "base"
    assert ray_backend.is_healthy()


def ray_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve-ray", "/models/base", *argv])


def test_scaling_flags_become_ray_deployment_options():
    assert scaling_options(ray_args("--replicas", "3")) == {"num_replicas": 3}
    assert scaling_options(ray_args("--ray-max-replicas", "4", "--ray-target-ongoing-requests", "8")) == \
        {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                "target_ongoing_requests": 8.0}}
    assert scaling_options(ray_args("--replicas", "2", "--ray-min-replicas", "0", "--ray-max-replicas", "3")) == \
        {"autoscaling_config": {"min_replicas": 0, "max_replicas": 3, "initial_replicas": 2}}
    for bad in (("--replicas", "0"), ("--ray-target-ongoing-requests", "4"),
                ("--ray-min-replicas", "3", "--ray-max-replicas", "2")):
        with pytest.raises(ConfigError):
            scaling_options(ray_args(*bad))


def test_gpus_per_replica():
    assert replica_gpus(ray_args("--device", "cpu", "--tensor-parallel-size", "2")) == 0
    assert replica_gpus(ray_args("--ray-replica-gpus", "0.5")) == 0.5
    assert replica_gpus(ray_args()) == 0   # no Ray cluster with GPUs here: replicas on the CPU


def test_replicas_get_the_resolved_flags_and_the_loraplex_environment():
    args = ray_args("--demo")
    args.demo, args.model = True, "/resolved/demo/model"
    resolved = replica_args(args)
    assert resolved.demo is False and resolved.model == "/resolved/demo/model" and args.demo is True
    env = {"VLLM_PLUGINS": "x", "LORAPLEX_RESOLVER_TIMEOUT_S": "3", "AWS_REGION": "r", "HF_ENDPOINT": "h",
           "HOME": "/root", "PATH": "/bin"}
    assert forwarded_environment(env) == {k: env[k] for k in ("VLLM_PLUGINS", "LORAPLEX_RESOLVER_TIMEOUT_S",
                                                             "AWS_REGION", "HF_ENDPOINT")}


@pytest.mark.parametrize("argv, message", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--max-loras", "4", "--max-cpu-loras", "2"], "max_cpu_loras (2) must be >= max_loras (4)"),
    (["--default-mm-loras", '{"audio": "/a"}'], "default_mm_loras needs enable_lora=True (--enable-lora)"),
])
def test_serve_ray_refuses_bad_flags_before_starting_ray(argv, message, caplog):
    import ray

    assert main(["serve-ray", "/models/base", *argv]) == 2
    assert message in caplog.text
    assert not ray.is_initialized()
