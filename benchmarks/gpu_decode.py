"""Llama-3-8B-shaped multi-LoRA decode on a GPU: loraplex vs HF PEFT vs the bandwidth floor.

    PYTHONPATH=src python3 benchmarks/gpu_decode.py [--quick] [--skip-peft] [--out DIR] [--only SECTION ...]
    PYTHONPATH=src python3 benchmarks/gpu_decode.py --smoke     # tiny model on the CPU: checks the script

Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 layers, 32 heads / 8 KV
heads, vocab 128256), random bf16 weights built in memory (load_format="dummy"; only
config.json is written). Adapters: rank 16 on all seven projections, random, written as
PEFT directories (the same files PEFT loads for the baseline).

1. Decode: batch 1/32/64/128 x 0/1/8/32 distinct adapters (round robin), prompt 128
   tokens, 128 new tokens, greedy. Driven at the ModelRunner level (execute + argmax on
   the device + .tolist(), one host sync per step as in the engine); scheduler, sampler
   and detokenizer time are not included. Decode steps replay CUDA graphs.
2. HF transformers + PEFT, `adapter_names` mixed batch: batch 64 with 32 adapters and
   with none, 32 new tokens (fewer than ours, for time); decode tokens/s from two
   generate() calls (32 and 1 new tokens) so prefill is subtracted.
3. Bandwidth floor of each decode step: weights (all but the embedding, whose B rows are
   negligible) + KV cache read at the mean context + the active adapters' A and B,
   over the device-to-device copy bandwidth measured here (4 GiB, read + write).
4. Kernel micro-benchmarks (first; --skip-kernels to skip): gpu_lora_kernels.py's LoRA
   shrink+expand timings for qkv / gate_up / down at 64 and 4096 tokens with 1, 8 and 32
   adapters against their floor and a torch gather-and-bmm, and the in-layer cost.
5. Prefill: 16 x 512 tokens in one step, without and with 32 adapters.
6. Cold adapter: batch 32 decoding with 8 adapters; a request arrives for an adapter that
   is only on local disk; it loads on a thread (LoRAManager.add_lora) while decoding goes
   on, then the request is prefilled in the next step. Time to its first token vs the
   same for an adapter already loaded, and the others' step time during the load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.core.config import EngineConfig
from loraplex.core.model_runner import ModelRunner
from loraplex.core.sequence import ScheduledSeq, Sequence
from loraplex.lora_request import LoRARequest
from peft_baseline import peft_baseline

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                 bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, torch_dtype="bfloat16",
                 hidden_act="silu", attention_bias=False, mlp_bias=False)
PROJ = {"q_proj": ("self_attn", "hidden", "q"), "k_proj": ("self_attn", "hidden", "kv"),
        "v_proj": ("self_attn", "hidden", "kv"), "o_proj": ("self_attn", "q", "hidden"),
        "gate_proj": ("mlp", "hidden", "inter"), "up_proj": ("mlp", "hidden", "inter"),
        "down_proj": ("mlp", "inter", "hidden")}
RANK = 16
DEVICE = "cuda"
SMOKE_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=300)


SECTIONS = ["kernels", "decode", "prefill", "cold", "peft"]


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def log(*args):
    print(*args, flush=True)


def write_model_dir(root: Path, cfg: dict) -> Path:
    path = root / "model"
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_adapters(root: Path, cfg: dict, count: int) -> list[Path]:
    """PEFT adapter dirs, rank 16 on all seven projections, random A and B drawn on the GPU."""
    dims = {"hidden": cfg["hidden_size"], "q": cfg["num_attention_heads"] * cfg["head_dim"],
            "kv": cfg["num_key_value_heads"] * cfg["head_dim"], "inter": cfg["intermediate_size"]}
    paths = []
    for index in range(count):
        gen = torch.Generator(device=DEVICE).manual_seed(1000 + index)
        tensors = {}
        for layer in range(cfg["num_hidden_layers"]):
            for module, (parent, d_in, d_out) in PROJ.items():
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                a = torch.randn(RANK, dims[d_in], device=DEVICE, generator=gen) / dims[d_in] ** 0.5
                b = torch.randn(dims[d_out], RANK, device=DEVICE, generator=gen) * 0.05
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).cpu()
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).cpu()
        path = root / f"adapter{index}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 32,
            "target_modules": list(PROJ), "base_model_name_or_path": None, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
            "inference_mode": True}))
        paths.append(path)
    return paths


def adapter_bytes(cfg: dict) -> int:
    dims = {"hidden": cfg["hidden_size"], "q": cfg["num_attention_heads"] * cfg["head_dim"],
            "kv": cfg["num_key_value_heads"] * cfg["head_dim"], "inter": cfg["intermediate_size"]}
    per_layer = sum(RANK * (dims[i] + dims[o]) for _, i, o in PROJ.values())
    return 2 * per_layer * cfg["num_hidden_layers"]


def copy_bandwidth() -> float:
    if DEVICE != "cuda":
        src = torch.rand(2**22)
        t = time.perf_counter()
        src.clone()
        return 2 * src.numel() * 4 / (time.perf_counter() - t)
    src = torch.empty(2**30, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * 2**30 * 4 / statistics.median(times)


class Blocks:
    def __init__(self, num_blocks: int, block_size: int):
        self.free = list(range(num_blocks))
        random.Random(0).shuffle(self.free)
        self.block_size = block_size

    def ensure(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self.free.pop())

    def release(self, seqs) -> None:
        for s in seqs:
            self.free.extend(s.block_table)
            s.block_table = []


def new_seqs(runner, batch: int, prompt_len: int, loras: list, first_id: int, seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(batch):
        seq = Sequence(seq_id=first_id + i, token_ids=torch.randint(10, runner.vocab_size, (prompt_len,),
                                                                    generator=gen).tolist(),
                       num_prompt_tokens=prompt_len, lora_request=loras[i % len(loras)] if loras else None)
        seqs.append(seq)
    return seqs


def run_step(runner, blocks, work: list[tuple[Sequence, int]]) -> list[int]:
    """Compute the scheduled tokens; append the argmax of each sequence that finished its prompt."""
    for seq, n in work:
        blocks.ensure(seq, seq.num_computed_tokens + n)
    logits = runner.execute([ScheduledSeq(s, n) for s, n in work])
    next_ids = logits.argmax(-1).tolist()   # the engine's one sync per step
    for (seq, n), token in zip(work, next_ids):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(token)
    return next_ids


def prefill_all(runner, blocks, seqs, budget: int) -> None:
    pending = list(seqs)
    while pending:
        work, used = [], 0
        while pending and used + pending[0].num_tokens <= budget:
            seq = pending.pop(0)
            work.append((seq, seq.num_tokens))
            used += seq.num_tokens
        run_step(runner, blocks, work)


def decode_run(runner, blocks, batch, loras, prompt_len, new_tokens, seed) -> dict:
    seqs = new_seqs(runner, batch, prompt_len, loras, first_id=seed * 1000, seed=seed)
    prefill_all(runner, blocks, seqs, runner.config.max_num_batched_tokens)
    times = []
    for _ in range(new_tokens - 1):
        sync()
        t = time.perf_counter()
        run_step(runner, blocks, [(s, 1) for s in seqs])
        times.append(time.perf_counter() - t)
    blocks.release(seqs)
    steady = times[3:] if len(times) > 6 else times
    return {"step_ms": statistics.median(steady) * 1e3, "tokens_per_s": batch * len(times) / sum(times)}


def prefill_bench(runner, blocks, loras, num_seqs, length, repeats=3) -> float:
    times = []
    for r in range(repeats + 1):
        seqs = new_seqs(runner, num_seqs, length, loras, first_id=90000 + r * 100, seed=r)
        sync()
        t = time.perf_counter()
        run_step(runner, blocks, [(s, s.num_tokens) for s in seqs])
        times.append(time.perf_counter() - t)
        blocks.release(seqs)
    return num_seqs * length / statistics.median(times[1:])


def compiled_kernels() -> dict[str, int]:
    """Compiled variants of each loraplex Triton kernel (a step that adds some paid a JIT compile)."""
    import importlib

    from triton.runtime.jit import JITFunction
    counts = {}
    for name in ("triton_attention", "triton_lora", "triton_lora_meta", "triton_elementwise"):
        module = importlib.import_module(f"loraplex.kernels.{name}")
        for attr, fn in vars(module).items():
            if isinstance(fn, JITFunction):
                counts[attr] = sum(len(caches[0]) for caches in fn.device_caches.values())
    return counts


def cold_adapter(runner, blocks, loaded: list, cold: LoRARequest, warm: LoRARequest, prompt_len: int) -> dict:
    """Batch 32 decoding with 8 adapters; a request for `warm` (in a slot), later one for `cold` (on disk)."""
    seqs = new_seqs(runner, 32, prompt_len, loaded, first_id=50000, seed=77)
    prefill_all(runner, blocks, seqs, runner.config.max_num_batched_tokens)
    result, baseline = {}, []
    for label, request in (("warm", warm), ("cold", cold)):
        for _ in range(10):
            sync()
            t = time.perf_counter()
            run_step(runner, blocks, [(s, 1) for s in seqs])
            baseline.append(time.perf_counter() - t)
        newcomer = new_seqs(runner, 1, prompt_len, [request], first_id=60000 + len(result), seed=5)[0]
        arrival = time.perf_counter()
        loader = threading.Thread(target=runner.lora.manager.add_lora, args=(request,))
        loader.start()
        during = []
        while loader.is_alive():
            sync()
            t = time.perf_counter()
            run_step(runner, blocks, [(s, 1) for s in seqs])
            during.append(time.perf_counter() - t)
        loader.join()
        loaded_ms = (time.perf_counter() - arrival) * 1e3
        kernels_before = compiled_kernels() if DEVICE == "cuda" else {}
        run_step(runner, blocks, [(s, 1) for s in seqs] + [(newcomer, newcomer.num_tokens)])  # mixed step
        first_token_ms = (time.perf_counter() - arrival) * 1e3
        compiled = {k: n - kernels_before.get(k, 0) for k, n in (compiled_kernels() if DEVICE == "cuda" else {}).items()
                    if n != kernels_before.get(k, 0)}
        result[label] = {"first_token_ms": first_token_ms, "load_done_ms": loaded_ms,
                         "steps_during_load": len(during),
                         "step_ms_during_load": statistics.median(during) * 1e3 if during else None,
                         "kernels_compiled_in_first_step": compiled}
        blocks.release([newcomer])
    blocks.release(seqs)
    result["baseline_step_ms"] = statistics.median(baseline) * 1e3
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="2 layers, few configs: a smoke test")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks this script only")
    parser.add_argument("--skip-kernels", action="store_true",
                        help="skip the LoRA kernel micro-benchmarks (gpu_lora_kernels.py parts 2 and 3)")
    parser.add_argument("--no-shrink-overlap", action="store_true",
                        help="LoRA shrink after the base GEMM, not beside it on a side stream")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="run these sections only (default: all)")
    args = parser.parse_args()
    if args.skip_kernels:
        args.only = [s for s in args.only if s != "kernels"]
    if args.skip_peft:
        args.only = [s for s in args.only if s != "peft"]
    if args.no_shrink_overlap:
        from loraplex.kernels import lora as lora_ops
        lora_ops.SHRINK_BESIDE_GEMM = False
    global DEVICE
    DEVICE = "cpu" if args.smoke else "cuda"
    cfg = dict(LLAMA3_8B)
    prompt_len, new_tokens, peft_tokens = 128, 128, 32
    batches, adapter_counts = (1, 32, 64, 128), (0, 1, 8, 32)
    if args.quick:
        cfg["num_hidden_layers"] = 2
        new_tokens, peft_tokens, batches = 16, 4, (1, 64)
    if args.smoke:
        cfg.update(SMOKE_CONFIG)
        prompt_len, new_tokens, peft_tokens, batches = 8, 6, 3, (1, 32)
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)"
    results = {"device": name, "torch": torch.__version__, "config": cfg,
               "lora_shrink_beside_gemm": not args.no_shrink_overlap}
    if DEVICE == "cuda" and "kernels" in args.only:
        # 4. Kernel micro-benchmarks: shrink+expand as CUDA-graph replays against their floor
        # and a torch gather-and-bmm, then what the LoRA adds to each layer's GEMM.
        from gpu_lora_kernels import run_bench, run_in_layer
        run_bench(50)
        run_in_layer(50)
        torch.cuda.empty_cache()
    tmp = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    model_dir = write_model_dir(tmp, cfg)
    paths = write_adapters(tmp, cfg, 34)   # 32 served, 2 spare, the last one cold
    log(f"wrote 34 adapters in {time.perf_counter() - t:.1f} s")
    bandwidth = copy_bandwidth()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()   # the KV budget counts cached blocks as used
    results["copy_bandwidth_TBps"] = bandwidth / 1e12
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")

    t = time.perf_counter()
    runner = ModelRunner(EngineConfig(model=str(model_dir), load_format="dummy", dtype="bfloat16", device=DEVICE,
                                      enable_lora=True, max_loras=32, max_lora_rank=RANK, max_cpu_loras=40,
                                      max_num_seqs=128, max_model_len=640, max_num_batched_tokens=8192,
                                      gpu_memory_utilization=0.45))
    results["runner_init_s"] = time.perf_counter() - t
    num_graphs = len(runner.decode_graphs.graphs) if runner.decode_graphs is not None else 0
    log(f"runner init (random weights, KV, {num_graphs} graphs) "
        f"{results['runner_init_s']:.1f} s")
    requests = [LoRARequest(f"adapter{i}", i + 1, str(p)) for i, p in enumerate(paths)]
    for request in requests[:32]:
        runner.lora.manager.add_lora(request)
    blocks = Blocks(runner.num_kv_blocks, runner.block_size)

    weight_bytes = sum(p.numel() * p.element_size() for n, p in runner.model.named_parameters()
                       if "embed_tokens" not in n)
    kv_bytes_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * cfg["head_dim"] * 2
    per_adapter = adapter_bytes(cfg)
    results["weight_GB"], results["adapter_MB"] = weight_bytes / 1e9, per_adapter / 1e6

    rows = []
    for batch in (batches if "decode" in args.only else ()):
        for count in adapter_counts:
            if count > batch:
                continue
            r = decode_run(runner, blocks, batch, requests[:count], prompt_len, new_tokens, seed=batch + count)
            mean_ctx = prompt_len + new_tokens / 2
            floor_bytes = weight_bytes + batch * mean_ctx * kv_bytes_per_token + count * per_adapter
            r.update(batch=batch, adapters=count, floor_ms=floor_bytes / bandwidth * 1e3)
            r["vs_floor"] = r["step_ms"] / r["floor_ms"]
            rows.append(r)
            log(json.dumps(r))
    results["decode"] = rows

    if "prefill" in args.only:
        prefill = {label: prefill_bench(runner, blocks, loras, 16, 512 if not args.smoke else 16)
                   for label, loras in (("0 adapters", []), ("32 adapters", requests[:32]))}
        results["prefill_tokens_per_s"] = prefill
        log(f"prefill 16x512 tokens/s: {json.dumps(prefill)}")

    if "cold" in args.only:
        results["cold_adapter"] = cold_adapter(runner, blocks, requests[:8], cold=requests[33],
                                               warm=requests[0], prompt_len=prompt_len)
        log(f"cold adapter: {json.dumps(results['cold_adapter'])}")

    if "peft" in args.only:
        del runner
        gc.collect()   # the runner and its graphs reference each other
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        results["peft"] = peft_baseline(cfg, paths[:32], 64, prompt_len, peft_tokens, DEVICE)

    Path(args.out, "gpu_decode.json").write_text(json.dumps(results, indent=1))
    print_table(results)


def print_table(results: dict) -> None:
    log(f"\n{results['device']}, torch {results['torch']}, copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s, "
        f"weights read per step {results['weight_GB']:.2f} GB, adapter {results['adapter_MB']:.1f} MB")
    log("| batch | adapters | step ms (median) | tokens/s | floor ms | step / floor |")
    log("|---:|---:|---:|---:|---:|---:|")
    for r in results["decode"]:
        log(f"| {r['batch']} | {r['adapters']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
            f"{r['floor_ms']:.2f} | {r['vs_floor']:.2f} |")
    if "prefill_tokens_per_s" in results:
        p = results["prefill_tokens_per_s"]
        log(f"prefill 16x512: {p['0 adapters']:.0f} tok/s without, {p['32 adapters']:.0f} with 32 adapters "
            f"(ratio {p['32 adapters'] / p['0 adapters']:.2f})")
    if "cold_adapter" in results:
        c = results["cold_adapter"]
        during = c["cold"]["step_ms_during_load"]
        log(f"first token: loaded adapter {c['warm']['first_token_ms']:.1f} ms, cold (disk) "
            f"{c['cold']['first_token_ms']:.1f} ms (load {c['cold']['load_done_ms']:.1f} ms); others' step "
            f"{c['baseline_step_ms']:.2f} ms, during load {'n/a' if during is None else f'{during:.2f}'} ms "
            f"over {c['cold']['steps_during_load']} steps")
    if "peft" in results:
        ours = {(r["batch"], r["adapters"]): r["tokens_per_s"] for r in results["decode"]}
        for label, count in (("32 adapters", 32), ("0 adapters", 0)):
            peft = results["peft"][label]["decode_tokens_per_s"]
            if (64, count) in ours:
                log(f"batch 64, {label}: loraplex {ours[64, count]:.0f} tok/s, PEFT {peft:.0f} tok/s, "
                    f"ratio {ours[64, count] / peft:.1f}x")


if __name__ == "__main__":
    main()
