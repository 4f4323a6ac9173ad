"""Triton kernels for batched multi-LoRA: a grouped shrink (x @ A^T) and expand (h @ B^T).

Both kernels run over tokens grouped by adapter slot (see lora_meta.py). Their grids
are static, a function of (num_tokens, bound, shapes) only, so they can be captured in a
CUDA graph: axis 0 enumerates row tiles of all groups back to back, with the upper bound
cdiv(num_tokens, BLOCK_M) + min(bound, num_tokens), where bound = min(max_loras,
meta.max_active_slots); each program finds its group with a prefix sum over the per-slot
tile counts and exits at once when it is past the last one. Base-model tokens are in no
group and slots of rank 0 get no tiles, so they cost nothing.

Why the bound suffices: a step whose tokens fall in the active slots S (|S| <= bound,
and |S| <= num_tokens) with count_s tokens each needs
    sum_{s in S} cdiv(count_s, BLOCK_M) <= sum_{s in S} (count_s / BLOCK_M + 1)
                                       <= cdiv(num_tokens, BLOCK_M) + |S|
row tiles, since the counts add up to at most num_tokens. Only the grid uses the exact
bound; tile configs are picked for its class (lora_tiles.config_bound), so a new adapter
count never compiles a new kernel variant. The kernels' max_loras argument stays the real
one: slot ids, and the per-slot arrays the programs scan, go up to max_loras - 1.

Shrink writes split-K partial sums in float32, [split_k, num_tokens, num_slices * max_rank];
expand adds the partials up as it loads them, so split-K needs neither atomics nor a
memset. Expand covers all output slices in one launch: axis 1 enumerates column chunks
(tiles_per_program tiles of BLOCK_N) of slice 0, then slice 1, ...; slice i reads only
rank block i of the shrink output. On Hopper+, apply_lora launches the expand with
programmatic dependent launch, so it starts while the shrink runs (see triton_expand).
Tile choices live in lora_tiles.py.

Import this module only after TRITON_INTERPRET is settled (kernels are defined at import).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from loraplex.errors import KernelArgumentError
from loraplex.kernels.lora import MAX_SLICES
from loraplex.kernels.lora_meta import LoRABatchMeta
from loraplex.kernels.lora_tiles import (  # noqa: F401  (configs are part of this module's API)
    MAX_SPLIT_K, ExpandConfig, ShrinkConfig, config_bound, expand_config, expand_split_bound, max_row_tiles,
    shrink_config, split_k_chunks)

# apply_lora overlaps the expand's launch with the shrink on Hopper+ (see triton_expand);
# False launches them plainly (read when pdl_supported is first called for a device).
# Off: on the H200 (2026-11-28) it saved 1.0-1.5 us on qkv/down and cost 1 us on gate_up, and
# the model's path (lora_linear) overlaps the shrink with the base GEMM instead.
PDL_ENABLED = False


@triton.jit
def _group_tile(pid_m, counts_ptr, ranks_ptr, max_loras, max_rank,
                MAX_LORAS_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Flat row-tile index -> (slot, first row of the tile in the slot's group, count, start, rank).

    Everything comes from one load of the per-slot counts and ranks, so the weight loads
    that need only the slot and rank wait on a single memory round trip. Groups lie in
    slot order, so a group's start is the exclusive prefix sum of the counts.
    Returns slot >= max_loras when pid_m is past the last tile of the step.
    """
    slots = tl.arange(0, MAX_LORAS_P2)
    valid = slots < max_loras
    counts = tl.load(counts_ptr + slots, mask=valid, other=0)
    ranks = tl.minimum(tl.load(ranks_ptr + slots, mask=valid, other=0), max_rank)
    tiles = tl.where(ranks > 0, (counts + BLOCK_M - 1) // BLOCK_M, 0)
    tile_ends = tl.cumsum(tiles, 0)
    slot = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
    here = slots == slot
    first_tile = tl.sum(tl.where(here, tile_ends - tiles, 0), 0)
    count = tl.sum(tl.where(here, counts, 0), 0)
    start = tl.sum(tl.where(here, tl.cumsum(counts, 0) - counts, 0), 0)
    rank = tl.sum(tl.where(here, ranks, 0), 0)
    return slot, (pid_m - first_tile) * BLOCK_M, count, start, rank


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, partial_ptr,
    sorted_ids_ptr, counts_ptr, ranks_ptr,
    max_loras, K, N, max_rank, k_per_split,
    stride_xm, stride_a_slot, stride_a_n, stride_p_split, stride_p_m,
    MAX_LORAS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, IEEE_DOT: tl.constexpr, LAUNCH_DEPENDENTS: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:
        # Lets the expand (launched with PDL) start its prologue; it waits for this grid's results.
        gdc_launch_dependents()
    slot, m0, count, start, rank = _group_tile(tl.program_id(0), counts_ptr, ranks_ptr, max_loras, max_rank,
                                               MAX_LORAS_P2, BLOCK_M)
    if slot >= max_loras:
        return
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    # Columns n = slice * max_rank + r; rows r >= rank of A are padding and never loaded.
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = (offs_n < N) & (offs_n % max_rank < rank)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + tokens[:, None] * stride_xm                                   # [BLOCK_M, 1]
    a_cols = a_ptr + slot.to(tl.int64) * stride_a_slot + offs_n[None, :] * stride_a_n  # [1, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k in range(k_begin, k_end, BLOCK_K):
        ks = k + offs_k
        if EVEN_K:
            xt = tl.load(x_rows + ks[None, :], mask=mask_m[:, None], other=0.0)     # [BLOCK_M, BLOCK_K]
            at = tl.load(a_cols + ks[:, None], mask=mask_n[None, :], other=0.0)     # [BLOCK_K, BLOCK_N]
        else:
            mask_k = ks < K
            xt = tl.load(x_rows + ks[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_cols + ks[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if IEEE_DOT:
            acc = tl.dot(xt, at, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, at, acc)

    p_ptrs = partial_ptr + pid_k * stride_p_split + tokens[:, None] * stride_p_m + offs_n[None, :]
    tl.store(p_ptrs, acc, mask=mask_m[:, None] & (offs_n < N)[None, :])


@triton.jit
def _next_slice(pid_n, slice_id, col_lo, col_hi, first_tile, tiles_end, lo, hi, BLOCK_N: tl.constexpr):
    """Move to the slice [lo, hi) when pid_n is past the column tiles seen so far."""
    past = pid_n >= tiles_end
    return (tl.where(past, slice_id + 1, slice_id), tl.where(past, lo, col_lo),
            tl.where(past, hi, col_hi), tl.where(past, tiles_end, first_tile),
            tiles_end + tl.cdiv(hi - lo, BLOCK_N))


@triton.jit
def _load_h(h_rows, r0, offs_r, mask_m, rank, max_rank, stride_p_split, split_k,
            MAX_SPLIT: tl.constexpr, EVEN_R: tl.constexpr):
    """Rank block [r0, r0 + BLOCK_R) of the shrink output, split-K partials summed: [BLOCK_M, BLOCK_R] fp32."""
    rs = r0 + offs_r
    # Masking only on max_rank (a multiple of 16 when EVEN_R) keeps the loads 16 bytes wide;
    # values past the slot's rank are zeroed after the load.
    mask = mask_m[:, None] if EVEN_R else mask_m[:, None] & (rs < max_rank)[None, :]
    h = tl.load(h_rows + rs[None, :], mask=mask, other=0.0)
    # Unrolled to MAX_SPLIT with the splits past split_k masked off: every load is issued at
    # once, and split_k (which varies with the step's token count) is not a compile-time
    # constant, so a new batch size never triggers a JIT compile.
    for s in tl.static_range(1, MAX_SPLIT):
        h += tl.load(h_rows + s * stride_p_split + rs[None, :], mask=mask & (s < split_k), other=0.0)
    return tl.where((rs < rank)[None, :], h, 0.0)


@triton.jit
def _load_b(b_cols, r0, offs_r, mask_n, rank, max_rank, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr):
    """B[slot, cols, r0:r0 + BLOCK_R]^T as [BLOCK_R, BLOCK_N]; columns past the rank read as 0.

    B's padding past the rank may hold anything (NaN included): it is loaded only up to
    the 16-aligned max_rank, for wide loads, and replaced by 0 before the dot.
    """
    rs = r0 + offs_r
    ptrs = b_cols + rs[:, None]
    if EVEN_R and EVEN_N:
        b = tl.load(ptrs)
    elif EVEN_R:
        b = tl.load(ptrs, mask=mask_n[None, :], other=0.0)
    else:
        b = tl.load(ptrs, mask=(rs < max_rank)[:, None] & mask_n[None, :], other=0.0)
    return tl.where((rs < rank)[:, None], b, 0.0)


@triton.jit(do_not_specialize=["split_k"])
def _expand_kernel(
    partial_ptr, b_ptr, out_ptr,
    sorted_ids_ptr, counts_ptr, ranks_ptr,
    max_loras, max_rank, end0, end1, end2, end3,
    stride_p_split, stride_p_m, stride_b_slot, stride_b_n, stride_out_m,
    split_k, NUM_SLICES: tl.constexpr, MAX_SPLIT: tl.constexpr, MAX_LORAS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, N_TILES: tl.constexpr,
    ONE_R_BLOCK: tl.constexpr, EVEN_R: tl.constexpr, EVEN_N: tl.constexpr,
    IEEE_DOT: tl.constexpr, USE_PDL: tl.constexpr,
):
    slot, m0, count, start, rank = _group_tile(tl.program_id(0), counts_ptr, ranks_ptr, max_loras, max_rank,
                                               MAX_LORAS_P2, BLOCK_M)
    if slot >= max_loras:
        return
    # Each program covers N_TILES column tiles (a chunk) of one slice; chunks are numbered
    # slice after slice, so find this program's slice.
    CHUNK: tl.constexpr = BLOCK_N * N_TILES
    pid_n = tl.program_id(1)
    slice_id = pid_n * 0
    col_lo = pid_n * 0
    col_hi = pid_n * 0 + end0
    first_tile = pid_n * 0
    tiles_end = tl.cdiv(end0, CHUNK) + pid_n * 0
    if NUM_SLICES > 1:
        slice_id, col_lo, col_hi, first_tile, tiles_end = _next_slice(
            pid_n, slice_id, col_lo, col_hi, first_tile, tiles_end, end0, end1, CHUNK)
    if NUM_SLICES > 2:
        slice_id, col_lo, col_hi, first_tile, tiles_end = _next_slice(
            pid_n, slice_id, col_lo, col_hi, first_tile, tiles_end, end1, end2, CHUNK)
    if NUM_SLICES > 3:
        slice_id, col_lo, col_hi, first_tile, tiles_end = _next_slice(
            pid_n, slice_id, col_lo, col_hi, first_tile, tiles_end, end2, end3, CHUNK)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    tokens = tl.load(sorted_ids_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    n0 = col_lo + (pid_n - first_tile) * CHUNK
    offs_r = tl.arange(0, BLOCK_R)
    h_rows = partial_ptr + tokens[:, None] * stride_p_m + slice_id * max_rank       # [BLOCK_M, 1]
    b_slot = b_ptr + slot.to(tl.int64) * stride_b_slot
    out_rows = out_ptr + tokens[:, None] * stride_out_m                             # [BLOCK_M, 1]
    if USE_PDL:
        # Launched while the shrink still runs: everything above needs only the metadata.
        gdc_wait()

    # Rank block 0 of h is loaded once and reused for every column tile of the chunk.
    h0 = _load_h(h_rows, 0, offs_r, mask_m, rank, max_rank, stride_p_split, split_k, MAX_SPLIT, EVEN_R)
    if not IEEE_DOT:
        h0 = h0.to(b_ptr.dtype.element_ty)
    for j in range(N_TILES):
        offs_n = n0 + j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < col_hi
        b_cols = b_slot + offs_n[None, :] * stride_b_n                               # [1, BLOCK_N]
        b = _load_b(b_cols, 0, offs_r, mask_n, rank, max_rank, EVEN_R, EVEN_N)       # [BLOCK_R, BLOCK_N]
        # The out tile is loaded next to B, before the dot, so the two DRAM round trips of a
        # tile overlap instead of following each other (decode is latency-bound here).
        out_ptrs = out_rows + offs_n[None, :]
        if EVEN_N:
            mask = mask_m[:, None]
        else:
            mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(out_ptrs, mask=mask, other=0.0)
        if IEEE_DOT:
            acc = tl.dot(h0, b, input_precision="ieee")
        else:
            acc = tl.dot(h0, b)
        if not ONE_R_BLOCK:
            # Ranks past the first block; the rank bounds the loop, so B's padding blocks are never read.
            for r0 in tl.range(BLOCK_R, rank, BLOCK_R, num_stages=1):   # not pipelined: h loads are unrolled
                h = _load_h(h_rows, r0, offs_r, mask_m, rank, max_rank, stride_p_split, split_k, MAX_SPLIT,
                            EVEN_R)
                b = _load_b(b_cols, r0, offs_r, mask_n, rank, max_rank, EVEN_R, EVEN_N)
                if IEEE_DOT:
                    acc = tl.dot(h, b, acc, input_precision="ieee")
                else:
                    acc = tl.dot(h.to(b.dtype), b, acc)
        tl.store(out_ptrs, (y.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few programs keep it fast


def _row_tiles(num_tokens: int, meta: LoRABatchMeta, block_m: int) -> int:
    """Grid axis 0: enough row tiles for any slot map within the metadata's bound (module docstring)."""
    return max_row_tiles(num_tokens, min(meta.max_loras, meta.max_active_slots), block_m)


def _max_loras_p2(max_loras: int) -> int:
    return max(2, triton.next_power_of_2(max_loras))


@functools.lru_cache(maxsize=None)
def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: Hopper or newer, not Triton's interpreter, not switched off."""
    return (PDL_ENABLED and device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def triton_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta, num_slices: int,
                  *, zero_init: bool, config: ShrinkConfig | None = None,
                  launch_dependents: bool = False) -> torch.Tensor:
    """Split-K partials [split_k, num_tokens, num_slices * max_rank] float32 of x @ A[slot]^T.

    Rows of tokens in no group are left unwritten unless zero_init. launch_dependents lets an
    expand launched next with pdl=True start early. Inputs are checked by lora.py.
    """
    num_tokens, in_features = x.shape
    max_loras, n, _ = lora_a.shape
    max_rank = n // num_slices
    if config is None:
        config = shrink_config(num_tokens, in_features, n, config_bound(meta.max_active_slots, max_loras),
                               _num_sms(x.device))
    k_per_split, split_k = split_k_chunks(in_features, config)
    alloc = torch.zeros if zero_init else torch.empty
    # Rows padded to a multiple of 16, so the split stride is one too, whatever the step's
    # token count: Triton then compiles one variant (specialised on it, for wide loads).
    rows = triton.cdiv(max(num_tokens, 1), 16) * 16
    partials = alloc((split_k, rows, n), dtype=torch.float32, device=x.device)[:, :num_tokens]
    if num_tokens == 0:
        return partials
    grid = (_row_tiles(num_tokens, meta, config.block_m), triton.cdiv(n, config.block_n), split_k)
    _shrink_kernel[grid](
        x, lora_a, partials,
        meta.sorted_token_ids, meta.slot_token_counts, meta.slot_ranks,
        max_loras, in_features, n, max_rank, k_per_split,
        x.stride(0), lora_a.stride(0), lora_a.stride(1), partials.stride(0), partials.stride(1),
        MAX_LORAS_P2=_max_loras_p2(max_loras), BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, EVEN_K=in_features % config.block_k == 0,
        IEEE_DOT=x.dtype == torch.float32, LAUNCH_DEPENDENTS=launch_dependents,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return partials


def triton_expand(partials: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta, out: torch.Tensor,
                  slice_offsets: tuple[int, ...], *, config: ExpandConfig | None = None, pdl: bool = False) -> None:
    """out[t, slice i] += sum_k partials[k, t, rank block i] @ B[slot, slice i]^T, all slices at once.

    pdl=True launches with programmatic dependent launch: only right after triton_shrink
    (launch_dependents=True) on the same stream, since the kernel reads the metadata before
    it waits for the previous kernel.
    """
    split_k, num_tokens, _ = partials.shape
    if split_k > MAX_SPLIT_K:
        raise KernelArgumentError(f"the expand sums at most {MAX_SPLIT_K} split-K partials, got {split_k}; "
                                  f"use a ShrinkConfig with split_k <= {MAX_SPLIT_K}")
    max_loras, _, max_rank = lora_b.shape
    num_slices = len(slice_offsets) - 1
    widths = [hi - lo for lo, hi in zip(slice_offsets, slice_offsets[1:])]
    if config is None:
        config = expand_config(num_tokens, tuple(widths), max_rank, config_bound(meta.max_active_slots, max_loras),
                               _num_sms(out.device))
    if num_tokens == 0:
        return
    ends = list(slice_offsets[1:]) + [slice_offsets[-1]] * (MAX_SLICES - num_slices)
    chunk = config.block_n * config.tiles_per_program
    col_tiles = sum(triton.cdiv(w, chunk) for w in widths)
    grid = (_row_tiles(num_tokens, meta, config.block_m), col_tiles)
    _expand_kernel[grid](
        partials, lora_b, out,
        meta.sorted_token_ids, meta.slot_token_counts, meta.slot_ranks,
        max_loras, max_rank, *ends,
        partials.stride(0), partials.stride(1), lora_b.stride(0), lora_b.stride(1), out.stride(0),
        split_k=split_k, NUM_SLICES=num_slices, MAX_SPLIT=expand_split_bound(split_k), MAX_LORAS_P2=_max_loras_p2(max_loras),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        N_TILES=config.tiles_per_program, ONE_R_BLOCK=max_rank <= config.block_r,
        EVEN_R=max_rank % config.block_r == 0, EVEN_N=all(w % chunk == 0 for w in widths),
        IEEE_DOT=lora_b.dtype == torch.float32, USE_PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=pdl,
    )
