"""Drive a ModelRunner the way the engine does, with a test-side block allocator.

Blocks are handed out in shuffled order so every sequence's KV cache is scattered over
non-contiguous blocks, as it is after a while in a real engine.
"""

from __future__ import annotations

import random

import torch

from loraplex.core.config import EngineConfig
from loraplex.core.model_runner import ModelRunner
from loraplex.core.sequence import ScheduledSeq, Sequence


def make_runner(model_dir, **overrides) -> ModelRunner:
    settings = dict(model=str(model_dir), device="cpu", block_size=4, max_model_len=128,
                    kv_cache_bytes=1 << 20)
    settings.update(overrides)
    return ModelRunner(EngineConfig(**settings))


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.free = list(range(num_blocks))
        random.Random(seed).shuffle(self.free)
        self.block_size = block_size

    def ensure(self, seq: Sequence, num_tokens: int) -> None:
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self.free.pop())


def new_sequences(prompts: list[list[int]], first_id: int = 0, loras: list | None = None) -> list[Sequence]:
    """One Sequence per prompt; loras[i] (a LoRARequest or None) is sequence i's adapter."""
    loras = loras if loras is not None else [None] * len(prompts)
    return [Sequence(seq_id=first_id + i, token_ids=list(p), num_prompt_tokens=len(p), lora_request=lora)
            for i, (p, lora) in enumerate(zip(prompts, loras, strict=True))]


def step(runner: ModelRunner, allocator: BlockAllocator, seqs: list[Sequence],
         num_new: list[int]) -> torch.Tensor:
    """Compute the next `num_new[i]` tokens of each sequence; returns [len(seqs), vocab] logits."""
    scheduled = []
    for seq, n in zip(seqs, num_new):
        allocator.ensure(seq, seq.num_computed_tokens + n)
        scheduled.append(ScheduledSeq(seq, n))
    logits = runner.execute(scheduled)
    for seq, n in zip(seqs, num_new):
        seq.num_computed_tokens += n
    return logits


def prefill(runner, allocator, seqs) -> torch.Tensor:
    return step(runner, allocator, seqs, [s.num_tokens - s.num_computed_tokens for s in seqs])


def decode(runner, allocator, seqs, logits: torch.Tensor) -> torch.Tensor:
    """Append each sequence's argmax token, then compute it."""
    for seq, row in zip(seqs, logits):
        seq.token_ids.append(int(row.argmax()))
    return step(runner, allocator, seqs, [1] * len(seqs))


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).norm() / ref.float().norm())
