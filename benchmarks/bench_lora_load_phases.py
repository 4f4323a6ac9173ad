"""Where a cold adapter's load time goes: each phase of load_lora_adapter timed alone.

    PYTHONPATH=src:tests python benchmarks/bench_lora_load_phases.py [--threads N] [--pin]

Writes one random Llama-3-8B-shaped PEFT adapter (rank 16, all seven projections, bf16,
84 MB) and times, median of 5: indexing the safetensors file, validating names and shapes,
packing (allocation, and reading the file into place; --pin: into page-locked memory,
needs CUDA), the finite check, and the whole load_lora_adapter. Packing and the whole load
are timed twice: into fresh memory (every result kept, as a burst of new adapters does) and
into the recycled buffer of the adapter before (each result dropped, as an adapter leaving
a full cache does; host_buffer.py). Pass --threads to match the engine's torch threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapters import write_peft_adapter  # noqa: E402
from bench_cpu_lora_load import ALL_TARGETS, LLAMA3_8B, RANK, peft_shapes  # noqa: E402

from loraplex.core.lora import adapter as loader  # noqa: E402
from loraplex.core.lora.adapter_config import parse_adapter_config  # noqa: E402
from loraplex.core.lora.targets import llama_lora_spec  # noqa: E402
from loraplex.lora_request import LoRARequest  # noqa: E402
from loraplex.resolvers.validation import validate_adapter_dir  # noqa: E402


def timed(fn, repeats, keep: list | None = None):
    """Median ms of `repeats` calls, and the last result. `keep` holds every result, so no
    buffer is freed and each call packs into fresh memory; without it each call's result is
    dropped before the next (and before the first, a call's whose buffer the first reuses)."""
    times, result = [], None if keep is not None else fn()
    for _ in range(repeats):
        result = None
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if keep is not None:
            keep.append(result)
    return statistics.median(times) * 1e3, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pin", action="store_true", help="pack into pinned memory (CUDA only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = llama_lora_spec(**LLAMA3_8B)
    with tempfile.TemporaryDirectory(prefix="bench_lora_phases_") as tmp:
        path = write_peft_adapter(Path(tmp, "a"), rank=RANK, alpha=32, target_modules=ALL_TARGETS,
                                  num_layers=spec.num_layers, shapes=peft_shapes(LLAMA3_8B),
                                  base_model_name_or_path="llama-3-8b", dtype=torch.bfloat16)
        request = LoRARequest("a", 1, str(path))
        where = "bench"
        files = validate_adapter_dir(path)
        config = parse_adapter_config(files.config, where)
        phases = {}
        phases["read"], (tensors, source) = timed(lambda: loader._read_tensors(files, where), args.repeats)
        phases["validate"], modules = timed(lambda: loader._validate(tensors, config, spec, where), args.repeats)
        rank = max(a.shape[0] for a, _, _ in modules.values())
        pack = lambda: loader._pack(modules, spec, rank, torch.bfloat16, args.pin, source)  # noqa: E731
        fresh: list = []                                   # every fresh result, kept until the end
        phases["pack, fresh memory"], _ = timed(pack, args.repeats, keep=fresh)
        phases["pack, recycled memory"], (targets, buffer, flat) = timed(pack, args.repeats)
        adapter = loader.LoRAAdapter(request=request, rank=rank, targets=targets, host_buffer=buffer,
                                     module_ranks={key: a.shape[0] for key, (a, _, _) in modules.items()})
        phases["finite check"], _ = timed(lambda: loader._check_finite(adapter, modules, where, flat, source),
                                           args.repeats)
        load = lambda: loader.load_lora_adapter(  # noqa: E731
            request, spec, max_lora_rank=RANK, served_model_name="llama-3-8b", dtype=torch.bfloat16,
            pin_memory=args.pin)
        phases["load_lora_adapter, fresh"], _ = timed(load, args.repeats, keep=fresh)
        phases["load_lora_adapter, recycled"], _ = timed(load, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, pinned: {args.pin}; median of {args.repeats} (ms)")
    for name, ms in phases.items():
        print(f"  {name:26s} {ms:7.1f}")


if __name__ == "__main__":
    main()
