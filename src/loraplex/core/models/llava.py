"""LLaVA-1.5 (LlavaForConditionalGeneration): a CLIP vision tower and a two-layer projector in
front of a Llama-family language model.

Each image becomes (image_size / patch_size)^2 embeddings (576 for LLaVA-1.5: 336 / 14), the
hidden states of `vision_feature_layer` (-2: the last layer but one) without the CLS token
("default" strategy; "full" keeps it), projected to the language model's width. They replace
the run of `<image>` placeholder tokens the prompt holds for that image.

    pixel_values [num_images, 3, H, W] -> embeddings [num_images, tokens_per_image, text_hidden]
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from loraplex.core.model_config import ModelConfig
from loraplex.core.models import UNUSED
from loraplex.core.models.clip import CLIPVisionTower
from loraplex.core.models.common import activation, build_uninitialised, config_int
from loraplex.core.multimodal.image import ImageItems, ImagePreprocessor
from loraplex.errors import ConfigError, UnsupportedModelError

MODALITY = "image"


def placeholder_token_id(config: ModelConfig) -> int:
    raw = config.multimodal
    value = raw.get("image_token_index", raw.get("image_token_id", 32000))
    return int(value)


def tokens_per_image(config: ModelConfig) -> int:
    vision = config.multimodal.get("vision_config") or {}
    grid = config_int(vision, "image_size", "vision_config") // config_int(vision, "patch_size", "vision_config")
    strategy = config.multimodal.get("vision_feature_select_strategy", "default")
    return grid * grid + (strategy == "full")


def item_processor(config: ModelConfig, model_dir: str | Path) -> ImageItems:
    image_size = config_int(config.multimodal.get("vision_config") or {}, "image_size", "vision_config")
    preprocess = ImagePreprocessor.from_dir(model_dir, image_size)
    if preprocess.output_size() != (image_size, image_size):
        raise ConfigError(f"preprocessor_config.json makes images of {preprocess.output_size()} pixels, but the "
                          f"vision tower takes {image_size} x {image_size}; the checkpoint's files disagree.")
    return ImageItems(preprocess, tokens_per_image(config))


def _feature_layers(raw: dict, num_layers: int) -> tuple[int, ...]:
    """vision_feature_layer as indices into the hidden states (0 = embeddings, num_layers = last)."""
    chosen = raw.get("vision_feature_layer", -2)
    chosen = [chosen] if isinstance(chosen, int) else list(chosen)
    layers = []
    for index in chosen:
        if not isinstance(index, int) or not -(num_layers + 1) <= index <= num_layers:
            raise ConfigError(f"vision_feature_layer {index!r} is outside the vision tower's {num_layers} layers.")
        layers.append(index % (num_layers + 1))
    return tuple(layers)


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_features: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden, bias=bias)
        self.linear_2 = nn.Linear(hidden, hidden, bias=bias)
        self.act = activation(act, "projector_hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaEncoder(nn.Module):
    modality = MODALITY

    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.multimodal
        vision = raw.get("vision_config") or {}
        strategy = raw.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise UnsupportedModelError(f"vision_feature_select_strategy {strategy!r} is not supported; "
                                        f"loraplex implements 'default' and 'full'.")
        self.drop_cls = strategy == "default"
        self.feature_layers = _feature_layers(raw, config_int(vision, "num_hidden_layers", "vision_config"))
        self.vision_tower = CLIPVisionTower(vision, num_layers=max(self.feature_layers))
        vision_hidden = config_int(vision, "hidden_size", "vision_config")
        self.multi_modal_projector = LlavaMultiModalProjector(
            vision_hidden * len(self.feature_layers), config.hidden_size, raw.get("projector_hidden_act", "gelu"),
            bool(raw.get("multimodal_projector_bias", True)))
        self.image_size = self.vision_tower.image_size

    def forward(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """items: pixel values [3, H, W] each -> their embeddings [tokens_per_image, text_hidden]."""
        states = self.vision_tower(torch.stack(items), self.feature_layers)
        if self.drop_cls:
            states = [s[:, 1:] for s in states]
        return list(self.multi_modal_projector(torch.cat(states, dim=-1)))

    def dummy_items(self, count: int, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(3, self.image_size, self.image_size, device=device)] * count

    def checkpoint_name(self, name: str) -> str | None:
        """Where a checkpoint tensor of the towers goes in this module; UNUSED: skipped; None: unknown."""
        for prefix in ("model.", ""):
            for part in ("vision_tower.vision_model.", "vision_tower."):
                if name.startswith(prefix + part):
                    return self._vision_name(name[len(prefix + part):])
            if name.startswith(prefix + "multi_modal_projector."):
                return name[len(prefix):]
        return None

    def _vision_name(self, local: str) -> str | None:
        if local.startswith("post_layernorm."):
            return UNUSED       # pooled output only
        if local.startswith("encoder.layers."):
            if int(local.split(".")[2]) >= len(self.vision_tower.encoder.layers):
                return UNUSED   # beyond the deepest feature layer
        return "vision_tower." + local


def build_encoder(config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> LlavaEncoder:
    return build_uninitialised(lambda: LlavaEncoder(config), dtype=dtype, device=device)
