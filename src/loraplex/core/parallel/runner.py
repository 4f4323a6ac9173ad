"""TensorParallelRunner: rank 0 of a tensor-parallel group, behind the engine's runner interface.

The engine does not know about tensor parallelism beyond its config: it talks to this
object as to a ModelRunner (`execute(scheduled) -> logits`, `lora.manager`, the sizes).
Rank 0 lives in the engine's process and holds the first shard; it starts one process per
other rank (`spawn`, worker.py) and talks to them over one pipe each:

    start-up   rank 0 opens a TCPStore on 127.0.0.1 (a free port), starts ranks 1..N-1, and
               every rank joins the TPGroup and builds its ModelRunner shard; the KV-cache
               size, warm-up and CUDA-graph capture run in lockstep (they hold collectives)
    each step  rank 0 runs the scheduler's batch through `ModelRunner.step` (host inputs;
               its adapters into slots, mirrored to the others as it writes them), sends the
               HostStepInputs to every rank, and all ranks `run` them: the same forward pass
               on their shards, joined by the layers' collectives; rank 0 returns the logits
    adapters   rank 0's LoRAManager decides; the others mirror it (lora_mirror.py)

Messages are pickled once and written to every pipe in one order, under a lock (adapter
loads come from other threads). Overlapped scheduling: a step's input ids may include
tokens the previous step sampled, whose values only rank 0's device holds (HostStepInputs.
pending says where they go); every rank's `run` starts with a broadcast of those values
from rank 0 (ModelRunner._pending_ids), so the host never waits for them. On CUDA, rank 0
still waits for each step's end before returning its logits (see `execute`): the overlap
of host and device work is then lost under tensor parallelism.

Failure: a rank that dies or hangs must not leave the engine stuck in a collective. A
watchdog thread on rank 0 waits on the other ranks' processes and on the step in flight;
when a process exits, or a step runs past `distributed_timeout_seconds`, it records why
and aborts the NCCL communicator (a gloo collective fails by itself: at once when a peer's
process is gone, after the timeout when it hangs). The step in progress then raises, and
every later call raises the same TensorParallelError at once; the other ranks are stopped.
A rank that fails with an exception reports its traceback to rank 0 before it exits, and
the error names it. The other ranks exit by themselves when rank 0's process is gone (their
pipe closes). There is no recovery: the engine must be restarted.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import threading
import time
import weakref

import torch

from loraplex.core.config import EngineConfig
from loraplex.core.model_config import ModelConfig
from loraplex.core.model_runner import ModelRunner, resolve_device
from loraplex.core.parallel.group import STARTUP_TIMEOUT_S, TPGroup
from loraplex.core.parallel.layout import check_tensor_parallel_size
from loraplex.core.parallel.lora_mirror import LoRAMirror
from loraplex.core.parallel.worker import WorkerSpec, run_worker
from loraplex.core.sequence import ScheduledSeq
from loraplex.errors import ConfigError, LoraplexError, TensorParallelError

logger = logging.getLogger(__name__)

# How long a stopping rank may take before it is killed.
STOP_TIMEOUT_S = 10.0


def rank_device(requested: str | None, rank: int, size: int) -> torch.device:
    """Rank `rank`'s device: cuda:rank (of the visible GPUs) or the CPU. Checks there are enough GPUs."""
    device = resolve_device(requested)
    if device.type == "cpu":
        return device
    if device.index not in (None, 0):
        raise ConfigError(f"device {requested!r} with tensor_parallel_size={size}: the ranks use cuda:0 to "
                          f"cuda:{size - 1}; choose the GPUs with CUDA_VISIBLE_DEVICES and pass device='cuda'")
    check_gpu_count(size, torch.cuda.device_count())
    return torch.device("cuda", rank)


def check_gpu_count(size: int, available: int) -> None:
    if size > available:
        raise ConfigError(f"tensor_parallel_size={size} needs {size} GPUs but {available} "
                          f"{'is' if available == 1 else 'are'} visible; lower tensor_parallel_size or make "
                          f"more GPUs visible (CUDA_VISIBLE_DEVICES)")


class _Channel:
    """Rank 0's pipes to ranks 1..N-1: one ordered message stream, pickled once."""

    def __init__(self, connections: list[multiprocessing.connection.Connection]):
        self.connections = connections
        self._lock = threading.Lock()

    def send(self, message: tuple) -> None:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            for connection in self.connections:
                connection.send_bytes(payload)


class TensorParallelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        size = self.size = config.tensor_parallel_size
        startup_timeout_s = max(config.distributed_timeout_seconds, STARTUP_TIMEOUT_S)
        # Bad sizes fail here, before any process starts.
        cfg = ModelConfig.from_dir(config.model)
        check_tensor_parallel_size(size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                                   intermediate_size=cfg.intermediate_size)
        self.device = rank_device(config.device, 0, size)

        self.tp: TPGroup | None = None
        self._failure: str | None = None
        self._step_started: float | None = None   # monotonic time of the step in flight, for the watchdog
        self._stopping = threading.Event()
        self._recv_lock = threading.RLock()   # reading the other ranks' replies (tests, errors)
        # The error each failed rank sent, once read off its pipe: the watchdog and a failing step
        # may both describe the same rank, and only the first reader finds the message there.
        self._rank_errors: dict[int, str] = {}
        if self.device.type == "cpu":
            # The ranks share the host's cores: threads of two ranks spinning on the same core
            # while one waits in a collective made steps many times slower.
            torch.set_num_threads(max(1, torch.get_num_threads() // size))
        store = TPGroup.open_store(size, startup_timeout_s)
        context = multiprocessing.get_context("spawn")   # fork is unsafe once torch (or CUDA) runs
        self._processes, connections = [], []
        for rank in range(1, size):
            ours, theirs = context.Pipe()
            spec = WorkerSpec(rank=rank, size=size, port=store.port, device=str(rank_device(config.device, rank, size)),
                              config=config, num_threads=torch.get_num_threads())
            process = context.Process(target=run_worker, args=(spec, theirs), name=f"loraplex-tp-rank{rank}",
                                      daemon=True)
            process.start()
            theirs.close()
            self._processes.append(process)
            connections.append(ours)
        self._channel = _Channel(connections)
        # Stops the other ranks when this runner is collected, shut down, or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_ranks, self._processes, connections, self._stopping)
        try:
            self._wait_for("started", startup_timeout_s)
            self.tp = TPGroup.connect(0, size, self.device, port=store.port, timeout_s=startup_timeout_s,
                                      store=store)
            self._mirror = LoRAMirror(self._send) if config.enable_lora else None
            self.local = ModelRunner(config, tp=self.tp, lora_mirror=self._mirror)
            self.tp.set_timeout(config.distributed_timeout_seconds)
            self._wait_for("ready", startup_timeout_s)
        except BaseException as exc:
            # Rank 0's own errors (a bad setting the other ranks hit alike, a rank that never
            # started) are raised as they are; a collective that broke names the rank behind it.
            reason = None
            if isinstance(exc, Exception) and not isinstance(exc, LoraplexError):
                reason = self._rank_failure() or f"rank 0: {type(exc).__name__}: {exc}"
            self._kill_ranks()
            self.shutdown()
            if reason is None:
                raise
            raise TensorParallelError(f"tensor-parallel start-up failed: {reason}") from exc
        # What the engine reads of a runner.
        local = self.local
        self.dtype, self.model_config, self.lora = local.dtype, local.model_config, local.lora
        self.max_model_len, self.block_size, self.num_kv_blocks = local.max_model_len, local.block_size, local.num_kv_blocks
        self.vocab_size, self.bos_token_id = local.vocab_size, local.bos_token_id
        self.eos_token_ids, self.eos_token_id = local.eos_token_ids, local.eos_token_id
        self._watchdog = threading.Thread(target=self._watch, name="loraplex-tp-watchdog", daemon=True)
        self._watchdog.start()
        logger.info("tensor parallelism: %d ranks (%s), ranks 1-%d in processes %s", size,
                    "NCCL" if self.device.type == "cuda" else "gloo", size - 1, [p.pid for p in self._processes])

    # ---- the runner interface --------------------------------------------------------------

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSeq], sampled_token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Compute the scheduled tokens on every rank; logits [len(scheduled), vocab] (model dtype).
        sampled_token_ids: the previous step's, on rank 0's device, for pending input ids
        (overlapped scheduling): rank 0 broadcasts their values to the others in `run`."""
        self._check_alive()
        # Errors before the send (bad inputs, an adapter that cannot be reloaded) leave the
        # other ranks untouched: the engine handles them as on one device.
        with self.local.step(scheduled) as host:
            if host.pending is not None and sampled_token_ids is None:
                raise LoraplexError("the step computes tokens sampled by the previous step, but execute() was "
                                    "not given that step's sampled token ids")
            self._send(("step", host))
            self._step_started = started = time.monotonic()
            try:
                logits = self.local.run(host, sampled_token_ids)
                if self.device.type == "cuda":
                    # A rank lost mid-step leaves an aborted collective behind, not an error:
                    # wait for the step, then ask the watchdog, before anyone reads the logits.
                    torch.cuda.current_stream(self.device).synchronize()
            except BaseException as exc:
                raise self._fatal(exc, time.monotonic() - started) from exc
            finally:
                self._step_started = None
        self._check_alive()
        return logits

    def report(self) -> list[dict]:
        """Each other rank's mirrored LoRA state (WorkerAdapters.state(); {} without LoRA), ranks 1..N-1."""
        self._send(("report",))
        states = []
        deadline = time.monotonic() + self.config.distributed_timeout_seconds
        with self._recv_lock:
            for rank, connection in enumerate(self._channel.connections, start=1):
                while not connection.poll(0.1):
                    self._check_alive()
                    if time.monotonic() > deadline:
                        raise self._fatal(TimeoutError(f"rank {rank} did not answer"))
                reply = connection.recv()
                if reply[0] == "error":   # kept for the failure's description
                    self._rank_errors[rank] = reply[2].strip().splitlines()[-1]
                if reply[0] != "report":
                    raise self._fatal(RuntimeError(f"rank {rank} answered {reply[0]!r}"))
                states.append(reply[2])
        return states

    def lora_state(self) -> dict:
        """Rank 0's side of what report() returns: the adapters in its CPU cache and its slots."""
        return self._mirror.state() if self._mirror is not None else {}

    def shutdown(self) -> None:
        """Stop the other ranks (idempotent); later calls raise TensorParallelError."""
        if self._failure is None:
            self._failure = "the engine was shut down"
        self._finalizer()
        if self.tp is not None:
            self.tp.abort()   # releases the communicator (NCCL) now rather than at collection

    # ---- failures ------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        self._check_alive()
        try:
            self._channel.send(message)
        except OSError as exc:
            raise self._fatal(exc) from exc

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(self._error_message())

    def _error_message(self) -> str:
        return (f"tensor parallelism ({self.size} ranks): {self._failure}; the engine cannot continue, "
                f"restart it")

    def _fail(self, reason: str) -> None:
        """Record the first failure and unblock rank 0 if it waits in a collective."""
        if self._failure is not None:
            return
        self._failure = reason
        logger.error("tensor parallelism: %s", reason)
        if self.device.type == "cuda" and self.tp is not None:
            self.tp.abort()   # NCCL waits forever on a lost peer (gloo fails by itself)

    def _fatal(self, exc: BaseException, step_seconds: float = 0.0) -> TensorParallelError:
        """The group is broken (a step failed after the other ranks got it, or a pipe broke):
        record why, stop the other ranks (they may wait in a collective forever)."""
        if self._failure is None:
            timeout_s = self.config.distributed_timeout_seconds
            self._fail(self._rank_failure() or (
                self._timeout_message() if step_seconds >= timeout_s else
                f"rank 0 failed in a step ({type(exc).__name__}: {exc})"))
        self._kill_ranks()
        self._finalizer()
        return TensorParallelError(self._error_message())

    def _kill_ranks(self) -> None:
        """Ranks that may wait in a collective do not read a stop message: kill them."""
        for process in self._processes:
            if process.is_alive():
                process.kill()

    def _timeout_message(self) -> str:
        return (f"a step did not finish within distributed_timeout_seconds="
                f"{self.config.distributed_timeout_seconds:g} (a rank hangs)")

    def _rank_failure(self, wait_s: float = 2.0) -> str | None:
        """The first other rank that exited with an error or reported one, described; None if all
        look fine after wait_s (a rank that failed may still be exiting)."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank in range(1, self.size):
                error = self._rank_error(rank)
                if error is not None or self._processes[rank - 1].exitcode not in (None, 0):
                    return self._describe_rank(rank, error)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _describe_rank(self, rank: int, error: str | None = None) -> str:
        process = self._processes[rank - 1]
        deadline = time.monotonic() + 1.0
        # Polled, not one join: when another thread reaps the process at the same moment, our
        # join can return before that thread has stored the exit code.
        while process.exitcode is None and time.monotonic() < deadline:
            process.join(0.05)
        code = process.exitcode
        if code is None:
            how = "failed"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with status {code}"
        error = error or self._rank_error(rank)
        return f"rank {rank} (pid {process.pid}) {how}" + (f": {error}" if error else "")

    def _rank_error(self, rank: int) -> str | None:
        """The last line of the traceback a failed rank sent before it exited, if it sent one."""
        connection = self._channel.connections[rank - 1]
        with self._recv_lock:
            try:
                while rank not in self._rank_errors and not connection.closed and connection.poll(0):
                    message = connection.recv()
                    if message[0] == "error":
                        self._rank_errors[rank] = message[2].strip().splitlines()[-1]
            except (OSError, EOFError):
                pass
            return self._rank_errors.get(rank)

    def _wait_for(self, kind: str, timeout_s: float) -> None:
        """Wait until every other rank has sent `kind` ("started", "ready"); fail fast if one dies."""
        waiting = dict(enumerate(self._channel.connections, start=1))
        deadline = time.monotonic() + timeout_s
        while waiting:
            sentinels = {self._processes[rank - 1].sentinel: rank for rank in waiting}
            left = deadline - time.monotonic()
            ready = multiprocessing.connection.wait([*waiting.values(), *sentinels], timeout=max(left, 0))
            if not ready:
                raise TensorParallelError(f"rank(s) {sorted(waiting)} did not report {kind!r} within {timeout_s:g} s")
            for rank, connection in list(waiting.items()):
                if connection in ready and connection.poll(0):
                    message = connection.recv()
                    if message[0] == "error":
                        raise TensorParallelError(f"rank {rank} failed: {message[2].strip().splitlines()[-1]}")
                    if message[0] == kind:
                        del waiting[rank]
            for sentinel, rank in sentinels.items():
                if sentinel in ready and rank in waiting:
                    raise TensorParallelError(self._describe_rank(rank))

    def _watch(self) -> None:
        """The watchdog: a rank's process exiting, or a step past the timeout, breaks the group."""
        sentinels = {process.sentinel: rank for rank, process in enumerate(self._processes, start=1)}
        timeout_s = self.config.distributed_timeout_seconds
        while not self._stopping.is_set() and self._failure is None:
            ready = multiprocessing.connection.wait(list(sentinels), timeout=min(1.0, timeout_s / 4))
            if self._stopping.is_set():
                return
            if ready:
                self._fail(self._describe_rank(sentinels[ready[0]]))
                return
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout_s:
                self._fail(self._timeout_message())
                return


def _stop_ranks(processes, connections, stopping: threading.Event) -> None:
    """Ask the other ranks to stop, then make sure they have (killed after STOP_TIMEOUT_S)."""
    stopping.set()
    payload = pickle.dumps(("stop",))
    for connection in connections:
        try:
            connection.send_bytes(payload)
        except OSError:
            pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for connection in connections:
        connection.close()
