#!/usr/bin/env python3
"""The base model's GEMMs by row count: which mixed-step bucket sizes cuBLAS serves well.

    PYTHONPATH=src:benchmarks python3 benchmarks/gpu_gemm_rows.py [--replays 30]

A graphed mixed step (32 decodes and a 128-token prompt, 160 tokens, bucket 192) spent 7.65
of its 13.3 ms in GEMMs on an H100 (gpu_mixed_step.py --profile, fifth GPU session): for
such row counts cuBLAS picked tiles without split-K, and one kernel, by its shape the down
projection, took 89 us a layer against 35 us of weight traffic. This times `F.linear` in
bfloat16 for Llama-3-8B's four projections at row counts around the mixed-step buckets
(mixed_step_graphs.TOKEN_BUCKETS), each as CUDA-graph replays over rotated weight copies
(L2 never holds them), beside the floor: the larger of the weight traffic at the measured
copy bandwidth and the FLOPs at the dense bf16 peak. The sum over a layer's projections
times 32 layers says what a bucket's GEMMs cost a step: if a larger bucket is faster than
a smaller one, padding to it pays.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from gpu_lora_kernels import copy_bandwidth, time_graph

# name -> (in_features, out_features): Llama-3-8B's fused projections.
PROJECTIONS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
ROWS = (64, 96, 128, 160, 192, 224, 256, 320, 384, 512)
LAYERS = 32
DENSE_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}   # SXM, without sparsity


def peak_flops() -> float:
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DENSE_BF16_FLOPS.items() if k in name), 989e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replays", type=int, default=30)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("This script needs a CUDA GPU.")
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    bandwidth, flops = copy_bandwidth(), peak_flops()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    print(f"\nus per GEMM (floor us in brackets); step = 32 layers x the four projections, ms\n"
          f"{'rows':>5}" + "".join(f"{name:>18}" for name in PROJECTIONS) + f"{'step':>9}{'floor':>8}")
    for rows in ROWS:
        line, step_us, floor_step_us = f"{rows:>5}", 0.0, 0.0
        for in_features, out_features in PROJECTIONS.values():
            weight_bytes = in_features * out_features * 2
            copies = max(2, -(-3 * l2 // weight_bytes))
            weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
                       for _ in range(copies)]
            x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)

            def gemms(weights=weights, x=x):
                for w in weights:
                    F.linear(x, w)
            us = time_graph(gemms, copies, args.replays)
            floor_us = max(weight_bytes / bandwidth, 2 * rows * in_features * out_features / flops) * 1e6
            line += f"{us:>10.1f} ({floor_us:>4.0f})"
            step_us += us
            floor_step_us += floor_us
            del weights, x
        print(f"{line}{step_us * LAYERS / 1e3:>9.2f}{floor_step_us * LAYERS / 1e3:>8.2f}", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
