"""What a newcomer types: seeded generators of demo inputs, by class.

Every input is printable ASCII (space to `~`), 1-64 characters. The classes are
what people try first, and what the held-out evaluation reports one by one:

    lower    lowercase words, 1-32 characters          hello world, tiny model
    mixed    words in mixed case, 1-32 characters      The Quick brown Fox
    digits   words and numbers, 1-32 characters        order 42 ships at 9:30
    punct    words, digits and any ASCII punctuation   Hi, it's {me}! (#1 @home)
    long     any of the above, 33-64 characters        The Quick brown fox, 42 times! Really?

Words are common English words or random letters, so the models learn the
operation rather than a word list. Generators take a random.Random and are
deterministic for a given seed.
"""

from __future__ import annotations

import random
import string
from typing import Callable

MAX_INPUT_CHARS = 64
MAX_SHORT_CHARS = 32
PRINTABLE = "".join(chr(c) for c in range(32, 127))
PUNCTUATION = string.punctuation          # the 32 ASCII punctuation characters

WORDS = (
    "the a an and or of to in on at for with from by is are was be it this that you we they "
    "hello world cat dog sun moon tree book code data lora model fast slow red blue green "
    "apple river stone cloud light night day time line word text file path node edge graph "
    "train serve batch token cache queue plan idea story song game rule door room bird fish "
    "rain snow wind fire milk bread tea cup pen box key map car bus ship road city home "
    "quick brown fox jumps over lazy good new first last long great little own other old "
    "right big high small large next early young few public bad same able people year way "
    "thing man woman child life hand part place case week company system program question "
    "work number point water money story fact month lot study night eye job kind head "
    "times really maybe please thanks yes no what when where why how who which there here"
).split()
LETTERS = string.ascii_lowercase

# Punctuation that attaches to a word (before, after, around) the way people type it.
_WRAPS = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">"), ('"', '"'), ("'", "'"), ("`", "`"), ("*", "*"),
          ("_", "_"))
_PREFIXES = ("#", "@", "$", "-", "+", "~", "/", "\\", "&", "^", "=", "%", "|")
_SUFFIXES = (",", ".", "!", "?", ";", ":", "...", "!!", "?!", "'s", "%", "-", "/", "+", "=", "|", "~")


def _lower_word(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice(WORDS)
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, 8)))


def _mixed_word(rng: random.Random) -> str:
    word, roll = _lower_word(rng), rng.random()
    if roll < 0.4:
        return word.capitalize()
    if roll < 0.65:
        return word.upper()
    if roll < 0.85:
        return "".join(c.upper() if rng.random() < 0.5 else c for c in word)
    return word


def _number(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.35:
        return str(rng.randint(0, 10 ** rng.randint(1, 7)))
    if roll < 0.45:
        return f"{rng.randint(0, 999)}.{rng.randint(0, 99)}"
    if roll < 0.55:
        return f"{rng.randint(0, 23)}:{rng.randint(0, 59):02d}"
    if roll < 0.62:
        return f"{rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if roll < 0.7:
        return f"{rng.randint(1, 999)},{rng.randint(0, 999):03d}"
    if roll < 0.85:                                   # digits inside a word: x86, v2, 3rd, abc123
        word, digits = _mixed_word(rng)[:5], str(rng.randint(0, 999))
        return word + digits if rng.random() < 0.6 else digits + word
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(1, 6)))


def _punct_word(rng: random.Random) -> str:
    roll = rng.random()
    word = _number(rng) if rng.random() < 0.2 else (_mixed_word(rng) if rng.random() < 0.4 else _lower_word(rng))
    if roll < 0.3:
        return word + rng.choice(_SUFFIXES)
    if roll < 0.5:
        left, right = rng.choice(_WRAPS)
        return left + word + right
    if roll < 0.62:
        return rng.choice(_PREFIXES) + word
    if roll < 0.72:                                   # two words joined: a+b, x=y, key:value, foo.bar
        return word + rng.choice("+-=*/:._&|<>^%@#") + _lower_word(rng)
    if roll < 0.84:
        return "".join(rng.choice(PUNCTUATION) for _ in range(rng.randint(1, 3)))
    return "".join(rng.choice(PRINTABLE[1:]) for _ in range(rng.randint(1, 8)))   # any non-space


def _compose(rng: random.Random, word: Callable[[random.Random], str], min_chars: int, max_chars: int) -> str:
    """Words joined by single spaces, filling a length drawn from [min_chars, max_chars]."""
    while True:
        target = rng.randint(min_chars, max_chars)
        text = word(rng)[:target]
        for _ in range(40):
            if len(text) >= target - 1:
                break
            nxt = word(rng)
            if len(text) + 1 + len(nxt) <= target:
                text += " " + nxt
        if min_chars <= len(text) <= max_chars:
            return text


def _weighted(*choices: tuple[float, Callable[[random.Random], str]]) -> Callable[[random.Random], str]:
    def word(rng: random.Random) -> str:
        roll = rng.random()
        for weight, make in choices:
            if roll < weight:
                return make(rng)
            roll -= weight
        return choices[-1][1](rng)
    return word


_MIXED = _weighted((0.6, _mixed_word), (0.4, _lower_word))
_DIGITS = _weighted((0.4, _number), (0.35, _lower_word), (0.25, _mixed_word))
_PUNCT = _weighted((0.45, _punct_word), (0.25, _lower_word), (0.15, _mixed_word), (0.15, _number))
_ANY = _weighted((0.35, _lower_word), (0.25, _mixed_word), (0.2, _number), (0.2, _punct_word))


def _with(required: Callable[[str], bool], word, min_chars: int = 1, max_chars: int = MAX_SHORT_CHARS):
    def sample(rng: random.Random) -> str:
        while True:
            text = _compose(rng, word, min_chars, max_chars)
            if required(text):
                return text
    return sample


# class -> sampler of one input of that class.
INPUT_CLASSES: dict[str, Callable[[random.Random], str]] = {
    "lower": _with(lambda t: True, _lower_word),
    "mixed": _with(lambda t: any(c.isupper() for c in t), _MIXED),
    "digits": _with(lambda t: any(c.isdigit() for c in t), _DIGITS),
    "punct": _with(lambda t: any(c in PUNCTUATION for c in t), _PUNCT),
    "long": _with(lambda t: True, _ANY, MAX_SHORT_CHARS + 1, MAX_INPUT_CHARS),
}


def random_input(rng: random.Random, weights: dict[str, float] | None = None) -> str:
    """One input of a class drawn by `weights` (all classes alike by default)."""
    names = list(INPUT_CLASSES)
    name = rng.choices(names, [weights.get(n, 0.0) for n in names] if weights else None)[0]
    return INPUT_CLASSES[name](rng)
