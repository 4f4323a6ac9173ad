"""Tile configs of the LoRA Triton kernels: which block sizes, split-K and warps for a shape.

Kept apart from the kernels (triton_lora.py) so the heuristics read in one place; the
decode constants come from reasoning about bytes in flight per SM and are what
`benchmarks/gpu_lora_kernels.py --sweep` checks on an H200.

The heuristics take `max_adapters`, an upper bound on the distinct adapters of the step,
because the row tiles a step can need grow with it (see max_row_tiles). Launchers pass
`config_bound(...)`, which rounds the step's bound up to one of two classes (FEW_ADAPTERS
or max_loras): a config is a set of compile-time constants, so one class per bound keeps
the kernel variants few and lets the warm-up compile them all (adapter_bound_classes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import triton

MAX_SPLIT_K = 32
# The expand sums the split-K partials with a loop unrolled to a compile-time bound, masked
# past the runtime split_k: the bound is SMALL_SPLIT_K when split_k fits (prefill always does,
# so its unrolled loads stay few), else MAX_SPLIT_K. One bound per module and step class, so a
# new step size never compiles a new variant.
SMALL_SPLIT_K = 8
# Steps with at most this many distinct adapters get tiles (and, in the engine, a CUDA graph
# variant) of their own: sized for max_loras, a 1-adapter decode step at 64 tokens on an H200
# ran gate_up's expand on 56 programs of 8 column tiles each (14.6 us against 18.5 us for 32 adapters).
FEW_ADAPTERS = 8
# Decode tiles (<= 128 tokens), from `benchmarks/gpu_lora_kernels.py --sweep` on an H200
# (2026-11-28, 64 tokens / 32 adapters, rank 16): the expand of qkv and down is fastest with
# one 256-wide tile per program (7.4 / 5.5 us vs 8.2 / 6.7 us at two), gate_up with eight
# per program and 3 stages (19.2 us vs 20.9 us at 2 stages); 3.5 programs per SM separates them.
DECODE_SHRINK_PROGRAMS_PER_SM = 4
DECODE_EXPAND_BLOCK_N = 256
DECODE_EXPAND_MAX_TILES = 8
DECODE_EXPAND_PROGRAMS_PER_SM = 3.5
DECODE_EXPAND_WARPS = 4
DECODE_EXPAND_STAGES = 3


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    block_r: int
    num_warps: int = 4
    num_stages: int = 1
    tiles_per_program: int = 1  # column tiles one program loops over (h is loaded once for all)



# Steps of at most this many tokens get the decode tiles, whose choice (tiles per program,
# split-K) changes with the token count itself; above it only the row-tile class does.
DECODE_TILE_MAX_TOKENS = 128


def _block_m(num_tokens: int) -> int:
    # Decode batches have few tokens per adapter; prefill has long runs of one adapter.
    return 16 if num_tokens <= DECODE_TILE_MAX_TOKENS else (32 if num_tokens <= 1024 else 64)


def max_row_tiles(num_tokens: int, max_adapters: int, block_m: int) -> int:
    """Row tiles of a step with at most max_adapters groups: each wastes at most one partial tile."""
    return triton.cdiv(num_tokens, block_m) + min(max_adapters, num_tokens)


def config_bound(max_active_slots: int, max_loras: int) -> int:
    """The adapter count tiles are picked for: FEW_ADAPTERS when the step's bound is at most
    that (and below max_loras), else max_loras."""
    if max_active_slots <= FEW_ADAPTERS < max_loras:
        return FEW_ADAPTERS
    return max_loras


def adapter_bound_classes(max_loras: int) -> tuple[int, ...]:
    """Every value config_bound can return for max_loras: one warm-up pass each compiles all variants."""
    return (FEW_ADAPTERS, max_loras) if max_loras > FEW_ADAPTERS else (max_loras,)


# Cached: eager steps ask for a config at every layer and projection (128 times per 8B step),
# and the answer depends only on these ints.
@functools.lru_cache(maxsize=4096)
def shrink_config(num_tokens: int, in_features: int, n: int, max_adapters: int, num_sms: int) -> ShrinkConfig:
    """Tiles for x[num_tokens, in] @ A^T -> [num_tokens, n]: split K until the GPU is full."""
    block_m = _block_m(num_tokens)
    block_n = min(max(16, triton.next_power_of_2(n)), 128)
    if block_m > 16:
        # Prefill: ~2 programs per SM, >= 4 K blocks each (met its targets on the H200; keep).
        block_k = min(64, max(16, triton.next_power_of_2(in_features)))
        programs = max_row_tiles(num_tokens, max_adapters, block_m) * triton.cdiv(n, block_n)
        k_blocks = triton.cdiv(in_features, block_k)
        split_k = max(1, min(triton.cdiv(2 * num_sms, programs), k_blocks // 4, SMALL_SPLIT_K))
        return ShrinkConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=3)
    # Decode: the cost is streaming each active slot's A once, and a program's K loop is a
    # chain of dependent round trips. Narrow A (n <= 32) gets 256-deep K blocks so each load
    # is >= 8 KB; K is split for ~DECODE_SHRINK_PROGRAMS_PER_SM programs per SM with >= 2
    # K blocks each, so more loads are in flight and each chain is short.
    block_k = 256 if block_n <= 32 else 128
    block_k = min(block_k, max(16, triton.next_power_of_2(in_features)))
    programs = max_row_tiles(num_tokens, max_adapters, block_m) * triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = max(1, min(triton.cdiv(DECODE_SHRINK_PROGRAMS_PER_SM * num_sms, programs), k_blocks // 2,
                         MAX_SPLIT_K))
    return ShrinkConfig(block_m, block_n, block_k, split_k, num_warps=4, num_stages=3)


@functools.lru_cache(maxsize=4096)
def expand_config(num_tokens: int, slice_widths: tuple[int, ...], max_rank: int, max_adapters: int,
                  num_sms: int) -> ExpandConfig:
    """Tiles for h @ B^T added into out.

    Prefill: 128-wide column tiles, one per program, rank blocks of 16 (registers stay low,
    ~60-130 per thread on sm_90). Decode: each program loops over several column tiles of
    one slice, so its slot lookup, token ids and split-K sum of h are paid once per chunk,
    not per tile, and its B loads pipeline; chunks still give a few programs per SM.
    """
    block_m = _block_m(num_tokens)
    block_r = 16
    if block_m > 16:
        block_n = min(128, max(16, triton.next_power_of_2(max(slice_widths))))
        return ExpandConfig(block_m, block_n, block_r, num_warps=8 if block_m == 64 else 4, num_stages=1)
    # One rank block up to rank 64 (no inner loop); wide rank blocks get narrower column tiles.
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    block_n = min(DECODE_EXPAND_BLOCK_N * 16 // block_r, max(16, triton.next_power_of_2(max(slice_widths))))
    col_tiles = sum(triton.cdiv(w, block_n) for w in slice_widths)
    row_tiles = max_row_tiles(num_tokens, max_adapters, block_m)
    tiles = 1
    # Largest power of 2 that keeps >= DECODE_EXPAND_PROGRAMS_PER_SM programs per SM and divides
    # every slice into whole chunks (then no column masks).
    while (tiles * 2 <= DECODE_EXPAND_MAX_TILES
           and row_tiles * triton.cdiv(col_tiles, tiles * 2) >= DECODE_EXPAND_PROGRAMS_PER_SM * num_sms
           and all(w % (block_n * tiles * 2) == 0 for w in slice_widths)):
        tiles *= 2
    return ExpandConfig(block_m, block_n, block_r, num_warps=DECODE_EXPAND_WARPS,
                        num_stages=DECODE_EXPAND_STAGES, tiles_per_program=tiles)


def split_k_chunks(in_features: int, config: ShrinkConfig) -> tuple[int, int]:
    """(K per split, number of splits) of a shrink: whole K blocks per split, so the count run
    can be below config.split_k."""
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.split_k), config.block_k) * config.block_k
    return k_per_split, triton.cdiv(in_features, k_per_split)


def expand_split_bound(split_k: int) -> int:
    """The compile-time unroll bound of the expand's split-K sum (see SMALL_SPLIT_K)."""
    return SMALL_SPLIT_K if split_k <= SMALL_SPLIT_K else MAX_SPLIT_K
