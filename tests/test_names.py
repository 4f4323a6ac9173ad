"""Adapter-name safety: hostile names are rejected before any I/O, good names pass."""

from __future__ import annotations

import pytest

from loraplex.errors import AdapterNameError
from loraplex.resolvers.names import MAX_ADAPTER_NAME_LENGTH, check_adapter_name

# Shared with the chain and filesystem tests: each must fail check_adapter_name.
HOSTILE_NAMES = [
    "..", ".", "../etc", "a/../../etc/passwd", "a/./b", "a//b", "a/", "/a",
    "/etc/passwd", "~root/.ssh", "C:/Windows", "c:evil",
    "a\\b", "..\\..\\boot.ini",
    "a\x00b", "a\nb", "tab\there", "esc\x1b[31m", "del\x7f",
    "x" * (MAX_ADAPTER_NAME_LENGTH + 1),
    "é" * 200, "é" * 255, "org/" + "é" * 128,    # parts over 255 bytes in UTF-8 (ENAMETOOLONG)
    "bad\ud800name",                            # a lone surrogate: not valid Unicode
    "", None, 42, b"bytes",
]

GOOD_NAMES = ["sql-lora", "my_adapter.v2", "org/repo", "Org-1/Repo_2.v3", "x" * MAX_ADAPTER_NAME_LENGTH,
              "..hidden-but-fine", "a..b", "日本語-lora", "é" * 127, "org/" + "é" * 127]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_rejected(name):
    with pytest.raises(AdapterNameError) as info:
        check_adapter_name(name)
    assert repr(name)[:40] in str(info.value) or "characters long" in str(info.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names_accepted(name):
    assert check_adapter_name(name) == name
