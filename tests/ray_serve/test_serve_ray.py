"""`loraplex serve-ray` as a user runs it: a subprocess that starts a local Ray cluster with two
CPU replicas of the demo model behind one ingress, adapters in a moto S3 bucket resolved by each
replica on first request. One cluster for the whole module (Ray's start-up is the slow part);
the replica-killing test runs last."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import time
import uuid
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters import write_peft_adapter
from loraplex.demo import DEMO_ADAPTER_NAMES, demo_adapters_dir, demo_model_path, format_prompt
from loraplex.demo.tasks import held_out_pairs
from loraplex.ray.backend import REFRESH_INTERVAL_S
from loraplex.ray.directory import REPORT_INTERVAL_S
from loraplex.server.demo_mode import DEMO_SERVED_NAME
from server.real_server import real_server
from server.serve_process import ServeProcess
from servers.fixtures import s3_server  # noqa: F401 - a fixture
from servers.s3_server import upload_dir

API_KEY = "ray-test-key"
NUM_KILLED_STREAMS = 16
# Replicas report every REPORT_INTERVAL_S; the ingress reads the reports every REFRESH_INTERVAL_S.
REPORT_LAG_S = REPORT_INTERVAL_S + REFRESH_INTERVAL_S + 0.5
NUM_AFFINITY_ADAPTERS = 8
AFFINITY_ADAPTERS = [f"aff-{i}" for i in range(NUM_AFFINITY_ADAPTERS)]
# The demo model's projections, (in_features, out_features): random adapters that fit it.
DEMO_SHAPES = {"q_proj": (128, 128), "v_proj": (128, 64)}
# Each replica holds 5 adapters (Ray's list and the engine's CPU cache): the two hold all 8,
# with room for an adapter that two concurrent first requests placed on both.
SERVE_ARGV = [str(demo_model_path()), "--served-model-name", DEMO_SERVED_NAME, "--enable-lora",
              "--max-loras", "2", "--max-cpu-loras", "5", "--device", "cpu", "--api-key", API_KEY]


@pytest.fixture(scope="module")
def store(s3_server, tmp_path_factory):   # noqa: F811
    """A bucket with the demo adapters and NUM_AFFINITY_ADAPTERS random ones under adapters/."""
    bucket = f"ray-{uuid.uuid4().hex[:10]}"
    client = s3_server.client()
    client.create_bucket(Bucket=bucket)
    for name in DEMO_ADAPTER_NAMES:
        upload_dir(client, bucket, f"adapters/{name}", demo_adapters_dir() / name)
    local = tmp_path_factory.mktemp("affinity-adapters")
    for i, name in enumerate(AFFINITY_ADAPTERS):
        path = write_peft_adapter(local / name, rank=4, num_layers=4, shapes=DEMO_SHAPES, seed=100 + i,
                                  base_model_name_or_path=DEMO_SERVED_NAME)
        upload_dir(client, bucket, f"adapters/{name}", path)
    return bucket


# Ray's own metrics export is no part of these tests, and its collector thread has crashed
# the raylet at start-up on a loaded machine (SIGSEGV in OpenTelemetry's buildMetrics).
RAY_ENV = {"RAY_enable_metrics_collection": "0"}


def resolver_env(s3_server, bucket: str, cache_dir) -> dict[str, str]:  # noqa: F811
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_", "AWS_"))}
    env.update(RAY_ENV)
    env.update(s3_server.env())
    env.update({"VLLM_PLUGINS": "lora_s3_resolver", "VLLM_LORA_RESOLVER_S3_URI": f"s3://{bucket}/adapters",
                "VLLM_LORA_RESOLVER_CACHE_DIR": str(cache_dir), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    return env


@pytest.fixture(scope="module")
def cluster(s3_server, store, tmp_path_factory):   # noqa: F811
    root = tmp_path_factory.mktemp("serve-ray")
    env = resolver_env(s3_server, store, root / "cache")
    server = ServeProcess([*SERVE_ARGV, "--host", "127.0.0.1", "--replicas", "2", "--ray-replica-cpus", "0.5"],
                          env, root / "serve-ray.log", command="serve-ray")
    try:
        server.wait_ready(timeout_s=300)
        wait_for_replicas(server, 2)
        server.env = env
        yield server
    finally:
        server.stop(grace_s=60)


def get(server, path: str, **kwargs) -> httpx.Response:
    return httpx.get(server.base_url + path, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30, **kwargs)


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60)


def metric(server, name: str, **labels) -> dict[str, float]:
    """{replica id: value} of the samples of `name` (whose labels include `labels`)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(get(server, "/metrics").text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                replica = sample.labels.get("replica", "")
                values[replica] = values.get(replica, 0.0) + sample.value
    return values


def replica_pids(server) -> dict[str, int]:
    """{replica id: pid} of the live replicas, from loraplex_replica_info."""
    pids = {}
    for family in text_string_to_metric_families(get(server, "/metrics").text):
        for sample in family.samples:
            if sample.name == "loraplex_replica_info":
                pids[sample.labels["replica"]] = int(sample.labels["pid"])
    return pids


def wait_for_replicas(server, count: int, *, timeout_s: float = 240, exclude_pids=()) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = {r: p for r, p in replica_pids(server).items() if p not in exclude_pids}
        if len(pids) >= count:
            return pids
        time.sleep(0.5)
    raise TimeoutError(f"{count} replicas not reporting after {timeout_s} s:\n{server.log_path.read_text()[-5000:]}")


def client(base_url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


async def greedy_completions(base_url: str, model: str, prompts: list[str], max_tokens: int = 16) -> list[str]:
    async with client(base_url) as c:
        out = await c.completions.create(model=model, prompt=prompts, max_tokens=max_tokens, temperature=0)
    return [choice.text for choice in sorted(out.choices, key=lambda ch: ch.index)]


def test_an_interrupt_while_starting_stops_the_cluster_it_started(tmp_path):
    """SIGTERM (or Ctrl-C) before the application is up: a clean stop, no traceback. First in
    the module, so it runs before the shared cluster starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    server = ServeProcess([*SERVE_ARGV, "--replicas", "1", "--ray-replica-cpus", "0.5"], {**env, **RAY_ENV},
                          tmp_path / "serve-ray.log", command="serve-ray")
    try:
        deadline = time.monotonic() + 120
        while "Deploying new version of Deployment" not in server.log_path.read_text():   # in serve.run
            assert server.proc.poll() is None and time.monotonic() < deadline, server.log_path.read_text()
            time.sleep(0.2)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(120) == 130
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "interrupted while starting: stopping" in log and "Traceback" not in log, log


def test_outputs_equal_a_single_loraplex_serve(cluster, s3_server, store, tmp_path):   # noqa: F811
    """Base model and adapters resolved from S3 on first request, through the ingress and two
    replicas: the same text as one `loraplex serve` over the same bucket."""
    tasks = {DEMO_SERVED_NAME: "echo", **{name: name for name in DEMO_ADAPTER_NAMES}}
    pairs = {model: held_out_pairs(task, 4) for model, task in tasks.items()}
    prompts = {model: [format_prompt(text) for text, _ in pairs[model]] for model in tasks}
    # Byte-level tokenizer: one token per byte, plus EOS and a little slack.
    max_tokens = max(len(answer.encode()) for model in tasks for _, answer in pairs[model]) + 4

    async def all_answers(base_url):
        return await asyncio.gather(*(greedy_completions(base_url, m, p, max_tokens) for m, p in prompts.items()))

    ray_answers = asyncio.run(all_answers(cluster.base_url))
    env = resolver_env(s3_server, store, tmp_path / "cache")
    with real_server(["serve", *SERVE_ARGV], env) as single:
        single_answers = asyncio.run(all_answers(single.base_url))
    assert ray_answers == single_answers
    for model, answers in zip(prompts, ray_answers):   # and the adapters did their tasks
        expected = [answer for _, answer in pairs[model]]
        assert sum(a == e for a, e in zip(answers, expected)) >= 3, (model, answers, expected)

    models = {m["id"]: m for m in get(cluster, "/v1/models").json()["data"]}
    assert models[DEMO_SERVED_NAME]["parent"] is None and models[DEMO_SERVED_NAME]["max_model_len"] == 256
    for name in DEMO_ADAPTER_NAMES:   # resolved by some replica, listed by the cluster
        assert models[name]["parent"] == DEMO_SERVED_NAME
        assert models[name]["root"].endswith(f"/{name}")


def test_replicas_freeze_their_start_up_heap(cluster):
    """A replica's worker process exempts its start-up objects from the garbage collector
    (core/gc_heap.py). Ray forwards the replicas' log lines to serve-ray's output, folding
    lines that differ only in numbers into one: the second replica's may not show."""
    deadline = time.monotonic() + 60
    while not re.search(r"Ray replica: [1-9]\d+ start-up objects frozen", cluster.log_path.read_text()):
        assert time.monotonic() < deadline, cluster.log_path.read_text()[-5000:]
        time.sleep(0.5)


def test_openai_client_through_the_ingress(cluster):
    async def run():
        async with client(cluster.base_url) as c:
            prompt = format_prompt("lora rocks")
            plain = await c.completions.create(model="reverse", prompt=prompt, max_tokens=20, temperature=0)
            streamed = [chunk.choices[0].text async for chunk in await c.completions.create(
                model="reverse", prompt=prompt, max_tokens=20, temperature=0, stream=True)]
            messages = [{"role": "user", "content": "hello world"}]
            chat = await c.chat.completions.create(model="upper", messages=messages, max_tokens=20, temperature=0)
            chat_stream = await c.chat.completions.create(model="upper", messages=messages, max_tokens=20,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
            chunks = [chunk async for chunk in chat_stream]
            answer = await c.responses.create(model="upper", input="hello world", max_output_tokens=20, temperature=0)
            events = [e async for e in await c.responses.create(model="upper", input="hello world",
                                                                 max_output_tokens=20, temperature=0, stream=True)]
            return plain, streamed, chat, chunks, answer, events

    plain, streamed, chat, chunks, answer, events = asyncio.run(run())
    assert answer.output_text == "".join(e.delta for e in events if e.type == "response.output_text.delta") \
        == "HELLO WORLD"                         # /v1/responses through the ingress too
    assert events[-1].type == "response.completed"
    assert plain.choices[0].text == "".join(streamed) == "skcor arol"
    assert chat.choices[0].message.content == "HELLO WORLD"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "HELLO WORLD"
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_errors_auth_and_management_routes(cluster):
    unknown = post(cluster, "/v1/completions", {"model": "no-such-adapter", "prompt": "x", "max_tokens": 2})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    unsafe = post(cluster, "/v1/completions", {"model": "../etc", "prompt": "x", "max_tokens": 2})
    assert unsafe.status_code == 400
    too_long = post(cluster, "/v1/chat/completions", {"model": "upper", "max_tokens": 250,
                                                      "messages": [{"role": "user", "content": "x" * 40}]})
    assert too_long.status_code == 400 and "context length is 256" in too_long.json()["error"]["message"]
    no_key = httpx.post(cluster.base_url + "/v1/completions", json={"prompt": "x"}, timeout=30)
    assert no_key.status_code == 401
    for route, body in (("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}),
                        ("/v1/unload_lora_adapter", {"lora_name": "upper"})):
        refused = post(cluster, route, body)
        assert refused.status_code == 501
        assert "not available with Ray replicas" in refused.json()["error"]["message"]
    assert httpx.get(cluster.base_url + "/health", timeout=30).status_code == 200
    assert 'loraplex_http_requests_total{method="POST",route="/v1/completions",status="404"}' in \
        get(cluster, "/metrics").text


def adapter_requests(server) -> dict[str, Counter]:
    """{replica id: Counter(warm=..., cold=...)} of the adapter requests each replica took."""
    counts: dict[str, Counter] = {}
    for state in ("warm", "cold"):
        for replica, value in metric(server, "loraplex_replica_requests_total", target=f"adapter_{state}").items():
            counts.setdefault(replica, Counter())[state] += value
    return counts


def test_requests_go_to_the_replica_that_holds_their_adapter(cluster, s3_server, store):   # noqa: F811
    """8 adapters, 2 replicas of max_loras 2 / max_cpu_loras 5: once each adapter is on a
    replica, nearly every request finds its adapter there already (counted by the replicas).
    Routing blind to adapters would find it warm about 5 times in 8."""
    time.sleep(REPORT_LAG_S)   # the previous tests' requests are all counted
    before = adapter_requests(cluster)
    loads_before = sum(metric(cluster, "loraplex_lora_loads_total").values())
    order = [name for name in AFFINITY_ADAPTERS for _ in range(25)]
    random.Random(15).shuffle(order)
    limit = asyncio.Semaphore(4)

    async def ask(c, name):
        async with limit:
            out = await c.completions.create(model=name, prompt=format_prompt("abc"), max_tokens=2)
            return out.choices[0].finish_reason

    async def run():
        async with client(cluster.base_url) as c:
            return await asyncio.gather(*(ask(c, name) for name in order))

    assert len(asyncio.run(run())) == 200
    time.sleep(REPORT_LAG_S)
    served = {r: counts - before.get(r, Counter()) for r, counts in adapter_requests(cluster).items()}
    warm = sum(c["warm"] for c in served.values())
    cold = sum(c["cold"] for c in served.values())
    loads = sum(metric(cluster, "loraplex_lora_loads_total").values()) - loads_before
    print(f"affinity: {warm:.0f} warm, {cold:.0f} cold, {loads:.0f} adapter loads from disk; per replica {served}")
    assert warm + cold == 200
    assert warm / 200 >= 0.9, f"only {warm:.0f} of 200 requests found their adapter on their replica"
    assert loads <= 20   # the engines read adapters from disk about as often as Ray placed them
    assert len(served) == 2 and all(c.total() > 0 for c in served.values())   # both replicas serve
    for name in AFFINITY_ADAPTERS:
        # Each replica downloads an adapter at most once; on one node they share the cache too.
        assert s3_server.downloads(store, f"adapters/{name}/adapter_model.safetensors") == 1
    # No replica resolves a name twice: once found, it is served from its cache and engine.
    resolved = metric(cluster, "loraplex_lora_first_request_loads_total", outcome="loaded")
    assert max(resolved.values()) <= NUM_AFFINITY_ADAPTERS + len(DEMO_ADAPTER_NAMES), resolved


async def stream_until_killed(c, model: str, started: asyncio.Event, results: list) -> None:
    """One long streaming completion; records ('done' | error code) and sets `started` at the
    first token."""
    stream = await c.completions.create(model=model, prompt=format_prompt("abc"), max_tokens=230,
                                        temperature=0, stream=True, extra_body={"ignore_eos": True})
    try:
        async for chunk in stream:
            started.set()
            if chunk.choices and chunk.choices[0].finish_reason:
                results.append("done")
                return
        results.append("ended without finish_reason")
    except openai.APIError as e:   # the error event of a stream the replica dropped
        results.append(str(getattr(e, "code", None) or e))


def test_killed_replica_fails_its_requests_fast_and_is_restarted(cluster):
    pids = replica_pids(cluster)
    assert len(pids) == 2
    victim = next(iter(pids.values()))

    async def run():
        async with client(cluster.base_url) as c:
            results: list = []
            # Base-model streams all run at once (adapter streams would wait for one of the
            # max_loras slots), and Ray spreads them over both replicas by queue length.
            starts = [asyncio.Event() for _ in range(NUM_KILLED_STREAMS)]
            streams = [asyncio.create_task(stream_until_killed(c, DEMO_SERVED_NAME, started, results))
                       for started in starts]
            await asyncio.wait_for(asyncio.gather(*(s.wait() for s in starts)), 60)
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*streams), 60)   # no request hangs
            after = await asyncio.gather(*(greedy_completions(cluster.base_url, name, [format_prompt("abc")])
                                           for name in AFFINITY_ADAPTERS))
            return results, time.monotonic() - killed_at, after

    results, elapsed, after = asyncio.run(run())
    counts = Counter(results)
    assert set(counts) <= {"done", "503"}, counts
    assert counts["503"] >= 1 and counts["done"] >= 1, counts
    assert all(len(texts) == 1 for texts in after)   # later requests succeed (on the living replica)
    assert elapsed < 60
    restarted = wait_for_replicas(cluster, 2, exclude_pids={victim})   # Ray restarts the replica
    assert victim not in restarted.values()
