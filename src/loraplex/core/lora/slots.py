"""LoRASlotStacks: the device tensors that hold every active adapter, allocated once at start-up.

Per decoder layer and fused linear layer, adapters live side by side in `max_loras` slots,
each padded to `max_lora_rank`, so one batch can mix adapters of any ranks:

    lora_a [max_loras, num_slices * max_rank, in_features]   slice i of slot s at rows
                                                              i*max_rank : i*max_rank + rank
    lora_b [max_loras, out_features, max_rank]                slice i at rows
                                                              slice_offsets[i] : slice_offsets[i+1]

These per-layer stacks are views of one tensor per target and A/B covering every layer
([num_layers, max_loras, ...]), so activating an adapter is one copy per tensor from its
packed CPU copy (adapter.py): no per-layer loop on the step path. Padding and slices an
adapter does not adapt are zero, so they add nothing. Nothing is allocated here after
start-up (on a GPU, torch stages a copy into a strided slot through a temporary of its
caching allocator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from loraplex.core.lora.adapter import LoRAAdapter
from loraplex.core.lora.targets import LoRAModelSpec, LoRATarget
from loraplex.lora_request import LoRARequest


@dataclass
class LoRAStack:
    """The slots of one fused linear layer in one decoder layer (contiguous views)."""
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
        self.dtype = dtype
        self.device = torch.device(device)
        num_layers = spec.num_layers
        # Per target name: [num_layers, max_loras, num_slices * max_rank, in_features]
        self.lora_a = {t.name: torch.zeros(num_layers, max_loras, t.num_slices * max_lora_rank, t.in_features,
                                           dtype=dtype, device=device) for t in spec.targets}
        # Per target name: [num_layers, max_loras, out_features, max_rank]
        self.lora_b = {t.name: torch.zeros(num_layers, max_loras, t.out_features, max_lora_rank,
                                           dtype=dtype, device=device) for t in spec.targets}
        # stacks[layer][target name]
        self.stacks: list[dict[str, LoRAStack]] = [
            {t.name: LoRAStack(target=t, lora_a=self.lora_a[t.name][layer], lora_b=self.lora_b[t.name][layer])
             for t in spec.targets}
            for layer in range(num_layers)]
        # Rank of the adapter in each slot (0 = empty); the kernels' metadata (and CUDA graphs)
        # read this very tensor, so it is only ever written in place.
        self.slot_ranks = torch.zeros(max_loras, dtype=torch.int32, device=device)
        self._slot_ranks_host = [0] * max_loras
        # What a slot may hold that is not zero: its targets, and rows/columns below a rank.
        # Everything else is zero, so a write only has to clear what lies inside these.
        self._dirty_targets: list[frozenset[str]] = [frozenset()] * max_loras
        self._dirty_rank = [0] * max_loras
        # Called after each slot write (slot, the adapter's request) and clear (slot, None):
        # rank 0 of a tensor-parallel group mirrors its slots to the other ranks with it.
        self.on_change: Callable[[int, LoRARequest | None], None] | None = None

    def stack(self, layer: int, target: str) -> LoRAStack:
        return self.stacks[layer][target]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.lora_a.values(), *self.lora_b.values()))

    def write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy `adapter` into `slot` of every layer, leaving nothing of the previous occupant.

        Per target one copy for A and one for B (asynchronous from pinned memory on a GPU);
        zero_() only for what the previous occupant left beyond this adapter's rank or in
        targets this adapter does not adapt."""
        max_rank, rank = self.max_lora_rank, adapter.rank
        dirty_targets, dirty_rank = self._dirty_targets[slot], self._dirty_rank[slot]
        # Should a copy fail half-way, the slot may hold both adapters' rows.
        self._dirty_targets[slot] = dirty_targets | frozenset(adapter.targets)
        self._dirty_rank[slot] = max(dirty_rank, rank)
        for target in self.spec.targets:
            slot_a = self.lora_a[target.name][:, slot]    # [num_layers, num_slices * max_rank, in_features]
            slot_b = self.lora_b[target.name][:, slot]    # [num_layers, out_features, max_rank]
            packed = adapter.targets.get(target.name)
            if packed is None:
                if target.name in dirty_targets:
                    slot_a.zero_()
                    slot_b.zero_()
                continue
            # [num_layers, num_slices, max_rank, in_features]: the packed A has `rank` rows per slice
            slot_a_slices = slot_a.unflatten(1, (target.num_slices, max_rank))
            slot_a_slices[:, :, :rank].copy_(packed.lora_a.unflatten(1, (target.num_slices, rank)),
                                             non_blocking=True)
            slot_b[:, :, :rank].copy_(packed.lora_b, non_blocking=True)
            if target.name in dirty_targets and dirty_rank > rank:
                slot_a_slices[:, :, rank:dirty_rank].zero_()
                slot_b[:, :, rank:dirty_rank].zero_()
        adapter.record_use()   # the copies may still be queued: its memory must outlive them
        self._dirty_targets[slot], self._dirty_rank[slot] = frozenset(adapter.targets), rank
        self._set_rank(slot, rank)
        if self.on_change is not None:
            self.on_change(slot, adapter.request)

    def clear_slot(self, slot: int) -> None:
        for tensor in (*self.lora_a.values(), *self.lora_b.values()):
            tensor[:, slot].zero_()
        self._dirty_targets[slot], self._dirty_rank[slot] = frozenset(), 0
        self._set_rank(slot, 0)
        if self.on_change is not None:
            self.on_change(slot, None)

    def slot_rank(self, slot: int) -> int:
        return self._slot_ranks_host[slot]

    def _set_rank(self, slot: int, rank: int) -> None:
        self._slot_ranks_host[slot] = rank
        # fill_ passes the rank to a kernel; `slot_ranks[slot] = rank` would copy it from
        # pageable memory, which waits for the stream (the step in flight and the slot's copies).
        self.slot_ranks[slot:slot + 1].fill_(rank)
