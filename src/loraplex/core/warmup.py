"""Compile every Triton kernel variant at start-up, so no request pays for a JIT compile.

A Triton kernel compiles on its first launch for each set of compile-time parameters; the
tile choices (and so those parameters) depend on the step's token count, the longest new
prompt, and whether LoRA is active. Decode steps compile while CUDA graphs are captured;
prefill and mixed steps would otherwise compile on a user's request (seconds on a fresh
machine: 2.6 s for the first mixed step of an 8B model on an H200). Here a few eager
steps cover every class of those choices: token counts around the tile boundaries of
kernels/lora_tiles.py, triton_lora_meta.py and triton_attention.py, without LoRA and with
LoRA once per class of adapter bound (the LoRA tiles depend on the step's adapter count
only through its class: FEW_ADAPTERS or max_loras). They write nothing (cache slot -1)
and their outputs are dropped.

The LoRA kernels' decode tiles (steps of up to DECODE_TILE_MAX_TOKENS tokens, which eager
mixed steps are too) change with the token count itself, so those counts are not sampled:
each one runs once through every projection's shrink and expand, per class, on scratch
inputs (about a thousand small launches, no model pass). Eager decode steps (with
enforce_eager) pick a split count per step; the attention kernels compile only per "split or
not" and per power-of-2 width of the reduction, so one decode launch per power of 2 covers them.
"""

from __future__ import annotations

import logging
import time

import torch

from loraplex.core.step_inputs import profile_step_inputs

logger = logging.getLogger(__name__)

# Token counts of the warm-up steps: 1, a count divisible by 16 and odd ones (Triton
# specialises integer arguments on ==1 and %16), across the 16 / 32 / 128 / 1024 boundaries.
WARMUP_TOKENS = (1, 9, 24, 48, 200, 1100)


def warm_up(runner) -> None:
    from loraplex.kernels.lora_meta import build_lora_meta
    config = runner.config
    sizes = sorted({min(t, config.max_num_batched_tokens) for t in WARMUP_TOKENS}
                   | {config.max_num_batched_tokens})
    start = time.perf_counter()
    with torch.inference_mode():
        for num_tokens in sizes:
            seq_len = min(runner.max_model_len, num_tokens)
            if -(-seq_len // runner.block_size) > runner.num_kv_blocks:
                continue   # a cache too small to read one such sequence
            inputs, _ = profile_step_inputs(num_tokens, seq_len, runner.block_size, runner.device)
            for lora_bound in _lora_bounds(runner):
                if lora_bound:   # every token in slot 0 (empty or not: the kernels compile the same)
                    slots = torch.zeros(num_tokens, dtype=torch.int32, device=runner.device)
                    stacks = runner.lora.stacks
                    runner.lora.state.meta = build_lora_meta(slots, stacks.slot_ranks, stacks.max_loras,
                                                             max_active_slots=lora_bound)
                try:
                    runner._forward(inputs, runner.kv_cache.layers)
                finally:
                    if runner.lora is not None:
                        runner.lora.state.meta = None
        lora_counts = _warm_up_lora_decode_tiles(runner)
        if runner.attention_backend.name == "triton":
            _warm_up_decode_splits(runner)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    logger.info("warm-up: compiled the prefill kernels for %d step sizes%s in %.1f s", len(sizes),
                f" and the LoRA decode tiles for 1-{lora_counts} tokens" if lora_counts else "",
                time.perf_counter() - start)


def _warm_up_lora_decode_tiles(runner) -> int:
    """Launch each projection's LoRA kernels at every decode token count and adapter-bound
    class; returns the largest count (0 without LoRA). Writes only scratch tensors."""
    if runner.lora is None:
        return 0
    from loraplex.kernels.lora import apply_lora
    from loraplex.kernels.lora_meta import build_lora_meta
    from loraplex.kernels.lora_tiles import DECODE_TILE_MAX_TOKENS
    stacks = runner.lora.stacks
    max_tokens = min(DECODE_TILE_MAX_TOKENS, runner.config.max_num_batched_tokens)
    layer = stacks.stacks[0]   # every layer has the same shapes
    scratch = {name: (torch.zeros(max_tokens, s.target.in_features, dtype=stacks.dtype, device=stacks.device),
                      torch.zeros(max_tokens, s.target.out_features, dtype=stacks.dtype, device=stacks.device))
               for name, s in layer.items()}
    slots = torch.zeros(max_tokens, dtype=torch.int32, device=stacks.device)
    for bound in _lora_bounds(runner)[1:]:
        for num_tokens in range(1, max_tokens + 1):
            meta = build_lora_meta(slots[:num_tokens], stacks.slot_ranks, stacks.max_loras, max_active_slots=bound)
            for name, stack in layer.items():
                x, out = scratch[name]
                apply_lora(x[:num_tokens], out[:num_tokens], stack.lora_a, stack.lora_b, meta, stack.slice_offsets)
    return max_tokens


def _lora_bounds(runner) -> tuple[int, ...]:
    """0 (no LoRA), then one max_active_slots per class of LoRA tile configs (lora_tiles.config_bound):
    the eager path passes the step's exact adapter count, whose configs are those of its class."""
    if runner.lora is None:
        return (0,)
    from loraplex.kernels.lora_tiles import adapter_bound_classes
    return (0, *adapter_bound_classes(runner.lora.stacks.max_loras))


def _warm_up_decode_splits(runner) -> None:
    """One decode-attention launch per compile-time class of split count, on scratch queries laid
    out as the model passes them (a view of the fused qkv output), reading cache block 0."""
    from loraplex.kernels.triton_attention import MAX_SPLITS, triton_paged_decode
    cfg = runner.model_config
    num_heads = runner.model.shards.q_heads.size   # this rank's, under tensor parallelism
    q_size, kv_size = num_heads * cfg.head_dim, runner.num_kv_heads * cfg.head_dim
    qkv = torch.zeros(1, q_size + 2 * kv_size, dtype=runner.dtype, device=runner.device)
    q = qkv[:, :q_size].view(1, num_heads, cfg.head_dim)
    k_cache, v_cache = runner.kv_cache.layers[0]
    block_tables = torch.zeros(1, 1, dtype=torch.int32, device=runner.device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=runner.device)
    splits = 1
    while splits <= MAX_SPLITS:
        triton_paged_decode(q, k_cache, v_cache, block_tables, seq_lens, cfg.head_dim ** -0.5,
                            sliding_window=cfg.sliding_window, num_splits=splits)
        splits *= 2
