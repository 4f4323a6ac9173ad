"""The embedded demo: a tiny Llama model and three LoRA adapters shipped in the package.

See README.md in this directory for the format, the tasks and how the files were made.
"""

from __future__ import annotations

from pathlib import Path

from loraplex.demo.sql_grammar import OFF_GRAMMAR_QUESTIONS
from loraplex.demo.tasks import ADAPTER_TASKS, DEMO_PROMPT_FORMAT, EXAMPLES, format_prompt

DEMO_DIR = Path(__file__).resolve().parent
# The adapters' base_model_name_or_path, and the model directory's name: the engine
# accepts an adapter whose base matches the served model path's final component.
DEMO_BASE_MODEL_NAME = "loraplex-demo-base"
DEMO_ADAPTER_NAMES = ADAPTER_TASKS


def demo_model_path() -> Path:
    """The base model's Hugging Face checkpoint directory."""
    return DEMO_DIR / DEMO_BASE_MODEL_NAME


def demo_adapters_dir() -> Path:
    """The directory holding one PEFT adapter directory per name in DEMO_ADAPTER_NAMES."""
    return DEMO_DIR / "adapters"


__all__ = ["DEMO_ADAPTER_NAMES", "DEMO_BASE_MODEL_NAME", "DEMO_PROMPT_FORMAT", "EXAMPLES", "OFF_GRAMMAR_QUESTIONS",
           "demo_adapters_dir", "demo_model_path", "format_prompt"]
