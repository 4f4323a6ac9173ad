"""Structured outputs in the engine: JSON schema, regex, choice and grammars constrain every token
(checked on the demo model's outputs), bad constraints are refused up front, and grammar rows share
batches and the overlapped schedule with other rows without changing them."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from loraplex import LLM, SamplingParams, StructuredOutputsParams
from loraplex.core.grammar import bitmask_to_bool
from loraplex.demo import demo_model_path
from loraplex.errors import InvalidRequestError

PROMPTS = ["Input: hello world\nOutput: ", "Input: the lazy dog\nOutput: ", "Input: abc\nOutput: "]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 10},
                   "age": {"type": "integer", "minimum": 0, "maximum": 150},
                   "pet": {"enum": ["cat", "dog"]}},
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
REGEX = r"[a-c]{3}-[0-9]{2}"


@pytest.fixture(scope="module")
def llm():
    return LLM(str(demo_model_path()), device="cpu")


def generate(llm, constraint: StructuredOutputsParams, seeds=(None, 1, 2, 3), max_tokens=80, prompts=PROMPTS):
    """Outputs for each prompt, greedy (seed None) and sampled with each seed."""
    params = [SamplingParams(temperature=0 if s is None else 1.0, seed=s, max_tokens=max_tokens,
                             structured_outputs=constraint) for s in seeds]
    return [c for p in params for out in llm.generate(prompts, p, use_tqdm=False) for c in out.outputs]


def test_json_schema_outputs_are_valid(llm):
    outputs = generate(llm, StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True))
    for c in outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop" and c.token_ids[-1] == llm.get_tokenizer().eos_token_id
        assert " " not in c.text.replace(json.loads(c.text)["name"], "")    # no whitespace between tokens
    # Unconstrained, the demo base copies its input: nothing like JSON.
    plain = llm.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0]
    assert plain.outputs[0].text == "hello world"


def test_schema_given_as_json_text_and_json_object(llm):
    for c in generate(llm, StructuredOutputsParams(json=json.dumps(SCHEMA), disable_any_whitespace=True),
                      seeds=(None, 5)):
        jsonschema.validate(json.loads(c.text), SCHEMA)
    for c in generate(llm, StructuredOutputsParams(json_object=True, disable_any_whitespace=True), seeds=(7, 8),
                      max_tokens=120):
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.text), dict)
        else:   # a long object cut by max_tokens is still a valid prefix of one
            assert c.text.startswith("{")


def test_disable_additional_properties(llm):
    open_schema = {"type": "object", "properties": {"a": {"enum": [1, 2]}}, "required": ["a"]}
    for c in generate(llm, StructuredOutputsParams(json=open_schema, disable_any_whitespace=True,
                                                   disable_additional_properties=True), seeds=(None, 3, 4)):
        assert list(json.loads(c.text)) == ["a"]


def test_regex_choice_and_grammars_constrain_the_whole_output(llm):
    for c in generate(llm, StructuredOutputsParams(regex=REGEX)):
        assert re.fullmatch(REGEX, c.text), c.text
    choices = ["yes", "no way", "maybe \"so\""]
    seen = set()
    for c in generate(llm, StructuredOutputsParams(choice=choices), seeds=(None, 1, 2, 3, 4, 5)):
        assert c.text in choices
        seen.add(c.text)
    assert len(seen) > 1                       # sampling still chooses among them
    lark = 'start: "SELECT " col " FROM users" \ncol: "name" | "age" | "*"'
    for c in generate(llm, StructuredOutputsParams(grammar=lark)):
        assert re.fullmatch(r"SELECT (name|age|\*) FROM users", c.text), c.text
    gbnf = 'root ::= "id=" [0-9] [0-9]? ";"'
    for c in generate(llm, StructuredOutputsParams(grammar=gbnf)):
        assert re.fullmatch(r"id=[0-9]{1,2};", c.text), c.text


@pytest.mark.parametrize("kwargs, message", [
    (dict(regex="a(b"), "the regex is not valid"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(json={"type": "strin"}), "the JSON schema is not valid"),
    (dict(grammar="start: undefined_rule"), "the grammar is not valid"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(regex="a", choice=["a"]), "exactly one constraint"),
    (dict(), "exactly one constraint"),
    (dict(structural_tag="{}"), "structural_tag is not supported"),
])
def test_bad_constraints_are_refused_before_the_engine(llm, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        llm.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(**kwargs)), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()


def test_grammar_rows_batch_with_others_and_keep_the_overlapped_schedule():
    """A batch of grammar rows (seeded and greedy, n > 1), controlled rows and plain rows: the same
    tokens with overlapped scheduling as in lock step, and the plain rows the same as alone."""
    params = [
        SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(
            json=SCHEMA, disable_any_whitespace=True)),
        SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=12, structured_outputs=StructuredOutputsParams(
            regex=REGEX)),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0.9, seed=4, max_tokens=12, logit_bias={70: 3.0}, bad_words=["he"]),
        SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(choice=["A", "BB"]),
                       min_tokens=4),
    ]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(params))]
    runs = {}
    for overlapped in (True, False):
        llm = LLM(str(demo_model_path()), device="cpu", async_scheduling=overlapped)
        assert llm.llm_engine.core.async_scheduling is overlapped
        runs[overlapped] = [[(c.token_ids, c.text, c.finish_reason) for c in out.outputs]
                            for out in llm.generate(prompts, params, use_tqdm=False)]
        alone = llm.generate(prompts[2], params[2], use_tqdm=False)[0].outputs[0]
        assert runs[overlapped][2][0][1] == alone.text
    assert runs[True] == runs[False]
    out = runs[True]
    jsonschema.validate(json.loads(out[0][0][1]), SCHEMA)
    assert all(re.fullmatch(REGEX, text) for _, text, _ in out[1])
    # min_tokens forbids the EOS the finished choice needs: the grammar wins, and the row stops.
    assert out[4][0][1] in ("A", "BB") and out[4][0][2] == "stop"


def test_bitmask_expands_like_llguidance_on_the_device():
    from llguidance.torch import apply_token_bitmask_inplace
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (5, 9), dtype=torch.int32, generator=gen)
    logits = torch.randn(5, 259, generator=gen)
    want = logits.clone()
    apply_token_bitmask_inplace(want, bitmask)
    got = logits.masked_fill(~bitmask_to_bool(bitmask, 259), float("-inf"))
    assert torch.equal(got, want)
