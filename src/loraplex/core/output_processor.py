"""OutputProcessor: from the engine core's token ids to what callers read (text, logprobs, outputs).

The engine core reports, per step, one SeqOutput per sequence that got a token: its id,
raw logprobs when asked for, and a finish decided on token ids (EOS, stop ids, length).
Everything that needs the tokenizer happens here: incremental detokenization, stop
strings, the decoded text of logprob entries, and the RequestOutput objects. When serving,
this runs in the API server process, off the engine's step loop (engine_process.py);
offline, LLMEngine runs it after each step.

Stop strings are searched in the decoded text, so they are found across token
boundaries; a sequence they end is reported back (process() returns it) so the core
stops computing it. A stop token's text and a stop string are left out of the output
text unless include_stop_str_in_output. While a sequence runs, its visible text lags
the decoded text by (longest stop string - 1) characters: a stop string's first
characters are never streamed and then taken back.

Tokens the core reports for a sequence that already finished here (a stop string was
found, or the request was aborted) are dropped: with overlapped scheduling the core
learns of that finish a step late.

What an output holds is the request's SamplingParams.output_kind: everything so far
(CUMULATIVE), only what is new since the request's previous output (DELTA: what the
server streams, so a step costs the same however long the prompt and output already
are), or nothing until the request finishes (FINAL_ONLY: what LLM.generate reads; no
object is built for it before then). With SamplingParams.stream_interval = k, a streamed
request's output is built once one of its samples has k tokens that no output has handed
out yet, and at once for its first token and its finish (vLLM's rule): a server streams
k times fewer chunks, each costing the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from loraplex.core.detokenizer import IncrementalDetokenizer
from loraplex.core.outputs import CompletionOutput, Logprob, RequestOutput
from loraplex.core.request import Request
from loraplex.core.sampling_params import RequestOutputKind


class SeqOutput(NamedTuple):
    """What the engine core reports for one sequence after a step: one new token."""
    request_id: str
    index: int                               # which of the request's n samples
    token_id: int
    # (logprob, rank, [(token id, logprob)] of the top k), when the request asked for logprobs
    logprobs: tuple[float, int, list[tuple[int, float]]] | None
    finish_reason: str | None                # "stop" (EOS, a stop id, a complete grammar) or "length"
    stop_reason: int | None
    # With a request's first token, when it asked for prompt_logprobs: one entry per prompt
    # token after the first, in the format of `logprobs`.
    prompt_logprobs: list | None = None


@dataclass
class _SeqState:
    index: int
    token_ids: list[int] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    logprobs: list | None = None              # one {token_id: Logprob} per output token
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What earlier outputs handed out: token ids (any kind: stream_interval counts from it),
    # and for DELTA the characters of visible text and whether the finish was reported.
    sent_tokens: int = 0
    sent_chars: int = 0
    sent_finish: bool = False


@dataclass
class _RequestState:
    request: Request
    output_kind: RequestOutputKind
    seqs: list[_SeqState]
    prompt_logprobs: list | None = None       # [None, {token_id: Logprob}, ...] once known
    sent_prompt_logprobs: bool = False
    sent_any: bool = False                    # an output was handed out (stream_interval)

    @property
    def is_finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


def held_back(params) -> int:
    """Characters of decoded text held back while a sequence with stop strings runs."""
    if params.include_stop_str_in_output or not params.stop_strings:
        return 0
    return max(len(s) for s in params.stop_strings) - 1


class OutputProcessor:
    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _RequestState] = {}

    def add_request(self, request: Request, output_kind: RequestOutputKind | None = None) -> None:
        """Track a request; output_kind overrides its SamplingParams' (LLM.generate: FINAL_ONLY)."""
        params = request.sampling_params
        seqs = []
        for index in range(params.n):
            state = _SeqState(index, logprobs=[] if params.logprobs is not None else None)
            if self.tokenizer is not None:
                state.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                           params.skip_special_tokens,
                                                           params.spaces_between_special_tokens)
            seqs.append(state)
        kind = params.output_kind if output_kind is None else output_kind
        self._requests[request.request_id] = _RequestState(request, kind, seqs)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def __len__(self) -> int:
        return len(self._requests)

    def process(self, outputs: list[SeqOutput]) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Apply one step's outputs. Returns the RequestOutputs to hand out (all but those of
        FINAL_ONLY requests that have not finished), and (request_id, index) of the sequences
        stop strings ended (tell the core)."""
        touched: dict[str, _RequestState] = {}
        stopped: list[tuple[str, int]] = []
        for out in outputs:
            state = self._requests.get(out.request_id)
            if state is None:
                continue                      # finished or aborted here already
            seq = state.seqs[out.index]
            if seq.finish_reason is not None:
                continue
            if out.prompt_logprobs is not None:
                prompt = state.request.prompt_token_ids
                state.prompt_logprobs = [None] + [self._logprob_entry(prompt[i + 1], *entry)
                                                  for i, entry in enumerate(out.prompt_logprobs)]
            if self._append(state.request.sampling_params, seq, out):
                stopped.append((out.request_id, out.index))
            touched[out.request_id] = state
        results = []
        for request_id, state in touched.items():
            finished = state.is_finished
            if finished or self._due(state):
                results.append(self._output(state))
            if finished:
                del self._requests[request_id]
        return results, stopped

    @staticmethod
    def _due(state: _RequestState) -> bool:
        """Whether a running request's output is handed out now (not FINAL_ONLY; its first,
        or stream_interval tokens of one sample since its previous output)."""
        if state.output_kind == RequestOutputKind.FINAL_ONLY:
            return False
        interval = state.request.sampling_params.stream_interval
        return (interval == 1 or not state.sent_any
                or any(len(s.token_ids) - s.sent_tokens >= interval for s in state.seqs))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request with "abort" and return its last output (None if unknown)."""
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                if seq.detokenizer is not None:
                    seq.detokenizer.finish()
        return self._output(state)

    def drop(self, request_id: str) -> None:
        """Forget a request that failed (its caller gets the error instead of an output)."""
        self._requests.pop(request_id, None)

    # ---- one token -------------------------------------------------------------------

    def _append(self, params, seq: _SeqState, out: SeqOutput) -> bool:
        """Append one token; True when a stop string ended the sequence (the core does not know)."""
        token_id = out.token_id
        seq.token_ids.append(token_id)
        if out.logprobs is not None:
            logprob, rank, top = out.logprobs
            seq.logprobs.append(self._logprob_entry(token_id, logprob, rank, top))
            seq.cumulative_logprob += logprob
        seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        detok = seq.detokenizer
        if detok is None:
            return False
        previous_len = len(detok.text)
        stopped_by_token = out.finish_reason == "stop"
        if not stopped_by_token or params.include_stop_str_in_output:
            detok.add_token(token_id)
        if seq.finish_reason is not None:
            detok.finish()
        may_stop = len(seq.token_ids) >= params.min_tokens
        if may_stop and params.stop_strings and not stopped_by_token:
            return self._check_stop_strings(params, seq, previous_len)
        return False

    @staticmethod
    def _check_stop_strings(params, seq: _SeqState, previous_len: int) -> bool:
        detok = seq.detokenizer
        best = None
        for stop in params.stop_strings:
            # Only matches that end in the new text; earlier ones were checked before.
            start = max(0, previous_len - len(stop) + 1)
            pos = detok.text.find(stop, start)
            if pos != -1 and (best is None or pos < best[1]):
                best = (stop, pos)
        if best is None:
            return False
        stop, pos = best
        end = pos + len(stop) if params.include_stop_str_in_output else pos
        detok.text = detok.text[:end]
        finished_by_core = seq.finish_reason is not None
        seq.finish_reason, seq.stop_reason = "stop", stop
        return not finished_by_core

    def _logprob_entry(self, token_id: int, logprob: float, rank: int,
                       top: list[tuple[int, float]]) -> dict[int, Logprob]:
        """{token_id: Logprob} for one position: the top-k tokens plus the sampled one."""
        decode = self.tokenizer.decode if self.tokenizer is not None else None

        def decoded(t: int) -> str | None:
            return decode([t], skip_special_tokens=False) if decode is not None else None

        entry = {t: Logprob(lp, r + 1, decoded(t)) for r, (t, lp) in enumerate(top)}
        entry[token_id] = Logprob(logprob, rank, decoded(token_id))
        return entry

    # ---- outputs ---------------------------------------------------------------------

    def _output(self, state: _RequestState) -> RequestOutput:
        request, params = state.request, state.request.sampling_params
        state.sent_any = True
        if state.output_kind != RequestOutputKind.DELTA:
            for seq in state.seqs:
                seq.sent_tokens = len(seq.token_ids)
            return RequestOutput(
                request_id=request.request_id, prompt=request.prompt,
                prompt_token_ids=list(request.prompt_token_ids),
                outputs=[self._completion(params, s) for s in state.seqs],
                finished=state.is_finished, lora_request=request.lora_request,
                prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None)
        # DELTA: the samples with something new, each with only that; nothing is copied whole.
        prompt_logprobs = None
        if state.prompt_logprobs is not None and not state.sent_prompt_logprobs:
            prompt_logprobs, state.sent_prompt_logprobs = state.prompt_logprobs, True
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            outputs=[c for c in (self._delta(params, s) for s in state.seqs) if c is not None],
            finished=state.is_finished, lora_request=request.lora_request, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _completion(params, seq: _SeqState) -> CompletionOutput:
        wants_logprobs = params.logprobs is not None
        # Entries are never changed once appended: a shallow copy of the list is a snapshot.
        return CompletionOutput(
            index=seq.index, text=_visible_text(params, seq), token_ids=list(seq.token_ids),
            cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
            logprobs=list(seq.logprobs) if wants_logprobs else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)

    @staticmethod
    def _delta(params, seq: _SeqState) -> CompletionOutput | None:
        """What the sample gained since its previous output; None if nothing (not even its finish)."""
        visible = _visible_len(params, seq)
        new_text = seq.detokenizer.text[seq.sent_chars:visible] if visible > seq.sent_chars else ""
        new_ids = seq.token_ids[seq.sent_tokens:]
        report_finish = seq.finish_reason is not None and not seq.sent_finish
        if not (new_text or new_ids or report_finish):
            return None
        wants_logprobs = params.logprobs is not None
        delta = CompletionOutput(
            index=seq.index, text=new_text, token_ids=new_ids,
            cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
            logprobs=seq.logprobs[seq.sent_tokens:] if wants_logprobs else None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        seq.sent_chars, seq.sent_tokens = visible, len(seq.token_ids)
        seq.sent_finish = seq.finish_reason is not None
        return delta


def _visible_text(params, seq: _SeqState) -> str:
    """The output text a consumer may see now (append-only from step to step)."""
    return seq.detokenizer.text[:_visible_len(params, seq)] if seq.detokenizer is not None else ""


def _visible_len(params, seq: _SeqState) -> int:
    if seq.detokenizer is None:
        return 0
    length = len(seq.detokenizer.text)
    if seq.finish_reason is not None:
        return length
    return max(0, length - held_back(params))
