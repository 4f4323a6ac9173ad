"""The versions of served adapters that the engine holds, and when each may be dropped.

A name's version is one LoRARequest (one engine id). The server's backend decides which
version a name means; this class keeps the engine side honest: it counts the requests
running on each version, keeps a replaced or unloaded version in the engine until the
last of them ends, and hands out ids that no version still known to the engine uses (so
a new version never shares an id with the one it replaces).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from loraplex.lora_request import LoRARequest, lora_id_for_name

logger = logging.getLogger(__name__)


async def call_engine(engine: Any, method: str, *args) -> Any:
    """engine.method(*args), awaited if async, else in a thread: reading adapter weights
    from disk must not stall the event loop."""
    fn = getattr(engine, method)
    if inspect.iscoroutinefunction(fn):
        return await fn(*args)
    return await asyncio.to_thread(fn, *args)


class AdapterVersions:
    def __init__(self, engine: Any, current: Callable[[], Iterable[LoRARequest]]) -> None:
        self._engine = engine
        self._current = current                        # the versions names map to now
        self._in_flight: Counter[int] = Counter()      # lora_int_id -> engine requests using it now
        self._retiring: dict[int, LoRARequest] = {}    # no longer current, still in the engine
        self._tasks: set[asyncio.Task] = set()         # engine removals started from sync code

    def fresh_id(self, name: str) -> int:
        """lora_id_for_name(name) when no known version uses it, else the first free one of
        lora_id_for_name("name@1"), "name@2", ... (deterministic)."""
        used = {r.lora_int_id for r in self._current()} | set(self._retiring) | set(self._in_flight)
        for version in itertools.count():
            lora_id = lora_id_for_name(name if version == 0 else f"{name}@{version}")
            if lora_id not in used:
                return lora_id

    def is_known(self, lora_id: int) -> bool:
        """Still in the engine though no name maps to it: requests may keep using it."""
        return lora_id in self._retiring or lora_id in self._in_flight

    def begin(self, lora_id: int) -> None:
        self._in_flight[lora_id] += 1

    def end(self, lora_id: int) -> None:
        self._in_flight[lora_id] -= 1
        if self._in_flight[lora_id] <= 0:
            del self._in_flight[lora_id]
            if lora_id in self._retiring:
                self.spawn(self._drop_from_engine(lora_id))

    async def retire(self, request: LoRARequest) -> None:
        """Drop a version nobody will get any more: from the engine now if no request runs on
        it, else once the last one ends (after replace_lora, the engine keeps its weights for
        them meanwhile)."""
        lora_id = request.lora_int_id
        if any(r.lora_int_id == lora_id for r in self._current()):
            return   # still current (e.g. the same version adopted twice)
        self._retiring[lora_id] = request   # its id stays taken until the engine has dropped it
        if not self._in_flight[lora_id]:
            await self._drop_from_engine(lora_id)

    def spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drop_from_engine(self, lora_id: int) -> None:
        try:
            # False only means the engine had already evicted it from its caches.
            await call_engine(self._engine, "remove_lora", lora_id)
        except Exception:   # a failed cleanup must not fail the request that triggered it
            logger.exception("remove_lora(%d) failed", lora_id)
        finally:
            self._retiring.pop(lora_id, None)
