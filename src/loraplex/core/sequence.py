"""Sequence: one generation stream (one of a request's `n` samples) as the engine tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    """
    seq_id: int
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    # Device slot of this sequence's LoRA adapter for the current step; -1 = base model.
    lora_slot: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass
class ScheduledSeq:
    """A sequence and how many of its tokens to compute in this step.

    The model runner computes token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    and returns logits for the last of them.
    """
    seq: Sequence
    num_new_tokens: int
