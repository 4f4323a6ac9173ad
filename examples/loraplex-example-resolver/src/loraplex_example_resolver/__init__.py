"""Example loraplex plugin: adapters listed in a JSON index file."""

import os

from loraplex.resolvers import LoRAResolverRegistry
from loraplex_example_resolver.resolver import INDEX_ENV, IndexResolver

PLUGIN_NAME = "example_index_resolver"


def register() -> None:
    """Entry point (a zero-argument callable, as vLLM plugins are): register the
    resolver when the index file is configured, and nothing otherwise."""
    index_path = os.environ.get(INDEX_ENV, "").strip()
    if index_path:
        LoRAResolverRegistry.register_resolver(PLUGIN_NAME, IndexResolver(index_path))


__all__ = ["IndexResolver", "register"]
