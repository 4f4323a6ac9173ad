"""IndexResolver: adapter names mapped to directories by a JSON file."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from loraplex.errors import ConfigError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers import LoRAResolver
from loraplex.resolvers.env import allow_pickle_lora_weights
from loraplex.resolvers.validation import validate_adapter_dir

INDEX_ENV = "LORAPLEX_EXAMPLE_INDEX"


class IndexResolver(LoRAResolver):
    def __init__(self, index_path: str) -> None:
        self.index_path = Path(index_path)
        if not self.index_path.is_file():
            # Raised at registration: the plugin loader reports it with the plugin's name.
            raise ConfigError(f"{INDEX_ENV}={index_path!r} is not a file; point it at a JSON "
                              f"object mapping adapter names to directories")

    def _read_index(self) -> dict[str, str]:
        # Re-read on every miss so that adapters added to the index need no restart.
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read adapter index {str(self.index_path)!r}: {e}") from None
        if not isinstance(index, dict):
            raise ConfigError(f"adapter index {str(self.index_path)!r} must be a JSON object")
        return index

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        index = await asyncio.to_thread(self._read_index)
        entry = index.get(lora_name)
        if entry is None:
            return None
        adapter_dir = (self.index_path.parent / entry).resolve()
        await asyncio.to_thread(validate_adapter_dir, adapter_dir, allow_pickle=allow_pickle_lora_weights())
        return LoRARequest(lora_name, lora_id_for_name(lora_name), str(adapter_dir), base_model_name)
