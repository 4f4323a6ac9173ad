"""Batched multi-LoRA ops: shrink, expand and apply_lora, with launchers and the torch reference.

Layout (allocated by the LoRA manager, per layer and linear module):
    lora_a: [max_loras, num_slices * max_rank, in_features]; slice i of slot s is rows
            i*max_rank : i*max_rank + rank_s
    lora_b: [max_loras, out_features_total, max_rank]; slice i owns output columns
            slice_offsets[i] : slice_offsets[i+1], and uses only rank block i of the shrink
            output. The scaling alpha/r is already folded into B.
For a token t of slot s >= 0 and each slice i:
    out[t, off_i:off_{i+1}] += x[t] @ A[s, i*R : i*R + r_s].T @ B[s, off_i:off_{i+1}, :r_s].T
Rows/columns past a slot's rank are never read, so their content does not matter.

The shrink output is float32 [num_tokens, num_slices * max_rank] (columns past a slot's
rank and rows of base-model tokens are 0): it is tiny, and float32 keeps the split-K
sums exact enough. The expand accumulates in float32 and rounds once into `out`.

Each op runs the Triton kernel when the tensors are on CUDA (backend="auto") or when
backend="triton" (CPU tensors then need TRITON_INTERPRET=1); otherwise the torch
reference below, which defines the semantics and is the CPU path.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from loraplex.errors import KernelArgumentError
from loraplex.kernels.lora_meta import LoRABatchMeta, lora_groups

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BACKENDS = ("auto", "torch", "triton")
MAX_SLICES = 4  # the Triton expand takes slice ends as scalar arguments


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta, num_slices: int,
                *, backend: str = "auto") -> torch.Tensor:
    """buf[num_tokens, num_slices * max_rank] float32 = x @ A[slot]^T per token (0 for base tokens)."""
    _check_shrink(x, lora_a, meta, num_slices)
    if _use_triton(backend, x):
        from loraplex.kernels.triton_lora import triton_shrink
        partials = triton_shrink(x, lora_a, meta, num_slices, zero_init=True)
        return partials[0] if partials.shape[0] == 1 else partials.sum(0)
    return _shrink_reference(x, lora_a, meta, num_slices)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta, out: torch.Tensor,
                slice_offsets: tuple[int, ...], *, backend: str = "auto") -> None:
    """out[t, slice i] += buf[t, rank block i] @ B[slot, slice i]^T for every LoRA token, in place."""
    _check_expand(buf, lora_b, meta, out, slice_offsets)
    if _use_triton(backend, out):
        from loraplex.kernels.triton_lora import triton_expand
        triton_expand(buf.unsqueeze(0), lora_b, meta, out, tuple(slice_offsets))
        return
    _expand_reference(buf, lora_b, meta, out, tuple(slice_offsets))


def apply_lora(x: torch.Tensor, out: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               meta: LoRABatchMeta, slice_offsets: tuple[int, ...], *, backend: str = "auto") -> None:
    """out += LoRA(x) for every token with a slot: shrink then expand, all slices at once."""
    _check_tensor(out, "out", dims=2, row_major=True)
    num_slices = _check_slice_offsets(slice_offsets, out)
    _check_shrink(x, lora_a, meta, num_slices)
    _check_expand_weights(lora_b, lora_a, num_slices, out, x)
    if _use_triton(backend, x):
        from loraplex.kernels.triton_lora import pdl_supported, triton_expand, triton_shrink
        # Expand sums the split-K partials itself; rows it reads are always written. With
        # PDL (Hopper+) the expand starts while the shrink runs and waits for it on-chip.
        pdl = pdl_supported(x.device)
        partials = triton_shrink(x, lora_a, meta, num_slices, zero_init=False, launch_dependents=pdl)
        triton_expand(partials, lora_b, meta, out, tuple(slice_offsets), pdl=pdl)
        return
    buf = _shrink_reference(x, lora_a, meta, num_slices)
    _expand_reference(buf, lora_b, meta, out, tuple(slice_offsets))


# Whether lora_linear runs the shrink on the side stream beside the base GEMM. On the H200
# (2026-11-28) running the expand there too, into a float32 delta joined by an add, was
# slower (gate_up: +36.6 us per layer against +24.3 us all on one stream): the GEMM leaves
# too few SMs idle, and the zeroing and the add cost more than they hide.
SHRINK_BESIDE_GEMM = True


def lora_linear(x: torch.Tensor, base: Callable[[torch.Tensor], torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, meta: LoRABatchMeta, slice_offsets: tuple[int, ...], *,
                side_stream: torch.cuda.Stream | None = None) -> torch.Tensor:
    """base(x) + LoRA(x): a LoRA-wrapped linear layer.

    With a CUDA `side_stream`, while a CUDA graph is captured, the shrink runs on it while
    base(x) (the big GEMM) runs on the current stream; the expand then adds into the GEMM's
    output (a fork and a join in the graph). Eager steps stay on one stream: they are bound
    by the host's launch cost (a mixed 8B step: ~9 ms of GPU work in ~41 ms), and a fork
    and a join cost four stream calls per layer and projection."""
    if (side_stream is None or not SHRINK_BESIDE_GEMM or not _use_triton("auto", x)
            or not torch.cuda.is_current_stream_capturing()):
        out = base(x)
        apply_lora(x, out, lora_a, lora_b, meta, slice_offsets)
        return out
    from loraplex.kernels.triton_lora import triton_expand, triton_shrink
    num_slices = len(slice_offsets) - 1
    _check_shrink(x, lora_a, meta, num_slices)
    main = torch.cuda.current_stream(x.device)
    side_stream.wait_stream(main)   # x (and this step's slot copies) are ready
    # The partials, allocated on the side stream, die on the main one. No record_stream
    # needed: the side stream's next use of that memory (the next layer's shrink) follows
    # its wait_stream(main), hence this expand.
    with torch.cuda.stream(side_stream):
        partials = triton_shrink(x, lora_a, meta, num_slices, zero_init=False)
    out = base(x)
    _check_tensor(out, "out", dims=2, row_major=True)
    _check_slice_offsets(slice_offsets, out)
    _check_expand_weights(lora_b, lora_a, num_slices, out, x)
    main.wait_stream(side_stream)
    triton_expand(partials, lora_b, meta, out, tuple(slice_offsets))
    return out


# --- torch reference: per-slot matmuls over the grouped tokens (no per-token loops) ---

def _shrink_reference(x, lora_a, meta, num_slices):
    num_tokens = x.shape[0]
    max_rank = lora_a.shape[1] // num_slices
    buf = torch.zeros(num_tokens, num_slices, max_rank, dtype=torch.float32, device=x.device)
    for slot, rank, tokens in _ranked_groups(meta, max_rank):
        count = tokens.numel()
        a = lora_a[slot].view(num_slices, max_rank, -1)[:, :rank].reshape(num_slices * rank, -1)
        h = x[tokens].float() @ a.float().T                                 # [count, num_slices * rank]
        buf[tokens, :, :rank] = h.view(count, num_slices, rank)
    return buf.view(num_tokens, num_slices * max_rank)


def _expand_reference(buf, lora_b, meta, out, slice_offsets):
    max_rank = lora_b.shape[2]
    for slot, rank, tokens in _ranked_groups(meta, max_rank):
        count = tokens.numel()
        h = buf[tokens].view(count, -1, max_rank)[:, :, :rank]             # [count, num_slices, rank]
        delta = torch.empty(count, out.shape[1], dtype=torch.float32, device=out.device)
        for i, (lo, hi) in enumerate(zip(slice_offsets, slice_offsets[1:])):
            delta[:, lo:hi] = h[:, i] @ lora_b[slot, lo:hi, :rank].float().T
        out[tokens] = (out[tokens].float() + delta).to(out.dtype)


def _ranked_groups(meta, max_rank):
    """(slot, rank, token indices) of each active group whose adapter has a nonzero rank."""
    ranks = [min(r, max_rank) for r in meta.slot_ranks.tolist()]
    for slot, start, count in lora_groups(meta):
        if ranks[slot]:
            yield slot, ranks[slot], meta.sorted_token_ids[start:start + count].long()


# --- dispatch and launcher checks ---

def _use_triton(backend: str, tensor: torch.Tensor) -> bool:
    if backend not in _BACKENDS:
        raise KernelArgumentError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if tensor.device.type == "cuda":
        return True
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise KernelArgumentError(
                f"backend='triton' got {tensor.device} tensors: run on CUDA, or set TRITON_INTERPRET=1 "
                f"before loraplex.kernels.triton_lora is first imported to use Triton's interpreter")
        return True
    return False


def _check_shrink(x, lora_a, meta, num_slices):
    _check_meta(meta, lora_a, "lora_a")
    _check_tensor(x, "x", dims=2, row_major=True)
    _check_tensor(lora_a, "lora_a", dims=3, contiguous=True)
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise KernelArgumentError(f"num_slices must be a positive int, got {num_slices!r}")
    if x.shape[0] != meta.num_tokens:
        raise KernelArgumentError(
            f"x has {x.shape[0]} tokens but the LoRA metadata was built for {meta.num_tokens}; "
            f"build it from this step's token_slots")
    if lora_a.shape[2] != x.shape[1]:
        raise KernelArgumentError(
            f"lora_a is [max_loras, num_slices*max_rank, in_features]={list(lora_a.shape)}, but x has "
            f"in_features={x.shape[1]}")
    if lora_a.shape[1] % num_slices:
        raise KernelArgumentError(
            f"lora_a has {lora_a.shape[1]} rows per slot, not a multiple of num_slices={num_slices}")
    _check_same(x, lora_a, "x", "lora_a")


def _check_expand(buf, lora_b, meta, out, slice_offsets):
    _check_meta(meta, lora_b, "lora_b")
    _check_tensor(buf, "buf", dims=2, contiguous=True, dtypes=(torch.float32,))
    _check_tensor(lora_b, "lora_b", dims=3, contiguous=True)
    _check_tensor(out, "out", dims=2, row_major=True)
    num_slices = _check_slice_offsets(slice_offsets, out)
    max_rank = lora_b.shape[2]
    if tuple(buf.shape) != (meta.num_tokens, num_slices * max_rank):
        raise KernelArgumentError(
            f"buf must be [num_tokens, num_slices*max_rank]=[{meta.num_tokens}, {num_slices * max_rank}] "
            f"(the output of lora_shrink), got {list(buf.shape)}")
    _check_b_shape(lora_b, out)
    _check_same(out, lora_b, "out", "lora_b")
    _check_same_device(buf, out, "buf", "out")


def _check_expand_weights(lora_b, lora_a, num_slices, out, x):
    _check_tensor(lora_b, "lora_b", dims=3, contiguous=True)
    if lora_b.shape[0] != lora_a.shape[0] or lora_b.shape[2] * num_slices != lora_a.shape[1]:
        raise KernelArgumentError(
            f"lora_a {list(lora_a.shape)} and lora_b {list(lora_b.shape)} disagree for {num_slices} slices: "
            f"expected lora_b [max_loras={lora_a.shape[0]}, out_features, max_rank={lora_a.shape[1] // num_slices}]")
    if out.shape[0] != x.shape[0]:
        raise KernelArgumentError(f"out has {out.shape[0]} rows but x has {x.shape[0]} tokens")
    _check_b_shape(lora_b, out)
    _check_same(out, x, "out", "x")
    _check_same(out, lora_b, "out", "lora_b")


def _check_b_shape(lora_b, out):
    if lora_b.shape[1] != out.shape[1]:
        raise KernelArgumentError(
            f"lora_b is [max_loras, out_features, max_rank]={list(lora_b.shape)}, but out has "
            f"{out.shape[1]} columns")


def _check_slice_offsets(slice_offsets, out) -> int:
    offsets = tuple(slice_offsets) if isinstance(slice_offsets, (tuple, list)) else None
    if (not offsets or len(offsets) < 2 or len(offsets) > MAX_SLICES + 1
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or offsets[0] != 0 or offsets[-1] != out.shape[1]
            or any(lo >= hi for lo, hi in zip(offsets, offsets[1:]))):
        raise KernelArgumentError(
            f"slice_offsets must be increasing ints from 0 to out's width {out.shape[1]}, one more than "
            f"the number of slices (1 to {MAX_SLICES}), e.g. (0, q, q+k, q+k+v); got {slice_offsets!r}")
    return len(offsets) - 1


def _check_meta(meta, weights, name):
    if not isinstance(meta, LoRABatchMeta):
        raise KernelArgumentError(f"meta must be a LoRABatchMeta from build_lora_meta, got {type(meta).__name__}")
    if weights.dim() == 3 and weights.shape[0] != meta.max_loras:
        raise KernelArgumentError(
            f"{name} has {weights.shape[0]} slots but the metadata was built for max_loras={meta.max_loras}")
    if meta.device != weights.device:
        raise KernelArgumentError(f"the metadata is on {meta.device} but {name} is on {weights.device}")


def _check_tensor(t, name, *, dims, contiguous=False, row_major=False, dtypes=_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise KernelArgumentError(f"{name} must be {dims}-D, got shape {list(t.shape)}")
    if t.dtype not in dtypes:
        raise KernelArgumentError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if contiguous and not t.is_contiguous():
        raise KernelArgumentError(f"{name} must be contiguous (got strides {t.stride()}); call .contiguous()")
    if row_major and t.numel() and t.stride(1) != 1:
        raise KernelArgumentError(
            f"{name} must have unit stride along its last dim (got strides {t.stride()}); call .contiguous()")


def _check_same(a, b, name_a, name_b):
    if a.dtype != b.dtype:
        raise KernelArgumentError(f"{name_a} is {a.dtype} but {name_b} is {b.dtype}; they must match")
    _check_same_device(a, b, name_a, name_b)


def _check_same_device(a, b, name_a, name_b):
    if a.device != b.device:
        raise KernelArgumentError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
