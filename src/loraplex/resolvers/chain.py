"""ResolverChain: asks the registered resolvers, in order, for an adapter name.

Rules (docs/resolvers.md explains them to users):
- the name is checked (check_adapter_name) before any resolver runs;
- resolvers are tried in chain order and the first LoRARequest wins;
- concurrent calls for the same (base model, name) share one attempt (single flight);
- a resolver that raises or exceeds its timeout is logged and skipped; if no
  resolver found the adapter and at least one failed, ResolverError names each
  resolver's outcome, since a failure may have hidden the adapter;
- AdapterInvalidError / AdapterNameError from a resolver propagate unchanged:
  "found but unusable" (a broken adapter) is an answer, not a miss;
- a candidate that is not this resolver's adapter (not a LoRA, another base model:
  report_skipped, or AdapterMismatchError) is a miss, as in vLLM; if no resolver finds
  a usable adapter, AdapterInvalidError names every skipped candidate and why;
- "every resolver said not found" is remembered in a bounded LRU (the negative cache)
  for a TTL, or until a resolver's change_token for the name changes (a directory
  the adapter would appear in was modified); found adapters, skips and failures are
  not cached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Callable, Sequence

from loraplex.errors import AdapterInvalidError, AdapterMismatchError, AdapterNameError, ResolverError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry, _skip_reasons
from loraplex.resolvers.env import negative_cache_ttl_s, resolver_timeout_s
from loraplex.resolvers.names import check_adapter_name

logger = logging.getLogger(__name__)

# listener(resolver_name, outcome, seconds); outcome is one of OUTCOMES, or "hit"
# with resolver_name NEGATIVE_CACHE for a name answered from the negative cache.
Listener = Callable[[str, str, float], None]
OUTCOMES = ("found", "not_found", "skipped", "error", "timeout")
NEGATIVE_CACHE = "negative_cache"
DEFAULT_NEGATIVE_CACHE_SIZE = 4096

_Key = tuple[str, str]  # (base_model_name, lora_name)


class ResolverChain:
    """One chain serves one event loop (the server's); it is not thread-safe."""

    def __init__(self, resolvers: Sequence[tuple[str, LoRAResolver]], *,
                 timeout_s: float | None = None, negative_ttl_s: float | None = None,
                 negative_cache_size: int = DEFAULT_NEGATIVE_CACHE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """`resolvers` as (name, resolver) in the order to try them. Unset
        timeout_s / negative_ttl_s come from LORAPLEX_RESOLVER_TIMEOUT_S /
        LORAPLEX_RESOLVER_NEGATIVE_TTL_S."""
        self.resolvers = list(resolvers)
        self.timeout_s = resolver_timeout_s() if timeout_s is None else float(timeout_s)
        self.negative_ttl_s = negative_cache_ttl_s() if negative_ttl_s is None else float(negative_ttl_s)
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if not self.negative_ttl_s >= 0:
            raise ValueError(f"negative_ttl_s must be >= 0 (0 disables), got {negative_ttl_s!r}")
        if negative_cache_size < 1:
            raise ValueError(f"negative_cache_size must be >= 1, got {negative_cache_size!r}")
        self.negative_cache_size = negative_cache_size
        self._clock = clock
        # key -> (expiry time, the resolvers' change tokens taken before they were asked)
        self._negative: OrderedDict[_Key, tuple[float, tuple]] = OrderedDict()
        self._token_sources = [r for _, r in self.resolvers if callable(getattr(r, "change_token", None))
                               and type(r).change_token is not LoRAResolver.change_token]
        self._in_flight: dict[_Key, asyncio.Future] = {}
        self._listeners: list[Listener] = []

    @classmethod
    def from_registry(cls, **kwargs) -> "ResolverChain":
        """A chain over the registered resolvers in chain order (loading plugins first)."""
        from loraplex.plugins.loader import resolver_order  # plugins import resolvers, not vice versa

        resolvers = []
        for name, _plugin in resolver_order():
            try:
                resolvers.append((name, LoRAResolverRegistry.get_resolver(name)))
            except KeyError:  # unregistered since resolver_order() listed it
                pass
        return cls(resolvers, **kwargs)

    @property
    def resolver_names(self) -> list[str]:
        return [name for name, _ in self.resolvers]

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(resolver_name, outcome, seconds)` after each resolver attempt."""
        self._listeners.append(listener)

    def forget(self, lora_name: str | None = None) -> None:
        """Drop negative-cache entries for `lora_name` (all names when None), e.g.
        after an adapter was uploaded."""
        if lora_name is None:
            self._negative.clear()
        else:
            for key in [k for k in self._negative if k[1] == lora_name]:
                del self._negative[key]

    @property
    def num_negative_cached(self) -> int:
        return len(self._negative)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    async def resolve(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        """The adapter `lora_name` for `base_model_name`, or None if no resolver knows it.

        Raises AdapterNameError (unsafe name, before any I/O), AdapterInvalidError
        (a resolver found it but it is unusable) or ResolverError (not found, and
        at least one resolver failed)."""
        check_adapter_name(lora_name)
        key = (base_model_name, lora_name)
        if key in self._negative and await self._negative_hit(key):
            return None
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._resolve_once(key))
            self._in_flight[key] = future
            future.add_done_callback(lambda f: self._finish(key, f))
        # shield: one caller giving up (client disconnect) must not cancel the others' answer.
        return await asyncio.shield(future)

    async def _resolve_once(self, key: _Key) -> LoRARequest | None:
        base_model_name, lora_name = key
        # Taken before any resolver looks: an adapter appearing meanwhile changes them.
        tokens = await self._change_tokens(lora_name)
        failures: list[str] = []
        misses: list[str] = []
        skipped: list[str] = []
        for name, resolver in self.resolvers:
            start = self._clock()
            reasons: list[str] = []
            try:
                result = await self._call_with_timeout(resolver, base_model_name, lora_name, reasons)
            except AdapterMismatchError as e:
                reasons.append(str(e))
                result = None
            except (AdapterInvalidError, AdapterNameError):
                self._notify(name, "error", start)
                raise
            except _ResolverTimeout:
                self._notify(name, "timeout", start)
                failures.append(f"{name}: timed out after {self.timeout_s:g} s")
                logger.warning("LoRA resolver %r timed out after %g s resolving %r; trying the next one",
                               name, self.timeout_s, lora_name)
                continue
            except Exception as e:
                self._notify(name, "error", start)
                failures.append(f"{name}: {type(e).__name__}: {e}")
                logger.warning("LoRA resolver %r failed resolving %r (%s: %s); trying the next one",
                               name, lora_name, type(e).__name__, e)
                continue
            if result is None and reasons:
                self._notify(name, "skipped", start)
                skipped.extend(f"{name}: {reason}" for reason in reasons)
                continue
            if result is None:
                self._notify(name, "not_found", start)
                misses.append(f"{name}: not found")
                continue
            problem = _check_result(result, lora_name)
            if problem:
                self._notify(name, "error", start)
                failures.append(f"{name}: {problem}")
                logger.warning("LoRA resolver %r %s; trying the next one", name, problem)
                continue
            self._notify(name, "found", start)
            logger.info("LoRA adapter %r resolved by %r: %s", lora_name, name, result.lora_path)
            return result
        if failures:
            raise ResolverError(
                f"could not resolve LoRA adapter {lora_name!r}: no resolver found it and "
                f"{len(failures)} failed, which may have hidden it ({'; '.join(failures + skipped + misses)}). "
                f"Fix the failing resolver(s) or retry later")
        if skipped:
            raise AdapterInvalidError(
                f"no resolver found a usable LoRA adapter named {lora_name!r} for the served model: "
                f"{'; '.join(skipped)}")
        self._remember_miss(key, tokens)
        return None

    async def _call_with_timeout(self, resolver: LoRAResolver, base_model_name: str, lora_name: str,
                                 skip_reasons: list[str]):
        """The resolver's answer or exception; _ResolverTimeout when it ran too long.
        Reasons it reports with report_skipped go to `skip_reasons`.
        (Not wait_for: a TimeoutError the resolver raises itself, e.g. from a socket,
        is a failure of the source and must be reported as such.)"""
        context_token = _skip_reasons.set(skip_reasons)
        try:
            # The task copies this context: the resolver (and its threads) see the list.
            task = asyncio.ensure_future(resolver.resolve_lora(base_model_name, lora_name))
        finally:
            _skip_reasons.reset(context_token)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            raise _ResolverTimeout()
        return task.result()

    def _finish(self, key: _Key, future: asyncio.Future) -> None:
        self._in_flight.pop(key, None)
        if not future.cancelled():
            future.exception()  # marks it retrieved even if every waiter gave up

    async def _negative_hit(self, key: _Key) -> bool:
        entry = self._negative.get(key)
        if entry is None:
            return False
        expiry, tokens = entry
        now = self._clock()
        if now >= expiry or tokens != await self._change_tokens(key[1]):
            self._negative.pop(key, None)
            return False
        if key in self._negative:   # (it may have been dropped while the tokens were taken)
            self._negative.move_to_end(key)
        self._notify(NEGATIVE_CACHE, "hit", now)
        return True

    async def _change_tokens(self, lora_name: str) -> tuple:
        """The change tokens of the resolvers that have them (stat calls: off the event loop)."""
        if not self._token_sources:
            return ()
        return await asyncio.to_thread(lambda: tuple(_token(r, lora_name) for r in self._token_sources))

    def _remember_miss(self, key: _Key, tokens: tuple) -> None:
        if self.negative_ttl_s <= 0:
            return
        self._negative[key] = (self._clock() + self.negative_ttl_s, tokens)
        self._negative.move_to_end(key)
        while len(self._negative) > self.negative_cache_size:
            self._negative.popitem(last=False)

    def _notify(self, resolver_name: str, outcome: str, start: float) -> None:
        seconds = max(0.0, self._clock() - start)
        for listener in self._listeners:
            try:
                listener(resolver_name, outcome, seconds)
            except Exception:  # metrics must never break resolution
                logger.exception("LoRA resolver listener %r failed", listener)


class _ResolverTimeout(Exception):
    pass


def _token(resolver: LoRAResolver, lora_name: str):
    try:
        return resolver.change_token(lora_name)
    except Exception:  # unknown: never equal, so a remembered miss is not trusted
        logger.exception("change_token of LoRA resolver %r failed", resolver)
        return object()


def _check_result(result: object, lora_name: str) -> str | None:
    """Why a resolver's return value is unusable, or None if it is fine."""
    if not isinstance(result, LoRARequest):
        return f"returned {type(result).__name__}, expected a LoRARequest or None"
    if result.lora_name != lora_name:
        return f"was asked for {lora_name!r} but returned adapter {result.lora_name!r}"
    return None
