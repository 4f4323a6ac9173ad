"""InputProcessor: validate and tokenize a request before it reaches the engine core.

It reads only immutable facts about the engine (EngineLimits), so it runs wherever the
request arrives: in the caller's thread for LLM and AsyncEngine, in the API server
process when the engine runs in its own process. A bad request raises here, with
InvalidRequestError, and never reaches the engine.

A multimodal model's images and audio are preprocessed here too (MultimodalProcessor):
the Request then carries them as MultimodalInputs, plain tensors that pickle across to the
engine process.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.core.request import Request
from loraplex.core.sampling_params import SamplingParams
from loraplex.errors import InvalidRequestError
from loraplex.lora_request import LoRARequest


@dataclass(frozen=True)
class EngineLimits:
    """What validating a request needs to know of an engine (the engine process sends it at start-up)."""
    model: str
    vocab_size: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    enable_lora: bool


def multimodal_processor(config, model_config, max_model_len: int, tokenizer=None):
    """The MultimodalProcessor of a multimodal checkpoint (model_config: its ModelConfig), else None."""
    if model_config is None or model_config.multimodal is None:
        return None
    from loraplex.core.models import family
    from loraplex.core.multimodal.processor import MultimodalProcessor

    placeholder = None
    if tokenizer is not None:
        placeholder = tokenizer.convert_ids_to_tokens([family(model_config).placeholder_token_id(model_config)])[0]
    return MultimodalProcessor(model_config, config.model, max_model_len=max_model_len,
                               limits=config.limit_mm_per_prompt, placeholder_text=placeholder)


class InputProcessor:
    def __init__(self, limits: EngineLimits, tokenizer=None, mm_processor=None) -> None:
        """mm_processor: a multimodal model's MultimodalProcessor (multimodal_processor()), else None."""
        self.limits = limits
        self.tokenizer = tokenizer
        self.mm_processor = mm_processor

    def process(self, request_id: str, prompt, sampling_params: SamplingParams | None = None,
                lora_request: LoRARequest | None = None) -> Request:
        """prompt: a string, a list of token ids, or a dict with "prompt" and/or "prompt_token_ids",
        and "multi_modal_data" ({"image": PIL image(s)} or {"audio": (waveform, rate) pair(s)})
        for a multimodal model."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError(f"lora_request must be a LoRARequest or None, got {lora_request!r}")
        if lora_request is not None and not self.limits.enable_lora:
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
                    f"the model at {self.limits.model!r} has no tokenizer.json; pass prompt token ids")
            token_ids = self.tokenizer.encode(text)
        vocab_size = self.limits.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in token_ids):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {vocab_size}) (the vocabulary size)")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty: it needs at least one token")
        return text, list(token_ids)

    def _check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        limits = self.limits
        if num_prompt_tokens >= limits.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {num_prompt_tokens} tokens but max_model_len is {limits.max_model_len}: "
                f"the prompt plus at least one generated token must fit; shorten the prompt or "
                f"raise max_model_len")
        # The last sampled token's K/V is never computed.
        max_len = limits.max_model_len if params.max_tokens is None else \
            min(limits.max_model_len, num_prompt_tokens + params.max_tokens)
        bs = limits.block_size
        needed = -(-(max_len - 1) // bs)
        if needed > limits.num_kv_blocks:
            raise InvalidRequestError(
                f"the request can grow to {max_len} tokens ({num_prompt_tokens} prompt + max_tokens), "
                f"which needs {needed} KV-cache blocks of {bs} tokens, but the cache holds only "
                f"{limits.num_kv_blocks} ({limits.num_kv_blocks * bs} tokens); "
                f"lower max_tokens or give the KV cache more memory")
