"""SamplingParams: how to pick each next token and when to stop (vLLM-compatible names)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from loraplex.errors import InvalidRequestError

# Below this temperature sampling is greedy; dividing logits by ~0 would overflow.
SAMPLING_EPS = 1e-5


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass
class SamplingParams:
    """Per-request generation settings.

    Greedy decoding is temperature=0. top_k of -1 or 0 and top_p=1, min_p=0 turn
    those filters off. Penalties follow vLLM: repetition_penalty divides positive
    (multiplies negative) logits of every token seen in the prompt or output;
    presence/frequency penalties subtract from logits of tokens in the output only.
    logprobs=k returns the k most likely tokens per position (plus the sampled one)
    with log-probabilities of the raw model logits, before penalties and temperature.
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
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Filled from `stop` by __post_init__: always a list.
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_numbers()
        self._check_stops()
        if self.temperature < SAMPLING_EPS:
            # Greedy: filters cannot change the argmax, so switch them off.
            self.temperature = 0.0
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0
        if self.top_k == -1:
            self.top_k = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def _check_numbers(self) -> None:
        def bad(name: str, rule: str) -> InvalidRequestError:
            return InvalidRequestError(
                f"SamplingParams.{name} must be {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.n) or self.n < 1:
            raise bad("n", "an integer >= 1")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                raise bad(name, "a finite number")
        if self.temperature < 0:
            raise bad("temperature", "a number >= 0 (0 means greedy)")
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
        if self.logprobs is not None and (not _is_int(self.logprobs) or self.logprobs < 0):
            raise bad("logprobs", "an integer >= 0 (the number of top tokens per position) or None")
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
        self.stop_token_ids = list(ids)
