"""Encoder towers of multimodal checkpoints, one module per family, and how their checkpoints load.

A family module (llava.py, granite_speech.py) provides MODALITY, placeholder_token_id(config),
build_encoder(config, dtype=, device=) -> an nn.Module whose forward maps a list of processed
items (tensors) to a list of embeddings [tokens, text_hidden], and the encoder's
checkpoint_name(name). The language model is always core/model.py's.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from torch import nn

from loraplex.core.model_config import ModelConfig

_FAMILIES = {"LlavaForConditionalGeneration": "loraplex.core.models.llava",
             "GraniteSpeechForConditionalGeneration": "loraplex.core.models.granite_speech"}
UNUSED = "<unused>"   # checkpoint_name() of a tensor the model deliberately does not load


def family(config: ModelConfig) -> ModuleType | None:
    """The family module of a multimodal checkpoint; None for a text model."""
    if config.multimodal is None:
        return None
    return importlib.import_module(_FAMILIES[config.architecture])


def language_model_name(name: str) -> str | None:
    """A multimodal checkpoint's language-model tensor under the text model's name (both the
    older `language_model.model.` and the newer `model.language_model.` layouts)."""
    for prefix in ("model.language_model.", "language_model.model."):
        if name.startswith(prefix):
            return "model." + name[len(prefix):]
    for prefix in ("language_model.lm_head.", "lm_head."):
        if name.startswith(prefix):
            return "lm_head." + name[len(prefix):]
    return None


class MultimodalCheckpoint(nn.Module):
    """The language model and the encoder side by side, under the names load_weights() fills."""

    def __init__(self, config: ModelConfig, language_model: nn.Module, encoder: nn.Module | None):
        """encoder None: the language model alone (a tensor-parallel rank other than 0)."""
        super().__init__()
        self.config = config
        self.language_model = language_model
        self.encoder = encoder

    def checkpoint_name(self, name: str) -> str | None:
        """Our name of a checkpoint tensor, UNUSED for one deliberately skipped, None if unknown."""
        local = language_model_name(name)
        if local is not None:
            return "language_model." + local
        if self.encoder is None:
            return UNUSED
        local = self.encoder.checkpoint_name(name)
        return local if local in (None, UNUSED) else "encoder." + local
