"""Compile the Triton LoRA kernels for sm_90 (H100/H200) on a machine without a GPU.

Run in a subprocess without TRITON_INTERPRET (the interpreter never compiles, so it
cannot catch codegen errors). Prints one JSON line per kernel variant with ptxas's
resource usage: registers, stack (spills) and shared memory.
"""

import json
import sys

from sm90_build import compile_sm90  # noqa: E402  (sets up Triton without the interpreter)
from loraplex.kernels import triton_lora as tl_lora  # noqa: E402
from loraplex.kernels import triton_lora_meta as tl_meta  # noqa: E402


def _compile(kernel, arg_types, constexprs, config, launch_pdl=False):
    # The int arguments here are all multiples of 16, so they are hinted aligned too.
    return compile_sm90(kernel, arg_types, constexprs, num_warps=config.num_warps,
                        num_stages=config.num_stages, all_args_aligned=True, launch_pdl=launch_pdl)


# max_loras of the compiled variants; the few-adapter tile class is lora_tiles.FEW_ADAPTERS.
MAX_LORAS = 32


def shrink(dtype, num_tokens, in_features, n, even_k):
    config = tl_lora.shrink_config(num_tokens, in_features, n, MAX_LORAS, 132)
    types = [f"*{dtype}", f"*{dtype}", "*fp32"] + ["*i32"] * 3 + ["i32"] * 10
    consts = {"MAX_LORAS_P2": MAX_LORAS, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
              "BLOCK_K": config.block_k, "EVEN_K": even_k, "IEEE_DOT": dtype == "fp32",
              "LAUNCH_DEPENDENTS": True}
    return config, _compile(tl_lora._shrink_kernel, types, consts, config)


def expand(dtype, num_tokens, widths, max_rank, split_k, pdl, max_adapters=MAX_LORAS):  # split_k: runtime
    config = tl_lora.expand_config(num_tokens, widths, max_rank, max_adapters, 132)
    types = ["*fp32", f"*{dtype}", f"*{dtype}"] + ["*i32"] * 3 + ["i32"] * 12   # split_k is a runtime int
    chunk = config.block_n * config.tiles_per_program
    consts = {"NUM_SLICES": len(widths), "MAX_SPLIT": tl_lora.expand_split_bound(split_k), "MAX_LORAS_P2": MAX_LORAS, "BLOCK_M": config.block_m,
              "BLOCK_N": config.block_n, "BLOCK_R": config.block_r, "N_TILES": config.tiles_per_program,
              "ONE_R_BLOCK": max_rank <= config.block_r, "EVEN_R": max_rank % config.block_r == 0,
              "EVEN_N": all(w % chunk == 0 for w in widths), "IEEE_DOT": dtype == "fp32", "USE_PDL": pdl}
    return config, _compile(tl_lora._expand_kernel, types, consts, config, launch_pdl=pdl)


def meta(num_tokens, max_loras):
    config = tl_meta.meta_config(num_tokens, max_loras)
    types = ["*i32"] * 6 + ["i32"] * 2
    consts = {"BLOCK_T": config.block_t, "KEYS_P2": config.keys_p2}
    return config, _compile(tl_meta._lora_meta_kernel, types, consts, config)


VARIANTS = [
    ("shrink bf16 decode", lambda: shrink("bf16", 64, 4096, 48, True)),
    ("shrink bf16 decode narrow deep K", lambda: shrink("bf16", 64, 14336, 16, True)),
    ("shrink bf16 prefill ragged K", lambda: shrink("bf16", 4096, 14336 + 8, 16, False)),
    ("expand bf16 decode 3 slices split 11 pdl", lambda: expand("bf16", 64, (4096, 1024, 1024), 16, 11, True)),
    ("expand bf16 decode rank 128 ragged", lambda: expand("bf16", 64, (4096, 1000), 128, 8, True)),
    ("expand bf16 decode gate_up, max_loras tiles", lambda: expand("bf16", 64, (14336, 14336), 16, 8, False)),
    ("expand bf16 decode gate_up, few-adapter tiles",
     lambda: expand("bf16", 64, (14336, 14336), 16, 8, False, tl_lora.config_bound(1, MAX_LORAS))),
    ("expand bf16 prefill 2 slices split 3", lambda: expand("bf16", 4096, (14336, 14336), 16, 3, False)),
    ("expand fp32 mid 4 slices", lambda: expand("fp32", 517, (4096, 1024, 1024, 512), 16, 2, False)),
    ("lora meta decode", lambda: meta(64, 32)),
    ("lora meta prefill, many slots", lambda: meta(4096, 500)),
]

if __name__ == "__main__":
    for name, build in VARIANTS:
        config, usage = build()
        print(json.dumps({"variant": name, "config": repr(config), **usage}), flush=True)
    sys.exit(0)
