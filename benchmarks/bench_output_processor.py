"""Host cost of turning one step's tokens into outputs, per output kind (no model, no HTTP).

B streaming requests with P-token prompts have O tokens each already; one more step gives each
a token. Measured: OutputProcessor.process() of that step (detokenizing, stop strings, building
the RequestOutputs) and reading what is new out of each output, as the server does: slicing the
cumulative text and ids (CUMULATIVE, what the server read before 2026-12-05) or taking them whole
(DELTA, what it asks for now). Median of --repeats steps, per step and per token.

    .venv/bin/python benchmarks/bench_output_processor.py [--batch 64] [--prompt-lens 128 2048] [--output-len 512]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def measure(tokenizer, kind, batch: int, prompt_len: int, output_len: int, repeats: int) -> float:
    from loraplex import RequestOutputKind, SamplingParams
    from loraplex.core.output_processor import OutputProcessor, SeqOutput
    from loraplex.core.request import Request

    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=output_len + repeats + 1, stop=["\n\n"], output_kind=kind)
    vocab = [t for t in range(100, 400)]
    for i in range(batch):
        processor.add_request(Request(f"r{i}", None, [vocab[(i + j) % len(vocab)] for j in range(prompt_len)], params))
    seen = {f"r{i}": (0, 0) for i in range(batch)}

    def step(n: int) -> None:
        outputs, _ = processor.process([SeqOutput(f"r{i}", 0, vocab[(n * 7 + i) % len(vocab)], None, None, None)
                                        for i in range(batch)])
        for out in outputs:   # what the server reads out of each
            comp = out.outputs[0]
            if kind == RequestOutputKind.DELTA:
                new_text, new_ids = comp.text, list(comp.token_ids)
            else:
                chars, tokens = seen[out.request_id]
                ids = list(comp.token_ids)
                new_text, new_ids = comp.text[chars:], ids[tokens:]
                prompt = list(out.prompt_token_ids)
                seen[out.request_id] = (len(comp.text), len(ids))

    for n in range(output_len):
        step(n)
    times = []
    for n in range(repeats):
        start = time.perf_counter()
        step(output_len + n)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 2048])
    parser.add_argument("--output-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    from loraplex import RequestOutputKind
    from loraplex.core.tokenizer import Tokenizer
    from models import write_tiny_tokenizer

    tokenizer = Tokenizer(write_tiny_tokenizer(tempfile.mkdtemp()))
    print(f"batch {args.batch}, {args.output_len} output tokens so far; median of {args.repeats} steps")
    print(f"{'prompt':>7} {'kind':>11} {'ms/step':>8} {'us/token':>9}")
    for prompt_len in args.prompt_lens:
        for kind in (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA):
            seconds = measure(tokenizer, kind, args.batch, prompt_len, args.output_len, args.repeats)
            print(f"{prompt_len:>7} {kind.name:>11} {seconds * 1e3:8.3f} {seconds / args.batch * 1e6:9.1f}")


if __name__ == "__main__":
    main()
