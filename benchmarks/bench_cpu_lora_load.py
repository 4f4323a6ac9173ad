"""CPU benchmark of a cold adapter: loading it (add_lora) and copying it into a slot (activate).

    .venv/bin/python benchmarks/bench_cpu_lora_load.py [--threads N] [--repeats K] [--max-lora-rank R]
                                                       [--device cuda] [--burst N]

Writes three random PEFT adapters with Llama-3-8B shapes (hidden 4096, 32 heads, 8 KV
heads, head_dim 128, intermediate 14336, 32 layers), rank 16 on all seven projections in
bf16 (84 MB each), and times, on CPU slot stacks in bf16 with max_loras=2:

- add_lora: read, validate and prepare one adapter (the loader thread's work, off the step);
- activate: put one adapter that is in the CPU cache into a device slot (on the step path).
  Three adapters take turns in two slots, so every activation evicts a slot and writes it.

No model is built: only the slot stacks and the manager. Prints medians in milliseconds.
With --device cuda the slots are on the GPU (adapters packed in pinned memory): activate is
timed twice, until it returns (host) and until the copies are done (synchronized).

`--burst N` then writes N more adapters and loads them all, first one after another, then
from a pool of the engine's loader threads at once (the engine process loads a burst of
first requests' adapters that way): if the pool is not about threads-times faster, the
loads serialize somewhere (memory, the GIL, or page-locking in the driver with --device cuda).
Two variants of the pool tell whether torch's intra-op threads are the cause (each loader
thread runs its copies on every core: 16 loaders make 16 thread teams): loaders whose ops
run on one thread, and 4 loaders; with --device cuda a third, loaders that do not page-lock
their buffers, tells the GIL from the CUDA driver (cudaHostRegister is a load's only driver
call). Last, the pool loads into buffers reserved beforehand, faulted in and page-locked, as
the engine loop reserves them when it starts. Meanwhile a step probe on the main thread (small kernels and a wait, like the
engine's step) shows what the loads cost the requests already running (median and max);
each line also says when the first, median and last load finished.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from adapters import write_peft_adapter  # noqa: E402

from loraplex.core.lora.adapter import largest_packed_nbytes  # noqa: E402
from loraplex.core.lora.host_buffer import HostBuffer  # noqa: E402
from loraplex.core.lora.manager import LoRAManager  # noqa: E402
from loraplex.core.lora.slots import LoRASlotStacks  # noqa: E402
from loraplex.core.lora.targets import llama_lora_spec  # noqa: E402
from loraplex.lora_request import LoRARequest  # noqa: E402

LLAMA3_8B = dict(num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8, head_dim=128,
                 intermediate_size=14336)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16


def peft_shapes(m: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = m["hidden_size"], m["intermediate_size"]
    q, kv = m["num_heads"] * m["head_dim"], m["num_kv_heads"] * m["head_dim"]
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's intra-op threads (default: torch's own choice, as in the engine process)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-lora-rank", type=int, default=RANK)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--burst", type=int, default=0, metavar="N",
                        help="also load N fresh adapters serially and from the engine's loader pool")
    parser.add_argument("--burst-repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    spec = llama_lora_spec(**LLAMA3_8B)

    with tempfile.TemporaryDirectory(prefix="bench_lora_load_") as tmp:
        requests = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(
            Path(tmp, f"a{i}"), rank=RANK, alpha=32, target_modules=ALL_TARGETS, num_layers=spec.num_layers,
            shapes=peft_shapes(LLAMA3_8B), base_model_name_or_path="llama-3-8b", seed=i, dtype=torch.bfloat16)))
            for i in range(3)]
        file_mb = Path(requests[0].lora_path, "adapter_model.safetensors").stat().st_size / 2**20
        stacks = LoRASlotStacks(spec, max_loras=2, max_lora_rank=args.max_lora_rank, dtype=torch.bfloat16,
                                device=args.device)
        sync = torch.cuda.synchronize if stacks.device.type == "cuda" else (lambda: None)
        manager = LoRAManager(stacks, max_cpu_loras=3, served_model_name="llama-3-8b")

        load_s = []
        for i in range(args.repeats):
            request = requests[i % 3]
            manager.remove_lora(request.lora_int_id)
            start = time.perf_counter()
            manager.add_lora(request)
            load_s.append(time.perf_counter() - start)
        for request in requests:
            manager.add_lora(request)
        held_mb = manager._cpu[1].num_bytes / 2**20
        pinned = all(t.is_pinned() for p in manager._cpu[1].targets.values() for t in (p.lora_a, p.lora_b))

        activate_s, activate_synced_s = [], []
        for i in range(args.repeats + 2):
            sync()
            start = time.perf_counter()
            manager.activate([requests[i % 3]])
            activate_s.append(time.perf_counter() - start)
            sync()
            activate_synced_s.append(time.perf_counter() - start)
            manager.end_step()
        assert manager.stats["device_evictions"] >= args.repeats   # every timed activation wrote a slot

    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads; "
          f"Llama-3-8B shapes, rank {RANK} on all 7 projections, max_lora_rank {args.max_lora_rank}, "
          f"bf16 slots on {args.device}")
    print(f"adapter file {file_mb:.1f} MiB, held in the CPU cache {held_mb:.1f} MiB (pinned: {pinned})")
    print(f"add_lora (load + validate + prepare), median of {len(load_s)}: {statistics.median(load_s) * 1e3:.1f} ms "
          f"(the first, into memory never used before: {load_s[0] * 1e3:.1f} ms)")
    print(f"activate (write one slot), median of {len(activate_s)}: {statistics.median(activate_s) * 1e3:.1f} ms")
    if stacks.device.type == "cuda":
        print(f"activate until the copies are done: {statistics.median(activate_synced_s) * 1e3:.1f} ms")
    if args.burst:
        burst(args, spec, stacks)


def single_threaded_ops() -> None:
    """Loader-thread initializer under test: this thread's torch ops on one core (intra-op
    threads are per calling thread: 16 loaders each running 16-thread ops oversubscribe)."""
    torch.ones(1 << 17).sum()                        # this thread's own lazy set-up first
    n = torch.get_num_threads()
    torch.set_num_threads(1)                         # this thread's count, and the global default...
    restore = threading.Thread(target=torch.set_num_threads, args=(n,))
    restore.start()                                  # ...which another thread sets back
    restore.join()


def step_probe(device: torch.device, stop: threading.Event, times: list[float]) -> None:
    """A stand-in for the engine's step on the main thread: small kernels launched one by one,
    then a wait for them. Slower while loads run = the steps (and first tokens) wait for them."""
    x = torch.randn(256, 256, device=device)
    while not stop.is_set():
        start = time.perf_counter()
        for _ in range(50):
            x = (x @ x).tanh_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)


def burst(args, spec, stacks) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from loraplex.core.engine_loop import ADAPTER_LOADER_THREADS

    def probed(work) -> tuple[float, list[float]]:
        stop, times = threading.Event(), []
        probe = threading.Thread(target=step_probe, args=(stacks.device, stop, times))
        probe.start()
        start = time.perf_counter()
        work()
        seconds = time.perf_counter() - start
        stop.set()
        probe.join()
        return seconds, sorted(times) or [float("nan")]

    with tempfile.TemporaryDirectory(prefix="bench_lora_burst_") as tmp:
        paths = [write_peft_adapter(Path(tmp, f"b{i}"), rank=RANK, alpha=32, target_modules=ALL_TARGETS,
                                    num_layers=spec.num_layers, shapes=peft_shapes(LLAMA3_8B),
                                    base_model_name_or_path="llama-3-8b", seed=100 + i, dtype=torch.bfloat16)
                 for i in range(args.burst)]
        _, idle_probe = probed(lambda: time.sleep(1))
        print(f"step probe alone: {statistics.median(idle_probe) * 1e3:.2f} ms median, "
              f"{idle_probe[-1] * 1e3:.2f} ms max")
        modes = {"one after another": None,
                 f"{ADAPTER_LOADER_THREADS} loader threads": {},
                 f"{ADAPTER_LOADER_THREADS} loader threads, one-thread ops": {"initializer": single_threaded_ops}}
        if ADAPTER_LOADER_THREADS != 4:
            modes["4 loader threads"] = {"max_workers": 4}
        if stacks.device.type == "cuda":
            # Tells the GIL from the CUDA driver: page-locking (cudaHostRegister) is the loads'
            # only driver call, and the probe's kernels and waits need the driver too.
            modes[f"{ADAPTER_LOADER_THREADS} loader threads, no page-locking"] = {"pin": False}
        def run(how: str, pool_options: dict | None) -> None:
            manager = LoRAManager(stacks, max_cpu_loras=args.burst, served_model_name="llama-3-8b")
            pool_options = dict(pool_options) if pool_options is not None else None
            if pool_options is not None and not pool_options.pop("pin", True):
                manager._load_options["pin_memory"] = False
            requests = [LoRARequest(f"b{i}", 10_000 + i, str(p)) for i, p in enumerate(paths)]
            done: list[float] = []     # when each load finished: a burst's first tokens wait for these
            start = time.perf_counter()

            def load(request) -> None:
                manager.add_lora(request)
                done.append(time.perf_counter() - start)

            def load_all() -> None:
                if pool_options is None:
                    for request in requests:
                        load(request)
                    return
                with ThreadPoolExecutor(**{"max_workers": ADAPTER_LOADER_THREADS, **pool_options}) as pool:
                    list(pool.map(load, requests))
            seconds, probe = probed(load_all)
            del manager
            done.sort()
            print(f"burst of {args.burst} fresh adapters, {how}: {seconds * 1e3:.0f} ms; loads done at "
                  f"{done[0] * 1e3:.0f} / {statistics.median(done) * 1e3:.0f} / {done[-1] * 1e3:.0f} ms "
                  f"(first / median / last); step probe meanwhile {statistics.median(probe) * 1e3:.2f} ms "
                  f"median, {probe[-1] * 1e3:.1f} ms max")

        for repeat in range(args.burst_repeats):
            for how, pool_options in modes.items():
                run(how, pool_options)
            print(f"main thread's torch threads after the runs: {torch.get_num_threads()}")
        # Last, since reserved buffers stay in the process: as the engine loop does when it
        # starts (LoRAManager.host_buffer_reservations), one buffer per adapter of the burst.
        nbytes = largest_packed_nbytes(spec, args.max_lora_rank, torch.bfloat16)
        reserve = functools.partial(HostBuffer.reserve, nbytes, up_to=args.burst, register=stacks.device.type == "cuda")
        start = time.perf_counter()
        with ThreadPoolExecutor(ADAPTER_LOADER_THREADS) as pool:
            list(pool.map(lambda _: reserve(), range(args.burst)))
        print(f"reserving {args.burst} buffers of {nbytes / 2**20:.1f} MiB on {ADAPTER_LOADER_THREADS} threads: "
              f"{(time.perf_counter() - start) * 1e3:.0f} ms")
        for repeat in range(args.burst_repeats):
            run(f"{ADAPTER_LOADER_THREADS} loader threads, into reserved buffers", {})


if __name__ == "__main__":
    main()
