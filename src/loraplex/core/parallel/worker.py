"""The process of a tensor-parallel rank other than 0: its model shard, driven by rank 0's messages.

Started by rank 0 (runner.py) with `spawn`. It joins the group, builds its ModelRunner over
its shard (the start-up's collectives run in lockstep with the other ranks), says "ready",
then handles rank 0's messages in order until "stop":

    ("step", HostStepInputs)   run the step: the same forward pass as every rank, on this shard
                               (input ids still on rank 0's device arrive by broadcast first)
    ("load" | "drop" | "slot", ...)   mirror rank 0's adapter state (lora_mirror.py)
    ("report",)                answer with this rank's adapter state (tests, diagnosis)

Errors go to rank 0 as ("error", rank, traceback) before the process exits, so the engine
can say which rank failed and why; the exit closes this rank's connections, which makes rank
0's collectives fail instead of wait. When rank 0's process is gone the pipe closes and this
process exits. SIGINT and SIGTERM are ignored: Ctrl-C reaches every process of the terminal's
group (and a service manager's SIGTERM every process of the service) while in-flight
requests drain; rank 0 decides when this rank stops.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import traceback
from dataclasses import dataclass

import torch

from loraplex.core.config import EngineConfig
from loraplex.core.model_runner import ModelRunner
from loraplex.core.parallel.group import STARTUP_TIMEOUT_S, TPGroup
from loraplex.core.parallel.lora_mirror import WorkerAdapters


@dataclass(frozen=True)
class WorkerSpec:
    rank: int
    size: int
    port: int            # of rank 0's TCPStore on 127.0.0.1
    device: str          # this rank's: "cuda:<rank>" or "cpu"
    config: EngineConfig
    num_threads: int     # torch intra-op threads


def run_worker(spec: WorkerSpec, connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp-rank{spec.rank} %(levelname)s "
                                                      f"%(name)s: %(message)s")
    logging.getLogger("loraplex.core.lora.adapter").setLevel(logging.ERROR)   # rank 0 warns about adapters
    torch.set_num_threads(spec.num_threads)
    try:
        connection.send(("started", spec.rank))
        _serve(spec, connection)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(0)   # rank 0 is gone: nobody to report to
    except BaseException:
        try:
            connection.send(("error", spec.rank, traceback.format_exc()))
        except OSError:
            pass
        os._exit(1)   # no interpreter teardown: a collective's destructor could wait on dead peers
    os._exit(0)


def _serve(spec: WorkerSpec, connection) -> None:
    config = spec.config
    tp = TPGroup.connect(spec.rank, spec.size, torch.device(spec.device), port=spec.port,
                         timeout_s=max(config.distributed_timeout_seconds, STARTUP_TIMEOUT_S))
    runner = ModelRunner(config, tp=tp)
    tp.set_timeout(config.distributed_timeout_seconds)
    adapters = WorkerAdapters(runner.lora.stacks, allow_pickle=config.allow_pickle_lora_weights) \
        if runner.lora is not None else None
    connection.send(("ready", spec.rank))
    while True:
        message = pickle.loads(connection.recv_bytes())
        kind = message[0]
        if kind == "step":
            runner.run(message[1])
        elif kind == "stop":
            return
        elif kind == "report":
            connection.send(("report", spec.rank, adapters.state() if adapters is not None else {}))
        elif adapters is not None:
            adapters.handle(message)
        else:
            raise RuntimeError(f"rank {spec.rank} got {kind!r} but LoRA is not enabled")
