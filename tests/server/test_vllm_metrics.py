"""vLLM's metric names (vllm:...), which routers, autoscalers and dashboards built for vLLM read:
the engine's queues and KV-cache use, the adapters of running and waiting requests
(vllm:lora_requests_info, the Gateway API inference extension's LoRA affinity), and the request
counters and latencies, labelled with the served model's name."""

import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.core.engine_loop import core_stats
from loraplex.demo import demo_adapters_dir, demo_model_path
from loraplex.lora_request import lora_id_for_name
from loraplex.server.metrics import VLLMEngineCollector
from server.real_server import real_server


def samples(families) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def lora(name: str) -> LoRARequest:
    return LoRARequest(name, lora_id_for_name(name), str(demo_adapters_dir() / name))


def test_the_adapters_of_running_and_waiting_requests():
    engine = LLM(str(demo_model_path()), device="cpu", enable_lora=True, max_loras=1).llm_engine
    params = SamplingParams(temperature=0, max_tokens=4)
    for i, name in enumerate(("upper", "reverse", "upper")):
        engine.add_request(f"r{i}", "Input: hi\nOutput: ", params, lora_request=lora(name))
    engine.add_request("base", "Input: hi\nOutput: ", params)
    stats = core_stats(engine.core)
    assert (stats["lora_running_adapters"], stats["lora_waiting_adapters"], stats["lora_max_loras"]) == \
        ("", "reverse,upper", 1)
    engine.step()                                         # one adapter a batch: upper's two run
    stats = core_stats(engine.core)
    assert (stats["lora_running_adapters"], stats["lora_waiting_adapters"]) == ("upper", "reverse")
    before = time.time()
    info = samples(VLLMEngineCollector(lambda: {**stats, "num_requests_running": 3.0}, "demo").collect())
    labels = (("max_lora", "1"), ("running_lora_adapters", "upper"), ("waiting_lora_adapters", "reverse"))
    assert before <= info[("vllm:lora_requests_info", labels)] <= time.time()
    assert info[("vllm:num_requests_running", (("model_name", "demo"),))] == 3.0


def test_the_server_exports_them_labelled_with_the_served_name():
    argv = ["serve", str(demo_model_path()), "--served-model-name", "demo", "--device", "cpu", "--enable-lora",
            "--max-loras", "2", "--lora-modules", f"upper={demo_adapters_dir() / 'upper'}"]
    with real_server(argv, {}) as server:
        for model in ("demo", "upper"):
            r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                           json={"model": model, "prompt": "Input: hi\nOutput: ", "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
        time.sleep(0.3)                                   # the engine's idle stats have arrived
        found = samples(text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text))
    demo = (("model_name", "demo"),)
    assert found[("vllm:num_requests_running", demo)] == 0 and found[("vllm:num_requests_waiting", demo)] == 0
    assert found[("vllm:kv_cache_usage_perc", demo)] == found[("vllm:gpu_cache_usage_perc", demo)] == 0
    assert found[("vllm:generation_tokens_total", demo)] >= 2 and found[("vllm:prompt_tokens_total", demo)] > 0
    assert found[("vllm:time_to_first_token_seconds_count", demo)] == 2
    # One gap per engine output with new tokens after a request's first: at most tokens - 1 each.
    gaps = found[("vllm:inter_token_latency_seconds_count", demo)]
    assert 1 <= gaps <= found[("vllm:generation_tokens_total", demo)] - 2
    assert found[("vllm:inter_token_latency_seconds_sum", demo)] > 0
    assert found[("loraplex_inter_token_latency_seconds_count", ())] == gaps
    assert sum(v for (name, labels), v in found.items() if name == "vllm:request_success_total") == 2
    idle = (("max_lora", "2"), ("running_lora_adapters", ""), ("waiting_lora_adapters", ""))
    assert found[("vllm:lora_requests_info", idle)] > 0
