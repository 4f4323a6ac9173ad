"""MultimodalInputs: a processed request's images or audio, as plain data.

Built on the caller's side (LLMEngine.process_request) and handed to the engine with the
request, so it must stay picklable: tensors and ints, no modules, no open files. Each item
knows where its placeholder tokens sit in the prompt: the encoder's output rows for the item
replace the embeddings of prompt positions offset .. offset + length - 1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

MODALITIES = ("image", "audio")


@dataclass
class MultimodalItem:
    modality: str            # "image" | "audio"
    data: torch.Tensor       # the encoder's input: pixel values [3, H, W] or log-mel features [steps, dim]
    offset: int              # prompt position of its first placeholder token
    length: int              # placeholder tokens = rows of the encoder's output

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass
class MultimodalInputs:
    items: list[MultimodalItem] = field(default_factory=list)
    # A digest of every item's modality, place and content, taken once on the caller's side:
    # the prefix cache keys a multimodal prompt's blocks on it (its placeholder tokens alone do
    # not say which image or clip they stand for).
    content_hash: bytes = b""

    def __post_init__(self) -> None:
        if not self.content_hash:
            digest = hashlib.blake2b(digest_size=16)
            for item in self.items:
                digest.update(f"{item.modality}:{item.offset}:{item.length}:{tuple(item.data.shape)}:"
                              f"{item.data.dtype}".encode())
                digest.update(item.data.detach().contiguous().cpu().numpy().tobytes())
            self.content_hash = digest.digest()

    @property
    def modalities(self) -> set[str]:
        return {item.modality for item in self.items}
