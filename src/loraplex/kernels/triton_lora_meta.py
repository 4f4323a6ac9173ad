"""build_lora_meta on a GPU in one launch: a counting sort of the step's tokens by slot.

One program does the whole step, in two passes over the tokens in blocks of BLOCK_T:
pass 1 counts the tokens of each key (slot, or max_loras for base tokens and out-of-range
slots), a scan turns counts into group starts, and pass 2 places each token at
`start[key] + (tokens of its key before it)`, so tokens keep their order within a group.
The torch version of the same sort is about a dozen launches; at decode sizes those
launches, not the work, were the cost. No host sync, so it can be captured in a CUDA graph.

Import this module only after TRITON_INTERPRET is settled (kernels are defined at import).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Keys (max_loras + 1) up to this many fit one program's registers; beyond, use the torch sort.
MAX_KEYS = 1024


@triton.jit
def _token_keys(slots_ptr, t, num_tokens, max_loras, keys):
    """One-hot [BLOCK_T, KEYS_P2] int32 of each token's key; padding tokens match no key."""
    valid = t < num_tokens
    s = tl.load(slots_ptr + t, mask=valid, other=-1)
    key = tl.where((s >= 0) & (s < max_loras), s, max_loras)
    return ((key[:, None] == keys[None, :]) & valid[:, None]).to(tl.int32)


@triton.jit
def _lora_meta_kernel(slots_ptr, sorted_ptr, starts_ptr, counts_ptr, active_ptr, num_active_ptr,
                      num_tokens, max_loras, BLOCK_T: tl.constexpr, KEYS_P2: tl.constexpr):
    keys = tl.arange(0, KEYS_P2)
    offs_t = tl.arange(0, BLOCK_T)
    counts = tl.zeros([KEYS_P2], dtype=tl.int32)
    for t0 in range(0, num_tokens, BLOCK_T):
        counts += tl.sum(_token_keys(slots_ptr, t0 + offs_t, num_tokens, max_loras, keys), 0)
    starts = tl.cumsum(counts, 0) - counts                                      # [KEYS_P2]

    next_free = starts
    for t0 in range(0, num_tokens, BLOCK_T):
        t = t0 + offs_t
        onehot = _token_keys(slots_ptr, t, num_tokens, max_loras, keys)        # [BLOCK_T, KEYS_P2]
        earlier = tl.cumsum(onehot, 0) - onehot     # tokens of the same key earlier in this block
        position = tl.sum(onehot * (next_free[None, :] + earlier), 1)          # [BLOCK_T]
        tl.store(sorted_ptr + position, t, mask=t < num_tokens)
        next_free += tl.sum(onehot, 0)

    is_slot = keys < max_loras
    tl.store(counts_ptr + keys, counts, mask=is_slot)
    tl.store(starts_ptr + keys, starts, mask=is_slot)
    # Active slots ascending, then -1: the two stores write disjoint entries.
    is_active = (counts > 0) & is_slot
    num_active = tl.sum(is_active.to(tl.int32), 0)
    tl.store(active_ptr + tl.cumsum(is_active.to(tl.int32), 0) - 1, keys, mask=is_active)
    tl.store(active_ptr + keys, tl.full([KEYS_P2], -1, tl.int32), mask=is_slot & (keys >= num_active))
    tl.store(num_active_ptr, num_active)


@dataclass(frozen=True)
class MetaConfig:
    block_t: int
    keys_p2: int
    num_warps: int
    num_stages: int = 3  # Triton's default: the slot loads of later blocks are prefetched


def meta_config(num_tokens: int, max_loras: int) -> MetaConfig:
    """One-hot blocks [block_t, keys_p2] of <= 8192 entries (<= 32 int32 registers a thread).

    The passes are serial loops over token blocks, so blocks are as large as that allows:
    64 tokens with 32 slots is one block per pass.
    """
    keys_p2 = max(16, triton.next_power_of_2(max_loras + 1))
    block_t = max(16, min(triton.next_power_of_2(max(num_tokens, 1)), 8192 // keys_p2))
    return MetaConfig(block_t, keys_p2, num_warps=4 if block_t * keys_p2 <= 4096 else 8)


def triton_lora_meta(token_slots: torch.Tensor, max_loras: int, *, block_tokens: int | None = None):
    """(sorted_token_ids, slot_token_starts, slot_token_counts, active_slots, num_active_slots), int32.

    Same results as the torch counting sort in lora_meta.py; out-of-range slots count as base tokens.
    """
    num_tokens = token_slots.shape[0]
    device = token_slots.device
    sorted_ids = torch.empty(num_tokens, dtype=torch.int32, device=device)
    starts = torch.empty(max_loras, dtype=torch.int32, device=device)
    counts = torch.empty(max_loras, dtype=torch.int32, device=device)
    active = torch.empty(max_loras, dtype=torch.int32, device=device)
    num_active = torch.empty((), dtype=torch.int32, device=device)
    config = meta_config(num_tokens, max_loras)
    _lora_meta_kernel[(1,)](token_slots, sorted_ids, starts, counts, active, num_active, num_tokens, max_loras,
                            BLOCK_T=block_tokens or config.block_t, KEYS_P2=config.keys_p2,
                            num_warps=config.num_warps)
    return sorted_ids, starts, counts, active, num_active
