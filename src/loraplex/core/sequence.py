"""Sequence: one generation stream (one of a request's `n` samples) as the engine tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from loraplex.lora_request import LoRARequest


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """The fields the scheduler, block manager and model runner share.

    token_ids holds prompt + generated tokens. num_computed_tokens counts the
    tokens whose K/V are in the cache; the scheduler decides how many more to
    compute this step (a whole prompt, a prompt chunk, or one decode token).

    With overlapped scheduling a sequence may have one pending token: sampled by
    the step still in flight, its value is on the device only (row pending_row of
    that step's sampled ids). It counts in num_tokens, so the next step is
    scheduled to compute it, but it is not in token_ids until the engine reads it.
    """
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    # Device slot of this sequence's LoRA adapter for the current step; -1 = base model.
    lora_slot: int = -1
    # Engine-side state (set by LLMEngine; the runner ignores these).
    request_id: str = ""
    sample_index: int = 0               # which of the request's n samples this is
    arrival_index: int = 0              # FCFS order; preemption picks the largest
    lora_request: LoRARequest | None = None
    sampling_params: Any = None         # SamplingParams
    generator: Any = None               # torch.Generator of a seeded request, else None
    max_num_tokens: int = 0             # min(max_model_len, prompt + max_tokens): a length finish
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_pending_tokens: int = 0         # 0 or 1: sampled by the step in flight, value not read yet
    pending_row: int = -1               # its row in that step's sampled token ids
    # A multimodal request's items and encoder outputs (MultimodalState, shared by its n
    # sequences); the model runner reads it. None for text-only requests.
    mm: Any = None
    # Sampling state beyond SamplingParams: the request's token controls (sampler.TokenControls:
    # logit_bias, allowed_token_ids, bad words; shared by its n sequences), and this sequence's
    # structured-output matcher (structured_output.GrammarState). None when not used.
    token_controls: Any = None
    grammar: Any = None
    # prompt_logprobs (sample 0 of a request that asks for them): top k per prompt position, the
    # positions done so far (logits at position p score prompt token p + 1), and the entries
    # computed but not yet reported.
    prompt_logprobs_k: int | None = None
    num_prompt_logprobs_done: int = 0
    prompt_logprobs: list = field(default_factory=list)
    # Prefix caching (block_manager.py): what besides the tokens decides their keys and values
    # (None: this sequence neither reuses nor registers cached blocks), the chained hash of
    # each full block hashed so far, and how many of its blocks are registered.
    cache_salt: Any = None
    block_hashes: list | None = None
    num_registered_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class ScheduledSeq:
    """A sequence and how many of its tokens to compute in this step.

    The model runner computes token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    and returns logits for the last of them.
    """
    seq: Sequence
    num_new_tokens: int
