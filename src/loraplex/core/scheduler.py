"""Scheduler: decides, each step, which sequences compute how many tokens.

One step mixes decodes (one token each), prompt chunks and whole prompts under
two caps: max_num_seqs running sequences and max_num_batched_tokens tokens.

Phase 1 serves running sequences oldest first. A sequence whose pending token
(overlapped scheduling, see engine_core.py) will end it by length is skipped. Each gets its remaining tokens
(1 for a decode, the rest of a prompt for a chunked prefill) up to the token
budget. When its blocks cannot be allocated, the newest running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of
the waiting queue with num_computed_tokens=0, keeping its generated tokens,
which are recomputed as part of its next "prompt". If no other victim is left,
the sequence preempts itself.

Phase 2 (only when nothing was preempted, so that admission does not take the
blocks preemption just freed) admits waiting sequences in FCFS order while the
budget, max_num_seqs and the KV cache allow. With prefix caching a sequence first
takes the cached blocks of its prefix, and only the rest counts against the budget.
A prompt larger than the remaining budget is chunked; with long_prefill_token_threshold
(vLLM's) no sequence computes more than that many tokens in a step, in either phase, so a
long prompt is chunked even when the budget would take it whole. Admission stops at the first
sequence whose blocks do not fit (no overtaking on memory: the oldest request gets
memory first). An
AdmissionPolicy may refuse a sequence for other reasons (the LoRA slot cap);
then later sequences may pass it, as the policy allows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from loraplex.core.block_manager import BlockManager
from loraplex.core.sequence import ScheduledSeq, Sequence, SequenceStatus


class AdmissionPolicy(Protocol):
    def begin_step(self, running: list[Sequence], waiting: Iterable[Sequence] = ()) -> None:
        """Called once per step with the running sequences that stay scheduled and the waiting ones."""

    def can_admit(self, seq: Sequence) -> bool:
        """Whether the waiting `seq` may start now; called in FCFS order, once per step each."""


class AdmitAll:
    def begin_step(self, running: list[Sequence], waiting: Iterable[Sequence] = ()) -> None:
        pass

    def can_admit(self, seq: Sequence) -> bool:
        return True


class MaxLorasAdmission:
    """At most max_loras distinct adapters among running sequences.

    A sequence whose adapter would exceed the cap waits. Once one adapter
    sequence is refused, later sequences of adapters without a slot wait too,
    and so do sequences of adapters holding slots that arrived after that first
    refusal; base-model sequences are always admitted. Sequences of slot-holding
    adapters that were already waiting at the first refusal still join: the
    batch stays full (with many adapters and few slots, admitting only one
    sequence per adapter made tiny batches), and since no new ones join, the
    slot holders drain in bounded time and the refused sequence gets the slot.
    """

    def __init__(self, max_loras: int, pinned: Callable[[], set[int]] | None = None) -> None:
        self.max_loras = max_loras
        # Pinned adapters keep their device slots even in steps that do not use them.
        self._pinned_source = pinned or set
        self._active: set[int] = set()
        self._pinned: set[int] = set()
        self._blocked = False
        self._newest_waiting = -1
        # The first refused sequence, across steps, and the newest arrival_index
        # that was waiting when it was first refused.
        self._refused: Sequence | None = None
        self._drain_up_to = -1

    def begin_step(self, running: list[Sequence], waiting: Iterable[Sequence] = ()) -> None:
        self._active = {s.lora_request.lora_int_id for s in running if s.lora_request is not None}
        self._pinned = set(self._pinned_source())
        self._blocked = False
        self._newest_waiting = max((s.arrival_index for s in waiting), default=-1)

    def can_admit(self, seq: Sequence) -> bool:
        if seq.lora_request is None:
            return True
        lora_id = seq.lora_request.lora_int_id
        has_slot = lora_id in self._active or lora_id in self._pinned
        if self._blocked:
            return has_slot and seq.arrival_index <= self._drain_up_to
        if has_slot or len(self._active | self._pinned) < self.max_loras:
            self._active.add(lora_id)
            if seq is self._refused:
                self._refused = None
            return True
        self._blocked = True
        if seq is not self._refused:
            # A sequence that moved ahead of a still-waiting refused one (a preempted
            # one) keeps the older bound, so the bound never grows while anyone waits.
            older_still_waits = self._refused is not None and self._refused.status is SequenceStatus.WAITING
            self._refused = seq
            if not older_still_waits:
                self._drain_up_to = self._newest_waiting
        return False


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)     # those that were waiting, FCFS order
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, admission: AdmissionPolicy | None = None,
                 long_prefill_token_threshold: int = 0) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.admission = admission or AdmitAll()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []     # oldest first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        # Phase 1: running sequences, oldest first; preempt from the newest end.
        pending = deque(self.running)
        kept: list[Sequence] = []
        while pending:
            seq = pending.popleft()
            if seq.num_pending_tokens and seq.num_tokens >= seq.max_num_tokens:
                kept.append(seq)            # its pending token ends it (length): nothing to compute
                continue
            num_new = self._num_new_tokens(seq, budget)
            if num_new <= 0:
                kept.append(seq)            # budget spent: it waits this step, keeps its blocks
                continue
            target = seq.num_computed_tokens + num_new
            while not self.block_manager.can_allocate(seq, target):
                victim = pending.pop() if pending else seq
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self.block_manager.allocate(seq, target)
            self.block_manager.register_prefix(seq, target)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            kept.append(seq)
        self.running = kept

        # Phase 2: admit waiting sequences, FCFS.
        if not out.preempted:
            self.admission.begin_step(self.running, self.waiting)
            still_waiting: deque[Sequence] = deque()
            while self.waiting:
                seq = self.waiting[0]
                if budget <= 0 or len(self.running) >= self.max_num_seqs:
                    break
                if not self.admission.can_admit(seq):
                    still_waiting.append(self.waiting.popleft())
                    continue
                self.block_manager.reuse_prefix(seq)      # its cached prefix blocks, with prefix caching
                num_new = self._num_new_tokens(seq, budget)
                target = seq.num_computed_tokens + num_new
                if not self.block_manager.can_allocate(seq, target):
                    self.block_manager.free(seq)          # the shared blocks it took, if any
                    seq.num_computed_tokens = 0
                    break
                self.waiting.popleft()
                self.block_manager.allocate(seq, target)
                self.block_manager.register_prefix(seq, target)   # later admissions may share them
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                out.admitted.append(seq)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
            self.waiting.extendleft(reversed(still_waiting))

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _num_new_tokens(self, seq: Sequence, budget: int) -> int:
        """The tokens `seq` computes this step: what it has left, at most the threshold, within the budget."""
        num_new = seq.num_tokens - seq.num_computed_tokens
        if 0 < self.long_prefill_token_threshold < num_new:
            num_new = self.long_prefill_token_threshold
        return min(num_new, budget)

    def unschedule(self, plan: SchedulerOutput) -> None:
        """Undo a plan whose step did not run: the sequences it admitted go back to the front of
        the waiting queue with their blocks freed, and no block it was to compute stays in the
        prefix cache (a sequence sharing one would read keys and values nobody wrote)."""
        for item in plan.scheduled:
            self.block_manager.forget_uncomputed(item.seq)
        for seq in reversed(plan.admitted):
            if seq.status is SequenceStatus.RUNNING:
                self.running.remove(seq)
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                seq.status = SequenceStatus.WAITING
                self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Victims come newest first, so each goes in front of the previous one: FCFS holds.
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
