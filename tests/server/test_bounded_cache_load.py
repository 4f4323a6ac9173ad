"""The download cache's size bound under load: adapters in a moto S3 bucket, a cache bound that
holds a quarter of them, max_loras 2 and max_cpu_loras 3, hundreds of concurrent requests. No
request fails, nothing answers 5xx, every output equals what an unbounded engine gives, and the
bound was really exercised (adapters evicted and downloaded again). A request whose adapter
directory vanishes while it is queued is resolved again and served."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.resolvers.remote import URI_ENV
from server.harness import API_KEY
from server.load_client import run_completions
from server.real_server import lora_manager, real_server
from servers.fixtures import s3_server  # noqa: F401 (fixture)
from servers.s3_server import upload_dir

NUM_ADAPTERS = 8
PROMPTS = ["hello world", "the lazy dog", "answer: 42"]
MAX_TOKENS = 4
NUM_REQUESTS = 240
CONCURRENCY = 24
BUCKET = "bounded-load"


@pytest.fixture(scope="module")
def bounded(tiny_checkpoint, tmp_path_factory, s3_server):  # noqa: F811
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("bounded")
    client = s3_server.client()
    client.create_bucket(Bucket=BUCKET)
    names = [f"b{i}" for i in range(NUM_ADAPTERS)]
    local = {n: write_peft_adapter(root / "src" / n, seed=200 + i, base_model_name_or_path=ckpt,
                                   target_modules=("q_proj", "v_proj", "down_proj"))
             for i, n in enumerate(names)}
    for name, path in local.items():
        upload_dir(client, BUCKET, f"loras/{name}", path)
    one = sum(f.stat().st_size for f in local["b0"].iterdir())
    # The reference: every adapter loaded from its own files, nothing ever evicted from disk.
    offline = LLM(ckpt, enable_lora=True, max_loras=2, max_cpu_loras=NUM_ADAPTERS)
    jobs = [(m, p) for m in ["base", *names] for p in PROMPTS]
    loras = [None if m == "base" else LoRARequest(m, 1 + names.index(m), str(local[m])) for m, _ in jobs]
    outs = offline.generate([p for _, p in jobs], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                            lora_request=loras, use_tqdm=False)
    expected = {job: out.outputs[0].text for job, out in zip(jobs, outs)}
    def start(cache, engine_process: bool = False):
        env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_PLUGINS": "lora_s3_resolver",
               URI_ENV: f"s3://{BUCKET}/loras", "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache),
               "VLLM_LORA_RESOLVER_CACHE_MAX_BYTES": str(2 * one), **s3_server.env()}
        argv = ["serve", ckpt, "--served-model-name", "base", "--enable-lora", "--max-loras", "2",
                "--max-cpu-loras", "3", "--api-key", API_KEY]
        return real_server(argv, env, engine_process=engine_process)

    cache = root / "cache"
    with start(cache) as server:
        yield {"server": server, "expected": expected, "cache": cache, "s3": s3_server, "offline": offline,
               "local": local, "start": start, "root": root}


def metric(server, name: str, **labels) -> float:
    text = server.state.metrics.render().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_quarter_sized_cache_serves_everything_right(bounded):
    server, expected = bounded["server"], bounded["expected"]
    rng = random.Random(0)
    jobs = [rng.choice(list(expected)) for _ in range(NUM_REQUESTS)]
    started = time.monotonic()
    # One request per adapter, one at a time, first: only the CPU cache and the slots hold
    # adapters then, so later downloads must evict the others (under the concurrent load
    # below, requests in flight may hold every adapter, which is right but exercises nothing).
    warm_up = [(f"b{i}", PROMPTS[0]) for i in range(NUM_ADAPTERS)]
    failures = asyncio.run(run_completions(server.base_url, warm_up, expected, max_tokens=MAX_TOKENS,
                                           concurrency=1))
    failures += asyncio.run(run_completions(server.base_url, jobs, expected, max_tokens=MAX_TOKENS,
                                            concurrency=CONCURRENCY))
    downloads = sum(bounded["s3"].downloads(BUCKET, f"loras/b{i}/adapter_model.safetensors")
                    for i in range(NUM_ADAPTERS))
    evictions = metric(server, "loraplex_lora_cache_evictions_total")
    print(f"\nbounded cache: {NUM_REQUESTS} requests in {time.monotonic() - started:.1f} s, {downloads} downloads, "
          f"{evictions:.0f} evictions, {metric(server, 'loraplex_lora_cache_over_bound_total'):.0f} passes over "
          f"the bound")
    assert failures == []
    five_xx = sum(s.value for f in text_string_to_metric_families(server.state.metrics.render().decode())
                  for s in f.samples if s.name == "loraplex_http_requests_total" and s.labels["status"][0] == "5")
    assert five_xx == 0
    assert evictions > 0 and downloads > NUM_ADAPTERS          # the bound was exercised
    assert server.state.backend.engine.engine.get_stats().num_running == 0


def test_the_bound_with_the_engine_in_its_own_process(bounded, caplog):
    """As `loraplex serve` runs: the API process's resolver evicts from the download cache while
    the engine process holds what it has cached or in slots (holds are file locks: they bind
    across processes), and the API process holds what each request uses. Nothing is evicted
    from under either: no request fails, and none finds its adapter's directory gone once it was
    submitted (adapters nobody used for a while are evicted and resolved again: that is the bound)."""
    server_cache = bounded["root"] / "cache-engine-process"
    expected = bounded["expected"]
    rng = random.Random(1)
    jobs = [rng.choice(list(expected)) for _ in range(NUM_REQUESTS // 4)]
    s3 = bounded["s3"]
    before = sum(s3.downloads(BUCKET, f"loras/b{i}/adapter_model.safetensors") for i in range(NUM_ADAPTERS))
    with caplog.at_level("INFO", logger="loraplex"), bounded["start"](server_cache, engine_process=True) as server:
        assert server.state.backend.engine.engine_pid is not None
        warm_up = [(f"b{i}", PROMPTS[0]) for i in range(NUM_ADAPTERS)]
        failures = asyncio.run(run_completions(server.base_url, warm_up, expected, max_tokens=MAX_TOKENS,
                                               concurrency=1))
        failures += asyncio.run(run_completions(server.base_url, jobs, expected, max_tokens=MAX_TOKENS,
                                                concurrency=CONCURRENCY))
        evictions = metric(server, "loraplex_lora_cache_evictions_total")
    downloads = sum(s3.downloads(BUCKET, f"loras/b{i}/adapter_model.safetensors") for i in range(NUM_ADAPTERS))
    assert failures == []
    assert evictions > 0 and downloads - before > NUM_ADAPTERS          # the bound was exercised
    # Every request holds its adapter from before the engine sees it, so none is sent to a
    # directory evicted meanwhile (one evicted between lookup and hold is looked up again).
    assert not [r for r in caplog.records if "vanished before request" in r.getMessage()]
    assert [r for r in caplog.records if "is gone from" in r.getMessage()]       # evicted while unused


def test_a_queued_request_whose_directory_vanished_is_resolved_again(bounded):
    server, expected = bounded["server"], bounded["expected"]
    name, prompt = "b3", PROMPTS[0]
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                     temperature=0).choices[0].text == expected[(name, prompt)]
    engine = server.state.backend.engine.engine
    manager = lora_manager(server)
    request = server.state.backend.get_adapter(name)
    result: dict = {}

    def submit():
        try:
            result["text"] = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                                       temperature=0).choices[0].text
        except openai.APIError as e:
            result["error"] = e
    # The engine waits for the step lock inside its next step: the request is queued meanwhile.
    with manager.step_lock:
        thread = threading.Thread(target=submit)
        thread.start()
        deadline = time.monotonic() + 30
        while not engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "the request never reached the engine"
            time.sleep(0.01)
        # Out of the engine's caches, and its directory gone from under everyone's holds
        # (deleted by hand): the step will have to reload it and cannot.
        manager.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path)
    thread.join(60)
    assert result.get("text") == expected[(name, prompt)], result
    again = server.state.backend.get_adapter(name)
    assert again.lora_int_id != request.lora_int_id and again.lora_path == request.lora_path
