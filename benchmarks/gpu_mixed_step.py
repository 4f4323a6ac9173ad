"""An eager mixed step at 8B shapes: 32 sequences decoding beside one (or two) new 128-token prompts.

    PYTHONPATH=src:tests python3 benchmarks/gpu_mixed_step.py [--profile] [--smoke]

Every new request's first token waits for such a step, so its time is the floor of
time-to-first-token under load. Builds the Llama-3-8B-shaped runner of gpu_decode.py with
8 adapters, prefills 32 sequences (with adapters, round robin) and times six mixed steps
whose newcomer uses an adapter, six whose newcomer does not, and six with two newcomers (ms
each; the first of each is a cold start for that shape): replayed in pieces from CUDA graphs
(mixed_step_graphs.py), as the engine runs them, then eagerly, as it did before; each with the
decodes' attention by the decode kernel (the default) and by the prefill kernel.
--profile adds cProfile's top functions for one more step of each kind and the GPU time
per kernel (torch.profiler), to tell host from device time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import torch

import gpu_decode as bench
from loraplex.core import triton_attention_backend
from loraplex.core.config import EngineConfig
from loraplex.core.model_runner import MIXED_STEP_GRAPHS_ENV, ModelRunner
from loraplex.lora_request import LoRARequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks this script only")
    args = parser.parse_args()
    os.environ[MIXED_STEP_GRAPHS_ENV] = "1"
    cfg = dict(bench.LLAMA3_8B)
    device = "cpu" if args.smoke else "cuda"
    bench.DEVICE = device
    if args.smoke:
        cfg.update(bench.SMOKE_CONFIG)
    tmp = Path(tempfile.mkdtemp())
    model_dir = bench.write_model_dir(tmp, cfg)
    adapters = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(bench.write_adapters(tmp, cfg, 8))]
    runner = ModelRunner(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16", device=device,
                                      enable_lora=True, max_loras=32, max_lora_rank=bench.RANK, max_cpu_loras=40,
                                      max_num_seqs=128, max_model_len=640, max_num_batched_tokens=8192,
                                      gpu_memory_utilization=0.45))
    for request in adapters:
        runner.lora.manager.add_lora(request)
    blocks = bench.Blocks(runner.num_kv_blocks, runner.block_size)
    decoding = bench.new_seqs(runner, 32, 128, adapters, first_id=1, seed=1)
    bench.prefill_all(runner, blocks, decoding, runner.config.max_num_batched_tokens)
    graphs = runner.mixed_graphs
    split_default = triton_attention_backend.MIN_SPLIT_DECODES
    # The attention of the 32 decodes: by the decode kernel (the default), or as one-row tiles of
    # the prefill kernel (as before it was split off): the two on the same machine.
    attention_modes = [("decodes by the decode kernel", split_default), ("all rows by the prefill kernel", 1 << 30)]
    for mode in (["graphed pieces"] if graphs is not None else []) + ["eager"]:
        runner.mixed_graphs = graphs if mode == "graphed pieces" else None
        for attention, min_split in attention_modes:
            triton_attention_backend.MIN_SPLIT_DECODES = min_split
            for label, newcomer_lora, count in (("newcomer with an adapter", [adapters[0]], 1),
                                                ("newcomer without", [], 1), ("two newcomers with adapters",
                                                                              adapters[:2], 2)):
                times = []
                profiled = args.profile and count == 1 and min_split == split_default
                for i in range(6 + profiled):
                    newcomers = bench.new_seqs(runner, count, 128, newcomer_lora, first_id=1000 + 10 * i, seed=i)
                    profiler = cProfile.Profile() if i == 6 else None
                    bench.sync()
                    start = time.perf_counter()
                    if profiler:
                        profiler.enable()
                    bench.run_step(runner, blocks, [(s, 1) for s in decoding] + [(n, n.num_tokens) for n in newcomers])
                    if profiler:
                        profiler.disable()
                        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
                    else:
                        times.append((time.perf_counter() - start) * 1e3)
                    blocks.release(newcomers)
                print(f"mixed step ({mode}; {attention}), {label}: {', '.join(f'{t:.1f}' for t in times)} ms",
                      flush=True)
    triton_attention_backend.MIN_SPLIT_DECODES = split_default
    runner.mixed_graphs = graphs
    if args.profile and device == "cuda":
        newcomer = bench.new_seqs(runner, 1, 128, [adapters[0]], first_id=2000, seed=9)[0]
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            bench.run_step(runner, blocks, [(s, 1) for s in decoding] + [(newcomer, newcomer.num_tokens)])
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20))


if __name__ == "__main__":
    main()
