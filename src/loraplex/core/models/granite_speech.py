"""Granite Speech (GraniteSpeechForConditionalGeneration): a conformer audio encoder and a
Q-Former projector in front of a Granite language model.

The encoder reads log-mel features (core/multimodal/audio.py: two 10 ms frames of 80 mel bins
stacked into each 20 ms step), runs conformer blocks whose attention works
in blocks of `context_size` steps with Shaw relative positions, and adds a softmax "CTC"
branch halfway. The projector cuts the result into windows of `window_size` steps and lets
`window_size / downsample_rate` learned queries read each window, so every window becomes a
few embeddings in the language model's width. They replace the `<|audio|>` placeholders.

    input_features [num_clips, steps, 2 * n_mels] -> embeddings [num_clips, tokens, text_hidden]

Clips are batched only with clips of the same length: the conformer's convolutions and the
last attention block see past a clip's end, so padding one clip to another's length would
change its embeddings (transformers pads a batch; its single-clip results are the reference).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.model_config import ModelConfig
from loraplex.core.models.common import build_uninitialised, config_int
from loraplex.core.models.qformer import QFormer
from loraplex.core.multimodal.audio import AudioItems, LogMelFeatures
from loraplex.errors import ConfigError, UnsupportedModelError

MODALITY = "audio"


def placeholder_token_id(config: ModelConfig) -> int:
    raw = config.multimodal
    return int(raw.get("audio_token_index", raw.get("audio_token_id", 49155)))


def item_processor(config: ModelConfig, model_dir: str | Path) -> AudioItems:
    raw = config.multimodal
    features = LogMelFeatures.from_dir(model_dir, window_size=int(raw.get("window_size", 15)),
                                       downsample_rate=int(raw.get("downsample_rate", 5)))
    input_dim = config_int(raw.get("encoder_config") or {}, "input_dim", "encoder_config", 160)
    if 2 * features.n_mels != input_dim:
        raise ConfigError(f"preprocessor_config.json makes {features.n_mels} mel bins (x2 stacked), but the audio "
                          f"encoder takes {input_dim} features per step; the checkpoint's files disagree.")
    return AudioItems(features)


class ConformerFeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.pre_norm = nn.LayerNorm(dim)
        self.up_proj, self.down_proj = nn.Linear(dim, dim * mult), nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.up_proj(self.pre_norm(x))))


class ConformerAttention(nn.Module):
    """Self-attention within blocks of `context_size` steps, with a learned bias per relative
    distance (Shaw et al.) added to the scores."""

    def __init__(self, dim: int, num_heads: int, dim_head: int, context_size: int, max_pos_emb: int):
        super().__init__()
        if not 0 < context_size <= max_pos_emb:
            raise UnsupportedModelError(f"encoder_config.context_size {context_size} must be in (0, max_pos_emb="
                                        f"{max_pos_emb}].")
        self.num_heads, self.dim_head, self.context_size = num_heads, dim_head, context_size
        self.max_pos_emb = max_pos_emb
        self.pre_norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, num_heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * num_heads * dim_head, bias=False)
        self.to_out = nn.Linear(num_heads * dim_head, dim)
        self.rel_pos_emb = nn.Embedding(2 * max_pos_emb + 1, dim_head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        batch, steps, _ = x.shape
        ctx = self.context_size
        num_blocks = math.ceil(steps / ctx)
        remainder = steps % ctx
        x = F.pad(x, (0, 0, 0, num_blocks * ctx - steps))
        k, v = self.to_kv(x).chunk(2, dim=-1)

        def blocks(t: torch.Tensor) -> torch.Tensor:   # -> [batch * blocks, heads, ctx, dim_head]
            return t.reshape(batch * num_blocks, ctx, self.num_heads, self.dim_head).transpose(1, 2)
        q, k, v = blocks(self.to_q(x)), blocks(k), blocks(v)
        scale = self.dim_head ** -0.5
        offsets = torch.arange(ctx, device=x.device)
        distances = (offsets[:, None] - offsets[None, :]).clamp(-ctx, ctx) + self.max_pos_emb   # [ctx, ctx]
        bias = torch.einsum("bhcd,crd->bhcr", q, self.rel_pos_emb(distances)) * scale          # [b*blk, h, ctx, ctx]
        if remainder:
            # The last block of each clip is padded: nothing attends to or from its padding.
            pad = torch.ones(ctx, ctx, dtype=torch.bool, device=x.device)
            pad[:remainder, :remainder] = False
            bias.view(batch, num_blocks, self.num_heads, ctx, ctx)[:, -1].masked_fill_(pad, -torch.finfo(bias.dtype).max)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        out = out.transpose(1, 2).reshape(batch, num_blocks * ctx, -1)[:, :steps]
        return self.to_out(out)


class ConformerDepthWiseConv1d(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.padding = (kernel_size // 2, kernel_size // 2 - (kernel_size + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ConformerConvModule(nn.Module):
    def __init__(self, dim: int, expansion: int, kernel_size: int):
        super().__init__()
        inner = dim * expansion
        self.norm = nn.LayerNorm(dim)
        self.up_conv = nn.Conv1d(dim, 2 * inner, 1)
        self.depth_conv = ConformerDepthWiseConv1d(inner, kernel_size)
        self.batch_norm = nn.BatchNorm1d(inner)
        self.down_conv = nn.Conv1d(inner, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.glu(self.up_conv(self.norm(x).transpose(1, 2)), dim=1)     # [batch, inner, steps]
        x = F.silu(self.batch_norm(self.depth_conv(x)))
        return self.down_conv(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim = config_int(cfg, "hidden_dim", "encoder_config")
        heads = config_int(cfg, "num_heads", "encoder_config")
        mult = config_int(cfg, "feedforward_mult", "encoder_config", 4)
        self.ff1 = ConformerFeedForward(dim, mult)
        self.attn = ConformerAttention(dim, heads, cfg.get("dim_head") or dim // heads,
                                       config_int(cfg, "context_size", "encoder_config", 200),
                                       config_int(cfg, "max_pos_emb", "encoder_config", 512))
        self.conv = ConformerConvModule(dim, config_int(cfg, "conv_expansion_factor", "encoder_config", 2),
                                        config_int(cfg, "conv_kernel_size", "encoder_config", 15))
        self.ff2 = ConformerFeedForward(dim, mult)
        self.post_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x)
        x = x + self.conv(x)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


class ConformerEncoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        dim = config_int(cfg, "hidden_dim", "encoder_config")
        self.input_linear = nn.Linear(config_int(cfg, "input_dim", "encoder_config"), dim)
        self.layers = nn.ModuleList(ConformerBlock(cfg) for _ in range(config_int(cfg, "num_layers", "encoder_config")))
        self.out = nn.Linear(dim, config_int(cfg, "output_dim", "encoder_config"))
        self.out_mid = nn.Linear(config_int(cfg, "output_dim", "encoder_config"), dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.input_linear(features)
        for index, layer in enumerate(self.layers, start=1):
            x = layer(x)
            if index == len(self.layers) // 2:   # the intermediate CTC head feeds back into the stream
                x = x + self.out_mid(torch.softmax(self.out(x), dim=-1))
        return x


class GraniteSpeechProjector(nn.Module):
    def __init__(self, raw: dict, text_hidden: int):
        super().__init__()
        cfg = raw.get("projector_config") or {}
        if cfg.get("use_qformer_text_input"):
            raise UnsupportedModelError("a Q-Former projector with use_qformer_text_input is not supported.")
        self.window_size = config_int(raw, "window_size", "config", 15)
        self.num_queries = self.window_size // config_int(raw, "downsample_rate", "config", 5)
        hidden = config_int(cfg, "hidden_size", "projector_config")
        self.query = nn.Parameter(torch.empty(1, self.num_queries, hidden))
        self.qformer = QFormer(cfg)
        self.linear = nn.Linear(hidden, text_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, steps, dim = x.shape
        num_windows = math.ceil(steps / self.window_size)
        x = F.pad(x, (0, 0, 0, num_windows * self.window_size - steps))
        windows = x.view(batch * num_windows, self.window_size, dim)
        out = self.qformer(self.query, windows)                      # [batch * windows, queries, hidden]
        return self.linear(out.reshape(batch, num_windows * self.num_queries, -1))


class GraniteSpeechEncoder(nn.Module):
    modality = MODALITY

    def __init__(self, config: ModelConfig):
        super().__init__()
        raw = config.multimodal
        self.encoder = ConformerEncoder(raw.get("encoder_config") or {})
        self.projector = GraniteSpeechProjector(raw, config.hidden_size)
        self.input_dim = self.encoder.input_linear.in_features

    def forward(self, items: list[torch.Tensor]) -> list[torch.Tensor]:
        """items: log-mel features [steps, input_dim] each -> their embeddings [tokens, text_hidden]."""
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, features in enumerate(items):
            by_length[features.shape[0]].append(index)
        out: list[torch.Tensor | None] = [None] * len(items)
        for indices in by_length.values():
            batch = torch.stack([items[i] for i in indices]).to(self.encoder.input_linear.weight.dtype)
            for index, embeds in zip(indices, self.projector(self.encoder(batch))):
                out[index] = embeds
        return out

    def dummy_items(self, count: int, device: torch.device) -> list[torch.Tensor]:
        return [torch.zeros(self.projector.window_size * 20, self.input_dim, device=device)] * count

    def checkpoint_name(self, name: str) -> str | None:
        for prefix in ("model.", ""):
            for part in ("encoder.", "projector."):
                if name.startswith(prefix + part):
                    return name[len(prefix):]
        return None


def build_encoder(config: ModelConfig, *, dtype: torch.dtype, device: torch.device) -> GraniteSpeechEncoder:
    return build_uninitialised(lambda: GraniteSpeechEncoder(config), dtype=dtype, device=device)
