"""Where an engine step's time went (EngineCore.last_step), and the log line of a slow one.

A step launches the next batch (scheduling, adapters copied into device slots, the forward's
launch) and finishes the one before (waiting for its sampled tokens, stop checks). A step of
SLOW_STEP_S or more is logged at info with that split: during a burst of new adapters on an
H100 host it showed steps taking 223 ms to launch one sequence while the loaders' CPU ops
starved the step loop (docs/performance.md).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

logger = logging.getLogger(__name__)

SLOW_STEP_S = 0.1


class StepTimes(NamedTuple):
    launch_s: float
    finish_s: float
    num_seqs: int
    num_tokens: int
    num_slot_writes: int = 0          # adapters copied into device slots for it


def slot_writes(lora_manager) -> int:
    """Adapters copied into device slots so far (each is a CPU-cache hit or miss of activate)."""
    if lora_manager is None:
        return 0
    return lora_manager.stats["cpu_hits"] + lora_manager.stats["cpu_misses"]


def log_if_slow(times: StepTimes) -> None:
    if times.launch_s + times.finish_s >= SLOW_STEP_S:
        logger.info("slow engine step: %.0f ms launching %d sequences (%d tokens, %d adapters copied into slots), "
                    "%.0f ms finishing the step before", times.launch_s * 1e3, times.num_seqs, times.num_tokens,
                    times.num_slot_writes, times.finish_s * 1e3)
