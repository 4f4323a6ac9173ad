"""A bounded load test on loopback: hundreds of requests over more adapters than max_loras and
max_cpu_loras (so both LoRA caches thrash), all resolved on first request. Zero failures,
every output equal to the offline LLM's, and memory flat across rounds."""

import asyncio
import random

import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora_request import lora_id_for_name
from server.harness import API_KEY
from server.load_client import run_completions
from server.real_server import real_server

NUM_ADAPTERS = 7          # > max_cpu_loras (3) > max_loras (2)
PROMPTS = ["hello world", "the lazy dog", "many adapters", "answer: 42"]
MAX_TOKENS = 4
ROUND_REQUESTS = 100
CONCURRENCY = 24


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def loaded(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    cache = tmp_path_factory.mktemp("load-cache")
    names = [f"load-{i}" for i in range(NUM_ADAPTERS)]
    paths = {n: str(write_peft_adapter(cache / n, seed=100 + i, base_model_name_or_path=ckpt,
                                       target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
             for i, n in enumerate(names)}
    models = ["base"] + names
    offline = LLM(ckpt, enable_lora=True, max_loras=2, max_cpu_loras=3)
    jobs = [(m, p) for m in models for p in PROMPTS]
    loras = [None if m == "base" else LoRARequest(m, lora_id_for_name(m), paths[m]) for m, _ in jobs]
    outs = offline.generate([p for _, p in jobs], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                            lora_request=loras, use_tqdm=False)
    expected = {job: out.outputs[0].text for job, out in zip(jobs, outs)}
    argv = ["serve", ckpt, "--served-model-name", "base", "--enable-lora", "--max-loras", "2",
            "--max-cpu-loras", "3", "--api-key", API_KEY, "--max-adapter-metric-labels", "4"]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}
    with real_server(argv, env) as server:
        yield server, expected


def test_caches_thrash_without_failures_or_leaks(loaded):
    server, expected = loaded
    rng = random.Random(0)
    keys = list(expected)

    def run_round() -> list[str]:
        jobs = [rng.choice(keys) for _ in range(ROUND_REQUESTS)]
        return asyncio.run(run_completions(server.base_url, jobs, expected, max_tokens=MAX_TOKENS,
                                           concurrency=CONCURRENCY))

    assert run_round() == []                      # warm-up: resolves every adapter
    rss_before = rss_bytes()
    for _ in range(2):
        assert run_round() == []
    growth = rss_bytes() - rss_before
    print(f"\nload test: {3 * ROUND_REQUESTS} requests, RSS growth over the last "
          f"{2 * ROUND_REQUESTS}: {growth / 2**20:.1f} MiB")
    assert growth < 32 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB"
    state = server.state
    assert len(state.backend.list_adapters()) == NUM_ADAPTERS
    assert state.backend.engine.engine.get_stats().num_running == 0
    metrics = state.metrics.render().decode()
    assert 'loraplex_lora_requests_total{model="other"}' in metrics   # label cardinality bounded
    assert 'status="200"' in metrics and 'status="5' not in metrics
    stats = state.backend.engine.engine.runner.lora.manager.stats
    assert stats["cpu_evictions"] > 0 and stats["device_evictions"] > 0 and stats["cpu_misses"] > NUM_ADAPTERS
    for key, value in stats.items():   # the engine is idle: /metrics shows every cache counter as is
        assert f"loraplex_lora_{key}_total {float(value)}" in metrics, key
