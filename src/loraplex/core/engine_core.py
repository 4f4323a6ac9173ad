"""EngineCore: schedule, run and sample, on token ids only. One step() runs one batch.

A step: the scheduler picks sequences and token counts -> the model runner computes
them and returns one row of logits per scheduled sequence -> rows of sequences whose
whole context is now computed are sampled -> each new token is appended and checked
for a token-level finish (EOS, stop ids, length) -> finished sequences free their
blocks. Text (detokenizing, stop strings) is the OutputProcessor's job, outside.

**Overlapped scheduling** (config.async_scheduling, the default). The device runs step
N+1 while the host finishes step N. step() does, in this order:

    schedule N+1            sequences sampled in step N have a pending token: its value
                            is still on the device, but it counts, so N+1 computes it
    launch N+1              runner.execute(scheduled, step N's sampled ids): the pending
                            tokens' input ids are gathered on the device
    finish N                wait for step N's non-blocking copy of its sampled ids, append
                            them, check finishes: the host work that overlaps N+1
    sample N+1              on the device, for the sequences still running; start the
                            copy of its ids to the host

A sequence that finished in step N (a stop token, or a stop string or an abort
reported from outside) was already scheduled in N+1: that row's work is discarded,
one step late, as vLLM and SGLang do. A length finish is known in advance, so such a
sequence is not scheduled again. With async_scheduling=False, step() samples and
finishes each step before returning (the same functions, in lock step): no pending
tokens, no discarded rows, no overlap.

Greedy outputs are the same either way, token for token; tests/test_async_scheduling.py
checks it.

**Structured outputs** do not change that schedule: "finish N" runs before "sample N+1", so
when a grammar row's mask for N+1 is computed (GrammarState.masks, on the host, while the
device runs N+1's forward pass) its matcher has already consumed the row's token of step N.
A sequence whose grammar is complete (nothing more can follow) finishes with "stop".

**Prompt logprobs**: a step that computes prompt positions of a request asking for them also
returns their logits (step_inputs.prompt_logprob_rows), from which the core takes the prompt
tokens' logprobs at once; reading them back waits for that step (only such steps wait). They
are reported with the sequence's first token.

Not thread-safe: one thread owns a core (the engine loop's, or LLM's caller).
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from loraplex.core.block_manager import BlockManager
from loraplex.core.config import EngineConfig
from loraplex.core.input_processor import EngineLimits
from loraplex.core.multimodal.encoder_runner import MultimodalState
from loraplex.core.output_processor import SeqOutput
from loraplex.core.request import Request
from loraplex.core.sampler import HostCopy, Sampler, SamplerOutput, TokenControls, prompt_logprobs
from loraplex.core.scheduler import MaxLorasAdmission, Scheduler, SchedulerOutput
from loraplex.core.sequence import Sequence
from loraplex.core.step_inputs import prompt_logprob_rows
from loraplex.core.step_times import StepTimes, slot_writes
from loraplex.core.stop_checker import StopChecker
from loraplex.core.grammar import GrammarState
from loraplex.core.structured_output import compile_grammar
from loraplex.core.transfer import device_tensor
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.lora_request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_cache_usage: float
    num_preemptions: int
    # Forward passes run, and the sequences and tokens they computed, since start-up: their
    # ratios are the mean batch (what a server under load keeps the device busy with).
    num_steps: int = 0
    num_step_seqs: int = 0
    num_step_tokens: int = 0


@dataclass
class _InFlight:
    """A step whose sampled ids are on the device and on their way to the host."""
    seqs: list[Sequence]             # row -> sequence
    sampled: SamplerOutput
    host: HostCopy


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of a request seeded with `seed`; sample 0 uses the seed itself."""
    if sample_index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def takes_sampled_token_ids(runner) -> bool:
    """Whether runner.execute accepts `sampled_token_ids` (what overlapped scheduling needs)."""
    try:
        return "sampled_token_ids" in inspect.signature(runner.execute).parameters
    except (TypeError, ValueError):
        return False


def runner_eos_ids(runner) -> set[int]:
    for name in ("eos_token_ids", "eos_token_id"):
        value = getattr(runner, name, None)
        if value is None:
            continue
        return {int(v) for v in value} if isinstance(value, (list, tuple, set, frozenset)) else {int(value)}
    return set()


class EngineCore:
    def __init__(self, config: EngineConfig, runner=None, *, fallback_eos_token_id: int | None = None) -> None:
        """fallback_eos_token_id: the tokenizer's EOS, used when the checkpoint names none."""
        self.config = config
        if runner is None:
            from loraplex.core.model_runner import create_model_runner
            runner = create_model_runner(config)
        self.runner = runner
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.vocab_size
        self.block_manager = BlockManager(runner.num_kv_blocks, runner.block_size,
                                          enable_prefix_caching=config.enable_prefix_caching)
        lora_manager = self.lora_manager
        admission = MaxLorasAdmission(config.max_loras, pinned=lora_manager.pinned_in_slots
                                      if lora_manager is not None else None) if config.enable_lora else None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   long_prefill_token_threshold=config.long_prefill_token_threshold,
                                   admission=admission)
        eos = runner_eos_ids(runner)
        if not eos and fallback_eos_token_id is not None:
            eos = {fallback_eos_token_id}
        self.eos_token_ids = eos
        self.stop_checker = StopChecker(eos, self.max_model_len)
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self.grammars = GrammarState(config.model, self.vocab_size, eos, self.device)
        # A runner whose execute() cannot take the previous step's sampled ids runs in lock step.
        self.async_scheduling = config.async_scheduling and takes_sampled_token_ids(runner)
        if config.async_scheduling and not self.async_scheduling:
            logger.info("%s.execute takes no sampled_token_ids: steps run in lock step (no overlapped "
                        "scheduling)", type(runner).__name__)
        self._requests: dict[str, list[Sequence]] = {}
        self._failed: list[tuple[str, BaseException]] = []   # (request_id, error) a step had to drop
        self._in_flight: _InFlight | None = None
        self._seq_counter = itertools.count()
        self.num_discarded_tokens = 0        # sampled for sequences that had finished meanwhile
        self.num_steps = self.num_step_seqs = self.num_step_tokens = 0
        self.last_step = StepTimes(0.0, 0.0, 0, 0)

    @property
    def limits(self) -> EngineLimits:
        return EngineLimits(model=self.config.model, vocab_size=self.vocab_size, max_model_len=self.max_model_len,
                            block_size=self.block_manager.block_size, num_kv_blocks=self.block_manager.num_blocks,
                            enable_lora=self.config.enable_lora,
                            max_logprobs=self.vocab_size if self.config.max_logprobs == -1 else self.config.max_logprobs)

    # ---- requests ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a validated request (InputProcessor.process) as its n sequences."""
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params
        # A multimodal request's items and their encoder outputs, shared by its n sequences.
        mm_state = MultimodalState(request.mm_inputs, params.n) if request.mm_inputs is not None else None
        controls = TokenControls.for_params(params)
        grammar = params.compiled_grammar
        if params.structured_outputs is not None and grammar is None:
            grammar = params.compiled_grammar = compile_grammar(params.structured_outputs)
        matchers = [self.grammars.start(grammar) for _ in range(params.n)] if grammar is not None else None
        salt = self._cache_salt(request)
        seqs = []
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_counter), token_ids=list(request.prompt_token_ids),
                           num_prompt_tokens=len(request.prompt_token_ids))
            seq.request_id, seq.sample_index, seq.arrival_index = request.request_id, index, seq.seq_id
            seq.lora_request, seq.sampling_params = request.lora_request, params
            seq.mm = mm_state
            seq.token_controls = controls
            seq.grammar = matchers[index] if matchers is not None else None
            if index == 0 and params.prompt_logprobs is not None:
                seq.prompt_logprobs_k = params.prompt_logprobs
            seq.max_num_tokens = self.stop_checker.max_num_tokens(seq.num_prompt_tokens, params)
            # Prompt logprobs need every prompt position computed: that sequence stays out of the cache.
            seq.cache_salt = None if seq.prompt_logprobs_k is not None else salt
            if params.seed is not None:
                seq.generator = torch.Generator(self.device).manual_seed(sample_seed(params.seed, index))
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request.request_id] = seqs

    def _cache_salt(self, request: Request):
        """What besides its tokens decides which cached blocks a request may use: the adapter and
        the version of its weights (a reload under the same id is another version), a multimodal
        prompt's media (its placeholder tokens do not say which image), and the caller's
        cache_salt (tenants who must not learn of each other's prompts through timing).
        None without prefix caching."""
        if not self.block_manager.enable_prefix_caching:
            return None
        lora = request.lora_request
        adapter = () if lora is None else (lora.lora_int_id, self.lora_manager.weights_version(lora.lora_int_id))
        media = () if request.mm_inputs is None else (request.mm_inputs.content_hash,)
        salt = () if request.cache_salt is None else ("salt", request.cache_salt)
        return (*adapter, *media, *salt)

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop requests now and free their blocks (a token in flight for them is dropped)."""
        for request_id in request_ids:
            for seq in self._requests.pop(request_id, ()):
                self._finish_seq(seq, "abort")

    def stop_sequences(self, stopped: list[tuple[str, int]]) -> None:
        """Stop sequences the output processor ended ((request_id, sample index): stop strings)."""
        for request_id, index in stopped:
            seqs = self._requests.get(request_id)
            if seqs is None:
                continue
            self._finish_seq(seqs[index], "stop")
            if all(s.is_finished for s in seqs):
                del self._requests[request_id]

    def _finish_seq(self, seq: Sequence, reason: str) -> None:
        if seq.finish_reason is None:
            seq.finish_reason = reason
        seq.grammar = None
        self.scheduler.finish(seq)

    def _fail_adapter_requests(self, exc: AdapterError) -> None:
        lora_id = exc.lora_request.lora_int_id
        request_ids = [request_id for request_id, seqs in self._requests.items()
                       if seqs[0].lora_request is not None and seqs[0].lora_request.lora_int_id == lora_id]
        self.abort_requests(request_ids)
        self._failed.extend((request_id, exc) for request_id in request_ids)

    def pop_failed_requests(self) -> list[tuple[str, BaseException]]:
        """(request_id, error) of requests that steps dropped since the last call (e.g. their
        adapter could not be reloaded); each must be reported to its caller."""
        failed, self._failed = self._failed, []
        return failed

    def has_unfinished_requests(self) -> bool:
        # A step still in flight whose sequences have all finished (a stop string, an abort)
        # holds nothing to report: its tokens are dropped whenever the next step runs.
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_blocks,
                           bm.num_free_blocks, bm.usage, self.scheduler.num_preemptions,
                           self.num_steps, self.num_step_seqs, self.num_step_tokens)

    # ---- LoRA adapters (vLLM's add_lora / remove_lora / pin_lora / list_loras) -----------

    @property
    def lora_manager(self):
        """The runner's LoRAManager, or None when LoRA is off."""
        lora = getattr(self.runner, "lora", None)
        return lora.manager if lora is not None else None

    def _require_lora(self):
        if self.lora_manager is None:
            raise InvalidRequestError("LoRA is not enabled; start the engine with enable_lora=True")
        return self.lora_manager

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter into the CPU cache (AdapterInvalidError says what is wrong)."""
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"add_lora takes a LoRARequest, got {lora_request!r}")
        return self._require_lora().add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._require_lora().remove_lora(lora_int_id)

    def pin_lora(self, lora_int_id: int) -> bool:
        return self._require_lora().pin_lora(lora_int_id)

    def replace_lora(self, old_lora_int_id: int, lora_request: LoRARequest) -> bool:
        """Load a new version of an adapter under its own id; requests already using the old id
        finish on the old weights, kept until remove_lora(old_lora_int_id) (LoRAManager.replace_lora)."""
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"replace_lora takes a LoRARequest, got {lora_request!r}")
        return self._require_lora().replace_lora(old_lora_int_id, lora_request)

    def list_loras(self) -> set[int]:
        return self._require_lora().list_loras()

    def find_lora(self, lora_name: str) -> LoRARequest | None:
        """The loaded adapter called `lora_name` (its newest version), or None."""
        return self._require_lora().find_by_name(lora_name)

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[SeqOutput]:
        """Run one batch; return the new token of every sequence whose token is now known
        (with overlapped scheduling: those sampled by the previous step)."""
        start, writes = time.perf_counter(), slot_writes(self.lora_manager)
        plan = self.scheduler.schedule()
        launched = self._launch(plan) if not plan.is_empty else None
        launch_done = time.perf_counter()
        outputs = self._finish_in_flight()
        if launched is not None:
            self._sample(*launched)
        if not self.async_scheduling:
            outputs += self._finish_in_flight()
        self.last_step = StepTimes(launch_done - start, time.perf_counter() - launch_done, len(plan.scheduled),
                                   plan.num_batched_tokens, slot_writes(self.lora_manager) - writes)
        return outputs

    def _launch(self, plan: SchedulerOutput) -> tuple[torch.Tensor, list[int], list[Sequence]] | None:
        """Start the forward pass; returns (logits, rows to sample, their sequences)."""
        scheduled = plan.scheduled
        try:
            if any(item.seq.num_pending_tokens for item in scheduled):
                logits = self.runner.execute(scheduled, self._in_flight.sampled.token_ids)
            else:
                logits = self.runner.execute(scheduled)                # [num_scheduled, vocab]
        except AdapterError as exc:
            if getattr(exc, "lora_request", None) is None:
                raise
            # An adapter evicted earlier failed to reload (its files changed or vanished): drop
            # its requests with that error; the rest of the batch runs again next step.
            self.scheduler.unschedule(plan)
            self._fail_adapter_requests(exc)
            return None
        self.num_steps += 1
        self.num_step_seqs += len(scheduled)
        self.num_step_tokens += plan.num_batched_tokens
        prompt_rows = prompt_logprob_rows(scheduled)
        if prompt_rows:
            logits = self._take_prompt_logprobs(logits, len(scheduled), prompt_rows)
        rows, seqs = [], []
        for row, item in enumerate(scheduled):
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                rows.append(row)
                seqs.append(item.seq)
        return (logits, rows, seqs) if seqs else None

    def _take_prompt_logprobs(self, logits: torch.Tensor, num_scheduled: int, prompt_rows) -> torch.Tensor:
        """Split the prompt positions' logits off the step's (they follow the scheduled rows), and
        keep their prompt tokens' logprobs on each sequence; returns the scheduled rows' logits."""
        extra = logits[num_scheduled:]
        if extra.shape[0] != sum(end - start for _, _, start, end in prompt_rows):
            raise InvalidRequestError(f"{type(self.runner).__name__} returned no prompt-position logits; "
                                      f"prompt_logprobs needs a runner that honours HostStepInputs.prompt_positions")
        targets, ks = [], []
        for _, seq, start, end in prompt_rows:
            targets += seq.token_ids[start + 1:end + 1]
            ks += [seq.prompt_logprobs_k] * (end - start)
        entries = prompt_logprobs(extra, targets, ks)          # reads the device: only such steps wait
        offset = 0
        for _, seq, start, end in prompt_rows:
            seq.prompt_logprobs += entries[offset:offset + end - start]
            seq.num_prompt_logprobs_done = end
            offset += end - start
        return logits[:num_scheduled]

    def _sample(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
        # Sequences that finished while this step ran (stop token of the previous step, stop
        # string, abort) are not sampled: their row is the discarded work.
        live = [(row, seq) for row, seq in zip(rows, seqs) if not seq.is_finished]
        self.num_discarded_tokens += len(seqs) - len(live)
        if not live:
            return
        rows, seqs = [r for r, _ in live], [s for _, s in live]
        if len(rows) != logits.shape[0]:
            logits = logits.index_select(0, device_tensor(rows, torch.long, logits.device))
        sampled = self.sampler(logits, seqs, [self.stop_checker.stop_ids_for(s) for s in seqs],
                               self.grammars.masks(seqs))
        for row, seq in enumerate(seqs):
            seq.num_pending_tokens, seq.pending_row = 1, row
        self._in_flight = _InFlight(seqs, sampled, sampled.to_host())

    def _finish_in_flight(self) -> list[SeqOutput]:
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        host = flight.host.wait()
        outputs = []
        for row, seq in enumerate(flight.seqs):
            seq.num_pending_tokens, seq.pending_row = 0, -1
            if seq.is_finished:
                self.num_discarded_tokens += 1      # aborted or stopped since it was sampled
                continue
            token_id = host.token_ids[row]
            self.stop_checker.append_token(seq, token_id)
            if seq.grammar is not None and self.grammars.accept(seq, token_id) and seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = "stop", None     # the grammar is complete
            prompt_lps = None
            if seq.prompt_logprobs_k is not None and seq.num_output_tokens == 1:
                prompt_lps, seq.prompt_logprobs = seq.prompt_logprobs, []
            outputs.append(SeqOutput(seq.request_id, seq.sample_index, token_id, host.logprobs.get(row),
                                     seq.finish_reason, seq.stop_reason, prompt_lps))
            if seq.finish_reason is not None:
                seq.grammar = None
                self.scheduler.finish(seq)
                seqs = self._requests.get(seq.request_id)
                if seqs is not None and all(s.is_finished for s in seqs):
                    del self._requests[seq.request_id]
        return outputs
