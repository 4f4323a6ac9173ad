"""The building blocks of the model: linear layers with named output slices, RMSNorm, SiLU-and-mul.

RMSNorm and silu_and_mul are written in torch (the CPU path and the reference); with
`fused=True` (the CUDA path) they run as one Triton kernel each (kernels/triton_elementwise.py).

Parameters are allocated uninitialised on the target device in the target dtype: the
loader fills every one of them from the checkpoint, so random init would be wasted work.

Linear layers are where multi-LoRA hooks in: a LoRA wrapper replaces `module.forward` (or
the module) and reads `in_features`, `output_slices` and `slice_names` to know which
adapter matrices (e.g. q/k/v) feed which part of the fused output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ W.T (+ b), W: [out_features, in_features].

    A fused projection (qkv_proj, gate_up_proj) concatenates several checkpoint matrices
    along the output dim; `output_slices[i]` is the width of the part named `slice_names[i]`.
    """

    def __init__(self, in_features: int, output_slices: tuple[int, ...], slice_names: tuple[str, ...],
                 *, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.in_features = in_features
        self.output_slices = tuple(output_slices)
        self.slice_names = tuple(slice_names)
        self.out_features = sum(output_slices)
        self.weight = _empty_param(self.out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty_param(self.out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, in_features] -> [num_tokens, out_features]
        return F.linear(x, self.weight, self.bias)

    def slice_offset(self, name: str) -> tuple[int, int]:
        """(start, width) of the output part `name` along dim 0 of the weight."""
        index = self.slice_names.index(name)
        return sum(self.output_slices[:index]), self.output_slices[index]

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={w}" for n, w in zip(self.slice_names, self.output_slices))
        return f"in_features={self.in_features}, {parts}, bias={self.bias is not None}"


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.weight = _empty_param(vocab_size, hidden_size, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)  # [num_tokens] -> [num_tokens, hidden]


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (the order matters in bf16).

    forward(x, residual) is the decoder's "add, then norm": residual <- x + residual (in
    place when fused), returns (norm(residual), residual)."""

    def __init__(self, hidden_size: int, eps: float, *, dtype: torch.dtype, device: torch.device,
                 fused: bool = False):
        super().__init__()
        self.eps = eps
        self.fused = fused
        self.weight = _empty_param(hidden_size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            from loraplex.kernels.triton_elementwise import triton_rms_norm
            out = triton_rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            residual = x + residual
            x = residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(x.dtype)
        return out if residual is None else (out, residual)


def silu_and_mul(gate_up: torch.Tensor, *, fused: bool = False) -> torch.Tensor:
    """[num_tokens, 2 * intermediate] (gate | up) -> [num_tokens, intermediate]."""
    if fused:
        from loraplex.kernels.triton_elementwise import triton_silu_and_mul
        return triton_silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
