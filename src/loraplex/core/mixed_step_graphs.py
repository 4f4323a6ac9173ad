"""MixedStepGraphs: steps with prompt tokens replay CUDA graphs of everything but attention.

A step that carries a new prompt (a prefill, or decodes with one beside them) cannot replay a
decode graph: its attention depends on how the prompts split the tokens. Run eagerly it
launched ~580 kernels from Python, 31 ms of host time for ~9 ms of GPU work at 8B shapes
(H200, benchmarks/gpu_mixed_step.py), and under a steady stream of requests nearly every
step carries a prompt: served at 35 requests/s, inter-token gaps reached 66-101 ms at p99
against a 9 ms decode step (H100, gpu_serve.py --request-rate 35).

Here the step's tokens are padded to a bucket (64 ... 2048 tokens) and each bucket's forward
is captured in num_layers + 1 pieces, split at attention: everything between two attentions
(norms, projections with their LoRA, rotary, the MLP) is one graph, and attention runs
eagerly between the pieces over the real tokens only (writing their K/V, then the prefill /
mixed kernel), as vLLM's piecewise graphs do. The pieces pass it through static buffers
shared by every bucket and layer: a piece's last kernels copy its q, k, v into them, the
attention writes its output into another, which the next piece reads. (One set serves every
layer: each piece has finished before the next attention overwrites them.) The LoRA
variants, their metadata built inside the first piece, and the padding rows (LoRA slot -1,
attention never reads them) are as in cuda_graphs.py. Larger steps are compute-bound and
run eagerly; so do steps with multimodal embeddings.

Off CUDA (tests) nothing is captured: `execute` runs the same padded, static-buffer forward
eagerly, attention included, so everything but the capture is checked on the CPU.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch

from loraplex.core.attention import AttentionBackend, AttentionMetadata
from loraplex.core.cuda_graphs import lora_graph_bound, lora_graph_bounds
from loraplex.core.step_inputs import HostStepInputs, fill_pending_tokens
from loraplex.core.transfer import copy_to_device

logger = logging.getLogger(__name__)

# Above 2048 tokens a step's matrix work dwarfs its launches (and a bucket's padding would cost more).
TOKEN_BUCKETS = (64, 128, 192, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048)


def token_buckets(max_num_batched_tokens: int) -> list[int]:
    """The buckets a step of at most max_num_batched_tokens tokens can use."""
    if max_num_batched_tokens >= TOKEN_BUCKETS[-1]:
        return list(TOKEN_BUCKETS)
    return [b for b in TOKEN_BUCKETS if b < max_num_batched_tokens] + [max_num_batched_tokens]


class _PiecewiseAttention(AttentionBackend):
    """Stands in for the runner's backend while MixedStepGraphs runs or captures a bucket.

    Capturing: ends the current piece after copying q, k, v into the static buffers, records the
    layer's call, and begins the next piece. Otherwise: attention over the real tokens (none in a
    warm-up, metadata None), written into the static output."""

    name = "piecewise"

    def __init__(self, graphs: MixedStepGraphs) -> None:
        self.graphs = graphs

    def forward(self, q, k, v, k_cache, v_cache, metadata, *, scale, sliding_window):
        g = self.graphs
        size = q.shape[0]
        if g.capturing is not None:
            g.q[:size].copy_(q)
            g.k[:size].copy_(k)
            g.v[:size].copy_(v)
            g.capturing[-1].capture_end()
            g.calls.append((k_cache, v_cache, scale, sliding_window))
            piece = torch.cuda.CUDAGraph()
            piece.capture_begin(pool=g.pool)
            g.capturing.append(piece)
        elif g.metadata is not None:
            g.attend(q, k, v, (k_cache, v_cache, scale, sliding_window))
        return g.out[:size]


class MixedStepGraphs:
    def __init__(self, runner) -> None:
        self.runner = runner
        self.buckets = token_buckets(runner.config.max_num_batched_tokens)
        self.max_tokens = max_tokens = self.buckets[-1]
        device, model = runner.device, runner.model
        self.backend = runner.attention_backend
        attn = model.model.layers[0].self_attn
        q_heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.token_slots = torch.full((max_tokens,), -1, dtype=torch.int32, device=device)
        # Between pieces: attention's inputs and output, and the last piece's hidden states.
        dtype = runner.dtype
        self.q = torch.zeros(max_tokens, q_heads, head_dim, dtype=dtype, device=device)
        self.k = torch.zeros(max_tokens, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(max_tokens, kv_heads, head_dim, dtype=dtype, device=device)
        self.out = torch.zeros(max_tokens, q_heads, head_dim, dtype=dtype, device=device)
        self.hidden = torch.zeros(max_tokens, runner.model_config.hidden_size, dtype=dtype, device=device)
        self.capturing: list[torch.cuda.CUDAGraph] | None = None   # the pieces of the bucket being captured
        self.calls: list[tuple] = []                               # its attention calls, in order
        self.metadata: AttentionMetadata | None = None             # the real step's, when running eagerly
        self.num_tokens = 0
        self.use_cuda_graphs = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_cuda_graphs else None
        # (bucket, lora_bound) -> (pieces, attention calls); empty off CUDA
        self.graphs: dict[tuple[int, int], tuple[list[torch.cuda.CUDAGraph], list[tuple]]] = {}
        self.num_replays = 0
        self.lora_bounds = lora_graph_bounds(runner.lora.stacks.max_loras if runner.lora is not None else None)
        if self.use_cuda_graphs:
            start = time.perf_counter()
            stream = torch.cuda.Stream(device)
            with torch.inference_mode():
                for lora_bound in self.lora_bounds:
                    for size in reversed(self.buckets):   # largest first: smaller ones reuse its pool memory
                        self.graphs[size, lora_bound] = self._capture(size, lora_bound, stream)
            logger.info("captured CUDA graphs of prefill and mixed steps in %d pieces each (token buckets %s, "
                        "%d variants) in %.1f s", len(model.model.layers) + 1, self.buckets, len(self.lora_bounds),
                        time.perf_counter() - start)

    def can_run(self, host: HostStepInputs) -> bool:
        return 0 < len(host.input_ids) <= self.max_tokens and host.mm_indices is None

    def execute(self, host: HostStepInputs, pending_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One step: logits (model dtype) [num_seqs (+ prompt positions), vocab], as ModelRunner.run's eager path."""
        runner = self.runner
        metadata = host.attention_metadata(runner.device)
        n = len(host.input_ids)
        size = next(b for b in self.buckets if b >= n)
        copy_to_device(self.input_ids[:n], torch.from_numpy(host.input_ids))
        fill_pending_tokens(self.input_ids, host.pending, pending_ids)
        copy_to_device(self.positions[:n], torch.from_numpy(host.positions))
        lora_bound = 0
        if host.token_slots is not None:
            copy_to_device(self.token_slots[:n], torch.from_numpy(host.token_slots))
            self.token_slots[n:size].fill_(-1)
            lora_bound = lora_graph_bound(host.num_adapters, runner.lora.stacks.max_loras)
        self.num_replays += 1
        self.metadata, self.num_tokens = metadata, n
        try:
            if self.use_cuda_graphs:
                pieces, calls = self.graphs[size, lora_bound]
                for piece, call in zip(pieces, calls):
                    piece.replay()
                    self.attend(self.q, self.k, self.v, call)
                pieces[-1].replay()
            else:
                self._forward(size, lora_bound)
        finally:
            self.metadata = None
        return runner.model.compute_logits(self.hidden[metadata.logits_indices])

    def attend(self, q, k, v, call: tuple) -> None:
        """One layer's attention over the step's real tokens into the static output; call:
        (k_cache, v_cache, scale, sliding_window), as recorded at capture."""
        n = self.num_tokens
        k_cache, v_cache, scale, sliding_window = call
        self.backend.forward(q[:n], k[:n], v[:n], k_cache, v_cache, self.metadata, scale=scale,
                             sliding_window=sliding_window, out=self.out[:n])

    def _forward(self, size: int, lora_bound: int) -> None:
        """The bucket's forward over the static buffers, attention through _PiecewiseAttention."""
        runner = self.runner
        layers = [layer.self_attn for layer in runner.model.model.layers]
        piecewise = _PiecewiseAttention(self)
        for attn in layers:
            attn.backend = piecewise
        try:
            with runner.lora.device_batch(self.token_slots[:size], lora_bound) if lora_bound else nullcontext():
                hidden = runner.model(self.input_ids[:size], self.positions[:size], runner.kv_cache.layers,
                                      None)                                            # [size, hidden]
                self.hidden[:size].copy_(hidden)
        finally:
            for attn in layers:
                attn.backend = self.backend

    def _capture(self, size: int, lora_bound: int, stream: torch.cuda.Stream) -> tuple[list, list]:
        self.token_slots[:size].fill_(-1)    # the warm-up and capture adapt nothing, write no K/V
        self._forward(size, lora_bound)      # warm-up: compiles the kernels for this bucket
        torch.cuda.synchronize(self.runner.device)
        self.calls = []
        first = torch.cuda.CUDAGraph()
        self.capturing = [first]
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                first.capture_begin(pool=self.pool)
                self._forward(size, lora_bound)
                self.capturing[-1].capture_end()
        finally:
            pieces, self.capturing = self.capturing, None
        torch.cuda.current_stream().wait_stream(stream)
        return pieces, self.calls
