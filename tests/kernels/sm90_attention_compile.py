"""Compile the Triton paged-attention kernels for sm_90 (H100/H200) on a machine without a GPU.

Run in a subprocess without TRITON_INTERPRET. Prints one JSON line per kernel variant
(the tiles the launchers pick for Llama-3-8B shapes) with ptxas's resource usage.
"""

import json
import sys

from sm90_build import compile_sm90  # noqa: E402  (sets up Triton without the interpreter)
import triton  # noqa: E402
from loraplex.kernels import triton_attention as ta  # noqa: E402


def _compile(kernel, arg_types, constexprs, config):
    return compile_sm90(kernel, arg_types, constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


class _Config:
    def __init__(self, num_warps, num_stages=3):
        self.num_warps, self.num_stages = num_warps, num_stages


def write_kv(dtype):
    types = [f"*{dtype}"] * 4 + ["*i64"] + ["i32"] * 10
    return _compile(ta._write_kv_kernel, types, {"BLOCK_H": 8, "BLOCK_D": 128}, _Config(4))


def decode(dtype, num_splits, group=4):
    block_d, block_n = 128, 32   # what the decode launcher picks for head_dim 128
    types = [f"*{dtype}"] * 3 + ["*i32", "*i32", f"*{dtype}", "*fp32", "*fp32", "fp32"] + ["i32"] * 12
    consts = {"GROUP": group, "BLOCK_G": max(16, group), "BLOCK_N": block_n, "BLOCK_D": block_d,
              "SPLIT": num_splits > 1, "USE_WINDOW": False, "IEEE_DOT": dtype == "fp32", "LARGE_CACHE": False}
    return _compile(ta._decode_kernel, types, consts, _Config(8 if dtype == "fp32" else 4, ta.DECODE_STAGES))


def reduce(dtype, num_splits):
    types = ["*fp32", "*fp32", f"*{dtype}"] + ["i32"] * 5
    consts = {"BLOCK_S": triton.next_power_of_2(num_splits), "BLOCK_D": 128}
    return _compile(ta._decode_reduce_kernel, types, consts, _Config(4))


def prefill(dtype, block_m, window, large=False):
    block_n = 16 if dtype == "fp32" else 64
    types = [f"*{dtype}"] * 3 + ["*i32"] * 3 + [f"*{dtype}", "i32", "fp32"] + ["i32"] * 11   # out, first_seq, scale
    consts = {"GROUP": 4, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": 128, "USE_WINDOW": window,
              "IEEE_DOT": dtype == "fp32", "LARGE_CACHE": large}
    return _compile(ta._prefill_kernel, types, consts, _Config(8 if block_m > 32 or dtype == "fp32" else 4, ta.PREFILL_STAGES))


VARIANTS = [
    ("write_kv bf16", lambda: write_kv("bf16")),
    ("decode bf16 GQA 4 no split", lambda: decode("bf16", 1)),
    ("decode bf16 GQA 4 split 8", lambda: decode("bf16", 8)),
    ("decode fp32 GQA 8 split 4", lambda: decode("fp32", 4, group=8)),
    ("decode reduce bf16 33 splits", lambda: reduce("bf16", 32)),
    ("prefill bf16 64x64", lambda: prefill("bf16", 64, False)),
    ("prefill bf16 64x64 sliding window 64-bit offsets", lambda: prefill("bf16", 64, True, large=True)),
    ("prefill fp32 32x16", lambda: prefill("fp32", 32, False)),
]

if __name__ == "__main__":
    for name, build in VARIANTS:
        print(json.dumps({"variant": name, **build()}), flush=True)
    sys.exit(0)
