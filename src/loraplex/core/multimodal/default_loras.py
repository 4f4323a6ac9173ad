"""Default LoRA adapters per modality (vLLM's `default_mm_loras`), one rule for offline and server use.

Some multimodal checkpoints ship an adapter that must be active whenever their modality is in
the prompt (Granite Speech's audio LoRA). With `default_mm_loras={"audio": PATH}`:

- a request that names an adapter explicitly gets that adapter, always;
- otherwise, a prompt whose modalities include exactly one modality with a default adapter
  gets it (text-only prompts get none);
- a prompt with several such modalities gets none: one request runs one adapter. This is
  logged once per combination of modalities, not per request.

vLLM applies the rule to offline generate()/chat() and to chat completions, not to
/v1/completions; so does loraplex. A default adapter is served under its modality's name
("audio"), so /v1/models lists it and a request may also name it. Its path may be a directory
or a name the resolver chain finds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Iterable, Mapping
from typing import TypeVar

from loraplex.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DefaultLoRAs:
    def __init__(self) -> None:
        self._logged: set[frozenset[str]] = set()

    def pick(self, modalities: Iterable[str], defaults: Mapping[str, T]) -> T | None:
        """The default adapter for a prompt with these modalities and no explicit adapter."""
        matched = frozenset(modalities) & frozenset(m for m, lora in defaults.items() if lora is not None)
        if len(matched) == 1:
            return defaults[next(iter(matched))]
        if len(matched) > 1 and matched not in self._logged:
            self._logged.add(matched)
            logger.warning("a prompt has %s input, each with a default LoRA adapter; one request runs one "
                           "adapter, so prompts like it get none (name one explicitly to choose)",
                           " and ".join(sorted(matched)))
        return None


def resolve_default_adapter(model: str, modality: str, path: str) -> str:
    """The directory of a default adapter: `path` itself, or where the resolver chain finds the name."""
    if os.path.isdir(path):
        return path
    from loraplex.resolvers.chain import ResolverChain

    chain = ResolverChain.from_registry()
    # The chain is async; run it on a thread of its own so a caller inside an event loop works too.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        found = pool.submit(asyncio.run, chain.resolve(model, path)).result()
    if found is None:
        raise ConfigError(f"default_mm_loras[{modality!r}] = {path!r} is not a directory and no resolver found "
                          f"it (resolvers: {', '.join(chain.resolver_names) or 'none registered'})")
    return found.lora_path
