"""EncoderRunner: the encoder work of a step, batched across requests, cached per request.

Each step, for every scheduled sequence whose new tokens overlap placeholder positions, the
runner needs those rows of the items' encoder outputs:

    item at prompt positions [o, o + L), sequence computing positions [c, c + n)
    -> rows max(o, c) - o .. min(o + L, c + n) - o, at flat token indices q_b + (p - c)

Items not encoded yet are encoded together, once per step (up to max_batch items per encoder
call), and their outputs kept in the request's MultimodalState, which the request's n
sequences share. A prompt chunked over several steps, or recomputed after a preemption, reads
the cached output: nothing is encoded twice. Once every sequence of the request has computed
past an item, its output moves to host memory (on a GPU), so long generations do not hold
device memory for prompts long done; a preempted sequence copies it back when it recomputes.
"""

from __future__ import annotations

import numpy as np
import torch

from loraplex.core.multimodal.inputs import MultimodalInputs
from loraplex.core.sequence import ScheduledSeq


class MultimodalState:
    """One request's items and their encoder outputs, shared by its sequences (engine side only)."""

    def __init__(self, inputs: MultimodalInputs, num_seqs: int):
        self.items = inputs.items
        self.num_seqs = num_seqs
        self.outputs: dict[int, torch.Tensor] = {}     # item index -> [length, hidden], device or host
        self.passed: dict[int, set[int]] = {}          # item index -> seq ids that computed past it

    def overlaps(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(item index, first, last + 1) prompt positions of items within [start, end)."""
        return [(i, max(item.offset, start), min(item.end, end)) for i, item in enumerate(self.items)
                if item.offset < end and item.end > start]


class EncoderRunner:
    def __init__(self, encoder: torch.nn.Module, device: torch.device, max_batch: int = 16):
        self.encoder, self.device, self.max_batch = encoder, device, max_batch
        self.num_items_encoded = 0     # for tests and metrics: items that went through the encoder

    @torch.inference_mode()
    def step_embeddings(self, scheduled: list[ScheduledSeq]) -> tuple[np.ndarray, torch.Tensor] | None:
        """(flat token indices [k] on the host, embeddings [k, hidden] on the device) for the
        step's placeholder tokens; None if it has none."""
        parts: list[tuple[MultimodalState, int, int, int, int]] = []   # state, item, first, end, flat index
        token_start = 0
        for s in scheduled:
            seq, state = s.seq, s.seq.mm
            if state is not None:
                computed = seq.num_computed_tokens
                for index, first, end in state.overlaps(computed, computed + s.num_new_tokens):
                    parts.append((state, index, first, end, token_start + first - computed))
            token_start += s.num_new_tokens
        if not parts:
            return None
        self._encode_missing({(id(state), index): (state, index) for state, index, *_ in parts}.values())
        indices = np.concatenate([np.arange(flat, flat + end - first) for _, _, first, end, flat in parts])
        embeds = torch.cat([self._output(state, index)[first - state.items[index].offset:
                                                      end - state.items[index].offset]
                            for state, index, first, end, _ in parts])
        return indices.astype(np.int64), embeds

    def _encode_missing(self, wanted) -> None:
        missing = [(state, index) for state, index in wanted if index not in state.outputs]
        for start in range(0, len(missing), self.max_batch):
            batch = missing[start:start + self.max_batch]
            inputs = [state.items[index].data.to(self.device, non_blocking=True) for state, index in batch]
            for (state, index), out in zip(batch, self.encoder(inputs)):
                if out.shape[0] != state.items[index].length:
                    raise RuntimeError(f"the encoder made {out.shape[0]} embeddings for an item with "
                                       f"{state.items[index].length} placeholders; processor and encoder disagree")
                state.outputs[index] = out
            self.num_items_encoded += len(batch)

    def _output(self, state: MultimodalState, index: int) -> torch.Tensor:
        out = state.outputs[index]
        return out if out.device == self.device else out.to(self.device, non_blocking=True)

    def after_step(self, scheduled: list[ScheduledSeq]) -> None:
        """Note which sequences computed past which items; offload outputs no sequence needs now."""
        for s in scheduled:
            state = s.seq.mm
            if state is None:
                continue
            computed = s.seq.num_computed_tokens + s.num_new_tokens
            for index, item in enumerate(state.items):
                if item.end <= computed and index in state.outputs:
                    passed = state.passed.setdefault(index, set())
                    passed.add(s.seq.seq_id)
                    if len(passed) == state.num_seqs and self.device.type == "cuda":
                        state.outputs[index] = _to_host(state.outputs[index])


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.device.type == "cpu":
        return tensor
    # Queued on the current stream: later copies back to the device are ordered after it, and
    # the device memory is reused only by work queued later, so nothing waits here.
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor, non_blocking=True)
