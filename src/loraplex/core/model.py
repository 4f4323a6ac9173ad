"""The Llama-family decoder (Llama 1/2/3, Mistral, Qwen2, Granite), readable top to bottom.

Module names follow the checkpoints' (model.layers.N.self_attn..., mlp..., lm_head) so
that LoRA target names map onto them, except that q/k/v and gate/up are fused:

    self_attn.qkv_proj  slices q, k, v      self_attn.o_proj   slice o
    mlp.gate_up_proj    slices gate, up     mlp.down_proj      slice down

Every forward works on a flat batch of tokens: [num_tokens, ...], no batch dimension.
The residual stream is carried beside the hidden states so that each "add, then norm" is
one fused kernel on CUDA (`fused=True`, the default there; the torch ops elsewhere).

With tensor parallelism (`tp`, a TPGroup) each rank builds the same model over its shard
(core/parallel/layout.py): its query and KV heads, its slice of the MLP width and of the
vocab. The code is the same; the collectives sit in the layers: o_proj and down_proj
all-reduce their partial sums, the embedding all-reduces its lookups, and compute_logits
all-gathers the vocab slices. Norms and the residual stream are replicated.

Granite differs only by four scalars (ModelConfig): embeddings are scaled, each sublayer's
output is scaled before it joins the residual stream, attention uses its own scale and
logits are divided. For Llama they are 1 and cost nothing.

The language model of a multimodal checkpoint is this class too: the encoder towers
(core/models/) turn images or audio into embeddings that `forward(mm_embeds=...)` writes
over the placeholder tokens' embeddings, before any scaling, as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.core.attention import AttentionBackend, AttentionMetadata
from loraplex.core.layers import Embedding, Linear, RMSNorm, silu_and_mul
from loraplex.core.model_config import ModelConfig
from loraplex.core.parallel.layout import LayerShards, vocab_shard
from loraplex.core.rotary import RotaryEmbedding


def _linear(shards: LayerShards, name: str, slice_names: tuple[str, ...], *, bias: bool, tp, **factory) -> Linear:
    projection = shards.projection(name)
    return Linear(projection.in_shard, projection.out_shards, slice_names, bias=bias, tp=tp, **factory)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, shards: LayerShards, rotary: RotaryEmbedding, backend: AttentionBackend,
                 *, tp, **factory):
        super().__init__()
        # This rank's heads (all of them on one device).
        self.num_heads, self.num_kv_heads, self.head_dim = shards.q_heads.size, shards.kv_heads.size, cfg.head_dim
        self.qkv_proj = _linear(shards, "qkv_proj", ("q", "k", "v"), bias=cfg.qkv_bias, tp=tp, **factory)
        self.o_proj = _linear(shards, "o_proj", ("o",), bias=cfg.o_bias, tp=tp, **factory)
        self.rotary = rotary  # one cos/sin cache shared by every layer
        self.backend = backend
        self.scale = cfg.attention_multiplier if cfg.attention_multiplier is not None else cfg.head_dim ** -0.5
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
    def __init__(self, cfg: ModelConfig, shards: LayerShards, *, fused: bool, tp, **factory):
        super().__init__()
        self.fused = fused
        self.gate_up_proj = _linear(shards, "gate_up_proj", ("gate", "up"), bias=cfg.mlp_bias, tp=tp, **factory)
        self.down_proj = _linear(shards, "down_proj", ("down",), bias=cfg.mlp_bias, tp=tp, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x), fused=self.fused))  # [num_tokens, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shards: LayerShards, rotary: RotaryEmbedding, backend: AttentionBackend,
                 *, fused: bool, tp, **factory):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)
        self.self_attn = Attention(cfg, shards, rotary, backend, tp=tp, **factory)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)
        self.mlp = MLP(cfg, shards, fused=fused, tp=tp, **factory)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, positions, hidden, residual, k_cache, v_cache, metadata):
        """hidden: the previous layer's output, residual: the stream before it (None at layer 0).
        Returns (this layer's MLP output, the stream before it); their sum is the layer's output."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self._scaled(self.self_attn(positions, hidden, k_cache, v_cache, metadata))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self._scaled(self.mlp(hidden)), residual

    def _scaled(self, sublayer_out: torch.Tensor) -> torch.Tensor:
        return sublayer_out if self.residual_multiplier == 1.0 else sublayer_out * self.residual_multiplier


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, shards: LayerShards, max_positions: int, backend: AttentionBackend, *,
                 fused: bool, tp, **factory):
        super().__init__()
        self.embed_tokens = Embedding(vocab_shard(cfg.vocab_size, shards.rank, shards.size), cfg.hidden_size,
                                      tp=tp, **factory)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, fused=fused,
                                 **factory)
        self.rotary_emb = rotary
        self.layers = nn.ModuleList(DecoderLayer(cfg, shards, rotary, backend, fused=fused, tp=tp, **factory)
                                    for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fused=fused, **factory)
        self.embedding_multiplier = cfg.embedding_multiplier

    def forward(self, input_ids, positions, kv_caches, metadata, mm_embeds=None) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden]
        if mm_embeds is not None:
            token_indices, embeds = mm_embeds            # [k], [k, hidden]: rows replacing placeholder tokens
            hidden = hidden.index_copy(0, token_indices, embeds.to(hidden.dtype))
        if self.embedding_multiplier != 1.0:
            hidden = hidden * self.embedding_multiplier
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            hidden, residual = layer(positions, hidden, residual, k_cache, v_cache, metadata)
        if residual is None:   # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    """One class for every supported architecture; see ModelConfig for what differs."""

    def __init__(self, cfg: ModelConfig, *, max_positions: int, backend: AttentionBackend,
                 dtype: torch.dtype, device: torch.device, fused: bool | None = None, tp=None):
        """fused: Triton kernels for norm, rotary and SiLU-and-mul; None = on CUDA only.
        tp: this rank's TPGroup (None: the whole model on one device)."""
        super().__init__()
        self.config = cfg
        self.tp = tp
        rank, size = (tp.rank, tp.size) if tp is not None else (0, 1)
        self.shards = LayerShards.for_config(cfg, rank, size)
        factory = dict(dtype=dtype, device=device)
        fused = torch.device(device).type == "cuda" if fused is None else fused
        self.model = LlamaModel(cfg, self.shards, max_positions, backend, fused=fused, tp=tp, **factory)
        # Tied: lm_head is the embedding matrix itself, not a copy.
        self.lm_head = self.model.embed_tokens if cfg.tie_word_embeddings else \
            Embedding(self.model.embed_tokens.vocab, cfg.hidden_size, tp=tp, **factory)
        self.logits_scaling = cfg.logits_scaling

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], metadata: AttentionMetadata,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden].

        mm_embeds: (token indices [k], embeddings [k, hidden]) of a multimodal step: the
        encoder outputs that stand in for the placeholder tokens at those indices."""
        return self.model(input_ids, positions, kv_caches, metadata, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_seqs, hidden] -> [num_seqs, vocab] in the model dtype (on every rank)."""
        logits = F.linear(hidden, self.lm_head.weight)        # [num_seqs, this rank's vocab rows]
        if self.lm_head.tp is not None:
            # Gathered in the model dtype (half the bytes of float32); padding columns dropped.
            logits = self.lm_head.tp.all_gather(logits)[:, :self.config.vocab_size]
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling
