"""Images and audio in chat completions, and default LoRAs per modality (--default-mm-loras).

A chat request's image_url / input_audio / audio_url parts are loaded (data: URLs; http(s) only
with --allow-remote-media, within --media-fetch-timeout and --max-media-bytes) in a worker
thread, rendered through the chat template with the model's placeholders
(core/multimodal/chat.py) and sent to the engine as multi_modal_data; every bad part is a 400.

The default adapters are loaded at start-up under their modality's name ("audio"), like
--lora-modules, so /v1/models lists them; a path that is not a directory is a name for the
resolver chain. A chat request that names no adapter gets the default of its modality
(core/multimodal/default_loras.py); /v1/completions never does, as in vLLM.

Behind Ray (`serve-ray`) the ingress reads the media and renders the prompt, and each replica
loads the default adapters at its own start; the ingress only picks one by name.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field

from loraplex.core.multimodal.chat import content_format, parse_chat_messages
from loraplex.core.multimodal.default_loras import DefaultLoRAs
from loraplex.core.multimodal.media import MediaLoader
from loraplex.errors import ConfigError
from loraplex.lora_request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class ServerMultimodal:
    placeholders: dict[str, str]                 # modality -> placeholder text ({} for a text model)
    media: MediaLoader
    default_loras: dict[str, str] = field(default_factory=dict)   # modality -> path or resolver name
    processor: object = None                     # the engine's MultimodalProcessor, None for a text model
    rule: DefaultLoRAs = field(default_factory=DefaultLoRAs)
    loads_defaults: bool = True                  # False at a Ray ingress: the replicas load them

    @classmethod
    def from_engine(cls, engine, config) -> "ServerMultimodal":
        # AsyncEngine's processor (None for a text model)
        return cls.from_processor(getattr(engine, "mm_processor", None), config)

    @classmethod
    def for_ray_ingress(cls, config, tokenizer) -> "ServerMultimodal":
        """The ingress's own processor of the same checkpoint (it renders prompts; replicas run
        them). Its context length is the replicas', learnt in startup()."""
        from loraplex.core.input_processor import multimodal_processor
        from loraplex.core.model_config import ModelConfig

        model_config = ModelConfig.from_dir(config.model)
        max_model_len = config.max_model_len or model_config.max_position_embeddings
        processor = multimodal_processor(config, model_config, max_model_len, tokenizer)
        return cls.from_processor(processor, config, loads_defaults=False)

    @classmethod
    def from_processor(cls, processor, config, *, loads_defaults: bool = True) -> "ServerMultimodal":
        placeholders = {processor.modality: processor.placeholder_text} if processor is not None else {}
        for modality in config.default_mm_loras or {}:
            if modality not in placeholders:
                takes = " or ".join(placeholders) + " input" if placeholders else "text only"
                raise ConfigError(f"--default-mm-loras has a {modality!r} adapter, but this model takes {takes}")
        return cls(placeholders, MediaLoader.from_config(config), dict(config.default_mm_loras or {}), processor,
                   loads_defaults=loads_defaults)

    async def startup(self, backend) -> None:
        """Load the default adapters under their modality's names; any failure stops start-up."""
        if not self.loads_defaults:
            if self.processor is not None and backend.max_model_len:
                self.processor.max_model_len = backend.max_model_len
            return
        for modality, path in self.default_loras.items():
            lora_path = path
            if not os.path.isdir(path):
                found = await backend.resolver_chain.resolve(backend.model_path, path) \
                    if backend.resolver_chain is not None else None
                if found is None:
                    raise ConfigError(f"--default-mm-loras {modality}={path}: not a directory, and no resolver "
                                      f"found it")
                lora_path = found.lora_path
            try:
                await backend.load_adapter(modality, lora_path)
            except Exception as e:   # uvicorn prints the traceback: its last line says it all
                raise ConfigError(f"--default-mm-loras {modality}={path} could not be loaded: {e}") from None
            logger.info("default LoRA for %s input: %s", modality, lora_path)

    async def parse(self, messages: list[dict], template: str | None) -> tuple[list[dict], dict[str, list]]:
        """(messages for the chat template, multi_modal_data); media are read off the event loop."""
        return await asyncio.to_thread(parse_chat_messages, messages, fmt=content_format(template),
                                       placeholders=self.placeholders, media=self.media)

    def num_prompt_tokens(self, token_ids: list[int], mm_data: dict) -> int:
        if self.processor is None or not mm_data:
            return len(token_ids)
        return self.processor.num_prompt_tokens(token_ids, mm_data)

    async def default_lora(self, backend, modalities) -> LoRARequest | None:
        """What a chat request with these modalities and no adapter named runs on (None: the base
        model), as the backend routes that adapter's name."""
        # Those loaded now; at a Ray ingress, all: every replica loaded them before it started.
        served = {m: m for m in self.default_loras if not self.loads_defaults or backend.get_adapter(m) is not None}
        name = self.rule.pick(modalities, served)
        return await backend.lora_request_for(name) if name is not None else None
