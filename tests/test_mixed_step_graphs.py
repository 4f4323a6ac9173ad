"""MixedStepGraphs' padded, static-buffer step (token buckets, attention between the pieces over
the real tokens only, LoRA variants) equals the eager step. On the CPU nothing is captured: the
same static-buffer forward runs eagerly, attention included, so everything but the capture is
checked here; the capture is checked on a GPU by benchmarks/gpu_check.py."""

import torch
from adapters import write_peft_adapter
from runner_helpers import BlockAllocator, decode, make_runner, new_sequences, prefill, random_prompts, step

from loraplex.core.mixed_step_graphs import TOKEN_BUCKETS, MixedStepGraphs, token_buckets
from loraplex.lora_request import LoRARequest

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_token_buckets():
    assert token_buckets(8192) == list(TOKEN_BUCKETS) and token_buckets(2048) == list(TOKEN_BUCKETS)
    assert token_buckets(300) == [64, 128, 192, 256, 300]
    assert token_buckets(64) == [64] and token_buckets(10) == [10]


def test_mixed_steps_equal_eager_steps_with_lora_and_padding(tiny_checkpoint, tmp_path):
    # The torch attention backend: the pieces hand it the same q/k/v slices they hand Triton's
    # (interpreted on the CPU, 20 s for this test), which benchmarks/gpu_check.py runs on a GPU.
    model_dir = tiny_checkpoint()
    adapters = [LoRARequest(f"a{i}", i + 1, str(write_peft_adapter(
        tmp_path / f"a{i}", rank=4 + 4 * i, target_modules=ALL_TARGETS, seed=i,
        base_model_name_or_path=str(model_dir)))) for i in range(2)]
    settings = dict(attention_backend="torch", enable_lora=True, max_loras=2, max_lora_rank=8, max_num_seqs=8,
                    max_num_batched_tokens=100, dtype="float32")
    eager, graphed = make_runner(model_dir, **settings), make_runner(model_dir, **settings)
    graphed.mixed_graphs = graphs = MixedStepGraphs(graphed)
    assert graphs.buckets == [64, 100]
    prompts = random_prompts([6, 1, 13, 9, 4, 30, 22], eager.vocab_size, seed=7)
    loras = [adapters[0], None, adapters[1], adapters[0], None, adapters[1], None]
    results = []
    for runner in (eager, graphed):
        allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=3)
        seqs = new_sequences(prompts, loras=loras)
        first, later = seqs[:5], seqs[5:]
        logits = [prefill(runner, allocator, first)]                       # 33 tokens: bucket 64
        logits.append(decode(runner, allocator, first, logits[-1]))
        # Mixed: five decodes beside two new prompts (5 + 52 tokens: bucket 64, 7 padding rows).
        for seq, row in zip(first, logits[-1]):
            seq.token_ids.append(int(row.argmax()))
        logits.append(step(runner, allocator, first + later, [1] * 5 + [30, 22]))
        logits.append(decode(runner, allocator, later, logits[-1][5:]))     # decode-only: no decode graphs here
        results.append((logits, runner.kv_cache.storage.clone()))
    assert graphs.num_replays == 4
    for ours, ref in zip(results[1][0], results[0][0]):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # Padding rows wrote nothing: the same slots are filled (the cache starts zeroed), with the same K/V.
    assert torch.equal(results[1][1] != 0, results[0][1] != 0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)


def test_steps_beyond_the_largest_bucket_run_eagerly(tiny_checkpoint):
    runner = make_runner(tiny_checkpoint(), max_num_seqs=4, max_num_batched_tokens=64)
    runner.mixed_graphs = graphs = MixedStepGraphs(runner)
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size)
    seqs = new_sequences(random_prompts([60, 5], runner.vocab_size, seed=1))
    logits = prefill(runner, allocator, seqs)                    # 65 tokens: more than the largest bucket
    assert graphs.num_replays == 0 and torch.isfinite(logits).all() and logits.shape[0] == 2
    decode(runner, allocator, seqs, logits)
    assert graphs.num_replays == 1


def test_the_engine_with_mixed_step_graphs_generates_the_same_tokens(tiny_checkpoint, tmp_path):
    # Through LLM.generate: overlapped scheduling (pending input ids filled on the device),
    # prompts arriving in chunks beside decodes (max_num_batched_tokens 48), adapters mixed
    # with the base model, logprobs. Greedy tokens equal the engine's without the graphs.
    from loraplex import LLM, SamplingParams
    model_dir = tiny_checkpoint()
    adapter = LoRARequest("a", 1, str(write_peft_adapter(tmp_path / "a", rank=4, target_modules=ALL_TARGETS,
                                                         seed=3, base_model_name_or_path=str(model_dir))))
    prompts = [f"request {i}: " + "many adapters, one base model " * (1 + i % 4) for i in range(10)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    outputs = []
    for graphed in (False, True):
        llm = LLM(model=str(model_dir), device="cpu", enable_lora=True, max_loras=1, max_lora_rank=4,
                  max_num_seqs=4, max_num_batched_tokens=48)
        runner = llm.llm_engine.runner
        if graphed:
            runner.mixed_graphs = graphs = MixedStepGraphs(runner)
        outs = llm.generate(prompts, params, lora_request=[adapter if i % 2 else None for i in range(10)],
                            use_tqdm=False)
        outputs.append([(o.outputs[0].token_ids, [sorted(lp) for lp in o.outputs[0].logprobs]) for o in outs])
    assert graphs.num_replays > 20
    assert outputs[1] == outputs[0]
