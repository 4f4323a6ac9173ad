"""OpenAI request fields -> SamplingParams, with OpenAI's and vLLM's defaults where they differ.

Structured outputs come in four spellings, merged here into one StructuredOutputsParams as
vLLM merges them: `structured_outputs` (vLLM's own), `response_format` json_object /
json_schema (OpenAI's; it replaces structured_outputs' constraint), and the `guided_*` fields
of vLLM before 0.12. Options a request does not set come from the server's
--structured-outputs-config.

What a request leaves unset comes from the server's flags (RequestDefaults): the model's
recommended sampling parameters (--generation-config, core/generation_defaults.py; its
max_tokens caps a request's), the structured-outputs options, and the fewest tokens per
streamed chunk (--stream-interval).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.core.input_processor import truncation_keep
from loraplex.core.sampling_params import RequestOutputKind, SamplingParams
from loraplex.core.structured_output import StructuredOutputsParams
from loraplex.errors import InvalidRequestError
from loraplex.server.errors import HTTPError
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
# The sampling fields a request may leave to the model's generation config.
_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class RequestDefaults:
    """What requests get for the fields they leave unset, from the server's flags."""
    sampling: dict = field(default_factory=dict)            # --generation-config: temperature ..., max_tokens (a cap)
    structured_outputs: dict = field(default_factory=dict)  # --structured-outputs-config
    stream_interval: int = 1                                # --stream-interval: a floor


def _structured_outputs(request: SamplingFields, defaults: dict[str, bool]) -> StructuredOutputsParams | None:
    spec: dict[str, Any] = dict(request.structured_outputs or {})
    legacy = {"json": request.guided_json, "regex": request.guided_regex, "choice": request.guided_choice,
              "grammar": request.guided_grammar}
    for key, value in legacy.items():
        if value is not None:
            spec[key] = value
    if request.guided_whitespace_pattern is not None:
        spec["whitespace_pattern"] = request.guided_whitespace_pattern
    fmt = request.response_format
    if fmt is not None and fmt.type == "structural_tag":
        raise HTTPError(400, "response_format 'structural_tag' is not supported by loraplex; use json_schema",
                        param="response_format")
    if fmt is not None and fmt.type != "text":
        # As in vLLM, response_format replaces the constraint structured_outputs may give.
        for key in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"):
            spec.pop(key, None)
        if fmt.type == "json_object":
            spec["json_object"] = True
        else:
            spec["json"] = fmt.json_schema.json_schema
    if not spec:
        return None
    for key, value in defaults.items():
        spec.setdefault(key, value)
    try:
        return StructuredOutputsParams.from_dict(spec)
    except TypeError as exc:
        raise InvalidRequestError(f"structured_outputs: {exc}") from None


def _common(request: SamplingFields, defaults: RequestDefaults) -> dict:
    kwargs = {"n": request.n if request.n is not None else 1, "ignore_eos": request.ignore_eos,
              "stop": request.stop, "stop_token_ids": request.stop_token_ids, "seed": request.seed,
              "include_stop_str_in_output": request.include_stop_str_in_output,
              "skip_special_tokens": request.skip_special_tokens,
              "spaces_between_special_tokens": request.spaces_between_special_tokens,
              "truncate_prompt_tokens": request.truncate_prompt_tokens,
              "truncation_side": request.truncation_side or "left",
              "logit_bias": request.logit_bias, "allowed_token_ids": request.allowed_token_ids,
              "bad_words": request.bad_words, "prompt_logprobs": request.prompt_logprobs,
              "structured_outputs": _structured_outputs(request, defaults.structured_outputs),
              # Outputs hold what is new (generation.run_prompt streams them as they come).
              "output_kind": RequestOutputKind.DELTA,
              # --stream-interval is a floor a request may raise (vLLM's rule).
              "stream_interval": max(request.stream_interval or 1, defaults.stream_interval)}
    for name in (*_GENERATION_DEFAULTS, "presence_penalty", "frequency_penalty", "min_tokens"):
        value = getattr(request, name)
        if value is None:
            value = defaults.sampling.get(name)
        if value is not None:
            kwargs[name] = value
    return kwargs


def _max_tokens(requested: int | None, default: int | None, num_prompt_tokens: int | None,
                max_model_len: int | None, cap: int | None) -> int | None:
    """The request's max_tokens: what it asks for, else `default`, else the room left; never
    above `cap` (the model's recommended max_new_tokens, as vLLM caps it)."""
    value = _max_tokens_uncapped(requested, default, num_prompt_tokens, max_model_len)
    return value if cap is None or (value is not None and value <= cap) else cap


def _max_tokens_uncapped(requested: int | None, default: int | None, num_prompt_tokens: int | None,
                         max_model_len: int | None) -> int | None:
    if num_prompt_tokens is not None and max_model_len is not None:
        room = output_room(requested, num_prompt_tokens, max_model_len, prompt_param="messages")
        if requested is None:
            return room if default is None else min(default, room)
    return requested if requested is not None else default


def output_room(requested: int | None, num_prompt_tokens: int, max_model_len: int, prompt_param: str) -> int:
    """The tokens a prompt of num_prompt_tokens leaves for output; a 400 when it leaves none or
    when `requested` (max_tokens) asks for more. vLLM's server refuses such a max_tokens
    (offline, generation just stops at max_model_len, in vLLM and here)."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise HTTPError(400, f"This model's maximum context length is {max_model_len} tokens, "
                             f"but the prompt has {num_prompt_tokens} tokens. Shorten the prompt.",
                        param=prompt_param)
    if requested is not None and requested > room:
        raise HTTPError(400, f"This model's maximum context length is {max_model_len} tokens. "
                             f"The prompt has {num_prompt_tokens} tokens and max_tokens is "
                             f"{requested}; lower max_tokens to at most {room}.",
                        param="max_tokens")
    return room


def kept_prompt_tokens(num_prompt_tokens: int, request, max_model_len: int) -> int:
    """The prompt's length once the request's truncate_prompt_tokens has cut it (as the engine will)."""
    keep = truncation_keep(request.truncate_prompt_tokens, max_model_len)
    return num_prompt_tokens if keep is None else min(num_prompt_tokens, keep)


def completion_sampling_params(request: CompletionRequest, num_prompt_tokens: int | None = None,
                               max_model_len: int | None = None,
                               defaults: RequestDefaults | None = None) -> SamplingParams:
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise HTTPError(400, "best_of different from n is not supported; drop best_of", param="best_of")
    defaults = defaults or RequestDefaults()
    kwargs = _common(request, defaults)
    kwargs["max_tokens"] = _max_tokens(request.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS,
                                       num_prompt_tokens, max_model_len, defaults.sampling.get("max_tokens"))
    kwargs["logprobs"] = request.logprobs
    if request.echo and request.prompt_logprobs is None:
        kwargs["prompt_logprobs"] = request.logprobs     # vLLM's echo: the prompt's logprobs come first
    return SamplingParams(**kwargs)


def chat_sampling_params(request: ChatCompletionRequest, num_prompt_tokens: int, max_model_len: int | None,
                         defaults: RequestDefaults | None = None) -> SamplingParams:
    if request.top_logprobs is not None and request.top_logprobs > 0 and not request.logprobs:
        raise HTTPError(400, "when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs")
    defaults = defaults or RequestDefaults()
    kwargs = _common(request, defaults)
    requested = request.max_completion_tokens or request.max_tokens
    kwargs["max_tokens"] = _max_tokens(requested, None, num_prompt_tokens, max_model_len,
                                       defaults.sampling.get("max_tokens"))
    if request.logprobs:
        kwargs["logprobs"] = request.top_logprobs or 0
    return SamplingParams(**kwargs)
