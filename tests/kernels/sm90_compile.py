"""Compile the Triton LoRA kernels for sm_90 (H100/H200) on a machine without a GPU.

Run in a subprocess without TRITON_INTERPRET (the interpreter never compiles, so it
cannot catch codegen errors). Prints one JSON line per kernel variant with ptxas's
resource usage: registers, stack (spills) and shared memory.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraplex.kernels import triton_lora as tl_lora  # noqa: E402
from loraplex.kernels import triton_lora_meta as tl_meta  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _compile(kernel, arg_types, constexprs, config, launch_pdl=False):
    signature = dict(zip(kernel.arg_names, arg_types + ["constexpr"] * len(constexprs)))
    # As at a real launch: pointers and the int arguments (all multiples of 16 here) are 16-aligned.
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(arg_types))}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGET, options=dict(num_warps=config.num_warps,
                                                               num_stages=config.num_stages, launch_pdl=launch_pdl))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": compiled.metadata.shared}


def shrink(dtype, num_tokens, in_features, n, even_k):
    config = tl_lora.shrink_config(num_tokens, in_features, n, 32, 132)
    types = [f"*{dtype}", f"*{dtype}", "*fp32"] + ["*i32"] * 3 + ["i32"] * 10
    consts = {"MAX_LORAS_P2": 32, "BLOCK_M": config.block_m, "BLOCK_N": config.block_n,
              "BLOCK_K": config.block_k, "EVEN_K": even_k, "IEEE_DOT": dtype == "fp32",
              "LAUNCH_DEPENDENTS": True}
    return config, _compile(tl_lora._shrink_kernel, types, consts, config)


def expand(dtype, num_tokens, widths, max_rank, split_k, pdl):
    config = tl_lora.expand_config(num_tokens, widths, max_rank, 32, 132)
    types = ["*fp32", f"*{dtype}", f"*{dtype}"] + ["*i32"] * 3 + ["i32"] * 11
    chunk = config.block_n * config.tiles_per_program
    consts = {"NUM_SLICES": len(widths), "SPLIT_K": split_k, "MAX_LORAS_P2": 32, "BLOCK_M": config.block_m,
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
