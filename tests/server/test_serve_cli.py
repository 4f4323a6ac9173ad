"""`loraplex serve` as a user runs it: a subprocess started from the command line, an adapter
resolved from S3 (a local moto server) on its first request, start-up logs, and SIGTERM draining."""

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from adapters import write_peft_adapter
from loraplex import LLM, LoRARequest, SamplingParams
from servers.fixtures import bucket, s3_server  # noqa: F401 (fixtures)
from servers.s3_server import upload_dir
from server.harness import API_KEY
from server.serve_process import ServeProcess


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory, s3_server):  # noqa: F811
    ckpt = str(tiny_checkpoint())
    root = tmp_path_factory.mktemp("cli")
    static = write_peft_adapter(root / "static", seed=11, base_model_name_or_path=ckpt)
    source = write_peft_adapter(root / "s3-source", seed=12, base_model_name_or_path=ckpt)
    bucket_name = "cli-bucket"
    s3_server.client().create_bucket(Bucket=bucket_name)
    upload_dir(s3_server.client(), bucket_name, "loras/s3-lora", source)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VLLM_", "LORAPLEX_"))}
    env.update(s3_server.env())
    env.update({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_PLUGINS": "lora_s3_resolver",
                "VLLM_LORA_RESOLVER_S3_URI": f"s3://{bucket_name}/loras",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(root / "cache"), "VLLM_API_KEY": API_KEY})
    server = ServeProcess([ckpt, "--enable-lora", "--lora-modules", f"static-lora={static}",
                           "--max-loras", "2", "--max-cpu-loras", "2", "--seed", "0", "--host", "127.0.0.1"],
                          env, root / "server.log")
    try:
        server.wait_ready()
        yield {"server": server, "ckpt": ckpt, "source": str(source), "static": str(static),
               "s3": s3_server, "bucket": bucket_name}
    finally:
        server.stop()


def reference(ckpt, prompt, lora=None, max_tokens=6):
    llm = LLM(ckpt, enable_lora=True, max_loras=2)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens), lora_request=lora,
                       use_tqdm=False)
    return out[0].outputs[0].text


def test_startup_logs_say_what_is_served(served):
    log = served["server"].log_path.read_text()
    assert re.search(r"KV cache: [1-9]\d* blocks of 16 tokens", log), log
    for expected in (f"serving model {served['ckpt']}", "dtype torch.float32, device cpu",
                     "LoRA: max_loras 2, max_lora_rank 16, max_cpu_loras 2, static adapters: static-lora",
                     "plugin lora_s3_resolver: loaded", "resolver chain, in order: lora_s3_resolver"):
        assert expected in log, expected
    # Both long-lived processes exempt their start-up heap from the collector's full passes.
    assert re.search(r"API server: [1-9]\d+ start-up objects frozen", log), log
    assert re.search(r"engine process: [1-9]\d+ start-up objects frozen", log), log


def test_first_request_resolves_from_s3_once(served):
    async def burst():
        async with openai.AsyncOpenAI(base_url=served["server"].base_url + "/v1", api_key=API_KEY,
                                      max_retries=0) as c:
            return await asyncio.gather(*[c.completions.create(model="s3-lora", prompt="hello world",
                                                               max_tokens=6, temperature=0) for _ in range(4)])
    outs = asyncio.run(burst())
    expected = reference(served["ckpt"], "hello world", LoRARequest("s3-lora", 1, served["source"]))
    assert {o.choices[0].text for o in outs} == {expected}
    assert served["s3"].downloads(served["bucket"], "loras/s3-lora/adapter_model.safetensors") == 1
    c = openai.OpenAI(base_url=served["server"].base_url + "/v1", api_key=API_KEY, max_retries=0)
    models = {m.id: m for m in c.models.list().data}
    assert models["s3-lora"].parent == served["ckpt"] and models["static-lora"].root == served["static"]
    metrics = httpx.get(served["server"].base_url + "/metrics").text
    assert 'loraplex_lora_resolutions_total{outcome="found",resolver="lora_s3_resolver"} 1.0' in metrics
    assert "loraplex_lora_downloads_total 1.0" in metrics
    size = sum(p.stat().st_size for p in Path(served["source"]).iterdir())
    assert f"loraplex_lora_download_bytes_total {float(size)}" in metrics


def test_api_key_from_the_environment(served):
    r = httpx.get(served["server"].base_url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "UnauthorizedError"


def test_sigterm_drains_in_flight_requests_then_exits(served):
    server = served["server"]
    from server.test_engine_process import engine_pid, is_gone
    engine = engine_pid(server)
    chunks = []
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "static-lora", "prompt": "drain me", "max_tokens": 120,
                            "temperature": 0, "ignore_eos": True, "stream": True,
                            "return_token_ids": True}) as r:
        lines = r.iter_lines()
        for line in lines:
            if line:
                chunks.append(line)
                break
        # The request is still generating when the signal arrives: the drain has work to wait for.
        assert "loraplex_num_requests_running 1.0" in httpx.get(server.base_url + "/metrics", timeout=10).text
        server.proc.send_signal(signal.SIGTERM)
        chunks.extend(line for line in lines if line)
    assert chunks[-1] == "data: [DONE]"
    choices = [json.loads(c[6:])["choices"][0] for c in chunks[:-1]]
    # All 120 tokens arrived (a chunk holds several when the stream fell behind the engine).
    assert sum(len(c["token_ids"]) for c in choices) == 120 and "".join(c["text"] for c in choices)
    assert server.proc.wait(30) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/health", timeout=2)
    assert "draining in-flight requests" in server.log_path.read_text()
    deadline = time.monotonic() + 10             # the engine process stops with the server
    while not is_gone(engine):
        assert time.monotonic() < deadline, "the engine process outlived the server"
        time.sleep(0.05)
