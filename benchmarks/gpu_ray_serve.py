"""bench_ray_serve.py on a machine with several GPUs: one replica per GPU.

The same measurement (Zipf popularity over the adapters, routing by adapter against Ray's
default routing, warm-hit share and adapter loads from the replicas' metrics), with GPU
defaults: replicas 1, 2, 4, ... up to the GPUs present, each with one GPU, a real base
model (random rank-16 adapters are written for its shapes), longer outputs and more
requests in flight. Nothing here has run on a GPU yet.

    .venv/bin/python benchmarks/gpu_ray_serve.py --model /models/llama-3-8b \\
        --served-model-name llama-3-8b --json ray_gpu.json
    # any flag of bench_ray_serve.py overrides a default, e.g. --replicas 1,8 --adapters 256
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ray_serve  # noqa: E402


def replica_counts(num_gpus: int) -> str:
    counts, n = [], 1
    while n < num_gpus:
        counts.append(n)
        n *= 2
    return ",".join(str(c) for c in [*counts, num_gpus])


def main(argv=None) -> int:
    import torch

    num_gpus = torch.cuda.device_count()
    if num_gpus == 0:
        print("gpu_ray_serve.py needs GPUs (torch sees none); bench_ray_serve.py runs on the CPU",
              file=sys.stderr)
        return 2
    return bench_ray_serve.main(
        argv, replicas=replica_counts(num_gpus), device="cuda", ray_replica_gpus=1, ray_replica_cpus=4,
        adapters=64, rank=16, requests=2000, concurrency=64 * num_gpus, max_tokens=128,
        max_loras=16, max_cpu_loras=32, startup_timeout=1800)


if __name__ == "__main__":
    sys.exit(main())
