"""The attention backend interface and the per-step metadata every layer shares.

The model runner builds one AttentionMetadata per step; every layer hands it, with its
own q/k/v and KV-cache tensors, to the backend. A backend (the torch reference here,
Triton kernels later) only has to implement `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.paged_attention import paged_attention, write_kv_cache


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache. Device tensors, built once per step.

    Tokens are laid out flat, sequence after sequence (see kernels/paged_attention.py).
    """
    slot_mapping: torch.Tensor     # [num_tokens] int64, cache slot of each new token; -1 = padding
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor         # [num_seqs] int32, cached + new tokens per sequence
    block_tables: torch.Tensor     # [num_seqs, max_blocks] int32, padded with 0
    logits_indices: torch.Tensor   # [num_seqs] int64, flat index of each sequence's last new token
    # Host-side bounds (known without reading the device): padding sizes for kernels.
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool           # every sequence computes exactly one token
    # How many sequences at the start of the batch compute one token each (running decodes come
    # first): a backend may give them to its decode kernel. 0 when not known.
    num_leading_decodes: int = 0

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class AttentionBackend:
    """Writes the new K/V into the cache, then attends over the cache."""

    name = "abstract"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, metadata: AttentionMetadata,
                *, scale: float, sliding_window: int | None, out: torch.Tensor | None = None) -> torch.Tensor:
        """q: [num_tokens, q_heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim];
        k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim] -> [num_tokens, q_heads, head_dim],
        written into `out` (q's shape and dtype) when given."""
        raise NotImplementedError


class TorchAttentionBackend(AttentionBackend):
    """Pure-torch paged attention: the CPU path and the reference for other backends."""

    name = "torch"

    def forward(self, q, k, v, k_cache, v_cache, metadata, *, scale, sliding_window, out=None):
        write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        result = paged_attention(q, k_cache, v_cache, metadata.block_tables, metadata.query_start_loc,
                                 metadata.seq_lens, scale, max_query_len=metadata.max_query_len,
                                 max_seq_len=metadata.max_seq_len, sliding_window=sliding_window)
        return result if out is None else out.copy_(result)


def get_attention_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """The backend for `device`: Triton kernels on CUDA, the torch reference elsewhere.
    `name` ("auto", "torch" or "triton") forces one; "triton" off CUDA needs TRITON_INTERPRET=1."""
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    from loraplex.core.triton_attention_backend import TritonAttentionBackend
    return TritonAttentionBackend()
