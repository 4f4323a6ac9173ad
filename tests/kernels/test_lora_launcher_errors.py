"""The launchers explain wrong shapes, dtypes, layouts and metadata instead of failing deep inside."""

import pytest
import torch
from lora_kernel_cases import make_case

from loraplex.errors import KernelArgumentError
from loraplex.kernels.lora import apply_lora, lora_expand, lora_shrink
from loraplex.kernels.lora_meta import build_lora_meta


@pytest.fixture
def case():
    return make_case(num_tokens=6, in_features=16, slice_widths=(8, 4), max_loras=2,
                     max_rank=4, slot_ranks=[4, 2], seed=1)


def _apply(case, **overrides):
    args = dict(x=case.x, out=case.out.clone(), lora_a=case.lora_a, lora_b=case.lora_b,
                meta=case.meta, slice_offsets=case.slice_offsets)
    args.update(overrides)
    apply_lora(**args)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("change,message", [
    (lambda c: dict(x=c.x.half()), "x is torch.float16 but lora_a is torch.float32"),
    (lambda c: dict(x=c.x.long()), "x has dtype torch.int64"),
    (lambda c: dict(x=c.x[:, :12]), r"in_features=12"),
    (lambda c: dict(x=c.x[:4]), "x has 4 tokens but the LoRA metadata was built for 6"),
    (lambda c: dict(x=c.x.t().contiguous().t()), "unit stride along its last dim"),
    (lambda c: dict(lora_a=c.lora_a.transpose(1, 2).contiguous().transpose(1, 2)), "lora_a must be contiguous"),
    (lambda c: dict(lora_a=c.lora_a[:, :7].contiguous()), "not a multiple of num_slices=2"),
    (lambda c: dict(lora_a=c.lora_a[:1]), "1 slots but the metadata was built for max_loras=2"),
    (lambda c: dict(lora_b=c.lora_b[:, :, :3].contiguous()), "disagree for 2 slices"),
    (lambda c: dict(lora_b=c.lora_b.half()), "out is torch.float32 but lora_b is torch.float16"),
    (lambda c: dict(out=c.out[:, :10]), "slice_offsets must be increasing ints from 0 to out's width 10"),
    (lambda c: dict(slice_offsets=(0, 13, 12)), "slice_offsets must be increasing"),
    (lambda c: dict(slice_offsets=(0, 12)), "disagree for 1 slices"),
    (lambda c: dict(slice_offsets=(0, 2, 4, 6, 8, 12)), r"\(1 to 4\)"),
    (lambda c: dict(meta=object()), "meta must be a LoRABatchMeta"),
])
def test_apply_lora_rejects(case, change, message, backend):
    with pytest.raises(KernelArgumentError, match=message):
        _apply(case, **change(case), backend=backend)


def test_shrink_and_expand_reject_bad_buffers(case):
    with pytest.raises(KernelArgumentError, match="num_slices must be a positive int"):
        lora_shrink(case.x, case.lora_a, case.meta, 0)
    buf = lora_shrink(case.x, case.lora_a, case.meta, 2)
    with pytest.raises(KernelArgumentError, match="buf has dtype torch.float16"):
        lora_expand(buf.half(), case.lora_b, case.meta, case.out, case.slice_offsets)
    with pytest.raises(KernelArgumentError, match=r"buf must be \[num_tokens, num_slices\*max_rank\]=\[6, 8\]"):
        lora_expand(buf[:, :4].contiguous(), case.lora_b, case.meta, case.out, case.slice_offsets)
    with pytest.raises(KernelArgumentError, match="lora_b is .* but out has 10 columns"):
        lora_expand(buf, case.lora_b, case.meta, case.out[:, :10], (0, 6, 10))


def test_unknown_backend_and_stale_metadata(case):
    with pytest.raises(KernelArgumentError, match="backend must be one of"):
        _apply(case, backend="cuda")
    stale = build_lora_meta(torch.zeros(6, dtype=torch.int32), torch.tensor([4, 2, 1], dtype=torch.int32), 3)
    with pytest.raises(KernelArgumentError, match="max_loras=3"):
        _apply(case, meta=stale)
