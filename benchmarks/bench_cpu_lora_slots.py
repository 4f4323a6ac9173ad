"""CPU benchmark of max_loras: one generate() of many requests over more adapters than slots.

    .venv/bin/python benchmarks/bench_cpu_lora_slots.py [--threads N] [--requests R] [--adapters A]

Builds the random Llama of bench_cpu_engine.py (hidden 256, 4 layers) and A random PEFT
adapters (rank 16, all seven projections) in a temp dir. R prompts cycle through the base
model and the A adapters; the same generate() runs with several max_loras values. With
fewer slots than adapters, the scheduler runs the adapters in waves of max_loras, so steps
grow about as A / max_loras and each step's batch shrinks accordingly. Prints a markdown
table ready for docs/performance.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from bench_cpu_engine import prompts_of  # noqa: E402
from bench_cpu_lora import build_model_and_adapters  # noqa: E402

from loraplex import LLM, SamplingParams  # noqa: E402

RANK = 16


def run_once(llm: LLM, prompts, loras, max_tokens: int) -> dict:
    scheduler = llm.llm_engine.scheduler
    steps, seqs_per_step = 0, 0
    schedule = scheduler.schedule

    def counted_schedule():
        nonlocal steps, seqs_per_step
        plan = schedule()
        steps += not plan.is_empty
        seqs_per_step += len(plan.scheduled)
        return plan

    scheduler.schedule = counted_schedule
    try:
        start = time.perf_counter()
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                            lora_request=loras, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        del scheduler.schedule
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tok_s": tokens / elapsed, "seconds": elapsed, "steps": steps, "batch": seqs_per_step / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--max-loras", type=int, nargs="+", default=[2, 4, 12])
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="rounds; each row reports its best")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir, adapters = build_model_and_adapters(tmp, args.adapters, RANK)
        choices = [None] + adapters
        loras = [choices[i % len(choices)] for i in range(args.requests)]
        common = dict(device="cpu", dtype="float32", max_model_len=512, max_num_seqs=256,
                      max_num_batched_tokens=4096, enable_lora=True, max_lora_rank=RANK,
                      max_cpu_loras=args.adapters)
        llms = {n: LLM(model=str(model_dir), max_loras=n, **common) for n in args.max_loras}
        prompts = prompts_of(next(iter(llms.values())), args.requests, args.prompt_len)
        for llm in llms.values():                                            # warm-up, loads every adapter
            llm.generate(prompts[:len(choices)], SamplingParams(max_tokens=2), lora_request=choices,
                         use_tqdm=False)
        best: dict[int, dict] = {}
        for _ in range(args.repeats):
            for n, llm in llms.items():
                r = run_once(llm, prompts, loras, args.max_tokens)
                if n not in best or r["tok_s"] > best[n]["tok_s"]:
                    best[n] = r
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, model hidden 256 x 4 layers, "
              f"float32, {args.requests} requests over the base model and {args.adapters} adapters (rank {RANK}, "
              f"all 7 projections), prompt {args.prompt_len}, {args.max_tokens} generated tokens each, "
              f"best of {args.repeats} rounds")
        print("\n| max_loras | seconds | tokens/s | steps | mean sequences per step |")
        print("|---:|---:|---:|---:|---:|")
        for n in args.max_loras:
            r = best[n]
            print(f"| {n} | {r['seconds']:.1f} | {r['tok_s']:.1f} | {r['steps']} | {r['batch']:.1f} |")


if __name__ == "__main__":
    main()
