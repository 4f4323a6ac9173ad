"""ModelRunner: loads the model, owns the KV cache, and turns a scheduled batch into logits.

The boundary with the engine: the scheduler hands over `list[ScheduledSeq]` (whose block
tables the block manager filled); `execute` returns float32 logits, one row per sequence,
for the last token it computed. With overlapped scheduling, a sequence's last token may
still be on the device (sampled by the step before, `seq.num_pending_tokens == 1`):
execute then also takes that step's sampled ids, and the token's input id is
`sampled_token_ids[seq.pending_row]`, gathered on the device (step_inputs.py). That
argument is the whole of what overlapped scheduling asks of a runner. Inputs are prepared once per step on the host (numpy,
no per-token Python) and copied to the device; the forward pass never reads the device
back, so a decode step can later be captured in a CUDA graph.
"""

from __future__ import annotations

import logging

import torch

from loraplex.core.attention import get_attention_backend
from loraplex.core.config import EngineConfig
from loraplex.core.kv_cache import (KVCache, bytes_per_block, cpu_kv_cache_budget, cuda_kv_cache_budget,
                                    num_blocks_for_budget)
from loraplex.core.loader import init_dummy_weights, load_weights
from loraplex.core.model import LlamaForCausalLM
from loraplex.core.model_config import ModelConfig, resolve_dtype
from loraplex.core.sequence import ScheduledSeq
from loraplex.core.step_inputs import StepInputs, fill_pending_tokens, prepare_step_inputs, profile_step_inputs
from loraplex.errors import ConfigError

logger = logging.getLogger(__name__)


def resolve_device(requested: str | None) -> torch.device:
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as e:
        raise ConfigError(f"device {requested!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'.") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {requested!r} was requested but CUDA is not available; use device='cpu'.")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {requested!r} is not supported; use 'cpu' or 'cuda'.")
    return device


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config = cfg = ModelConfig.from_dir(config.model)
        self.dtype = resolve_dtype(config.dtype, cfg.checkpoint_dtype, self.device)
        if config.max_model_len is not None and config.max_model_len > cfg.max_position_embeddings:
            raise ConfigError(f"max_model_len={config.max_model_len} exceeds the model's "
                              f"max_position_embeddings={cfg.max_position_embeddings}; lower max_model_len.")
        self.max_model_len = config.max_model_len or cfg.max_position_embeddings
        self.block_size = config.block_size
        self.vocab_size = cfg.vocab_size
        self.bos_token_id = cfg.bos_token_id
        self.eos_token_ids = cfg.eos_token_ids
        self.eos_token_id = cfg.eos_token_ids[0] if cfg.eos_token_ids else None

        self.attention_backend = get_attention_backend(self.device, config.attention_backend)
        # The Triton path (CUDA) also fuses norms, rotary and SiLU-and-mul; the torch path is all torch.
        self.model = LlamaForCausalLM(cfg, max_positions=self.max_model_len, backend=self.attention_backend,
                                      dtype=self.dtype, device=self.device,
                                      fused=self.attention_backend.name == "triton")
        if config.load_format == "dummy":
            init_dummy_weights(self.model, config.seed)
        else:
            load_weights(self.model, config.model)
        self.model.eval()
        self.lora = None
        if config.enable_lora:
            from loraplex.core.lora.runtime import LoRARuntime
            self.lora = LoRARuntime(self.model, cfg, config, dtype=self.dtype, device=self.device)

        block_bytes = bytes_per_block(cfg.num_layers, self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        self.num_kv_blocks = num_blocks_for_budget(self._kv_cache_budget(block_bytes), block_bytes,
                                                   max_model_len=self.max_model_len, block_size=self.block_size)
        self.kv_cache = KVCache(cfg.num_layers, self.num_kv_blocks, self.block_size, cfg.num_kv_heads,
                                cfg.head_dim, dtype=self.dtype, device=self.device)
        # Decode steps replay CUDA graphs (Triton attention only: the torch reference pads
        # every sequence to max_seq_len, which a graph fixes at max_model_len).
        self.decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and self.attention_backend.name == "triton":
            from loraplex.core.cuda_graphs import DecodeGraphs
            self.decode_graphs = DecodeGraphs(self)
        if self.device.type == "cuda" and self.attention_backend.name == "triton":
            from loraplex.core.warmup import warm_up
            warm_up(self)
        logger.info("%s on %s (%s): %d KV blocks of %d tokens (%.1f MiB), max_model_len %d, attention %s",
                    cfg.architecture, self.device, self.dtype, self.num_kv_blocks, self.block_size,
                    self.kv_cache.num_bytes / 2**20, self.max_model_len, self.attention_backend.name)

    def _kv_cache_budget(self, block_bytes: int) -> int:
        if self.device.type == "cpu" or self.config.kv_cache_bytes is not None:
            return cpu_kv_cache_budget(self.config.kv_cache_bytes, max_num_seqs=self.config.max_num_seqs,
                                       max_model_len=self.max_model_len, block_bytes=block_bytes,
                                       block_size=self.block_size)
        return cuda_kv_cache_budget(self.device, self.config.gpu_memory_utilization, self._profile_activation_peak())

    @torch.inference_mode()
    def _profile_activation_peak(self) -> int:
        """Bytes a max-size step (max_num_batched_tokens prompt tokens) needs beyond the weights."""
        cfg = self.model_config
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        inputs, num_blocks = profile_step_inputs(num_tokens, self.max_model_len, self.block_size, self.device)
        # One scratch layer cache, shared by every layer: the real cache does not exist yet.
        scratch = torch.zeros(2, num_blocks, self.block_size, cfg.num_kv_heads, cfg.head_dim,
                              dtype=self.dtype, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._forward(inputs, [(scratch[0], scratch[1])] * cfg.num_layers)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _forward(self, inputs: StepInputs, kv_caches) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, kv_caches, inputs.metadata)  # [num_tokens, hidden]
        return self.model.compute_logits(hidden[inputs.metadata.logits_indices]).float()  # [num_seqs, vocab]

    def prepare_inputs(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        return prepare_step_inputs(scheduled, block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                                   max_model_len=self.max_model_len, device=self.device)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the scheduled tokens; float32 logits [len(scheduled), vocab] of each one's last token.

        sampled_token_ids: the previous step's sampled ids ([rows] int64, on this device), needed
        when a scheduled sequence's last token is pending. Nothing here waits for the device.
        """
        if self.decode_graphs is not None and self.decode_graphs.can_run(scheduled):
            return self.decode_graphs.execute(scheduled, sampled_token_ids)
        inputs = self.prepare_inputs(scheduled)
        fill_pending_tokens(inputs.input_ids, inputs.pending, sampled_token_ids)
        if self.lora is None:
            return self._forward(inputs, self.kv_cache.layers)
        with self.lora.step(scheduled):   # slots filled, token -> slot metadata built once
            return self._forward(inputs, self.kv_cache.layers)
