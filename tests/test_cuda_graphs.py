"""DecodeGraphs' static-buffer step (buckets, padding rows, LoRA slots regrouped from the static
buffer) equals the eager step. On the CPU nothing is captured: a "replay" runs the same
static-buffer forward eagerly, so everything but the capture itself is checked here; the
capture is checked on a GPU by benchmarks/gpu_check.py."""

import pytest
import torch
from adapters import write_peft_adapter
from runner_helpers import BlockAllocator, decode, make_runner, new_sequences, prefill, random_prompts

from loraplex.core.cuda_graphs import FEW_ADAPTERS, DecodeGraphs, capture_sizes, lora_graph_bound, lora_graph_bounds
from loraplex.lora_request import LoRARequest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_capture_sizes():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, 192, 224, 256]
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 96, 100]
    assert capture_sizes(1) == [1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_step_equals_eager_step_with_lora_and_padding(tiny_checkpoint, tmp_path, backend):
    model_dir = tiny_checkpoint()
    adapters = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(
        tmp_path / f"a{i}", rank=4 + 4 * i, target_modules=ALL_TARGETS, seed=i,
        base_model_name_or_path=str(model_dir)))) for i in range(2)]
    settings = dict(attention_backend=backend, enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
                    dtype="float32")
    eager, graphed = make_runner(model_dir, **settings), make_runner(model_dir, **settings)
    graphed.decode_graphs = DecodeGraphs(graphed)
    assert graphed.decode_graphs.sizes == [1, 2, 4, 8]
    # 5 sequences (bucket 8, 3 padding rows), then 3 (bucket 4): adapters mixed with the base model.
    prompts = random_prompts([6, 1, 13, 9, 4], eager.vocab_size, seed=7)
    loras = [adapters[0], None, adapters[1], adapters[0], None]
    results = []
    for runner in (eager, graphed):
        allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=3)
        seqs = new_sequences(prompts, loras=loras)
        logits = [prefill(runner, allocator, seqs)]
        for _ in range(3):
            logits.append(decode(runner, allocator, seqs, logits[-1]))
        seqs = seqs[1:4]
        for _ in range(2):
            logits.append(decode(runner, allocator, seqs, logits[-1][1:4] if len(logits[-1]) == 5 else logits[-1]))
        results.append((logits, runner.kv_cache.storage.clone()))
    assert graphed.decode_graphs.num_replays == 5
    for ours, ref in zip(results[1][0], results[0][0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # Padding rows wrote nothing: the same slots are filled (the cache starts zeroed), with the same K/V.
    assert torch.equal(results[1][1] != 0, results[0][1] != 0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_decode_steps_without_adapters_use_the_base_graph(tiny_checkpoint):
    runner = make_runner(tiny_checkpoint(), enable_lora=True, max_loras=2, max_num_seqs=4)
    runner.decode_graphs = graphs = DecodeGraphs(runner)
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size)
    seqs = new_sequences(random_prompts([3, 8, 2], runner.vocab_size, seed=1))
    logits = decode(runner, allocator, seqs, prefill(runner, allocator, seqs))
    assert graphs.num_replays == 1 and torch.isfinite(logits).all() and logits.shape[0] == 3


def test_lora_graph_bound_names_the_smallest_variant_that_covers_the_step():
    assert [lora_graph_bound(n, 32) for n in (0, 1, FEW_ADAPTERS, FEW_ADAPTERS + 1, 32)] == \
        [0, FEW_ADAPTERS, FEW_ADAPTERS, 32, 32]
    assert [lora_graph_bound(n, FEW_ADAPTERS) for n in (0, 1, FEW_ADAPTERS)] == [0, FEW_ADAPTERS, FEW_ADAPTERS]
    assert [lora_graph_bound(n, 3) for n in (0, 1, 3)] == [0, 3, 3]
    assert lora_graph_bounds(None) == (0,)
    assert lora_graph_bounds(32) == (0, FEW_ADAPTERS, 32)
    assert lora_graph_bounds(FEW_ADAPTERS) == (0, FEW_ADAPTERS)


def test_few_adapter_steps_replay_the_few_adapter_variant(tiny_checkpoint, tmp_path, monkeypatch):
    # max_loras above FEW_ADAPTERS: three variants per bucket. A step's distinct adapters pick
    # one (on the CPU the metadata's host check also proves the bound covers the slot map),
    # and every step's logits equal the eager runner's (which passes the exact count).
    from loraplex.core.lora import runtime
    built_bounds = []
    build = runtime.build_lora_meta
    monkeypatch.setattr(runtime, "build_lora_meta", lambda *args, max_active_slots: (
        built_bounds.append(max_active_slots), build(*args, max_active_slots=max_active_slots))[1])
    model_dir = tiny_checkpoint()
    num_adapters = FEW_ADAPTERS + 1
    adapters = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(
        tmp_path / f"a{i}", rank=2 + i % 3, target_modules=("q_proj", "v_proj", "down_proj"), seed=i,
        base_model_name_or_path=str(model_dir)))) for i in range(num_adapters)]
    settings = dict(enable_lora=True, max_loras=num_adapters + 1, max_lora_rank=4, max_num_seqs=12, dtype="float32")
    eager, graphed = make_runner(model_dir, **settings), make_runner(model_dir, **settings)
    graphed.decode_graphs = graphs = DecodeGraphs(graphed)
    assert set(graphs.graphs) == {(size, bound) for size in [1, 2, 4, 8, 12]
                                  for bound in (0, FEW_ADAPTERS, num_adapters + 1)}
    prompts = random_prompts([3 + i % 4 for i in range(num_adapters + 1)], eager.vocab_size, seed=5)
    loras = adapters + [None]
    # Steps over subsets of the sequences: 9 adapters + base, 8 adapters, 1 adapter + base, base only.
    subsets = [list(range(num_adapters + 1)), list(range(FEW_ADAPTERS)), [0, num_adapters], [num_adapters]]
    results = []
    for runner in (eager, graphed):
        allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=2)
        seqs = new_sequences(prompts, loras=loras)
        last = prefill(runner, allocator, seqs)                              # [num_seqs, vocab]
        logits = []
        for subset in subsets:
            step_logits = decode(runner, allocator, [seqs[i] for i in subset], last[subset])
            last = last.clone()
            last[subset] = step_logits
            logits.append(step_logits)
        results.append(logits)
    assert graphs.replays_per_bound == {num_adapters + 1: 1, FEW_ADAPTERS: 2, 0: 1}
    # Built eagerly with the exact count (the eager runner's prefill and decodes; the base-only
    # step builds none), then the graphed runner's prefill (eager), then its replays with the
    # variant's bound (a "replay" builds it on the CPU; the base-only variant builds none).
    assert built_bounds == [num_adapters, num_adapters, FEW_ADAPTERS, 1] + \
        [num_adapters, num_adapters + 1, FEW_ADAPTERS, FEW_ADAPTERS]
    for ours, ref in zip(results[1], results[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
