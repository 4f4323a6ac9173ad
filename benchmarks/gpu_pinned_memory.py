"""Page-locked host memory on a GPU host: torch's pinned allocator against cudaHostRegister.

    PYTHONPATH=src python3 benchmarks/gpu_pinned_memory.py

Why adapters are packed into memory registered in place (core/lora/host_buffer.py): times,
for one 8B rank-16 adapter's worth (80 MiB in bf16, the eight packed tensors' sizes),
fresh pinned allocation by torch (cudaHostAlloc; as eight blocks and as one), the same once
torch's cache holds freed blocks, populating anonymous memory and registering it
(HostBuffer), and the host-to-device copy of the eight tensors from pageable and from
page-locked memory. Prints milliseconds per repeat.
"""

from __future__ import annotations

import time

import torch

from loraplex.core.lora.host_buffer import HostBuffer

# Elements of the packed tensors of a Llama-3-8B adapter, rank 16 on all seven projections.
SIZES = [32 * 48 * 4096, 32 * 6144 * 16, 32 * 16 * 4096, 32 * 4096 * 16, 32 * 32 * 4096, 32 * 28672 * 16,
         32 * 16 * 14336, 32 * 4096 * 16]


def timed(name: str, fn, repeats: int = 3) -> None:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    print(f"{name}: {', '.join(f'{t:.1f}' for t in times)} ms", flush=True)


def main() -> None:
    total = sum(SIZES)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {total * 2 / 2**20:.1f} MiB in bf16")
    kept = []   # fresh allocations stay alive, so torch's cache cannot hand back old blocks
    timed("torch pinned, 8 blocks, fresh", lambda: kept.append(
        [torch.empty(n, dtype=torch.bfloat16, pin_memory=True) for n in SIZES]))
    timed("torch pinned, 1 block, fresh", lambda: kept.append(torch.empty(total, dtype=torch.bfloat16,
                                                                          pin_memory=True)))
    kept.clear()
    timed("torch pinned, 1 block, from its cache of freed blocks",
          lambda: torch.empty(total, dtype=torch.bfloat16, pin_memory=True))
    def registered() -> HostBuffer:
        buffer = HostBuffer.lease(total * 2)
        buffer.register()
        return buffer
    timed("HostBuffer: fresh mapping + cudaHostRegister", lambda: kept.append(registered()))
    sources = [torch.randn(n).bfloat16() for n in SIZES]
    locked = registered().view_as_tensor(total, torch.bfloat16)
    views, offset = [], 0
    for n, src in zip(SIZES, sources):
        views.append(locked[offset:offset + n])
        views[-1].copy_(src)
        offset += n
    targets = [torch.empty(n, dtype=torch.bfloat16, device="cuda") for n in SIZES]
    timed("host to device, 8 copies from pageable memory",
          lambda: [t.copy_(s, non_blocking=True) for t, s in zip(targets, sources)], 5)
    timed("host to device, 8 copies from a HostBuffer",
          lambda: [t.copy_(s, non_blocking=True) for t, s in zip(targets, views)], 5)


if __name__ == "__main__":
    main()
