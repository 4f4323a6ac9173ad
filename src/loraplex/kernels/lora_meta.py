"""LoRABatchMeta: one step's token -> adapter-slot grouping, built once, read by every layer.

The LoRA kernels work on tokens grouped by slot: slot s's tokens are a contiguous
run `sorted_token_ids[slot_token_starts[s] : slot_token_starts[s] + slot_token_counts[s]]`.
Groups are indexed by slot itself, so every per-slot array has the static length
`max_loras` and a kernel grid never depends on which adapters a step uses (which
keeps launches capturable in CUDA graphs). Base-model tokens (slot -1) are sorted
after all groups and belong to none, so no kernel program ever touches them.

`max_active_slots` is a host-side upper bound on the step's distinct slots, which the
Triton launchers size their grids with (fewer adapters, fewer row tiles). It is checked
against the slot map only when `token_slots` is on the CPU; on a GPU it is trusted, and
a bound below the real count would make the kernels skip some groups' tiles: the caller
(the engine's runner, or a CUDA graph variant it picks on the host) guarantees it.

Building the metadata is a counting sort with no host sync, so it can run inside a CUDA
graph: one Triton kernel on CUDA (triton_lora_meta.py), elementwise ops and scans elsewhere. The one check that needs the values
(every slot in [-1, max_loras)) is done only when `token_slots` lives on the CPU,
where it is free; the runner builds the slot map on the host and calls
`check_token_slots` there. On an accelerator an out-of-range slot is treated as
"no LoRA" rather than read out of bounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.errors import KernelArgumentError


@dataclass(frozen=True, eq=False)  # fields are tensors: compare by identity
class LoRABatchMeta:
    num_tokens: int
    max_loras: int
    token_slots: torch.Tensor        # [num_tokens] int32, -1 = base model
    slot_ranks: torch.Tensor         # [max_loras] int32, rank of each slot's adapter (0 = empty slot)
    sorted_token_ids: torch.Tensor   # [num_tokens] int32, token indices grouped by slot, base tokens last
    slot_token_starts: torch.Tensor  # [max_loras] int32, where slot s's group starts in sorted_token_ids
    slot_token_counts: torch.Tensor  # [max_loras] int32, tokens of slot s this step
    active_slots: torch.Tensor       # [max_loras] int32, slots with >= 1 token ascending, then -1
    num_active_slots: torch.Tensor   # [] int32, on the device (no sync to read it there)
    # (slot, start, count) of each active group, known without a sync when built on the CPU;
    # None on accelerators (the torch reference then computes it with one sync).
    host_groups: tuple[tuple[int, int, int], ...] | None = None
    # Upper bound on the distinct slots with tokens (a host int, so grids can depend on it);
    # None means max_loras.
    max_active_slots: int | None = None

    def __post_init__(self) -> None:
        if self.max_active_slots is None:
            object.__setattr__(self, "max_active_slots", self.max_loras)

    @property
    def device(self) -> torch.device:
        return self.sorted_token_ids.device


def check_token_slots(token_slots: torch.Tensor, max_loras: int) -> None:
    """Raise KernelArgumentError unless every slot is -1 or in [0, max_loras). Syncs on GPU."""
    _check_token_slots_layout(token_slots)
    if token_slots.numel() == 0:
        return
    low, high = int(token_slots.min()), int(token_slots.max())
    if low < -1 or high >= max_loras:
        bad = low if low < -1 else high
        raise KernelArgumentError(
            f"token_slots holds slot {bad}, but slots must be -1 (base model) or in "
            f"[0, {max_loras}) for max_loras={max_loras}; map each token to the slot its "
            f"adapter was loaded into")


def build_lora_meta(token_slots: torch.Tensor, slot_ranks: torch.Tensor, max_loras: int,
                    max_active_slots: int | None = None) -> LoRABatchMeta:
    """Group one step's tokens by LoRA slot. Call once per step, before the forward.

    token_slots: [num_tokens] int32 slot per token (-1 = no LoRA).
    slot_ranks:  [max_loras] int32 rank of the adapter in each slot (0 for an empty slot);
                 kept by reference, so a manager updating it in place is seen by kernels.
    max_active_slots: at least the number of distinct slots >= 0 in token_slots, at most
                 max_loras (None = max_loras). Checked on the CPU only; see the module docstring.
    """
    _check_token_slots_layout(token_slots)
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras < 1:
        raise KernelArgumentError(f"max_loras must be a positive int, got {max_loras!r}")
    if max_active_slots is None:
        max_active_slots = max_loras
    if (isinstance(max_active_slots, bool) or not isinstance(max_active_slots, int)
            or not 1 <= max_active_slots <= max_loras):
        raise KernelArgumentError(
            f"max_active_slots must be an int in [1, max_loras={max_loras}] (an upper bound on the "
            f"step's distinct adapter slots), got {max_active_slots!r}; pass None for max_loras")
    if slot_ranks.dtype != torch.int32 or tuple(slot_ranks.shape) != (max_loras,):
        raise KernelArgumentError(
            f"slot_ranks must be an int32 tensor of shape [max_loras]=[{max_loras}], got "
            f"{slot_ranks.dtype} {list(slot_ranks.shape)}")
    if slot_ranks.device != token_slots.device:
        raise KernelArgumentError(
            f"token_slots ({token_slots.device}) and slot_ranks ({slot_ranks.device}) must be "
            f"on the same device")
    on_host = token_slots.device.type == "cpu"
    if on_host:
        check_token_slots(token_slots, max_loras)
        if slot_ranks.numel() and int(slot_ranks.min()) < 0:
            raise KernelArgumentError(f"slot_ranks must be >= 0, got {slot_ranks.tolist()}")

    num_tokens = token_slots.shape[0]
    device = token_slots.device
    if device.type == "cuda" and max_loras < _max_triton_keys():
        from loraplex.kernels.triton_lora_meta import triton_lora_meta
        order, starts, counts, active_slots, num_active = triton_lora_meta(token_slots.contiguous(), max_loras)
        return LoRABatchMeta(num_tokens=num_tokens, max_loras=max_loras, token_slots=token_slots,
                             slot_ranks=slot_ranks, sorted_token_ids=order, slot_token_starts=starts,
                             slot_token_counts=counts, active_slots=active_slots, num_active_slots=num_active,
                             max_active_slots=max_active_slots)
    slots = token_slots.long()
    # Base tokens (and, on a device, out-of-range slots) get key max_loras: their group comes last.
    is_lora = (slots >= 0) & (slots < max_loras)
    keys = torch.where(is_lora, slots, torch.full_like(slots, max_loras))             # [T]
    # A counting sort made of elementwise ops and scans (no sort, no sync, graph-safe, stable):
    # running[t, k] = tokens of key k among tokens 0..t.
    key_ids = torch.arange(max_loras + 1, device=device)
    running = torch.cumsum((keys[:, None] == key_ids).to(torch.int32), 0, dtype=torch.int32)  # [T, L+1]
    if num_tokens:
        all_counts = running[-1].long()                                               # [L+1]
        rank_in_group = running.gather(1, keys[:, None]).squeeze(1).long() - 1        # [T]
    else:
        all_counts = torch.zeros(max_loras + 1, dtype=torch.int64, device=device)
        rank_in_group = keys
    all_starts = torch.cumsum(all_counts, 0) - all_counts
    token_ids = torch.arange(num_tokens, device=device)
    order = torch.empty_like(token_ids).scatter_(0, all_starts[keys] + rank_in_group, token_ids)
    counts, starts = all_counts[:max_loras], all_starts[:max_loras]
    # Active slots first (ascending), then -1; inactive slots write to a dropped extra entry.
    is_active = counts > 0
    position = torch.where(is_active, torch.cumsum(is_active, 0) - 1, max_loras)
    active_slots = torch.full((max_loras + 1,), -1, dtype=torch.int64, device=device)
    active_slots = active_slots.scatter_(0, position, key_ids[:max_loras])[:max_loras]

    host_groups = None
    if on_host:
        host_groups = tuple((s, int(starts[s]), int(counts[s])) for s in is_active.nonzero().flatten().tolist())
        if len(host_groups) > max_active_slots:
            raise KernelArgumentError(
                f"token_slots uses {len(host_groups)} distinct slots but max_active_slots={max_active_slots}; "
                f"pass a bound of at least the step's distinct slots >= 0 (or None for max_loras)")
    return LoRABatchMeta(
        num_tokens=num_tokens,
        max_loras=max_loras,
        token_slots=token_slots,
        slot_ranks=slot_ranks,
        sorted_token_ids=order.to(torch.int32),
        slot_token_starts=starts.to(torch.int32),
        slot_token_counts=counts.to(torch.int32),
        active_slots=active_slots.to(torch.int32),
        num_active_slots=is_active.sum().to(torch.int32),
        host_groups=host_groups,
        max_active_slots=max_active_slots,
    )


def _max_triton_keys() -> int:
    from loraplex.kernels.triton_lora_meta import MAX_KEYS
    return MAX_KEYS


def lora_groups(meta: LoRABatchMeta) -> tuple[tuple[int, int, int], ...]:
    """(slot, start, count) of every active group; one host sync when built on a device."""
    if meta.host_groups is not None:
        return meta.host_groups
    counts = meta.slot_token_counts.tolist()
    starts = meta.slot_token_starts.tolist()
    return tuple((s, starts[s], c) for s, c in enumerate(counts) if c > 0)


def _check_token_slots_layout(token_slots: torch.Tensor) -> None:
    if not isinstance(token_slots, torch.Tensor):
        raise KernelArgumentError(f"token_slots must be a torch.Tensor, got {type(token_slots).__name__}")
    if token_slots.dtype != torch.int32 or token_slots.dim() != 1:
        raise KernelArgumentError(
            f"token_slots must be a 1-D int32 tensor [num_tokens], got {token_slots.dtype} "
            f"of shape {list(token_slots.shape)}")
