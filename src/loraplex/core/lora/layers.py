"""LoRALinear: a model Linear plus the batched LoRA of whatever adapters this step's tokens use.

It replaces the model's fused projections after the weights are loaded. It keeps the base
layer's slice attributes (the model splits qkv_proj's output with `output_slices`), and
reads the step's LoRABatchMeta from a LoRAStepState shared by every layer, built once
per step by the model runner.

Under tensor parallelism the LoRA of a row-parallel layer (o_proj, down_proj) is added to
the base layer's partial sum before its all-reduce (`base.local`, then `base.reduce`): both
are linear in this rank's input columns, so the one all-reduce completes both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loraplex.core.layers import Linear
from loraplex.core.lora.slots import LoRAStack
from loraplex.kernels.lora import lora_linear
from loraplex.kernels.lora_meta import LoRABatchMeta


@dataclass
class LoRAStepState:
    """The current step's token grouping; None when no token of the step uses an adapter."""
    meta: LoRABatchMeta | None = None
    # CUDA: the stream each layer's LoRA shrink runs on, beside the base GEMM (kernels/lora.py).
    side_stream: torch.cuda.Stream | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: Linear, stack: LoRAStack, state: LoRAStepState):
        super().__init__()
        if tuple(base.output_slices) != tuple(stack.target.slice_sizes) or base.in_features != stack.target.in_features:
            raise ValueError(f"LoRA target {stack.target} does not match the layer {base}")
        self.base = base
        self.stack = stack
        self.state = state
        self.in_features = base.in_features
        self.output_slices = base.output_slices
        self.slice_names = base.slice_names
        self.out_features = base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        meta = self.state.meta
        if meta is None:
            return self.base(x)                    # [num_tokens, out_features]
        out = lora_linear(x, self.base.local, self.stack.lora_a, self.stack.lora_b, meta, self.stack.slice_offsets,
                          side_stream=self.state.side_stream)
        return self.base.reduce(out)
