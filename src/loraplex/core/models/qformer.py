"""BLIP-2's Q-Former as Granite Speech uses it: learned queries that read a window of audio
frames through cross-attention (no text input).

Module names follow the checkpoints' (encoder.layer.N.attention.attention.query, ...,
crossattention, intermediate_query, output_query) so weights load by name.

    queries [1 | batch, num_queries, hidden], frames [batch, window, encoder_hidden]
        -> [batch, num_queries, hidden]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.models.common import activation, config_int


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, hidden: int, kv_hidden: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key, self.value = nn.Linear(kv_hidden, hidden), nn.Linear(kv_hidden, hidden)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:   # [batch, length, hidden] -> [batch, heads, length, head_dim]
            return t.view(t.shape[0], t.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv)))
        return out.transpose(1, 2).flatten(2)


class QFormerOutput(nn.Module):
    """dense, then LayerNorm(x + residual): BERT's sublayer output."""

    def __init__(self, in_features: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)   # sic: the checkpoints' name

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class QFormerAttention(nn.Module):
    def __init__(self, hidden: int, kv_hidden: int, num_heads: int, eps: float):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(hidden, kv_hidden, num_heads)
        self.output = QFormerOutput(hidden, hidden, eps)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        return self.output(self.attention(x, x if kv is None else kv), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = activation(act, "projector_config.hidden_act")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, cfg: dict, has_cross_attention: bool):
        super().__init__()
        hidden = config_int(cfg, "hidden_size", "projector_config")
        heads = config_int(cfg, "num_attention_heads", "projector_config")
        intermediate = config_int(cfg, "intermediate_size", "projector_config")
        eps = float(cfg.get("layer_norm_eps", 1e-12))
        self.attention = QFormerAttention(hidden, hidden, heads, eps)
        self.crossattention = QFormerAttention(hidden, config_int(cfg, "encoder_hidden_size", "projector_config"),
                                               heads, eps) if has_cross_attention else None
        self.intermediate_query = QFormerIntermediate(hidden, intermediate, cfg.get("hidden_act", "gelu"))
        self.output_query = QFormerOutput(intermediate, hidden, eps)

    def forward(self, x: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        if self.crossattention is not None:
            x = self.crossattention(x, frames)
        return self.output_query(self.intermediate_query(x), x)


class QFormer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        hidden = config_int(cfg, "hidden_size", "projector_config")
        frequency = config_int(cfg, "cross_attention_frequency", "projector_config", 2)
        self.layernorm = nn.LayerNorm(hidden, eps=float(cfg.get("layer_norm_eps", 1e-12)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(QFormerLayer(cfg, index % frequency == 0)
                                           for index in range(config_int(cfg, "num_hidden_layers", "projector_config")))

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        # The queries are the same for every window: one copy per window from the start.
        x = self.layernorm(queries).expand(frames.shape[0], -1, -1)
        for layer in self.encoder.layer:
            x = layer(x, frames)
        return x
