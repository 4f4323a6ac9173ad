"""Prefix caching on the CPU: the demo model, many requests sharing a long prompt prefix.

N requests (round robin over the base model and two shipped adapters) whose prompts share
a prefix of about --prefix-chars characters (the demo's tokenizer: one token per
character) and end in a few characters of their own, greedy, --max-tokens each, through
`LLM.generate` twice in a row (the second time every prefix is cached), with and without
`enable_prefix_caching`. Reports seconds, prompt tokens computed (the engine's step
tokens), the cache's hit rate, and whether the outputs are identical.

    .venv/bin/python benchmarks/bench_prefix_caching.py [--requests 48] [--prefix-chars 180] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def run(enable: bool, args) -> dict:
    from loraplex import LLM, LoRARequest, SamplingParams
    from loraplex.demo import demo_adapters_dir, demo_model_path
    from loraplex.lora_request import lora_id_for_name

    loras = [None] + [LoRARequest(n, lora_id_for_name(n), str(demo_adapters_dir() / n)) for n in ("upper", "reverse")]
    base = "the quick brown fox jumps over the lazy dog. "
    system = "Input: " + (base * (args.prefix_chars // len(base) + 1))[:args.prefix_chars]
    prompts = [system + f" #{i}\nOutput: " for i in range(args.requests)]
    llm = LLM(str(demo_model_path()), device="cpu", enable_lora=True, max_loras=3, max_lora_rank=32,
              max_num_seqs=args.max_num_seqs, enable_prefix_caching=enable)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    start = time.perf_counter()
    outputs = []
    for _ in range(2):
        outputs += llm.generate(prompts, params, lora_request=[loras[i % 3] for i in range(len(prompts))],
                                use_tqdm=False)
    seconds = time.perf_counter() - start
    manager = llm.llm_engine.block_manager
    return {"seconds": seconds, "step_tokens": llm.llm_engine.get_stats().num_step_tokens,
            "hit_rate": manager.num_prefix_hits / max(1, manager.num_prefix_queries),
            "tokens": [o.outputs[0].token_ids for o in outputs], "prompt_len": len(outputs[0].prompt_token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--prefix-chars", type=int, default=180)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    results = {False: [], True: []}
    for _ in range(args.runs):                    # alternate, so machine load hits both alike
        for enable in (False, True):
            results[enable].append(run(enable, args))
    same = all(r["tokens"] == results[False][0]["tokens"] for r in results[False] + results[True])
    print(f"{args.requests} requests x 2 rounds, prompts of {results[False][0]['prompt_len']} tokens sharing "
          f"~{args.prefix_chars + 7}, {args.max_tokens} output tokens; median (range) of {args.runs} runs")
    for enable in (False, True):
        secs = [r["seconds"] for r in results[enable]]
        r = results[enable][0]
        print(f"prefix caching {'on ' if enable else 'off'}: {statistics.median(secs):.2f} s "
              f"({min(secs):.2f}-{max(secs):.2f}), tokens computed {r['step_tokens']}, hit rate {r['hit_rate']:.2f}")
    print(f"outputs identical: {same}")


if __name__ == "__main__":
    main()
