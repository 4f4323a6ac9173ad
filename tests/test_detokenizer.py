"""Incremental detokenization (valid UTF-8 while streaming) and stop strings across tokens."""

import pytest

from fake_runner import ScriptedRunner, fake_engine, run_all
from loraplex import SamplingParams
from loraplex.core.detokenizer import IncrementalDetokenizer
from loraplex.core.tokenizer import Tokenizer
from models import write_tiny_tokenizer

MULTIBYTE = "héllo wörld: 日本語 and 🎉🚀 done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_multibyte_characters_split_over_tokens_are_never_emitted_half(tokenizer):
    prompt = tokenizer.encode("the answer is")
    ids = tokenizer.encode(MULTIBYTE)
    # Byte-level BPE without merges for these: each 3- or 4-byte character is several tokens.
    assert len(ids) > len(MULTIBYTE.encode("utf-8")) // 2
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add_token(t) for t in ids] + [detok.finish()]
    assert "".join(deltas) == MULTIBYTE == detok.text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= 5                       # held back while characters were incomplete
    assert "🎉" in deltas and "日" in deltas


def test_an_incomplete_character_at_the_end_is_flushed_as_the_decoder_would(tokenizer):
    ids = tokenizer.encode("ok 日")[:-1]                # cut inside the last character
    detok = IncrementalDetokenizer(tokenizer, [])
    streamed = "".join(detok.add_token(t) for t in ids)
    assert "\ufffd" not in streamed
    assert streamed + detok.finish() == tokenizer.decode(ids)
    assert detok.text.endswith("\ufffd")


def test_skip_special_tokens(tokenizer):
    ids = tokenizer.encode("hello") + [tokenizer.eos_token_id] + tokenizer.encode(" world")
    for skip, expected in ((True, "hello world"), (False, "hello</s> world")):
        detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
        assert "".join(detok.add_token(t) for t in ids) + detok.finish() == expected


def _scripted(tokenizer, text, **params):
    script = tokenizer.encode(text)
    engine = fake_engine(ScriptedRunner(script + [0] * 4, vocab_size=tokenizer.vocab_size,
                                        eos_token_id=tokenizer.eos_token_id), tokenizer=tokenizer)
    engine.add_request("a", tokenizer.encode("q:"), SamplingParams(max_tokens=len(script) + 4, **params))
    texts, final = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            final = out
    return script, texts, final.outputs[0]


def test_stop_string_across_token_boundaries_is_not_emitted(tokenizer):
    text = "the quick brown fox jumps over the lazy dog"
    script, texts, out = _scripted(tokenizer, text, stop=["fox jum", "zzz"])
    assert [tokenizer.decode([t]) for t in script].count("fox jum") == 0   # spans tokens
    assert out.text == "the quick brown "
    assert (out.finish_reason, out.stop_reason) == ("stop", "fox jum")
    assert all("fox" not in t for t in texts)
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)                # streamed text only grows
    assert len(out.token_ids) < len(script)


def test_include_stop_str_in_output(tokenizer):
    _, texts, out = _scripted(tokenizer, "hello world, hello loraplex!", stop="lo ra",
                              include_stop_str_in_output=False)
    assert out.finish_reason == "length"               # "lo ra" never occurs
    _, texts, out = _scripted(tokenizer, "hello world, hello loraplex!", stop="world,",
                              include_stop_str_in_output=True)
    assert out.text == "hello world," and out.stop_reason == "world,"


def test_eos_text_is_not_in_the_output(tokenizer):
    script = tokenizer.encode("hi there") + [tokenizer.eos_token_id]
    engine = fake_engine(ScriptedRunner(script, vocab_size=tokenizer.vocab_size,
                                        eos_token_id=tokenizer.eos_token_id), tokenizer=tokenizer)
    out = run_all(engine, [("a", [5, 6], SamplingParams(max_tokens=20, skip_special_tokens=False))])
    completion = out["a"].outputs[0]
    assert completion.text == "hi there" and completion.token_ids[-1] == tokenizer.eos_token_id
    assert completion.finish_reason == "stop"


def test_streamed_text_equals_the_decoded_output_with_multibyte_text(tokenizer):
    script, texts, out = _scripted(tokenizer, MULTIBYTE, ignore_eos=True)
    assert out.text.startswith(MULTIBYTE)
    assert all("\ufffd" not in t for t in texts)
    for earlier, later in zip(texts, texts[1:]):
        assert later.startswith(earlier)
