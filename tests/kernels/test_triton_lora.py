"""Triton kernels against the torch reference, through Triton's interpreter on the CPU.

tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU, before any kernel is
defined. Shapes are tiny: the interpreter runs each program in numpy. float32 and
float16 only (the interpreter's bfloat16 arithmetic is not faithful).
"""

import pytest
import torch
from lora_kernel_cases import assign_tokens, make_case, rel_err

from loraplex.kernels.lora import apply_lora, lora_expand, lora_shrink
from loraplex.kernels.triton_lora import ExpandConfig, ShrinkConfig, triton_expand, triton_shrink

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3}


def _device(case):
    if torch.cuda.is_available():
        for name in ("x", "out", "lora_a", "lora_b", "token_slots", "slot_ranks"):
            setattr(case, name, getattr(case, name).cuda())
        from loraplex.kernels.lora_meta import build_lora_meta
        case.meta = build_lora_meta(case.token_slots, case.slot_ranks, case.slot_ranks.shape[0])
    return case


def _reference(case):
    out = case.out.clone()
    apply_lora(case.x, out, case.lora_a, case.lora_b, case.meta, case.slice_offsets, backend="torch")
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_lora_three_unequal_slices(dtype):
    # Ragged groups (slot 1 gets 1 token, slot 3 many), mixed ranks, an empty slot,
    # base tokens, garbage past each rank, in_features not a multiple of the K block.
    case = _device(make_case(num_tokens=21, in_features=40, slice_widths=(24, 5, 11), max_loras=5,
                             max_rank=16, slot_ranks=[16, 1, 0, 7, 3], dtype=dtype,
                             padding="garbage", seed=11))
    assign_tokens(case, [2, 9], 2)  # slot 2 has rank 0: its tokens get no tiles and no delta
    out = case.out.clone()
    apply_lora(case.x, out, case.lora_a, case.lora_b, case.meta, case.slice_offsets, backend="triton")
    expected = _reference(case)
    lora_rows = case.token_slots >= 0
    assert rel_err(out[lora_rows].cpu(), expected[lora_rows].cpu(), case.out[lora_rows].cpu()) < TOLERANCE[dtype]
    assert torch.equal(out[~lora_rows], case.out[~lora_rows])


def test_split_k_and_several_row_tiles_per_group():
    # block_m=16 < the 33 tokens of one slot; split_k=3 with a ragged last K chunk.
    case = _device(make_case(num_tokens=40, in_features=72, slice_widths=(20, 12), max_loras=2,
                             max_rank=8, slot_ranks=[8, 5], base_every=5, seed=12))
    case.token_slots[case.token_slots >= 0] = 0
    case.token_slots[7] = 1
    from loraplex.kernels.lora_meta import build_lora_meta
    case.meta = build_lora_meta(case.token_slots, case.slot_ranks, 2)
    partials = triton_shrink(case.x, case.lora_a, case.meta, 2, zero_init=True,
                             config=ShrinkConfig(block_m=16, block_n=16, block_k=16, split_k=3))
    assert partials.shape == (3, 40, 16)
    buf = lora_shrink(case.x, case.lora_a, case.meta, 2, backend="torch")
    torch.testing.assert_close(partials.sum(0), buf, rtol=1e-5, atol=1e-5)
    out = case.out.clone()
    triton_expand(partials, case.lora_b, case.meta, out, case.slice_offsets,
                  config=ExpandConfig(block_m=16, block_n=16, block_r=16))
    torch.testing.assert_close(out, _reference(case), rtol=1e-5, atol=1e-5)


def test_shrink_and_expand_ops_match_reference():
    case = _device(make_case(num_tokens=13, in_features=32, slice_widths=(16,), max_loras=3,
                             max_rank=4, slot_ranks=[2, 4, 3], seed=13))
    buf = lora_shrink(case.x, case.lora_a, case.meta, 1, backend="triton")
    expected_buf = lora_shrink(case.x, case.lora_a, case.meta, 1, backend="torch")
    torch.testing.assert_close(buf, expected_buf, rtol=1e-5, atol=1e-5)
    assert torch.all(buf[case.token_slots < 0] == 0)
    out = case.out.clone()
    lora_expand(expected_buf, case.lora_b, case.meta, out, case.slice_offsets, backend="triton")
    torch.testing.assert_close(out, _reference(case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_rank,block_r,widths", [
    (16, 16, (32, 16, 16)),   # whole chunks: no column masks; one rank block
    (8, 16, (40, 7)),         # ragged chunks; max_rank not a multiple of the rank block
    (32, 16, (24, 9, 16)),    # ranks past the first block: the inner rank loop
])
def test_expand_chunks_of_several_tiles_ignore_nan_padding(max_rank, block_r, widths):
    # Decode-style expand: each program loops over 2 column tiles; B and the shrink output
    # hold NaN past each slot's rank, which must never reach out.
    ranks = [max_rank, 1, max_rank // 2 + 1]
    case = _device(make_case(num_tokens=11, in_features=32, slice_widths=widths, max_loras=3,
                             max_rank=max_rank, slot_ranks=ranks, seed=max_rank + len(widths)))
    expected = _reference(case)
    buf = lora_shrink(case.x, case.lora_a, case.meta, len(widths), backend="torch")
    lora_b = case.lora_b.clone()
    for s, rank in enumerate(ranks):
        lora_b[s, :, rank:] = float("nan")
        buf.view(11, len(widths), max_rank)[case.token_slots == s, :, rank:] = float("nan")
    out = case.out.clone()
    triton_expand(buf.unsqueeze(0), lora_b, case.meta, out, case.slice_offsets,
                  config=ExpandConfig(block_m=16, block_n=16, block_r=block_r, num_stages=2, tiles_per_program=2))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_expand_into_a_float32_delta_with_half_weights():
    # lora_linear's decode path: the expand adds into a zeroed float32 buffer while the
    # weights are half precision (the dot's operand dtypes follow B, not out).
    case = _device(make_case(num_tokens=9, in_features=32, slice_widths=(16, 8), max_loras=3,
                             max_rank=8, slot_ranks=[8, 4, 2], dtype=torch.float16, seed=21))
    buf = lora_shrink(case.x, case.lora_a, case.meta, 2, backend="torch")
    delta = torch.zeros(case.out.shape, dtype=torch.float32, device=case.out.device)
    triton_expand(buf.unsqueeze(0), case.lora_b, case.meta, delta, case.slice_offsets)
    expected = case.out.float().clone()
    lora_expand(buf, case.lora_b.float(), case.meta, expected, case.slice_offsets, backend="torch")
    lora_rows = case.token_slots >= 0
    assert rel_err(delta[lora_rows].cpu(), (expected - case.out.float())[lora_rows].cpu(),
                   torch.zeros_like(delta[lora_rows]).cpu()) < 5e-3
    assert not delta[~lora_rows].any()


def test_expand_refuses_more_split_k_partials_than_it_sums():
    from loraplex.errors import KernelArgumentError
    from loraplex.kernels.lora_tiles import MAX_SPLIT_K
    case = _device(make_case(num_tokens=4, in_features=16, slice_widths=(8,), max_loras=2,
                             max_rank=4, slot_ranks=[4, 2], seed=22))
    partials = torch.zeros(MAX_SPLIT_K + 1, 4, 4, device=case.out.device)
    with pytest.raises(KernelArgumentError, match=f"at most {MAX_SPLIT_K} split-K partials"):
        triton_expand(partials, case.lora_b, case.meta, case.out, case.slice_offsets)
