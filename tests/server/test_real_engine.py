"""The issue's acceptance tests: the official openai client against `loraplex serve` with the
real engine, a tiny real checkpoint and real PEFT adapters; outputs compared with the offline LLM."""

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora_request import lora_id_for_name
from server.harness import API_KEY
from server.real_server import lora_manager, real_server

PROMPTS = ["hello world", "the quick brown fox", "serving many adapters", "what is the answer?"]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("server-adapters")
    cache = root / "cache"
    cache.mkdir()

    def adapter(path, seed, **kw):
        return str(write_peft_adapter(path, seed=seed, base_model_name_or_path=ckpt, **kw))

    paths = {"sql-lora": adapter(root / "sql", 1), "chat-lora": adapter(root / "chat", 2),
             "fs-lora": adapter(cache / "fs-lora", 3, target_modules=("q_proj", "v_proj", "down_proj")),
             "api-lora": adapter(root / "api", 4, rank=4)}
    (cache / "broken-lora").mkdir()
    (cache / "broken-lora" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    argv = ["serve", ckpt, "--served-model-name", "tiny-base", "--enable-lora",
            "--lora-modules", f"sql-lora={paths['sql-lora']}",
            json.dumps({"name": "chat-lora", "path": paths["chat-lora"], "base_model_name": "tiny-base"}),
            "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "3", "--api-key", API_KEY]
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_filesystem_resolver",
           "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache)}
    offline = LLM(ckpt, enable_lora=True, max_loras=2, max_cpu_loras=3)
    with real_server(argv, env) as server:
        yield {"server": server, "paths": paths, "cache": cache, "offline": offline, "ckpt": ckpt}


def client(setup):
    return openai.OpenAI(base_url=setup["server"].base_url + "/v1", api_key=API_KEY, max_retries=0)


def reference(setup, prompt, model, **params):
    lora = None if model == "tiny-base" else LoRARequest(model, lora_id_for_name(model), setup["paths"][model])
    params.setdefault("temperature", 0.0)
    out = setup["offline"].generate([prompt], SamplingParams(**params), lora_request=lora, use_tqdm=False)
    return out[0]


def test_models_list_with_lineage(setup):
    models = {m.id: m for m in client(setup).models.list().data}
    assert models["tiny-base"].root == setup["ckpt"]
    assert (models["sql-lora"].root, models["sql-lora"].parent) == (setup["paths"]["sql-lora"], "tiny-base")
    assert (models["chat-lora"].root, models["chat-lora"].parent) == (setup["paths"]["chat-lora"], "tiny-base")


@pytest.mark.parametrize("model", ["tiny-base", "sql-lora", "chat-lora"])
def test_completion_matches_offline(setup, model):
    out = client(setup).completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
    ref = reference(setup, PROMPTS[0], model, max_tokens=6)
    assert out.choices[0].text == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_adapters_change_the_output(setup):
    texts = {m: client(setup).completions.create(model=m, prompt=PROMPTS[1], max_tokens=6, temperature=0)
             .choices[0].text for m in ("tiny-base", "sql-lora", "chat-lora")}
    assert len(set(texts.values())) == 3


def test_chat_matches_offline(setup):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    out = client(setup).chat.completions.create(model="sql-lora", messages=messages, max_tokens=5, temperature=0)
    lora = LoRARequest("sql-lora", lora_id_for_name("sql-lora"), setup["paths"]["sql-lora"])
    ref = setup["offline"].chat(messages, SamplingParams(temperature=0, max_tokens=5), lora_request=lora,
                                use_tqdm=False)[0]
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_streaming_equals_offline(setup):
    stream = client(setup).completions.create(model="chat-lora", prompt=PROMPTS[2], max_tokens=6, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == \
        reference(setup, PROMPTS[2], "chat-lora", max_tokens=6).outputs[0].text
    assert chunks[-1].usage.completion_tokens == 6


def test_seeded_sampling_and_logprobs_match_offline(setup):
    out = client(setup).completions.create(model="sql-lora", prompt=PROMPTS[3], max_tokens=5, temperature=1.0,
                                           top_p=0.9, seed=1234, logprobs=2)
    ref = reference(setup, PROMPTS[3], "sql-lora", max_tokens=5, temperature=1.0, top_p=0.9, seed=1234, logprobs=2)
    assert out.choices[0].text == ref.outputs[0].text
    expected = [entry[t].logprob for entry, t in zip(ref.outputs[0].logprobs, ref.outputs[0].token_ids)]
    assert out.choices[0].logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)


def test_mixed_traffic_is_batched_and_each_gets_its_adapter(setup):
    engine = setup["server"].state.backend.engine.engine
    jobs = [(m, p) for p in PROMPTS for m in ("tiny-base", "sql-lora", "chat-lora", "fs-lora")]
    most_running, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            most_running[0] = max(most_running[0], engine.get_stats().num_running)
            time.sleep(0.002)

    async def burst():
        async with openai.AsyncOpenAI(base_url=setup["server"].base_url + "/v1", api_key=API_KEY,
                                      max_retries=0) as c:
            return await asyncio.gather(*[c.completions.create(model=m, prompt=p, max_tokens=8, temperature=0)
                                          for m, p in jobs])
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outs = asyncio.run(burst())
    finally:
        stop.set()
        watcher.join()
    setup["paths"]["fs-lora"] = str(setup["cache"] / "fs-lora")
    for (model, prompt), out in zip(jobs, outs):
        assert out.choices[0].text == reference(setup, prompt, model, max_tokens=8).outputs[0].text, (model, prompt)
    assert most_running[0] > 1, "requests were not batched together"


def test_resolve_on_first_request_through_the_filesystem(setup):
    late = write_peft_adapter(setup["cache"] / "late-lora", seed=5, base_model_name_or_path=setup["ckpt"])
    setup["paths"]["late-lora"] = str(late)
    out = client(setup).completions.create(model="late-lora", prompt=PROMPTS[0], max_tokens=6, temperature=0)
    assert out.choices[0].text == reference(setup, PROMPTS[0], "late-lora", max_tokens=6).outputs[0].text
    models = {m.id: m for m in client(setup).models.list().data}
    assert (models["late-lora"].root, models["late-lora"].parent) == (str(late), "tiny-base")
    metrics = httpx.get(setup["server"].base_url + "/metrics").text
    assert 'loraplex_lora_resolutions_total{outcome="found",resolver="lora_filesystem_resolver"}' in metrics
    assert 'loraplex_lora_first_request_loads_total{outcome="loaded"}' in metrics
    for gauge in ("loraplex_num_requests_running 0.0", "loraplex_num_requests_waiting 0.0",
                  "loraplex_kv_cache_usage_perc 0.0", "loraplex_lora_adapters_cpu 3.0",
                  'loraplex_lora_requests_total{model="late-lora"} 1.0'):
        assert gauge in metrics, gauge
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    fs = (("resolver", "lora_filesystem_resolver"),)
    assert samples[("loraplex_lora_resolution_seconds_count", fs)] >= 1
    assert samples[("loraplex_lora_resolution_seconds_sum", fs)] > 0
    for latency in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert samples[(f"loraplex_{latency}_count", ())] >= 1 and samples[(f"loraplex_{latency}_sum", ())] > 0
    assert samples[("loraplex_generation_tokens_total", ())] >= 6 and samples[("loraplex_prompt_tokens_total", ())] > 0


def test_unknown_adapter_is_404_and_broken_one_is_400(setup):
    with pytest.raises(openai.NotFoundError) as e:
        client(setup).completions.create(model="no-such-lora", prompt="a", max_tokens=2)
    assert e.value.body["message"] == "The model 'no-such-lora' does not exist."
    with pytest.raises(openai.BadRequestError) as e:
        client(setup).chat.completions.create(model="broken-lora", messages=[{"role": "user", "content": "a"}])
    assert "broken-lora" in e.value.body["message"] and "weights" in e.value.body["message"]
    assert e.value.body["param"] == "model"


def test_load_and_unload_free_the_adapter_in_the_engine(setup):
    base = setup["server"].base_url
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(base + "/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "api-lora", "lora_path": setup["paths"]["api-lora"]})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'api-lora' added successfully."
    lora_id = setup["server"].state.backend.get_adapter("api-lora").lora_int_id
    assert lora_id in lora_manager(setup["server"]).list_loras()
    out = client(setup).completions.create(model="api-lora", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    assert out.choices[0].text == reference(setup, PROMPTS[1], "api-lora", max_tokens=5).outputs[0].text
    r = httpx.post(base + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "api-lora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'api-lora' removed successfully."
    assert lora_id not in lora_manager(setup["server"]).list_loras()
    with pytest.raises(openai.NotFoundError):   # not in the resolver's directory either
        client(setup).completions.create(model="api-lora", prompt="a", max_tokens=2)


def test_wrong_rank_adapter_load_is_400(setup, tmp_path):
    big = write_peft_adapter(tmp_path / "big", rank=32, base_model_name_or_path=setup["ckpt"])
    r = httpx.post(setup["server"].base_url + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"lora_name": "big-lora", "lora_path": str(big)})
    assert r.status_code == 400 and "rank" in r.json()["error"]["message"]


def test_client_disconnect_frees_the_engine(setup):
    import socket
    engine = setup["server"].state.backend.engine.engine
    # Holding the LoRA step lock parks the engine inside its next step, so the request
    # cannot finish on its own while its client goes away (the tiny model is that fast).
    manager = lora_manager(setup["server"])
    step_lock = manager.step_lock

    def num_lora_steps() -> int:   # each step activates the request's adapter once
        return manager.stats["device_hits"] + manager.stats["cpu_hits"] + manager.stats["cpu_misses"]
    body = json.dumps({"model": "sql-lora", "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True}).encode()
    with step_lock:
        with socket.create_connection(("127.0.0.1", setup["server"].port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
                      + str(len(body)).encode() + b"\r\n\r\n" + body)
            deadline = time.monotonic() + 10
            while engine.get_stats().num_running != 1:
                assert time.monotonic() < deadline, "the request never reached the engine"
                time.sleep(0.01)
        # The server sees the disconnect and asks the engine to abort; the engine thread, parked
        # in its step, takes the abort before its next step.
        async_engine = setup["server"].state.backend.engine
        deadline = time.monotonic() + 10
        while async_engine._core_ids:         # the client forgets it when it sends the abort
            assert time.monotonic() < deadline, "the server never asked the engine to abort"
            time.sleep(0.01)
        steps_before = num_lora_steps()
    deadline = time.monotonic() + 10
    while engine.get_stats().num_running or engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the request kept running after its client left"
        time.sleep(0.02)
    stats = engine.get_stats()
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
    assert num_lora_steps() - steps_before < 5, "the request ran on instead of being aborted"


def test_batch_prompts_token_prompts_and_n_match_offline(setup):
    c = client(setup)
    out = c.completions.create(model="chat-lora", prompt=PROMPTS[:2], max_tokens=4, temperature=0)
    assert [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)] == \
        [reference(setup, p, "chat-lora", max_tokens=4).outputs[0].text for p in PROMPTS[:2]]
    ref = reference(setup, PROMPTS[1], "sql-lora", max_tokens=4)
    out = c.completions.create(model="sql-lora", prompt=ref.prompt_token_ids, max_tokens=4, temperature=0)
    assert out.choices[0].text == ref.outputs[0].text
    ref = reference(setup, PROMPTS[2], "tiny-base", max_tokens=4, n=2, temperature=1.0, seed=7)
    out = c.completions.create(model="tiny-base", prompt=PROMPTS[2], max_tokens=4, n=2, temperature=1.0, seed=7)
    assert [ch.text for ch in sorted(out.choices, key=lambda ch: ch.index)] == [o.text for o in ref.outputs]


def test_out_of_range_seed_is_400_and_the_engine_lives_on(setup):
    with pytest.raises(openai.BadRequestError) as e:
        client(setup).completions.create(model="tiny-base", prompt="a", max_tokens=2, seed=2**64)
    assert e.value.body["param"] == "seed"
    assert httpx.get(setup["server"].base_url + "/health").status_code == 200
    assert client(setup).completions.create(model="tiny-base", prompt="a", max_tokens=2, seed=2**63 - 1).usage



def test_a_resolved_adapter_whose_directory_vanished_is_resolved_again(setup):
    import shutil
    path = write_peft_adapter(setup["cache"] / "fleeting-lora", seed=8, base_model_name_or_path=setup["ckpt"])
    setup["paths"]["fleeting-lora"] = str(path)
    c = client(setup)
    expected = reference(setup, PROMPTS[0], "fleeting-lora", max_tokens=4).outputs[0].text
    assert c.completions.create(model="fleeting-lora", prompt=PROMPTS[0], max_tokens=4,
                                temperature=0).choices[0].text == expected
    shutil.rmtree(path)                      # e.g. evicted from a bounded download cache
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="fleeting-lora", prompt=PROMPTS[0], max_tokens=4)
    assert "fleeting-lora" not in {m.id for m in c.models.list().data}
    write_peft_adapter(path, seed=8, base_model_name_or_path=setup["ckpt"])
    setup["server"].state.backend.resolver_chain.forget("fleeting-lora")   # the chain's negative cache
    assert c.completions.create(model="fleeting-lora", prompt=PROMPTS[0], max_tokens=4,
                                temperature=0).choices[0].text == expected


def test_top_k_penalties_and_stop_match_offline(setup):
    # vLLM's fields beyond OpenAI's go in extra_body, as vLLM users send them. Greedy decoding of
    # 32 tokens repeats tokens, so each penalty changes the text; top_k with sampling does too.
    cases = [dict(temperature=0.0, presence_penalty=2.0), dict(temperature=0.0, frequency_penalty=2.0),
             dict(temperature=0.0, extra_body=dict(repetition_penalty=3.0)),
             dict(temperature=1.0, seed=99, extra_body=dict(top_k=2))]
    for case in cases:
        params = {**{k: v for k, v in case.items() if k != "extra_body"}, **case.get("extra_body", {})}
        out = client(setup).completions.create(model="chat-lora", prompt=PROMPTS[1], max_tokens=32, **case)
        ref = reference(setup, PROMPTS[1], "chat-lora", max_tokens=32, **params)
        assert out.choices[0].text == ref.outputs[0].text, case
        field = next(k for k in params if k not in ("temperature", "seed"))
        without = {k: v for k, v in params.items() if k != field}
        assert reference(setup, PROMPTS[1], "chat-lora", max_tokens=32, **without).outputs[0].text != \
            ref.outputs[0].text, f"{field} has no effect here: the test could not fail"
    ref = reference(setup, PROMPTS[1], "chat-lora", max_tokens=32, temperature=0.0)
    stop = ref.outputs[0].text[3:5]
    out = client(setup).completions.create(model="chat-lora", prompt=PROMPTS[1], max_tokens=32, temperature=0,
                                           stop=[stop])
    assert out.choices[0].finish_reason == "stop" and out.choices[0].text == \
        reference(setup, PROMPTS[1], "chat-lora", max_tokens=32, temperature=0.0, stop=[stop]).outputs[0].text


def test_load_inplace_serves_the_new_weights(setup, tmp_path):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    first = write_peft_adapter(tmp_path / "first", seed=21, base_model_name_or_path=setup["ckpt"])
    second = write_peft_adapter(tmp_path / "second", seed=22, base_model_name_or_path=setup["ckpt"])

    def offline(path):   # its own id: the offline engine still caches the first weights otherwise
        lora = LoRARequest(f"ref-{path.name}", 900 + len(path.name), str(path))
        out = setup["offline"].generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=6),
                                        lora_request=lora, use_tqdm=False)
        return out[0].outputs[0].text

    def served() -> str:
        return client(setup).completions.create(model="swap-lora", prompt=PROMPTS[2], max_tokens=6,
                                                temperature=0).choices[0].text
    for path, inplace in ((first, False), (second, True)):
        r = httpx.post(setup["server"].base_url + "/v1/load_lora_adapter", headers=headers,
                       json={"lora_name": "swap-lora", "lora_path": str(path), "load_inplace": inplace})
        assert r.status_code == 200, r.text
        assert served() == offline(path)
    assert offline(first) != offline(second)
    httpx.post(setup["server"].base_url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "swap-lora"})
