"""ServingBackend: everything the HTTP layer needs from the engine, behind one small class.

It wraps the async engine (generate / abort / tokenizer), the engine's LoRA
management (add / remove) and the resolver chain, and owns the server's view of
which names are served: the base model's names and every adapter that was
loaded statically (--lora-modules), at runtime (/v1/load_lora_adapter) or by a
resolver on first request. The routes never touch the engine directly, which
is what lets the HTTP tests run against a small fake engine too.

The engine object must provide:
    generate(prompt_or_token_ids, sampling_params, request_id, lora_request=None)
        -> async iterator of RequestOutput (cumulative text/token_ids)
    abort(request_id)                      (sync or async)
    add_lora(lora_request)                 (sync or async; loads and validates, raises if unusable)
    remove_lora(lora_int_id)               (sync or async; frees the adapter's memory)
and a tokenizer, as `engine.tokenizer` or `engine.get_tokenizer()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex.errors import (
    AdapterError, AdapterInvalidError, AdapterNameError, AdapterNotFoundError, ConfigError, LoraplexError)
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers.names import check_adapter_name
from loraplex.server.errors import INVALID_USER_INPUT, HTTPError

logger = logging.getLogger(__name__)


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# LLMEngine.get_stats() field -> metric name (without the loraplex_ prefix).
ENGINE_STAT_NAMES = {"num_running": "num_requests_running", "num_waiting": "num_requests_waiting",
                     "kv_cache_usage": "kv_cache_usage_perc", "num_preemptions": "num_preemptions_total",
                     "num_kv_blocks": "kv_cache_blocks", "num_free_kv_blocks": "kv_cache_free_blocks"}


@contextlib.contextmanager
def blame_field(param: str, error_type: type[Exception]):
    """Errors of `error_type` raised inside name request field `param` in their OpenAI error object."""
    try:
        yield
    except error_type as e:
        e.param = param
        raise


def model_not_found(name: str) -> AdapterNotFoundError:
    return AdapterNotFoundError(f"The model '{name}' does not exist.")


class ServingBackend:
    def __init__(self, engine: Any, *, served_model_names: list[str], model_path: str,
                 resolver_chain: Any = None, allow_runtime_lora_updating: bool = False,
                 enable_lora: bool = True, max_model_len: int | None = None,
                 skip_model_name_validation: bool = False) -> None:
        if not served_model_names:
            raise ValueError("served_model_names must name the base model at least once")
        self.engine = engine
        self.served_model_names = list(served_model_names)
        self.model_path = model_path
        self.resolver_chain = resolver_chain
        self.allow_runtime_lora_updating = allow_runtime_lora_updating
        self.enable_lora = enable_lora
        self.max_model_len = max_model_len
        # VLLM_SKIP_MODEL_NAME_VALIDATION: a name that is no loaded adapter is the base model.
        self.skip_model_name_validation = skip_model_name_validation
        self.created = int(time.time())
        self._adapters: dict[str, LoRARequest] = {}
        # Lineage for /v1/models. The engine's LoRARequests carry no base model name:
        # the server has already matched it, and the engine only knows the model path.
        self._parents: dict[str, str] = {}
        # Adapters a resolver found: their directory may be evicted from a download cache
        # later, and then they are resolved again rather than failing.
        self._resolved: set[str] = set()
        # One lock per adapter name: concurrent first requests for a new name share
        # one resolution, and load/unload of one name never interleave.
        self._name_locks: dict[str, list] = {}     # name -> [lock, holders and waiters]
        self.resolution_listeners: list = []   # callables(name, outcome, seconds)
        # (name, path, base_model_name) loaded by startup(): --lora-modules.
        self.static_adapters: list[tuple[str, str, str | None]] = []

    async def startup(self) -> None:
        """Load the static adapters; any failure stops the server from starting."""
        for name, path, base in self.static_adapters:
            try:
                await self.load_adapter(name, path, base_model_name=base)
            except LoraplexError as e:   # uvicorn prints the traceback: its last line says it all
                raise ConfigError(f"--lora-modules {name}={path} could not be loaded: {e}") from None

    async def shutdown(self) -> None:
        stop = getattr(self.engine, "shutdown", None)
        if callable(stop):
            # AsyncEngine.shutdown joins the engine thread: keep the event loop free meanwhile.
            if inspect.iscoroutinefunction(stop):
                await stop()
            else:
                await asyncio.to_thread(stop)

    def engine_stats(self) -> dict[str, float]:
        """The engine's counters for /metrics, as flat names (see metrics.EngineStatsCollector).

        Read from the event loop while the engine thread runs: only sizes and counters
        are read, never structures that are iterated by the engine.
        """
        core = getattr(self.engine, "engine", self.engine)
        get_stats = getattr(core, "get_stats", None)
        raw = get_stats() if callable(get_stats) else {}
        if dataclasses.is_dataclass(raw):
            raw = dataclasses.asdict(raw)
        stats = {ENGINE_STAT_NAMES.get(k, k): v for k, v in dict(raw).items()}
        manager = getattr(getattr(getattr(core, "runner", None), "lora", None), "manager", None)
        if manager is not None:
            on_cpu = manager.list_loras()
            stats["lora_adapters_cpu"] = len(on_cpu)
            stats["lora_adapters_device"] = sum(manager.slot_of(i) is not None for i in on_cpu)
            stats["lora_adapters_pinned"] = sum(manager.is_pinned(i) for i in on_cpu)
            # Cache counters, once the manager keeps them: {"cpu_hits": n, "loads": n, ...}.
            for key, value in dict(getattr(manager, "stats", None) or {}).items():
                stats[f"lora_{key}_total"] = value
        return stats

    def is_healthy(self) -> bool:
        return bool(getattr(self.engine, "is_running", True))

    # ---- names ---------------------------------------------------------------
    @property
    def base_model_name(self) -> str:
        return self.served_model_names[0]

    def is_base_model(self, name: str | None) -> bool:
        return not name or name in self.served_model_names

    def response_model_name(self, model: str | None, lora_request: LoRARequest | None) -> str:
        """The `model` a response reports: the name asked for, or the base model's first
        name when none was given or when VLLM_SKIP_MODEL_NAME_VALIDATION let an unknown
        name through (as vLLM reports it)."""
        if model and (lora_request is not None or self.is_base_model(model)):
            return model
        return self.base_model_name

    def list_adapters(self) -> list[LoRARequest]:
        return list(self._adapters.values())

    def get_adapter(self, name: str) -> LoRARequest | None:
        return self._adapters.get(name)

    def parent_of(self, name: str) -> str:
        return self._parents.get(name) or self.base_model_name

    @contextlib.asynccontextmanager
    async def _name_lock(self, name: str):
        """Hold the lock of one adapter name. Locks exist only while someone holds or awaits
        them, so requests for endless unknown names leave nothing behind."""
        entry = self._name_locks.get(name)
        if entry is None:
            entry = self._name_locks[name] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._name_locks[name]

    def _unique_id(self, name: str) -> int:
        used = {req.lora_int_id for n, req in self._adapters.items() if n != name}
        lora_id = lora_id_for_name(name)
        while lora_id in used:   # a blake2b collision between two served names
            lora_id = lora_id % (2**31 - 1) + 1
        return lora_id

    # ---- which adapter a request uses -----------------------------------------
    async def lora_request_for(self, model: str | None) -> LoRARequest | None:
        """None for the base model, the adapter's LoRARequest for an adapter name.

        An unknown name is resolved through the resolver chain when runtime LoRA
        updating is allowed; otherwise (or when nothing finds it) it is a 404.
        """
        if self.is_base_model(model):
            return None
        adapter = self._adapters.get(model)
        if adapter is not None and not self._is_gone(model, adapter):
            return adapter
        if self.skip_model_name_validation:
            return None   # as vLLM does: no resolver is asked either
        if not (self.enable_lora and self.allow_runtime_lora_updating and self.resolver_chain):
            raise model_not_found(model)
        check_adapter_name(model)
        async with self._name_lock(model):
            adapter = self._adapters.get(model)   # resolved while we waited
            if adapter is not None:
                if not self._is_gone(model, adapter):
                    return adapter
                logger.info("resolved LoRA adapter %r is gone from %s; resolving it again",
                            model, adapter.lora_path)
                await self._forget(model)
            return await self._resolve_and_load(model)

    def _is_gone(self, name: str, adapter: LoRARequest) -> bool:
        return name in self._resolved and not os.path.isdir(adapter.lora_path)

    async def _forget(self, name: str) -> None:
        request = self._adapters.pop(name)
        self._parents.pop(name, None)
        self._resolved.discard(name)
        await self._call_engine_lora("remove_lora", request.lora_int_id)

    async def _resolve_and_load(self, name: str) -> LoRARequest:
        started = time.perf_counter()
        outcome = "error"
        try:
            # Resolvers get the model's path (vLLM passes model_config.model), which is what
            # adapters record as base_model_name_or_path; served names are only aliases.
            found = await self.resolver_chain.resolve(self.model_path, name)
            if found is None:
                outcome = "not_found"
                raise model_not_found(name)
            request = LoRARequest(name, self._unique_id(name), found.lora_path)
            await self._add_to_engine(request)
            self._adapters[name] = request
            self._parents[name] = self.base_model_name
            self._resolved.add(name)
            outcome = "loaded"
            logger.info("resolved LoRA adapter %r to %s on first request", name, request.lora_path)
            return request
        except AdapterInvalidError:
            outcome = "invalid"
            raise
        finally:
            seconds = time.perf_counter() - started
            for listener in self.resolution_listeners:
                listener(name, outcome, seconds)

    async def _add_to_engine(self, request: LoRARequest) -> None:
        # add_lora's bool only says whether it was newly cached; failures raise.
        try:
            await self._call_engine_lora("add_lora", request)
        except AdapterError:
            raise
        except (ValueError, OSError, RuntimeError, KeyError) as e:
            raise AdapterInvalidError(f"LoRA adapter {request.lora_name!r} at {request.lora_path!r} "
                                      f"could not be loaded: {e}") from e

    # ---- management ------------------------------------------------------------
    async def load_adapter(self, name: str, path: str, *, base_model_name: str | None = None,
                           load_inplace: bool = False) -> LoRARequest:
        if not self.enable_lora:
            raise HTTPError(400, "LoRA is not enabled on this server; start it with --enable-lora")
        with blame_field("lora_name", AdapterNameError):
            check_adapter_name(name)
        if self.is_base_model(name):
            raise HTTPError(400, f"'{name}' is the base model's name; choose another adapter name",
                            param="lora_name")
        async with self._name_lock(name):
            old = self._adapters.get(name)
            if old is not None and not load_inplace:
                raise HTTPError(400, f"The lora adapter '{name}' has already been loaded. If you "
                                     f"want to load the adapter in place, set 'load_inplace' to True.",
                                param="lora_name", error_type=INVALID_USER_INPUT)
            request = LoRARequest(name, self._unique_id(name), path)
            if old is not None:
                # In place: the engine must drop the old weights before loading the new ones.
                await self._call_engine_lora("remove_lora", old.lora_int_id)
                del self._adapters[name]
            with blame_field("lora_path", AdapterInvalidError):
                await self._add_to_engine(request)
            self._adapters[name] = request
            self._resolved.discard(name)
            self._parents[name] = base_model_name if self.is_base_model(base_model_name) else self.base_model_name
            logger.info("loaded LoRA adapter %r from %s", name, path)
            return request

    async def unload_adapter(self, name: str) -> None:
        async with self._name_lock(name):
            request = self._adapters.get(name)
            if request is None:
                raise HTTPError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            # False only means the engine had already evicted it from its caches.
            await self._call_engine_lora("remove_lora", request.lora_int_id)
            del self._adapters[name]
            self._parents.pop(name, None)
            self._resolved.discard(name)
            logger.info("unloaded LoRA adapter %r", name)

    async def _call_engine_lora(self, method: str, arg):
        fn = getattr(self.engine, method)
        if inspect.iscoroutinefunction(fn):
            return await fn(arg)
        # Reading adapter weights from disk must not stall the event loop.
        return await asyncio.to_thread(fn, arg)

    # ---- generation -------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None and hasattr(self.engine, "get_tokenizer"):
            tok = self.engine.get_tokenizer()
        return tok

    def generate(self, prompt: str | list[int], sampling_params: Any, request_id: str,
                 lora_request: LoRARequest | None) -> AsyncIterator:
        return self.engine.generate(prompt, sampling_params, request_id, lora_request=lora_request)

    async def abort(self, request_id: str) -> None:
        await maybe_await(self.engine.abort(request_id))
