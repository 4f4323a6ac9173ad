"""Keeping the garbage collector's pauses short in the long-lived processes we own.

A server process starts by importing torch, FastAPI and the model code and building the
engine: a quarter of a million objects (more with transformers) that live as long as the
process. Python's oldest-generation collection walks all of them: about 130 ms on a VM
core, during which the API server's event loop streams nothing (seen every 30 s or so
under load on the CPU, more often at GPU token rates) or the engine process does not
step. Moving them to the permanent generation once start-up is done (gc.freeze, as vLLM
and SGLang do) leaves the collector only what was made since.

Only for processes loraplex owns (the API server, the engine process, and the Ray replica
and ingress actors' worker processes, each dedicated to its actor): in a user's process
(offline `LLM`) freezing their objects would keep any garbage cycle among them forever.
"""

from __future__ import annotations

import gc
import logging
import time

logger = logging.getLogger(__name__)


def freeze_startup_heap(process: str) -> None:
    """Collect once, then exempt every object alive now from later collections."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%s: %d start-up objects frozen for the garbage collector (%.0f ms)", process,
                gc.get_freeze_count(), (time.perf_counter() - start) * 1e3)
