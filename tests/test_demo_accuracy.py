"""The shipped demo on held-out inputs through the offline LLM, the way a newcomer meets it.

One batch holds every request, the base model and the three adapters mixed: upper and
reverse must be exact on at least 99% of every input class (lowercase words, mixed case,
digits, punctuation, long inputs up to 64 characters), sql must answer the questions of
its grammar and give well-formed SQL of its family on anything else, and the base model
must copy. The demo README's table reports the same measure on 100 inputs per class.
"""

import random

import pytest

from loraplex import LLM, LoRARequest, SamplingParams
from loraplex.demo import (DEMO_ADAPTER_NAMES, EXAMPLES, OFF_GRAMMAR_QUESTIONS, demo_adapters_dir,
                           demo_model_path, format_prompt)
from loraplex.demo.sql_grammar import parse_sql
from loraplex.demo.tasks import SQL_CLASS, TEXT_CLASSES, held_out_pairs

NUM_PER_CLASS = 20          # 100 held-out inputs per adapter: 20 of each of the 5 classes
BASE = "base"
TARGETS = {"upper": 0.99, "reverse": 0.99, "echo": 0.95}    # exact match, every class
SQL_EXACT_TARGET = 0.95
MAX_TOKENS = 100            # above every expected answer (64 characters, or an sql query)


def jobs() -> list[tuple[str, str, str, str, str | None]]:
    """(model, task, input class, input, expected answer or None for "any well-formed query")."""
    rows = []
    for input_class in TEXT_CLASSES:
        for task, model in (("echo", BASE), ("upper", "upper"), ("reverse", "reverse")):
            rows += [(model, task, input_class, text, want)
                     for text, want in held_out_pairs(task, NUM_PER_CLASS, input_class)]
        rows += [("sql", "sql", input_class, text, None)
                 for text, _ in held_out_pairs("echo", NUM_PER_CLASS, input_class)]
    rows += [("sql", "sql", SQL_CLASS, text, want)
             for text, want in held_out_pairs("sql", NUM_PER_CLASS * len(TEXT_CLASSES))]
    rows += [(task, task, "example", text, want) for task, pairs in EXAMPLES.items() for text, want in pairs]
    rows += [("sql", "sql", "off-grammar", text, None) for text in OFF_GRAMMAR_QUESTIONS]
    random.Random(0).shuffle(rows)      # adapters and classes mixed in every step
    return rows


@pytest.fixture(scope="module")
def answered():
    """[(model, task, input class, input, expected, answer)], all generated in one call."""
    llm = LLM(model=str(demo_model_path()), enable_lora=True, max_loras=len(DEMO_ADAPTER_NAMES),
              max_lora_rank=16, dtype="float32", device="cpu", max_num_seqs=512)
    adapters = {name: LoRARequest(name, i + 1, str(demo_adapters_dir() / name))
                for i, name in enumerate(DEMO_ADAPTER_NAMES)}
    rows = jobs()
    outs = llm.generate([format_prompt(text) for _, _, _, text, _ in rows],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        lora_request=[adapters.get(model) for model, *_ in rows], use_tqdm=False)
    return [(*row, out.outputs[0].text) for row, out in zip(rows, outs, strict=True)]


def exact(answered, task: str, input_class: str) -> tuple[float, list]:
    rows = [r for r in answered if r[1] == task and r[2] == input_class]
    misses = [(text, want, got) for _, _, _, text, want, got in rows if got != want]
    return 1 - len(misses) / len(rows), misses


@pytest.mark.parametrize("task", ["upper", "reverse", "echo"])
def test_text_tasks_meet_their_target_on_every_input_class(answered, task):
    for input_class in TEXT_CLASSES:
        score, misses = exact(answered, task, input_class)
        assert score >= TARGETS[task], f"{task} on {input_class}: {score:.2f} exact; misses {misses}"


def test_sql_answers_its_grammar(answered):
    score, misses = exact(answered, "sql", SQL_CLASS)
    assert score >= SQL_EXACT_TARGET, f"sql: {score:.2f} exact on held-out requests; misses {misses}"


def test_sql_gives_well_formed_sql_on_anything_else(answered):
    others = [r for r in answered if r[1] == "sql" and r[4] is None]
    assert len(others) == NUM_PER_CLASS * len(TEXT_CLASSES) + len(OFF_GRAMMAR_QUESTIONS)
    malformed = [(text, got) for _, _, _, text, _, got in others if parse_sql(got) is None]
    assert malformed == [], malformed


def test_documented_examples(answered):
    examples = [r for r in answered if r[2] == "example"]
    assert len(examples) == sum(len(pairs) for pairs in EXAMPLES.values())
    assert [(text, got) for _, _, _, text, want, got in examples if got != want] == []
