"""gpu_check.py's serving-time checks on a GPU: adapter memory and JIT compiles after start-up.

Called by gpu_check.py (part 2), which passes its `report(name, ok, detail)`.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch


def release_memory() -> None:
    gc.collect()   # an LLM's runner and its graphs reference each other
    torch.cuda.empty_cache()


def check_no_compile_after_warm_up(path, tmp: Path, report) -> None:
    """After start-up (graph capture + warm-up) serving compiles no Triton kernel: eager mixed
    and decode steps of many sizes, 1 to 12 adapters at max_loras 64 (two tile classes), mixed
    steps with leading decodes split off."""
    from adapters import write_peft_adapter
    from gpu_decode import compiled_kernels
    from runner_helpers import random_prompts

    from loraplex import LLM, LoRARequest, SamplingParams
    adapters = [LoRARequest(f"c{i}", 100 + i, str(write_peft_adapter(
        tmp / f"compile-a{i}", rank=8, alpha=16, seed=50 + i, base_model_name_or_path=str(path),
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))))
        for i in range(12)]
    for enforce_eager in (False, True):   # graphs first: the eager run then also sees what graphs compiled
        llm = LLM(model=str(path), device="cuda", dtype="float32", max_model_len=256, max_num_seqs=64,
                  kv_cache_bytes=64 << 20, attention_backend="triton", enable_lora=True, max_loras=64,
                  max_lora_rank=8, enforce_eager=enforce_eager, max_num_batched_tokens=512)
        before = compiled_kernels()
        lengths = [1 + (7 * i) % 61 for i in range(40)]            # 1..61-token prompts
        prompts = [{"prompt_token_ids": p} for p in random_prompts(lengths, 300, seed=3)]
        loras = [adapters[i % (1 + i % 12)] if i % 5 else None for i in range(len(prompts))]
        params = [SamplingParams(temperature=0, max_tokens=2 + i % 9, ignore_eos=True) for i in range(len(prompts))]
        # Batches of different sizes and adapter counts; the last, 40 prompts of ~1,200 tokens over
        # a 512-token budget, admits them over steps while 16 or more decode (split attention).
        for start, count in ((0, 9), (3, 18), (11, 29), (0, 40)):
            llm.generate(prompts[start:start + count], params[start:start + count],
                         lora_request=loras[start:start + count], use_tqdm=False)
        after = compiled_kernels()
        new = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        report(f"no Triton compile while serving after start-up (enforce_eager={enforce_eager})", not new,
               f"compiled: {new}" if new else "")
        if new:
            for name, keys in _variant_keys().items():
                if name in new:
                    print(f"  {name} variants:\n    " + "\n    ".join(sorted(keys)), flush=True)
        del llm
        release_memory()


def _variant_keys() -> dict[str, set[str]]:
    """Each loraplex Triton kernel's compiled variants, as Triton's cache keys (for a failure report)."""
    import importlib

    from triton.runtime.jit import JITFunction
    keys = {}
    for module_name in ("triton_attention", "triton_lora"):
        module = importlib.import_module(f"loraplex.kernels.{module_name}")
        for attr, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                keys[attr] = {str(k) for caches in fn.device_caches.values() for k in caches[0]}
    return keys


def check_pinned_adapter(report) -> None:
    """An adapter packed in page-locked memory (host_buffer.py) is pinned, is written into its slot
    without the host waiting for the GPU, reaches it intact, and may be freed while its copies
    are still queued: the next adapter of its size, loaded at once into the same (recycled)
    memory, waits for those copies before writing."""
    from adapters import write_peft_adapter
    from bench_cpu_lora_load import ALL_TARGETS, peft_shapes

    from loraplex.core.lora.adapter import load_lora_adapter
    from loraplex.core.lora.slots import LoRASlotStacks
    from loraplex.core.lora.targets import llama_lora_spec
    from loraplex.lora_request import LoRARequest
    shape = dict(num_layers=4, hidden_size=1024, num_heads=8, num_kv_heads=2, head_dim=128, intermediate_size=2048)
    spec = llama_lora_spec(**shape)
    stacks = LoRASlotStacks(spec, max_loras=2, max_lora_rank=16, dtype=torch.bfloat16, device="cuda")
    with tempfile.TemporaryDirectory() as tmp:
        paths = [write_peft_adapter(Path(tmp, name), rank=16, alpha=32, target_modules=ALL_TARGETS, num_layers=4,
                                    shapes=peft_shapes(shape), base_model_name_or_path="base", dtype=torch.bfloat16,
                                    seed=seed) for seed, name in enumerate("ab")]

        def load(i: int):
            return load_lora_adapter(LoRARequest("ab"[i], i + 1, str(paths[i])), spec, max_lora_rank=16,
                                     served_model_name="base", dtype=torch.bfloat16, pin_memory=True)
        adapter = load(0)
        registered = adapter.host_buffer.registered_address != 0
        pinned = all(t.is_pinned() for p in adapter.targets.values() for t in (p.lora_a, p.lora_b))
        expected = {name: (p.lora_a.clone(), p.lora_b.clone()) for name, p in adapter.targets.items()}
        address = adapter.host_buffer.registered_address
        torch.cuda._sleep(100_000_000)      # ~50 ms of GPU work ahead of the copies: they stay queued
        torch.cuda.set_sync_debug_mode("error")
        try:
            stacks.write_slot(1, adapter)       # on the step path: must not wait for the GPU
            no_wait = True
        except RuntimeError:
            no_wait = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
        del adapter
        gc.collect()                        # the buffer is freed now, its copies not yet done
        following = load(1)                 # into the same memory, once those copies are done
        recycled = following.host_buffer.registered_address == address
    torch.cuda.synchronize()
    intact = all(torch.equal(stacks.lora_a[name][:, 1].cpu(), a) and torch.equal(stacks.lora_b[name][:, 1].cpu(), b)
                 for name, (a, b) in expected.items())
    report("adapter in registered page-locked memory: pinned, slot written without waiting for the GPU and "
           "intact though freed while queued, its memory recycled at once",
           registered and pinned and no_wait and intact and recycled,
           f"registered={registered} pinned={pinned} no_wait={no_wait} intact={intact} recycled={recycled}")
