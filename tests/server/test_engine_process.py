"""`loraplex serve` runs the engine in its own process: outputs equal the offline LLM's, and a
crash of that process fails in-flight requests with 503 and /health reports it (no hang).
(SIGTERM's drain, which then stops the engine process too, is in test_serve_cli.py.)"""

import json
import os
import re
import signal
import threading
import time

import httpx
import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.lora_request import lora_id_for_name
from server.serve_process import ServeProcess

PROMPTS = ["the quick brown fox", "hello world, hello", "what is the answer?"]


def engine_pid(server: ServeProcess) -> int:
    match = re.search(r"engine loop: engine process (\d+)", server.log_path.read_text())
    assert match, server.log_path.read_text()
    return int(match.group(1))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"     # a zombie is gone too
    except FileNotFoundError:
        return True


def start(ckpt, tmp_path, *extra, env_vars=None) -> ServeProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    env.update(env_vars or {})
    server = ServeProcess([ckpt, "--device", "cpu", "--host", "127.0.0.1", *extra], env, tmp_path / "server.log")
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("engine-process")
    adapter = str(write_peft_adapter(root / "a", seed=5, base_model_name_or_path=ckpt))
    # Adapters a resolver finds on first request (the filesystem resolver, over this directory).
    resolvable = root / "resolvable"
    write_peft_adapter(resolvable / "b-lora", seed=6, base_model_name_or_path=ckpt)
    server = start(ckpt, root, "--enable-lora", "--lora-modules", f"a-lora={adapter}", "--max-loras", "2",
                   env_vars={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_filesystem_resolver",
                             "VLLM_LORA_RESOLVER_CACHE_DIR": str(resolvable)})
    try:
        yield {"server": server, "ckpt": ckpt, "adapter": adapter, "root": root, "resolvable": resolvable}
    finally:
        server.stop()


def stream_completion(url: str, body: dict) -> list[dict]:
    """The SSE events of one streaming completion, parsed ([DONE] excluded)."""
    events = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_outputs_equal_the_offline_llm(setup):
    server = setup["server"]
    pid = engine_pid(server)
    assert parent_of(pid) == server.proc.pid
    lora = LoRARequest("a-lora", 1, setup["adapter"])
    llm = LLM(setup["ckpt"], enable_lora=True)
    for model, lora_request in (("a-lora", lora), (setup["ckpt"], None)):
        # Seeded (greedy takes n=1 only, as in vLLM): each sample's stream is the same in both.
        seeded = SamplingParams(temperature=0.7, seed=3, max_tokens=12, n=2, logprobs=2)
        expected = llm.generate(PROMPTS, seeded, lora_request=lora_request, use_tqdm=False)
        body = {"model": model, "prompt": PROMPTS, "max_tokens": 12, "temperature": 0.7, "seed": 3, "n": 2,
                "logprobs": 2}
        got = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60).json()["choices"]
        for choice in got:
            want = expected[choice["index"] // 2].outputs[choice["index"] % 2]
            assert choice["text"] == want.text
            assert choice["logprobs"]["token_logprobs"] == pytest.approx(
                [e[t].logprob for t, e in zip(want.token_ids, want.logprobs)], abs=1e-4)
        greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12), lora_request=lora_request,
                              use_tqdm=False)[0].outputs[0]
        stop = greedy.text[4:7]
        want = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=12, stop=[stop]),
                            lora_request=lora_request, use_tqdm=False)[0].outputs[0]
        events = stream_completion(server.base_url, {"model": model, "prompt": PROMPTS[0], "max_tokens": 12,
                                                     "temperature": 0, "stop": [stop]})
        assert "".join(e["choices"][0]["text"] for e in events) == want.text
        assert events[-1]["choices"][0]["finish_reason"] == "stop" == want.finish_reason
    metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
    assert re.search(r"loraplex_kv_cache_blocks [1-9]", metrics)
    assert "loraplex_lora_adapters_cpu 1.0" in metrics
    deadline = time.monotonic() + 5                 # stats arrive from the engine process
    while "loraplex_num_requests_running 0.0" not in metrics:
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
        metrics = httpx.get(server.base_url + "/metrics", timeout=10).text


def test_adapters_resolved_and_replaced_in_place_through_the_engine_process(setup):
    """Resolution on first request (LoRAResolution in the API process, the load in the engine's)
    and /v1/load_lora_adapter with load_inplace (the engine's replace_lora) both reach the
    engine process; the answers are the offline LLM's with the same adapter."""
    server, ckpt = setup["server"], setup["ckpt"]
    llm = LLM(ckpt, enable_lora=True)
    greedy = SamplingParams(temperature=0, max_tokens=10)

    def served(model: str) -> str:
        r = httpx.post(server.base_url + "/v1/completions", timeout=60,
                       json={"model": model, "prompt": PROMPTS[1], "max_tokens": 10, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def offline(path: str) -> str:
        return llm.generate(PROMPTS[1], greedy, lora_request=LoRARequest(path, lora_id_for_name(path), path),
                            use_tqdm=False)[0].outputs[0].text

    b_path = str(setup["resolvable"] / "b-lora")
    assert served("b-lora") == offline(b_path)
    new_a = str(write_peft_adapter(setup["root"] / "a2", seed=9, base_model_name_or_path=ckpt))
    before = served("a-lora")
    assert before == offline(setup["adapter"]) != offline(new_a)
    r = httpx.post(server.base_url + "/v1/load_lora_adapter", timeout=60,
                   json={"lora_name": "a-lora", "lora_path": new_a, "load_inplace": True})
    assert r.status_code == 200, r.text
    assert served("a-lora") == offline(new_a)


def test_a_crashed_engine_process_fails_in_flight_requests_with_503(setup):
    # Last in this module: it kills the module's engine process.
    server = setup["server"]
    url, pid = server.base_url, engine_pid(server)
    results: dict[int, object] = {}
    started = threading.Barrier(4)

    def run(i):
        events = []
        try:
            with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                    "model": setup["ckpt"], "prompt": PROMPTS[i], "max_tokens": 200, "ignore_eos": True,
                    "temperature": 0, "stream": True}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line[6:]))
                        if len(events) == 1:
                            started.wait(10)
            results[i] = events
        except Exception as e:  # noqa: BLE001 - the test looks at it
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    started.wait(30)
    os.kill(pid, signal.SIGKILL)
    began = time.monotonic()
    for t in threads:
        t.join(30)
    assert time.monotonic() - began < 10, "in-flight requests hung after the engine died"
    for i in range(3):
        events = results[i]
        assert isinstance(events, list), events
        assert len(events) < 200
        assert events[-1]["error"]["code"] == 503, events[-1]
        assert "engine" in events[-1]["error"]["message"]
    assert httpx.get(url + "/health", timeout=10).status_code == 503
    r = httpx.post(url + "/v1/completions", json={"model": setup["ckpt"], "prompt": "x"}, timeout=10)
    assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
    assert server.proc.poll() is None                        # the API server still answers
    assert "the engine process exited unexpectedly" in server.log_path.read_text()
