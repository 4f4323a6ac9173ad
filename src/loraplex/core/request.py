"""Request: one submitted prompt and its n sequences, and the outputs built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.core.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.core.multimodal.inputs import MultimodalInputs
from loraplex.core.sampling_params import SamplingParams
from loraplex.core.sequence import Sequence
from loraplex.core.stop_checker import StopChecker
from loraplex.lora_request import LoRARequest


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None
    mm_inputs: MultimodalInputs | None = None      # images / audio of a multimodal prompt
    seqs: list[Sequence] = field(default_factory=list)
    aborted: bool = False

    @property
    def is_finished(self) -> bool:
        return bool(self.seqs) and all(s.finish_reason is not None for s in self.seqs)

    def to_output(self, tokenizer=None) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt,
            prompt_token_ids=list(self.prompt_token_ids),
            outputs=[_completion(s, tokenizer) for s in self.seqs],
            finished=self.is_finished, lora_request=self.lora_request)


def _completion(seq: Sequence, tokenizer) -> CompletionOutput:
    wants_logprobs = seq.sampling_params.logprobs is not None
    # Entries are never changed once appended: a shallow copy of the list is a snapshot.
    logprobs = list(seq.logprobs) if wants_logprobs else None
    return CompletionOutput(
        index=seq.sample_index, text=StopChecker.visible_text(seq),
        token_ids=list(seq.output_token_ids),
        cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
        logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)


def logprob_entry(token_id: int, logprob: float, rank: int,
                  top: list[tuple[int, float]], tokenizer) -> dict[int, Logprob]:
    """{token_id: Logprob} for one position: the top-k tokens plus the sampled one."""
    def decoded(t: int) -> str | None:
        return tokenizer.decode([t], skip_special_tokens=False) if tokenizer is not None else None

    entry = {t: Logprob(lp, r + 1, decoded(t)) for r, (t, lp) in enumerate(top)}
    entry[token_id] = Logprob(logprob, rank, decoded(token_id))
    return entry
