"""DecodeGraphs: CUDA graphs of whole decode steps, one per batch-size bucket, LoRA included.

A decode step of an 8B model is ~1,000 kernel launches (more with LoRA); launched one by
one from Python the GPU idles between them. Here each bucket's step is captured once at
start-up and replayed: the step's inputs are copied into static device buffers, the graph
runs, and the logits of the real rows are returned.

Static buffers (max_bs = the largest bucket, max_blocks = cdiv(max_model_len, block_size)):

    input_ids, positions, slot_mapping   [max_bs] int64
    seq_lens                             [max_bs] int32
    block_tables                         [max_bs, max_blocks] int32
    query_start_loc, logits_indices      arange: one token per sequence
    token_slots                          [max_bs] int32, the LoRA slot of each row

A batch of n sequences replays the smallest bucket >= n; rows n.. are padding: slot -1
(their K/V are not written), seq_len 1 (they read one cached token of a valid block), LoRA
slot -1 (no adapter work). With LoRA enabled every bucket is captured in variants named
by `lora_bound`, the most distinct adapters the variant serves: 0 (no LoRA kernels, for
steps that use no adapter), max_loras, and, when max_loras > FEW_ADAPTERS, FEW_ADAPTERS.
A LoRA variant runs `build_lora_meta` + the LoRA kernels inside the graph (it regroups
whatever slot map the buffer holds at replay) with grids and tiles sized for its bound,
so a step with one adapter does not pay for the row tiles 32 could need. `execute` counts
the step's distinct slots on the host and replays the smallest variant that covers them
(lora_graph_bound). The attention metadata's max_seq_len is max_model_len, so the
captured split-K decode covers any context. Nothing in a replayed step syncs with the
host. Prefill and mixed steps, and batches larger than the largest bucket, run eagerly.

Under tensor parallelism every rank captures the same graphs in the same order, with the
layers' collectives (NCCL) inside them, and replays the same one each step: the choice
depends only on the step's HostStepInputs, which every rank receives alike.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import nullcontext

import torch

from loraplex.core.attention import AttentionMetadata
from loraplex.core.step_inputs import HostStepInputs, fill_pending_tokens
from loraplex.core.transfer import copy_to_device
# FEW_ADAPTERS is re-exported: the name of the few-adapter variant's bound.
from loraplex.kernels.lora_tiles import FEW_ADAPTERS, adapter_bound_classes, config_bound  # noqa: F401

logger = logging.getLogger(__name__)


def lora_graph_bound(num_active: int, max_loras: int) -> int:
    """The LoRA variant for a step with num_active distinct adapters: 0 (none), FEW_ADAPTERS, or max_loras.

    Also the max_active_slots of that variant's metadata, so its grids and tiles are sized by the
    same classes as the kernels' configs (benchmarks use it to time what the engine runs).
    """
    return 0 if num_active == 0 else config_bound(num_active, max_loras)


def lora_graph_bounds(max_loras: int | None) -> tuple[int, ...]:
    """The variants captured per bucket: (0,) without LoRA, else 0, FEW_ADAPTERS (if below max_loras), max_loras."""
    return (0,) if max_loras is None else (0, *adapter_bound_classes(max_loras))


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Buckets 1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, ... up to max_num_seqs (always included)."""
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 48, 64) if s < max_num_seqs]
    sizes += list(range(96, max_num_seqs, 32))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.sizes = capture_sizes(runner.config.max_num_seqs)
        self.max_bs = max_bs = self.sizes[-1]
        device = runner.device
        max_blocks = -(-runner.max_model_len // runner.block_size)
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.logits_indices = torch.arange(max_bs, dtype=torch.int64, device=device)
        self.token_slots = torch.full((max_bs,), -1, dtype=torch.int32, device=device)
        # Off CUDA (tests) nothing is captured: a "replay" runs the same static-buffer step eagerly.
        self.use_cuda_graphs = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        # (batch bucket, lora_bound) -> (graph, its static logits)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.num_replays = 0
        self.replays_per_bound: Counter[int] = Counter()
        start = time.perf_counter()
        self.lora_bounds = lora_graph_bounds(runner.lora.stacks.max_loras if runner.lora is not None else None)
        with torch.inference_mode():
            for lora_bound in self.lora_bounds:
                for size in reversed(self.sizes):  # largest first: smaller ones reuse its pool memory
                    self.graphs[size, lora_bound] = \
                        self._capture(size, lora_bound) if self.use_cuda_graphs else (None, None)
        variants = ", ".join("no LoRA" if b == 0 else f"LoRA <= {b} adapters" for b in self.lora_bounds)
        logger.info("%s %d decode CUDA graphs (batch sizes %s; variants: %s) in %.1f s",
                    "captured" if self.use_cuda_graphs else "set up (not captured off CUDA)", len(self.graphs),
                    self.sizes, variants, time.perf_counter() - start)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            logits_indices=self.logits_indices[:size], max_query_len=1,
            max_seq_len=self.runner.max_model_len, is_decode_only=True)

    def _forward(self, size: int, lora_bound: int) -> torch.Tensor:
        runner = self.runner
        with runner.lora.device_batch(self.token_slots[:size], lora_bound) if lora_bound else nullcontext():
            hidden = runner.model(self.input_ids[:size], self.positions[:size], runner.kv_cache.layers,
                                  self._metadata(size))                      # [size, hidden]
            return runner.model.compute_logits(hidden)                       # [size, vocab], model dtype

    def _capture(self, size: int, lora_bound: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Buffers hold padding (slot -1): the warm-up (which compiles the kernels) writes nothing.
        self._forward(size, lora_bound)
        torch.cuda.synchronize(self.runner.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(size, lora_bound)
        return graph, logits

    def can_run(self, host: HostStepInputs) -> bool:
        return 0 < host.num_seqs <= self.max_bs and host.is_decode_only and host.prompt_positions is None

    def execute(self, host: HostStepInputs, pending_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step by graph replay: logits [num_seqs, vocab] in the model dtype.
        pending_ids: the values of host.pending's input ids, on the device (ModelRunner.run)."""
        runner = self.runner
        num_seqs = host.num_seqs
        size = next(s for s in self.sizes if s >= num_seqs)

        def copy(buffer: torch.Tensor, array) -> None:
            copy_to_device(buffer, torch.from_numpy(array))

        copy(self.input_ids[:num_seqs], host.input_ids)
        fill_pending_tokens(self.input_ids, host.pending, pending_ids)
        copy(self.positions[:num_seqs], host.positions)
        copy(self.slot_mapping[:num_seqs], host.slot_mapping)
        copy(self.seq_lens[:num_seqs], host.seq_lens)
        copy(self.block_tables[:num_seqs, :host.block_tables.shape[1]], host.block_tables)
        if size > num_seqs:
            self.slot_mapping[num_seqs:size].fill_(-1)
            self.seq_lens[num_seqs:size].fill_(1)
        if host.token_slots is None:
            return self._replay(size, 0, num_seqs)
        copy(self.token_slots[:num_seqs], host.token_slots)
        if size > num_seqs:
            self.token_slots[num_seqs:size].fill_(-1)
        return self._replay(size, lora_graph_bound(host.num_adapters, runner.lora.stacks.max_loras), num_seqs)

    def _replay(self, size: int, lora_bound: int, num_seqs: int) -> torch.Tensor:
        graph, logits = self.graphs[size, lora_bound]
        self.num_replays += 1
        self.replays_per_bound[lora_bound] += 1
        if graph is None:
            return self._forward(size, lora_bound)[:num_seqs]
        graph.replay()
        # The static output itself, not a copy (33 MB at batch 128): the next replay overwrites
        # it, but everything that reads it (sampling, logprobs) is queued on the stream first.
        return logits[:num_seqs]
