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
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    logger.info("warm-up: compiled the prefill kernels for %d step sizes in %.1f s", len(sizes),
                time.perf_counter() - start)


def _lora_bounds(runner) -> tuple[int, ...]:
    """0 (no LoRA), then one max_active_slots per class of LoRA tile configs (lora_tiles.config_bound):
    the eager path passes the step's exact adapter count, whose configs are those of its class."""
    if runner.lora is None:
        return (0,)
    from loraplex.kernels.lora_tiles import adapter_bound_classes
    return (0, *adapter_bound_classes(runner.lora.stacks.max_loras))
