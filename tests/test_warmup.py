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
    step_sizes = {n for n, _ in bounds}
    assert step_sizes == {1, 9, 24, 32}
    for n in step_sizes:
        warmed = {config_bound(b, max_loras) for size, b in bounds if size == n}
        assert warmed == {config_bound(a, max_loras) for a in range(1, max_loras + 1)} == {FEW_ADAPTERS, max_loras}
