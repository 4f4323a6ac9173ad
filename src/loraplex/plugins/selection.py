"""Which discovered plugins load, and in what order (VLLM_PLUGINS semantics).

- VLLM_PLUGINS unset: every discovered plugin except the opt-in-only ones;
  built-ins first in BUILTIN_PLUGINS order, then third-party plugins by name.
- VLLM_PLUGINS="a, b": only those, in that order (whitespace ignored, repeats dropped);
  a name that is not installed is warned about, with the installed names.
- VLLM_PLUGINS="": no plugins at all.

The load order is the resolver chain's order, so it is decided here and only here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping

logger = logging.getLogger(__name__)

PLUGINS_ENV = "VLLM_PLUGINS"

BUILTIN_PLUGINS = ("lora_filesystem_resolver", "lora_s3_resolver", "lora_hf_hub_resolver")

# Plugins that load only when VLLM_PLUGINS names them: the Hub resolver downloads
# from the internet, which a server must never start doing by surprise.
OPT_IN_PLUGINS = frozenset({"lora_hf_hub_resolver"})

SKIP_NOT_LISTED = f"not listed in {PLUGINS_ENV}"
SKIP_OPT_IN = f"opt-in only: loads only when {PLUGINS_ENV} names it"


def requested_plugins(environ: Mapping[str, str] | None = None) -> list[str] | None:
    """The plugin names VLLM_PLUGINS asks for, in order; None when it is unset."""
    environ = os.environ if environ is None else environ
    raw = environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    names: list[str] = []
    for part in raw.split(","):
        name = part.strip()
        if name and name not in names:
            names.append(name)
    return names


@dataclass
class PluginSelection:
    """The outcome of applying VLLM_PLUGINS to the discovered plugin names."""
    to_load: list[str]                                   # in load (= chain) order
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was not loaded
    missing: list[str] = field(default_factory=list)       # requested but not installed


def select_plugins(discovered: list[str], requested: list[str] | None) -> PluginSelection:
    if requested is None:
        builtins = [n for n in BUILTIN_PLUGINS if n in discovered]
        others = sorted(n for n in discovered if n not in BUILTIN_PLUGINS)
        ordered = builtins + others
        selection = PluginSelection(to_load=[n for n in ordered if n not in OPT_IN_PLUGINS])
        selection.skipped = {n: SKIP_OPT_IN for n in ordered if n in OPT_IN_PLUGINS}
        return selection

    selection = PluginSelection(to_load=[n for n in requested if n in discovered])
    selection.skipped = {n: SKIP_NOT_LISTED for n in discovered if n not in requested}
    selection.missing = [n for n in requested if n not in discovered]
    if selection.missing:
        installed = ", ".join(sorted(discovered)) or "none"
        logger.warning("%s names plugin(s) that are not installed: %s. Installed plugins: %s. "
                       "Check the spelling, or install the package that provides them.",
                       PLUGINS_ENV, ", ".join(selection.missing), installed)
    return selection
