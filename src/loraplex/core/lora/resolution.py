"""LoRAResolution: turn an adapter name nobody has loaded into a loaded adapter.

The one code path for everything that serves adapters by name: the server's backend
(requests whose `model` is an adapter name it does not know yet, or one whose directory
vanished) and the async engine (`generate(lora_name=...)`). Each caller keeps its own
table of names and asks `resolve(name)` on a miss, which:

- asks the resolver chain for the name, collecting the holds the adapter cache takes on
  what it returns (resolvers/holds.py), so no process can evict the directory between the
  download and the load; they are released once the engine holds it itself;
- loads and validates the adapter through `load(request)` (e.g. engine.add_lora) under the
  id `id_for(name)` gives (the server hands out a fresh id per version);
- single flight: concurrent misses for one name share one resolution and one load, and its
  outcome, success or failure, reaches every one of them;
- remembers an adapter that was found but is unusable (AdapterInvalidError: bad files, rank
  above the limit, another base model) for LORAPLEX_RESOLVER_INVALID_TTL_S seconds: requests
  in that time get the same error without another download, validation or load. (Names no
  resolver knows are remembered by the chain's own negative cache.)

`on_loaded(name, request)` is called once per successful load, before any waiter resumes, so
the caller's table is updated exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from loraplex.errors import AdapterError, AdapterInvalidError, AdapterNotFoundError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.resolvers.chain import ResolverChain
from loraplex.resolvers.env import invalid_cache_ttl_s
from loraplex.resolvers.holds import collecting_holds
from loraplex.resolvers.names import check_adapter_name

logger = logging.getLogger(__name__)

MAX_INVALID_REMEMBERED = 4096


@contextlib.contextmanager
def load_errors(request: LoRARequest):
    """An engine's load failures as adapter errors: AdapterError passes; ValueError, OSError,
    RuntimeError and KeyError (an engine that does not use loraplex's errors) become
    AdapterInvalidError naming the adapter."""
    try:
        yield
    except AdapterError:
        raise
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise AdapterInvalidError(f"LoRA adapter {request.lora_name!r} could not be loaded: {e}") from e


class LoRAResolution:
    def __init__(self, *, load: Callable[[LoRARequest], object], base_model_name: str,
                 chain_factory: Callable[[], ResolverChain] = ResolverChain.from_registry,
                 id_for: Callable[[str], int] = lora_id_for_name,
                 on_loaded: Callable[[str, LoRARequest], None] | None = None,
                 invalid_ttl_s: float | None = None, clock: Callable[[], float] = time.monotonic):
        """load(request): loads and validates an adapter (sync or async; raises if unusable).
        base_model_name: what resolvers are asked for (the model's path, as vLLM passes it)."""
        self.base_model_name = base_model_name
        self._load = load
        self._chain_factory = chain_factory
        self._chain: ResolverChain | None = None
        self._id_for = id_for
        self._on_loaded = on_loaded
        self.invalid_ttl_s = invalid_cache_ttl_s() if invalid_ttl_s is None else float(invalid_ttl_s)
        self._clock = clock
        self._in_flight: dict[str, asyncio.Future] = {}
        self._invalid: OrderedDict[str, tuple[float, str]] = OrderedDict()   # name -> (expiry, message)
        self.listeners: list[Callable[[str, str, float], None]] = []         # (name, outcome, seconds)

    @property
    def chain(self) -> ResolverChain:
        # Built on first use: loading plugins is not free and many engines never need it.
        if self._chain is None:
            self._chain = self._chain_factory()
        return self._chain

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def resolve(self, lora_name: str) -> LoRARequest:
        """Resolve and load `lora_name`. Raises AdapterNameError, AdapterNotFoundError (no
        resolver knows it), AdapterInvalidError (found but unusable) or ResolverError."""
        check_adapter_name(lora_name)
        remembered = self._invalid_hit(lora_name)
        if remembered is not None:
            raise AdapterInvalidError(remembered)
        future = self._in_flight.get(lora_name)
        if future is None:
            future = asyncio.ensure_future(self._resolve_and_load(lora_name))
            self._in_flight[lora_name] = future
            future.add_done_callback(lambda f: self._finish(lora_name, f))
        # shield: one caller going away must not cancel the load the others wait for.
        return await asyncio.shield(future)

    def forget_invalid(self, lora_name: str | None = None) -> None:
        """Forget that `lora_name` (every name when None) was unusable, e.g. after a fix."""
        if lora_name is None:
            self._invalid.clear()
        else:
            self._invalid.pop(lora_name, None)

    async def _resolve_and_load(self, lora_name: str) -> LoRARequest:
        started = self._clock()
        outcome = "error"
        try:
            with collecting_holds() as held:
                found = await self.chain.resolve(self.base_model_name, lora_name)
            try:
                if found is None:
                    outcome = "not_found"
                    names = ", ".join(getattr(self.chain, "resolver_names", ())) or "none registered"
                    raise AdapterNotFoundError(
                        f"no LoRA adapter named {lora_name!r}: it is not loaded and no resolver found it "
                        f"(resolvers: {names}); load it with add_lora or configure a resolver "
                        f"(e.g. VLLM_LORA_RESOLVER_CACHE_DIR)")
                request = LoRARequest(lora_name, self._id_for(lora_name), found.lora_path, found.base_model_name)
                await self.load(request)
            finally:
                held.release()   # the engine holds it now (or it failed)
            if self._on_loaded is not None:
                self._on_loaded(lora_name, request)
            outcome = "loaded"
            logger.debug("resolved LoRA adapter %r to %s and loaded it", lora_name, request.lora_path)
            return request
        except AdapterInvalidError as e:
            outcome = "invalid"
            self._remember_invalid(lora_name, str(e))
            raise
        finally:
            seconds = self._clock() - started
            for listener in self.listeners:
                try:
                    listener(lora_name, outcome, seconds)
                except Exception:  # metrics must never break resolution
                    logger.exception("LoRA resolution listener %r failed", listener)

    async def load(self, request: LoRARequest) -> None:
        """Load and validate `request` through `load` (errors as load_errors says)."""
        with load_errors(request):
            result = self._load(request)
            if inspect.isawaitable(result):
                await result

    def _finish(self, lora_name: str, future: asyncio.Future) -> None:
        if self._in_flight.get(lora_name) is future:
            del self._in_flight[lora_name]
        if not future.cancelled():
            future.exception()   # marks it retrieved even if every waiter gave up

    def _invalid_hit(self, lora_name: str) -> str | None:
        remembered = self._invalid.get(lora_name)
        if remembered is None:
            return None
        expiry, message = remembered
        if self._clock() >= expiry:
            del self._invalid[lora_name]
            return None
        return message

    def _remember_invalid(self, lora_name: str, message: str) -> None:
        if self.invalid_ttl_s <= 0:
            return
        note = f" (this answer is kept for {self.invalid_ttl_s:g} s; fix the adapter, then retry)"
        self._invalid[lora_name] = (self._clock() + self.invalid_ttl_s, message + note)
        self._invalid.move_to_end(lora_name)
        while len(self._invalid) > MAX_INVALID_REMEMBERED:
            self._invalid.popitem(last=False)
