"""ModelRunner: loads the model, owns the KV cache, and turns a scheduled batch into logits.

The boundary with the engine: the scheduler hands over `list[ScheduledSeq]` (whose block
tables the block manager filled); `execute` returns logits in the model's dtype (the
sampler widens them where a stage needs float32), one row per sequence, for the last token
it computed. With overlapped scheduling, a sequence's last token may
still be on the device (sampled by the step before, `seq.num_pending_tokens == 1`):
execute then also takes that step's sampled ids, and the token's input id is
`sampled_token_ids[seq.pending_row]`, gathered on the device (step_inputs.py). That
argument is the whole of what overlapped scheduling asks of a runner. Inputs are prepared
once per step on the host (numpy, no per-token Python) and copied to the device; the
forward pass never reads the device back, so a decode step can later be captured in a
CUDA graph.

`execute` is two halves: `step(scheduled)` builds the step's HostStepInputs and holds its
adapters in slots, `run(host)` computes them. Under tensor parallelism (`tp`) each rank
has a ModelRunner over its shard; rank 0's TensorParallelRunner (core/parallel/runner.py)
calls `step`, sends the HostStepInputs to the other ranks, and every rank calls `run`;
pending input ids reach the other ranks by a broadcast at the start of `run`.
`create_model_runner(config)` picks the runner for a config.

A multimodal checkpoint adds an encoder tower (core/models/) beside the language model, which
stays this same LlamaForCausalLM (LoRA, CUDA graphs and tensor parallelism apply to it as to a
text model). `step` encodes what the step needs (core/multimodal/encoder_runner.py, on rank
0 only) and puts the rows for placeholder positions in the HostStepInputs; under tensor
parallelism `run` broadcasts them to the other ranks. Such steps run eagerly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from loraplex.core.attention import get_attention_backend
from loraplex.core.config import EngineConfig
from loraplex.core.kv_cache import (KVCache, bytes_per_block, cpu_kv_cache_budget, cuda_kv_cache_budget,
                                    num_blocks_for_budget)
from loraplex.core.loader import init_dummy_weights, load_weights
from loraplex.core.model import LlamaForCausalLM
from loraplex.core.model_config import ModelConfig, resolve_dtype
from loraplex.core.models import MultimodalCheckpoint, family
from loraplex.core.multimodal.encoder_runner import EncoderRunner
from loraplex.core.sequence import ScheduledSeq
from loraplex.core.step_inputs import (HostStepInputs, StepInputs, fill_pending_tokens, host_step_inputs,
                                      profile_step_inputs)
from loraplex.core.transfer import device_tensor
from loraplex.errors import ConfigError, LoraplexError

logger = logging.getLogger(__name__)

# Prefill and mixed steps replayed from CUDA graphs in pieces (core/mixed_step_graphs.py): on
# with the decode graphs; "0" turns them off alone (a few seconds less start-up and the
# graphs' memory, for 4x slower steps that carry prompt tokens; enforce_eager turns off all).
MIXED_STEP_GRAPHS_ENV = "LORAPLEX_MIXED_STEP_GRAPHS"


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


def create_model_runner(config: EngineConfig):
    """The engine's runner: a ModelRunner, or with tensor_parallel_size > 1 rank 0 of a
    tensor-parallel group (which starts the other ranks' processes)."""
    if config.tensor_parallel_size > 1:
        from loraplex.core.parallel.runner import TensorParallelRunner
        return TensorParallelRunner(config)
    return ModelRunner(config)


class ModelRunner:
    def __init__(self, config: EngineConfig, tp=None, lora_mirror=None):
        """tp: this rank's TPGroup under tensor parallelism (its device is the rank's), else None.
        lora_mirror: rank 0's LoRAMirror, which copies adapter changes to the other ranks."""
        self.config = config
        self.tp = tp
        self.device = tp.device if tp is not None else resolve_device(config.device)
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
                                      fused=self.attention_backend.name == "triton", tp=tp)
        self.num_kv_heads = self.model.shards.kv_heads.size   # this rank's
        self.mm_encoder = self._load_weights(cfg)     # EncoderRunner of a multimodal checkpoint, else None
        self.model.eval()
        self.lora = None
        if config.enable_lora:
            from loraplex.core.lora.runtime import LoRARuntime
            self.lora = LoRARuntime(self.model, cfg, config, dtype=self.dtype, device=self.device,
                                    mirror=lora_mirror)

        block_bytes = bytes_per_block(cfg.num_layers, self.block_size, self.num_kv_heads, cfg.head_dim, self.dtype)
        self.num_kv_blocks = num_blocks_for_budget(self._kv_cache_budget(block_bytes), block_bytes,
                                                   max_model_len=self.max_model_len, block_size=self.block_size)
        if tp is not None:   # one block manager (rank 0's) for every rank's cache: the smallest budget wins
            self.num_kv_blocks = tp.min(self.num_kv_blocks)
        self.kv_cache = KVCache(cfg.num_layers, self.num_kv_blocks, self.block_size, self.num_kv_heads,
                                cfg.head_dim, dtype=self.dtype, device=self.device)
        # Decode steps replay CUDA graphs (Triton attention only: the torch reference pads
        # every sequence to max_seq_len, which a graph fixes at max_model_len).
        self.decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager and self.attention_backend.name == "triton":
            from loraplex.core.cuda_graphs import DecodeGraphs
            self.decode_graphs = DecodeGraphs(self)
        # Steps with prompt tokens replay graphs of everything but attention (mixed_step_graphs.py)
        # unless MIXED_STEP_GRAPHS_ENV is "0".
        self.mixed_graphs = None
        if self.decode_graphs is not None and os.environ.get(MIXED_STEP_GRAPHS_ENV, "1") != "0":
            from loraplex.core.mixed_step_graphs import MixedStepGraphs
            self.mixed_graphs = MixedStepGraphs(self)
        if self.device.type == "cuda" and self.attention_backend.name == "triton":
            from loraplex.core.warmup import warm_up
            warm_up(self)
        logger.info("%s on %s (%s%s): %d KV blocks of %d tokens (%.1f MiB), max_model_len %d, attention %s",
                    cfg.architecture, self.device, self.dtype,
                    f", tensor-parallel rank {tp.rank} of {tp.size}" if tp is not None else "",
                    self.num_kv_blocks, self.block_size, self.kv_cache.num_bytes / 2**20, self.max_model_len,
                    self.attention_backend.name)

    def _load_weights(self, cfg: ModelConfig):
        """Fill the model (and a multimodal checkpoint's encoder) from the checkpoint or at random.
        Under tensor parallelism only rank 0 holds the encoder (its outputs are broadcast)."""
        module = family(cfg)
        encoder = None
        if module is not None and (self.tp is None or self.tp.rank == 0):
            encoder = module.build_encoder(cfg, dtype=self.dtype, device=self.device)
        target = self.model if module is None else MultimodalCheckpoint(cfg, self.model, encoder)
        if self.config.load_format == "dummy":
            init_dummy_weights(target, self.config.seed)
        else:
            load_weights(target, self.config.model)
        return None if encoder is None else EncoderRunner(encoder, self.device)

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
        scratch = torch.zeros(2, num_blocks, self.block_size, self.num_kv_heads, cfg.head_dim,
                              dtype=self.dtype, device=self.device)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._forward(inputs, [(scratch[0], scratch[1])] * cfg.num_layers)
        if self.mm_encoder is not None:   # a full encoder batch, on top of the step's activations
            self.mm_encoder.encoder(self.mm_encoder.encoder.dummy_items(self.mm_encoder.max_batch, self.device))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _forward(self, inputs: StepInputs, kv_caches, mm_embeds=None) -> torch.Tensor:
        hidden = self.model(inputs.input_ids, inputs.positions, kv_caches, inputs.metadata,
                            mm_embeds)                                                     # [num_tokens, hidden]
        return self.model.compute_logits(hidden[inputs.metadata.logits_indices])  # [num_seqs, vocab], model dtype

    def prepare_inputs(self, scheduled: list[ScheduledSeq]) -> StepInputs:
        return self._host_inputs(scheduled).to_device(self.device)

    def _host_inputs(self, scheduled: list[ScheduledSeq]) -> HostStepInputs:
        return host_step_inputs(scheduled, block_size=self.block_size, num_kv_blocks=self.num_kv_blocks,
                                max_model_len=self.max_model_len)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the scheduled tokens; logits [len(scheduled), vocab] (model dtype) of each one's last token.

        sampled_token_ids: the previous step's sampled ids ([rows] int64, on this device), needed
        when a scheduled sequence's last token is pending. Nothing here waits for the device.
        """
        with self.step(scheduled) as host:
            return self.run(host, sampled_token_ids)

    @contextmanager
    def step(self, scheduled: list[ScheduledSeq]) -> Iterator[HostStepInputs]:
        """The step's host inputs, its adapters in slots (and each token's slot in the inputs) until
        exit; a multimodal step's encoder outputs for its placeholder positions with them."""
        host = self._host_inputs(scheduled)
        if self.mm_encoder is not None:
            host.mm_indices, host.mm_embeds = self.mm_encoder.step_embeddings(scheduled) or (None, None)
        if self.lora is None:
            yield host
        else:
            with self.lora.step(scheduled) as (token_slots, num_adapters):
                host.token_slots, host.num_adapters = token_slots, num_adapters
                yield host
        if self.mm_encoder is not None:
            self.mm_encoder.after_step(scheduled)

    @torch.inference_mode()
    def run(self, host: HostStepInputs, sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step's forward pass: logits [num_seqs, vocab] in the model dtype. sampled_token_ids: as for
        execute (rank 0's; under tensor parallelism the other ranks pass None)."""
        pending_ids = self._pending_ids(host, sampled_token_ids)
        # Placeholder tokens take the encoder's outputs: such a step (even of single-token
        # chunks) cannot replay a decode graph, which reads token embeddings only.
        if host.mm_indices is None and self.decode_graphs is not None and self.decode_graphs.can_run(host):
            return self.decode_graphs.execute(host, pending_ids)
        if self.mixed_graphs is not None and self.mixed_graphs.can_run(host):
            return self.mixed_graphs.execute(host, pending_ids)
        inputs = host.to_device(self.device)
        fill_pending_tokens(inputs.input_ids, inputs.pending, pending_ids)
        mm_embeds = self._mm_embeds(host)
        if self.lora is None:
            return self._forward(inputs, self.kv_cache.layers, mm_embeds)
        with self.lora.batch(host.token_slots, host.num_adapters):   # token -> slot metadata built once
            return self._forward(inputs, self.kv_cache.layers, mm_embeds)

    def _pending_ids(self, host: HostStepInputs, sampled_token_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The values of the step's pending input ids ([k] int64, on this rank's device), taken from
        the previous step's sampled ids on the device; under tensor parallelism rank 0 gathers them
        and the other ranks receive them by broadcast (the host never learns them)."""
        pending = host.pending
        if pending is None:
            return None
        if self.tp is not None and self.tp.rank != 0:
            return self.tp.broadcast(torch.empty(len(pending.rows), dtype=torch.int64, device=self.device), src=0)
        if sampled_token_ids is None:
            raise LoraplexError("the step computes tokens sampled by the previous step, but execute() was not "
                                "given that step's sampled token ids")
        ids = sampled_token_ids.index_select(0, device_tensor(pending.rows, torch.long, self.device))
        if self.tp is not None:
            self.tp.broadcast(ids, src=0)
        return ids

    def _mm_embeds(self, host: HostStepInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(token indices, embeddings) of the step's placeholder positions, on this rank's device."""
        if host.mm_indices is None:
            return None
        embeds = host.mm_embeds
        if self.tp is not None:   # rank 0 encoded; the others receive the rows (HostStepInputs carries none)
            if embeds is None:
                embeds = torch.empty(len(host.mm_indices), self.model_config.hidden_size, dtype=self.dtype,
                                     device=self.device)
            self.tp.broadcast(embeds, src=0)
        indices = device_tensor(host.mm_indices, torch.int64, self.device)
        return indices, embeds
