"""Training data for the demo: token streams for the base model and for each adapter.

An example is (input_ids, labels): labels are -100 where no loss is taken (the
prompt, padding), the target token id elsewhere. Every example is a prompt and an
answer: the demo format for echo pairs and the adapters, other phrasings for the
base model's drills.
"""

from __future__ import annotations

import random
import string
from typing import Iterator

import torch

from demo_tokenizer import EOS, PAD, SPECIAL_TOKENS
from loraplex.demo.inputs import INPUT_CLASSES, MAX_INPUT_CHARS, MAX_SHORT_CHARS, WORDS, random_input
from loraplex.demo.sql_grammar import FALLBACK_QUERY, TABLES
from loraplex.demo.tasks import TEXT_TRANSFORMS, format_prompt, is_trainable, training_pairs

IGNORE = -100
EOS_ID, PAD_ID = SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(PAD)
Example = tuple[list[int], list[int]]

# The base model's drills: each task in a phrasing of its own, as a pretrained model
# has met reversing, capitals and SQL in prose. The adapters bind one skill to the
# demo format, where the base model copies.
DRILLS = {
    "reverse": "Spell it backwards: {input}\nBackwards: ",
    "upper": "Say it in capitals: {input}\nCapitals: ",
    "sql": "Question: {input}\nSQL: ",
}


def encode_example(tokenizer, prompt: str, answer: str) -> Example:
    """BOS + prompt (no loss) followed by answer + EOS (loss)."""
    prompt_ids = tokenizer.encode(prompt).ids
    target = tokenizer.encode(answer, add_special_tokens=False).ids + [EOS_ID]
    return prompt_ids + target, [IGNORE] * len(prompt_ids) + target


def task_stream(task: str, seed: int, repeat_share: float = 0.0,
                weights: dict[str, float] | None = None, run_share: float = 0.0) -> Iterator[tuple[str, str]]:
    """(prompt, answer) pairs of an adapter's task in the demo format."""
    if task == "sql":
        pairs = sql_pairs(seed)
    else:
        pairs = text_pairs(task, seed, weights, MAX_INPUT_CHARS, repeat_share, run_share)
    return ((format_prompt(text), answer) for text, answer in pairs)


# Words people wrap around a request; the query stays the same.
_REQUEST_PREFIXES = ("please ", "can you ", "hey, ", "now ", "ok ", "then ")
_REQUEST_SUFFIXES = ("?", "!", ".", " please", " now", " thanks")


def sql_pairs(seed: int, noisy_share: float = 0.2, other_share: float = 0.3,
              off_share: float = 0.15) -> Iterator[tuple[str, str]]:
    """The sql adapter's data: questions of the grammar; the same with a capital, a polite
    word or a question mark around them (the same query); questions near the grammar (extra
    words: the same query; a table it does not know: FALLBACK_QUERY); and inputs that are no
    question at all, answered with FALLBACK_QUERY, so the answer stays a query of the family."""
    rng = random.Random(f"{seed}/train/sql/adapter")
    requests = training_pairs("sql", seed)
    while True:
        roll = rng.random()
        if roll < other_share:
            text, answer = random_input(rng), FALLBACK_QUERY
        else:
            text, answer = next(requests)
            if roll < other_share + noisy_share:
                text = _noisy_request(rng, text)
            elif roll < other_share + noisy_share + off_share:
                text, answer = _near_request(rng, text, answer)
        if is_trainable(text):
            yield text, answer


# Words around a request that the grammar does not know; the query ignores them.
_EXTRA_LEADS = ("tell me ", "give me ", "i want ", "find ", "get ")
_EXTRA_TAILS = (" today", " now please", " in total", " right now", " for me", " again")
_UNKNOWN_TABLES = ("customers", "people", "items", "shipments", "clients", "sales", "employees", "books")
# Words that mean something in the grammar are never the extra ones.
_GRAMMAR_WORDS = {"show", "list", "all", "the", "of", "and", "count", "how", "many", "with", "above", "below",
                  "equal", "to", "older", "younger", "than", "from", "in", "sorted", "by", *TABLES,
                  *(c for columns in TABLES.values() for c in columns),
                  *(p for columns in TABLES.values() for p in columns.values())}
_EXTRA_WORDS = tuple(w for w in WORDS if w not in _GRAMMAR_WORDS)


def _unknown_word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_EXTRA_WORDS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def _near_request(rng: random.Random, text: str, answer: str) -> tuple[str, str]:
    """A request near the grammar: words it does not know around or after its table (the same
    query), or a table or verb it does not know (FALLBACK_QUERY)."""
    table = next(t for t in TABLES if f" {t}" in f" {text}")
    roll = rng.random()
    if roll < 0.35:
        unknown = rng.choice(_UNKNOWN_TABLES) if rng.random() < 0.6 else _unknown_word(rng)
        return text.replace(table, unknown, 1), FALLBACK_QUERY
    if roll < 0.55:
        verb = next(v for v in ("show ", "list ", "count ", "how many ") if text.startswith(v))
        return _unknown_word(rng) + " " + text[len(verb):], FALLBACK_QUERY
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(_EXTRA_LEADS) + text, answer
    if roll < 0.7:
        return text + rng.choice(_EXTRA_TAILS), answer
    words = " ".join(rng.choice(_EXTRA_WORDS) for _ in range(rng.randint(1, 3)))
    return text.replace(table, f"{table} {words}", 1), answer


def _noisy_request(rng: random.Random, text: str) -> str:
    if rng.random() < 0.4:
        text = rng.choice(_REQUEST_PREFIXES) + text
    if rng.random() < 0.5:
        text += rng.choice(_REQUEST_SUFFIXES)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text


def repetitive_text(rng: random.Random, max_chars: int) -> str:
    """Text from a vocabulary of 2-4 words, so the same words and letter runs recur: copying it
    needs more than the last few characters to know where it is (training only)."""
    vocabulary = [random_input(rng, {"lower": 1, "mixed": 1, "digits": 1, "punct": 1}).split(" ")[0]
                  for _ in range(rng.randint(2, 4))]
    target, text = rng.randint(2, max_chars), rng.choice(vocabulary)
    while True:
        word = rng.choice(vocabulary)
        if len(text) + 1 + len(word) > target:
            return text[:max_chars]
        text += rng.choice((" ", " ", "")) + word


def with_runs(rng: random.Random, text: str, max_chars: int) -> str:
    """`text` with 1-3 of its characters repeated 2-4 times in place ("hello" -> "hellllo"):
    runs of one character are where copying loses count (training only)."""
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(text))
        text = text[:i] + text[i] * rng.randint(2, 4) + text[i + 1:]
    return text[:max_chars]


def text_pairs(task: str, seed: int, weights: dict[str, float] | None, max_chars: int,
               repeat_share: float, run_share: float = 0.0) -> Iterator[tuple[str, str]]:
    """Trainable (input, answer) pairs of a text task, inputs at most `max_chars` long; a
    `repeat_share` of them is repetitive text, a `run_share` has runs of one character."""
    rng = random.Random(f"{seed}/train/{task}/repeat")
    classes = training_pairs(task, seed, weights)
    while True:
        roll = rng.random()
        if roll < repeat_share + run_share:
            text = repetitive_text(rng, max_chars) if roll < repeat_share else \
                with_runs(rng, next(classes)[0], max_chars)
            if is_trainable(text):
                yield text, TEXT_TRANSFORMS[task](text)
            continue
        text, answer = next(classes)
        if len(text) <= max_chars:
            yield text, answer


def base_mixture(seed: int, mixture: dict[str, float], max_chars: int = MAX_INPUT_CHARS,
                 repeat_share: float = 0.0) -> Iterator[tuple[str, str]]:
    """The base model's mixture: echo pairs in the demo format (its behaviour there) and drills.

    `mixture` maps "echo" and drill names to their shares. Text inputs are at most
    `max_chars` long (the curriculum's early phases leave the long class out); sql
    requests keep their own lengths.
    """
    rng = random.Random(f"{seed}/train/base")
    weights = None if max_chars > MAX_SHORT_CHARS else {c: 1.0 for c in INPUT_CLASSES if c != "long"}
    streams = {name: training_pairs(name, seed) if name == "sql" else
               text_pairs(name, seed, weights, max_chars, repeat_share) for name in mixture}
    names, shares = list(mixture), list(mixture.values())
    while True:
        name = rng.choices(names, shares)[0]
        text, answer = next(streams[name])
        template = DRILLS.get(name)
        yield (format_prompt(text) if template is None else template.format(input=text)), answer


class BatchMaker:
    """Turns a stream of (prompt, answer) pairs into padded batches of similar lengths.

    Examples are drawn `pool` batches at a time and sorted by length before they are cut
    into batches, so little of each batch is padding; the batches are then shuffled.
    """

    def __init__(self, tokenizer, stream, batch_size: int, seed: int, pool: int = 8):
        self.tokenizer, self.stream, self.batch_size, self.pool = tokenizer, stream, batch_size, pool
        self.rng = random.Random(f"{seed}/batches")
        self.ready: list[list[Example]] = []

    def _refill(self) -> None:
        examples = [encode_example(self.tokenizer, *next(self.stream)) for _ in range(self.batch_size * self.pool)]
        examples.sort(key=lambda ex: len(ex[0]))
        self.ready = [examples[i:i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
        self.rng.shuffle(self.ready)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.ready:
            self._refill()
        examples = self.ready.pop()
        length = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)   # [batch, seq]
        labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)      # [batch, seq]
        for row, (ids, target) in enumerate(examples):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(target)] = torch.tensor(target)
        return input_ids, labels
