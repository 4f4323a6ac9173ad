"""Triton attention and CUDA graphs on a GPU: kernel matrix at real shapes, then the engine end to end.

    PYTHONPATH=src:tests python3 benchmarks/gpu_check.py [--skip-kernels] [--skip-engine]
    TRITON_INTERPRET=1 PYTHONPATH=src:tests python3 benchmarks/gpu_check.py --smoke   # CPU: part 2's code only

Part 1, kernels vs the torch reference (kernels/paged_attention.py, float32 math) in bf16
(some fp16/fp32): KV write, decode (batch 1..256, contexts 1..8k ragged, GQA 32/8, 32/32,
28/4, head_dim 128 and 64, auto and forced splits, sliding window), prefill and mixed
batches (chunked prefill over a cache, long prompts), shuffled block tables. The caching
allocator is filled with NaN first so unwritten outputs show; error = ||out - ref|| / ||ref||.
Also the fused norm / rotary / SiLU-and-mul kernels at 8B shapes, the LoRA kernels'
correctness matrix (gpu_lora_kernels.py part 1), the decode kernel replayed from a CUDA
graph with new lengths and tables, and the decode kernel's time at a few 8B-layer shapes.

Part 2, the engine: an adapter packed in page-locked memory reaches its slot intact even
when freed while its copies are queued; after start-up (graph capture and warm-up) serving
batches of many sizes and adapter counts compiles no Triton kernel; greedy outputs of LLM with Triton attention + CUDA graphs equal the
torch backend's eager outputs on tiny checkpoints (fp32; Llama and sliding-window
Mistral), with and without LoRA adapters in a mixed batch, both kinds of graphs replayed
(decode, and prefill/mixed in pieces), and with mixed steps whose 16 or more leading decodes
go to the decode kernel; a replayed decode step under
torch.cuda.set_sync_debug_mode("error"); graphs are used (replay counts). Exit code 1 on
any FAIL.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from gpu_serving_checks import check_no_compile_after_warm_up, check_pinned_adapter
from loraplex.kernels.paged_attention import paged_attention, write_kv_cache
from loraplex.kernels.triton_attention import (triton_paged_attention, triton_paged_decode,
                                               triton_paged_prefill, triton_write_kv_cache)

FAILURES: list[str] = []
DEVICE = "cuda"
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        FAILURES.append(name)


def poison_allocator() -> None:
    """Fill free cached memory with NaN so torch.empty hands out NaN, not stale values."""
    free = torch.cuda.mem_get_info()[0]
    chunk = torch.empty(int(free * 0.5) // 4, dtype=torch.float32, device="cuda")
    chunk.fill_(float("nan"))
    del chunk


def rel_err(out, ref) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_batch(query_lens, cached_lens, *, heads, kv_heads, head_dim, block_size=16, dtype=torch.bfloat16,
               seed=0, spare_blocks=8):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = [q + c for q, c in zip(query_lens, cached_lens)]
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + spare_blocks
    order = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(seq_lens), max(per_seq) + 2), device="cuda", generator=gen,
                           dtype=torch.int32)
    used = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = order[used:used + n]
        used += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    kc = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    vc = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, device="cuda", generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    return q, kc, vc, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32, device="cuda")


def ragged(n, high, seed, low=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n,), generator=gen).tolist()


def check_kernels() -> None:
    poison_allocator()
    shapes = [(32, 8, 128), (32, 32, 128), (28, 4, 128), (16, 2, 64)]
    # Decode.
    for heads, kv_heads, head_dim in shapes:
        for batch, max_ctx in [(1, 1), (1, 8191), (7, 600), (64, 2048), (128, 300), (256, 64)]:
            cached = ragged(batch, max_ctx - 1, seed=batch + max_ctx, low=0)
            q, kc, vc, tables, qsl, seq_lens = make_batch([1] * batch, cached, heads=heads, kv_heads=kv_heads,
                                                          head_dim=head_dim, seed=batch)
            ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, head_dim ** -0.5, max_query_len=1)
            for splits in (None, 1, 5):
                out = triton_paged_decode(q, kc, vc, tables, seq_lens, head_dim ** -0.5, num_splits=splits)
                err = rel_err(out, ref)
                report(f"decode h{heads}/{kv_heads} d{head_dim} B{batch} ctx<={max_ctx} splits={splits}",
                       err < TOL[torch.bfloat16], f"err={err:.2e}")
    for dtype in (torch.float16, torch.float32):
        q, kc, vc, tables, qsl, seq_lens = make_batch([1] * 9, ragged(9, 900, 3, low=0), heads=32, kv_heads=8,
                                                      head_dim=128, dtype=dtype, seed=9)
        ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.1, max_query_len=1)
        err = rel_err(triton_paged_decode(q, kc, vc, tables, seq_lens, 0.1), ref)
        report(f"decode {dtype} B9", err < TOL[dtype], f"err={err:.2e}")
    q, kc, vc, tables, qsl, seq_lens = make_batch([1] * 5, [0, 3, 100, 4000, 4095], heads=32, kv_heads=8,
                                                  head_dim=128, seed=5)
    ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.1, max_query_len=1, sliding_window=1024)
    err = rel_err(triton_paged_decode(q, kc, vc, tables, seq_lens, 0.1, sliding_window=1024), ref)
    report("decode sliding window 1024", err < TOL[torch.bfloat16], f"err={err:.2e}")

    # Prefill and mixed batches.
    for heads, kv_heads, head_dim in shapes[:3]:
        for name, qlens, cached in [("prefill 4x512", [512] * 4, [0] * 4),
                                    ("ragged prefill", ragged(6, 700, 1), [0] * 6),
                                    ("chunked over cache", ragged(5, 300, 2), ragged(5, 2000, 3, low=0)),
                                    ("mixed decode+prefill", [1] * 20 + [333, 64], ragged(22, 500, 4, low=0))]:
            q, kc, vc, tables, qsl, seq_lens = make_batch(qlens, cached, heads=heads, kv_heads=kv_heads,
                                                          head_dim=head_dim, seed=len(qlens))
            for window in (None, 256):
                ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.1, max_query_len=max(qlens),
                                      sliding_window=window)
                out = triton_paged_prefill(q, kc, vc, tables, qsl, seq_lens, 0.1, max_query_len=max(qlens),
                                           sliding_window=window)
                err = rel_err(out, ref)
                report(f"prefill h{heads}/{kv_heads} {name} window={window}", err < TOL[torch.bfloat16],
                       f"err={err:.2e}")
    for dtype in (torch.float16, torch.float32):
        q, kc, vc, tables, qsl, seq_lens = make_batch([70, 1, 200], [30, 90, 0], heads=32, kv_heads=8,
                                                      head_dim=128, dtype=dtype, seed=7)
        ref = paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.1, max_query_len=200)
        err = rel_err(triton_paged_attention(q, kc, vc, tables, qsl, seq_lens, 0.1), ref)
        report(f"prefill {dtype}", err < TOL[dtype], f"err={err:.2e}")

    # KV write: exact, padding skipped.
    q, kc, vc, tables, qsl, seq_lens = make_batch([1] * 64, [100] * 64, heads=32, kv_heads=8, head_dim=128)
    slots = torch.randperm(kc.shape[0] * kc.shape[1], device="cuda")[:300]
    slots[::7] = -1
    k = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(300, 8, 128, device="cuda", dtype=torch.bfloat16)
    rk, rv, tk, tv = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    write_kv_cache(k, v, rk, rv, slots)
    triton_write_kv_cache(k, v, tk, tv, slots)
    report("write_kv_cache exact with padding", torch.equal(rk, tk) and torch.equal(rv, tv))

    check_elementwise()
    check_lora_kernels()
    check_decode_graph()
    time_decode()


def check_lora_kernels() -> None:
    """gpu_lora_kernels.py's correctness matrix (82 cases), so one call checks every kernel."""
    from gpu_lora_kernels import run_checks
    report("LoRA kernel matrix (gpu_lora_kernels.py part 1)", run_checks())
    torch.cuda.empty_cache()


def check_elementwise() -> None:
    """The fused norm / rotary / SiLU-and-mul kernels at 8B shapes, bf16, against the torch modules."""
    from loraplex.core.layers import RMSNorm, silu_and_mul
    from loraplex.core.rotary import RotaryEmbedding
    from loraplex.kernels.triton_elementwise import triton_rms_norm, triton_rotary_, triton_silu_and_mul
    gen = torch.Generator(device="cuda").manual_seed(0)
    for tokens in (1, 64, 4099):
        norm = RMSNorm(4096, 1e-5, dtype=torch.bfloat16, device=torch.device("cuda"))
        norm.weight.data = (1 + 0.3 * torch.randn(4096, device="cuda", generator=gen)).bfloat16()
        x = (3 * torch.randn(tokens, 4096, device="cuda", generator=gen)).bfloat16()
        residual = torch.randn(tokens, 4096, device="cuda", generator=gen).bfloat16()
        ref_out, ref_res = norm(x, residual.clone())
        out = triton_rms_norm(x, norm.weight, norm.eps, residual)
        report(f"rms_norm+residual T{tokens}", rel_err(out, ref_out) < 1e-2 and torch.equal(residual, ref_res),
               f"err={rel_err(out, ref_out):.2e}")
        gate_up = torch.randn(tokens, 2 * 14336, device="cuda", generator=gen).bfloat16()
        err = rel_err(triton_silu_and_mul(gate_up), silu_and_mul(gate_up))
        report(f"silu_and_mul T{tokens}", err < 1e-2, f"err={err:.2e}")
        rotary = RotaryEmbedding(128, 8192, 500000.0, None, dtype=torch.bfloat16, device=torch.device("cuda"))
        qkv = torch.randn(tokens, 6144, device="cuda", generator=gen).bfloat16()
        positions = torch.randint(0, 8192, (tokens,), device="cuda", generator=gen)
        q, k, v = qkv.split([4096, 1024, 1024], dim=-1)
        q, k = q.view(tokens, 32, 128), k.view(tokens, 8, 128)
        ref_q, ref_k = rotary(positions, q.clone(), k.clone())
        triton_rotary_(positions, q, k, rotary.cos_sin_cache)
        err = max(rel_err(q, ref_q), rel_err(k, ref_k))
        report(f"rotary T{tokens}", err < 1e-2, f"err={err:.2e}")


def check_decode_graph() -> None:
    """Capture decode once (max_seq_len bound 4096), replay with new lengths/tables/queries.
    Batch 4 x 8 KV heads is few programs, so the captured launch splits the context (split-K)."""
    batch, heads, kv_heads, head_dim = 4, 32, 8, 128
    q, kc, vc, tables, qsl, seq_lens = make_batch([1] * batch, [4095] * batch, heads=heads, kv_heads=kv_heads,
                                                  head_dim=head_dim)
    static_q, static_tables, static_lens = q.clone(), tables.clone(), seq_lens.clone()
    out = triton_paged_decode(static_q, kc, vc, static_tables, static_lens, 0.1, max_seq_len=4096)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_paged_decode(static_q, kc, vc, static_tables, static_lens, 0.1, max_seq_len=4096)
    errs = []
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(100 + seed)
        static_q.copy_(torch.randn(q.shape, device="cuda", generator=gen).to(q.dtype))
        static_lens.copy_(torch.randint(1, 4097, (batch,), device="cuda", generator=gen, dtype=torch.int32))
        static_tables.copy_(static_tables[torch.randperm(batch, device="cuda", generator=gen)])
        graph.replay()
        ref = paged_attention(static_q, kc, vc, static_tables, qsl, static_lens, 0.1, max_query_len=1)
        errs.append(rel_err(out, ref))
    report("decode CUDA graph replay with new lengths/tables", max(errs) < TOL[torch.bfloat16],
           f"max err={max(errs):.2e}")


def copy_bandwidth() -> float:
    """Bytes/s of a 4 GiB device-to-device copy, read + write counted."""
    import triton.testing
    src = torch.empty(2**30, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def time_decode() -> None:
    import triton.testing
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (4 GiB D2D, read+write): {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for batch, ctx in [(1, 256), (1, 8192), (64, 256), (64, 2048), (128, 256), (128, 4096)]:
        # Eight layers' caches so repeated runs do not sit in L2.
        batches = [make_batch([1] * batch, [ctx - 1] * batch, heads=32, kv_heads=8, head_dim=128, seed=i,
                              spare_blocks=0) for i in range(8)]
        state = {"i": 0}

        def run():
            q, kc, vc, tables, qsl, seq_lens = batches[state["i"] % 8]
            state["i"] += 1
            triton_paged_decode(q, kc, vc, tables, seq_lens, 0.1, max_seq_len=ctx)
        ms = triton.testing.do_bench(run, warmup=20, rep=200, return_mode="median")
        kv_bytes = 2 * batch * ctx * 8 * 128 * 2
        floor_us = kv_bytes / bandwidth * 1e6
        rows.append((batch, ctx, ms * 1e3, floor_us))
    print("| batch | context | decode attention us/layer | KV bytes floor us | floor/time |")
    print("|---:|---:|---:|---:|---:|")
    for batch, ctx, us, floor in rows:
        print(f"| {batch} | {ctx} | {us:.1f} | {floor:.1f} | {floor / us:.2f} |", flush=True)


# --- Part 2: the engine ---------------------------------------------------------------------------

def _generate(path, prompts, lora_requests, **settings):
    from loraplex import LLM, SamplingParams
    llm = LLM(model=str(path), device=DEVICE, dtype="float32", max_model_len=256, max_num_seqs=16,
              kv_cache_bytes=64 << 20, **settings)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 5, 17, 9, 30, 12, 3)]
    outs = llm.generate(prompts, params, lora_request=lora_requests, use_tqdm=False)
    runner = llm.llm_engine.runner
    # (decode graph replays, mixed-step graph replays)
    replays = tuple(g.num_replays if g is not None else 0 for g in (runner.decode_graphs, runner.mixed_graphs))
    del llm, runner
    release_memory()
    return [o.outputs[0].token_ids for o in outs], replays


def release_memory() -> None:
    gc.collect()   # the runner and its graphs reference each other
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def check_engine() -> None:
    from adapters import write_peft_adapter
    from models import make_tiny_checkpoint
    from runner_helpers import random_prompts

    from loraplex import LoRARequest
    from loraplex.core.model_runner import MIXED_STEP_GRAPHS_ENV
    os.environ[MIXED_STEP_GRAPHS_ENV] = "1"   # on, whatever the caller's environment says
    release_memory()   # part 1 leaves large blocks in torch's cache
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for arch_kwargs in (dict(arch="llama"), dict(arch="mistral", sliding_window=8)):
            path = make_tiny_checkpoint(tmp / arch_kwargs["arch"], **arch_kwargs)
            prompts = [{"prompt_token_ids": p} for p in random_prompts([5, 17, 1, 40, 9, 23, 2], 300, seed=1)]
            adapters = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(
                tmp / f"{arch_kwargs['arch']}-a{i}", rank=8, alpha=16, seed=i, base_model_name_or_path=str(path),
                target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))))
                for i in range(3)]
            mixed = [adapters[0], None, adapters[1], adapters[2], None, adapters[0], adapters[1]]
            for label, lora_requests, lora_settings in [
                    ("no LoRA", None, {}),
                    ("LoRA enabled, none used", None, dict(enable_lora=True, max_loras=4, max_lora_rank=8)),
                    ("3 adapters mixed with base", mixed, dict(enable_lora=True, max_loras=4, max_lora_rank=8))]:
                ref, _ = _generate(path, prompts, lora_requests, attention_backend="torch", enforce_eager=True,
                                   **lora_settings)
                got, replays = _generate(path, prompts, lora_requests, attention_backend="triton", **lora_settings)
                report(f"engine {arch_kwargs} {label}: triton+graphs == torch eager",
                       got == ref and (min(replays) > 0 or DEVICE != "cuda"),
                       f"graph replays: decode {replays[0]}, prefill/mixed {replays[1]}")
            check_prefix_caching(path, mixed, arch_kwargs["arch"])
            if DEVICE == "cuda":
                check_split_attention(path, arch_kwargs["arch"])
                check_replay_has_no_sync(path)
                if arch_kwargs["arch"] == "llama":
                    check_no_compile_after_warm_up(path, tmp, report)


def check_prefix_caching(path, mixed, arch: str) -> None:
    """Prompts sharing a 40-token prefix, generated twice with prefix caching on the Triton backend
    and graphs: the tokens of torch eager without the cache, and the second pass reuses blocks."""
    from runner_helpers import random_prompts

    from loraplex import LLM, SamplingParams
    shared = random_prompts([40], 300, seed=7)[0]
    prompts = [{"prompt_token_ids": shared + p} for p in random_prompts([5, 17, 1, 40, 9, 23, 2], 300, seed=2)]
    settings = dict(enable_lora=True, max_loras=4, max_lora_rank=8)
    ref, _ = _generate(path, prompts, mixed, attention_backend="torch", enforce_eager=True, **settings)
    llm = LLM(model=str(path), device=DEVICE, dtype="float32", max_model_len=256, max_num_seqs=16,
              kv_cache_bytes=64 << 20, attention_backend="triton", enable_prefix_caching=True, **settings)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 5, 17, 9, 30, 12, 3)]
    runs = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=mixed, use_tqdm=False)]
            for _ in range(2)]
    hits = llm.llm_engine.block_manager.num_prefix_hits
    del llm
    release_memory()
    report(f"engine {arch} prefix caching (triton+graphs, adapters) == torch eager without it",
           runs[0] == ref and runs[1] == ref and hits > 0, f"tokens reused={hits}")


def check_split_attention(path, arch: str) -> None:
    """Prompts admitted a few per step (a 64-token budget) while 16 or more sequences decode: mixed
    steps whose leading decodes go to the decode kernel (triton_attention_backend.MIN_SPLIT_DECODES)
    give the tokens of torch eager, and such steps happened."""
    from runner_helpers import random_prompts

    from loraplex import LLM, SamplingParams
    from loraplex.core import triton_attention_backend
    lengths = [8 + (7 * i) % 23 for i in range(28)]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(lengths, 300, seed=3)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    split_steps = []
    forward = triton_attention_backend.TritonAttentionBackend.forward

    def counting(self, q, k, v, k_cache, v_cache, metadata, **kwargs):
        if not metadata.is_decode_only and metadata.num_leading_decodes >= triton_attention_backend.MIN_SPLIT_DECODES:
            split_steps.append(metadata.num_leading_decodes)
        return forward(self, q, k, v, k_cache, v_cache, metadata, **kwargs)
    outputs, llm = {}, None
    for backend in ("torch", "triton"):
        triton_attention_backend.TritonAttentionBackend.forward = counting
        try:
            llm = LLM(model=str(path), device=DEVICE, dtype="float32", max_model_len=256, max_num_seqs=32,
                      max_num_batched_tokens=64, kv_cache_bytes=64 << 20, attention_backend=backend,
                      enforce_eager=backend == "torch")
            outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            triton_attention_backend.TritonAttentionBackend.forward = forward
            llm = None
            release_memory()
    report(f"engine {arch} mixed steps with leading decodes split off: triton+graphs == torch eager",
           outputs["triton"] == outputs["torch"] and bool(split_steps),
           f"split attention calls {len(split_steps)}, most decodes {max(split_steps, default=0)}")


def check_replay_has_no_sync(path) -> None:
    from runner_helpers import BlockAllocator, new_sequences, prefill, random_prompts, step

    from loraplex.core.config import EngineConfig
    from loraplex.core.model_runner import ModelRunner
    runner = ModelRunner(EngineConfig(model=str(path), device="cuda", dtype="float32", max_model_len=128,
                                      max_num_seqs=8, kv_cache_bytes=16 << 20))
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size)
    seqs = new_sequences(random_prompts([7, 30, 2], runner.vocab_size, seed=2))
    logits = prefill(runner, allocator, seqs)
    for s, row in zip(seqs, logits):
        s.token_ids.append(int(row.argmax()))
    before = runner.decode_graphs.num_replays
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(runner, allocator, seqs, [1, 1, 1])
        ok, detail = runner.decode_graphs.num_replays == before + 1, ""
    except RuntimeError as e:
        ok, detail = False, str(e)[:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    report("replayed decode step has no host sync", ok, detail)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU (TRITON_INTERPRET=1): run part 2 without graphs, to check this script")
    args = parser.parse_args()
    global DEVICE
    if args.smoke:
        DEVICE, args.skip_kernels = "cpu", True
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)"
    print(json.dumps({"torch": torch.__version__, "device": name}), flush=True)
    if not args.skip_kernels:
        check_kernels()
    if not args.skip_engine:
        if DEVICE == "cuda":
            check_pinned_adapter(report)
        check_engine()
    print(f"{len(FAILURES)} FAILED: {FAILURES}" if FAILURES else "ALL PASSED", flush=True)
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
