"""LoRARuntime: multi-LoRA inside the model runner.

At start-up it allocates the slot stacks for the model (this rank's shard of them under
tensor parallelism), wraps every fused projection in a LoRALinear and creates the
LoRAManager. Each step, `step(scheduled)` puts the step's adapters into slots and maps
every token to its slot; `batch(token_slots, num_adapters)` builds the LoRABatchMeta from
that map once, for all layers, around the forward pass. The manager's step_lock is held
for the whole step, so pin/remove calls from other threads wait until the forward pass
has finished with the slots. The other ranks of a tensor-parallel group get the map (and
the slot writes) from rank 0 and call only `batch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from loraplex.core.config import EngineConfig
from loraplex.core.lora.layers import LoRALinear, LoRAStepState
from loraplex.core.lora.manager import LoRAManager
from loraplex.core.lora.slots import LoRASlotStacks
from loraplex.core.lora.targets import LoRAModelSpec, llama_lora_spec
from loraplex.core.sequence import ScheduledSeq
from loraplex.core.transfer import device_tensor
from loraplex.errors import ConfigError
from loraplex.kernels.lora_meta import build_lora_meta

# (parent module attribute, projection attribute) of each LoRA target in a decoder layer.
_TARGET_PATHS = {"qkv_proj": ("self_attn", "qkv_proj"), "o_proj": ("self_attn", "o_proj"),
                 "gate_up_proj": ("mlp", "gate_up_proj"), "down_proj": ("mlp", "down_proj")}


def lora_spec_for(model_config, tp_rank: int = 0, tp_size: int = 1) -> LoRAModelSpec:
    cfg = model_config
    return llama_lora_spec(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
                           num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                           intermediate_size=cfg.intermediate_size, tp_rank=tp_rank, tp_size=tp_size)


class LoRARuntime:
    def __init__(self, model: torch.nn.Module, model_config, config: EngineConfig, *,
                 dtype: torch.dtype, device: torch.device, mirror=None):
        """mirror: rank 0 of a tensor-parallel group passes its LoRAMirror (core/parallel/lora_mirror.py),
        which copies the CPU cache's and the slots' changes to the other ranks."""
        if config.lora_dtype != "auto" and getattr(torch, config.lora_dtype) != dtype:
            raise ConfigError(f"lora_dtype={config.lora_dtype} (--lora-dtype), but the model runs in {dtype}: "
                              f"LoRA weights are kept in the model's dtype; use 'auto' or the model's dtype")
        spec = lora_spec_for(model_config, model.shards.rank, model.shards.size)
        if config.lora_target_modules is not None:
            spec = spec.restricted(config.lora_target_modules)
        self.stacks = LoRASlotStacks(spec, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                                     dtype=dtype, device=device)
        self.manager = LoRAManager(self.stacks, max_cpu_loras=config.max_cpu_loras,
                                   served_model_name=config.model,
                                   allow_pickle=config.allow_pickle_lora_weights,
                                   cpu_cache=mirror.cpu_cache() if mirror is not None else None)
        if mirror is not None:
            self.stacks.on_change = mirror.slot_changed
        self.state = LoRAStepState(side_stream=torch.cuda.Stream(device) if device.type == "cuda" else None)
        self.device = device
        for index, layer in enumerate(model.model.layers):
            for target in spec.targets:
                parent_name, attr = _TARGET_PATHS[target.name]
                parent = getattr(layer, parent_name)
                setattr(parent, attr, LoRALinear(getattr(parent, attr), self.stacks.stack(index, target.name),
                                                 self.state))

    @contextmanager
    def step(self, scheduled: list[ScheduledSeq]) -> Iterator[tuple[np.ndarray | None, int]]:
        """Put the step's adapters into slots and keep them there until the step is over.

        Yields the step's token -> slot map ([num_tokens] int32; None when no token uses an
        adapter) and its number of distinct adapters, for `batch`."""
        with self.manager.step_lock:
            requests = [s.seq.lora_request for s in scheduled if s.seq.lora_request is not None]
            slot_of = self.manager.activate(requests)
            try:
                slots = np.empty(len(scheduled), dtype=np.int32)
                for i, s in enumerate(scheduled):
                    lora = s.seq.lora_request
                    s.seq.lora_slot = slot_of[lora.lora_int_id] if lora is not None else -1
                    slots[i] = s.seq.lora_slot
                token_slots = None
                if slot_of:
                    # Tokens are laid out sequence after sequence (see step_inputs.py).
                    token_slots = np.repeat(slots, [s.num_new_tokens for s in scheduled])   # [num_tokens]
                yield token_slots, len(slot_of)   # one slot per adapter
            finally:
                self.manager.end_step()

    @contextmanager
    def batch(self, token_slots: np.ndarray | None, num_adapters: int) -> Iterator[None]:
        """Publish the LoRABatchMeta of a step's token -> slot map to every LoRA layer for the forward pass."""
        if token_slots is None:
            yield
            return
        with self.device_batch(device_tensor(token_slots, torch.int32, self.device), num_adapters):
            yield

    @contextmanager
    def device_batch(self, token_slots: torch.Tensor, max_active_slots: int) -> Iterator[None]:
        """`batch` of a slot map already on the device ([num_tokens] int32): a CUDA graph's static
        buffer, regrouped inside the graph at each replay. max_active_slots bounds its distinct
        adapters and sizes the kernels (a graph variant's bound, cuda_graphs.lora_graph_bound);
        0 = no token uses an adapter, no LoRA work."""
        if not max_active_slots:
            yield
            return
        self.state.meta = build_lora_meta(token_slots, self.stacks.slot_ranks, self.stacks.max_loras,
                                          max_active_slots=max_active_slots)
        try:
            yield
        finally:
            self.state.meta = None
