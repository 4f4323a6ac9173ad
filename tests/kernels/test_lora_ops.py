"""The torch reference (the CPU path) against the naive per-token definition in float64."""

import pytest
import torch
from lora_kernel_cases import assign_tokens, make_case, naive_lora, rel_err

from loraplex.kernels.lora import apply_lora, lora_expand, lora_shrink
from loraplex.kernels.lora_meta import build_lora_meta

# (slice widths, slot ranks with max_rank 8): 1, 2 and 3 slices of unequal widths,
# ranks 1..8 mixed, an empty slot (rank 0) in the middle.
SHAPES = [
    ((24,), [8, 1, 0, 5]),
    ((20, 9), [3, 8, 7, 0]),
    ((16, 5, 11), [2, 0, 8, 6, 1]),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widths,ranks", SHAPES)
def test_apply_lora_matches_definition(widths, ranks, dtype):
    case = make_case(num_tokens=37, in_features=48, slice_widths=widths, max_loras=len(ranks),
                     max_rank=8, slot_ranks=ranks, dtype=dtype, seed=len(widths))
    assign_tokens(case, [1, 6], ranks.index(0))  # tokens of a slot whose rank is 0 get no delta
    _, expected = naive_lora(case)
    out = case.out.clone()
    apply_lora(case.x, out, case.lora_a, case.lora_b, case.meta, case.slice_offsets)
    lora_rows = case.token_slots >= 0
    assert rel_err(out[lora_rows], expected[lora_rows], case.out[lora_rows]) < TOLERANCE[dtype]
    # Base-model tokens are untouched, bit for bit.
    assert torch.equal(out[~lora_rows], case.out[~lora_rows])


def test_shrink_then_expand_match_definition():
    case = make_case(num_tokens=29, in_features=40, slice_widths=(12, 7, 9), max_loras=3,
                     max_rank=8, slot_ranks=[4, 8, 1], seed=3)
    expected_buf, expected_out = naive_lora(case)
    buf = lora_shrink(case.x, case.lora_a, case.meta, case.num_slices)
    assert buf.dtype == torch.float32 and buf.shape == (29, 3 * 8)
    torch.testing.assert_close(buf.double(), expected_buf, rtol=1e-5, atol=1e-5)
    assert torch.all(buf[case.token_slots < 0] == 0)
    out = case.out.clone()
    lora_expand(buf, case.lora_b, case.meta, out, case.slice_offsets)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)


def test_padding_past_the_rank_is_ignored():
    case = make_case(num_tokens=23, in_features=32, slice_widths=(10, 6), max_loras=3,
                     max_rank=8, slot_ranks=[3, 8, 5], padding="garbage", seed=4)
    assert case.lora_b[0, :, 3:].abs().sum() > 0  # the padding really holds values
    _, expected = naive_lora(case)
    out = case.out.clone()
    apply_lora(case.x, out, case.lora_a, case.lora_b, case.meta, case.slice_offsets)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_strided_rows_of_x_and_out():
    case = make_case(num_tokens=19, in_features=32, slice_widths=(8, 8), max_loras=2,
                     max_rank=4, slot_ranks=[4, 2], seed=5)
    _, expected = naive_lora(case)
    # x and out as column windows of wider buffers: rows are strided, columns contiguous.
    wide_x = torch.randn(19, 50)
    wide_x[:, 5:37] = case.x
    wide_out = torch.randn(19, 30)
    wide_out[:, 3:19] = case.out
    before = wide_out.clone()
    apply_lora(wide_x[:, 5:37], wide_out[:, 3:19], case.lora_a, case.lora_b, case.meta, case.slice_offsets)
    torch.testing.assert_close(wide_out[:, 3:19].double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(wide_out[:, :3], before[:, :3]) and torch.equal(wide_out[:, 19:], before[:, 19:])


def test_batch_without_lora_tokens_leaves_out_unchanged():
    case = make_case(num_tokens=6, in_features=16, slice_widths=(8,), max_loras=2,
                     max_rank=4, slot_ranks=[4, 4], seed=6)
    meta = build_lora_meta(torch.full((6,), -1, dtype=torch.int32), case.slot_ranks, 2)
    out = case.out.clone()
    apply_lora(case.x, out, case.lora_a, case.lora_b, meta, case.slice_offsets)
    assert torch.equal(out, case.out)


def test_empty_batch():
    meta = build_lora_meta(torch.empty(0, dtype=torch.int32), torch.tensor([4], dtype=torch.int32), 1)
    out = torch.empty(0, 8)
    apply_lora(torch.empty(0, 16), out, torch.randn(1, 4, 16), torch.randn(1, 8, 4), meta, (0, 8))
    assert lora_shrink(torch.empty(0, 16), torch.randn(1, 4, 16), meta, 1).shape == (0, 4)
