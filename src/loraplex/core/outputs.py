"""What generation returns: RequestOutput holding one CompletionOutput per sample (vLLM-like).

Outputs are snapshots: the engine builds fresh objects every step, so a consumer
on another thread may keep them while the engine goes on. What an output holds
(everything so far, or only what is new) is the request's SamplingParams.output_kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.lora_request import LoRARequest


@dataclass
class Logprob:
    """Log-probability of one token at one position; rank 1 is the most likely token."""
    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request.

    text, token_ids and logprobs are cumulative, or only the new part when the request asked
    for RequestOutputKind.DELTA. finish_reason is None while running, then
    "stop" (EOS, a stop token id or a stop string), "length" (max_tokens or
    max_model_len) or "abort". stop_reason is the stop string or stop token id
    that ended it (None for EOS and length).
    """
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """prompt_logprobs (when asked for): one entry per prompt token, None for the first (nothing
    precedes it), then {token_id: Logprob} holding the prompt token and the top k."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: LoRARequest | None = field(default=None, repr=False)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def add(self, later: RequestOutput, aggregate: bool) -> None:
        """Fold a later output of the same request into this one, for a consumer that fell behind:
        aggregate (delta outputs) appends its text, token ids and logprobs to this one's; otherwise
        (cumulative outputs) its samples replace this one's."""
        by_index = {c.index: i for i, c in enumerate(self.outputs)}
        for comp in later.outputs:
            i = by_index.get(comp.index)
            if i is None:
                by_index[comp.index] = len(self.outputs)
                self.outputs.append(comp)
            elif not aggregate:
                self.outputs[i] = comp
            else:
                mine = self.outputs[i]
                # A delta output's lists are its own (slices): extended in place, so folding a long
                # backlog costs what it adds.
                mine.text += comp.text
                mine.token_ids.extend(comp.token_ids)
                if comp.logprobs is not None:
                    if mine.logprobs is None:
                        mine.logprobs = []
                    mine.logprobs.extend(comp.logprobs)
                mine.cumulative_logprob = comp.cumulative_logprob
                mine.finish_reason, mine.stop_reason = comp.finish_reason, comp.stop_reason
        if not aggregate:   # delta outputs carry prompt logprobs in the first output only
            self.prompt_logprobs = later.prompt_logprobs
        self.finished = later.finished
