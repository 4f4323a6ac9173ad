"""The start-up warm-up (core/warmup.py) runs every step class and leaves no trace: the KV
cache and the LoRA slots are untouched and no step metadata is left behind. (On CUDA it is
what compiles the Triton variants; here it runs the same steps through the torch path.)"""

import torch
from adapters import write_peft_adapter
from runner_helpers import make_runner

from loraplex.core.warmup import warm_up
from loraplex.lora_request import LoRARequest


def test_warm_up_writes_nothing(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    runner = make_runner(path, enable_lora=True, max_loras=2, max_num_batched_tokens=64)
    adapter = write_peft_adapter(tmp_path / "a", rank=4, alpha=8, seed=1, base_model_name_or_path=str(path))
    request = LoRARequest("a", 1, str(adapter))
    runner.lora.manager.add_lora(request)
    runner.lora.manager.activate([request])   # slot 0 holds an adapter: warm-up steps read it
    runner.lora.manager.end_step()
    gen = torch.Generator().manual_seed(0)
    for k_cache, v_cache in runner.kv_cache.layers:
        k_cache.copy_(torch.randn(k_cache.shape, generator=gen))
        v_cache.copy_(torch.randn(v_cache.shape, generator=gen))
    caches = [(k.clone(), v.clone()) for k, v in runner.kv_cache.layers]
    slots = [(s.lora_a.clone(), s.lora_b.clone()) for s in runner.lora.stacks.stacks[0].values()]

    warm_up(runner)

    assert all(torch.equal(k, k0) and torch.equal(v, v0)
               for (k, v), (k0, v0) in zip(runner.kv_cache.layers, caches))
    assert all(torch.equal(s.lora_a, a0) and torch.equal(s.lora_b, b0)
               for s, (a0, b0) in zip(runner.lora.stacks.stacks[0].values(), slots))
    assert runner.lora.state.meta is None
    assert runner.lora.stacks.slot_rank(0) == 4


def test_warm_up_runs_every_class_of_lora_tiles(tiny_checkpoint, monkeypatch):
    # The eager path passes each step's exact adapter count; the LoRA tile configs (compile-time
    # constants on a GPU) depend on it only through config_bound, so warm-up must reach every class.
    from loraplex.kernels import lora_meta
    from loraplex.kernels.lora_tiles import FEW_ADAPTERS, config_bound
    max_loras = FEW_ADAPTERS + 2
    runner = make_runner(tiny_checkpoint("llama"), enable_lora=True, max_loras=max_loras, max_num_batched_tokens=32)
    bounds = []
    build = lora_meta.build_lora_meta

    def recording_build(token_slots, slot_ranks, max_loras, max_active_slots=None):
        bounds.append((token_slots.numel(), max_active_slots))
        return build(token_slots, slot_ranks, max_loras, max_active_slots)

    monkeypatch.setattr(lora_meta, "build_lora_meta", recording_build)
    warm_up(runner)
    classes = {config_bound(a, max_loras) for a in range(1, max_loras + 1)}
    assert classes == {FEW_ADAPTERS, max_loras}
    # The model passes at the WARMUP_TOKENS sizes (capped at max_num_batched_tokens), then the
    # LoRA kernels alone at every decode-tile count: all 32 here, in every class.
    warmed = {(n, config_bound(b, max_loras)) for n, b in bounds}
    assert warmed == {(n, c) for n in range(1, 33) for c in classes}


def test_lora_prefill_tiles_depend_only_on_the_row_tile_class():
    """Above DECODE_TILE_MAX_TOKENS warm-up runs only a few token counts (WARMUP_TOKENS and
    max_num_batched_tokens): that covers every compile-time choice of the LoRA kernels only
    while those choices depend on the count through the row-tile class alone. Checked at
    Llama-3-8B shapes for every count up to 8192 tokens."""
    from loraplex.core.warmup import WARMUP_TOKENS
    from loraplex.kernels.lora_tiles import (DECODE_TILE_MAX_TOKENS, FEW_ADAPTERS, expand_config,
                                             expand_split_bound, shrink_config, split_k_chunks)
    modules = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
               "down": (14336, (4096,))}
    max_batched = 8192
    for in_features, widths in modules.values():
        for adapters in (FEW_ADAPTERS, 32):
            def variant(n):
                shrink = shrink_config(n, in_features, len(widths) * 16,
                                       adapters, 132)
                _, split_k = split_k_chunks(in_features, shrink)
                compile_time = (shrink.block_m, shrink.block_n, shrink.block_k, shrink.num_warps, shrink.num_stages)
                return compile_time, expand_config(n, widths, 16, adapters, 132), expand_split_bound(split_k)
            warmed = {variant(n) for n in {*WARMUP_TOKENS, max_batched} if n > DECODE_TILE_MAX_TOKENS}
            reachable = {variant(n) for n in range(DECODE_TILE_MAX_TOKENS + 1, max_batched + 1)}
            assert reachable == warmed, (in_features, widths, adapters)
