"""EngineLoop: an EngineCore stepping in a busy loop, talking to its client only through messages.

The same loop runs in a thread of the caller's process (ThreadHandle, below: AsyncEngine
over an LLMEngine) or alone in the engine process (`loraplex serve`, engine_process.py); only the transport
differs. The client sends requests, aborts, stop notices and calls into the loop's
inbox; the loop sends back one StepOutputs per step, call results, stats, and a last
EngineStopped.

Between two steps the loop takes everything in its inbox; while the engine has work it
never waits for messages, and while it has none it sleeps until one arrives. Requests
for an adapter that is not loaded wait in the loop (not in the scheduler) while a loader
thread reads it; one load per adapter, however many requests ask for it, and requests of
other adapters and the base model go on meanwhile. Slow calls (add_lora, replace_lora)
also run on the loader threads; the others (remove, pin, list) run between two steps.

Many new adapters at once (a burst of first requests): the loader pool's threads read,
validate and pack several adapters at the same time (LoRAManager loads outside its locks;
reading and copying tensors release the GIL) into host buffers reserved, faulted in and
page-locked, before the loop started (LoRAManager.host_buffer_reservations), and each adapter's
requests join the running batch as soon as that adapter is loaded, not when the whole
burst is.

If a step raises, the loop sends EngineStopped with the error and ends: the engine is
dead, and the client fails everything in flight.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, NamedTuple

from loraplex.core.engine_core import EngineCore
from loraplex.core.llm_engine import LLMEngine
from loraplex.core.output_processor import SeqOutput
from loraplex.core.request import Request
from loraplex.core.step_times import log_if_slow
from loraplex.errors import ConfigError, InvalidRequestError

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1           # the loop sends stats at most this often while busy


# Threads loading adapters. Four, whatever the host: each load's Python part (headers, names,
# shapes) holds the GIL the step loop needs, and on a 16-core H100 host 16 loaders starved it
# (32 adapters at once: a stand-in step waited up to 745-775 ms, with page-locking or without)
# while finishing no sooner: 4 loaders took 708 ms against 806, finished one by one (the first
# at 109 ms, the median at 406) rather than together, and the step waited at most 61 ms
# (benchmarks/bench_cpu_lora_load.py --device cuda --burst 32). Loads also wait on the disk,
# so a 2-core host still gets four. LORAPLEX_ADAPTER_LOADER_THREADS sets another count.
ADAPTER_LOADER_THREADS = 4
LOADER_THREADS_ENV = "LORAPLEX_ADAPTER_LOADER_THREADS"


def adapter_loader_threads() -> int:
    """The engine's adapter loader threads: ADAPTER_LOADER_THREADS, or LORAPLEX_ADAPTER_LOADER_THREADS."""
    text = os.environ.get(LOADER_THREADS_ENV, "").strip()
    if not text:
        return ADAPTER_LOADER_THREADS
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{LOADER_THREADS_ENV}={text!r}: give a whole number of threads, at least 1 "
                         f"(or unset it for {ADAPTER_LOADER_THREADS})")
    return int(text)


def loader_torch_threads(num_cores: int) -> int:
    """torch's intra-op threads for an engine whose model runs on a GPU, where the process's big
    CPU ops are the loaders' (scaling and checking 80 MiB adapters): a share of the cores each,
    leaving one to the step loop. With torch's default (a thread per core for every op) four
    loaders ran 64 threads on a 16-core H100 host, and a burst's steps launched in 200 ms
    instead of 10: 32 new adapters' first tokens came at p50 641 ms, last 717, against 453
    and 529 with 3 threads (OMP_NUM_THREADS=3; benchmarks/gpu_serve.py --only burst,
    docs/performance.md). engine_process.py sets it for the engine process."""
    return max(1, num_cores // (adapter_loader_threads() + 1))


# ---- client -> loop -----------------------------------------------------------------------

class AddRequest(NamedTuple):
    request: Request


class Abort(NamedTuple):
    request_ids: list[str]


class StopSequences(NamedTuple):
    stopped: list[tuple[str, int]]       # (request_id, sample index) that stop strings ended


class Call(NamedTuple):
    call_id: int
    method: str                          # an EngineCore method named in CALLS
    args: tuple


class Shutdown(NamedTuple):
    pass


# ---- loop -> client -----------------------------------------------------------------------

class StepOutputs(NamedTuple):
    outputs: list[SeqOutput]
    failed: list[tuple[str, BaseException]]   # requests dropped with an error


class CallResult(NamedTuple):
    call_id: int
    ok: bool
    value: Any                           # the result, or the exception


class Stats(NamedTuple):
    stats: dict[str, float]


class EngineStopped(NamedTuple):
    error: BaseException | None          # None: shut down as asked


# ---- inside the loop ----------------------------------------------------------------------

class _AdapterLoaded(NamedTuple):
    lora_int_id: int
    error: BaseException | None


class _CallDone(NamedTuple):
    result: CallResult


CALLS = frozenset({"add_lora", "replace_lora", "remove_lora", "pin_lora", "list_loras", "find_lora"})
_SLOW_CALLS = frozenset({"add_lora", "replace_lora"})


class Inbox:
    """Messages for the loop, from any thread."""

    def __init__(self) -> None:
        self._items: deque = deque()
        self._ready = threading.Condition()

    def put(self, item) -> None:
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    def take_all(self, wait: bool) -> list:
        with self._ready:
            while wait and not self._items:
                self._ready.wait()
            items = list(self._items)
            self._items.clear()
        return items


def core_stats(core: EngineCore, loading: Iterable[str] = ()) -> dict[str, float | str]:
    """The engine's counters as one flat dict (the server exports them under /metrics), and the
    adapters of its running and waiting requests (comma-separated names: vLLM's lora_requests_info);
    `loading`: adapters that requests wait for outside the scheduler (being read)."""
    stats: dict[str, float] = dataclasses.asdict(core.get_stats())
    # Prompt tokens looked up in the prefix cache and found there (vLLM's prefix_cache_queries / _hits).
    stats["prefix_cache_queries_total"] = core.block_manager.num_prefix_queries
    stats["prefix_cache_hits_total"] = core.block_manager.num_prefix_hits
    manager = core.lora_manager
    if manager is not None:
        on_cpu = manager.list_loras()
        stats["lora_adapters_cpu"] = len(on_cpu)
        stats["lora_adapters_device"] = sum(manager.slot_of(i) is not None for i in on_cpu)
        stats["lora_adapters_pinned"] = sum(manager.is_pinned(i) for i in on_cpu)
        for key, value in dict(manager.stats).items():       # cache counters: cpu_hits, loads, ...
            stats[f"lora_{key}_total"] = value
        stats["lora_max_loras"] = core.config.max_loras
        for kind, extra in (("running", ()), ("waiting", loading)):
            names = {seq.lora_request.lora_name for seq in getattr(core.scheduler, kind) if seq.lora_request}
            stats[f"lora_{kind}_adapters"] = ",".join(sorted(names.union(extra)))
    return stats


class EngineLoop:
    def __init__(self, core: EngineCore, send: Callable[[Any], None]) -> None:
        self.core = core
        self.send = send
        self.inbox = Inbox()
        self._loader: ThreadPoolExecutor | None = None
        self._loader_threads = adapter_loader_threads()
        self._waiting_for_adapter: dict[int, list[Request]] = {}   # lora_int_id -> requests
        self._stopping = False
        self._last_stats = 0.0
        self._stats_sent_idle = False

    def run(self) -> None:
        """Step until Shutdown; the last message sent is EngineStopped."""
        error = None
        try:
            while not self._stopping:
                busy = self.core.has_unfinished_requests()
                for message in self.inbox.take_all(wait=not busy):
                    self._handle(message)
                if self._stopping:
                    break
                if self.core.has_unfinished_requests():
                    outputs = self.core.step()
                    failed = self.core.pop_failed_requests()
                    if outputs or failed:
                        self.send(StepOutputs(outputs, failed))
                    log_if_slow(self.core.last_step)
                self._maybe_send_stats()
        except BaseException as exc:  # noqa: BLE001 - the client must hear about it
            logger.exception("engine step failed; failing all in-flight requests")
            error = exc
        finally:
            if self._loader is not None:
                self._loader.shutdown(wait=False, cancel_futures=True)
        self.send(EngineStopped(error))

    def reserve_host_buffers(self) -> None:
        """Reserve the adapters' host buffers (LoRAManager.host_buffer_reservations) on the loader
        threads, and wait for them: whoever starts the loop calls this first, so that adapters
        requested at once find them ready."""
        if self.core.lora_manager is None:
            return
        list(self._loader_pool().map(lambda reserve: reserve(), self.core.lora_manager.host_buffer_reservations()))

    def _maybe_send_stats(self) -> None:
        idle = not self.core.has_unfinished_requests()
        now = time.monotonic()
        if (idle and not self._stats_sent_idle) or now - self._last_stats >= STATS_INTERVAL_S:
            loading = {r.lora_request.lora_name for rs in self._waiting_for_adapter.values() for r in rs}
            self.send(Stats(core_stats(self.core, loading)))
            self._last_stats = now
            self._stats_sent_idle = idle
        elif not idle:
            self._stats_sent_idle = False

    # ---- messages ------------------------------------------------------------------------

    def _handle(self, message) -> None:
        if isinstance(message, AddRequest):
            self._add(message.request)
        elif isinstance(message, Abort):
            self.core.abort_requests(message.request_ids)
            for waiting in self._waiting_for_adapter.values():
                waiting[:] = [r for r in waiting if r.request_id not in message.request_ids]
        elif isinstance(message, StopSequences):
            self.core.stop_sequences(message.stopped)
        elif isinstance(message, Call):
            self._call(message)
        elif isinstance(message, _AdapterLoaded):
            self._adapter_loaded(message)
        elif isinstance(message, _CallDone):
            self.send(message.result)
        elif isinstance(message, Shutdown):
            self._stopping = True
        else:
            raise TypeError(f"unknown engine message {message!r}")

    def _add(self, request: Request) -> None:
        lora = request.lora_request
        manager = self.core.lora_manager
        try:
            # load_inplace asks for the files to be read again (is_loaded would refuse a new path).
            if lora is not None and manager is not None and (lora.load_inplace or not manager.is_loaded(lora)):
                waiting = self._waiting_for_adapter.setdefault(lora.lora_int_id, [])
                waiting.append(request)
                if len(waiting) == 1:
                    self._load_adapter(lora)
                return
        except Exception as exc:  # noqa: BLE001 - the request's caller gets it
            self.send(StepOutputs([], [(request.request_id, exc)]))
            return
        self._admit(request)

    def _admit(self, request: Request) -> None:
        """Queue a request whose adapter (if any) is loaded."""
        lora = request.lora_request
        manager = self.core.lora_manager
        try:
            if lora is not None and manager is not None:
                manager.check_servable(lora.lora_int_id)
            self.core.add_request(request)
        except Exception as exc:  # noqa: BLE001 - the request's caller gets it
            self.send(StepOutputs([], [(request.request_id, exc)]))

    def _load_adapter(self, lora) -> None:
        def load() -> None:
            try:
                self.core.lora_manager.add_lora(lora)
                error = None
            except Exception as exc:  # noqa: BLE001 - its requests fail with it
                error = exc
            self.inbox.put(_AdapterLoaded(lora.lora_int_id, error))
        self._loader_pool().submit(load)

    def _adapter_loaded(self, message: _AdapterLoaded) -> None:
        for request in self._waiting_for_adapter.pop(message.lora_int_id, []):
            if message.error is not None:
                self.send(StepOutputs([], [(request.request_id, message.error)]))
            else:
                # Not _add: a request with load_inplace never counts as loaded, and would load again.
                self._admit(request)

    def _call(self, message: Call) -> None:
        if message.method not in CALLS:
            self.send(CallResult(message.call_id, False, InvalidRequestError(
                f"unknown engine call {message.method!r}")))
            return
        fn = getattr(self.core, message.method)

        def run() -> CallResult:
            try:
                return CallResult(message.call_id, True, fn(*message.args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                return CallResult(message.call_id, False, exc)

        if message.method in _SLOW_CALLS:
            # Reading an adapter from disk must not hold up the steps.
            self._loader_pool().submit(lambda: self.inbox.put(_CallDone(run())))
        else:
            self.send(run())

    def _loader_pool(self) -> ThreadPoolExecutor:
        if self._loader is None:
            self._loader = ThreadPoolExecutor(self._loader_threads, thread_name_prefix="loraplex-lora-load")
        return self._loader


class ThreadHandle:
    """The engine loop in a thread of this process."""

    def __init__(self, llm_engine: LLMEngine) -> None:
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self.loop = EngineLoop(llm_engine.core, self._outbox.put)
        self.limits, self.info = llm_engine.core.limits, {}
        self.loop.reserve_host_buffers()
        self.thread = threading.Thread(target=self.loop.run, name="loraplex-engine", daemon=True)
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def send(self, message) -> None:
        self.loop.inbox.put(message)

    def recv(self):
        return self._outbox.get()

    def close(self, timeout: float | None = 30.0) -> None:
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
