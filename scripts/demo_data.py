"""Training data for the demo: token streams for the base model and for each adapter.

An example is (input_ids, labels): labels are -100 where no loss is taken (the
prompt of an Input/Output pair, padding), the target token id elsewhere.
"""

from __future__ import annotations

import random
from typing import Iterator

import torch

from demo_tokenizer import EOS, PAD, SPECIAL_TOKENS
from loraplex.demo.tasks import WORDS, format_prompt, random_text, training_pairs

IGNORE = -100
EOS_ID, PAD_ID = SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(PAD)
Example = tuple[list[int], list[int]]


def pair_example(tokenizer, text: str, answer: str) -> Example:
    """BOS + prompt (no loss) followed by answer + EOS (loss)."""
    prompt = tokenizer.encode(format_prompt(text)).ids
    target = tokenizer.encode(answer, add_special_tokens=False).ids + [EOS_ID]
    return prompt + target, [IGNORE] * len(prompt) + target


def text_example(tokenizer, text: str) -> Example:
    """BOS + text + EOS, loss on every token."""
    ids = tokenizer.encode(text).ids + [EOS_ID]
    return ids, list(ids)


def task_stream(task: str, seed: int, excluded: set[str]) -> Iterator[Example]:
    return ((text, answer) for text, answer in training_pairs(task, seed, excluded))


def base_mixture(seed: int, excluded: set[str]) -> Iterator[tuple[str, ...]]:
    """The base model's mixture: echo pairs, prose drills and generic text.

    Echo (copying in the demo format) is the base model's behaviour there. The drills
    state what reversing and capitalising are in a different phrasing, as a real
    pretrained model has seen; the adapters then bind a task to the demo format.
    Generic text with digits, capitals and punctuation gives every byte an adapter
    needs a trained embedding (the sql adapter copies numbers and writes symbols).
    """
    rng = random.Random(f"{seed}/train/base")
    while True:
        kind = rng.random()
        text = random_text(rng) if rng.random() < 0.6 else _generic_text(rng, 2, 4)
        if text in excluded:
            continue
        if kind < 0.35:
            yield text, text
        elif kind < 0.55:
            yield (f"spelled backwards, {text} is {text[::-1]}.",)
        elif kind < 0.7:
            yield (f"in capitals, {text} is {text.upper()}.",)
        else:
            yield (_generic_text(rng, 4, 10),)


def _generic_text(rng: random.Random, min_words: int, max_words: int) -> str:
    """Words, numbers, capitals and punctuation: 'the 42 cats; RED (tree) = 7'."""
    words = []
    for _ in range(rng.randint(min_words, max_words)):
        roll = rng.random()
        if roll < 0.55:
            word = rng.choice(WORDS)
        elif roll < 0.75:
            word = str(rng.randint(0, 999))
        elif roll < 0.85:
            word = rng.choice(WORDS).upper()
        else:
            word = rng.choice(_SYMBOLS)
        words.append(word)
    return " ".join(words)


_SYMBOLS = tuple("=<>*(),;'.:!?-+") + ("(*)", "'a'", "x,", "y;")


class BatchMaker:
    """Turns a stream of (input, answer) pairs or (text,) tuples into padded batches."""

    def __init__(self, tokenizer, stream, batch_size: int):
        self.tokenizer, self.stream, self.batch_size = tokenizer, stream, batch_size

    def _example(self, item) -> Example:
        if len(item) == 2:
            return pair_example(self.tokenizer, *item)
        return text_example(self.tokenizer, item[0])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        examples = [self._example(next(self.stream)) for _ in range(self.batch_size)]
        length = max(len(ids) for ids, _ in examples)
        input_ids = torch.full((self.batch_size, length), PAD_ID, dtype=torch.long)   # [batch, seq]
        labels = torch.full((self.batch_size, length), IGNORE, dtype=torch.long)      # [batch, seq]
        for row, (ids, target) in enumerate(examples):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            labels[row, :len(target)] = torch.tensor(target)
        return input_ids, labels
