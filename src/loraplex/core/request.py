"""Request: one submitted prompt, validated and tokenized, as the engine core receives it."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.core.multimodal.inputs import MultimodalInputs
from loraplex.core.sampling_params import SamplingParams
from loraplex.lora_request import LoRARequest


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    lora_request: LoRARequest | None = None
    mm_inputs: MultimodalInputs | None = None      # images / audio of a multimodal prompt
    cache_salt: str | None = None                  # prefix caching shares blocks only within a salt
