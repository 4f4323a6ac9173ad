"""Compile one Triton kernel for sm_90 (H100/H200) without a GPU and read ptxas's resource usage.

Shared by the sm90_*compile.py scripts, which run in subprocesses without
TRITON_INTERPRET (the interpreter never compiles, so it cannot catch codegen errors).
"""

import os
import re
import subprocess
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_sm90(kernel, arg_types, constexprs, *, num_warps, num_stages, all_args_aligned=False, **options):
    """Registers, stack (spills), local memory and shared memory of `kernel` built for sm_90.

    As at a real launch, torch allocations are 16-byte aligned: pointers are hinted so;
    all_args_aligned also hints the int arguments (when the caller knows they are multiples of 16).
    """
    signature = dict(zip(kernel.arg_names, arg_types + ["constexpr"] * len(constexprs)))
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(arg_types)
             if all_args_aligned or t.startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages, **options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"registers": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"]),
            "shared": compiled.metadata.shared}
