"""CPU engine benchmark: tokens/s of a tiny Llama at batch 1/8/32, and decode step time
versus batch size and context length.

    .venv/bin/python benchmarks/bench_cpu_engine.py [--threads N]

Builds a random Llama (hidden 256, 4 layers, 8 heads, 4 KV heads) in a temp dir
with tests/models.py, runs greedy generation through LLM, and prints two tables
(markdown, ready for docs/performance.md). Takes about a minute on 2 cores.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import make_tiny_checkpoint  # noqa: E402

from loraplex import LLM, SamplingParams  # noqa: E402

MODEL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, head_dim=32, max_position_embeddings=2048)


class StepTimer:
    """Wraps runner.execute to time each step, split into decode-only and prefill steps."""

    def __init__(self, runner) -> None:
        self.runner, self.execute = runner, runner.execute
        self.decode_steps: list[tuple[int, float]] = []   # (batch, seconds)
        runner.execute = self._timed

    def _timed(self, scheduled):
        start = time.perf_counter()
        logits = self.execute(scheduled)
        elapsed = time.perf_counter() - start
        if all(s.num_new_tokens == 1 for s in scheduled):
            self.decode_steps.append((len(scheduled), elapsed))
        return logits

    def reset(self) -> None:
        self.decode_steps = []


def prompts_of(llm: LLM, batch: int, length: int) -> list[list[int]]:
    vocab = llm.llm_engine.vocab_size
    return [[(7 * i + 13 * j) % (vocab - 3) + 3 for j in range(length)] for i in range(batch)]


def throughput(llm: LLM, timer: StepTimer, batch: int, prompt_len: int, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    timer.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts_of(llm, batch, prompt_len), params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    decode = [t for b, t in timer.decode_steps if b == batch]
    return {"batch": batch, "tokens": generated, "seconds": elapsed, "tok_s": generated / elapsed,
            "decode_ms": 1000 * statistics.median(decode) if decode else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_checkpoint(Path(tmp) / "llama-256x4", "llama", **MODEL)
        llm = LLM(model=str(path), device="cpu", max_model_len=1024, max_num_seqs=64,
                  max_num_batched_tokens=4096)
        timer = StepTimer(llm.llm_engine.runner)
        throughput(llm, timer, 2, 8, 4)                                   # warm-up

        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
              f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
              f"model hidden 256 x 4 layers, float32")
        print("\n| batch | prompt | generated tokens | seconds | tokens/s | decode step ms (median) |")
        print("|---:|---:|---:|---:|---:|---:|")
        for batch in (1, 8, 32):
            r = throughput(llm, timer, batch, 32, args.max_tokens)
            print(f"| {batch} | 32 | {r['tokens']} | {r['seconds']:.2f} | {r['tok_s']:.1f} | {r['decode_ms']:.1f} |")

        print("\n| batch | context (prompt) | decode step ms (median) | ms per sequence |")
        print("|---:|---:|---:|---:|")
        for batch in (1, 8):
            for context in (64, 256, 768):
                r = throughput(llm, timer, batch, context, 8)
                print(f"| {batch} | {context} | {r['decode_ms']:.1f} | {r['decode_ms'] / batch:.2f} |")


if __name__ == "__main__":
    main()
