"""LoRASlotStacks: the device tensors that hold every active adapter, allocated once at start-up.

Per decoder layer and fused linear layer, adapters live side by side in `max_loras` slots,
each padded to `max_lora_rank`, so one batch can mix adapters of any ranks:

    lora_a [max_loras, num_slices * max_rank, in_features]   slice i of slot s at rows
                                                              i*max_rank : i*max_rank + rank
    lora_b [max_loras, out_features, max_rank]                slice i at columns
                                                              slice_offsets[i] : slice_offsets[i+1]

Padding and slices an adapter does not adapt stay zero, so they add nothing. Activating an
adapter is only a copy into its slot; nothing is allocated after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.core.lora.adapter import LoRAAdapter
from loraplex.core.lora.targets import LoRAModelSpec, LoRATarget


@dataclass
class LoRAStack:
    """The slots of one fused linear layer in one decoder layer."""
    target: LoRATarget
    lora_a: torch.Tensor          # [max_loras, num_slices * max_rank, in_features]
    lora_b: torch.Tensor          # [max_loras, out_features, max_rank]

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        return self.target.slice_offsets


class LoRASlotStacks:
    def __init__(self, spec: LoRAModelSpec, *, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.spec = spec
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.device = torch.device(device)
        # stacks[layer][target name]
        self.stacks: list[dict[str, LoRAStack]] = [
            {t.name: LoRAStack(
                target=t,
                lora_a=torch.zeros(max_loras, t.num_slices * max_lora_rank, t.in_features, dtype=dtype, device=device),
                lora_b=torch.zeros(max_loras, t.out_features, max_lora_rank, dtype=dtype, device=device))
             for t in spec.targets}
            for _ in range(spec.num_layers)]
        # Rank of the adapter in each slot (0 = empty); the kernels' metadata reads it.
        self.slot_ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self._slot_ranks_host = [0] * max_loras

    def stack(self, layer: int, target: str) -> LoRAStack:
        return self.stacks[layer][target]

    @property
    def num_bytes(self) -> int:
        return sum(s.lora_a.numel() * s.lora_a.element_size() + s.lora_b.numel() * s.lora_b.element_size()
                   for layer in self.stacks for s in layer.values())

    def write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy `adapter` into `slot`, zeroing whatever the previous occupant left there."""
        r_max = self.max_lora_rank
        for layer, stacks in enumerate(self.stacks):
            for name, stack in stacks.items():
                stack.lora_a[slot].zero_()
                stack.lora_b[slot].zero_()
                weights = adapter.weights.get((layer, name))
                if weights is None:
                    continue
                offsets = stack.slice_offsets
                for i, (a, b) in enumerate(zip(weights.lora_a, weights.lora_b)):
                    if a is None:
                        continue
                    rank = a.shape[0]
                    # a: [rank, in_features] -> rows of slice i; b: [out_i, rank] -> columns of slice i
                    stack.lora_a[slot, i * r_max: i * r_max + rank].copy_(a, non_blocking=True)
                    stack.lora_b[slot, offsets[i]:offsets[i + 1], :rank].copy_(b, non_blocking=True)
        self._set_rank(slot, adapter.rank)

    def clear_slot(self, slot: int) -> None:
        for stacks in self.stacks:
            for stack in stacks.values():
                stack.lora_a[slot].zero_()
                stack.lora_b[slot].zero_()
        self._set_rank(slot, 0)

    def slot_rank(self, slot: int) -> int:
        return self._slot_ranks_host[slot]

    def _set_rank(self, slot: int, rank: int) -> None:
        self._slot_ranks_host[slot] = rank
        self.slot_ranks[slot] = rank
