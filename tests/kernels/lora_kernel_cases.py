"""Random multi-LoRA test cases and the naive per-token definition they are checked against."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.kernels.lora_meta import LoRABatchMeta, build_lora_meta


@dataclass
class LoRACase:
    x: torch.Tensor            # [num_tokens, in_features]
    out: torch.Tensor          # [num_tokens, out_total], the base layer's output before LoRA
    lora_a: torch.Tensor       # [max_loras, num_slices * max_rank, in_features]
    lora_b: torch.Tensor       # [max_loras, out_total, max_rank]
    token_slots: torch.Tensor  # [num_tokens] int32
    slot_ranks: torch.Tensor   # [max_loras] int32
    slice_offsets: tuple[int, ...]
    meta: LoRABatchMeta

    @property
    def num_slices(self) -> int:
        return len(self.slice_offsets) - 1


def make_case(*, num_tokens: int, in_features: int, slice_widths: tuple[int, ...], max_loras: int,
              max_rank: int, slot_ranks: list[int], dtype=torch.float32, seed: int = 0,
              base_every: int = 4, padding: str = "zero") -> LoRACase:
    """Tokens of each slot scattered through the batch; every `base_every`-th token uses no LoRA.

    padding="garbage" fills rows/columns past each slot's rank with random values, which
    the ops must ignore (the manager zeroes them, but the rank is what bounds the work).
    """
    gen = torch.Generator().manual_seed(seed)
    num_slices = len(slice_widths)
    out_total = sum(slice_widths)
    offsets = tuple(int(sum(slice_widths[:i])) for i in range(num_slices + 1))
    used = [s for s in range(max_loras) if slot_ranks[s] > 0]
    # Round-robin over the used slots, then shuffled: every slot's tokens are scattered.
    slots = torch.tensor([used[i % len(used)] for i in range(num_tokens)], dtype=torch.int32)
    slots = slots[torch.randperm(num_tokens, generator=gen)]
    if base_every:
        slots[::base_every] = -1
    # Scaled so the LoRA delta and the base output have similar magnitudes.
    x = torch.randn(num_tokens, in_features, generator=gen)
    lora_a = torch.randn(max_loras, num_slices * max_rank, in_features, generator=gen) / in_features ** 0.5
    lora_b = torch.randn(max_loras, out_total, max_rank, generator=gen) / max_rank ** 0.5
    if padding == "zero":
        for s, rank in enumerate(slot_ranks):
            lora_a.view(max_loras, num_slices, max_rank, in_features)[s, :, rank:] = 0
            lora_b[s, :, rank:] = 0
    out = torch.randn(num_tokens, out_total, generator=gen)
    ranks = torch.tensor(slot_ranks, dtype=torch.int32)
    x, out, lora_a, lora_b = (t.to(dtype) for t in (x, out, lora_a, lora_b))
    return LoRACase(x, out, lora_a, lora_b, slots, ranks, offsets, build_lora_meta(slots, ranks, max_loras))


def naive_lora(case: LoRACase) -> tuple[torch.Tensor, torch.Tensor]:
    """(shrink buffer, out + LoRA) in float64, token by token, straight from the definition."""
    x, lora_a, lora_b = case.x.double(), case.lora_a.double(), case.lora_b.double()
    max_rank = lora_b.shape[2]
    out = case.out.double().clone()
    buf = torch.zeros(x.shape[0], case.num_slices * max_rank, dtype=torch.float64)
    for t, slot in enumerate(case.token_slots.tolist()):
        if slot < 0:
            continue
        rank = int(case.slot_ranks[slot])
        for i, (lo, hi) in enumerate(zip(case.slice_offsets, case.slice_offsets[1:])):
            a = lora_a[slot, i * max_rank: i * max_rank + rank]   # [rank, in_features]
            b = lora_b[slot, lo:hi, :rank]                         # [width, rank]
            h = x[t] @ a.T                                         # [rank]
            buf[t, i * max_rank: i * max_rank + rank] = h
            out[t, lo:hi] += h @ b.T
    return buf, out


def rel_err(actual: torch.Tensor, expected: torch.Tensor, base: torch.Tensor) -> float:
    """Error relative to the size of the LoRA contribution (expected - base)."""
    delta = (expected.double() - base.double()).norm()
    return float((actual.double() - expected.double()).norm() / delta)


def assign_tokens(case: LoRACase, tokens: list[int], slot: int) -> LoRACase:
    """Move `tokens` to `slot` (e.g. an empty slot of rank 0) and rebuild the metadata."""
    case.token_slots[tokens] = slot
    case.meta = build_lora_meta(case.token_slots, case.slot_ranks, case.slot_ranks.shape[0])
    return case
