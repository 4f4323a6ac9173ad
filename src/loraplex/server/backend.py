"""ServingBackend: everything the HTTP layer needs from the engine, behind one small class.

It wraps the async engine (generate / abort / tokenizer), the engine's LoRA
management (add / remove) and the resolver chain, and owns the server's view of
which names are served: the base model's names and every adapter that was
loaded statically (--lora-modules), at runtime (/v1/load_lora_adapter) or by a
resolver on first request. The routes never touch the engine directly, which
is what lets the HTTP tests run against a small fake engine too.

Adapters by name, and their versions. A name maps to the LoRARequest that new requests
get. Loading a name again in place (`load_inplace`) loads and validates the new version
under a fresh id first, then switches the name in one step: requests already running
finish on the old version, which is dropped from the engine when the last of them ends
(a failed load leaves the old version serving; server/adapter_versions.py keeps that
count). Names nobody loaded are resolved through
LoRAResolution (core/lora/resolution.py: single flight, shared failures, invalid adapters
remembered briefly), the one code path the async engine uses too; a resolved adapter whose
directory vanished (evicted from a download cache, deleted) is resolved again, including
for a request that was already queued when it vanished (once, before it produced
anything). Every request holds its adapter's directory while it runs
(resolvers/holds.py), so a bounded download cache never evicts it from under the engine.

The engine object must provide:
    generate(prompt_or_token_ids, sampling_params, request_id, lora_request=None)
        -> async iterator of RequestOutput (cumulative text/token_ids)
    abort(request_id)                      (sync or async)
    add_lora(lora_request)                 (sync or async; loads and validates, raises if unusable)
    remove_lora(lora_int_id)               (sync or async; frees the adapter's memory)
    replace_lora(old_lora_int_id, lora_request)
                                           (optional, sync or async: add_lora of a new version; the
                                            old id keeps its weights for the requests still running
                                            on it until remove_lora; without it, add_lora is used)
and a tokenizer, as `engine.tokenizer` or `engine.get_tokenizer()`; optionally
`engine_stats()` (a flat dict of counters), `is_running` and `shutdown()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from loraplex.core.lora.resolution import LoRAResolution, load_errors
from loraplex.errors import AdapterError, AdapterInvalidError, AdapterNameError, AdapterNotFoundError, ConfigError, LoraplexError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.holds import hold_directory, in_cache
from loraplex.resolvers.names import check_adapter_name
from loraplex.server.adapter_versions import AdapterVersions, call_engine
from loraplex.server.errors import INVALID_USER_INPUT, HTTPError

logger = logging.getLogger(__name__)


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# EngineCore.get_stats() field -> metric name (without the loraplex_ prefix).
ENGINE_STAT_NAMES = {"num_running": "num_requests_running", "num_waiting": "num_requests_waiting",
                     "kv_cache_usage": "kv_cache_usage_perc", "num_preemptions": "num_preemptions_total",
                     "num_kv_blocks": "kv_cache_blocks", "num_free_kv_blocks": "kv_cache_free_blocks",
                     "num_steps": "engine_steps_total", "num_step_seqs": "engine_step_seqs_total",
                     "num_step_tokens": "engine_step_tokens_total"}


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
        self._adapters: dict[str, LoRARequest] = {}       # name -> the version new requests get
        # Lineage for /v1/models. The engine's LoRARequests carry no base model name:
        # the server has already matched it, and the engine only knows the model path.
        self._parents: dict[str, str] = {}
        # Adapters a resolver found: their directory may be evicted from a download cache
        # later, and then they are resolved again rather than failing.
        self._resolved: set[str] = set()
        # One lock per adapter name: load and unload of one name never interleave.
        self._name_locks: dict[str, list] = {}     # name -> [lock, holders and waiters]
        self.versions = AdapterVersions(engine, lambda: self._adapters.values())
        # Resolvers get the model's path (vLLM passes model_config.model), which is what
        # adapters record as base_model_name_or_path; served names are only aliases.
        self.resolution = LoRAResolution(load=self._load, base_model_name=model_path,
                                         chain_factory=lambda: self.resolver_chain, id_for=self.versions.fresh_id,
                                         on_loaded=self._adopt_resolved)
        self.resolution_listeners: list = self.resolution.listeners   # callables(name, outcome, seconds)
        # (name, path, base_model_name) loaded by startup(): --lora-modules.
        self.static_adapters: list[tuple[str, str, str | None]] = []

    async def startup(self) -> None:
        """Load the static adapters, all at once (the engine reads and packs them on its loader
        threads, as a burst of first requests); any failure stops the server from starting."""
        async def load(name: str, path: str, base: str | None) -> None:
            try:
                await self.load_adapter(name, path, base_model_name=base)
            except LoraplexError as e:   # uvicorn prints the traceback: its last line says it all
                raise ConfigError(f"--lora-modules {name}={path} could not be loaded: {e}") from None
        await asyncio.gather(*(load(*adapter) for adapter in self.static_adapters))

    async def shutdown(self) -> None:
        stop = getattr(self.engine, "shutdown", None)
        if callable(stop):
            # AsyncEngine.shutdown joins the engine thread: keep the event loop free meanwhile.
            if inspect.iscoroutinefunction(stop):
                await stop()
            else:
                await asyncio.to_thread(stop)

    def engine_stats(self) -> dict[str, float]:
        """The engine's counters for /metrics, as flat names (see metrics.EngineStatsCollector):
        the engine's own flat dict (AsyncEngine.engine_stats: engine_loop.core_stats), renamed."""
        source = getattr(self.engine, "engine_stats", None)
        raw = source() if callable(source) else {}
        return {ENGINE_STAT_NAMES.get(k, k): v for k, v in dict(raw).items()}

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

    # ---- which adapter a request uses -----------------------------------------
    async def lora_request_for(self, model: str | None) -> LoRARequest | None:
        """None for the base model, the adapter's LoRARequest for an adapter name.

        An unknown name is resolved through the resolver chain when runtime LoRA
        updating is allowed; otherwise (or when nothing finds it) it is a 404.
        """
        if self.is_base_model(model):
            return None
        adapter = self._adapters.get(model)
        if adapter is not None and not self._vanished(model, adapter):
            return adapter
        if self.skip_model_name_validation:
            return None   # as vLLM does: no resolver is asked either
        if not (self.enable_lora and self.allow_runtime_lora_updating and self.resolver_chain):
            raise model_not_found(model)
        check_adapter_name(model)
        if adapter is not None:
            logger.info("resolved LoRA adapter %r is gone from %s; resolving it again", model, adapter.lora_path)
        try:
            return await self.resolution.resolve(model)
        except AdapterNotFoundError:
            stale = self._adapters.get(model)
            if stale is not None and self._vanished(model, stale):   # gone for good: unlisted
                self._drop_name(model)
                self.versions.spawn(self.versions.retire(stale))
            raise model_not_found(model) from None

    def _vanished(self, name: str, adapter: LoRARequest) -> bool:
        return name in self._resolved and not os.path.isdir(adapter.lora_path)

    def _evicted(self, adapter: LoRARequest) -> bool:
        """Resolved into an adapter cache here, and gone from it."""
        return self._vanished(adapter.lora_name, adapter) and in_cache(adapter.lora_path)

    def _adopt_resolved(self, name: str, request: LoRARequest) -> None:
        """LoRAResolution's on_loaded: the name now means the resolved version."""
        current = self._adapters.get(name)
        if current is not None and name not in self._resolved:
            # /v1/load_lora_adapter loaded this name while it was being resolved: that one stays.
            self.versions.spawn(self.versions.retire(request))
            return
        self._adapters[name] = request
        self._parents[name] = self.base_model_name
        self._resolved.add(name)
        logger.info("resolved LoRA adapter %r to %s on first request", name, request.lora_path)
        if current is not None and current is not request:
            self.versions.spawn(self.versions.retire(current))

    async def _load(self, request: LoRARequest) -> None:
        # add_lora's bool only says whether it was newly cached; failures raise.
        await call_engine(self.engine, "add_lora", request)

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
            # The new version is loaded and validated under its own id while the old one
            # serves; if it is unusable, nothing changes.
            request = LoRARequest(name, self.versions.fresh_id(name), path)
            with blame_field("lora_path", AdapterInvalidError), load_errors(request):
                if old is not None and callable(getattr(self.engine, "replace_lora", None)):
                    await call_engine(self.engine, "replace_lora", old.lora_int_id, request)
                else:
                    await call_engine(self.engine, "add_lora", request)
            # The switch, with no await in between: new requests get the new version.
            self._adapters[name] = request
            self._resolved.discard(name)
            self._parents[name] = base_model_name if self.is_base_model(base_model_name) else self.base_model_name
            if old is not None:
                await self.versions.retire(old)
            logger.info("loaded LoRA adapter %r from %s%s", name, path, " in place" if old is not None else "")
            return request

    async def unload_adapter(self, name: str) -> None:
        async with self._name_lock(name):
            request = self._adapters.get(name)
            if request is None:
                raise HTTPError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
            self._drop_name(name)
            await self.versions.retire(request)
            logger.info("unloaded LoRA adapter %r", name)

    def _drop_name(self, name: str) -> None:
        self._adapters.pop(name, None)
        self._parents.pop(name, None)
        self._resolved.discard(name)

    # ---- generation -------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        tok = getattr(self.engine, "tokenizer", None)
        if tok is None and hasattr(self.engine, "get_tokenizer"):
            tok = self.engine.get_tokenizer()
        return tok

    async def generate(self, prompt: str | list[int], sampling_params: Any, request_id: str,
                       lora_request: LoRARequest | None) -> AsyncIterator:
        """The engine's outputs for one request. With an adapter: the name's current version
        (one replaced since the caller looked it up is not used for a new request), counted
        and held while it runs. One evicted from the adapter cache before the hold was taken
        is looked up again first; if its directory vanished anyway before it produced
        anything (removed by hand), the name is resolved again once and the request
        submitted again."""
        if lora_request is None:
            async for out in self.engine.generate(prompt, sampling_params, request_id, lora_request=None):
                yield out
            return
        lora_request = self._current_version(lora_request)
        retried = looked_up_again = False
        while True:
            hold = hold_directory(lora_request.lora_path)
            if not (hold.is_held or looked_up_again) and self._evicted(lora_request):
                # Evicted between the caller's lookup and this hold: look it up again now
                # rather than send the engine to a directory that is gone.
                looked_up_again = True
                lora_request = self._current_version(await self.lora_request_for(lora_request.lora_name))
                continue
            lora_id = lora_request.lora_int_id
            self.versions.begin(lora_id)
            produced = False
            try:
                async for out in self.engine.generate(prompt, sampling_params, request_id,
                                                      lora_request=lora_request):
                    produced = True
                    yield out
                return
            except AdapterError:
                if produced or retried or not self._can_resolve_again(lora_request):
                    raise
            finally:
                hold.release()
                self.versions.end(lora_id)
            retried = True
            logger.info("the directory of LoRA adapter %r vanished before request %s ran; resolving "
                        "it again", lora_request.lora_name, request_id)
            lora_request = self._current_version(await self.lora_request_for(lora_request.lora_name))

    def _current_version(self, request: LoRARequest) -> LoRARequest:
        current = self._adapters.get(request.lora_name)
        if current is not None:
            return current
        if self.versions.is_known(request.lora_int_id):
            return request
        raise model_not_found(request.lora_name)   # unloaded before this request started

    def _can_resolve_again(self, request: LoRARequest) -> bool:
        name = request.lora_name
        if os.path.isdir(request.lora_path):
            return False
        current = self._adapters.get(name)   # (LoRARequests compare by name: ids tell versions apart)
        return (current is not None and current.lora_int_id != request.lora_int_id) or (
            name in self._resolved and self.allow_runtime_lora_updating and self.resolver_chain is not None)

    async def abort(self, request_id: str) -> None:
        await maybe_await(self.engine.abort(request_id))
