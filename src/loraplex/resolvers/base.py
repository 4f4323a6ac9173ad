"""LoRAResolver (the interface a resolver implements) and the process-wide registry."""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod

from loraplex.lora_request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAResolver(ABC):
    """Finds a LoRA adapter by name and makes it available on local disk.

    A resolver written for vLLM ports by changing its imports:

        class MyResolver(LoRAResolver):
            async def resolve_lora(self, base_model_name, lora_name):
                ...
                return LoRARequest(lora_name, lora_id_for_name(lora_name), local_dir)
    """

    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """Return a LoRARequest pointing at a local adapter directory, or None if
        this resolver does not know `lora_name`. Raise on real failures (source
        down, credentials refused, invalid adapter): the chain reports them."""


class _LoRAResolverRegistry:
    """Name -> resolver, in registration order. Thread-safe."""

    def __init__(self) -> None:
        self._resolvers: dict[str, LoRAResolver] = {}
        self._lock = threading.Lock()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        if not isinstance(resolver_name, str) or not resolver_name:
            raise ValueError(f"resolver name must be a non-empty string, got {resolver_name!r}")
        if not isinstance(resolver, LoRAResolver):
            raise TypeError(f"resolver {resolver_name!r} must be a LoRAResolver instance, "
                            f"got {type(resolver).__name__}")
        with self._lock:
            if resolver_name in self._resolvers:
                logger.warning("LoRA resolver %r is already registered; replacing it with %r",
                               resolver_name, type(resolver).__name__)
                # Replacing keeps the original position in the chain order.
            self._resolvers[resolver_name] = resolver

    def unregister_resolver(self, resolver_name: str) -> LoRAResolver | None:
        with self._lock:
            return self._resolvers.pop(resolver_name, None)

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        with self._lock:
            try:
                return self._resolvers[resolver_name]
            except KeyError:
                available = ", ".join(self._resolvers) or "none"
                raise KeyError(f"LoRA resolver {resolver_name!r} is not registered; "
                               f"available: {available}") from None

    def get_supported_resolvers(self) -> list[str]:
        with self._lock:
            return list(self._resolvers)

    def clear(self) -> None:
        """Forget every resolver (for tests and re-configuration)."""
        with self._lock:
            self._resolvers.clear()


LoRAResolverRegistry = _LoRAResolverRegistry()
