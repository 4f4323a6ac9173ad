"""SamplingParams: vLLM defaults and clear errors for every bad value."""

import pytest

from loraplex import SamplingParams
from loraplex.errors import InvalidRequestError


def test_defaults_and_normalization():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (1, 1.0, 1.0, 0, 16, None)
    assert p.stop_strings == [] and p.stop_token_ids == []
    assert SamplingParams(stop="###").stop_strings == ["###"]
    assert SamplingParams(top_k=-1).top_k == 0
    greedy = SamplingParams(temperature=0, top_k=5, top_p=0.5, min_p=0.3)
    assert greedy.is_greedy and (greedy.top_k, greedy.top_p, greedy.min_p) == (0, 1.0, 0.0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "n must be an integer >= 1"),
    (dict(temperature=-0.5), r"temperature must be in \[0, 2\]"),
    (dict(temperature=2.5), r"temperature must be in \[0, 2\]"),
    (dict(temperature="hot"), "temperature must be a finite number"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(top_p=0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be an integer >= 1, or -1 / 0"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0), "repetition_penalty must be a number > 0"),
    (dict(presence_penalty=3), r"presence_penalty must be in \[-2, 2\]"),
    (dict(frequency_penalty=-2.5), r"frequency_penalty must be in \[-2, 2\]"),
    (dict(seed="x"), "seed must be an integer or None"),
    (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    (dict(min_tokens=-1), "min_tokens must be an integer >= 0"),
    (dict(min_tokens=5, max_tokens=4), r"min_tokens \(5\) must be <= max_tokens \(4\)"),
    (dict(logprobs=-1), "logprobs must be an integer >= 0"),
    (dict(stop=["ok", 3]), "stop must be a string or a list of strings"),
    (dict(stop=""), "must not contain an empty string"),
    (dict(stop_token_ids=[1, -2]), "stop_token_ids must be a list of token ids"),
    (dict(ignore_eos="yes"), "ignore_eos must be True or False"),
])
def test_bad_values_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_max_tokens_none_means_up_to_max_model_len():
    assert SamplingParams(max_tokens=None).max_tokens is None
