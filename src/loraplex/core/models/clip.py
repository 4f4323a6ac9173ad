"""CLIP's vision transformer, as LLaVA uses it: the hidden states of chosen layers, not the pooled output.

Module names follow the checkpoints' (embeddings.patch_embedding, encoder.layers.N.self_attn.q_proj,
...) so weights load by name. Only the layers up to the deepest one LLaVA reads are built
(vision_feature_layer=-2, the usual setting, skips the last one); the loader skips the rest
and post_layernorm.

    pixel_values [num_images, 3, H, W] -> hidden states [num_images, 1 + num_patches, hidden]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.models.common import activation, config_int


class CLIPAttention(nn.Module):
    def __init__(self, hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, hidden = x.shape
        q, k, v = (proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))       # [batch, heads, length, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)                         # bidirectional
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))


class CLIPMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.act = activation(act, "vision_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden: int, num_heads: int, intermediate: int, act: str, eps: float):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = CLIPAttention(hidden, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        self.mlp = CLIPMLP(hidden, intermediate, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, hidden: int, image_size: int, patch_size: int, num_channels: int):
        super().__init__()
        self.num_patches = (image_size // patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.empty(hidden))
        self.patch_embedding = nn.Conv2d(num_channels, hidden, patch_size, stride=patch_size, bias=False)
        self.position_embedding = nn.Embedding(self.num_patches + 1, hidden)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [n, hidden, gh, gw]
        patches = patches.flatten(2).transpose(1, 2)                                       # [n, patches, hidden]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight           # [n, 1 + patches, hidden]


class CLIPVisionTower(nn.Module):
    def __init__(self, config: dict, num_layers: int):
        """config: the checkpoint's vision_config; num_layers: how many encoder layers to build."""
        super().__init__()
        hidden = config_int(config, "hidden_size", "vision_config")
        self.image_size = config_int(config, "image_size", "vision_config")
        self.patch_size = config_int(config, "patch_size", "vision_config")
        eps = float(config.get("layer_norm_eps", 1e-5))
        self.embeddings = CLIPEmbeddings(hidden, self.image_size, self.patch_size,
                                         config_int(config, "num_channels", "vision_config", 3))
        self.pre_layrnorm = nn.LayerNorm(hidden, eps=eps)    # sic: the checkpoints' spelling
        heads = config_int(config, "num_attention_heads", "vision_config")
        intermediate = config_int(config, "intermediate_size", "vision_config")
        act = config.get("hidden_act", "quick_gelu")
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPEncoderLayer(hidden, heads, intermediate, act, eps)
                                            for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """Hidden states number `layers` (0: the embeddings after pre_layrnorm, i: after layer i)."""
        hidden = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: hidden}
        for index, layer in enumerate(self.encoder.layers, start=1):
            hidden = states[index] = layer(hidden)
        return [states[i] for i in layers]
