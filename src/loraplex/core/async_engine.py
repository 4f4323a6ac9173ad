"""AsyncEngine: the engine for asyncio code (the server), many requests in flight.

It is the engine's client: it validates and tokenizes requests (InputProcessor) in the
caller's thread, sends them to an engine loop (engine_loop.py) and turns the loop's
token ids into streamed outputs (OutputProcessor). The loop runs either

- in a thread of this process, over an LLMEngine's core: `AsyncEngine(llm_engine)`,
  or `AsyncEngine.from_config(config)`;
- in its own process: `AsyncEngine.from_config(config, engine_process=True)`, what
  `loraplex serve` runs, so the HTTP server's event loop and the engine's step loop
  never share an interpreter (engine_process.py).

Both talk to the client through the same messages; nothing else differs. The client
never touches engine state: requests, aborts, stop notices and LoRA calls are messages.

Multimodal requests are preprocessed here too (images decoded and resized, audio turned
into features), in a worker thread so the event loop never waits for it; their tensors
travel to the engine with the request.

Adapters by name (`generate(lora_name=...)`): the name is looked up in the engine, and one
it does not know goes through LoRAResolution (core/lora/resolution.py), the one code path
the server's backend uses too, which loads it with add_lora. This works the same whether the
loop runs in a thread or in the engine process.

Threads of the client: the callers' (event loops) submit; one output thread,
`loraplex-outputs`, reads the loop's messages, detokenizes, checks stop strings, and
hands each output to the asyncio.Queue of its request on the loop that submitted it
(loop.call_soon_threadsafe, once per loop per step). Leaving `async for` early (break,
task cancellation, client disconnect) aborts the request, which frees its KV blocks
before the next step.

Request ids: the engine core knows each request by a fresh internal id, so an id can be
reused as soon as its request ended here, even while the core, a step behind (overlapped
scheduling), still reports tokens of the old one: those are dropped.

If the engine loop dies (a step raised, or the engine process exited), every in-flight
consumer gets EngineDeadError (the original error as its cause), pending calls fail, and
later calls raise it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.core.config import EngineConfig
from loraplex.core.engine_loop import (
    Abort, AddRequest, Call, CallResult, EngineStopped, Shutdown, Stats, StepOutputs, StopSequences, ThreadHandle,
    core_stats)
from loraplex.core.input_processor import InputProcessor, multimodal_processor
from loraplex.core.llm_engine import LLMEngine
from loraplex.core.lora.resolution import LoRAResolution
from loraplex.core.output_processor import OutputProcessor
from loraplex.core.outputs import RequestOutput
from loraplex.core.sampling_params import RequestOutputKind, SamplingParams
from loraplex.core.tokenizer import load_tokenizer
from loraplex.errors import EngineDeadError, InvalidRequestError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.chain import ResolverChain

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    request_id: str                      # the caller's id (the core's is internal)
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine | None = None, resolver_chain=None, *, handle=None,
                 tokenizer=None, mm_processor=None) -> None:
        """Over an LLMEngine: its loop runs in a thread here. (from_config(engine_process=True)
        passes a process handle, the tokenizer and a multimodal model's processor instead.)
        resolver_chain finds adapters named by `generate(lora_name=...)`; None: the registered
        resolvers (ResolverChain.from_registry()), built on first use."""
        self.engine = engine                 # the in-process LLMEngine, None with an engine process
        if handle is None:
            handle = ThreadHandle(engine)
            tokenizer, mm_processor = engine.tokenizer, engine.mm_processor
        self._handle = handle
        self.tokenizer = tokenizer
        self._inputs = InputProcessor(handle.limits, tokenizer, mm_processor)
        self._outputs = OutputProcessor(tokenizer)
        self._lora_resolution = None
        if handle.limits.enable_lora:
            self._lora_resolution = LoRAResolution(
                load=self.add_lora, base_model_name=handle.limits.model,
                chain_factory=(lambda: resolver_chain) if resolver_chain is not None else ResolverChain.from_registry)
        self._lock = threading.Lock()        # guards everything below, and the output processor
        self._streams: dict[str, _Stream] = {}           # core id -> stream
        self._core_ids: dict[str, str] = {}              # caller's request id -> core id
        self._calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._ids = itertools.count()
        self._stats: dict[str, float] = core_stats(engine.core) if engine is not None else {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._reader = threading.Thread(target=self._read, name="loraplex-outputs", daemon=True)
        self._reader.start()

    @classmethod
    def from_config(cls, config: EngineConfig, *, engine_process: bool = False,
                    served_model_names=(), log_level: str = "INFO") -> AsyncEngine:
        """An engine for `config`: its loop in a thread here, or in its own process."""
        if not engine_process:
            engine = LLMEngine(config)
            if engine.lora_manager is not None and served_model_names:
                engine.lora_manager.add_served_names(served_model_names)
            return cls(engine)
        from loraplex.core.engine_process import ProcessHandle
        from loraplex.core.model_config import ModelConfig
        tokenizer = load_tokenizer(config.model)
        handle = ProcessHandle(config, served_model_names, log_level)
        try:
            mm_processor = multimodal_processor(config, ModelConfig.from_dir(config.model),
                                                handle.limits.max_model_len, tokenizer)
        except BaseException:
            handle.send(Shutdown())
            handle.close(10)
            raise
        return cls(handle=handle, tokenizer=tokenizer, mm_processor=mm_processor)

    @property
    def max_model_len(self) -> int:
        return self._handle.limits.max_model_len

    @property
    def info(self) -> dict:
        """Facts for logs: dtype, device, max_model_len, KV-cache blocks and block size."""
        if self.engine is not None:
            from loraplex.core.engine_process import engine_info
            return engine_info(self.engine.core)
        return dict(self._handle.info)

    @property
    def engine_pid(self) -> int | None:
        """The engine process's id (None when the engine runs in this process)."""
        return getattr(self._handle, "pid", None)

    def get_tokenizer(self):
        return self.tokenizer

    @property
    def mm_processor(self):
        """A multimodal model's MultimodalProcessor (what the server renders chat media with), else None."""
        return self._inputs.mm_processor

    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._stopping and self._handle.is_alive()

    def engine_stats(self) -> dict[str, float]:
        """The engine's latest counters (engine_loop.core_stats; sent at most every 0.1 s and when idle)."""
        return dict(self._stats)

    # ---- caller side (event loop) ------------------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None,
                       lora_request: LoRARequest | None = None,
                       lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs; the last one has finished=True. Each holds what
        SamplingParams.output_kind says (cumulative by default); outputs that waited for a consumer
        that fell behind come as one.

        An adapter is given either as a LoRARequest or by name (`lora_name`): a name that is
        not loaded is looked up through the resolver chain and loaded first. A LoRARequest that
        is not loaded is loaded by the engine before the request runs (other requests go on
        meanwhile); if it cannot be, the error is raised here.

        Leaving the iteration early (break, cancellation of the consuming task)
        aborts the request and frees its KV-cache blocks.
        """
        self._check_alive()
        if lora_name is not None:
            if lora_request is not None:
                raise InvalidRequestError("pass lora_request or lora_name, not both")
            lora_request = await self.get_lora_request(lora_name)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            # Decoding and preprocessing images or audio takes milliseconds: not on the event loop.
            request = await asyncio.to_thread(self._inputs.process, request_id, prompt, sampling_params,
                                              lora_request)
        else:
            request = self._inputs.process(request_id, prompt, sampling_params, lora_request)
        stream = _Stream(request_id, asyncio.get_running_loop(), asyncio.Queue())
        core_id = f"{request_id}#{next(self._ids)}"
        request.request_id = core_id
        with self._lock:
            self._check_alive()
            if request_id in self._core_ids:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._core_ids[request_id] = core_id
            self._streams[core_id] = stream
            self._outputs.add_request(request)
        self._send(AddRequest(request))
        aggregate = request.sampling_params.output_kind == RequestOutputKind.DELTA
        finished = False
        error = None
        try:
            while True:
                item = error or await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                # A consumer that fell behind gets the outputs waiting for it as one (as vLLM's
                # do): under load the server then streams fewer, larger chunks, not falling further back.
                while not item.finished and not stream.queue.empty():
                    later = stream.queue.get_nowait()
                    if isinstance(later, BaseException):
                        error = later
                        break
                    item.add(later, aggregate)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._request_abort(request_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a last output with finish_reason "abort"."""
        self._request_abort(request_id)

    def _request_abort(self, request_id: str) -> None:
        with self._lock:
            core_id = self._core_ids.pop(request_id, None)
            if core_id is None:
                return
            stream = self._streams.pop(core_id, None)
            output = self._outputs.abort(core_id)
        if output is not None and stream is not None:
            output.request_id = request_id
            self._put(stream, output)
        if self._dead is None and not self._stopping:
            self._send(Abort([core_id]))

    # ---- LoRA adapters

    async def get_lora_request(self, lora_name: str) -> LoRARequest:
        """The loaded adapter `lora_name`, resolved and loaded on first use (single flight)."""
        if self._lora_resolution is None:
            raise InvalidRequestError(f"request names LoRA adapter {lora_name!r} but LoRA is not "
                                      f"enabled; start the engine with enable_lora=True")
        request = await self._call("find_lora", lora_name)
        if request is None:
            request = await self._lora_resolution.resolve(lora_name)
        return request

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter (on the engine's loader threads, beside the steps)."""
        return await self._call("add_lora", lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call("remove_lora", lora_int_id)

    async def replace_lora(self, old_lora_int_id: int, lora_request: LoRARequest) -> bool:
        """Load a new version of an adapter under its own id (on the engine's loader threads);
        requests already using the old id finish on its weights (LoRAManager.replace_lora)."""
        return await self._call("replace_lora", old_lora_int_id, lora_request)

    async def pin_lora(self, lora_int_id: int) -> bool:
        return await self._call("pin_lora", lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self._call("list_loras")

    async def _call(self, method: str, *args):
        """Run an EngineCore method in the engine loop, between two steps, and return its result."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            self._check_alive()
            call_id = next(self._ids)
            self._calls[call_id] = (loop, future)
        self._send(Call(call_id, method, args))
        return await future

    def _send(self, message) -> None:
        try:
            self._handle.send(message)
        except EngineDeadError as exc:
            self._die(exc)
            raise

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead!r}; restart it")
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine loop and wait for it; unfinished consumers get EngineDeadError.
        After the engine died by itself, this only waits for the loop and the output thread."""
        with self._lock:
            already_stopping, self._stopping = self._stopping, True
        if not already_stopping and self._dead is None and self._handle.is_alive():
            try:
                self._handle.send(Shutdown())
            except EngineDeadError:
                pass
        self._handle.close(timeout)
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)

    # ---- output thread -------------------------------------------------------------------

    def _read(self) -> None:
        while True:
            message = self._handle.recv()
            if isinstance(message, StepOutputs):
                self._on_step(message)
            elif isinstance(message, Stats):
                self._stats = message.stats
            elif isinstance(message, CallResult):
                self._on_call_result(message)
            elif isinstance(message, EngineStopped):
                self._die(message.error)
                return
            else:
                logger.error("unexpected message from the engine: %r", message)

    def _on_step(self, message: StepOutputs) -> None:
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        with self._lock:
            outputs, stopped = self._outputs.process(message.outputs)
            for core_id, error in message.failed:
                self._outputs.drop(core_id)
                stream = self._streams.pop(core_id, None)
                if stream is not None:
                    self._core_ids.pop(stream.request_id, None)
                    deliveries.setdefault(stream.loop, []).append((stream.queue, error))
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                    self._core_ids.pop(stream.request_id, None)
                output.request_id = stream.request_id
                deliveries.setdefault(stream.loop, []).append((stream.queue, output))
        if stopped:
            # Before the outputs go out: the core hears of the stop before any later request.
            try:
                self._handle.send(StopSequences(stopped))
            except EngineDeadError:
                pass
        for loop, items in deliveries.items():
            self._deliver(loop, items)

    def _on_call_result(self, result: CallResult) -> None:
        with self._lock:
            entry = self._calls.pop(result.call_id, None)
        if entry is not None:
            self._settle(*entry, result.value, failed=not result.ok)

    def _die(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._dead is None:
                self._dead = error
            self._stopping = True
            streams, self._streams = self._streams, {}
            self._core_ids.clear()
            calls, self._calls = self._calls, {}
        dead = EngineDeadError(f"the engine stopped: {error!r}" if error is not None else "the engine was shut down")
        if error is not None:
            dead.__cause__ = error
            logger.error("the engine stopped: %r; failing %d in-flight request(s)", error, len(streams))
        deliveries: dict[asyncio.AbstractEventLoop, list] = {}
        for stream in streams.values():
            deliveries.setdefault(stream.loop, []).append((stream.queue, dead))
        for loop, items in deliveries.items():
            self._deliver(loop, items)
        for loop, future in calls.values():
            self._settle(loop, future, dead, failed=True)

    @staticmethod
    def _deliver(loop: asyncio.AbstractEventLoop, items: list) -> None:
        def put_all():
            for q, item in items:
                q.put_nowait(item)
        try:
            loop.call_soon_threadsafe(put_all)
        except RuntimeError:
            pass  # the consumers' loop is closed: nobody is listening any more

    def _put(self, stream: _Stream, item) -> None:
        self._deliver(stream.loop, [(stream.queue, item)])

    @staticmethod
    def _settle(loop, future, value, failed: bool) -> None:
        def settle():
            if not future.done():
                future.set_exception(value) if failed else future.set_result(value)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the caller's loop is closed
