"""vLLM's token controls and output options in the offline API, each checked by its effect on the demo
model: logit_bias, allowed_token_ids, bad_words, prompt_logprobs (against transformers),
truncate_prompt_tokens, special-token text, and vLLM's limits on the parameters."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.core.sampler import TokenControls
from loraplex.demo import demo_model_path
from loraplex.errors import InvalidRequestError

PROMPT = "Input: hello world\nOutput: "


@pytest.fixture(scope="module")
def llm():
    return LLM(str(demo_model_path()), device="cpu")


def one(llm, prompt=PROMPT, **kwargs):
    kwargs.setdefault("max_tokens", 16)
    return llm.generate(prompt, SamplingParams(**kwargs), use_tqdm=False)[0]


def ids(llm, text: str) -> list[int]:
    return llm.get_tokenizer().encode(text, add_special_tokens=False)


def test_logit_bias_pushes_and_bans_tokens(llm):
    assert one(llm, temperature=0).outputs[0].text == "hello world"
    z = ids(llm, "Z")[0]
    assert one(llm, temperature=0, logit_bias={z: 100}, max_tokens=6).outputs[0].text == "ZZZZZZ"
    assert one(llm, temperature=0, logit_bias={str(z): 100.0}, max_tokens=2).outputs[0].text == "ZZ"  # JSON keys
    h = ids(llm, "h")[0]
    assert not one(llm, temperature=0, logit_bias={h: -100}).outputs[0].text.startswith("h")
    # Clamped to [-100, 100] as in vLLM.
    assert SamplingParams(logit_bias={1: 1e9, 2: -1e9}).logit_bias == {1: 100.0, 2: -100.0}


def test_allowed_token_ids_restrict_every_token(llm):
    allowed = ids(llm, "xyz ")
    for seed in (1, 2, 3):
        out = one(llm, temperature=1.0, seed=seed, allowed_token_ids=allowed).outputs[0]
        assert len(out.token_ids) == 16 and set(out.token_ids) <= set(allowed)


def test_bad_words_are_never_completed(llm):
    assert "world" not in one(llm, temperature=0, bad_words=["world"]).outputs[0].text
    text = one(llm, temperature=0, bad_words=["hello"]).outputs[0].text
    assert "hello" not in text and text.startswith("hell")   # only the word's last token is banned
    # vLLM's rule: the last token is banned when the output ends with the word's other tokens.
    controls = TokenControls(SamplingParams(bad_words=["x"]))
    controls.bad_words = [[5, 6, 7], [9]]
    assert controls.banned_now([1, 5, 6]) == [7, 9]
    assert controls.banned_now([5]) == [9] and controls.banned_now([]) == [9]


def test_prompt_logprobs_match_transformers(llm):
    from transformers import AutoModelForCausalLM
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    out = one(llm, temperature=0, prompt_logprobs=3, max_tokens=2)
    assert out.prompt_token_ids == prompt_ids
    assert len(out.prompt_logprobs) == len(prompt_ids) and out.prompt_logprobs[0] is None
    model = AutoModelForCausalLM.from_pretrained(str(demo_model_path()), dtype=torch.float32)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0].float(), dim=-1)   # [len, vocab]
    for pos in range(1, len(prompt_ids)):
        entry, token = out.prompt_logprobs[pos], prompt_ids[pos]
        assert entry[token].logprob == pytest.approx(ref[pos - 1, token].item(), abs=1e-4)
        assert entry[token].rank == int((ref[pos - 1] > ref[pos - 1, token]).sum()) + 1
        top = ref[pos - 1].topk(3).indices.tolist()
        assert set(top) <= set(entry) and len(entry) in (3, 4)
        assert entry[token].decoded_token == llm.get_tokenizer().decode([token], skip_special_tokens=False)
    # Chunked prefill (4-token chunks) gives the same entries; prompt_logprobs=0 keeps the prompt token only.
    chunked = LLM(str(demo_model_path()), device="cpu", max_num_batched_tokens=4, max_num_seqs=4)
    again = one(chunked, temperature=0, prompt_logprobs=3, max_tokens=2)
    # (Equal to 1e-4: chunks sum attention in another order, a difference of about 1e-6 in float32;
    # rounding both to 4 places and comparing failed where that straddled a rounding boundary.)
    assert [e and sorted(e) for e in again.prompt_logprobs] == [e and sorted(e) for e in out.prompt_logprobs]
    for chunk_entry, entry in zip(again.prompt_logprobs[1:], out.prompt_logprobs[1:]):
        for t, lp in entry.items():
            assert (chunk_entry[t].logprob, chunk_entry[t].rank) == (pytest.approx(lp.logprob, abs=1e-4), lp.rank)
    zero = one(llm, temperature=0, prompt_logprobs=0, max_tokens=1)
    assert [list(e) for e in zero.prompt_logprobs[1:]] == [[t] for t in prompt_ids[1:]]


def test_prompt_logprobs_of_n_samples_are_reported_once(llm):
    out = one(llm, temperature=1.0, seed=2, n=3, prompt_logprobs=1, max_tokens=3)
    assert len(out.outputs) == 3 and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert out.outputs[0].logprobs is None   # logprobs were not asked for


def test_truncate_prompt_tokens_keeps_one_end(llm):
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    assert one(llm, truncate_prompt_tokens=6, max_tokens=1).prompt_token_ids == prompt_ids[-6:]
    assert one(llm, truncate_prompt_tokens=6, truncation_side="right", max_tokens=1).prompt_token_ids == \
        prompt_ids[:6]
    assert one(llm, truncate_prompt_tokens=-1, max_tokens=1).prompt_token_ids == prompt_ids   # max_model_len
    # The truncated prompt is what the model sees: the answer follows the kept tail.
    assert one(llm, temperature=0, truncate_prompt_tokens=len(prompt_ids)).outputs[0].text == "hello world"


def test_special_tokens_in_text(llm):
    kwargs = dict(temperature=0, ignore_eos=True, max_tokens=14)
    assert one(llm, **kwargs).outputs[0].text.startswith("hello world") and \
        "</s>" not in one(llm, **kwargs).outputs[0].text
    spaced = one(llm, skip_special_tokens=False, **kwargs).outputs[0].text
    assert spaced.startswith("hello world </s>") and "</s> </s>" in spaced
    tight = one(llm, skip_special_tokens=False, spaces_between_special_tokens=False, **kwargs).outputs[0].text
    assert tight.startswith("hello world</s>") and "</s></s>" in tight


def test_include_stop_str_in_output(llm):
    assert one(llm, temperature=0, stop=["wor"]).outputs[0].text == "hello "
    out = one(llm, temperature=0, stop=["wor"], include_stop_str_in_output=True).outputs[0]
    assert out.text == "hello wor" and out.stop_reason == "wor"


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=2.01), r"temperature must be in \[0, 2\]"),
    (dict(temperature=0, n=2), "n must be 1 when using greedy sampling"),
    (dict(logit_bias={"x": 1}), "logit_bias keys must be token ids"),
    (dict(logit_bias={1: float("inf")}), "must be a finite number"),
    (dict(allowed_token_ids=[]), "allowed_token_ids must be a non-empty list"),
    (dict(bad_words=[""]), "must not contain an empty string"),
    (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens must be an integer >= 1"),
    (dict(prompt_logprobs=-2), "prompt_logprobs must be an integer >= 0"),
    (dict(truncation_side="middle"), "truncation_side must be"),
])
def test_bad_values_are_refused(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)


def test_max_logprobs_raises_the_limit_up_to_the_whole_vocabulary():
    from loraplex import LLM
    from loraplex.demo import demo_model_path

    llm = LLM(str(demo_model_path()), device="cpu", max_logprobs=-1)
    vocab = llm.llm_engine.vocab_size
    out = one(llm, max_tokens=2, logprobs=vocab, prompt_logprobs=30)
    assert all(len(entry) >= vocab for entry in out.outputs[0].logprobs)
    assert all(len(entry) >= 30 for entry in out.prompt_logprobs[1:])
    with pytest.raises(InvalidRequestError, match="greater than max allowed: 3"):
        one(LLM(str(demo_model_path()), device="cpu", max_logprobs=3), logprobs=4)


def test_vllm_limits(llm, monkeypatch):
    assert SamplingParams(temperature=0.001).temperature == 0.01      # raised as vLLM does
    assert SamplingParams(temperature=2.0).temperature == 2.0
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(n=300, temperature=1.0).n == 300
    monkeypatch.setenv("VLLM_MAX_N_SEQUENCES", "4")
    with pytest.raises(InvalidRequestError, match="n must be at most 4.*VLLM_MAX_N_SEQUENCES"):
        SamplingParams(n=5, temperature=1.0)
    vocab = llm.llm_engine.vocab_size
    for kwargs, name in ((dict(logit_bias={vocab: 1.0}), "logit_bias"), (dict(allowed_token_ids=[1, vocab]),
                                                                         "allowed_token_ids")):
        with pytest.raises(InvalidRequestError, match=f"{name} holds out-of-vocabulary token ids \\[{vocab}\\]"):
            one(llm, **kwargs)
    with pytest.raises(InvalidRequestError, match="Requested prompt logprobs of 21, which is greater than max allowed: 20"):
        one(llm, prompt_logprobs=21)
    with pytest.raises(InvalidRequestError, match="Requested sample logprobs of 21, which is greater than max allowed: 20"):
        one(llm, logprobs=21)
    assert math.isclose(SamplingParams(temperature=1.5).temperature, 1.5)
