"""The engine loop in its own process (what `loraplex serve` runs), and the handle its client holds.

The API server process tokenizes, detokenizes and serves HTTP; the engine process only
schedules, runs the model and samples (EngineLoop over an EngineCore), so neither waits
for the other's interpreter. They talk over one multiprocessing Pipe (a socket pair),
each message one pickle (protocol 5): benchmarks/bench_ipc.py measured it against pyzmq
with pickle or msgspec, and it had the lowest round trip (28 us against 80-95) and
decode cost in the same range (24 us per 64-sequence step message against 20-32), with
no new dependency (docs/performance.md, "Engine process").

Start-up: the child builds the engine and answers Ready (the limits requests are
validated against, and facts for the start-up log) or StartupFailed with the error,
which the parent raises. Then it runs the loop; a reader thread moves incoming messages
into the loop's inbox, so the pipe never fills while a step runs.

Lifetime: the child ignores SIGINT and SIGTERM (a Ctrl-C reaches the whole process group;
the API server drains in-flight requests first, then sends Shutdown). When the parent
goes away the pipe closes and the child stops. When the child dies, the parent's reads
end and the client fails every request in flight (EngineDeadError: HTTP 503).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
from typing import Any, NamedTuple

from loraplex.core.config import EngineConfig
from loraplex.core.engine_loop import (EngineLoop, EngineStopped, Shutdown, adapter_loader_threads,
                                       loader_torch_threads)
from loraplex.core.gc_heap import freeze_startup_heap
from loraplex.core.input_processor import EngineLimits
from loraplex.errors import EngineDeadError
from loraplex.logs import configure_logging

logger = logging.getLogger(__name__)


class Ready(NamedTuple):
    limits: EngineLimits
    info: dict[str, Any]                 # dtype, device, KV-cache blocks: for the start-up log


class StartupFailed(NamedTuple):
    error: BaseException


def _dumps(message) -> bytes:
    try:
        return pickle.dumps(message, protocol=5)
    except Exception as exc:  # noqa: BLE001 - an unpicklable error still has to reach the client
        if isinstance(message, (EngineStopped, StartupFailed)) and message.error is not None:
            return pickle.dumps(type(message)(RuntimeError(repr(message.error))), protocol=5)
        raise TypeError(f"engine message {type(message).__name__} cannot be pickled: {exc}") from exc


def engine_info(core) -> dict[str, Any]:
    runner = core.runner
    return {"dtype": str(getattr(runner, "dtype", "")), "device": str(core.device),
            "max_model_len": core.max_model_len, "num_kv_blocks": core.block_manager.num_blocks,
            "block_size": core.block_manager.block_size, "async_scheduling": core.async_scheduling}


def build_core(config: EngineConfig, served_model_names: tuple[str, ...] = ()):
    """The EngineCore `loraplex serve` runs (EOS from the tokenizer when the checkpoint names none)."""
    from loraplex.core.engine_core import EngineCore
    from loraplex.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(config.model)
    core = EngineCore(config, fallback_eos_token_id=tokenizer.eos_token_id if tokenizer is not None else None)
    if core.lora_manager is not None and served_model_names:
        core.lora_manager.add_served_names(served_model_names)   # adapters may name the base by a served name
    return core


def run_engine_process(config: EngineConfig, served_model_names: tuple[str, ...], conn, log_level: str) -> None:
    """The engine process's main function."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging()
    logging.getLogger("loraplex").setLevel(log_level)
    send_lock = threading.Lock()

    def send(message) -> None:
        data = _dumps(message)
        with send_lock:
            conn.send_bytes(data)

    try:
        core = build_core(config, served_model_names)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it
        send(StartupFailed(exc))
        return
    loop = EngineLoop(core, send)
    loop.reserve_host_buffers()              # part of starting: Ready means adapters find them
    freeze_startup_heap("engine process")
    send(Ready(core.limits, engine_info(core)))

    def read() -> None:
        try:
            while True:
                loop.inbox.put(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            loop.inbox.put(Shutdown())       # the parent is gone

    threading.Thread(target=read, name="loraplex-engine-inbox", daemon=True).start()
    try:
        loop.run()
    except (BrokenPipeError, OSError):
        pass                                 # the parent went away while we were sending
    finally:
        # Tensor parallelism's other ranks ignore SIGTERM (rank 0 says when they stop), and
        # this process's exit waits for its children: stop them first.
        stop_ranks = getattr(core.runner, "shutdown", None)
        if stop_ranks is not None:
            stop_ranks()


def engine_torch_threads(config: EngineConfig) -> int | None:
    """OMP_NUM_THREADS for an engine process whose model runs on a GPU, unless the user set it:
    a share of the cores (engine_loop.loader_torch_threads). It must be in the process's
    environment before torch starts its thread pools: torch.set_num_threads in the started
    process did not do the same (a burst of 32 new adapters on an H100 host: launching a step
    still took up to 147 ms, first tokens p50 692 ms, against no step over 100 ms and 453 ms
    with the variable set; docs/performance.md)."""
    if "OMP_NUM_THREADS" in os.environ or not _gpu_serves(config):
        return None
    return loader_torch_threads(len(os.sched_getaffinity(0)))


def _gpu_serves(config: EngineConfig) -> bool:
    """Whether the engine will run on an NVIDIA GPU, told without importing torch here (the API
    process does not load it): device "cuda", or none named and a GPU's device file visible."""
    device = (config.device or "").split(":")[0]
    if device:
        return device == "cuda"
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return any(name[len("nvidia"):].isdigit() for name in os.listdir("/dev") if name.startswith("nvidia"))


@contextlib.contextmanager
def _engine_environment(threads: int | None):
    """os.environ as the spawned engine process starts with it (spawn copies it at start)."""
    if threads is None:
        yield
        return
    logger.info("engine process: OMP_NUM_THREADS=%d (a GPU runs the model; the adapter loaders' CPU work "
                "shares the cores; set OMP_NUM_THREADS to choose)", threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        del os.environ["OMP_NUM_THREADS"]


class ProcessHandle:
    """The parent's end: start the engine process, send it messages, receive its replies."""

    def __init__(self, config: EngineConfig, served_model_names=(), log_level: str = "INFO") -> None:
        adapter_loader_threads()             # a bad LORAPLEX_ADAPTER_LOADER_THREADS stops us here, not the engine
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=True)
        # Not daemonic, so the engine may start processes of its own; atexit stops it instead.
        self.process = ctx.Process(target=run_engine_process, name="loraplex-engine",
                                   args=(config, tuple(served_model_names), child_conn, log_level.upper()))
        with _engine_environment(engine_torch_threads(config)):
            self.process.start()
        child_conn.close()                   # so that the child's death ends our reads
        self._send_lock = threading.Lock()
        self._closed = False
        atexit.register(self.close, 5.0)
        reply = self._recv_startup()
        self.limits, self.info = reply.limits, reply.info
        logger.info("engine process %d is ready", self.process.pid)

    def _recv_startup(self) -> Ready:
        try:
            reply = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(10)
            raise EngineDeadError(f"the engine process exited during start-up (exit code "
                                  f"{self.process.exitcode}); see the log above") from None
        if isinstance(reply, StartupFailed):
            self.close(10)
            raise reply.error
        return reply

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message) -> None:
        data = pickle.dumps(message, protocol=5)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (BrokenPipeError, OSError) as exc:
            raise EngineDeadError("the engine process is gone; restart the server") from exc

    def recv(self):
        """The next message; EngineStopped with an error when the process died."""
        try:
            return pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self.process.join(5)
            code = self.process.exitcode
            return EngineStopped(EngineDeadError(
                f"the engine process exited unexpectedly (exit code {code}); see the server log"))

    def close(self, timeout: float | None = 30.0) -> None:
        """Wait for the process to end (after Shutdown), then make sure it has."""
        if self._closed:
            return
        self._closed = True
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("engine process %d did not stop in time; terminating it", self.process.pid)
            self.process.terminate()
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
        self._conn.close()
