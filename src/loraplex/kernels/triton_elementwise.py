"""Fused Triton kernels for the decoder's small per-token operations: RMSNorm (with the
residual add), rotary embedding (in place) and SiLU-and-mul.

In torch each of these is 5-15 tiny kernels (cast, square, mean, rsqrt, multiply, cast,
...). A Llama-3-8B decode step at batch 64 ran ~1,370 kernels of which ~1,000 were these,
about 2.9 ms of a 7.7 ms step on an H200 (benchmarks/gpu_profile_step.py). Here each is
one launch that reads its input once and writes its output once.

The torch references are the model's own modules (core/layers.py RMSNorm and
silu_and_mul, core/rotary.py RotaryEmbedding); results equal them up to rounding (one
float32 computation, one cast at the end), tested in tests/kernels/test_triton_elementwise.py.
This module imports nothing from loraplex.core; define it only after TRITON_INTERPRET is settled.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from loraplex.errors import KernelArgumentError


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, hidden, eps,
                     stride_x, stride_r, stride_o, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    # One program per token row. With a residual: residual <- x + residual (rounded to the
    # model dtype, as torch's add), then the norm of that sum.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = (x + r).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / hidden + eps)
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)   # cast, then scale (as Llama)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(ptr, token, stride_t, stride_h, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, HALF)[None, :]
    mask = heads < num_heads
    first = ptr + token * stride_t + heads * stride_h + dims                                # [BLOCK_H, HALF]
    x1 = tl.load(first, mask=mask).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_sin_ptr, num_q_heads, num_kv_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr):
    # One program per token: every q and k head of it, rotated in place ("neox" halves).
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token)
    dims = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cache + dims).to(tl.float32)[None, :]          # [1, HALF]
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + dims).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_QH)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, num_kv_heads, cos, sin, HALF, BLOCK_KH)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, width, stride_x, stride_o, BLOCK: tl.constexpr):
    # Grid (tokens, column blocks): out[t, j] = silu(gate[t, j]) * up[t, j], gate | up side by side.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + width + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(name: str, t: torch.Tensor, dims: int, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.dtype not in _DTYPES:
        got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise KernelArgumentError(f"{name} must be a {dims}-D float16/bfloat16/float32 tensor, got {got}")
    if t.numel() and t.stride(-1) != 1:
        raise KernelArgumentError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelArgumentError(f"{name} is on {t.device}; the Triton kernels need CUDA tensors (or "
                                  "TRITON_INTERPRET=1); use the torch modules in loraplex.core.layers")
    if device is not None and t.device != device:
        raise KernelArgumentError(f"{name} is on {t.device}, the other tensors on {device}")


def triton_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(x) [num_tokens, hidden]; with `residual`, first residual += x in place, then
    RMSNorm(residual) (the decoder's add-then-norm in one pass)."""
    _check("x", x, 2)
    _check("weight", weight, 1, x.device)
    hidden = x.shape[1]
    if weight.shape[0] != hidden:
        raise KernelArgumentError(f"weight has {weight.shape[0]} elements for hidden size {hidden}")
    if residual is not None:
        _check("residual", residual, 2, x.device)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise KernelArgumentError(f"residual must match x ({x.dtype} {list(x.shape)}), got "
                                      f"{residual.dtype} {list(residual.shape)}")
    out = torch.empty_like(x)
    if x.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x.shape[0],)](
            x, residual if residual is not None else x, weight, out, hidden, eps,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return out


def triton_rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q [num_tokens, q_heads, head_dim] and k [num_tokens, kv_heads, head_dim] in place
    (strided views of the fused qkv output are fine); cos_sin_cache [max_pos, head_dim] holds
    cos | sin side by side (core/rotary.py)."""
    _check("q", q, 3)
    _check("k", k, 3, q.device)
    _check("cos_sin_cache", cos_sin_cache, 2, q.device)
    head_dim = q.shape[2]
    if k.shape[2] != head_dim or k.shape[0] != q.shape[0] or cos_sin_cache.shape[1] != head_dim:
        raise KernelArgumentError(f"q {list(q.shape)}, k {list(k.shape)} and cos_sin_cache "
                                  f"{list(cos_sin_cache.shape)} must share num_tokens and head_dim")
    if head_dim & (head_dim - 1) or head_dim < 2:
        raise KernelArgumentError(f"head_dim must be a power of two for the Triton rotary kernel, got {head_dim}")
    if positions.dim() != 1 or positions.shape[0] != q.shape[0] or positions.dtype not in (torch.int32, torch.int64):
        raise KernelArgumentError(f"positions must be [num_tokens]={q.shape[0]} int32/int64, got "
                                  f"{positions.dtype} {list(positions.shape)}")
    if q.shape[0]:
        _rotary_kernel[(q.shape[0],)](
            q, k, positions, cos_sin_cache, q.shape[1], k.shape[1],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            HALF=head_dim // 2, BLOCK_QH=triton.next_power_of_2(q.shape[1]),
            BLOCK_KH=triton.next_power_of_2(k.shape[1]), num_warps=4)


def triton_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * intermediate] (gate | up) -> silu(gate) * up [num_tokens, intermediate]."""
    _check("gate_up", gate_up, 2)
    if gate_up.shape[1] % 2:
        raise KernelArgumentError(f"gate_up must have an even width (gate | up), got {gate_up.shape[1]}")
    width = gate_up.shape[1] // 2
    out = torch.empty(gate_up.shape[0], width, dtype=gate_up.dtype, device=gate_up.device)
    if gate_up.shape[0]:
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(gate_up.shape[0], triton.cdiv(width, block))](
            gate_up, out, width, gate_up.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out
