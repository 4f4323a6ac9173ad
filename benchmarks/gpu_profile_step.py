"""Where a Llama-3-8B-shaped decode step spends its time: per-kernel GPU times and host time.

    PYTHONPATH=src python3 benchmarks/gpu_profile_step.py [--layers N] [--batch 64] [--adapters 32]

1. An eager decode step (enforce_eager) under torch.profiler: GPU time per kernel name,
   summed over the step, with launch counts (kernel times inside a CUDA graph are the same;
   the gaps between them are not).
2. The graphed engine's step split into host preparation and graph replay: a step timed
   with perf_counter (as gpu_decode.py) beside the replay alone timed with CUDA events.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from gpu_decode import LLAMA3_8B, RANK, Blocks, new_seqs, prefill_all, run_step, write_adapters, write_model_dir
from loraplex.core.config import EngineConfig
from loraplex.core.cuda_graphs import lora_graph_bound
from loraplex.core.model_runner import ModelRunner
from loraplex.lora_request import LoRARequest


def make_runner(model_dir: Path, eager: bool) -> ModelRunner:
    return ModelRunner(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16", device="cuda",
                                    enable_lora=True, max_loras=32, max_lora_rank=RANK, max_cpu_loras=40,
                                    max_num_seqs=128, max_model_len=640, max_num_batched_tokens=8192,
                                    gpu_memory_utilization=0.4, enforce_eager=eager))


def kernel_table(runner, blocks, batch, loras, steps=3) -> None:
    seqs = new_seqs(runner, batch, 128, loras, first_id=1000, seed=1)
    prefill_all(runner, blocks, seqs, 8192)
    for _ in range(2):
        run_step(runner, blocks, [(s, 1) for s in seqs])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run_step(runner, blocks, [(s, 1) for s in seqs])
        torch.cuda.synchronize()
    blocks.release(seqs)
    rows = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us > 0 and event.count > 0:
            rows[event.key] = (us / steps, event.count // steps)
    total = sum(us for us, _ in rows.values())
    launches = sum(n for _, n in rows.values())
    print(f"\n== eager decode step, batch {batch}, {len(loras)} adapters: GPU busy {total / 1e3:.2f} ms "
          f"in {launches} kernel launches per step ==")
    print(f"{'us/step':>9} {'launches':>8} {'us/launch':>9}  kernel")
    for name, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:30]:
        print(f"{us:9.1f} {n:8d} {us / max(n, 1):9.2f}  {name[:110]}")


def graph_split(runner, blocks, batch, loras, steps=40) -> None:
    seqs = new_seqs(runner, batch, 128, loras, first_id=5000, seed=2)
    prefill_all(runner, blocks, seqs, 8192)
    graphs = runner.decode_graphs
    size = next(s for s in graphs.sizes if s >= batch)
    # The variant the step replays: new_seqs gives the sequences the adapters round robin.
    graph, _ = graphs.graphs[size, lora_graph_bound(min(len(loras), batch), runner.lora.stacks.max_loras)]
    wall, replay = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        run_step(runner, blocks, [(s, 1) for s in seqs])
        wall.append(time.perf_counter() - t)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        replay.append(start.elapsed_time(end))
    blocks.release(seqs)
    print(f"graphed step, batch {batch}, {len(loras)} adapters: wall {statistics.median(wall) * 1e3:.2f} ms, "
          f"replay alone {statistics.median(replay):.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--compare-overlap", action="store_true",
                        help="only the graphed split, with the LoRA shrink beside the GEMM and without")
    args = parser.parse_args()
    cfg = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    tmp = Path(tempfile.mkdtemp())
    model_dir = write_model_dir(tmp, cfg)
    paths = write_adapters(tmp, cfg, args.adapters)
    requests = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    from loraplex.kernels import lora as lora_ops
    runs = [(False, True), (False, False)] if args.compare_overlap else [(True, True), (False, True)]
    for eager, overlap in runs:
        lora_ops.SHRINK_BESIDE_GEMM = overlap
        print(f"-- {'eager' if eager else 'graphed'}, LoRA shrink beside the GEMM: {overlap}", flush=True)
        runner = make_runner(model_dir, eager)
        for r in requests:
            runner.lora.manager.add_lora(r)
        blocks = Blocks(runner.num_kv_blocks, runner.block_size)
        for loras in ([], requests):
            if eager:
                kernel_table(runner, blocks, args.batch, loras)
            else:
                graph_split(runner, blocks, args.batch, loras)
        del runner
        import gc
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
