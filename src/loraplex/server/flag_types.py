"""argparse value types of the server's flags: each refuses a bad value with a message naming
the flag and what it takes (argparse then exits with status 2)."""

from __future__ import annotations

import argparse
import json


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def json_flag(flag: str, example: str, kind: type = dict):
    """A JSON value of `kind` (dict: an object; list: a list of strings), as in `example`."""
    what = "object" if kind is dict else "list"

    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON {what} ({e})") from None
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise argparse.ArgumentTypeError(f"{flag} must be a JSON {what}{' of strings' if kind is list else ''} "
                                             f"like '{example}'")
        return value
    return parse


_DECIMAL, _BINARY = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}, {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_int(text: str) -> int:
    """An integer, or one with vLLM's suffixes: k, m, g, t decimal (25.6k = 25,600) and K, M, G, T
    binary (32K = 32,768, whole numbers only)."""
    text = text.strip()
    try:
        if text[-1:] in _BINARY:
            return int(text[:-1]) * _BINARY[text[-1]]
        if text[-1:] in _DECIMAL:
            value = float(text[:-1]) * _DECIMAL[text[-1]]
            if value != int(value):
                raise ValueError
            return int(value)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, optionally with a suffix (1k = 1,000, 1K = 1,024; "
                                         f"k/m/g/t decimal, K/M/G/T binary), got {text!r}") from None
