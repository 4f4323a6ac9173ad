"""Our model through ModelRunner vs transformers on the same checkpoint files (fp32).

Every case runs prompts of mixed lengths as one batch (prefill), then several decode
steps appending the argmax token, comparing each step's logits with transformers'
logits of the full sequence.
"""

from __future__ import annotations

import pytest
import torch
from runner_helpers import (BlockAllocator, decode, make_runner, new_sequences, prefill, random_prompts,
                            relative_error, step)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
CASES = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "llama3-rope": dict(arch="llama", rope_scaling=LLAMA3_ROPE),
    "linear-rope": dict(arch="llama", rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "llama-sharded": dict(arch="llama", num_shards=3),
    "mistral-sliding-window": dict(arch="mistral", sliding_window=8),
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tie_word_embeddings=True),
    "granite-tied": dict(arch="granite", tie_word_embeddings=True),
}
PROMPT_LENGTHS = [7, 1, 23, 12]
NUM_DECODE_STEPS = 4


def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_last_logits(model, token_ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0, -1]


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers_prefill_and_decode(tiny_checkpoint, case):
    kwargs = dict(CASES[case])
    path = tiny_checkpoint(kwargs.pop("arch"), **kwargs)
    runner, reference = make_runner(path), hf_model(path)
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size)
    seqs = new_sequences(random_prompts(PROMPT_LENGTHS, runner.vocab_size))

    logits = prefill(runner, allocator, seqs)
    for _ in range(NUM_DECODE_STEPS + 1):
        assert logits.dtype == torch.float32 and logits.shape == (len(seqs), runner.vocab_size)
        expected = torch.stack([hf_last_logits(reference, s.token_ids) for s in seqs])
        assert relative_error(logits, expected) < 1e-4, case
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        if len(seqs[0].token_ids) == PROMPT_LENGTHS[0] + NUM_DECODE_STEPS:
            break
        logits = decode(runner, allocator, seqs, logits)


def test_sliding_window_changes_the_result(tiny_checkpoint):
    """The Mistral case above only proves something if the window matters for these lengths."""
    windowed, full = make_runner(tiny_checkpoint("mistral", sliding_window=8)), make_runner(tiny_checkpoint("mistral"))
    prompt = random_prompts([23], windowed.vocab_size)
    outs = []
    for runner in (windowed, full):
        outs.append(prefill(runner, BlockAllocator(runner.num_kv_blocks, runner.block_size), new_sequences(prompt)))
    assert relative_error(outs[0], outs[1]) > 1e-2


def test_chunked_prefill_matches_transformers(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    runner, reference = make_runner(path), hf_model(path)
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=1)
    seqs = new_sequences(random_prompts([19, 10], runner.vocab_size, seed=3))
    # Chunks of uneven sizes, not aligned to block_size=4, batched with another sequence's chunks.
    for chunk in ([5, 3], [6, 7]):
        logits = step(runner, allocator, seqs, chunk)
        for seq, row in zip(seqs, logits):
            expected = hf_last_logits(reference, seq.token_ids[:seq.num_computed_tokens])
            assert relative_error(row, expected) < 1e-4
    logits = step(runner, allocator, seqs[:1], [8])
    assert relative_error(logits[0], hf_last_logits(reference, seqs[0].token_ids)) < 1e-4


def test_batch_invariance(tiny_checkpoint):
    """A prompt alone and inside a mixed batch (prefills + decodes) gives the same logits."""
    path = tiny_checkpoint("qwen2")
    runner = make_runner(path)
    prompt = random_prompts([13], runner.vocab_size, seed=5)
    alone = prefill(runner, BlockAllocator(runner.num_kv_blocks, runner.block_size), new_sequences(prompt))

    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size, seed=2)
    others = new_sequences(random_prompts([9, 30], runner.vocab_size, seed=6), first_id=10)
    decode(runner, allocator, others, prefill(runner, allocator, others))
    target = new_sequences(prompt)
    for seq in others:
        seq.token_ids.append(7)
    mixed = step(runner, allocator, [others[0], target[0], others[1]], [1, 13, 1])
    assert relative_error(mixed[1], alone[0]) < 1e-5
    assert int(mixed[1].argmax()) == int(alone[0].argmax())


def test_greedy_decoding_matches_transformers_generate(tiny_checkpoint):
    path = tiny_checkpoint("llama", tie_word_embeddings=True)
    runner, reference = make_runner(path), hf_model(path)
    prompts = random_prompts([6, 15], runner.vocab_size, seed=9)
    allocator = BlockAllocator(runner.num_kv_blocks, runner.block_size)
    seqs = new_sequences(prompts)
    logits = prefill(runner, allocator, seqs)
    num_new_tokens = 12
    for _ in range(num_new_tokens - 1):
        logits = decode(runner, allocator, seqs, logits)
    for seq, row in zip(seqs, logits):
        seq.token_ids.append(int(row.argmax()))
    for seq, prompt in zip(seqs, prompts):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=num_new_tokens, do_sample=False,
                                      min_new_tokens=num_new_tokens, pad_token_id=0)[0].tolist()
        assert seq.token_ids == expected


def test_execute_rejects_inconsistent_schedules(tiny_checkpoint):
    from loraplex.core.sequence import ScheduledSeq
    from loraplex.errors import InvalidRequestError, LoraplexError

    runner = make_runner(tiny_checkpoint("llama"), max_model_len=32)
    seq = new_sequences(random_prompts([10], runner.vocab_size))[0]
    with pytest.raises(LoraplexError, match="block table of 0 blocks cannot hold 10 tokens"):
        runner.execute([ScheduledSeq(seq, 10)])
    seq.block_table = [0, 1, 2]
    with pytest.raises(LoraplexError, match="cannot compute 11 token"):
        runner.execute([ScheduledSeq(seq, 11)])
    seq.block_table = [0, 1, runner.num_kv_blocks]
    with pytest.raises(LoraplexError, match="outside"):
        runner.execute([ScheduledSeq(seq, 10)])
    long_seq = new_sequences(random_prompts([40], runner.vocab_size))[0]
    long_seq.block_table = list(range(10))
    with pytest.raises(InvalidRequestError, match="max_model_len=32"):
        runner.execute([ScheduledSeq(long_seq, 40)])
    with pytest.raises(LoraplexError, match="at least one"):
        runner.execute([])


def test_config_without_architectures_uses_model_type():
    from loraplex.core.model_config import ModelConfig

    raw = {"model_type": "mistral", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 2, "sliding_window": 4}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == "MistralForCausalLM" and cfg.sliding_window == 4
