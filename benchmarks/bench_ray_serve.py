"""Scale-out benchmark of `loraplex serve-ray`: replicas, routing by adapter, warm-hit share.

For each configuration (number of replicas x routing), starts `loraplex serve-ray` as a
subprocess (its own local Ray cluster), with --adapters random adapters for the model in a
filesystem-resolver directory, resolved by each replica on first request. Then sends
--requests greedy completions, each for an adapter drawn from a Zipf(--zipf) popularity
over the adapters (the same seeded sequence for every configuration), --concurrency in
flight: one warm-up pass (resolves the adapters, fills the caches; not measured), then
--runs measured passes. Reports requests/s and output tokens/s (median and range of the
runs), the warm-hit share and the engines' adapter loads, all from the replicas' own
metrics: a request is warm when its replica already held its adapter when it arrived
(Ray's per-replica list of adapters, as long as the engine's CPU cache), and an adapter
load is an engine reading an adapter from disk (first use, or after its CPU cache
evicted it to make room for others in flight). Routing `adapter` is Ray Serve's model
multiplexing keyed by the adapter name (loraplex's default); `default` is Ray's default
routing, blind to adapters. With one replica the routing makes no difference and only
`adapter` runs.

    .venv/bin/python benchmarks/bench_ray_serve.py                      # CPU, the demo model
    .venv/bin/python benchmarks/bench_ray_serve.py --replicas 1,2 --routings adapter,default

benchmarks/gpu_ray_serve.py runs the same with one replica per GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PROMPTS = ["hello world", "the quick brown fox", "serving many adapters", "tiny model", "lora rocks"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """(in, out) of q/k/v/o_proj for a Llama-family config.json."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    return {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head_dim, hidden)}


def write_adapters(model_dir: Path, served_name: str, root: Path, count: int, rank: int) -> list[str]:
    from adapters import write_peft_adapter

    config = json.loads((model_dir / "config.json").read_text())
    names = [f"zipf-{i:02d}" for i in range(count)]
    for i, name in enumerate(names):
        write_peft_adapter(root / name, rank=rank, num_layers=config["num_hidden_layers"], seed=i,
                           shapes=adapter_shapes(model_dir), target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
                           base_model_name_or_path=served_name)
    return names


def zipf_sequence(names: list[str], exponent: float, count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** exponent for rank in range(len(names))]
    return random.Random(seed).choices(names, weights=weights, k=count)


def replica_counters(base_url: str) -> Counter:
    """Summed over the replicas: adapter requests that found their adapter on their replica
    (warm) or not (cold), adapter loads from disk into the engines (loads), live replicas."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: Counter = Counter()
    for family in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name == "loraplex_lora_loads_total":
                counts["loads"] += sample.value
            elif sample.name == "loraplex_replica_requests_total" and sample.labels["target"] != "base":
                counts[sample.labels["target"].removeprefix("adapter_")] += sample.value
            elif sample.name == "loraplex_replica_info":
                counts["replicas"] += 1
    return counts


async def one_pass(base_url: str, order: list[str], args) -> tuple[float, int, int]:
    """(seconds, output tokens, failures) of one pass over `order`."""
    import openai

    gate = asyncio.Semaphore(args.concurrency)
    tokens = failures = 0

    async def ask(client, i: int, name: str) -> None:
        nonlocal tokens, failures
        async with gate:
            try:
                out = await client.completions.create(
                    model=name, prompt=f"Input: {PROMPTS[i % len(PROMPTS)]}\nOutput: ", temperature=0,
                    max_tokens=args.max_tokens, extra_body={"ignore_eos": True})
                tokens += out.usage.completion_tokens
            except openai.APIError as e:
                failures += 1
                print(f"  request for {name} failed: {e}", file=sys.stderr)

    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(ask(client, i, name) for i, name in enumerate(order)))
        return time.perf_counter() - start, tokens, failures


def wait_ready(proc: subprocess.Popen, base_url: str, replicas: int, log: Path, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-ray exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
        try:
            if replica_counters(base_url)["replicas"] >= replicas:
                return
        except (httpx.TransportError, ValueError):
            pass
        time.sleep(1)
    raise TimeoutError(f"serve-ray not ready after {timeout_s} s:\n{log.read_text()[-4000:]}")


def run_config(replicas: int, routing: str, names: list[str], adapters_dir: Path, args, workdir: Path) -> dict:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "LORAPLEX_"))}
    # Ray's own metrics are not measured; their collector has crashed a raylet at start-up here.
    env.setdefault("RAY_enable_metrics_collection", "0")
    env.update({"VLLM_PLUGINS": "lora_filesystem_resolver", "VLLM_LORA_RESOLVER_CACHE_DIR": str(adapters_dir),
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    argv = [sys.executable, "-m", "loraplex.server.cli", "serve-ray", str(args.model),
            "--served-model-name", args.served_model_name, "--enable-lora", "--max-loras", str(args.max_loras),
            "--max-cpu-loras", str(args.max_cpu_loras), "--max-lora-rank", str(max(16, args.rank)),
            "--host", "127.0.0.1", "--port", str(port), "--replicas", str(replicas),
            "--ray-routing", routing, "--ray-replica-cpus", str(args.ray_replica_cpus), *args.serve_arg]
    if args.device:
        argv += ["--device", args.device]
    if args.ray_replica_gpus is not None:
        argv += ["--ray-replica-gpus", str(args.ray_replica_gpus)]
    log = workdir / f"serve-ray-{replicas}-{routing}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        started = time.perf_counter()
        wait_ready(proc, base_url, replicas, log, args.startup_timeout)
        startup_s = time.perf_counter() - started
        order = zipf_sequence(names, args.zipf, args.requests, seed=args.seed)
        asyncio.run(one_pass(base_url, order, args))   # warm-up: resolve and place the adapters
        runs = []
        for run in range(args.runs):
            time.sleep(2.5)   # replicas report every second, the ingress reads twice a second
            before = replica_counters(base_url)
            seconds, tokens, failures = asyncio.run(one_pass(base_url, order, args))
            time.sleep(2.5)
            after = replica_counters(base_url)
            warm, cold = after["warm"] - before["warm"], after["cold"] - before["cold"]
            runs.append({"seconds": seconds, "requests_per_s": len(order) / seconds, "tokens_per_s": tokens / seconds,
                         "failures": failures, "warm": warm, "cold": cold,
                         "warm_share": warm / (warm + cold) if warm + cold else float("nan"),
                         "adapter_loads": after["loads"] - before["loads"], "live_replicas": after["replicas"]})
            print(f"  {replicas} replica(s), routing {routing}, run {run + 1}: {runs[-1]}", flush=True)
        return {"replicas": replicas, "routing": routing, "startup_s": startup_s, "runs": runs}
    finally:
        proc.send_signal(signal.SIGINT)   # serve-ray stops the cluster it started
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def summary(result: dict) -> str:
    def spread(key: str, fmt: str) -> str:
        values = [run[key] for run in result["runs"]]
        return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"

    failures = sum(run["failures"] for run in result["runs"])
    return (f"| {result['replicas']} | {result['routing']} | {spread('requests_per_s', '.1f')} | "
            f"{spread('tokens_per_s', '.0f')} | {spread('warm_share', '.0%')} | "
            f"{spread('adapter_loads', '.0f')} | {failures} |")


def parse_args(argv=None, **defaults) -> argparse.Namespace:
    from loraplex.demo import DEMO_BASE_MODEL_NAME, demo_model_path

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=demo_model_path(), help="base model directory (default: the demo)")
    parser.add_argument("--served-model-name", default=DEMO_BASE_MODEL_NAME,
                        help="the base model's served name, which the adapters name as their base")
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts (default: 1,2)")
    parser.add_argument("--routings", default="adapter,default", help="comma-separated: adapter, default")
    parser.add_argument("--adapters", type=int, default=16, help="number of adapters (default: 16)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (default: 8)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent of adapter popularity (default: 1.1)")
    parser.add_argument("--requests", type=int, default=400, help="requests per pass (default: 400)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: 16)")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request (default: 16)")
    parser.add_argument("--max-loras", type=int, default=2, help="device slots per replica (default: 2)")
    parser.add_argument("--max-cpu-loras", type=int, default=4, help="CPU cache per replica (default: 4)")
    parser.add_argument("--runs", type=int, default=3, help="measured passes per configuration (default: 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="--device of the replicas (default: cpu)")
    parser.add_argument("--ray-replica-cpus", type=float, default=0.5)
    parser.add_argument("--ray-replica-gpus", type=float, default=None)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="an extra flag for serve-ray (repeat: --serve-arg=--dtype --serve-arg=bfloat16)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.set_defaults(**defaults)
    return parser.parse_args(argv)


def main(argv=None, **defaults) -> int:
    args = parse_args(argv, **defaults)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        workdir = Path(tmp)
        names = write_adapters(args.model, args.served_model_name, workdir / "adapters", args.adapters, args.rank)
        for replicas in (int(n) for n in args.replicas.split(",")):
            for routing in args.routings.split(","):
                if replicas == 1 and routing != "adapter" and "adapter" in args.routings:
                    continue   # one replica: the routing cannot matter
                results.append(run_config(replicas, routing, names, workdir / "adapters", args, workdir))
    print("\n| replicas | routing | requests/s | output tokens/s | warm share | adapter loads per pass | failures |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for result in results:
        print(summary(result))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
