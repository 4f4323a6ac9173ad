"""The engine half on a GPU: correctness checks, then generation throughput.

    PYTHONPATH=src:tests python3 benchmarks/gpu_engine_check.py [--no-throughput] [--device cpu]

Checks (CI has no GPU, so these run here): greedy tokens on CUDA equal transformers'
generate() on the same tiny checkpoint; seeded sampling with filters and penalties is
the same alone and inside a mixed batch; n>1, logprobs, stop strings; the async engine
streams. Then tokens/s of a mid-size random Llama (bf16) at batch 1/8/32/128.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex import LLM, SamplingParams
from loraplex.core.async_engine import AsyncEngine
from loraplex.core.config import EngineConfig
from models import make_tiny_checkpoint

# Explicit KV budgets: several engines live in this one process, and the default
# (a fraction of the whole GPU each) would leave nothing for the second.
KV_BYTES = 256 * 2**20
PROMPTS = ["Hello", "The capital of France is", "the quick brown fox jumps over the lazy dog. hello", "42"]


def check_correctness(tmp: Path, device: str) -> None:
    path = make_tiny_checkpoint(tmp / "tiny", "llama")
    llm = LLM(model=str(path), device=device, dtype="float32", kv_cache_bytes=KV_BYTES)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(path))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt).input_ids
        ref = model.generate(torch.tensor([ids], device=device), do_sample=False, max_new_tokens=12,
                             min_new_tokens=12, pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref, (prompt, out.outputs[0].token_ids, ref)
    print("greedy on the device == transformers: ok")

    sampled = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
                             frequency_penalty=0.3, presence_penalty=0.2, seed=11, max_tokens=16,
                             logprobs=3, n=2)
    alone = llm.generate(PROMPTS[1], sampled, use_tqdm=False)[0]
    mixed = llm.generate(PROMPTS + [PROMPTS[1]], [greedy] * 4 + [sampled], use_tqdm=False)[-1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids
    assert all(len(c.logprobs) == 16 and c.cumulative_logprob < 0 for c in alone.outputs)
    print("seeded sampling (filters, penalties, n=2, logprobs) batch-invariant on the device: ok")

    text = outs[2].outputs[0].text
    stop = text[3:6] if len(text) > 6 else None
    if stop:
        cut = llm.generate(PROMPTS[2], SamplingParams(temperature=0, max_tokens=12, stop=stop),
                           use_tqdm=False)[0].outputs[0]
        assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop", (cut.text, text, stop)
        print("stop string on the device: ok")

    engine = AsyncEngine.from_config(EngineConfig(model=str(path), device=device, dtype="float32", kv_cache_bytes=KV_BYTES))

    async def stream():
        return [o async for o in engine.generate(PROMPTS[1], greedy, "a")]

    try:
        streamed = asyncio.run(stream())
    finally:
        engine.shutdown()
    assert streamed[-1].outputs[0].token_ids == outs[1].outputs[0].token_ids and len(streamed) == 12
    print("async engine on the device: ok")


def throughput(tmp: Path) -> None:
    path = make_tiny_checkpoint(tmp / "mid", "llama", hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                                head_dim=64, max_position_embeddings=2048, vocab_size=300,
                                dtype=torch.bfloat16)
    llm = LLM(model=str(path), device="cuda", dtype="bfloat16", max_model_len=1024,
              kv_cache_bytes=16 * KV_BYTES)
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate([[5] * 16] * 4, SamplingParams(max_tokens=4), use_tqdm=False)   # warm-up
    print("\n| batch | prompt | output | seconds | generated tokens/s |\n|---:|---:|---:|---:|---:|")
    for batch in (1, 8, 32, 128):
        prompts = [[(7 * i + j) % 290 + 3 for j in range(128)] for i in range(batch)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(f"| {batch} | 128 | 64 | {elapsed:.2f} | {tokens / elapsed:.0f} |")


def main() -> None:
    device = sys.argv[sys.argv.index("--device") + 1] if "--device" in sys.argv else "cuda"
    name = torch.cuda.get_device_name() if device == "cuda" else device
    print(f"{name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        check_correctness(Path(tmp), device)
        if "--no-throughput" not in sys.argv:
            throughput(Path(tmp))


if __name__ == "__main__":
    main()
