"""Tensor-parallel decode over the GPUs of one host, each size against its floor.

    PYTHONPATH=src:tests python3 benchmarks/gpu_tensor_parallel.py [--tp 1 2 4] [--models 8b 70b] [--out DIR]
    PYTHONPATH=src:tests python3 benchmarks/gpu_tensor_parallel.py --smoke    # tiny model, 2 CPU processes (gloo)

First a correctness check (--skip-check skips it): greedy outputs of a tiny fp32 Llama with
one KV head (replicated on every rank) and three PEFT adapters mixed with base rows, at
every TP size that fits, on the GPU path (Triton kernels, decode CUDA graphs with the NCCL
collectives inside), must equal one device's torch-backend eager outputs; the decode
graphs must have been replayed. It prints PASS or FAIL per size; the exit code is 1 if any
failed.

Models (random bf16 weights, load_format="dummy"): Llama-3-8B shapes at TP 1, 2, 4 and a
70B shape (80 layers, hidden 8192, 64 / 8 heads, intermediate 28672, vocab 128256) at TP
2 and 4 (it does not fit one GPU); sizes above the visible GPU count are skipped. Adapters:
rank 16 on all seven projections, PEFT files (gpu_decode.py's), 32 of them loaded.

Each (model, TP size) is one engine runner made as the engine makes it
(`create_model_runner`: the plain ModelRunner at TP 1, rank 0's TensorParallelRunner
above), driven like gpu_decode.py: batch 64, prompt 128, 128 greedy decode steps (CUDA
graphs), `execute` + device argmax + one host sync per step, median step time; with 0
and with 32 distinct adapters (round robin). TP 1 runs the same path as gpu_decode.py's
batch-64 rows: its figures should equal those (docs/performance.md), which is the
single-GPU no-regression check.

The floor of a step on TP size N is

    bytes one GPU reads / that GPU's copy bandwidth  +  the step's collectives timed alone

bytes = this rank's weights (all but the embedding) + its KV heads' cache at the mean
context + its shard of every active adapter (column-parallel layers: all of A, its rows of
B; row-parallel: its columns of A, all of B). The collectives are what a decode step runs:
2 all-reduces per layer and one for the embedding of [64, hidden] bf16, and the all-gather
of the [64, vocab / N] logits, captured in one CUDA graph and replayed in N fresh processes
before the engine starts (the all-reduce time "measured alone").

A JSON file with every figure goes to --out; the table is printed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp

import gpu_decode
from gpu_decode import LLAMA3_8B, RANK, SMOKE_CONFIG, Blocks, copy_bandwidth, decode_run, log, write_adapters
from loraplex.core.config import EngineConfig
from loraplex.core.model_runner import create_model_runner
from loraplex.core.parallel.group import TPGroup
from loraplex import LLM, SamplingParams
from loraplex.lora_request import LoRARequest

LLAMA_70B = dict(LLAMA3_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8)
MODELS = {"8b": LLAMA3_8B, "70b": LLAMA_70B}
TP_SIZES = {"8b": (1, 2, 4), "70b": (2, 4)}
BATCH, PROMPT_LEN, NEW_TOKENS, NUM_ADAPTERS = 64, 128, 128, 32


def check_outputs(sizes: list[int], device: str) -> bool:
    """TP outputs on the device path (graphs, NCCL) equal one device's torch-backend eager outputs."""
    from adapters import TINY_SHAPES, write_peft_adapter
    from models import make_tiny_checkpoint

    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    settings = dict(dtype="float32", device=device, max_model_len=128, kv_cache_bytes=64 * 2**20, max_num_seqs=16,
                    enable_lora=True, max_loras=2, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(Path(tmp) / "tiny", "llama", num_key_value_heads=1))
        loras = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(Path(tmp) / f"a{i}", rank=4 + 2 * i, seed=i,
                 target_modules=targets, base_model_name_or_path=ckpt,
                 shapes=dict(TINY_SHAPES, k_proj=(64, 16), v_proj=(64, 16))))) for i in range(3)]
        prompts = [{"prompt_token_ids": [3 + (7 * i + j) % 250 for j in range(4 + i)]} for i in range(12)]
        rows = [None if i % 4 == 3 else loras[i % 4] for i in range(12)]   # 3 adapters through 2 slots

        def outputs(llm):
            return [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=rows, use_tqdm=False)]

        expected = outputs(LLM(ckpt, attention_backend="torch", enforce_eager=True, **settings))
        for size in sizes:
            label = f"TP {size}: greedy outputs (graphs, 3 adapters in 2 slots) == one device, torch eager"
            llm = None
            try:
                llm = LLM(ckpt, tensor_parallel_size=size, **settings)
                got = outputs(llm)
                runner = getattr(llm.llm_engine.runner, "local", llm.llm_engine.runner)
                replays = runner.decode_graphs.num_replays if runner.decode_graphs is not None else 0
                passed = got == expected and (device != "cuda" or replays > 0)
                log(f"{'PASS' if passed else 'FAIL'} {label} ({replays} graph replays)")
                ok &= passed
            except Exception:
                log(f"FAIL {label}:\n{traceback.format_exc()}")
                ok = False
            finally:
                if llm is not None and hasattr(llm.llm_engine.runner, "shutdown"):
                    llm.llm_engine.runner.shutdown()
                del llm
                gc.collect()
    return ok


def collective_times(size: int, cfg: dict, batch: int, device_type: str, replays: int = 50) -> float:
    """Seconds of one decode step's collectives on `size` ranks, alone (median over replays)."""
    store = TPGroup.open_store(size, 300)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_collectives_rank, args=(size, store.port, cfg, batch, device_type, replays, queue),
             nprocs=size, join=True)
    return queue.get()


def _collectives_rank(rank, size, port, cfg, batch, device_type, replays, queue) -> None:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    tp = TPGroup.connect(rank, size, device, port=port, timeout_s=300)
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    hidden = torch.zeros(batch, cfg["hidden_size"], dtype=dtype, device=device)   # zeros: sums stay finite
    logits = torch.zeros(batch, -(-cfg["vocab_size"] // size), dtype=dtype, device=device)

    def step():
        for _ in range(2 * cfg["num_hidden_layers"] + 1):
            tp.all_reduce(hidden)
        tp.all_gather(logits)

    for _ in range(3):
        step()
    times = []
    if device_type == "cuda":
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        for _ in range(replays):
            tp.min(0)   # start together
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(replays):
            tp.min(0)
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    if rank == 0:
        queue.put(statistics.median(times))


def rank_bytes(runner, cfg: dict, tp_size: int, mean_context: float) -> dict:
    """Bytes one GPU (rank 0) reads per decode step: weights, KV cache, one adapter's shard."""
    local = getattr(runner, "local", runner)   # rank 0's ModelRunner under TP
    weights = sum(p.numel() * p.element_size() for n, p in local.model.named_parameters()
                  if "embed_tokens" not in n)
    kv_per_token = 2 * cfg["num_hidden_layers"] * local.num_kv_heads * cfg["head_dim"] * 2
    stacks = local.lora.stacks
    adapter = sum((stacks.lora_a[t][:, 0].numel() + stacks.lora_b[t][:, 0].numel()) * stacks.lora_a[t].element_size()
                  for t in stacks.lora_a)   # rank 16 = max_lora_rank: every row of a slot is the adapter's
    return {"weights": weights, "kv": BATCH * mean_context * kv_per_token, "adapter": adapter}


def bench_one(model: str, cfg: dict, tp_size: int, paths: list[Path], bandwidth: float, device: str,
              new_tokens: int, prompt_len: int) -> list[dict]:
    collectives_s = collective_times(tp_size, cfg, BATCH, device) if tp_size > 1 else 0.0
    log(f"{model} TP {tp_size}: collectives of a decode step alone {collectives_s * 1e3:.3f} ms")
    t = time.perf_counter()
    runner = create_model_runner(EngineConfig(
        model=str(paths[0].parent / "model"), load_format="dummy", dtype="bfloat16", device=device,
        tensor_parallel_size=tp_size, enable_lora=True, max_loras=NUM_ADAPTERS, max_lora_rank=RANK,
        max_cpu_loras=NUM_ADAPTERS, max_num_seqs=BATCH, max_model_len=640, max_num_batched_tokens=8192,
        gpu_memory_utilization=0.85))
    log(f"{model} TP {tp_size}: runner ready in {time.perf_counter() - t:.1f} s")
    rows = []
    try:
        requests = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
        for request in requests:
            runner.lora.manager.add_lora(request)
        blocks = Blocks(runner.num_kv_blocks, runner.block_size)
        nbytes = rank_bytes(runner, cfg, tp_size, prompt_len + new_tokens / 2)
        for count in (0, NUM_ADAPTERS):
            r = decode_run(runner, blocks, BATCH, requests[:count], prompt_len, new_tokens, seed=tp_size + count)
            floor_bytes = nbytes["weights"] + nbytes["kv"] + count * nbytes["adapter"]
            r.update(model=model, tp=tp_size, adapters=count, GB_per_gpu=floor_bytes / 1e9,
                     memory_floor_ms=floor_bytes / bandwidth * 1e3, collectives_ms=collectives_s * 1e3)
            r["floor_ms"] = r["memory_floor_ms"] + r["collectives_ms"]
            r["vs_floor"] = r["step_ms"] / r["floor_ms"]
            rows.append(r)
            log(json.dumps(r))
    finally:
        if hasattr(runner, "shutdown"):
            runner.shutdown()
        del runner
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", nargs="+", type=int, default=None, help="TP sizes (default: each model's)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, gloo: checks this script only")
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness check")
    args = parser.parse_args()
    device = gpu_decode.DEVICE = "cpu" if args.smoke else "cuda"
    num_gpus = torch.cuda.device_count() if device == "cuda" else 2
    checked = args.skip_check or check_outputs([s for s in (1, 2, 4, 8) if s <= num_gpus], device)
    new_tokens, prompt_len = (6, 8) if args.smoke else (NEW_TOKENS, PROMPT_LEN)
    bandwidth = copy_bandwidth()
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke test)",
               "num_gpus": num_gpus, "torch": torch.__version__, "copy_bandwidth_TBps": bandwidth / 1e12, "rows": []}
    log(f"{results['device']} x{num_gpus}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for model in args.models:
        cfg = dict(MODELS[model], **(SMOKE_CONFIG if args.smoke else {}))
        sizes = [s for s in (args.tp or TP_SIZES[model]) if s <= num_gpus]
        if not sizes:
            log(f"{model}: no TP size fits {num_gpus} GPU(s); skipped")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "model").mkdir()
            (root / "model" / "config.json").write_text(json.dumps(cfg))
            t = time.perf_counter()
            paths = write_adapters(root, cfg, NUM_ADAPTERS)
            log(f"{model}: wrote {NUM_ADAPTERS} adapters in {time.perf_counter() - t:.1f} s")
            for size in sizes:
                results["rows"].extend(bench_one(model, cfg, size, paths, bandwidth, device, new_tokens, prompt_len))
        Path(args.out, "gpu_tensor_parallel.json").write_text(json.dumps(results, indent=1))
    print_table(results)
    if not checked:
        log("the correctness check FAILED (above)")
        sys.exit(1)


def print_table(results: dict) -> None:
    log(f"\n{results['device']} x{results['num_gpus']}, torch {results['torch']}, "
        f"copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s; batch {BATCH}, decode")
    log("| model | TP | adapters | step ms | tokens/s | GB/GPU | memory floor ms | collectives ms | "
        "step / floor | speed-up vs smallest TP |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = {}
    for r in results["rows"]:
        key = (r["model"], r["adapters"])
        base.setdefault(key, r["step_ms"])
        log(f"| {r['model']} | {r['tp']} | {r['adapters']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['GB_per_gpu']:.2f} | {r['memory_floor_ms']:.2f} | {r['collectives_ms']:.3f} | "
            f"{r['vs_floor']:.2f} | {base[key] / r['step_ms']:.2f} |")


if __name__ == "__main__":
    main()
