"""OpenAI request fields -> SamplingParams, with OpenAI's defaults where they differ."""

from __future__ import annotations

from loraplex.core.sampling_params import SamplingParams
from loraplex.server.errors import HTTPError
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions


def _common(request: SamplingFields) -> dict:
    kwargs = {"n": request.n, "ignore_eos": request.ignore_eos, "stop": request.stop,
              "stop_token_ids": request.stop_token_ids, "seed": request.seed}
    for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "min_tokens"):
        value = getattr(request, name)
        if value is not None:
            kwargs[name] = value
    if request.top_k is not None:
        kwargs["top_k"] = request.top_k
    return kwargs


def _max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int | None,
                max_model_len: int | None) -> int | None:
    if num_prompt_tokens is not None and max_model_len is not None:
        room = max_model_len - num_prompt_tokens
        if room < 1:
            raise HTTPError(400, f"This model's maximum context length is {max_model_len} tokens, "
                                 f"but the prompt has {num_prompt_tokens} tokens. Shorten the prompt.",
                            param="messages")
        if requested is not None and requested > room:
            raise HTTPError(400, f"This model's maximum context length is {max_model_len} tokens. "
                                 f"The prompt has {num_prompt_tokens} tokens and max_tokens is "
                                 f"{requested}; lower max_tokens to at most {room}.",
                            param="max_tokens")
        if requested is None:
            return room if default is None else min(default, room)
    return requested if requested is not None else default


def completion_sampling_params(request: CompletionRequest,
                               num_prompt_tokens: int | None = None,
                               max_model_len: int | None = None) -> SamplingParams:
    if request.suffix:
        raise HTTPError(400, "suffix is not supported; put the whole text in prompt", param="suffix")
    if request.best_of is not None and request.best_of != request.n:
        raise HTTPError(400, "best_of different from n is not supported; drop best_of", param="best_of")
    kwargs = _common(request)
    kwargs["max_tokens"] = _max_tokens(request.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS,
                                       num_prompt_tokens, max_model_len)
    kwargs["logprobs"] = request.logprobs
    return SamplingParams(**kwargs)


def chat_sampling_params(request: ChatCompletionRequest, num_prompt_tokens: int,
                         max_model_len: int | None) -> SamplingParams:
    if request.top_logprobs is not None and request.top_logprobs > 0 and not request.logprobs:
        raise HTTPError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    kwargs = _common(request)
    requested = request.max_completion_tokens or request.max_tokens
    kwargs["max_tokens"] = _max_tokens(requested, None, num_prompt_tokens, max_model_len)
    if request.logprobs:
        kwargs["logprobs"] = request.top_logprobs or 0
    return SamplingParams(**kwargs)
