"""The torch paged-attention reference vs dense causal attention on contiguous K/V.

Random (never zero) inputs, ragged lengths, GQA, and block tables made of shuffled,
non-contiguous blocks. These tests are also the contract a Triton kernel must meet.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loraplex.kernels.paged_attention import paged_attention, write_kv_cache

BLOCK_SIZE = 4
NUM_BLOCKS = 64
HEAD_DIM = 16


def dense_attention(q, k, v, scale, sliding_window=None):
    """q: [q_len, Hq, D] for the last q_len positions; k, v: [seq_len, Hkv, D] -> [q_len, Hq, D]."""
    q_len, num_q_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    k_pos = torch.arange(seq_len)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def build_batch(query_lens, context_lens, num_q_heads, num_kv_heads, seed=0, dtype=torch.float32):
    """Random K/V for every sequence written into shuffled blocks; returns everything a call needs."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    k_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    v_cache = torch.randn(NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, HEAD_DIM, generator=gen).to(dtype)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    max_blocks = max(-(-n // BLOCK_SIZE) for n in seq_lens)
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    keys, values, slot_mapping = [], [], []
    for b, n in enumerate(seq_lens):
        blocks = [free.pop() for _ in range(-(-n // BLOCK_SIZE))]
        block_tables[b, :len(blocks)] = torch.tensor(blocks)
        keys.append(torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype))
        values.append(torch.randn(n, num_kv_heads, HEAD_DIM, generator=gen).to(dtype))
        slots = [blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]
        # Context tokens are already cached; the new ones get written by write_kv_cache.
        flat_k, flat_v = k_cache.view(-1, num_kv_heads, HEAD_DIM), v_cache.view(-1, num_kv_heads, HEAD_DIM)
        context = torch.tensor(slots[:context_lens[b]], dtype=torch.long)
        flat_k[context], flat_v[context] = keys[b][:context_lens[b]], values[b][:context_lens[b]]
        slot_mapping += slots[context_lens[b]:]
    q = torch.randn(sum(query_lens), num_q_heads, HEAD_DIM, generator=gen).to(dtype)
    new_k = torch.cat([k[c:] for k, c in zip(keys, context_lens)])
    new_v = torch.cat([v[c:] for v, c in zip(values, context_lens)])
    query_start_loc = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    return dict(q=q, new_k=new_k, new_v=new_v, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                query_start_loc=query_start_loc, seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                slot_mapping=torch.tensor(slot_mapping, dtype=torch.long), keys=keys, values=values)


def expected_output(batch, query_lens, scale, sliding_window=None):
    outs, start = [], 0
    for b, q_len in enumerate(query_lens):
        q = batch["q"][start:start + q_len]
        outs.append(dense_attention(q, batch["keys"][b], batch["values"][b], scale, sliding_window))
        start += q_len
    return torch.cat(outs)


CASES = {
    "prefill-ragged": ([5, 1, 13, 8], [0, 0, 0, 0]),
    "decode": ([1, 1, 1, 1, 1], [3, 16, 1, 30, 8]),
    "mixed-chunked": ([6, 1, 9, 1], [7, 20, 0, 4]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)])
def test_paged_attention_matches_dense(case, heads):
    query_lens, context_lens = CASES[case]
    batch = build_batch(query_lens, context_lens, *heads)
    scale = HEAD_DIM ** -0.5
    write_kv_cache(batch["new_k"], batch["new_v"], batch["k_cache"], batch["v_cache"], batch["slot_mapping"])
    out = paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                          batch["query_start_loc"], batch["seq_lens"], scale, max_query_len=max(query_lens))
    expected = expected_output(batch, query_lens, scale)
    assert out.shape == batch["q"].shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_sliding_window():
    query_lens, context_lens = [6, 1, 9], [7, 20, 0]
    batch = build_batch(query_lens, context_lens, 4, 2, seed=3)
    write_kv_cache(batch["new_k"], batch["new_v"], batch["k_cache"], batch["v_cache"], batch["slot_mapping"])
    out = paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                          batch["query_start_loc"], batch["seq_lens"], 0.25, sliding_window=5)
    torch.testing.assert_close(out, expected_output(batch, query_lens, 0.25, sliding_window=5), rtol=1e-5, atol=1e-5)
    unwindowed = expected_output(batch, query_lens, 0.25)
    assert not torch.allclose(out, unwindowed, atol=1e-3)


def test_bfloat16_close_to_float32():
    query_lens, context_lens = [3, 1], [5, 11]
    batch = build_batch(query_lens, context_lens, 4, 2, seed=4, dtype=torch.bfloat16)
    write_kv_cache(batch["new_k"], batch["new_v"], batch["k_cache"], batch["v_cache"], batch["slot_mapping"])
    out = paged_attention(batch["q"], batch["k_cache"], batch["v_cache"], batch["block_tables"],
                          batch["query_start_loc"], batch["seq_lens"], 0.25)
    assert out.dtype == torch.bfloat16
    f32 = {k: [x.float() for x in v] if isinstance(v, list) else v for k, v in batch.items()}
    f32["q"] = batch["q"].float()
    torch.testing.assert_close(out.float(), expected_output(f32, query_lens, 0.25), rtol=2e-2, atol=2e-2)


def test_write_kv_cache_skips_padding_slots():
    gen = torch.Generator().manual_seed(0)
    k_cache = torch.randn(4, BLOCK_SIZE, 2, HEAD_DIM, generator=gen)
    v_cache = torch.randn(4, BLOCK_SIZE, 2, HEAD_DIM, generator=gen)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k, v = torch.randn(5, 2, HEAD_DIM, generator=gen), torch.randn(5, 2, HEAD_DIM, generator=gen)
    slots = torch.tensor([-1, 9, -1, 0, 15])
    write_kv_cache(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, HEAD_DIM), v_cache.view(-1, 2, HEAD_DIM)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat_k[s], k[t]) and torch.equal(flat_v[s], v[t])
    untouched = [s for s in range(16) if s not in (9, 0, 15)]
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, HEAD_DIM)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, HEAD_DIM)[untouched])

    # Only padding: nothing changes.
    write_kv_cache(k[:2], v[:2], k_cache, v_cache, torch.tensor([-1, -1]))
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, HEAD_DIM)[untouched])
    assert torch.equal(flat_k[0], k[3])


def test_padded_batch_entries_are_finite():
    """A CUDA-graph-style padded decode batch: an extra sequence with seq_len 0 and slot -1."""
    query_lens, context_lens = [1, 1], [5, 9]
    batch = build_batch(query_lens, context_lens, 4, 2, seed=5)
    q = torch.cat([batch["q"], torch.randn(1, 4, HEAD_DIM)])
    slots = torch.cat([batch["slot_mapping"], torch.tensor([-1])])
    write_kv_cache(torch.cat([batch["new_k"], batch["new_k"][:1]]), torch.cat([batch["new_v"], batch["new_v"][:1]]),
                   batch["k_cache"], batch["v_cache"], slots)
    out = paged_attention(q, batch["k_cache"], batch["v_cache"],
                          torch.cat([batch["block_tables"], torch.zeros(1, batch["block_tables"].shape[1], dtype=torch.int32)]),
                          torch.tensor([0, 1, 2, 3], dtype=torch.int32),
                          torch.cat([batch["seq_lens"], torch.tensor([0], dtype=torch.int32)]), 0.25, max_query_len=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:2], expected_output(batch, query_lens, 0.25), rtol=1e-5, atol=1e-5)
