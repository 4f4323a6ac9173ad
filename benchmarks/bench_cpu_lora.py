"""CPU multi-LoRA benchmark: tokens/s of one batch with 0, 1, 4 and 16 distinct adapters,
and the LoRA overhead against the base model without LoRA, measured in the same run.

    .venv/bin/python benchmarks/bench_cpu_lora.py [--threads N] [--rank R] [--batch B]

Builds the random Llama of bench_cpu_engine.py (hidden 256, 4 layers) and 16 random PEFT
adapters of rank R on all seven projections in a temp dir, then runs greedy generation of
`batch` prompts through LLM. Rows of a batch cycle through the adapters. Prints a markdown
table ready for docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from adapters import write_peft_adapter  # noqa: E402
from bench_cpu_engine import MODEL, StepTimer, prompts_of  # noqa: E402
from models import make_tiny_checkpoint  # noqa: E402

from loraplex import LLM, LoRARequest, SamplingParams  # noqa: E402

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_shapes() -> dict[str, tuple[int, int]]:
    hidden, inter = MODEL["hidden_size"], MODEL["intermediate_size"]
    q, kv = MODEL["num_attention_heads"] * MODEL["head_dim"], MODEL["num_key_value_heads"] * MODEL["head_dim"]
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def build_model_and_adapters(tmp: Path, count: int, rank: int) -> tuple[Path, list[LoRARequest]]:
    """The benchmark's random Llama and `count` random PEFT adapters (all seven projections)."""
    model_dir = make_tiny_checkpoint(tmp / "llama-256x4", "llama", **MODEL)
    adapters = [LoRARequest(f"bench-{i}", i + 1, str(write_peft_adapter(
        tmp / f"bench-{i}", rank=rank, alpha=2 * rank, target_modules=ALL_TARGETS,
        num_layers=MODEL["num_hidden_layers"], shapes=model_shapes(), seed=i,
        base_model_name_or_path=str(model_dir)))) for i in range(count)]
    return model_dir, adapters


def run_once(llm: LLM, timer: StepTimer, prompts, loras, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    timer.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    decode = [t for b, t in timer.decode_steps if b == len(prompts)]
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
            "decode_ms": 1000 * statistics.median(decode) if decode else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each row reports its best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, adapters = build_model_and_adapters(tmp, 16, args.rank)
        common = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=64,
                      max_num_batched_tokens=4096)
        base = LLM(model=str(model_dir), **common)
        lora = LLM(model=str(model_dir), enable_lora=True, max_loras=16, max_lora_rank=args.rank,
                   max_cpu_loras=16, **common)
        prompts = prompts_of(base, args.batch, args.prompt_len)
        timers = {id(base): StepTimer(base.llm_engine.runner), id(lora): StepTimer(lora.llm_engine.runner)}
        for llm in (base, lora):                                             # warm-up
            run_once(llm, timers[id(llm)], prompts[:2], [None, None] if llm is base else adapters[:2], 4)

        rows = [("base model, LoRA disabled", base, None)]
        for num in (0, 1, 4, 16):
            loras = [None] * args.batch if num == 0 else [adapters[i % num] for i in range(args.batch)]
            rows.append((f"LoRA enabled, {num} distinct adapters", lora, loras))
        # Rounds over all rows, best of each: load changes on a shared machine hit every row alike.
        best: dict[str, dict] = {}
        for _ in range(args.repeats):
            for label, llm, loras in rows:
                r = run_once(llm, timers[id(llm)], prompts, loras, args.max_tokens)
                if label not in best or r["tok_s"] > best[label]["tok_s"]:
                    best[label] = r
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, model hidden 256 x 4 layers, "
              f"float32, batch {args.batch}, prompt {args.prompt_len}, {args.max_tokens} generated tokens each, "
              f"adapters rank {args.rank} on all 7 projections, best of {args.repeats} rounds")
        print("\n| configuration | tokens/s | decode step ms (median) | overhead vs base (tokens/s) |")
        print("|---|---:|---:|---:|")
        reference = best[rows[0][0]]["tok_s"]
        for label, _, _ in rows:
            r = best[label]
            print(f"| {label} | {r['tok_s']:.1f} | {r['decode_ms']:.1f} | {reference / r['tok_s']:.2f}x |")

if __name__ == "__main__":
    main()
