"""The paged KV cache: its layout, its size, and the memory budget that sets it.

Layout, per layer:  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
(the layout of kernels/paged_attention.py). All layers live in one allocation
[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] so the cache is one tensor
to size, zero and free; `layers[i]` are views into it.
"""

from __future__ import annotations

import logging

import torch

from loraplex.errors import ConfigError

logger = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 *, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                   dtype=dtype, device=device)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [(s[0], s[1]) for s in self.storage]

    @property
    def num_bytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of `block_size` tokens in every layer."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def cpu_kv_cache_budget(kv_cache_bytes: int | None, *, max_num_seqs: int, max_model_len: int,
                        block_bytes: int, block_size: int) -> int:
    """CPU budget: `kv_cache_bytes` when set, else the smaller of 1 GiB and what
    max_num_seqs full-length sequences need (no point reserving more than can be used)."""
    if kv_cache_bytes is not None:
        return kv_cache_bytes
    blocks_per_seq = -(-max_model_len // block_size)
    return min(CPU_DEFAULT_KV_CACHE_BYTES, max_num_seqs * blocks_per_seq * block_bytes)


def cuda_kv_cache_budget(device: torch.device, gpu_memory_utilization: float, activation_peak_bytes: int) -> int:
    """GPU budget: the engine's share of device memory minus what is already in use (weights,
    CUDA context, other processes) minus the activation peak of a max-size forward pass."""
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    return int(total * gpu_memory_utilization) - in_use - activation_peak_bytes


def num_blocks_for_budget(budget_bytes: int, block_bytes: int, *, max_model_len: int, block_size: int) -> int:
    """Blocks that fit in `budget_bytes`; at least one max_model_len sequence must fit."""
    num_blocks = max(budget_bytes, 0) // block_bytes
    needed = -(-max_model_len // block_size)
    if num_blocks < needed:
        raise ConfigError(
            f"the KV cache budget ({budget_bytes / 2**20:.1f} MiB, {num_blocks} blocks of {block_size} tokens) "
            f"cannot hold one sequence of max_model_len={max_model_len} tokens ({needed} blocks); "
            "raise kv_cache_bytes / gpu_memory_utilization or lower max_model_len.")
    return num_blocks
