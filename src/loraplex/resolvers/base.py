"""LoRAResolver (the interface a resolver implements) and the process-wide registry.

Both follow vLLM's `vllm.lora.resolver` (a vLLM resolver plugin runs here unchanged, see
docs/vllm.md), plus two optional extras the resolver chain uses:
- `report_skipped(reason)`: a resolver that looked at a candidate and found it is not
  its adapter (not a LoRA, trained for another base model) returns None, as vLLM's
  resolvers do, and says why; the chain reports the reasons if no resolver finds a
  usable adapter, instead of a bare "not found".
- `LoRAResolver.change_token(lora_name)`: lets the chain drop a remembered "not found"
  as soon as the place the adapter would appear in changes.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Hashable

from loraplex.lora_request import LoRARequest

logger = logging.getLogger(__name__)

# The chain sets a fresh list around each resolver call; report_skipped appends to it.
# (A context variable reaches the resolver's task and the threads it starts with
# asyncio.to_thread, which copy the context.)
_skip_reasons: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "loraplex_resolver_skip_reasons", default=None)


def report_skipped(reason: str) -> None:
    """Record why the running resolver is passing over a candidate it found (it returns
    None). Outside a resolver chain (a resolver called directly) this does nothing."""
    reasons = _skip_reasons.get()
    if reasons is not None:
        reasons.append(reason)
    logger.info("LoRA resolver skipped a candidate: %s", reason)


class LoRAResolver(ABC):
    """Finds a LoRA adapter by name and makes it available on local disk.

    Written exactly as for vLLM (see docs/resolvers.md, "Writing a resolver"):

        class MyResolver(LoRAResolver):
            async def resolve_lora(self, base_model_name, lora_name):
                ...
                return LoRARequest(lora_name, lora_id_for_name(lora_name), local_dir)
    """

    @abstractmethod
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """Return a LoRARequest pointing at a local adapter directory, or None if this
        resolver has no usable adapter `lora_name` for `base_model_name` (say why with
        report_skipped when it found something that is not one). Raise on real failures
        (source down, credentials refused, a broken adapter): the chain reports them."""

    def change_token(self, lora_name: str) -> Hashable | None:
        """Something cheap that changes when an adapter `lora_name` may have appeared
        (e.g. directory mtimes), or None (the default): a "not found" is then kept for
        the chain's negative-cache TTL. Called from a worker thread; must not raise."""
        return None


class _LoRAResolverRegistry:
    """Name -> resolver, in registration order. Thread-safe.

    vLLM's interface: `resolvers` (the name -> resolver dict itself), `register_resolver`,
    `get_resolver` (KeyError "LoRA resolver 'x' not found. Available resolvers: [...]") and
    `get_supported_resolvers` (a list here, in chain order; vLLM returns the dict's keys).
    """

    def __init__(self) -> None:
        self.resolvers: dict[str, LoRAResolver] = {}
        self._lock = threading.Lock()

    def register_resolver(self, resolver_name: str, resolver: LoRAResolver) -> None:
        if not isinstance(resolver_name, str) or not resolver_name:
            raise ValueError(f"resolver name must be a non-empty string, got {resolver_name!r}")
        if not isinstance(resolver, LoRAResolver):
            raise TypeError(f"resolver {resolver_name!r} must be a LoRAResolver instance, "
                            f"got {type(resolver).__name__}")
        with self._lock:
            if resolver_name in self.resolvers:
                logger.warning("LoRA resolver %r is already registered; replacing it with %r",
                               resolver_name, type(resolver).__name__)
                # Replacing keeps the original position in the chain order.
            self.resolvers[resolver_name] = resolver

    def unregister_resolver(self, resolver_name: str) -> LoRAResolver | None:
        with self._lock:
            return self.resolvers.pop(resolver_name, None)

    def get_resolver(self, resolver_name: str) -> LoRAResolver:
        """The resolver registered as `resolver_name`. The built-ins also answer to the
        names vLLM registers its own under ("Filesystem Resolver", "Hf Hub Resolver")."""
        with self._lock:
            name = resolver_name
            if name not in self.resolvers:
                name = VLLM_RESOLVER_NAMES.get(resolver_name, resolver_name)
            try:
                return self.resolvers[name]
            except KeyError:
                raise KeyError(f"LoRA resolver '{resolver_name}' not found. "
                               f"Available resolvers: {list(self.resolvers)}") from None

    def get_supported_resolvers(self) -> list[str]:
        with self._lock:
            return list(self.resolvers)

    def clear(self) -> None:
        """Forget every resolver (for tests and re-configuration)."""
        with self._lock:
            self.resolvers.clear()


# The names vLLM registers its built-in resolvers under -> our built-ins' names.
VLLM_RESOLVER_NAMES = {"Filesystem Resolver": "lora_filesystem_resolver",
                       "Hf Hub Resolver": "lora_hf_hub_resolver"}

LoRAResolverRegistry = _LoRAResolverRegistry()
