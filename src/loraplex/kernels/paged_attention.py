"""Paged attention in pure torch: the CPU path and the reference the Triton kernels are tested against.

KV-cache layout (one pair of tensors per layer):

    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]

A token's *slot* is `block * block_size + offset`; `k_cache.view(-1, num_kv_heads, head_dim)[slot]`
is its key. A sequence's block table lists its blocks in position order, so the token at
position p lives in slot `block_table[p // block_size] * block_size + p % block_size`.

A batch is a flat run of new tokens, sequence after sequence (varlen layout):

    query_start_loc: [num_seqs + 1] int32   new tokens of seq b are q[query_start_loc[b]:query_start_loc[b+1]]
    seq_lens:        [num_seqs] int32       tokens of seq b in the cache after this step (cached + new)
    block_tables:    [num_seqs, max_blocks] int32, rows padded with any valid block id

The new tokens of a sequence are its last positions, so new token i of sequence b sits at
position `seq_lens[b] - q_len_b + i`. Each new token attends to every cached token of its
sequence and causally to the new ones: one rule covers prefill, chunked prefill and decode.

Nothing here synchronises with the host when `max_query_len` is given, so a caller can
capture it in a CUDA graph. This module imports nothing from loraplex.core.
"""

from __future__ import annotations

import torch


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store the new tokens' keys and values in their cache slots.

    k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] int, -1 = don't write
    (padding added to reach a CUDA-graph batch size).
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)  # [num_slots, kv_heads, head_dim]
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    slot_mapping = slot_mapping.long()
    is_real = slot_mapping >= 0
    # Boolean indexing would sync with the host. Instead every padding token is aimed at the
    # slot of the first real token and carries that token's values, so the duplicate writes
    # agree and the result is exact. With no real token at all, padding rewrites slot 0 with
    # its own content.
    # Indexing with a 0-d tensor would call .item(); index_select with a [1] index does not.
    first_real = torch.argmax(is_real.int()).view(1)
    has_real = is_real.index_select(0, first_real)  # [1]
    sink_slot = torch.where(has_real, slot_mapping.index_select(0, first_real), torch.zeros_like(first_real))
    slots = torch.where(is_real, slot_mapping, sink_slot)
    real = is_real[:, None, None]
    for new, flat in ((k, flat_k), (v, flat_v)):
        # [1, kv_heads, head_dim]
        sink_value = torch.where(has_real[:, None, None], new.index_select(0, first_real).to(flat.dtype),
                                 flat.index_select(0, sink_slot))
        flat.index_copy_(0, slots, torch.where(real, new.to(flat.dtype), sink_value))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    scale: float, *, max_query_len: int | None = None, max_seq_len: int | None = None,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Attention of the new tokens over their sequences' cached K/V (already written).

    q: [num_tokens, num_q_heads, head_dim] -> [num_tokens, num_q_heads, head_dim].
    num_q_heads must be a multiple of num_kv_heads (GQA: query head h reads KV head
    h // (num_q_heads // num_kv_heads)). `max_query_len` / `max_seq_len` bound the padding;
    `max_query_len=None` reads it from the device (a host sync). `sliding_window=W` lets a
    token at position p see only positions > p - W (Mistral).

    Vectorised with padding: queries become [num_seqs, max_query_len], keys
    [num_seqs, max_seq_len]; no Python loop over sequences. Scores are computed in float32.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    device = q.device
    query_start_loc = query_start_loc.long()
    seq_lens = seq_lens.long()
    query_lens = query_start_loc[1:] - query_start_loc[:-1]  # [num_seqs]
    if max_query_len is None:
        max_query_len = int(query_lens.max().item()) if num_seqs else 0
    max_blocks = block_tables.shape[1]
    if max_seq_len is not None:
        max_blocks = min(max_blocks, -(-max_seq_len // block_size))
    max_keys = max_blocks * block_size

    # Phase 1: pad queries to [num_seqs, max_query_len] by gathering from the flat batch.
    q_offsets = torch.arange(max_query_len, device=device)
    q_index = query_start_loc[:-1, None] + q_offsets[None, :]  # [num_seqs, max_query_len]
    q_is_real = q_offsets[None, :] < query_lens[:, None]
    q_index = torch.where(q_is_real, q_index, torch.zeros_like(q_index)).clamp_(max=max(num_tokens - 1, 0))
    q_pad = q[q_index].float()  # [num_seqs, max_query_len, q_heads, head_dim]
    q_pad = q_pad.view(num_seqs, max_query_len, num_kv_heads, group, head_dim)
    q_positions = (seq_lens - query_lens)[:, None] + q_offsets[None, :]  # [num_seqs, max_query_len]

    # Phase 2: gather each sequence's keys and values from its blocks, in position order.
    tables = block_tables[:, :max_blocks].long()
    keys = k_cache[tables].view(num_seqs, max_keys, num_kv_heads, head_dim).float()
    values = v_cache[tables].view(num_seqs, max_keys, num_kv_heads, head_dim).float()
    k_positions = torch.arange(max_keys, device=device)

    # Phase 3: masked softmax. mask: [num_seqs, 1, 1, max_query_len, max_keys]
    visible = (k_positions[None, None, :] <= q_positions[:, :, None]) \
        & (k_positions[None, None, :] < seq_lens[:, None, None])
    if sliding_window is not None:
        visible &= k_positions[None, None, :] > q_positions[:, :, None] - sliding_window
    visible &= q_is_real[:, :, None]
    visible = visible[:, None, None]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q_pad, keys) * scale  # [seqs, kv_heads, group, q, k]
    scores = scores.masked_fill(~visible, float("-inf"))
    # Rows with nothing visible (padding) give NaN in softmax; zero them.
    probs = torch.softmax(scores, dim=-1).masked_fill(~visible, 0.0)
    out_pad = torch.einsum("bhgqk,bkhd->bqhgd", probs, values)  # [seqs, q, kv_heads, group, head_dim]
    out_pad = out_pad.reshape(num_seqs * max_query_len, num_q_heads, head_dim)

    # Phase 4: back to the flat token order. token t belongs to seq b with query_start_loc[b] <= t.
    tokens = torch.arange(num_tokens, device=device)
    token_seq = torch.searchsorted(query_start_loc[1:], tokens, right=True).clamp_(max=max(num_seqs - 1, 0))
    token_offset = tokens - query_start_loc[token_seq]
    out = out_pad[token_seq * max_query_len + token_offset.clamp(max=max(max_query_len - 1, 0))]
    return out.to(q.dtype)
