"""LLMEngine: the synchronous engine, in one thread. add_request() queues work; each step() runs one batch.

It puts together the three halves of the engine in one process:

    InputProcessor    validate and tokenize a request (input_processor.py)
    EngineCore        schedule, run the model, sample, token-level finishes (engine_core.py)
    OutputProcessor   detokenize, stop strings, logprob text, RequestOutputs (output_processor.py)

LLM drives it offline. When serving, the same three run split over two processes:
the core in the engine process, the processors in the API server's (async_engine.py).

Not thread-safe: one thread owns an engine. process_request() is the exception: it only
reads immutable state, so other threads may validate and tokenize requests with it.
"""

from __future__ import annotations

from loraplex.core.config import EngineConfig
from loraplex.core.engine_core import EngineCore, EngineStats  # noqa: F401 - EngineStats re-exported
from loraplex.core.input_processor import InputProcessor, multimodal_processor
from loraplex.core.output_processor import OutputProcessor
from loraplex.core.outputs import RequestOutput
from loraplex.core.request import Request
from loraplex.core.sampling_params import RequestOutputKind, SamplingParams
from loraplex.core.tokenizer import Tokenizer, load_tokenizer
from loraplex.lora_request import LoRARequest


class LLMEngine:
    def __init__(self, config: EngineConfig, runner=None, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model)
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.core = EngineCore(config, runner, fallback_eos_token_id=eos)
        # A fake runner (tests) may have no model_config: text only.
        mm_processor = multimodal_processor(config, getattr(self.core.runner, "model_config", None),
                                            self.core.max_model_len, self.tokenizer)
        self.input_processor = InputProcessor(self.core.limits, self.tokenizer, mm_processor)
        self.output_processor = OutputProcessor(self.tokenizer)

    # The core's parts, for callers that inspect them (benchmarks, tests).
    runner = property(lambda self: self.core.runner)
    scheduler = property(lambda self: self.core.scheduler)
    block_manager = property(lambda self: self.core.block_manager)
    lora_manager = property(lambda self: self.core.lora_manager)
    max_model_len = property(lambda self: self.core.max_model_len)
    vocab_size = property(lambda self: self.core.vocab_size)
    device = property(lambda self: self.core.device)
    mm_processor = property(lambda self: self.input_processor.mm_processor)   # None for a text model

    # ---- requests ------------------------------------------------------------------------

    def process_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Request:
        """Validate and tokenize a request without queueing it (safe from any thread).

        prompt: a string, a list of token ids, or a dict with "prompt" and/or "prompt_token_ids",
        and "multi_modal_data" ({"image": PIL image(s)} or {"audio": (waveform, rate) pair(s)})
        for a multimodal model.
        """
        return self.input_processor.process(request_id, prompt, sampling_params, lora_request)

    def add_request(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        self.add_processed_request(self.process_request(request_id, prompt, sampling_params, lora_request))

    def add_processed_request(self, request: Request, output_kind: RequestOutputKind | None = None) -> None:
        """Queue a processed request. step() returns its outputs as its SamplingParams.output_kind
        says, or as output_kind says if given (LLM.generate: FINAL_ONLY, one output when it finishes)."""
        self.core.add_request(request)
        self.output_processor.add_request(request, output_kind)

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        """Stop requests now and free their blocks; returns their final outputs (finish_reason "abort")."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        self.core.abort_requests(request_ids)
        outputs = (self.output_processor.abort(request_id) for request_id in request_ids)
        return [out for out in outputs if out is not None]

    def pop_failed_requests(self) -> list[tuple[str, BaseException]]:
        """(request_id, error) of requests that steps dropped since the last call (e.g. their
        adapter could not be reloaded); each must be reported to its caller."""
        failed = self.core.pop_failed_requests()
        for request_id, _ in failed:
            self.output_processor.drop(request_id)
        return failed

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.core.get_num_unfinished_requests()

    def get_stats(self) -> EngineStats:
        return self.core.get_stats()

    # ---- LoRA adapters (vLLM's add_lora / remove_lora / pin_lora / list_loras) -----------

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter into the CPU cache (AdapterInvalidError says what is wrong)."""
        return self.core.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.core.remove_lora(lora_int_id)

    def pin_lora(self, lora_int_id: int) -> bool:
        return self.core.pin_lora(lora_int_id)

    def replace_lora(self, old_lora_int_id: int, lora_request: LoRARequest) -> bool:
        """Load a new version of an adapter under its own id; requests already using the old id
        finish on the old weights, kept until remove_lora(old_lora_int_id) (LoRAManager.replace_lora)."""
        return self.core.replace_lora(old_lora_int_id, lora_request)

    def list_loras(self) -> set[int]:
        return self.core.list_loras()

    # ---- the step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one batch; return an output for every streaming request that got a new token,
        and for every request that finished."""
        outputs, stopped = self.output_processor.process(self.core.step())
        # Stop strings end sequences the core does not know about: before the next schedule.
        self.core.stop_sequences(stopped)
        return outputs
