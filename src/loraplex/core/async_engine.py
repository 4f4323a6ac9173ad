"""AsyncEngine: LLMEngine for asyncio code (the server), many requests in flight.

Threading model: one dedicated engine thread owns the LLMEngine and runs
step() in a loop; the model never runs on the event loop. Callers on the
event loop talk to it through a thread-safe inbox (new requests, aborts) and a
condition variable that wakes it when idle. Each request has an asyncio.Queue
on the loop of the caller that submitted it; the engine thread puts outputs
there with loop.call_soon_threadsafe. Validation and tokenization happen in
the caller's thread (LLMEngine.process_request only reads immutable state), so
a bad request raises at generate() and never reaches the engine thread.

If step() raises, the engine is dead: every waiting consumer gets the error
(wrapped in EngineDeadError), and later generate() calls raise it at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.core.config import EngineConfig
from loraplex.core.llm_engine import LLMEngine
from loraplex.core.outputs import RequestOutput
from loraplex.core.sampling_params import SamplingParams
from loraplex.errors import EngineDeadError, InvalidRequestError
from loraplex.core.lora.resolution import LoRAResolution
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.chain import ResolverChain

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, resolver_chain: ResolverChain | None = None) -> None:
        """resolver_chain finds adapters named by `generate(lora_name=...)`; None: the
        registered resolvers (ResolverChain.from_registry()), built on first use."""
        self.engine = engine
        self._lora_resolution = None
        if engine.lora_manager is not None:
            # Loaded off the engine thread (the manager is thread-safe): steps go on meanwhile.
            self._lora_resolution = LoRAResolution(
                load=lambda request: asyncio.to_thread(engine.lora_manager.add_lora, request),
                base_model_name=engine.config.model,
                chain_factory=(lambda: resolver_chain) if resolver_chain is not None else ResolverChain.from_registry)
        self._streams: dict[str, _Stream] = {}
        self._new: list = []                 # processed Requests for the engine thread
        self._aborts: list[str] = []
        self._calls: list = []               # (fn, args, future, loop) to run between steps
        self._wakeup = threading.Condition()
        self._stopping = False
        self._dead: BaseException | None = None
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(LLMEngine(config))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    # ---- caller side (event loop) ------------------------------------------------------

    async def generate(self, prompt, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None,
                       lora_request: LoRARequest | None = None,
                       lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its cumulative outputs; the last one has finished=True.

        An adapter is given either as a LoRARequest or by name (`lora_name`): a name that is
        not loaded is looked up through the resolver chain and loaded first.

        Leaving the iteration early (break, cancellation of the consuming task)
        aborts the request and frees its KV-cache blocks.
        """
        self._check_alive()
        if lora_name is not None:
            if lora_request is not None:
                raise InvalidRequestError("pass lora_request or lora_name, not both")
            lora_request = await self.get_lora_request(lora_name)
        elif lora_request is not None and self._lora_resolution is not None:
            await self._ensure_loaded(lora_request)   # validated before it is queued
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if isinstance(prompt, dict) and prompt.get("multi_modal_data"):
            # Decoding and preprocessing images or audio takes milliseconds: not on the event loop.
            request = await asyncio.to_thread(self.engine.process_request, request_id, prompt, sampling_params,
                                              lora_request)
        else:
            request = self.engine.process_request(request_id, prompt, sampling_params, lora_request)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._wakeup:
            self._check_alive()
            if request_id in self._streams:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._new.append(request)
            self._wakeup.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._request_abort(request_id)

    # ---- LoRA adapters

    async def get_lora_request(self, lora_name: str) -> LoRARequest:
        """The loaded adapter `lora_name`, resolved and loaded on first use (single flight)."""
        if self._lora_resolution is None:
            raise InvalidRequestError(f"request names LoRA adapter {lora_name!r} but LoRA is not "
                                      f"enabled; start the engine with enable_lora=True")
        manager = self.engine.lora_manager
        request = manager.find_by_name(lora_name)
        if request is None:
            request = await self._lora_resolution.resolve(lora_name)
        manager.check_servable(request.lora_int_id)
        return request

    async def _ensure_loaded(self, request: LoRARequest) -> None:
        """Load and validate `request` unless the CPU cache or a slot holds it (the common case)."""
        manager = self.engine.lora_manager
        if not manager.is_loaded(request):
            await asyncio.to_thread(manager.add_lora, request)
        manager.check_servable(request.lora_int_id)

    async def abort(self, request_id: str) -> None:
        """Stop a request; its consumer gets a last output with finish_reason "abort"."""
        self._request_abort(request_id)

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter (runs on the engine thread, between steps)."""
        return await self._call_in_engine(self.engine.add_lora, lora_request)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._call_in_engine(self.engine.remove_lora, lora_int_id)

    async def replace_lora(self, old_lora_int_id: int, lora_request: LoRARequest) -> bool:
        """Load a new version of an adapter under its own id (runs on the engine thread, between
        steps); requests already using the old id finish on its weights (LLMEngine.replace_lora)."""
        return await self._call_in_engine(self.engine.replace_lora, old_lora_int_id, lora_request)

    async def pin_lora(self, lora_int_id: int) -> bool:
        return await self._call_in_engine(self.engine.pin_lora, lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self._call_in_engine(self.engine.list_loras)

    async def _call_in_engine(self, fn, *args):
        """Run fn(*args) on the engine thread between two steps, so it never races a step."""
        self._check_alive()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._wakeup:
            self._check_alive()
            self._calls.append((fn, args, future, loop))
            self._wakeup.notify()
        return await future

    def _request_abort(self, request_id: str) -> None:
        with self._wakeup:
            self._aborts.append(request_id)
            self._wakeup.notify()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead!r}; restart it")
        if self._stopping:
            raise EngineDeadError("the engine is shut down")

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread and wait for it; unfinished consumers get EngineDeadError."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._wakeup:
                    while not (self._stopping or self._new or self._aborts or self._calls
                               or self.engine.has_unfinished_requests()):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    new, self._new = self._new, []
                    aborts, self._aborts = self._aborts, []
                    calls, self._calls = self._calls, []
                for fn, args, future, loop in calls:
                    self._run_call(fn, args, future, loop)
                for request in new:
                    try:
                        self.engine.add_processed_request(request)
                    except InvalidRequestError as exc:
                        self._fail(request.request_id, exc)
                for output in self.engine.abort_request(aborts):
                    self._deliver(output.request_id, output)
                for output in self.engine.step():
                    self._deliver(output.request_id, output)
                for request_id, error in self.engine.pop_failed_requests():
                    self._fail(request_id, error)
        except BaseException as exc:  # noqa: BLE001 - every consumer must hear about it
            logger.exception("engine step failed; failing all in-flight requests")
            self._dead = exc
        with self._wakeup:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, []
            self._stopping = True
        error = EngineDeadError(f"the engine stopped: {self._dead!r}" if self._dead is not None
                                else "the engine was shut down")
        if self._dead is not None:
            error.__cause__ = self._dead
        for stream in streams.values():
            self._put(stream, error)
        for _, _, future, loop in calls:
            self._settle(loop, future, error, failed=True)

    def _deliver(self, request_id: str, output: RequestOutput) -> None:
        with self._wakeup:
            stream = self._streams.get(request_id)
            if stream is not None and output.finished:
                del self._streams[request_id]
        if stream is not None:
            self._put(stream, output)

    def _run_call(self, fn, args, future, loop) -> None:
        try:
            result, failed = fn(*args), False
        except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller
            result, failed = exc, True
        self._settle(loop, future, result, failed)

    @staticmethod
    def _settle(loop, future, value, failed: bool) -> None:
        def settle():
            if not future.done():
                future.set_exception(value) if failed else future.set_result(value)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the caller's loop is closed

    def _fail(self, request_id: str, error: BaseException) -> None:
        with self._wakeup:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._put(stream, error)

    @staticmethod
    def _put(stream: _Stream, item) -> None:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:
            pass  # the consumer's loop is closed: nobody is listening any more
