"""TPGroup: this process's rank in a tensor-parallel group, and the collectives the model runs.

The group is a torch.distributed backend object of its own (gloo between CPU processes,
NCCL between GPUs), rendezvoused through a TCPStore on 127.0.0.1 that rank 0 opens; it is
not the process-global default group, so an engine does not claim torch.distributed for
the whole process, and two engines in one process do not collide.

Every collective has the group's timeout: a peer that hangs makes it raise after it (gloo
raises at once when a peer's process is gone; NCCL is unblocked by `abort()`, which rank
0's watchdog calls, see runner.py). While the ranks start, a collective waits for the
slowest rank to load its shard, so the timeout is at least STARTUP_TIMEOUT_S until
`set_timeout` lowers it to the engine's distributed_timeout_seconds. The model calls only three
operations, all of them usable inside a CUDA graph with NCCL, and the runner one more:

    all_reduce(x)   x summed over ranks, in place    row-parallel layers, the embedding
    all_gather(x)   [n, k] per rank -> [n, size * k]  the vocab-parallel logits
    min(value)      an int agreed by all ranks         the KV-cache size (budgets differ per GPU)
    broadcast(x)    rank 0's x on every rank           a multimodal step's encoder outputs (eager steps)
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

HOST = "127.0.0.1"
# Collectives' timeout while the ranks start: loading a large checkpoint's shard from a slow disk
# takes minutes, and the first collective after it waits for the slowest rank.
STARTUP_TIMEOUT_S = 1800.0


class TPGroup:
    def __init__(self, rank: int, size: int, device: torch.device, backend, store=None):
        self.rank = rank
        self.size = size
        self.device = device
        self.backend = backend      # ProcessGroupGloo or ProcessGroupNCCL
        self.store = store          # kept alive with the group (rank 0's is the rendezvous server)

    @classmethod
    def open_store(cls, size: int, timeout_s: float) -> dist.TCPStore:
        """Rank 0's rendezvous server on a free port of 127.0.0.1 (store.port): open it before
        starting the other ranks, which connect to that port."""
        return dist.TCPStore(HOST, 0, size, True, timeout=_timedelta(timeout_s), wait_for_workers=False)

    @classmethod
    def connect(cls, rank: int, size: int, device: torch.device, *, port: int, timeout_s: float,
                store: dist.TCPStore | None = None) -> "TPGroup":
        """Join the group (every rank calls this; it returns once all have joined or raises after
        timeout_s). Rank 0 passes the store it opened; the others connect to `port`."""
        if store is None:
            store = dist.TCPStore(HOST, port, size, False, timeout=_timedelta(timeout_s))
        prefixed = dist.PrefixStore("loraplex-tp", store)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = _timedelta(timeout_s)
            backend = dist.ProcessGroupNCCL(prefixed, rank, size, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = _timedelta(timeout_s)
            options._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
            backend = dist.ProcessGroupGloo(prefixed, rank, size, options)
        group = cls(rank, size, device, backend, store)
        group.min(0)   # every rank has joined (and NCCL's communicator exists before any graph capture)
        return group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks, in place; returns x."""
        self.backend.allreduce([x]).wait()
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """[n, k] on each rank -> [n, size * k]: rank r's columns at r*k : (r+1)*k."""
        n, k = x.shape
        out = torch.empty(self.size * n, k, dtype=x.dtype, device=x.device)   # [size * n, k], rank-major
        self.backend._allgather_base(out, x.contiguous()).wait()
        return out.view(self.size, n, k).transpose(0, 1).reshape(n, self.size * k)

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x of rank `src` copied into x on every rank, in place; returns x."""
        options = dist.BroadcastOptions()
        options.rootRank = src
        self.backend.broadcast([x], options).wait()
        return x

    def min(self, value: int) -> int:
        """The smallest of the ranks' values (each rank passes its own)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        options = dist.AllreduceOptions()
        options.reduceOp = dist.ReduceOp.MIN
        self.backend.allreduce([t], options).wait()
        return int(t.item())

    def set_timeout(self, timeout_s: float) -> None:
        """The timeout of every later collective (each rank sets its own; set them alike)."""
        self.backend._set_default_timeout(_timedelta(timeout_s))

    def abort(self) -> None:
        """Unblock collectives stuck on a dead or hung peer (they fail); the group is unusable after."""
        try:
            self.backend.abort()
        except Exception:   # already aborted or shut down: nothing left to unblock
            pass


def _timedelta(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)
