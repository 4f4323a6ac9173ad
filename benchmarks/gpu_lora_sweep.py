"""Tile sweep for the decode-size LoRA kernels: `gpu_lora_kernels.py --sweep`.

For each module at 64 tokens / 32 adapters (rank 16, bf16), then at the mixed step's 192
tokens (32 decodes and a 128-token prompt, laid out as the engine does; today it takes the
prefill tiles: BLOCK_M 32, 64-deep K blocks, split 7), then with fewer candidates at
4096 tokens, times the shrink alone over
candidate ShrinkConfigs, the expand alone over candidate ExpandConfigs, then shrink+expand
for the two best of each, with and without programmatic dependent launch (PDL). Every
timing is a CUDA-graph replay over rotated input copies (as in the main benchmark); each
config's output is checked against the torch reference before it is timed.
"""

from __future__ import annotations

import math
import time

import torch
from gpu_lora_kernels import MAX_LORAS, MIXED_STEP_TOKENS, MODULES, make_inputs, rel_err, time_graph

from loraplex.kernels.lora import apply_lora
from loraplex.kernels.lora_meta import build_lora_meta
from loraplex.kernels.triton_lora import ExpandConfig, ShrinkConfig, triton_expand, triton_shrink

# (block_k, split_k, num_warps, num_stages)
# (128, 8, 4, 3) was the heuristic of the 2026-11-28 run; (128|256, 15, 4, 3) is today's.
SHRINK_CANDIDATES = [(128, 8, 4, 3), (128, 15, 4, 3), (256, 15, 4, 3), (128, 16, 4, 2), (256, 8, 4, 3),
                     (256, 8, 8, 3), (256, 16, 4, 2), (64, 16, 4, 3), (64, 32, 4, 2), (128, 32, 4, 2)]
# (block_n, tiles_per_program, num_warps, num_stages)
# (128, 1, 4, 1) is the old one-tile expand; today's heuristic picks (256, 2|8, 4, 2).
EXPAND_CANDIDATES = [(128, 1, 4, 1), (256, 2, 4, 2), (256, 8, 4, 2), (256, 1, 4, 1), (256, 4, 4, 2),
                     (256, 4, 4, 3), (256, 8, 4, 3), (128, 4, 4, 3), (128, 8, 4, 3), (512, 2, 8, 2),
                     (512, 4, 8, 3), (256, 4, 8, 3)]


# Prefill (4096 tokens, BLOCK_M 64): today's tiles met >= 50% of a floor taken at 2.69 TB/s;
# against the honest ~4.3 TB/s they may not, so the expand (most of the time) gets a few options.
PREFILL_SHRINK_CANDIDATES = [(64, 3, 4, 3), (64, 6, 4, 3)]
PREFILL_EXPAND_CANDIDATES = [(128, 1, 8, 1), (128, 2, 8, 2), (128, 4, 8, 2), (256, 1, 8, 1), (64, 1, 4, 1),
                             (128, 1, 4, 1)]


# The mixed step (192 tokens): (block_m, block_k, split_k, num_warps, num_stages). Its shrink
# took 14 us a launch in the profile, against 4-11 us at 64 decode tokens: 36 busy row tiles,
# each program a chain of ten 64-deep K blocks. Decode-like tiles (one-row decodes in 16-row
# tiles, deeper K, more splits) against today's and a few between.
MIXED_SHRINK_CANDIDATES = [(32, 64, 7, 4, 3), (32, 64, 16, 4, 3), (32, 128, 8, 4, 3), (32, 128, 16, 4, 2),
                           (16, 128, 8, 4, 3), (16, 128, 15, 4, 3), (16, 256, 8, 4, 3), (16, 128, 32, 4, 2),
                           (16, 64, 16, 4, 3)]
MIXED_EXPAND_CANDIDATES = [(128, 1, 4, 1), (256, 2, 4, 2), (256, 4, 4, 3), (128, 4, 4, 3)]


def _shrink_config(module, block_m, *cand):
    """cand: (block_k, split_k, num_warps, num_stages), or with its own block_m first."""
    if len(cand) == 5:
        block_m, *cand = cand
    block_k, split_k, warps, stages = cand
    n = len(MODULES[module][1]) * 16
    return ShrinkConfig(block_m, min(max(16, 1 << (n - 1).bit_length()), 128), block_k, split_k, warps, stages)


def sweep_module(module, num_tokens, num_adapters, replays, deadline, block_m=16,
                 shrink_candidates=SHRINK_CANDIDATES, expand_candidates=EXPAND_CANDIDATES, layout="scattered"):
    in_features, widths = MODULES[module]
    num_slices = len(widths)
    offsets = tuple(sum(widths[:i]) for i in range(num_slices + 1))
    floor_set = num_adapters * (num_slices * 16 * in_features + sum(widths) * 16) * 2
    rotations = max(2, min(32, math.ceil(3 * 60e6 / floor_set)))
    sets = [make_inputs(module, num_tokens, num_adapters, base_fraction=0.0, seed=s, layout=layout)
            for s in range(rotations)]
    meta = build_lora_meta(sets[0]["token_slots"], sets[0]["slot_ranks"], MAX_LORAS)
    t0 = sets[0]
    ref = t0["out"].clone()
    apply_lora(t0["x"], ref, t0["lora_a"], t0["lora_b"], meta, offsets, backend="torch")
    print(f"\n-- {module} T={num_tokens} adapters={num_adapters} (x{rotations} rotations)", flush=True)

    def timed(label, fn, check):
        if time.time() > deadline:
            print(f"  {label:<44} skipped (sweep time limit)")
            return math.inf
        try:
            err = check()
            us = time_graph(fn, rotations, replays)
        except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
            print(f"  {label:<44} FAILED: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            return math.inf
        ok = math.isfinite(err) and err < 2e-2
        print(f"  {label:<44} {us:7.2f} us  err {err:.1e}{'' if ok else '  WRONG'}", flush=True)
        return us if ok else math.inf

    def apply_once(sc, ec, pdl, t):
        partials = triton_shrink(t["x"], t["lora_a"], meta, num_slices, zero_init=False, config=sc,
                                 launch_dependents=pdl)
        triton_expand(partials, t["lora_b"], meta, t["out"], offsets, config=ec, pdl=pdl)

    out_original = t0["out"].clone()  # timed runs keep adding into out: check from the original

    def check_apply(sc, ec, pdl):
        t0["out"].copy_(out_original)
        apply_once(sc, ec, pdl, t0)
        torch.cuda.synchronize()
        return rel_err(t0["out"], ref, out_original)

    default_ec = ExpandConfig(block_m, 128, 16, 4, 1, 1)
    shrink_times = {}
    for cand in shrink_candidates:
        sc = _shrink_config(module, block_m, *cand)

        def shrink_all(sc=sc):
            for t in sets:
                t["partials"] = triton_shrink(t["x"], t["lora_a"], meta, num_slices, zero_init=False, config=sc)
        shrink_times[sc] = timed(f"shrink m{sc.block_m} k{sc.block_k} split{sc.split_k} w{sc.num_warps} "
                                 f"s{sc.num_stages}", shrink_all,
                                 lambda sc=sc: check_apply(sc, default_ec, False))
    best_sc = sorted(shrink_times, key=shrink_times.get)[:2]
    for t in sets:
        t["partials"] = triton_shrink(t["x"], t["lora_a"], meta, num_slices, zero_init=False, config=best_sc[0])
    expand_times = {}
    for block_n, tiles, warps, stages in expand_candidates:
        ec = ExpandConfig(block_m, block_n, 16, warps, stages, tiles)

        def expand_all(ec=ec):
            for t in sets:
                triton_expand(t["partials"], t["lora_b"], meta, t["out"], offsets, config=ec)
        expand_times[ec] = timed(f"expand n{block_n}x{tiles} w{warps} s{stages}", expand_all,
                                 lambda ec=ec: check_apply(best_sc[0], ec, False))
    best_ec = sorted(expand_times, key=expand_times.get)[:2]
    results = []
    for sc in best_sc:
        for ec in best_ec:
            for pdl in (False, True):
                def apply_all(sc=sc, ec=ec, pdl=pdl):
                    for t in sets:
                        apply_once(sc, ec, pdl, t)
                label = (f"apply m{sc.block_m} k{sc.block_k} split{sc.split_k} w{sc.num_warps} s{sc.num_stages} + n{ec.block_n}"
                         f"x{ec.tiles_per_program} w{ec.num_warps} s{ec.num_stages} pdl={int(pdl)}")
                results.append((timed(label, apply_all, lambda sc=sc, ec=ec, pdl=pdl: check_apply(sc, ec, pdl)),
                                label))
    del sets
    torch.cuda.empty_cache()
    best = min(results)
    print(f"  BEST {module}: {best[1]}: {best[0]:.2f} us", flush=True)
    return best


def run_sweep(replays, seconds):
    print(f"\n== Sweep: decode tiles (CUDA-graph replays, rank 16, max_loras 32, bf16), limit {seconds:.0f} s ==",
          flush=True)
    modules = ("qkv", "gate_up", "down")
    # Shares of the time (decode 1/5 each, the mixed step 1/6 each, prefill 1/30 each), so a slow
    # case cannot starve the rest; time one leaves passes to the next.
    deadline = time.time()
    best = []
    for m in modules:
        deadline += seconds / 5
        best.append((f"{m} T=64", sweep_module(m, 64, 32, replays, deadline)))
    for m in modules:
        deadline += seconds / 6
        best.append((f"{m} T={MIXED_STEP_TOKENS}", sweep_module(m, MIXED_STEP_TOKENS, 32, replays, deadline, 32,
                                                             MIXED_SHRINK_CANDIDATES, MIXED_EXPAND_CANDIDATES,
                                                             layout="mixed")))
    for m in modules:
        deadline += seconds / 30
        best.append((f"{m} T=4096", sweep_module(m, 4096, 32, replays, deadline, 64, PREFILL_SHRINK_CANDIDATES,
                                                 PREFILL_EXPAND_CANDIDATES)))
    print("\nsweep summary (32 adapters, rank 16, bf16; apply = shrink + expand):")
    for case, (us, label) in best:
        print(f"  {case:<13} {us:8.2f} us  {label}")
