"""Load benchmark of `loraplex serve` on loopback: many adapters, thrashing LoRA caches.

Starts `loraplex serve` as a subprocess on a tiny random Llama (tests/models.py) with
adapters resolved on first request from a filesystem resolver directory, then sends
--requests completions (random model per request: the base or one of --adapters
adapters) with --concurrency in flight, through the official openai client. Reports
failures, outputs that differ from the offline LLM, request and token throughput,
latency percentiles, and the server's RSS before and after the measured run.

    .venv/bin/python benchmarks/bench_server.py --requests 400 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

PROMPTS = ["hello world", "the quick brown fox", "serving many adapters", "what is the answer?",
           "SELECT name FROM", "once upon a time"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def offline_run(ckpt: str, paths: dict, jobs: list, args) -> tuple[dict, float]:
    """The offline LLM's outputs for `jobs` (the reference), and its seconds for all of them
    in one generate() call (the same work without HTTP)."""
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.lora_request import lora_id_for_name

    llm = LLM(ckpt, enable_lora=True, max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
              max_num_seqs=args.concurrency)
    loras = [None if m == "base" else LoRARequest(m, lora_id_for_name(m), paths[m]) for m, _ in jobs]
    start = time.perf_counter()
    outs = llm.generate([p for _, p in jobs], SamplingParams(temperature=0, max_tokens=args.max_tokens),
                        lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    del llm
    _release_device_memory()
    return {job: out.outputs[0].text for job, out in zip(jobs, outs)}, elapsed


def _release_device_memory() -> None:
    """Give the offline engine's GPU memory back before the server starts: the server
    sizes its KV cache from the memory it finds free."""
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


async def run_load(base_url: str, jobs: list, expected: dict, args) -> tuple[list[float], list[str], int]:
    import openai

    latencies, failures, tokens = [], [], 0
    gate = asyncio.Semaphore(args.concurrency)
    async with openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="bench", max_retries=0, timeout=300) as c:
        async def one(model: str, prompt: str) -> None:
            nonlocal tokens
            async with gate:
                start = time.perf_counter()
                try:
                    out = await c.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens,
                                                     temperature=0)
                except openai.APIError as e:
                    failures.append(f"{model}: {e}")
                    return
                latencies.append(time.perf_counter() - start)
                tokens += out.usage.completion_tokens
                if expected is not None and out.choices[0].text != expected[(model, prompt)]:
                    failures.append(f"{model}/{prompt}: output differs from the offline LLM")
        await asyncio.gather(*[one(m, p) for m, p in jobs])
    return latencies, failures, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--max-loras", type=int, default=2)
    parser.add_argument("--max-cpu-loras", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--no-check", action="store_true", help="skip the offline comparison")
    parser.add_argument("--hidden-size", type=int, default=64,
                        help="model width (64: tests/models.py's tiny model; heads of 64, KV heads half)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--offline-timing", action="store_true",
                        help="also time LLM.generate on the same requests, all submitted at once")
    args = parser.parse_args()

    import httpx
    from adapters import write_peft_adapter
    from models import make_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="bench-server-"))
    h = args.hidden_size
    if h == 64:   # tests/models.py's tiny model as it is: 4 heads of 16, 2 KV heads
        sizes, kv_width = {}, 32
    else:         # heads of 64, half as many KV heads
        heads = max(1, h // 64)
        kv_heads = max(1, heads // 2)
        sizes = dict(hidden_size=h, intermediate_size=h * 11 // 4, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, head_dim=h // heads)
        kv_width = kv_heads * (h // heads)
    ckpt = str(make_tiny_checkpoint(tmp / "model", num_hidden_layers=args.layers, **sizes))
    shapes = {"q_proj": (h, h), "k_proj": (h, kv_width), "v_proj": (h, kv_width), "o_proj": (h, h)}
    cache = tmp / "adapters"
    paths = {f"bench-{i}": str(write_peft_adapter(cache / f"bench-{i}", seed=i, base_model_name_or_path=ckpt,
                                                   rank=args.rank, num_layers=args.layers, shapes=shapes,
                                                   target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
             for i in range(args.adapters)}
    rng = random.Random(0)
    keys = [(m, p) for m in ["base", *paths] for p in PROMPTS]
    jobs = [rng.choice(keys) for _ in range(args.requests)]
    expected, offline_s = None, None
    if not args.no_check:
        expected, _ = offline_run(ckpt, paths, keys, args)
    if args.offline_timing:
        _, offline_s = offline_run(ckpt, paths, jobs, args)

    port = free_port()
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1", VLLM_PLUGINS="lora_filesystem_resolver",
               VLLM_LORA_RESOLVER_CACHE_DIR=str(cache))
    server = subprocess.Popen(
        [sys.executable, "-m", "loraplex.server.cli", "serve", ckpt, "--served-model-name", "base",
         "--enable-lora", "--max-loras", str(args.max_loras), "--max-cpu-loras", str(args.max_cpu_loras),
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env)
    base_url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"loraplex serve exited with status {server.returncode}")
            try:
                if httpx.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        warmup = [(m, PROMPTS[0]) for m in ["base", *paths]]   # resolves every adapter once
        _, failures, _ = asyncio.run(run_load(base_url, warmup, expected, args))
        rss_before = rss_mib(server.pid)
        start = time.perf_counter()
        latencies, more, tokens = asyncio.run(run_load(base_url, jobs, expected, args))
        elapsed = time.perf_counter() - start
        failures += more
        rss_after = rss_mib(server.pid)
        metrics = httpx.get(base_url + "/metrics").text
    finally:
        server.terminate()
        server.wait(60)

    def metric(name: str) -> str:
        return next((line.split()[-1] for line in metrics.splitlines() if line.startswith(name + " ")), "?")

    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [float("nan")] * 99
    print(f"model hidden {h}, {args.layers} layers, adapters of rank {args.rank}; "
          f"requests {args.requests}, concurrency {args.concurrency}, models {args.adapters} adapters + base, "
          f"max_loras {args.max_loras}, max_cpu_loras {args.max_cpu_loras}, max_tokens {args.max_tokens}")
    print(f"failures {len(failures)}" + (f" (first: {failures[0]})" if failures else ""))
    print(f"{args.requests / elapsed:.1f} requests/s, {tokens / elapsed:.1f} output tokens/s "
          f"over {elapsed:.2f} s")
    if offline_s is not None:
        print(f"offline LLM.generate on the same {args.requests} requests: {offline_s:.2f} s "
              f"({args.requests / offline_s:.1f} requests/s)")
    print(f"latency p50 {q[49] * 1000:.0f} ms, p95 {q[94] * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms")
    print(f"server RSS {rss_before:.1f} MiB -> {rss_after:.1f} MiB")
    for name in ("device_hits", "cpu_hits", "cpu_misses", "loads", "cpu_evictions", "device_evictions"):
        print(f"loraplex_lora_{name}_total {metric(f'loraplex_lora_{name}_total')}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
