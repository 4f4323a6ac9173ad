"""The building blocks of the model: linear layers with named output slices, RMSNorm, SiLU-and-mul.

RMSNorm and silu_and_mul are written in torch (the CPU path and the reference); with
`fused=True` (the CUDA path) they run as one Triton kernel each (kernels/triton_elementwise.py).

Parameters are allocated uninitialised on the target device in the target dtype: the
loader fills every one of them from the checkpoint, so random init would be wasted work.

Linear layers are where multi-LoRA hooks in: a LoRA wrapper replaces `module.forward` (or
the module) and reads `in_features`, `output_slices` and `slice_names` to know which
adapter matrices (e.g. q/k/v) feed which part of the fused output.

Under tensor parallelism (core/parallel/layout.py) a layer holds one rank's shard: its
sizes are the shard's, `in_shard` / `out_shards` say which part of the checkpoint tensors
it holds, and a row-parallel layer's `forward` is `reduce(local(x))`: the partial product,
then the all-reduce over ranks (and the bias, once). A LoRA wrapper adds its own partial
product between the two, so one all-reduce carries both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.parallel.layout import Shard


def _empty_param(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x @ W.T (+ b), W: [out_features, in_features].

    A fused projection (qkv_proj, gate_up_proj) concatenates several checkpoint matrices
    along the output dim; `output_slices[i]` is the width of the part named `slice_names[i]`.
    `in_shard` and `out_shards[i]` place this rank's weight in the checkpoint's matrices
    (whole without tensor parallelism); `tp` is the group a row-parallel layer reduces over.
    """

    def __init__(self, in_shard: Shard, out_shards: tuple[Shard, ...], slice_names: tuple[str, ...],
                 *, bias: bool, dtype: torch.dtype, device: torch.device, tp=None):
        super().__init__()
        self.in_shard = in_shard
        self.out_shards = tuple(out_shards)
        self.in_features = in_shard.size
        self.output_slices = tuple(s.size for s in self.out_shards)
        self.slice_names = tuple(slice_names)
        self.out_features = sum(self.output_slices)
        # Row-parallel: this rank holds some input columns, so its product is a partial sum.
        self.tp = tp if tp is not None and not in_shard.is_whole else None
        self.weight = _empty_param(self.out_features, self.in_features, dtype=dtype, device=device)
        self.bias = _empty_param(self.out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, in_features] -> [num_tokens, out_features]
        if self.tp is None:   # the common case, without two more Python calls per layer on eager steps
            return F.linear(x, self.weight, self.bias)
        return self.reduce(self.local(x))

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's product: its output columns, or (row-parallel) its partial sum, bias not added."""
        return F.linear(x, self.weight, self.bias if self.tp is None else None)

    def reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Row-parallel: sum the partial products over the ranks, then add the bias. Else `out` itself."""
        if self.tp is None:
            return out
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out.add_(self.bias)

    def slice_offset(self, name: str) -> tuple[int, int]:
        """(start, width) of the output part `name` along dim 0 of the weight."""
        index = self.slice_names.index(name)
        return sum(self.output_slices[:index]), self.output_slices[index]

    def extra_repr(self) -> str:
        parts = ", ".join(f"{n}={w}" for n, w in zip(self.slice_names, self.output_slices))
        return f"in_features={self.in_features}, {parts}, bias={self.bias is not None}"


class Embedding(nn.Module):
    """Token embeddings (also the lm_head). Vocab-parallel under tensor parallelism: this rank
    holds rows `vocab.start : vocab.start + vocab.size`; a lookup of a token another rank holds
    gives zeros here, and the all-reduce over ranks assembles every row."""

    def __init__(self, vocab: Shard, hidden_size: int, *, dtype: torch.dtype, device: torch.device, tp=None):
        super().__init__()
        self.vocab = vocab
        self.tp = tp if tp is not None and not vocab.is_whole else None
        self.weight = _empty_param(vocab.size, hidden_size, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp is None:
            return F.embedding(token_ids, self.weight)  # [num_tokens] -> [num_tokens, hidden]
        local = token_ids - self.vocab.start
        mine = (local >= 0) & (local < self.vocab.size)                              # [num_tokens]
        hidden = F.embedding(torch.where(mine, local, 0), self.weight)               # [num_tokens, hidden]
        return self.tp.all_reduce(hidden.mul_(mine.unsqueeze(1).to(hidden.dtype)))


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
