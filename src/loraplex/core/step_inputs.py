"""StepInputs: the flat device tensors of one model step, built once on the host with numpy.

For sequences b = 0..B-1, each computing n_b new tokens from position c_b (its
num_computed_tokens), the step holds sum(n_b) tokens laid out sequence after sequence:

    input_ids, positions       [num_tokens]
    slot_mapping               [num_tokens]  block_table[p // block_size] * block_size + p % block_size
    query_start_loc            [B + 1]       cumulative n_b
    seq_lens                   [B]           c_b + n_b
    block_tables               [B, max_blocks], rows padded with block 0

`host_step_inputs` builds them as numpy arrays (HostStepInputs), with the step's LoRA slot
of each token once the adapters are in slots; that is all a step needs, and what rank 0 of
a tensor-parallel group sends to the other ranks. `to_device` makes the StepInputs the
forward pass reads.

A sequence's last token may be pending (overlapped scheduling, see sequence.py): its
value is only on the device, in the previous step's sampled ids. Its input id is then 0
here and `pending` says where it goes; fill_pending_tokens writes it on the device.

A request that asks for prompt_logprobs needs the logits of every prompt position, not
only of each sequence's last token: `prompt_positions` lists those tokens' flat indices,
and the runner returns their logits after the scheduled rows' (logits_indices covers both).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from loraplex.core.attention import AttentionMetadata
from loraplex.core.sequence import ScheduledSeq
from loraplex.core.transfer import device_tensor
from loraplex.errors import InvalidRequestError, LoraplexError


@dataclass
class PendingTokens:
    """Input ids the host does not know yet: input_ids[index[i]] = previous step's sampled[rows[i]]."""
    index: list[int]
    rows: list[int]


@dataclass
class StepInputs:
    input_ids: torch.Tensor   # [num_tokens] int64
    positions: torch.Tensor   # [num_tokens] int64
    metadata: AttentionMetadata
    pending: PendingTokens | None = None


def fill_pending_tokens(input_ids: torch.Tensor, pending: PendingTokens | None,
                        pending_ids: torch.Tensor | None) -> None:
    """Write the pending tokens' values (ModelRunner._pending_ids: [k], on the device) into input_ids."""
    if pending is None:
        return
    input_ids.index_copy_(0, device_tensor(pending.index, torch.long, input_ids.device), pending_ids)


@dataclass
class HostStepInputs:
    """One step on the host (numpy; picklable). Shapes as in the module docstring."""
    input_ids: np.ndarray        # int64
    positions: np.ndarray        # int64
    slot_mapping: np.ndarray     # int64
    query_start_loc: np.ndarray  # int64
    seq_lens: np.ndarray         # int64
    block_tables: np.ndarray     # int32
    max_query_len: int
    max_seq_len: int
    is_decode_only: bool
    # LoRA: the slot of each token ([num_tokens] int32, -1 = base model), None when no token of
    # the step uses an adapter; and the step's number of distinct adapters (sizes kernel grids).
    token_slots: np.ndarray | None = None
    num_adapters: int = 0
    # Multimodal: the flat indices of placeholder tokens ([k] int64) and the encoder's rows for
    # them ([k, hidden], on rank 0's device). The rows are not pickled: under tensor parallelism
    # the other ranks get them by broadcast (ModelRunner.run).
    mm_indices: np.ndarray | None = None
    mm_embeds: torch.Tensor | None = None
    # Overlapped scheduling: input ids still on the device (see the module docstring).
    pending: PendingTokens | None = None
    # Flat indices of prompt positions whose logits are returned too (prompt_logprobs), or None.
    prompt_positions: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return dict(self.__dict__, mm_embeds=None)

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def logits_indices(self) -> np.ndarray:
        """The tokens whose logits the step returns: each sequence's last, then the prompt positions."""
        last = self.query_start_loc[1:] - 1
        return last if self.prompt_positions is None else np.concatenate([last, self.prompt_positions])

    def to_device(self, device: torch.device) -> StepInputs:
        return StepInputs(_to_device(self.input_ids, torch.int64, device),
                          _to_device(self.positions, torch.int64, device), self.attention_metadata(device),
                          self.pending)

    def attention_metadata(self, device: torch.device) -> AttentionMetadata:
        """The step's AttentionMetadata on `device` (a graph replay copies its ids and positions itself)."""
        single = np.diff(self.query_start_loc) == 1
        return AttentionMetadata(
            slot_mapping=_to_device(self.slot_mapping, torch.int64, device),
            query_start_loc=_to_device(self.query_start_loc, torch.int32, device),
            seq_lens=_to_device(self.seq_lens, torch.int32, device),
            block_tables=_to_device(self.block_tables, torch.int32, device),
            logits_indices=_to_device(self.logits_indices(), torch.int64, device),
            max_query_len=self.max_query_len, max_seq_len=self.max_seq_len, is_decode_only=self.is_decode_only,
            num_leading_decodes=len(single) if single.all() else int(single.argmin()))


def _to_device(array: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return device_tensor(np.ascontiguousarray(array), dtype, device)


def prompt_logprob_rows(scheduled: list[ScheduledSeq]) -> list[tuple[int, object, int, int]]:
    """(row, sequence, start, end) of the scheduled sequences that need prompt logprobs: their
    positions start..end-1, computed in this step, each score the prompt token after it."""
    rows = []
    for b, s in enumerate(scheduled):
        seq = s.seq
        if seq.prompt_logprobs_k is None:
            continue
        start = max(seq.num_computed_tokens, seq.num_prompt_logprobs_done)
        end = min(seq.num_computed_tokens + s.num_new_tokens, seq.num_prompt_tokens - 1)
        if start < end:
            rows.append((b, seq, start, end))
    return rows


def prepare_step_inputs(scheduled: list[ScheduledSeq], *, block_size: int, num_kv_blocks: int,
                        max_model_len: int, device: torch.device) -> StepInputs:
    return host_step_inputs(scheduled, block_size=block_size, num_kv_blocks=num_kv_blocks,
                            max_model_len=max_model_len).to_device(device)


def host_step_inputs(scheduled: list[ScheduledSeq], *, block_size: int, num_kv_blocks: int,
                     max_model_len: int) -> HostStepInputs:
    if not scheduled:
        raise LoraplexError("execute() needs at least one scheduled sequence.")
    num_seqs = len(scheduled)
    num_new = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    computed = np.fromiter((s.seq.num_computed_tokens for s in scheduled), dtype=np.int64, count=num_seqs)
    seq_lens = computed + num_new
    max_blocks = max(len(s.seq.block_table) for s in scheduled)
    block_tables = np.zeros((num_seqs, max(max_blocks, 1)), dtype=np.int32)
    token_ids: list[int] = []
    pending_index: list[int] = []
    pending_rows: list[int] = []
    for b, s in enumerate(scheduled):
        seq = s.seq
        if s.num_new_tokens < 1 or seq_lens[b] > seq.num_tokens:
            raise LoraplexError(f"sequence {seq.seq_id}: cannot compute {s.num_new_tokens} token(s) from "
                                f"position {seq.num_computed_tokens} of a {seq.num_tokens}-token sequence.")
        if seq_lens[b] > max_model_len:
            raise InvalidRequestError(f"sequence {seq.seq_id} reaches {seq_lens[b]} tokens, more than "
                                      f"max_model_len={max_model_len}; shorten the prompt or max_tokens.")
        if len(seq.block_table) * block_size < seq_lens[b]:
            raise LoraplexError(f"sequence {seq.seq_id}: block table of {len(seq.block_table)} blocks cannot "
                                f"hold {seq_lens[b]} tokens (block_size {block_size}); allocate blocks first.")
        block_tables[b, :len(seq.block_table)] = seq.block_table
        token_ids.extend(seq.token_ids[seq.num_computed_tokens:seq_lens[b]])
        if seq_lens[b] > len(seq.token_ids):      # the last token is pending
            pending_index.append(len(token_ids))
            pending_rows.append(seq.pending_row)
            token_ids.append(0)
    if block_tables.min() < 0 or block_tables.max() >= num_kv_blocks:
        raise LoraplexError(f"block tables hold ids outside [0, {num_kv_blocks}); the block manager and the "
                            "KV cache disagree on the number of blocks.")

    # Per-token arrays without a Python loop over tokens.
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(num_new, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    token_seq = np.repeat(np.arange(num_seqs), num_new)                             # [num_tokens]
    positions = np.arange(num_tokens) - np.repeat(query_start_loc[:-1] - computed, num_new)
    slots = block_tables[token_seq, positions // block_size].astype(np.int64) * block_size + positions % block_size

    prompt_positions = [query_start_loc[b] + p - computed[b] for b, _, start, end in prompt_logprob_rows(scheduled)
                        for p in range(start, end)]
    return HostStepInputs(
        input_ids=np.asarray(token_ids, dtype=np.int64), positions=positions, slot_mapping=slots,
        query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=block_tables,
        max_query_len=int(num_new.max()), max_seq_len=int(seq_lens.max()), is_decode_only=bool((num_new == 1).all()),
        pending=PendingTokens(pending_index, pending_rows) if pending_index else None,
        prompt_positions=np.asarray(prompt_positions, dtype=np.int64) if prompt_positions else None)


def profile_step_inputs(num_tokens: int, max_model_len: int, block_size: int,
                        device: torch.device) -> tuple[StepInputs, int]:
    """A worst-case prefill step of `num_tokens` tokens (prompts of max_model_len) for memory
    profiling, writing nothing (slots -1), all sequences reading the same blocks.
    Returns the inputs and how many cache blocks they read."""
    num_seqs = -(-num_tokens // max_model_len)
    num_new = np.full(num_seqs, max_model_len, dtype=np.int64)
    num_new[-1] = num_tokens - max_model_len * (num_seqs - 1)
    num_blocks = -(-max_model_len // block_size)
    query_start_loc = np.concatenate([[0], np.cumsum(num_new)])
    positions = np.arange(num_tokens) - np.repeat(query_start_loc[:-1], num_new)
    metadata = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(num_new, dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device).repeat(num_seqs, 1),
        logits_indices=torch.tensor(query_start_loc[1:] - 1, dtype=torch.int64, device=device),
        max_query_len=int(num_new.max()), max_seq_len=int(num_new.max()), is_decode_only=False,
    )
    inputs = StepInputs(torch.zeros(num_tokens, dtype=torch.int64, device=device),
                        torch.tensor(positions, dtype=torch.int64, device=device), metadata)
    return inputs, num_blocks
