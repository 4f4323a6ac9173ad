"""Argument checks shared by the Triton paged-attention launchers (triton_attention.py).

The kernels index raw pointers with the strides they are given, so a wrong dtype, shape,
device or layout would read the wrong memory rather than fail: every launcher checks
first and raises KernelArgumentError saying what was expected.
"""

from __future__ import annotations

import os

import torch

from loraplex.errors import KernelArgumentError

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _shape(t) -> str:
    return f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _require(t, name: str, *, dims: int, dtypes: tuple, unit_last_stride: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims or t.dtype not in dtypes:
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise KernelArgumentError(f"{name} must be a {dims}-D {names} tensor, got {_shape(t)}")
    if unit_last_stride and t.numel() and t.stride(-1) != 1:
        raise KernelArgumentError(f"{name} must have a contiguous last dimension (stride 1), got strides "
                                  f"{t.stride()}; call .contiguous() first")


def _check_device(*tensors: torch.Tensor) -> None:
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise KernelArgumentError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise KernelArgumentError(f"the Triton attention kernels need CUDA tensors, got {device}; use the torch "
                                  "reference in loraplex.kernels.paged_attention, or set TRITON_INTERPRET=1 "
                                  "before importing loraplex.kernels.triton_attention")


def _check_caches(k_cache, v_cache) -> None:
    _require(k_cache, "k_cache", dims=4, dtypes=_DTYPES)
    _require(v_cache, "v_cache", dims=4, dtypes=_DTYPES)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dtype != v_cache.dtype:
        raise KernelArgumentError(
            f"k_cache and v_cache must have one shape, dtype and strides ([num_blocks, block_size, "
            f"num_kv_heads, head_dim]), got {_shape(k_cache)} strides {k_cache.stride()} and "
            f"{_shape(v_cache)} strides {v_cache.stride()}")


def check_write_kv_args(k, v, k_cache, v_cache, slot_mapping) -> None:
    _check_caches(k_cache, v_cache)
    _require(k, "k", dims=3, dtypes=_DTYPES)
    _require(v, "v", dims=3, dtypes=_DTYPES)
    _require(slot_mapping, "slot_mapping", dims=1, dtypes=(torch.int32, torch.int64))
    expected = (slot_mapping.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape) != expected:
            raise KernelArgumentError(f"{name} must be [num_tokens, num_kv_heads, head_dim]={list(expected)} "
                                      f"(slot_mapping and the cache), got {list(t.shape)}")
    _check_device(k, v, k_cache, v_cache, slot_mapping)


def check_attention_args(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, sliding_window) -> None:
    _check_caches(k_cache, v_cache)
    _require(q, "q", dims=3, dtypes=_DTYPES)
    _require(block_tables, "block_tables", dims=2, dtypes=(torch.int32,))
    _require(seq_lens, "seq_lens", dims=1, dtypes=(torch.int32,))
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if q.dtype != k_cache.dtype:
        raise KernelArgumentError(f"q ({q.dtype}) and the KV cache ({k_cache.dtype}) must share a dtype")
    if head_dim != k_cache.shape[3]:
        raise KernelArgumentError(f"q's head_dim {head_dim} differs from the cache's {k_cache.shape[3]}")
    if num_q_heads % num_kv_heads:
        raise KernelArgumentError(f"q has {num_q_heads} heads, not a multiple of the cache's {num_kv_heads} "
                                  "KV heads (GQA needs whole groups)")
    num_seqs = seq_lens.shape[0]
    if block_tables.shape[0] != num_seqs:
        raise KernelArgumentError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences "
                                  "(seq_lens); give one row per sequence")
    tensors = [q, k_cache, v_cache, block_tables, seq_lens]
    if query_start_loc is not None:
        _require(query_start_loc, "query_start_loc", dims=1, dtypes=(torch.int32,))
        if query_start_loc.shape[0] != num_seqs + 1:
            raise KernelArgumentError(f"query_start_loc must be [num_seqs + 1]=[{num_seqs + 1}], "
                                      f"got {list(query_start_loc.shape)}")
        tensors.append(query_start_loc)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window < 1):
        raise KernelArgumentError(f"sliding_window must be None or an int >= 1, got {sliding_window!r}")
    _check_device(*tensors)
