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
