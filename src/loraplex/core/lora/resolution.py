"""LoRAResolution: turn an adapter name into a loaded adapter, asking the resolver chain if needed.

The async engine uses it for requests that name an adapter (`lora_name="sql"`) rather than
pass a LoRARequest. A name already in the CPU cache is served at once. Otherwise the
resolver chain finds it (single flight: concurrent requests for one name share one
resolve-and-load), and the adapter is loaded and validated in a worker thread, so the
event loop and the engine thread never wait on disk.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from loraplex.core.lora.manager import LoRAManager
from loraplex.errors import AdapterNotFoundError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.chain import ResolverChain
from loraplex.resolvers.names import check_adapter_name


class LoRAResolution:
    def __init__(self, manager: LoRAManager, base_model_name: str,
                 chain_factory: Callable[[], ResolverChain] = ResolverChain.from_registry):
        self.manager = manager
        self.base_model_name = base_model_name
        self._chain_factory = chain_factory
        self._chain: ResolverChain | None = None
        self._in_flight: dict[str, asyncio.Future] = {}

    @property
    def chain(self) -> ResolverChain:
        # Built on first use: loading plugins is not free and many engines never need it.
        if self._chain is None:
            self._chain = self._chain_factory()
        return self._chain

    async def lora_request_for(self, lora_name: str) -> LoRARequest:
        """The loaded adapter named `lora_name`; raises AdapterNotFoundError / AdapterInvalidError."""
        check_adapter_name(lora_name)
        loaded = self.manager.find_by_name(lora_name)
        if loaded is not None:
            self.manager.check_servable(loaded.lora_int_id)
            return loaded
        future = self._in_flight.get(lora_name)
        if future is None:
            future = asyncio.ensure_future(self._resolve_and_load(lora_name))
            self._in_flight[lora_name] = future
            future.add_done_callback(lambda _: self._in_flight.pop(lora_name, None))
        # shield: one caller going away must not cancel the load the others wait for.
        request = await asyncio.shield(future)
        self.manager.check_servable(request.lora_int_id)
        return request

    async def ensure_loaded(self, request: LoRARequest) -> None:
        """Load and validate `request` unless the CPU cache or a slot holds it (the common case)."""
        if not self.manager.is_loaded(request):
            await asyncio.to_thread(self.manager.add_lora, request)
        self.manager.check_servable(request.lora_int_id)

    async def _resolve_and_load(self, lora_name: str) -> LoRARequest:
        request = await self.chain.resolve(self.base_model_name, lora_name)
        if request is None:
            names = ", ".join(self.chain.resolver_names) or "none registered"
            raise AdapterNotFoundError(
                f"no LoRA adapter named {lora_name!r}: it is not loaded and no resolver found it "
                f"(resolvers: {names}); load it with add_lora or configure a resolver "
                f"(e.g. VLLM_LORA_RESOLVER_CACHE_DIR)")
        await asyncio.to_thread(self.manager.add_lora, request)
        return request
