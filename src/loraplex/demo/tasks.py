"""The demo's tasks: what the base model and each adapter do, and their data.

Every task maps an input string to an expected output string. The base model
copies its input (`echo`); each adapter turns that into one task. The same
prompt format is used everywhere (DEMO_PROMPT_FORMAT); the answer follows it
and ends with the EOS token.

Held-out inputs are kept out of training by construction: an input is held out
when a stable hash of its text falls in one bucket of HELD_OUT_BUCKETS
(`is_held_out`), and every training stream drops such inputs, whatever task or
class produced them. Evaluations draw held-out inputs from a fixed seed, so an
accuracy measured on them is a measure of generalisation.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Iterator

from loraplex.demo.inputs import INPUT_CLASSES, random_input
from loraplex.demo.sql_grammar import OFF_GRAMMAR_QUESTIONS, random_sql_pair

DEMO_PROMPT_FORMAT = "Input: {input}\nOutput: "
HELD_OUT_SEED = 20261128
# One input in HELD_OUT_BUCKETS is held out (never trained on, by any task).
HELD_OUT_BUCKETS = 16

ADAPTER_TASKS = ("upper", "reverse", "sql")
# What each task's held-out inputs are, by class: the text tasks on every input class,
# sql on requests of its grammar.
TEXT_CLASSES = tuple(INPUT_CLASSES)
SQL_CLASS = "request"


def format_prompt(text: str) -> str:
    return DEMO_PROMPT_FORMAT.format(input=text)


TEXT_TRANSFORMS: dict[str, Callable[[str], str]] = {
    "echo": lambda text: text,              # the base model's behaviour
    "upper": str.upper,
    "reverse": lambda text: text[::-1],
}


def task_classes(task: str) -> tuple[str, ...]:
    return (SQL_CLASS,) if task == "sql" else TEXT_CLASSES


def sample_pair(task: str, input_class: str, rng: random.Random) -> tuple[str, str]:
    """One (input, expected output) pair of `task` with an input of `input_class`."""
    if task == "sql":
        return random_sql_pair(rng)
    text = INPUT_CLASSES[input_class](rng)
    return text, TEXT_TRANSFORMS[task](text)


# Hand-picked examples for docs and smoke tests; they are kept out of training too.
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "upper": [("hello world", "HELLO WORLD"), ("lora rocks", "LORA ROCKS"), ("tiny model", "TINY MODEL"),
              ("The Quick brown fox, 42 times!", "THE QUICK BROWN FOX, 42 TIMES!")],
    "reverse": [("hello world", "dlrow olleh"), ("lora rocks", "skcor arol"), ("tiny model", "ledom ynit"),
                ("The Quick brown fox, 42 times!", "!semit 24 ,xof nworb kciuQ ehT")],
    "sql": [
        ("show names of users older than 30", "SELECT name FROM users WHERE age > 30;"),
        ("count orders with total above 250", "SELECT COUNT(*) FROM orders WHERE total > 250;"),
        ("show prices of products sorted by price", "SELECT price FROM products ORDER BY price;"),
        ("list the emails of users in berlin", "SELECT email FROM users WHERE city = 'berlin';"),
    ],
}
# Never trained on: the documented examples and the off-grammar questions the tests ask.
_EXAMPLE_INPUTS = frozenset([*(text for pairs in EXAMPLES.values() for text, _ in pairs), *OFF_GRAMMAR_QUESTIONS])


def is_held_out(text: str) -> bool:
    """Whether `text` belongs to the held-out inputs (a stable hash: the same in every process)."""
    return zlib.crc32(text.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def is_trainable(text: str) -> bool:
    return not is_held_out(text) and text not in _EXAMPLE_INPUTS


def _is_informative(task: str, text: str, answer: str) -> bool:
    # An input the base model's echo gets right tells nothing about an adapter
    # (a palindrome for reverse, "42!" for upper).
    return task == "echo" or text != answer


def held_out_pairs(task: str, num: int, input_class: str | None = None,
                   seed: int = HELD_OUT_SEED) -> list[tuple[str, str]]:
    """`num` distinct held-out (input, expected) pairs of `task`, never used in training.

    With `input_class` None, the task's classes take turns, so any prefix covers them all.
    """
    if input_class is None:
        per_class = [held_out_pairs(task, num, c, seed) for c in task_classes(task)]
        turns = [pair for row in zip(*per_class) for pair in row]
        return turns[:num]
    rng = random.Random(f"{seed}/{task}/{input_class}")
    pairs: dict[str, str] = {}
    while len(pairs) < num:
        text, answer = sample_pair(task, input_class, rng)
        if is_held_out(text) and text not in _EXAMPLE_INPUTS and _is_informative(task, text, answer):
            pairs.setdefault(text, answer)
    return list(pairs.items())


def training_pairs(task: str, seed: int, weights: dict[str, float] | None = None) -> Iterator[tuple[str, str]]:
    """An endless stream of trainable (input, expected) pairs of `task`; `weights` picks input classes."""
    rng = random.Random(f"{seed}/train/{task}")
    while True:
        if task == "sql":
            text, answer = random_sql_pair(rng)
        else:
            text = random_input(rng, weights)
            answer = TEXT_TRANSFORMS[task](text)
        if is_trainable(text):
            yield text, answer
