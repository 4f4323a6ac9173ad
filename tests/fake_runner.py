"""A deterministic stand-in for ModelRunner, for testing the scheduler and sampler alone.

It keeps a real paged "KV cache" of token ids: execute() writes each scheduled
token into the slot its block table names, then reads the whole context back
through the block table and derives the logits from it. A wrong block table,
a lost block or a wrong num_computed_tokens therefore changes the logits.
"""

from __future__ import annotations

import torch

from loraplex.core.sequence import ScheduledSeq


class FakeRunner:
    def __init__(self, *, vocab_size: int = 64, num_kv_blocks: int = 64, block_size: int = 4,
                 max_model_len: int = 256, eos_token_id: int | None = None, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.eos_token_ids = [] if eos_token_id is None else [eos_token_id]
        self.device = torch.device("cpu")
        self.cache = torch.full((num_kv_blocks, block_size), -1, dtype=torch.long)
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab_size, 16, generator=gen, dtype=torch.float64)  # [vocab, dim]
        self.unembed = torch.randn(16, vocab_size, generator=gen, dtype=torch.float64)
        self.batch_sizes: list[int] = []
        self.num_tokens_per_step: list[int] = []

    def context_logits(self, context: list[int]) -> torch.Tensor:
        """The logits this runner gives for the next token after `context`: [vocab] float32."""
        ids = torch.tensor(context)
        pos = torch.arange(len(context), dtype=torch.float64)
        weights = torch.cos(0.7 * pos)[:, None] + 1.5                          # [ctx, 1]
        hidden = torch.tanh((self.embed[ids] * weights).sum(0) / len(context) ** 0.5)
        hidden = hidden + self.embed[ids[-1]]                                   # [dim]
        return (4.0 * hidden @ self.unembed / 16 ** 0.5).float()                # [vocab]

    def execute(self, scheduled: list[ScheduledSeq], sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """sampled_token_ids: the previous step's, for a pending last token (as ModelRunner.execute)."""
        self.batch_sizes.append(len(scheduled))
        self.num_tokens_per_step.append(sum(s.num_new_tokens for s in scheduled))
        rows = []
        for item in scheduled:
            seq, start = item.seq, item.seq.num_computed_tokens
            end = start + item.num_new_tokens
            assert len(seq.block_table) * self.block_size >= end, "block table too short"
            for pos in range(start, end):
                block = seq.block_table[pos // self.block_size]
                if pos < len(seq.token_ids):
                    token = seq.token_ids[pos]
                else:
                    assert seq.num_pending_tokens and pos == len(seq.token_ids), "token not sampled yet"
                    token = int(sampled_token_ids[seq.pending_row])
                self.cache[block, pos % self.block_size] = token
            context = [int(self.cache[seq.block_table[p // self.block_size], p % self.block_size])
                       for p in range(end)]
            rows.append(self.context_logits(context))
        return torch.stack(rows)                                                # [batch, vocab]


class ScriptedRunner(FakeRunner):
    """Emits a fixed script of output tokens: output position i gets a one-hot-ish logit at script[i]."""

    def __init__(self, script: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.script = script

    def execute(self, scheduled: list[ScheduledSeq], sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        logits = super().execute(scheduled, sampled_token_ids)
        for row, item in enumerate(scheduled):
            seq = item.seq
            index = item.seq.num_computed_tokens + item.num_new_tokens - seq.num_prompt_tokens
            logits[row] = 0.0
            logits[row, self.script[min(index, len(self.script) - 1)]] = 20.0
        return logits


def fake_engine(runner=None, tokenizer=None, **config_kwargs):
    """An LLMEngine over a FakeRunner (or the given runner); config_kwargs go to EngineConfig."""
    from loraplex.core.config import EngineConfig
    from loraplex.core.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model="/no-such-model", **config_kwargs),
                     runner=runner or FakeRunner(), tokenizer=tokenizer)


def run_all(engine, requests) -> dict:
    """Add (request_id, prompt, params[, lora_request]) tuples, step to the end, return final outputs by id."""
    for request in requests:
        engine.add_request(*request)
    finals = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finals[output.request_id] = output
    return finals
