"""Rotary position embedding with a precomputed cos/sin cache (default, linear and llama3 scaling).

Llama rotates the two halves of each head ("neox" style): for x = [x1 | x2],
rope(x) = [x1 cos - x2 sin | x2 cos + x1 sin], with one frequency per pair (i, i + head_dim/2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with the checkpoint's scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    old_len = scaling["original_max_position_embeddings"]
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None,
                 *, dtype: torch.dtype, device: torch.device, fused: bool = False):
        super().__init__()
        # fused: one Triton kernel rotating q and k in place (its head_dim must be a power of two).
        self.fused = fused and head_dim >= 2 and head_dim & (head_dim - 1) == 0
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling)
        freqs = torch.arange(max_positions).float()[:, None] * inv_freq[None, :]  # [max_pos, head_dim/2]
        # cos and sin side by side: one gather per step. [max_pos, head_dim]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache.to(device=device, dtype=dtype), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [num_tokens]; q: [num_tokens, q_heads, head_dim]; k: [num_tokens, kv_heads, head_dim]."""
        if self.fused:
            from loraplex.kernels.triton_elementwise import triton_rotary_
            triton_rotary_(positions, q, k, self.cos_sin_cache)
            return q, k
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # [num_tokens, 1, head_dim/2]
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
