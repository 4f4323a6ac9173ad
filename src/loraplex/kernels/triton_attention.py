"""Triton paged attention: KV-cache write, decode (split-K, GQA-grouped) and prefill/mixed.

Same semantics and layouts as the torch reference in paged_attention.py (read its
docstring first): caches [num_blocks, block_size, num_kv_heads, head_dim], a flat varlen
batch of new tokens, causal within the new tokens, full over the cached ones, optional
sliding window (a token at position p sees positions > p - W).

- `_write_kv_kernel`: one program per new token; slot -1 (padding) writes nothing.
- `_decode_kernel`: one query token per sequence. A program handles one (sequence, KV head,
  context split) and all query heads of that KV head at once (GQA: the group is the M
  dimension of the dot, padded to 16), so each K/V tile is read once per group. With
  more than one split ("flash decoding") each program covers a slice of the context,
  computed in-kernel from seq_len, and writes a float32 partial (output, log-sum-exp);
  `_decode_reduce_kernel` merges them. The split count depends only on host-known bounds
  (batch size, KV heads, max_seq_len), so a CUDA graph captured with max_seq_len =
  max_model_len replays correctly for any context length. It is a runtime argument (only
  "split or not" and the reduction's power-of-2 width are compile-time), so eager decode
  steps of new sizes compile nothing: the warm-up covers the few variants.
- `_prefill_kernel`: one program per (query tile of a sequence, query head); loops over
  the KV tiles that the tile's causal/sliding-window bounds allow. Handles mixed batches
  (decode sequences are one-row tiles). Its grid uses max_query_len, a host int. With
  `first_seq` it skips a batch's first sequences: a mixed step gives its leading decodes
  to the decode kernel (GQA-grouped, no 63 empty rows per tile) and the rest to this one.

Loops run over dynamic bounds read from the device (seq_lens, query_start_loc): nothing
syncs with the host. Scores, softmax and accumulators are float32. This module imports
nothing from loraplex.core; define it only after TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.errors import KernelArgumentError
from loraplex.kernels.attention_args import check_attention_args, check_write_kv_args

# Masked scores are -inf; the running max starts finite so a fully masked tile gives
# exp(-inf - finite) = 0 instead of NaN.
_NEG_INIT = tl.constexpr(-1.0e30)


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     num_kv_heads, head_dim, block_size,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_cs, stride_ch,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // block_size
    offset = slot % block_size
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < head_dim)[None, :]
    cache_offsets = block * stride_cb + offset * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_kv_tile(cache_ptr, table_row_ptr, positions, kv_mask, dims, dim_mask, kv_head,
                  block_size, stride_cb, stride_cs, stride_ch, LARGE_CACHE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] keys or values of `positions` from the sequence's blocks."""
    blocks = tl.load(table_row_ptr + positions // block_size, mask=kv_mask, other=0)
    if LARGE_CACHE:
        blocks = blocks.to(tl.int64)
    # 32-bit offsets when the cache allows: a [BLOCK_N, BLOCK_D] tile of 64-bit ones spills registers.
    rows = blocks * stride_cb + (positions % block_size) * stride_cs + kv_head * stride_ch
    return tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=kv_mask[:, None] & dim_mask[None, :], other=0.0)


# The block tables' row stride (the step's longest table) and the split count change from one
# eager step to the next: runtime values, not specialised, so they never compile a new variant.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"])
def _decode_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
                   out_ptr, part_out_ptr, part_lse_ptr,
                   scale, sliding_window, head_dim, block_size,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                   stride_cb, stride_cs, stride_ch, num_splits,
                   GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLIT: tl.constexpr, USE_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr,
                   LARGE_CACHE: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(seq_len - sliding_window, 0)
    # This split's share of [lo, seq_len), in whole tiles.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)

    group_rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_mask = group_rows < GROUP
    dim_mask = dims < head_dim
    heads = kv_head * GROUP + group_rows                                   # [BLOCK_G] query heads
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)    # [BLOCK_G, BLOCK_D]
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_G], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        kv_mask = positions < end
        k = _load_kv_tile(k_cache_ptr, table_row_ptr, positions, kv_mask, dims, dim_mask, kv_head,
                          block_size, stride_cb, stride_cs, stride_ch, LARGE_CACHE)   # [BLOCK_N, BLOCK_D]
        v = _load_kv_tile(v_cache_ptr, table_row_ptr, positions, kv_mask, dims, dim_mask, kv_head,
                          block_size, stride_cb, stride_cs, stride_ch, LARGE_CACHE)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(kv_mask[None, :], scores * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out_mask = row_mask[:, None] & dim_mask[None, :]
    if not SPLIT:
        out = acc / tl.maximum(l_i, 1e-30)[:, None]
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_out: [num_seqs, num_q_heads, num_splits, BLOCK_D]; part_lse: [num_seqs, num_q_heads, num_splits]
        row = (seq * tl.num_programs(1) * GROUP + heads) * num_splits + split     # [BLOCK_G]
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + dims[None, :], out, mask=row_mask[:, None])
        tl.store(part_lse_ptr + row, lse, mask=row_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_q_heads, head_dim,
                          stride_ot, stride_oh, num_splits,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    row0 = (seq * num_q_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + row0 + splits, mask=splits < num_splits, other=float("-inf"))  # [BLOCK_S]
    m = tl.maximum(tl.max(lse, 0), _NEG_INIT)
    weights = tl.exp(lse - m)                                                                     # 0 for empty splits
    parts = tl.load(part_out_ptr + (row0 + splits)[:, None] * BLOCK_D + dims[None, :],
                    mask=(splits < num_splits)[:, None], other=0.0)                               # [BLOCK_S, BLOCK_D]
    out = tl.sum(parts * weights[:, None], 0) / tl.maximum(tl.sum(weights, 0), 1e-30)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


# stride_bt: the step's longest block table; first_seq: the mixed step's decode count. Both vary
# per step: specialised, each new value class would compile a variant while serving.
@triton.jit(do_not_specialize=["stride_bt", "first_seq"])
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
                    out_ptr, first_seq, scale, sliding_window, head_dim, block_size,
                    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    stride_cb, stride_cs, stride_ch,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    USE_WINDOW: tl.constexpr, IEEE_DOT: tl.constexpr, LARGE_CACHE: tl.constexpr):
    tile = tl.program_id(0)
    seq = tl.program_id(1) + first_seq
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    num_cached = seq_len - q_len
    kv_head = head // GROUP

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_positions = num_cached + rows                                         # [BLOCK_M]
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim
    tokens = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)     # [BLOCK_M, BLOCK_D]
    table_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt

    # Keys this tile can see: up to its last row's position; from its first row's window.
    hi = tl.minimum(seq_len, num_cached + (tile + 1) * BLOCK_M)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(num_cached + tile * BLOCK_M - sliding_window + 1, 0) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], _NEG_INIT, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for tile_start in range(lo, hi, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        kv_mask = positions < hi
        k = _load_kv_tile(k_cache_ptr, table_row_ptr, positions, kv_mask, dims, dim_mask, kv_head,
                          block_size, stride_cb, stride_cs, stride_ch, LARGE_CACHE)   # [BLOCK_N, BLOCK_D]
        v = _load_kv_tile(v_cache_ptr, table_row_ptr, positions, kv_mask, dims, dim_mask, kv_head,
                          block_size, stride_cb, stride_cs, stride_ch, LARGE_CACHE)
        if IEEE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = kv_mask[None, :] & (positions[None, :] <= q_positions[:, None])
        if USE_WINDOW:
            visible = visible & (positions[None, :] > q_positions[:, None] - sliding_window)
        scores = tl.where(visible, scores * scale, float("-inf"))           # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.exp(scores - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


# --- launchers: check the arguments, pick tiles, launch -------------------------------------

MIN_SPLIT_TOKENS = 64
MAX_SPLITS = 32


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Context splits per (sequence, KV head): enough programs for about two per SM, but
    every split keeps at least MIN_SPLIT_TOKENS of the longest context."""
    programs = num_seqs * num_kv_heads
    if programs >= num_sms:
        return 1
    by_occupancy = -(-2 * num_sms // programs)
    by_context = max(1, -(-max_seq_len // MIN_SPLIT_TOKENS))
    return max(1, min(by_occupancy, by_context, MAX_SPLITS))


DECODE_STAGES = 2
PREFILL_STAGES = 2


def _output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The kernels' output: `out` checked against q (they write it with q's layout), or a new tensor."""
    if out is None:
        return torch.empty_like(q)
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise KernelArgumentError(f"out must be like q ({q.dtype} of shape {list(q.shape)} on {q.device}, "
                                  f"last dimension contiguous), got {out.dtype} of shape {list(out.shape)} "
                                  f"strides {out.stride()} on {out.device}")
    return out


def _large(cache: torch.Tensor) -> bool:
    """True when a cache offset can pass 2**31 elements: the kernels then index in 64 bits."""
    return cache.storage_offset() + sum((n - 1) * st for n, st in zip(cache.shape, cache.stride())) >= 2**31 - 1


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests exercise the reduction
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(dtype: torch.dtype, head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): float32 and wide heads take smaller KV tiles to fit shared memory."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 16 if dtype == torch.float32 else 32 if block_d > 128 else 64
    return block_d, block_n


def triton_write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """write_kv_cache (paged_attention.py) as one Triton launch; slot -1 writes nothing."""
    check_write_kv_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_size = k_cache.shape[1]
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, num_kv_heads, head_dim, block_size,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim))


def triton_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, *,
                        max_seq_len: int | None = None, sliding_window: int | None = None,
                        num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence (q: [num_seqs, q_heads, head_dim]) over its cache.

    `max_seq_len` (a host bound; default: the block tables' capacity) only sets the split
    count; the kernel reads each sequence's length from `seq_lens`. `out`: where to write
    (q's shape and dtype; a new tensor by default).
    """
    num_seqs = seq_lens.shape[0] if isinstance(seq_lens, torch.Tensor) else -1
    check_attention_args(q, k_cache, v_cache, block_tables, seq_lens, None, sliding_window)
    if q.shape[0] != num_seqs:
        raise KernelArgumentError(f"decode takes one query token per sequence: q has {q.shape[0]} tokens "
                                  f"for {num_seqs} sequences; use triton_paged_prefill for longer queries")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = _output(q, out)
    if num_seqs == 0:
        return out
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_seq_len, _num_sms(q.device))
    elif isinstance(num_splits, bool) or not isinstance(num_splits, int) or not 1 <= num_splits <= 256:
        raise KernelArgumentError(f"num_splits must be an int in [1, 256] (context splits per sequence), "
                                  f"got {num_splits!r}")
    group = num_q_heads // num_kv_heads
    # 32-token KV tiles: 162 registers at 4 warps for bf16 head_dim 128 (64-token tiles take 255).
    block_d, block_n = _tiles(q.dtype, head_dim)[0], 32
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_q_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_q_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part_out, part_lse,
        float(scale), int(sliding_window or 0), head_dim, block_size,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), num_splits,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, BLOCK_D=block_d,
        SPLIT=num_splits > 1, USE_WINDOW=sliding_window is not None, IEEE_DOT=q.dtype == torch.float32,
        LARGE_CACHE=_large(k_cache), num_warps=8 if q.dtype == torch.float32 else 4, num_stages=DECODE_STAGES)
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_q_heads)](
            part_out, part_lse, out, num_q_heads, head_dim, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4)
    return out


def triton_paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                         scale: float, *, max_query_len: int, sliding_window: int | None = None,
                         first_seq: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Any mix of prefill, chunked-prefill and decode sequences (the varlen layout of
    paged_attention.py). `max_query_len` (host int) bounds each sequence's new tokens.
    first_seq: compute only sequences first_seq.. (the rows of the others in `out` are left
    as they are: a mixed step's leading decodes, done by triton_paged_decode). `out`: where
    to write (q's shape and dtype; a new tensor by default)."""
    check_attention_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, int) or max_query_len < 0:
        raise KernelArgumentError(f"max_query_len must be an int >= 0 (the longest sequence's new tokens), "
                                  f"got {max_query_len!r}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    if isinstance(first_seq, bool) or not isinstance(first_seq, int) or not 0 <= first_seq <= num_seqs:
        raise KernelArgumentError(f"first_seq must be an int in [0, num_seqs={num_seqs}], got {first_seq!r}")
    out = _output(q, out)
    if num_tokens == 0 or num_seqs == first_seq or max_query_len == 0:
        return out
    block_d, block_n = _tiles(q.dtype, head_dim)
    block_m = 64 if block_n == 64 and max_query_len > 32 else 32 if max_query_len > 16 else 16
    grid = (triton.cdiv(max_query_len, block_m), num_seqs - first_seq, num_q_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, out, first_seq,
        float(scale), int(sliding_window or 0), head_dim, k_cache.shape[1],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        GROUP=num_q_heads // k_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        USE_WINDOW=sliding_window is not None, IEEE_DOT=q.dtype == torch.float32,
        LARGE_CACHE=_large(k_cache), num_warps=8 if block_m > 32 or q.dtype == torch.float32 else 4,
        num_stages=PREFILL_STAGES)
    return out


def triton_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, *, max_query_len: int | None = None, max_seq_len: int | None = None,
                           sliding_window: int | None = None) -> torch.Tensor:
    """paged_attention (paged_attention.py) on Triton: the decode kernel when every sequence
    has one new token, else the prefill kernel. `max_query_len=None` reads it from the device."""
    if max_query_len is None:
        check_attention_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window)
        lens = query_start_loc[1:] - query_start_loc[:-1]
        max_query_len = int(lens.max().item()) if lens.numel() else 0
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return triton_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                   max_seq_len=max_seq_len, sliding_window=sliding_window)
    return triton_paged_prefill(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                max_query_len=max_query_len, sliding_window=sliding_window)
