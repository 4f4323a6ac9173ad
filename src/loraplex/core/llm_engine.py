"""LLMEngine: the synchronous engine. add_request() queues work; each step() runs one batch.

A step: the scheduler picks sequences and token counts -> the model runner
computes them and returns one row of logits per scheduled sequence -> rows of
sequences whose whole context is now computed are sampled -> the stop checker
appends the tokens, detokenizes and finishes sequences -> finished sequences
free their blocks. Rows of prompt chunks that do not reach the end are dropped.

Not thread-safe: one thread owns an engine (AsyncEngine runs it in its own
thread). process_request() is the exception: it only reads immutable state,
so other threads may validate and tokenize requests with it.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import torch

from loraplex.core.block_manager import BlockManager
from loraplex.core.config import EngineConfig
from loraplex.core.detokenizer import IncrementalDetokenizer
from loraplex.core.multimodal.encoder_runner import MultimodalState
from loraplex.core.outputs import RequestOutput
from loraplex.core.request import Request, logprob_entry
from loraplex.core.sampler import Sampler
from loraplex.core.sampling_params import SamplingParams
from loraplex.core.scheduler import MaxLorasAdmission, Scheduler
from loraplex.core.sequence import Sequence
from loraplex.core.stop_checker import StopChecker
from loraplex.core.tokenizer import Tokenizer, load_tokenizer
from loraplex.errors import AdapterError, InvalidRequestError
from loraplex.lora_request import LoRARequest


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_cache_usage: float
    num_preemptions: int


def sample_seed(seed: int, sample_index: int) -> int:
    """Seed of sample `sample_index` of a request seeded with `seed`; sample 0 uses the seed itself."""
    if sample_index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def _runner_eos_ids(runner) -> set[int]:
    for name in ("eos_token_ids", "eos_token_id"):
        value = getattr(runner, name, None)
        if value is None:
            continue
        return {int(v) for v in value} if isinstance(value, (list, tuple, set, frozenset)) else {int(value)}
    return set()


class LLMEngine:
    def __init__(self, config: EngineConfig, runner=None, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        if runner is None:
            from loraplex.core.model_runner import create_model_runner
            runner = create_model_runner(config)
        self.runner = runner
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        self.max_model_len = runner.max_model_len
        self.vocab_size = runner.vocab_size
        self.block_manager = BlockManager(runner.num_kv_blocks, runner.block_size)
        lora_manager = self.lora_manager
        admission = MaxLorasAdmission(config.max_loras, pinned=lora_manager.pinned_in_slots
                                      if lora_manager is not None else None) if config.enable_lora else None
        self.scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                   admission=admission)
        eos = _runner_eos_ids(runner)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = {self.tokenizer.eos_token_id}
        self.eos_token_ids = eos
        self.stop_checker = StopChecker(eos, self.max_model_len)
        self.device = torch.device(getattr(runner, "device", "cpu"))
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self.mm_processor = self._multimodal_processor()   # None for a text model
        self._requests: dict[str, Request] = {}
        self._failed: list[tuple[str, BaseException]] = []   # (request_id, error) a step had to drop
        self._seq_counter = itertools.count()

    def _multimodal_processor(self):
        model_config = getattr(self.runner, "model_config", None)
        if model_config is None or model_config.multimodal is None:
            return None
        from loraplex.core.multimodal.processor import MultimodalProcessor
        from loraplex.core.models import family

        placeholder = None
        if self.tokenizer is not None:
            placeholder = self.tokenizer.convert_ids_to_tokens([family(model_config).placeholder_token_id(model_config)])[0]
        return MultimodalProcessor(model_config, self.config.model, max_model_len=self.max_model_len,
                                   limits=self.config.limit_mm_per_prompt, placeholder_text=placeholder)

    # ---- requests ------------------------------------------------------------------------

    def process_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Request:
        """Validate and tokenize a request without queueing it (safe from any thread).

        prompt: a string, a list of token ids, or a dict with "prompt" and/or "prompt_token_ids",
        and "multi_modal_data" ({"image": PIL image(s)} or {"audio": (waveform, rate) pair(s)})
        for a multimodal model.
        """
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"lora_request must be a LoRARequest or None, got {lora_request!r}")
        if lora_request is not None and not self.config.enable_lora:
            raise InvalidRequestError(
                f"request {request_id!r} asks for LoRA adapter {lora_request.lora_name!r} but LoRA is "
                f"not enabled; start the engine with enable_lora=True")
        text, token_ids = self._tokenize(prompt)
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        mm_inputs = None
        if self.mm_processor is not None:
            token_ids, mm_inputs = self.mm_processor.process(token_ids, mm_data)
        elif mm_data is not None:
            raise InvalidRequestError("multi_modal_data was given, but this model takes text only; serve a "
                                      "multimodal checkpoint (docs/multimodal.md) or drop it")
        self._check_fits(len(token_ids), params)
        return Request(request_id, text, token_ids, params, lora_request, mm_inputs=mm_inputs)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        text, token_ids = None, None
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
            if unknown or not set(prompt) & {"prompt", "prompt_token_ids"}:
                raise InvalidRequestError(
                    f"a prompt dict takes the keys 'prompt' and/or 'prompt_token_ids' (and 'multi_modal_data'), "
                    f"got {sorted(prompt)}")
            text, token_ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if text is not None and not isinstance(text, str):
                raise InvalidRequestError(f"'prompt' must be a string, got {type(text).__name__}")
        elif isinstance(prompt, (list, tuple)):
            token_ids = prompt
        else:
            raise InvalidRequestError(
                f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")
        if token_ids is None:
            if self.tokenizer is None:
                raise InvalidRequestError(
                    f"the model at {self.config.model!r} has no tokenizer.json; pass prompt token ids")
            token_ids = self.tokenizer.encode(text)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size
                   for t in token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size}) (the vocabulary size)")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty: it needs at least one token")
        return text, list(token_ids)

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {num_prompt_tokens} tokens but max_model_len is {self.max_model_len}: "
                f"the prompt plus at least one generated token must fit; shorten the prompt or "
                f"raise max_model_len")
        # The last sampled token's K/V is never computed.
        max_len = self.max_model_len if params.max_tokens is None else \
            min(self.max_model_len, num_prompt_tokens + params.max_tokens)
        needed = self.block_manager.num_blocks_for(max_len - 1)
        if needed > self.block_manager.num_blocks:
            bs = self.block_manager.block_size
            raise InvalidRequestError(
                f"the request can grow to {max_len} tokens ({num_prompt_tokens} prompt + max_tokens), "
                f"which needs {needed} KV-cache blocks of {bs} tokens, but the cache holds only "
                f"{self.block_manager.num_blocks} ({self.block_manager.num_blocks * bs} tokens); "
                f"lower max_tokens or give the KV cache more memory")

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        self.add_processed_request(self.process_request(request_id, prompt, sampling_params, lora_request))

    def add_processed_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
        params = request.sampling_params
        mm_state = MultimodalState(request.mm_inputs, params.n) if request.mm_inputs is not None else None
        for index in range(params.n):
            seq = Sequence(seq_id=next(self._seq_counter), token_ids=list(request.prompt_token_ids),
                           num_prompt_tokens=len(request.prompt_token_ids))
            seq.request_id, seq.sample_index, seq.arrival_index = request.request_id, index, seq.seq_id
            seq.lora_request, seq.sampling_params = request.lora_request, params
            seq.mm = mm_state
            seq.logprobs = [] if params.logprobs is not None else None
            if params.seed is not None:
                seq.generator = torch.Generator(self.device).manual_seed(sample_seed(params.seed, index))
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                         params.skip_special_tokens)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request.request_id] = request

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks; returns their final outputs (finish_reason "abort")."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for request_id in request_ids:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            request.aborted = True
            for seq in request.seqs:
                if seq.finish_reason is None:
                    seq.finish_reason = "abort"
                    if seq.detokenizer is not None:
                        seq.detokenizer.finish()
                self.scheduler.finish(seq)
            outputs.append(request.to_output(self.tokenizer))
        return outputs

    def _fail_adapter_requests(self, exc: AdapterError) -> None:
        lora_id = exc.lora_request.lora_int_id
        request_ids = [request_id for request_id, request in self._requests.items()
                       if request.lora_request is not None and request.lora_request.lora_int_id == lora_id]
        self.abort_request(request_ids)
        self._failed.extend((request_id, exc) for request_id in request_ids)

    def pop_failed_requests(self) -> list[tuple[str, BaseException]]:
        """(request_id, error) of requests that steps dropped since the last call (e.g. their
        adapter could not be reloaded); each must be reported to its caller."""
        failed, self._failed = self._failed, []
        return failed

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def get_stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.num_blocks,
                           bm.num_free_blocks, bm.usage, self.scheduler.num_preemptions)

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

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every request that got a new token or finished."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        try:
            logits = self.runner.execute(plan.scheduled)           # [num_scheduled, vocab]
        except AdapterError as exc:
            if getattr(exc, "lora_request", None) is None:
                raise
            # An adapter evicted earlier failed to reload (its files changed or vanished): drop
            # its requests with that error; the rest of the batch runs again next step.
            self._fail_adapter_requests(exc)
            return []
        rows, seqs = [], []
        for row, item in enumerate(plan.scheduled):
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.seq.num_computed_tokens == item.seq.num_tokens:
                rows.append(row)
                seqs.append(item.seq)
        if not seqs:
            return []
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        sampled = self.sampler(logits, seqs, [self.stop_checker.stop_ids_for(s) for s in seqs])

        touched: dict[str, Request] = {}
        for seq, token in zip(seqs, sampled):
            if seq.logprobs is not None:
                seq.logprobs.append(logprob_entry(token.token_id, token.logprob, token.rank,
                                                  token.top_logprobs, self.tokenizer))
            seq.cumulative_logprob += token.logprob
            self.stop_checker.append_token(seq, token.token_id)
            if seq.finish_reason is not None:
                self.scheduler.finish(seq)
            touched[seq.request_id] = self._requests[seq.request_id]

        outputs = []
        for request_id, request in touched.items():
            outputs.append(request.to_output(self.tokenizer))
            if request.is_finished:
                del self._requests[request_id]
        return outputs
