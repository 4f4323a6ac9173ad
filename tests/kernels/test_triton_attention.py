"""The Triton paged-attention kernels against the torch reference, through Triton's interpreter.

Random inputs (never zeros), ragged lengths, GQA ratios, shuffled block tables, padded
slots; float32 and float16 (the interpreter's bfloat16 arithmetic is not faithful).
"""

import pytest
import torch

from loraplex.kernels.paged_attention import paged_attention, write_kv_cache
from loraplex.kernels.triton_attention import (triton_paged_attention, triton_paged_decode,
                                               triton_paged_prefill, triton_write_kv_cache)

TOL = {torch.float32: 1e-4, torch.float16: 3e-3}


def _rel_err(out, ref):
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _batch(query_lens, cached_lens, *, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Random caches and queries; each sequence's blocks are a random, shuffled set."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, cached_lens)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(blocks_per_seq) + 1  # a spare column, padded with a random valid block
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen, dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        tables[b, :n] = order[used:used + n].to(torch.int32)
        used += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_q_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    return q, k_cache, v_cache, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_matches_reference(dtype, num_q_heads, num_kv_heads, window):
    cached = [0, 5, 40, 130, 17]
    q, kc, vc, tables, qsl, seq_lens = _batch([1] * len(cached), cached, num_q_heads=num_q_heads,
                                              num_kv_heads=num_kv_heads, head_dim=16, block_size=8,
                                              dtype=dtype, seed=num_q_heads * 10 + num_kv_heads)
    ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.3, max_query_len=1, sliding_window=window)
    for splits in (1, 3, 8):  # 8 splits: some cover nothing for short sequences
        out = triton_paged_decode(q, kc, vc, tables, seq_lens, 0.3, sliding_window=window, num_splits=splits)
        assert _rel_err(out, ref) < TOL[dtype], splits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_q_heads,num_kv_heads,head_dim", [(4, 2, 16), (6, 3, 24)])
@pytest.mark.parametrize("window", [None, 5])
def test_prefill_and_mixed_match_reference(dtype, num_q_heads, num_kv_heads, head_dim, window):
    # Prefill from scratch, chunked prefill over a cache, decode rows, one long query (several tiles).
    query_lens, cached = [9, 1, 20, 3, 1, 70], [0, 33, 11, 0, 4, 6]
    q, kc, vc, tables, qsl, seq_lens = _batch(query_lens, cached, num_q_heads=num_q_heads,
                                              num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=4,
                                              dtype=dtype, seed=head_dim)
    ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.25, max_query_len=70, sliding_window=window)
    out = triton_paged_prefill(q, kc, vc, tables, qsl, seq_lens, 0.25, max_query_len=70, sliding_window=window)
    assert _rel_err(out, ref) < TOL[dtype]
    out = triton_paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.25, sliding_window=window)
    assert _rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_split_between_decode_and_prefill_kernels(dtype, window):
    # A mixed step's leading decodes by the decode kernel into out[:d], the rest by the prefill
    # kernel from first_seq=d into the same out: together the reference, and the prefill kernel
    # leaves the decodes' rows alone.
    query_lens, cached = [1, 1, 1, 1, 9, 1, 40], [30, 0, 75, 12, 6, 9, 0]
    q, kc, vc, tables, qsl, seq_lens = _batch(query_lens, cached, num_q_heads=4, num_kv_heads=2, head_dim=16,
                                              block_size=4, dtype=dtype, seed=7)
    ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.3, max_query_len=40, sliding_window=window)
    out = torch.full_like(q, float("nan"))
    triton_paged_prefill(q, kc, vc, tables, qsl, seq_lens, 0.3, max_query_len=40, sliding_window=window,
                         first_seq=4, out=out)
    assert torch.isnan(out[:4]).all() and not torch.isnan(out[4:]).any()
    assert _rel_err(out[4:], ref[4:]) < TOL[dtype]
    triton_paged_decode(q[:4], kc, vc, tables[:4], seq_lens[:4], 0.3, max_seq_len=100, sliding_window=window,
                        out=out[:4])
    assert _rel_err(out, ref) < TOL[dtype]
    untouched = torch.full_like(q, float("nan"))              # first_seq = num_seqs: nothing to compute
    triton_paged_prefill(q, kc, vc, tables, qsl, seq_lens, 0.3, max_query_len=40, first_seq=7, out=untouched)
    assert torch.isnan(untouched).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_kv_cache_matches_reference_and_skips_padding(dtype):
    gen = torch.Generator().manual_seed(3)
    num_blocks, block_size, heads, dim = 6, 4, 3, 16
    k_cache = torch.randn(num_blocks, block_size, heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, heads, dim, generator=gen).to(dtype)
    slots = torch.tensor([5, -1, 17, 0, -1, 23, 9], dtype=torch.int64)
    k = torch.randn(len(slots), heads, dim, generator=gen).to(dtype)
    v = torch.randn(len(slots), heads, dim, generator=gen).to(dtype)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, ref_k, ref_v, slots)
    for slot_dtype in (torch.int64, torch.int32):
        out_k, out_v = k_cache.clone(), v_cache.clone()
        triton_write_kv_cache(k, v, out_k, out_v, slots.to(slot_dtype))
        assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    assert not torch.equal(ref_k, k_cache)  # the write did something


def test_write_then_decode_over_strided_layer_views():
    """Caches as the engine holds them: views into one [layers, 2, ...] allocation."""
    storage = torch.randn(2, 2, 5, 4, 2, 16)
    k_cache, v_cache = storage[1, 0], storage[1, 1]
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 16, generator=gen)
    tables = torch.tensor([[3, 1, 0], [4, 2, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([7, 6], dtype=torch.int32)
    slots = torch.tensor([1 * 4 + 2, 2 * 4 + 1])
    triton_write_kv_cache(k, v, k_cache, v_cache, slots)
    q = torch.randn(2, 4, 16, generator=gen)
    out = triton_paged_decode(q, k_cache, v_cache, tables, seq_lens, 0.25, num_splits=2)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref = paged_attention(q, ref_k, ref_v, tables, torch.tensor([0, 1, 2], dtype=torch.int32), seq_lens, 0.25,
                          max_query_len=1)
    assert _rel_err(out, ref) < 1e-4
    assert torch.equal(k_cache.reshape(-1, 2, 16)[6], k[0])
