"""build_lora_meta: tokens grouped by slot, base tokens excluded, bad slot maps rejected."""

import pytest
import torch

from loraplex.errors import KernelArgumentError
from loraplex.kernels.lora_meta import build_lora_meta, check_token_slots, lora_groups


def _ranks(*values):
    return torch.tensor(values, dtype=torch.int32)


def test_groups_tokens_by_slot_in_order_with_base_tokens_last():
    slots = torch.tensor([2, -1, 0, 2, -1, 2, 0, 3], dtype=torch.int32)
    meta = build_lora_meta(slots, _ranks(4, 8, 2, 16), max_loras=4)
    assert meta.num_tokens == 8 and meta.max_loras == 4
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 5, 7, 1, 4]
    assert meta.slot_token_counts.tolist() == [2, 0, 3, 1]
    assert meta.slot_token_starts.tolist() == [0, 2, 2, 5]
    assert meta.active_slots.tolist() == [0, 2, 3, -1]
    assert int(meta.num_active_slots) == 3
    assert lora_groups(meta) == ((0, 0, 2), (2, 2, 3), (3, 5, 1))
    assert all(t.dtype == torch.int32 for t in (meta.sorted_token_ids, meta.slot_token_starts,
                                                  meta.slot_token_counts, meta.active_slots))


def test_groups_recomputed_without_host_copy_match():
    slots = torch.tensor([1, 1, -1, 0], dtype=torch.int32)
    meta = build_lora_meta(slots, _ranks(4, 4), max_loras=2)
    from dataclasses import replace
    assert lora_groups(replace(meta, host_groups=None)) == lora_groups(meta) == ((0, 0, 1), (1, 1, 2))


def test_slot_ranks_are_kept_by_reference():
    ranks = _ranks(4, 0)
    meta = build_lora_meta(torch.tensor([0, 1], dtype=torch.int32), ranks, max_loras=2)
    ranks[1] = 8  # the manager loads an adapter into slot 1 in place
    assert meta.slot_ranks.tolist() == [4, 8]


@pytest.mark.parametrize("bad_slot", [-2, 3, 100])
def test_out_of_range_slot_is_rejected(bad_slot):
    slots = torch.tensor([0, bad_slot, 1], dtype=torch.int32)
    with pytest.raises(KernelArgumentError, match=rf"slot {bad_slot}.*\[0, 3\)"):
        build_lora_meta(slots, _ranks(1, 1, 1), max_loras=3)
    with pytest.raises(KernelArgumentError, match="max_loras=3"):
        check_token_slots(slots, 3)


@pytest.mark.parametrize("slots,ranks,max_loras,message", [
    (torch.tensor([0, 1]), _ranks(1, 1), 2, "1-D int32"),
    (torch.tensor([[0, 1]], dtype=torch.int32), _ranks(1, 1), 2, "1-D int32"),
    (torch.tensor([0, 1], dtype=torch.int32), _ranks(1, 1, 1), 2, r"shape \[max_loras\]=\[2\]"),
    (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1, 1]), 2, "int32"),
    (torch.tensor([0, 1], dtype=torch.int32), _ranks(1, -1), 2, "slot_ranks must be >= 0"),
    (torch.tensor([0], dtype=torch.int32), _ranks(), 0, "max_loras must be a positive int"),
    ([0, 1], _ranks(1, 1), 2, "must be a torch.Tensor"),
])
def test_bad_arguments_are_explained(slots, ranks, max_loras, message):
    with pytest.raises(KernelArgumentError, match=message):
        build_lora_meta(slots, ranks, max_loras)


@pytest.mark.parametrize("num_tokens,max_loras,block_tokens", [(0, 4, None), (1, 1, None), (37, 5, None),
                                                              (300, 40, None), (70, 3, 16)])
def test_triton_counting_sort_matches_torch(num_tokens, max_loras, block_tokens):
    # The one-launch GPU sort (run here by Triton's interpreter) against the torch version;
    # 70 tokens in blocks of 16 crosses block boundaries within groups.
    from loraplex.kernels import triton_lora_meta
    gen = torch.Generator().manual_seed(num_tokens + max_loras)
    slots = torch.randint(-1, max_loras, (num_tokens,), generator=gen, dtype=torch.int32)
    ranks = torch.randint(0, 9, (max_loras,), generator=gen, dtype=torch.int32)
    expected = build_lora_meta(slots, ranks, max_loras)
    if block_tokens is not None:
        slots = slots.clone()
        slots[::7] = max_loras + 3  # out of range: a GPU treats it as "no LoRA"
        expected = build_lora_meta(torch.where(slots >= max_loras, -1, slots), ranks, max_loras)
    got = triton_lora_meta.triton_lora_meta(slots, max_loras, block_tokens=block_tokens)
    names = ("sorted_token_ids", "slot_token_starts", "slot_token_counts", "active_slots", "num_active_slots")
    for name, value in zip(names, got):
        assert value.dtype == torch.int32
        assert value.tolist() == getattr(expected, name).tolist(), name


def test_max_active_slots_defaults_to_max_loras_and_is_kept():
    slots = torch.tensor([2, -1, 0, 2], dtype=torch.int32)
    assert build_lora_meta(slots, _ranks(4, 8, 2, 16), max_loras=4).max_active_slots == 4
    assert build_lora_meta(slots, _ranks(4, 8, 2, 16), max_loras=4, max_active_slots=2).max_active_slots == 2


@pytest.mark.parametrize("bound,message", [
    (0, r"max_active_slots must be an int in \[1, max_loras=4\]"),
    (5, r"max_active_slots must be an int in \[1, max_loras=4\]"),
    (True, "max_active_slots must be an int"),
    (2.0, "max_active_slots must be an int"),
    (1, "token_slots uses 2 distinct slots but max_active_slots=1"),   # below the slot map's count
])
def test_bad_max_active_slots_is_explained(bound, message):
    slots = torch.tensor([2, -1, 0, 2], dtype=torch.int32)
    with pytest.raises(KernelArgumentError, match=message):
        build_lora_meta(slots, _ranks(4, 8, 2, 16), max_loras=4, max_active_slots=bound)
