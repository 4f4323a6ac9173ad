"""InputProcessor: validate and tokenize a request before it reaches the engine core.

It reads only immutable facts about the engine (EngineLimits), so it runs wherever the
request arrives: in the caller's thread for LLM and AsyncEngine, in the API server
process when the engine runs in its own process. A bad request raises here, with
InvalidRequestError, and never reaches the engine.

A multimodal model's images and audio are preprocessed here too (MultimodalProcessor):
the Request then carries them as MultimodalInputs, plain tensors that pickle across to the
engine process.

What a request's sampling parameters need the tokenizer or the vocabulary for is settled here
too, so the engine core only reads results: the prompt is truncated (truncate_prompt_tokens),
bad words are tokenized, token ids in logit_bias / allowed_token_ids are checked against the
vocabulary, and a structured-output constraint is compiled and validated (structured_output.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.core.request import Request
from loraplex.core.sampling_params import SamplingParams
from loraplex.core.structured_output import compile_grammar
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
    max_logprobs: int = 20      # the most top tokens per position a request may ask for


def truncation_keep(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many prompt tokens truncate_prompt_tokens keeps (-1: max_model_len), None for all."""
    return max_model_len if truncate_prompt_tokens == -1 else truncate_prompt_tokens


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
        "multi_modal_data" ({"image": PIL image(s)} or {"audio": (waveform, rate) pair(s)})
        for a multimodal model, and "cache_salt" (a string: prefix caching shares computed
        blocks only between requests with the same salt, as in vLLM)."""
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
        token_ids = self._truncate(token_ids, params)
        self._prepare_params(params)
        mm_data = prompt.get("multi_modal_data") if isinstance(prompt, dict) else None
        mm_inputs = None
        if self.mm_processor is not None:
            token_ids, mm_inputs = self.mm_processor.process(token_ids, mm_data)
        elif mm_data is not None:
            raise InvalidRequestError("multi_modal_data was given, but this model takes text only; serve a "
                                      "multimodal checkpoint (docs/multimodal.md) or drop it")
        self._check_fits(len(token_ids), params)
        cache_salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
        if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
            raise InvalidRequestError(f"cache_salt must be a non-empty string, got {cache_salt!r}")
        return Request(request_id, text, token_ids, params, lora_request, mm_inputs=mm_inputs,
                       cache_salt=cache_salt)

    def _tokenize(self, prompt) -> tuple[str | None, list[int]]:
        text, token_ids = None, None
        if isinstance(prompt, str):
            text = prompt
        elif isinstance(prompt, dict):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data", "cache_salt"}
            if unknown or not set(prompt) & {"prompt", "prompt_token_ids"}:
                raise InvalidRequestError(
                    f"a prompt dict takes the keys 'prompt' and/or 'prompt_token_ids' (and 'multi_modal_data', "
                    f"'cache_salt'), got {sorted(prompt)}")
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

    def _truncate(self, token_ids: list[int], params: SamplingParams) -> list[int]:
        keep = truncation_keep(params.truncate_prompt_tokens, self.limits.max_model_len)
        if keep is None:
            return token_ids
        return token_ids[-keep:] if params.truncation_side == "left" else token_ids[:keep]

    def _prepare_params(self, params: SamplingParams) -> None:
        """Check the parameters against the vocabulary, tokenize bad words, compile the grammar."""
        vocab_size = self.limits.vocab_size
        for name, what in (("logprobs", "sample"), ("prompt_logprobs", "prompt")):
            value = getattr(params, name)
            if value is not None and value > self.limits.max_logprobs:   # vLLM's words
                raise InvalidRequestError(f"Requested {what} logprobs of {value}, which is greater than max "
                                          f"allowed: {self.limits.max_logprobs} (the server's --max-logprobs)")
        for name in ("logit_bias", "allowed_token_ids"):
            ids = getattr(params, name) or ()
            outside = sorted(t for t in ids if t >= vocab_size)
            if outside:
                raise InvalidRequestError(f"{name} holds out-of-vocabulary token ids {outside[:10]}; the "
                                          f"vocabulary has {vocab_size} tokens (ids 0 to {vocab_size - 1})")
        if params.bad_words and not params.bad_words_token_ids:
            params.bad_words_token_ids = self._bad_words_token_ids(params.bad_words)
        if params.structured_outputs is not None and params.compiled_grammar is None:
            if self.tokenizer is None:
                raise InvalidRequestError(f"structured outputs need the model's tokenizer.json, which "
                                          f"{self.limits.model!r} does not have")
            params.compiled_grammar = compile_grammar(params.structured_outputs)

    def _bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each word's token ids as it would start the text, and, when that tokenizes differently
        into as many tokens, as it would follow a space (vLLM's rule)."""
        if self.tokenizer is None:
            raise InvalidRequestError(f"bad_words need the model's tokenizer.json, which {self.limits.model!r} "
                                      f"does not have")
        out: list[list[int]] = []
        for word in words:
            bare = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            if not bare:
                raise InvalidRequestError(f"bad_words entry {word!r} tokenizes to no token")
            out.append(bare)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            if spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
                out.append(spaced)
        outside = sorted({t for ids in out for t in ids if t >= self.limits.vocab_size})
        if outside:
            raise InvalidRequestError(f"bad_words tokenize to token ids {outside[:10]} outside the model's "
                                      f"vocabulary of {self.limits.vocab_size}")
        return out

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
