"""docs/resolvers.md documents every environment variable the resolvers and plugins read."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = [*(REPO / "src" / "loraplex" / "resolvers").glob("*.py"),
           *(REPO / "src" / "loraplex" / "plugins").glob("*.py"),
           *(REPO / "examples").rglob("*.py")]


def env_vars_in_code() -> set[str]:
    names = set()
    for path in SOURCES:
        names.update(re.findall(r'^\w+_ENV\s*=\s*"([A-Z0-9_]+)"', path.read_text(), flags=re.MULTILINE))
    return names


def env_vars_in_table() -> set[str]:
    doc = (REPO / "docs" / "resolvers.md").read_text()
    section = doc.split("## Environment variables", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", section, flags=re.MULTILINE))


def test_every_resolver_env_var_is_in_the_table():
    in_code = env_vars_in_code()
    assert {"VLLM_PLUGINS", "VLLM_LORA_RESOLVER_CACHE_DIR", "LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS",
            "LORAPLEX_RESOLVER_TIMEOUT_S", "LORAPLEX_RESOLVER_NEGATIVE_TTL_S"} <= in_code
    missing = in_code - env_vars_in_table()
    assert not missing, f"docs/resolvers.md's variable table lacks {sorted(missing)}"


def test_docs_have_the_promised_sections():
    doc = (REPO / "docs" / "resolvers.md").read_text()
    headings = re.findall(r"^## (.+)$", doc, flags=re.MULTILINE)
    for heading in ("Environment variables", "Filesystem", "S3 and other fsspec URLs", "Hugging Face Hub",
                    "The resolver chain", "Writing a resolver", "Publishing a resolver package"):
        assert heading in headings
