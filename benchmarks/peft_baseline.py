"""The baseline of benchmarks/gpu_decode.py: HF transformers + PEFT with `adapter_names`.

A randomly initialised LlamaForCausalLM of the benchmark's shapes (bf16), the benchmark's
PEFT adapter directories loaded with load_adapter, and generate() on a mixed batch (each
row names its adapter) and on the base model. Decode tokens/s come from two generate()
calls (new_tokens and 1) so that the prefill is subtracted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peft_baseline(cfg: dict, adapter_paths: list[Path], batch: int, prompt_len: int, new_tokens: int,
                  device: str) -> dict:
    """Decode tokens/s of HF transformers + PEFT (`adapter_names`: a mixed batch), prefill subtracted."""
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")})
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    model.eval()
    t = time.perf_counter()
    model = PeftModel.from_pretrained(model, str(adapter_paths[0]), adapter_name="a0")
    for i, path in enumerate(adapter_paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    load_s = time.perf_counter() - t
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(10, cfg["vocab_size"], (batch, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(input_ids)
    out = {"peft_adapter_load_s": load_s}
    for label, names in (("32 adapters", [f"a{i % len(adapter_paths)}" for i in range(batch)]),
                         ("0 adapters", ["__base__"] * batch)):
        def generate(n):
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=mask, adapter_names=names, do_sample=False,
                               max_new_tokens=n, min_new_tokens=n, pad_token_id=0)
            sync(device)
            return time.perf_counter() - t
        generate(2)  # warm-up
        t_full, t_first = generate(new_tokens), generate(1)
        out[label] = {"total_s": t_full, "decode_tokens_per_s": batch * (new_tokens - 1) / (t_full - t_first),
                      "decode_step_ms": (t_full - t_first) / (new_tokens - 1) * 1e3}
        print(f"PEFT {label}: {json.dumps(out[label])}", flush=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
