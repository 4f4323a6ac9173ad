"""The demo's tasks: what the base model and each adapter do, and their data.

Every task maps an input string to an expected output string. The base model
copies its input (`echo`); each adapter turns that into one task. The same
prompt format is used everywhere (DEMO_PROMPT_FORMAT); the answer follows it
and ends with the EOS token.

Held-out inputs come from a fixed seed and are removed from every training
stream, so an accuracy measured on them is a measure of generalisation.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from loraplex.demo.sql_grammar import random_sql_pair

DEMO_PROMPT_FORMAT = "Input: {input}\nOutput: "

# Common short words, so that demo inputs can read like text; random letter
# strings are mixed in so the adapters learn the operation, not a word list.
WORDS = (
    "hello world cat dog sun moon tree book code data lora model fast slow red blue green "
    "apple river stone cloud light night day time line word text file path node edge graph "
    "train serve batch token cache queue plan idea story song game rule door room bird fish "
    "rain snow wind fire milk bread tea cup pen box key map car bus ship road city home"
).split()
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MIN_TEXT_CHARS, MAX_TEXT_CHARS = 3, 12
HELD_OUT_SEED = 20261128
# Held-out inputs per task kept out of training; evaluations use a prefix of them.
NUM_EXCLUDED_PER_TASK = 200


def format_prompt(text: str) -> str:
    return DEMO_PROMPT_FORMAT.format(input=text)


def random_text(rng: random.Random) -> str:
    """1-3 lowercase words (real or random letters), 3-12 characters in all."""
    while True:
        words = []
        for _ in range(rng.choice((1, 2, 2, 3))):
            if rng.random() < 0.5:
                words.append(rng.choice(WORDS))
            else:
                words.append("".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 6))))
        text = " ".join(words)
        if MIN_TEXT_CHARS <= len(text) <= MAX_TEXT_CHARS:
            return text


def _text_pair(transform: Callable[[str], str]) -> Callable[[random.Random], tuple[str, str]]:
    def sample(rng: random.Random) -> tuple[str, str]:
        text = random_text(rng)
        return text, transform(text)
    return sample


def _reverse(text: str) -> str:
    return text[::-1]


def _upper(text: str) -> str:
    return text.upper()


def _echo(text: str) -> str:
    return text


# name -> sampler of (input, expected output). "echo" is the base model's behaviour.
TASK_SAMPLERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "echo": _text_pair(_echo),
    "upper": _text_pair(_upper),
    "reverse": _text_pair(_reverse),
    "sql": random_sql_pair,
}
ADAPTER_TASKS = ("upper", "reverse", "sql")

# Hand-picked examples for docs and smoke tests; they are excluded from training too.
EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "upper": [("hello world", "HELLO WORLD"), ("lora rocks", "LORA ROCKS"), ("tiny model", "TINY MODEL")],
    "reverse": [("hello world", "dlrow olleh"), ("lora rocks", "skcor arol"), ("tiny model", "ledom ynit")],
    "sql": [
        ("show names of users older than 30", "SELECT name FROM users WHERE age > 30;"),
        ("count orders with total above 250", "SELECT COUNT(*) FROM orders WHERE total > 250;"),
        ("show prices of products sorted by price", "SELECT price FROM products ORDER BY price;"),
    ],
}


def _is_held_out_candidate(task: str, text: str, answer: str) -> bool:
    # An input the base model's echo would get right tells nothing (e.g. a palindrome).
    if task != "echo" and text == answer:
        return False
    # sql requests without a number come from a few hundred strings; holding some
    # out would leave holes in training, so held-out requests all carry a number.
    return task != "sql" or any(c.isdigit() for c in text)


def held_out_pairs(task: str, num: int, seed: int = HELD_OUT_SEED) -> list[tuple[str, str]]:
    """`num` distinct (input, expected) pairs of `task`, never used in training."""
    rng = random.Random(f"{seed}/{task}")
    sampler = TASK_SAMPLERS[task]
    pairs: dict[str, str] = {}
    while len(pairs) < num:
        text, answer = sampler(rng)
        if _is_held_out_candidate(task, text, answer):
            pairs.setdefault(text, answer)
    return list(pairs.items())


def excluded_inputs(num_held_out: int = NUM_EXCLUDED_PER_TASK) -> set[str]:
    """Every input kept out of training: held-out sets of all tasks plus the examples."""
    excluded = {text for pairs in EXAMPLES.values() for text, _ in pairs}
    for task in TASK_SAMPLERS:
        excluded.update(text for text, _ in held_out_pairs(task, num_held_out))
    return excluded


def training_pairs(task: str, seed: int, excluded: set[str]) -> Iterator[tuple[str, str]]:
    """An endless stream of (input, expected) pairs of `task` avoiding `excluded` inputs."""
    rng = random.Random(f"{seed}/train/{task}")
    sampler = TASK_SAMPLERS[task]
    while True:
        text, answer = sampler(rng)
        if text not in excluded:
            yield text, answer
