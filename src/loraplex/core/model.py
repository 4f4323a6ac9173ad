"""The Llama-family decoder (Llama 1/2/3, Mistral, Qwen2), readable top to bottom.

Module names follow the checkpoints' (model.layers.N.self_attn..., mlp..., lm_head) so
that LoRA target names map onto them, except that q/k/v and gate/up are fused:

    self_attn.qkv_proj  slices q, k, v      self_attn.o_proj   slice o
    mlp.gate_up_proj    slices gate, up     mlp.down_proj      slice down

Every forward works on a flat batch of tokens: [num_tokens, ...], no batch dimension.
The residual stream is carried beside the hidden states so that each "add, then norm" is
one fused kernel on CUDA (`fused=True`, the default there; the torch ops elsewhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.attention import AttentionBackend, AttentionMetadata
from loraplex.core.layers import Embedding, Linear, RMSNorm, silu_and_mul
from loraplex.core.model_config import ModelConfig
from loraplex.core.rotary import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, **factory):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (q_size, kv_size, kv_size), ("q", "k", "v"),
                               bias=cfg.qkv_bias, **factory)
        self.o_proj = Linear(q_size, (cfg.hidden_size,), ("o",), bias=False, **factory)
        self.rotary = rotary  # one cos/sin cache shared by every layer
        self.backend = backend
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window

    def forward(self, positions, hidden, k_cache, v_cache, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split(self.qkv_proj.output_slices, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)     # [num_tokens, q_heads, head_dim]
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)  # [num_tokens, kv_heads, head_dim]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = self.backend.forward(q, k, v, k_cache, v_cache, metadata,
                                   scale=self.scale, sliding_window=self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, *, fused: bool, **factory):
        super().__init__()
        self.fused = fused
        n = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, (n, n), ("gate", "up"), bias=cfg.mlp_bias, **factory)
        self.down_proj = Linear(n, (cfg.hidden_size,), ("down",), bias=cfg.mlp_bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), fused=self.fused))  # [num_tokens, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend, *, fused: bool,
                 **factory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)
        self.self_attn = Attention(cfg, rotary, backend, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)
        self.mlp = MLP(cfg, fused=fused, **factory)

    def forward(self, positions, hidden, residual, k_cache, v_cache, metadata):
        """hidden: the previous layer's output, residual: the stream before it (None at layer 0).
        Returns (this layer's MLP output, the stream before it); their sum is the layer's output."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, k_cache, v_cache, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, backend: AttentionBackend, *, fused: bool,
                 **factory):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, **factory)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, fused=fused,
                                 **factory)
        self.rotary_emb = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend, fused=fused, **factory)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)

    def forward(self, input_ids, positions, kv_caches, metadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden]
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, k_cache, v_cache, metadata)
        if residual is None:   # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """One class for every supported architecture; see ModelConfig for what differs."""

    def __init__(self, cfg: ModelConfig, *, max_positions: int, backend: AttentionBackend,
                 dtype: torch.dtype, device: torch.device, fused: bool | None = None):
        """fused: Triton kernels for norm, rotary and SiLU-and-mul; None = on CUDA only."""
        super().__init__()
        self.config = cfg
        factory = dict(dtype=dtype, device=device)
        fused = torch.device(device).type == "cuda" if fused is None else fused
        self.model = LlamaModel(cfg, max_positions, backend, fused=fused, **factory)
        # Tied: lm_head is the embedding matrix itself, not a copy.
        self.lm_head = self.model.embed_tokens if cfg.tie_word_embeddings else \
            Embedding(cfg.vocab_size, cfg.hidden_size, **factory)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        return self.model(input_ids, positions, kv_caches, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_seqs, hidden] -> [num_seqs, vocab] in the model dtype."""
        return F.linear(hidden, self.lm_head.weight)
