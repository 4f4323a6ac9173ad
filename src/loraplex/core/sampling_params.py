"""SamplingParams: how to pick each next token and when to stop (vLLM-compatible names and limits)."""

from __future__ import annotations

import logging
import enum
import math
import os
from dataclasses import dataclass, field

from loraplex.core.structured_output import StructuredOutputsParams
from loraplex.errors import InvalidRequestError

logger = logging.getLogger(__name__)

# Below this temperature sampling is greedy; dividing logits by ~0 would overflow.
SAMPLING_EPS = 1e-5
# vLLM raises positive temperatures below this to it (smaller ones overflow float32 logits).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 2.0                       # vLLM's (and OpenAI's) upper bound
LOGIT_BIAS_LIMIT = 100.0                    # biases are clamped to [-100, 100], as vLLM and OpenAI do
MAX_N_ENV = "VLLM_MAX_N_SEQUENCES"          # vLLM's cap on n, 16384 unless set
DEFAULT_MAX_N = 16384


class RequestOutputKind(enum.IntEnum):
    """What each output of a streamed request holds (vLLM's values).

    CUMULATIVE: everything so far (text, token ids, logprobs). DELTA: only what is new since the
    previous output of the request (prompt logprobs in the first output only); an output whose
    consumer lagged behind holds several steps' worth. FINAL_ONLY: one output, when it finishes.
    """
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


def max_n() -> int:
    value = os.environ.get(MAX_N_ENV, "").strip()
    try:
        return int(value) if value else DEFAULT_MAX_N
    except ValueError:
        raise InvalidRequestError(f"{MAX_N_ENV}={value!r} is not an integer") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass
class SamplingParams:
    """Per-request generation settings.

    Greedy decoding is temperature=0 (then n must be 1, as in vLLM). top_k of -1 or 0 and
    top_p=1, min_p=0 turn those filters off. Penalties follow vLLM: repetition_penalty divides
    positive (multiplies negative) logits of every token seen in the prompt or output;
    presence/frequency penalties subtract from logits of tokens in the output only.
    logprobs=k returns the k most likely tokens per position (plus the sampled one)
    with log-probabilities of the raw model logits, before penalties and temperature;
    prompt_logprobs=k the same for every prompt token after the first.

    logit_bias ({token id: bias}, clamped to [-100, 100]) is added to the logits;
    allowed_token_ids keeps only those tokens; bad_words are never completed (the last
    token of each word's tokenization is banned when the output ends with the tokens
    before it); structured_outputs constrains the output to a JSON schema, regex, choice
    or grammar (StructuredOutputsParams). truncate_prompt_tokens=k keeps the prompt's
    last k tokens (-1: max_model_len). output_kind says what a streamed output holds
    (RequestOutputKind; LLM.generate always returns final outputs); stream_interval=k hands
    a streamed request's outputs out every k tokens (the first and the last at once).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "left"             # which end truncate_prompt_tokens cuts ("right": keep the first k)
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stream_interval: int = 1
    # Filled from `stop` by __post_init__: always a list.
    stop_strings: list[str] = field(init=False, repr=False)
    # Filled by the InputProcessor, which has the tokenizer: each bad word's token ids (with and
    # without a leading space), and the structured-output grammar compiled for the engine.
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False, default_factory=list)
    compiled_grammar: str | None = field(init=False, repr=False, default=None)

    def __post_init__(self) -> None:
        if self.seed == -1:
            self.seed = None                      # vLLM's "no seed"
        self._check_numbers()
        self._check_stops()
        self._check_token_controls()
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams.from_dict(self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise InvalidRequestError(f"SamplingParams.structured_outputs must be a StructuredOutputsParams, "
                                      f"got {type(self.structured_outputs).__name__}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            logger.warning("temperature %s is below %s, which may overflow the logits; using %s (as vLLM does)",
                           self.temperature, MIN_TEMPERATURE, MIN_TEMPERATURE)
            self.temperature = MIN_TEMPERATURE
        if self.temperature < SAMPLING_EPS:
            # Greedy: filters cannot change the argmax, so switch them off.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
            if self.n > 1:
                raise InvalidRequestError(f"n must be 1 when using greedy sampling, got {self.n}; set a "
                                          f"temperature above 0 for several samples")
        if self.top_k == -1:
            self.top_k = 0
        try:
            self.output_kind = RequestOutputKind(self.output_kind)
        except ValueError:
            raise InvalidRequestError(f"SamplingParams.output_kind must be a RequestOutputKind (0 cumulative, "
                                      f"1 delta, 2 final only), got {self.output_kind!r}") from None

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def _check_numbers(self) -> None:
        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(
                f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        if self.n > max_n():
            raise InvalidRequestError(f"n must be at most {max_n()}, got {self.n}; to raise this limit, "
                                      f"set the {MAX_N_ENV} environment variable")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                raise bad(name, "a finite number")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise bad("temperature", f"in [0, {MAX_TEMPERATURE:g}] (0 means greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1] (1 disables it)")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or -1 / 0 to disable it")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "in [0, 1] (0 disables it)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "a number > 0 (1 disables it)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "in [-2, 2] (0 disables it)")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1, or None for up to max_model_len")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(
                f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise bad(name, "an integer >= 0 (the number of top tokens per position) or None")
        if self.truncate_prompt_tokens is not None and (
                not _is_int(self.truncate_prompt_tokens) or self.truncate_prompt_tokens == 0
                or self.truncate_prompt_tokens < -1):
            raise bad("truncate_prompt_tokens", "an integer >= 1 (keep the prompt's last k tokens), -1 "
                      "(max_model_len) or None")
        if not _is_int(self.stream_interval) or self.stream_interval < 1:
            raise bad("stream_interval", "an integer >= 1 (1: an output for every token)")
        if self.truncation_side not in ("left", "right"):
            raise bad("truncation_side", '"left" (keep the last tokens) or "right" (keep the first)')
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "spaces_between_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")

    def _check_stops(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError(
                f"SamplingParams.stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise InvalidRequestError("SamplingParams.stop must not contain an empty string")
        self.stop_strings = list(stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
            raise InvalidRequestError(
                f"SamplingParams.stop_token_ids must be a list of token ids (integers >= 0), "
                f"got {self.stop_token_ids!r}")
        self.stop_token_ids = list(dict.fromkeys(ids))

    def _check_token_controls(self) -> None:
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise InvalidRequestError(f"SamplingParams.logit_bias must be a dict {{token id: bias}}, "
                                          f"got {type(self.logit_bias).__name__}")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)
                except (TypeError, ValueError):
                    token_id = -1
                if token_id < 0 or isinstance(token, bool) or (isinstance(token, float) and token != token_id):
                    raise InvalidRequestError(f"logit_bias keys must be token ids (integers >= 0, or their "
                                              f"decimal strings), got {token!r}")
                if not _is_number(value):
                    raise InvalidRequestError(f"logit_bias[{token!r}] must be a finite number, got {value!r}")
                bias[token_id] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
            self.logit_bias = bias
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if not isinstance(ids, (list, tuple)) or not ids or not all(_is_int(t) and t >= 0 for t in ids):
                raise InvalidRequestError(f"SamplingParams.allowed_token_ids must be a non-empty list of token "
                                          f"ids (integers >= 0), got {ids!r}")
            self.allowed_token_ids = list(dict.fromkeys(ids))
        if self.bad_words is not None:
            words = self.bad_words
            if not isinstance(words, (list, tuple)) or not all(isinstance(w, str) for w in words):
                raise InvalidRequestError(f"SamplingParams.bad_words must be a list of strings, got {words!r}")
            if any(not w for w in words):
                raise InvalidRequestError("SamplingParams.bad_words must not contain an empty string")
            self.bad_words = list(dict.fromkeys(words))
