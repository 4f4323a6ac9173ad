#!/usr/bin/env python3
"""Check and time loraplex's batched multi-LoRA Triton kernels on one GPU.

    PYTHONPATH=src python3 benchmarks/gpu_lora_kernels.py [--skip-check] [--skip-bench] [--sweep]

Needs only torch and triton. Part 1 runs the correctness matrix at real shapes (bf16,
plus a few fp16/fp32 cases) against the torch reference: the allocator is poisoned with
NaN first, inputs are fresh random, the error is ||out - ref|| / ||ref - out_before||
(relative to the LoRA contribution), and base-model rows must be untouched bit for bit.
Part 2 times shrink+expand as CUDA-graph replays (median over replays; each graph runs
the op over several rotated copies of x, out and the LoRA weights, so L2 never holds
them) beside a torch gather+bmm version and the bandwidth floor. The metadata of a step
with N adapters carries the adapter bound the engine's decode graph for N adapters uses
(lora_graph_bound: FEW_ADAPTERS up to FEW_ADAPTERS, else MAX_LORAS), so grids and tiles
are the engine's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback

import torch

from loraplex.core.cuda_graphs import FEW_ADAPTERS, lora_graph_bound
from loraplex.kernels.lora import apply_lora, lora_expand, lora_shrink
from loraplex.kernels.lora_meta import build_lora_meta

# name -> (in_features, output slice widths): Llama-3-8B's fused projections.
MODULES = {
    "qkv": (4096, (4096, 1024, 1024)),
    "gate_up": (4096, (14336, 14336)),
    "down": (14336, (4096,)),
    "odd": (1000, (300, 77, 77)),  # nothing a multiple of a block: exercises every mask
}
MAX_LORAS = 32
LIMITS = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
# (module, tokens, adapters) -> target in microseconds for shrink+expand (rank 16).
DECODE_TARGETS_US = {("qkv", 64, 32): 8.0, ("gate_up", 64, 32): 18.0, ("down", 64, 32): 9.0}
PREFILL_MIN_FRACTION_OF_FLOOR = 0.5


MIXED_STEP_TOKENS = 192   # the mixed-step bucket of MIXED_DECODES decodes and one MIXED_PROMPT-token prompt
MIXED_DECODES, MIXED_PROMPT = 32, 128


def make_inputs(module, num_tokens, num_adapters, *, max_rank=16, mixed_ranks=False, base_fraction=0.25,
                dtype=torch.bfloat16, seed=0, device="cuda", layout="scattered"):
    """layout "scattered": adapters take turns over the tokens in a random order (a decode
    step); "mixed": a graphed mixed step as the engine lays it out: MIXED_DECODES decodes
    (running sequences first, adapters in turn), then one MIXED_PROMPT-token prompt of one
    adapter, then the bucket's padding (no LoRA)."""
    in_features, widths = MODULES[module]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_slices, out_total = len(widths), sum(widths)
    offsets = tuple(sum(widths[:i]) for i in range(num_slices + 1))
    used = torch.randperm(MAX_LORAS, generator=gen)[:num_adapters]
    slot_ranks = torch.zeros(MAX_LORAS, dtype=torch.int32)
    if mixed_ranks:
        slot_ranks[used] = torch.randint(1, max_rank + 1, (num_adapters,), generator=gen, dtype=torch.int32)
    else:
        slot_ranks[used] = max_rank
    # Adapters take turns over the tokens, scattered through the batch; some tokens use no LoRA.
    if layout == "mixed":
        decodes = min(MIXED_DECODES, num_tokens)
        prompt = min(MIXED_PROMPT, num_tokens - decodes)
        token_slots = torch.full((num_tokens,), -1, dtype=torch.int32)
        token_slots[:decodes] = used[torch.arange(decodes) % num_adapters].to(torch.int32)
        token_slots[decodes:decodes + prompt] = int(used[0])
    else:
        slots = used[torch.arange(num_tokens) % num_adapters][torch.randperm(num_tokens, generator=gen)]
        is_base = torch.rand(num_tokens, generator=gen) < base_fraction
        token_slots = torch.where(is_base, -1, slots).to(torch.int32)
    # Scaled so the LoRA delta and the base output have similar magnitudes.
    x = torch.randn(num_tokens, in_features, device=device).to(dtype)
    lora_a = (torch.randn(MAX_LORAS, num_slices * max_rank, in_features, device=device) / in_features ** 0.5).to(dtype)
    lora_b = (torch.randn(MAX_LORAS, out_total, max_rank, device=device) / max_rank ** 0.5).to(dtype)
    for s, rank in enumerate(slot_ranks.tolist()):  # the manager zeroes padding past the rank
        lora_a.view(MAX_LORAS, num_slices, max_rank, in_features)[s, :, rank:] = 0
        lora_b[s, :, rank:] = 0
    out = torch.randn(num_tokens, out_total, device=device).to(dtype)
    return dict(x=x, out=out, lora_a=lora_a, lora_b=lora_b, token_slots=token_slots.to(device),
                slot_ranks=slot_ranks.to(device), offsets=offsets)


def engine_meta(token_slots, slot_ranks, num_adapters):
    """The metadata the engine's decode graph for num_adapters distinct adapters builds."""
    return build_lora_meta(token_slots, slot_ranks, MAX_LORAS,
                           max_active_slots=max(1, lora_graph_bound(num_adapters, MAX_LORAS)))


def poison_allocator():
    """Fill cached allocator blocks with NaN, so any read of an unwritten buffer shows."""
    blocks = [torch.full((n,), float("nan"), device="cuda") for n in [1 << 16] * 64 + [1 << 20] * 16 + [1 << 26]]
    del blocks


def rel_err(actual, expected, before):
    return float((actual.float() - expected.float()).norm() / (expected.float() - before.float()).norm().clamp_min(1e-30))


class Checker:
    def __init__(self):
        self.passed, self.failed = 0, []

    def report(self, label, err, limit, extra_ok=True, note=""):
        ok = math.isfinite(err) and err <= limit and extra_ok
        self.passed += ok
        if not ok:
            self.failed.append(label)
        print(f"  [{'PASS' if ok else 'FAIL'}] {label:<58} rel_err={err:.2e} (limit {limit:.0e}){note}", flush=True)


def check_apply(chk, module, num_tokens, num_adapters, **kw):
    dtype = kw.get("dtype", torch.bfloat16)
    t = make_inputs(module, num_tokens, num_adapters, **kw)
    meta = engine_meta(t["token_slots"], t["slot_ranks"], num_adapters)
    ref = t["out"].clone()
    apply_lora(t["x"], ref, t["lora_a"], t["lora_b"], meta, t["offsets"], backend="torch")
    poison_allocator()
    out = t["out"].clone()
    apply_lora(t["x"], out, t["lora_a"], t["lora_b"], meta, t["offsets"])
    torch.cuda.synchronize()
    base = t["token_slots"] < 0
    untouched = bool(torch.equal(out[base], t["out"][base]))
    ranks = f"r<={kw['max_rank']} mixed" if kw.get("mixed_ranks") else f"r={kw.get('max_rank', 16)}"
    label = (f"apply {str(dtype)[6:]:<8} {module:<7} T={num_tokens:<5} adapters={num_adapters:<2} {ranks:<11}"
             f" base={kw.get('base_fraction', 0.25):.0%}")
    lora = ~base
    err = rel_err(out[lora], ref[lora], t["out"][lora]) if lora.any() else 0.0
    chk.report(label, err, LIMITS[dtype], untouched, "" if untouched else "  base rows CHANGED")


def check_shrink_expand(chk, module, num_tokens, num_adapters):
    t = make_inputs(module, num_tokens, num_adapters, mixed_ranks=True, max_rank=32, seed=7)
    meta = engine_meta(t["token_slots"], t["slot_ranks"], num_adapters)
    num_slices = len(t["offsets"]) - 1
    ref_buf = lora_shrink(t["x"], t["lora_a"], meta, num_slices, backend="torch")
    poison_allocator()
    buf = lora_shrink(t["x"], t["lora_a"], meta, num_slices)
    err = float((buf - ref_buf).norm() / ref_buf.norm())
    chk.report(f"lora_shrink bf16 {module:<7} T={num_tokens:<5} adapters={num_adapters:<2} r<=32 mixed", err, 1e-2)
    ref = t["out"].clone()
    lora_expand(ref_buf, t["lora_b"], meta, ref, t["offsets"], backend="torch")
    out = t["out"].clone()
    lora_expand(ref_buf, t["lora_b"], meta, out, t["offsets"])
    chk.report(f"lora_expand bf16 {module:<7} T={num_tokens:<5} adapters={num_adapters:<2} r<=32 mixed",
               rel_err(out, ref, t["out"]), LIMITS[torch.bfloat16])


def check_graph_replay(chk, bound, adapter_counts):
    """Metadata (for `bound` adapters) + apply_lora captured once, replayed on new slot maps of
    adapter_counts adapters copied into static inputs."""
    t = make_inputs("qkv", 64, MAX_LORAS, mixed_ranks=True, seed=3)  # every slot holds an adapter
    static_slots, out = t["token_slots"].clone(), t["out"].clone()
    run = lambda: apply_lora(t["x"], out, t["lora_a"], t["lora_b"],
                             build_lora_meta(static_slots, t["slot_ranks"], MAX_LORAS, max_active_slots=bound),
                             t["offsets"])
    run()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for seed, num_adapters in enumerate(adapter_counts):
        new = make_inputs("qkv", 64, num_adapters, seed=100 + seed)["token_slots"]
        static_slots.copy_(new)
        out.copy_(t["out"])
        graph.replay()
        ref = t["out"].clone()
        apply_lora(t["x"], ref, t["lora_a"], t["lora_b"], build_lora_meta(new, t["slot_ranks"], MAX_LORAS),
                   t["offsets"], backend="torch")
        chk.report(f"CUDA graph replay {seed}: meta+apply qkv T=64 bound {bound}, {num_adapters} adapters",
                   rel_err(out, ref, t["out"]), LIMITS[torch.bfloat16])


def run_checks():
    print("\n== Part 1: correctness against the torch reference ==", flush=True)
    chk = Checker()
    cases = [(m, n, a, {}) for m in MODULES for n in (1, 7, 64, 517, 4096) for a in (1, 8, 32)]
    cases += [(m, n, 32, dict(max_rank=64, mixed_ranks=True)) for m in ("qkv", "odd", "down") for n in (64, 517)]
    cases += [("qkv", 64, 8, dict(base_fraction=0.0)), ("gate_up", 4096, 32, dict(base_fraction=0.0))]
    cases += [("qkv", n, 8, dict(dtype=d)) for d in (torch.float16, torch.float32) for n in (64, 517)]
    cases += [("odd", 517, 8, dict(dtype=torch.float32, mixed_ranks=True, max_rank=32))]
    for module, num_tokens, num_adapters, kw in cases:
        _guarded(chk, f"apply {module} T={num_tokens} adapters={num_adapters} {kw}",
                 lambda: check_apply(chk, module, num_tokens, num_adapters, **kw))
    for module, num_tokens in (("qkv", 64), ("gate_up", 517), ("odd", 4096)):
        _guarded(chk, f"shrink/expand {module}", lambda: check_shrink_expand(chk, module, num_tokens, 8))
    _guarded(chk, "CUDA graph replay", lambda: check_graph_replay(chk, MAX_LORAS, (8, 16, 24)))
    _guarded(chk, "CUDA graph replay, few adapters",
             lambda: check_graph_replay(chk, FEW_ADAPTERS, (1, FEW_ADAPTERS // 2, FEW_ADAPTERS)))
    print(f"correctness: {chk.passed} passed, {len(chk.failed)} failed", flush=True)
    for label in chk.failed:
        print(f"  FAILED: {label}")
    return not chk.failed


def _guarded(chk, label, fn):
    try:
        fn()
    except Exception:
        chk.failed.append(label + " (raised)")
        print(f"  [FAIL] {label} raised:\n{traceback.format_exc()}", flush=True)


# --- Part 2: timing ---

def time_graph(fn, num_calls, replays):
    """Microseconds per call: median over replays of a CUDA graph that makes num_calls calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / num_calls)
    del graph
    return statistics.median(times)


def copy_bandwidth():
    """Device copy bandwidth in bytes/s (read + write), the yardstick of the floor.

    4 GiB each way, by copy_ and by an elementwise kernel, timed with events; the faster is
    the ceiling. (A 1 GiB uint8 copy_ replayed in a graph read 2.69 TB/s on 2026-11-28, far
    under the ~4.3 TB/s this workplace measured on large copies: floors were too lenient.)
    """
    src = torch.empty(1 << 30, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    results = {}
    for name, fn in (("copy_", lambda: dst.copy_(src)), ("elementwise", lambda: torch.mul(src, 2.0, out=dst))):
        fn()
        times = []
        for _ in range(10):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        results[name] = 2 * src.numel() * 4 / statistics.median(times)
    del src, dst
    torch.cuda.empty_cache()
    print("copy probes (read+write, 4 GiB): " + ", ".join(f"{k} {v / 1e12:.2f} TB/s" for k, v in results.items()))
    return max(results.values())


def gather_bmm_lora(x, out, lora_a, lora_b, token_slots, offsets):
    """The plain torch way: gather each token's A and B, then batched mat-vecs."""
    max_rank = lora_b.shape[2]
    is_lora = (token_slots >= 0).unsqueeze(1)
    slot = token_slots.clamp(min=0).long()
    h = torch.bmm(lora_a[slot], x.unsqueeze(2)).squeeze(2) * is_lora      # [T, num_slices * max_rank]
    b = lora_b[slot]                                                       # [T, out_total, max_rank]
    for i, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        h_i = h[:, i * max_rank:(i + 1) * max_rank].unsqueeze(2)
        out[:, lo:hi] += torch.bmm(b[:, lo:hi], h_i).squeeze(2)


def bench_row(module, num_tokens, num_adapters, bandwidth, l2_bytes, replays):
    from loraplex.kernels.triton_lora import (_num_sms, config_bound, expand_config, shrink_config,
                                              triton_expand, triton_shrink)
    in_features, widths = MODULES[module]
    num_slices, out_total, rank = len(widths), sum(widths), 16
    elt = 2
    layout = "mixed" if num_tokens == MIXED_STEP_TOKENS else "scattered"
    # Rows LoRA reads and writes (a mixed step's padding has none).
    lora_rows = min(num_tokens, MIXED_DECODES + MIXED_PROMPT) if layout == "mixed" else num_tokens
    active_weights = num_adapters * (num_slices * rank * in_features + out_total * rank) * elt
    floor_bytes = lora_rows * in_features * elt + active_weights + 2 * lora_rows * out_total * elt
    # Enough rotated copies that one graph replay streams >= 3x L2, within a memory budget.
    full_set = (MAX_LORAS * (num_slices * rank * in_features + out_total * rank)
                + num_tokens * (in_features + out_total)) * elt
    rotations = max(2, min(64, math.ceil(3 * l2_bytes / floor_bytes), int(16e9 // full_set)))
    sets = [make_inputs(module, num_tokens, num_adapters, base_fraction=0.0, seed=s, layout=layout)
            for s in range(rotations)]
    meta = engine_meta(sets[0]["token_slots"], sets[0]["slot_ranks"], num_adapters)
    offsets = sets[0]["offsets"]

    def loraplex_all():
        for t in sets:
            apply_lora(t["x"], t["out"], t["lora_a"], t["lora_b"], meta, offsets)

    def shrink_all():
        for t in sets:
            t["partials"] = triton_shrink(t["x"], t["lora_a"], meta, num_slices, zero_init=False)

    def expand_all():
        for t in sets:
            triton_expand(t["partials"], t["lora_b"], meta, t["out"], offsets)

    us = time_graph(loraplex_all, rotations, replays)
    shrink_us = time_graph(shrink_all, rotations, replays)
    expand_us = time_graph(expand_all, rotations, replays)
    gathered = num_tokens * (num_slices * rank * in_features + out_total * rank) * elt
    if gathered * rotations <= 40e9:
        bmm_us = time_graph(lambda: [gather_bmm_lora(t["x"], t["out"], t["lora_a"], t["lora_b"],
                                                     meta.token_slots, offsets) for t in sets],
                            rotations, max(5, replays // 5))
    else:
        bmm_us = float("nan")
    tile_class = config_bound(meta.max_active_slots, MAX_LORAS)
    sc = shrink_config(num_tokens, in_features, num_slices * rank, tile_class, _num_sms(torch.device("cuda", 0)))
    ec = expand_config(num_tokens, widths, rank, tile_class, _num_sms(torch.device("cuda", 0)))
    floor_us = floor_bytes / bandwidth * 1e6
    target = DECODE_TARGETS_US.get((module, num_tokens, num_adapters))
    if target is not None:
        verdict = f"<= {target:g} us: {'MET' if us <= target else 'MISSED'}"
    elif num_tokens >= 4096:
        verdict = (f">= {PREFILL_MIN_FRACTION_OF_FLOOR:.0%} floor: "
                   f"{'MET' if floor_us / us >= PREFILL_MIN_FRACTION_OF_FLOOR else 'MISSED'}")
    else:
        verdict = ""
    del sets
    torch.cuda.empty_cache()
    return (f"{module:<8}{num_tokens:>6}{num_adapters:>5}{us:>10.1f}{shrink_us:>9.1f}{expand_us:>9.1f}"
            f"{bmm_us:>11.1f}{floor_us:>9.1f}{floor_us / us:>8.0%}  {verdict:<26}"
            f" shrink m{sc.block_m} n{sc.block_n} k{sc.block_k} split{sc.split_k} w{sc.num_warps} s{sc.num_stages};"
            f" expand m{ec.block_m} n{ec.block_n}x{ec.tiles_per_program} w{ec.num_warps} s{ec.num_stages}"
            f"  bound {meta.max_active_slots} x{rotations}")


def run_bench(replays):
    print("\n== Part 2: timing (CUDA-graph replays, rank 16, max_loras 32, bf16, no base tokens) ==", flush=True)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read+write) {bandwidth / 1e12:.2f} TB/s; L2 {l2_bytes >> 20} MiB; {props.multi_processor_count} SMs")
    for num_tokens in (64, 4096):
        slots = make_inputs("qkv", num_tokens, 32, base_fraction=0.0)
        try:
            us = time_graph(lambda: build_lora_meta(slots["token_slots"], slots["slot_ranks"], MAX_LORAS), 1, replays)
            print(f"build_lora_meta, {num_tokens} tokens: {us:.1f} us (once per step, not per layer)")
        except Exception:
            print(f"build_lora_meta, {num_tokens} tokens: FAILED in a CUDA graph:\n{traceback.format_exc()}")
    print("\nus = microseconds per call. loraplex = apply_lora (shrink + expand launches); shrink/expand = each kernel\n"
          "alone; torch bmm = gather each token's A,B + bmm in a CUDA graph (nan: skipped, too much memory);\n"
          "floor = bytes(x + active A,B + out read+write) / copy bandwidth; %floor = floor / loraplex (higher is\n"
          "better); bound = the metadata's max_active_slots (the engine's graph variant for that many adapters);\n"
          "xN = rotated input copies per graph replay.")
    print(f"\n{'module':<8}{'tokens':>6}{'LoRAs':>5}{'loraplex':>10}{'shrink':>9}{'expand':>9}{'torch bmm':>11}"
          f"{'floor':>9}{'%floor':>8}  {'target':<26} tiles")
    for module in ("qkv", "gate_up", "down"):
        for num_tokens in (64, MIXED_STEP_TOKENS, 4096):   # the mixed step's tokens laid out as the engine does
            for num_adapters in (1, 8, 32):
                try:
                    print(bench_row(module, num_tokens, num_adapters, bandwidth, l2_bytes, replays), flush=True)
                except Exception:
                    print(f"{module:<8}{num_tokens:>6}{num_adapters:>5}  FAILED:\n{traceback.format_exc()}", flush=True)
                    torch.cuda.empty_cache()


def run_in_layer(replays):
    """What LoRA adds to a layer: the base GEMM alone, then GEMM + apply_lora one after the other,
    then lora_linear (the model's path: the shrink on a side stream beside the GEMM)."""
    import torch.nn.functional as F

    from loraplex.kernels.lora import lora_linear
    print("\n== Part 3: in the layer (64 tokens, 32 adapters, rank 16; CUDA-graph replays, 2 rotated weight sets) ==")
    print(f"{'module':<8}{'GEMM alone':>12}{'+ LoRA after':>14}{'+ LoRA beside':>15}{'added after':>13}{'added beside':>14}")
    side = torch.cuda.Stream()
    for module in ("qkv", "gate_up", "down"):
        in_features, widths = MODULES[module]
        sets = [make_inputs(module, 64, 32, base_fraction=0.0, seed=s) for s in range(2)]
        weights = [torch.randn(sum(widths), in_features, device="cuda").to(torch.bfloat16) * 0.02 for _ in sets]
        meta = engine_meta(sets[0]["token_slots"], sets[0]["slot_ranks"], 32)
        offsets = sets[0]["offsets"]

        def gemm():
            for t, w in zip(sets, weights):
                t["y"] = F.linear(t["x"], w)

        def after():
            for t, w in zip(sets, weights):
                t["y"] = F.linear(t["x"], w)
                apply_lora(t["x"], t["y"], t["lora_a"], t["lora_b"], meta, offsets)

        def beside():
            for t, w in zip(sets, weights):
                t["y"] = lora_linear(t["x"], lambda x, w=w: F.linear(x, w), t["lora_a"], t["lora_b"], meta, offsets,
                                     side_stream=side)

        ref = F.linear(sets[0]["x"], weights[0])
        apply_lora(sets[0]["x"], ref, sets[0]["lora_a"], sets[0]["lora_b"], meta, offsets, backend="torch")
        beside()
        torch.cuda.synchronize()
        err = rel_err(sets[0]["y"], ref, F.linear(sets[0]["x"], weights[0]))
        us = [time_graph(fn, len(sets), replays) for fn in (gemm, after, beside)]
        print(f"{module:<8}{us[0]:>12.1f}{us[1]:>14.1f}{us[2]:>15.1f}{us[1] - us[0]:>13.1f}{us[2] - us[0]:>14.1f}"
              f"   (lora_linear err {err:.1e})", flush=True)
        del sets, weights
        torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-check", action="store_true", help="skip the correctness matrix")
    parser.add_argument("--skip-bench", action="store_true", help="skip the timings")
    parser.add_argument("--replays", type=int, default=50, help="graph replays per timing (median taken)")
    parser.add_argument("--sweep", action="store_true", help="also sweep decode tile configs (gpu_lora_sweep.py)")
    parser.add_argument("--sweep-seconds", type=float, default=240.0, help="time limit of the sweep")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("This script needs a CUDA GPU (the CPU path is the torch reference, tested by pytest).")
    import triton
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton {triton.__version__}")
    torch.manual_seed(0)
    started = time.time()
    ok = True
    if not args.skip_check:
        ok = run_checks()
    if not args.skip_bench:
        run_bench(args.replays)
        run_in_layer(args.replays)
    if args.sweep:
        from gpu_lora_sweep import run_sweep
        run_sweep(max(10, args.replays // 2), args.sweep_seconds)
    print(f"\ndone in {time.time() - started:.0f} s; correctness {'PASSED' if ok else 'FAILED'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
