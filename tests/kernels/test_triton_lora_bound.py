"""The LoRA kernels with grids sized by meta.max_active_slots (the step's adapter bound),
through Triton's interpreter on the CPU: with a bound equal to the step's distinct slots
they give the reference's result; with a bound below it they skip tiles, which is why the
runner must guarantee it."""

import dataclasses

import pytest
import torch
from lora_kernel_cases import make_case, naive_lora, rel_err

from loraplex.kernels.lora import apply_lora, lora_shrink
from loraplex.kernels.lora_meta import build_lora_meta
from loraplex.kernels.lora_tiles import FEW_ADAPTERS, config_bound

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}
MAX_LORAS = 10   # > FEW_ADAPTERS: bounds of both tile classes occur
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the CPU runs Triton's interpreter (conftest)


def _case_with_groups(group_sizes: dict[int, int], num_base: int, *, ranks: list[int], dtype, seed: int,
                      bound: int):
    """A case whose slot s has group_sizes[s] tokens and num_base tokens use no LoRA, shuffled."""
    num_tokens = sum(group_sizes.values()) + num_base
    case = make_case(num_tokens=num_tokens, in_features=40, slice_widths=(24, 8, 8), max_loras=MAX_LORAS,
                     max_rank=16, slot_ranks=ranks, dtype=dtype, seed=seed, padding="garbage")
    slots = [s for s, n in group_sizes.items() for _ in range(n)] + [-1] * num_base
    order = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))
    case.token_slots = torch.tensor(slots, dtype=torch.int32)[order]
    case.meta = build_lora_meta(case.token_slots, case.slot_ranks, MAX_LORAS, max_active_slots=bound)
    return case


def _on_device(case, bound: int):
    """(x, out, lora_a, lora_b, meta) on DEVICE, the metadata rebuilt there with `bound`."""
    x, lora_a, lora_b = (t.to(DEVICE) for t in (case.x, case.lora_a, case.lora_b))
    out = case.out.to(DEVICE, copy=True)   # written in place; case.out stays the base output
    meta = build_lora_meta(case.token_slots.to(DEVICE), case.slot_ranks.to(DEVICE), MAX_LORAS,
                           max_active_slots=bound)
    return x, out, lora_a, lora_b, meta


# (tokens per slot, base tokens): ragged groups of 1 to 20 tokens (1 or 2 row tiles of 16).
GROUPS = [
    ({3: 20, 1: 1, 6: 17}, 3),                                         # 3 adapters: the few-adapter class
    ({s: (17 if s % 3 == 0 else 1 + s) for s in range(9)}, 5),        # 9 adapters: the max_loras class
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("groups,num_base", GROUPS)
def test_exact_bound_gives_the_reference_result(groups, num_base, dtype):
    ranks = [0] * MAX_LORAS
    for i, s in enumerate(groups):
        ranks[s] = (1, 16, 5, 9)[i % 4]                                 # ranks 1 .. max_rank
    case = _case_with_groups(groups, num_base, ranks=ranks, dtype=dtype, seed=len(groups), bound=len(groups))
    assert config_bound(len(groups), MAX_LORAS) == (FEW_ADAPTERS if len(groups) <= FEW_ADAPTERS else MAX_LORAS)
    _, expected = naive_lora(case)
    x, out, lora_a, lora_b, meta = _on_device(case, len(groups))
    buf = lora_shrink(x, lora_a, meta, case.num_slices, backend="triton").cpu()
    reference_buf = lora_shrink(case.x, case.lora_a, case.meta, case.num_slices, backend="torch")
    torch.testing.assert_close(buf, reference_buf, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    apply_lora(x, out, lora_a, lora_b, meta, case.slice_offsets, backend="triton")
    out = out.cpu()
    lora_rows = case.token_slots >= 0
    assert rel_err(out[lora_rows], expected[lora_rows], case.out[lora_rows]) < TOLERANCE[dtype]
    assert torch.equal(out[~lora_rows], case.out[~lora_rows])


def test_a_bound_below_the_active_count_skips_the_last_tile():
    # 3 groups of 17 tokens need 2 row tiles each (6); a bound of 1 launches cdiv(51, 16) + 1 = 5.
    # Tiles run in slot order, so only the last group's second tile (its 17th token) is lost.
    ranks = [0] * MAX_LORAS
    ranks[2] = ranks[4] = ranks[7] = 8
    case = _case_with_groups({2: 17, 4: 17, 7: 17}, 0, ranks=ranks, dtype=torch.float32, seed=5, bound=3)
    _, expected = naive_lora(case)
    x, out, lora_a, lora_b, meta = _on_device(case, 3)
    too_low = dataclasses.replace(meta, max_active_slots=1)   # build_lora_meta refuses it on the CPU
    apply_lora(x, out, lora_a, lora_b, too_low, case.slice_offsets, backend="triton")
    out = out.cpu()
    lost = int(case.meta.sorted_token_ids[2 * 17 + 16])
    assert torch.equal(out[lost], case.out[lost])
    kept = torch.arange(51) != lost
    assert rel_err(out[kept], expected[kept], case.out[kept]) < 1e-5
