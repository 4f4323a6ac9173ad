"""Multi-LoRA under tensor parallelism: rank 0 decides, the other ranks mirror.

Rank 0's LoRAManager is the only one that decides anything: which adapters sit in the CPU
cache, which slot each one gets, what is evicted. Its decisions reach the other ranks as
messages on the ranks' ordered channel (runner.py), sent the moment they happen:

    ("load", request)        an adapter entered rank 0's CPU cache: load it too
    ("drop", lora_int_id)    it left rank 0's CPU cache (evicted or removed)
    ("slot", slot, request)  rank 0 wrote the adapter into `slot`; request None: cleared it

Rank 0 sends them from `LoRAMirror` (a CPU-cache mapping handed to the manager, and the
slot stacks' change callback). Every other rank applies them with `WorkerAdapters`: it
loads its own shard of each adapter from the same files (on a loader thread, as rank 0
loads on a thread too), and writes the same slots with it. So every rank's slots hold the
same adapters, and a slot write never reads a file that rank 0 did not read first.

One message stream keeps them in order: a load precedes any slot write of that adapter, and
slot writes precede the step that uses them (rank 0 sends the step after activating its
adapters). Slot writes apply between steps on the other ranks (they handle one message at a
time), as on rank 0 (whose step lock keeps them out of a running step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from loraplex.core.lora.adapter import LoRAAdapter, load_lora_adapter
from loraplex.core.lora.slots import LoRASlotStacks
from loraplex.lora_request import LoRARequest

logger = logging.getLogger(__name__)

Send = Callable[[tuple], None]


class MirroredCpuCache(OrderedDict):
    """Rank 0's CPU cache (the manager's LRU mapping): inserts and deletes are sent to the other ranks."""

    def __init__(self, send: Send):
        super().__init__()
        self._send = send

    def __setitem__(self, lora_int_id: int, adapter: LoRAAdapter) -> None:
        super().__setitem__(lora_int_id, adapter)
        self._send(("load", adapter.request))

    def __delitem__(self, lora_int_id: int) -> None:
        super().__delitem__(lora_int_id)
        self._send(("drop", lora_int_id))

    def pop(self, lora_int_id: int, *default):
        present = lora_int_id in self
        value = super().pop(lora_int_id, *default)
        if present:
            self._send(("drop", lora_int_id))
        return value

    def popitem(self, last: bool = True):
        lora_int_id, adapter = super().popitem(last)
        self._send(("drop", lora_int_id))
        return lora_int_id, adapter

    def clear(self) -> None:
        for lora_int_id in list(self):
            del self[lora_int_id]


class LoRAMirror:
    """Rank 0's side: hands the manager its CPU cache and the stacks their change callback."""

    def __init__(self, send: Send):
        self._send = send
        self.cache = MirroredCpuCache(send)
        self.slot_ids: dict[int, int] = {}     # slot -> lora_int_id, as last sent

    def cpu_cache(self) -> MirroredCpuCache:
        return self.cache

    def slot_changed(self, slot: int, request: LoRARequest | None) -> None:
        if request is None:
            self.slot_ids.pop(slot, None)
        else:
            self.slot_ids[slot] = request.lora_int_id
        self._send(("slot", slot, request))

    def state(self) -> dict:
        """What the other ranks' `WorkerAdapters.state()` must equal."""
        return {"cached": sorted(self.cache), "slots": dict(sorted(self.slot_ids.items()))}


class WorkerAdapters:
    """The other ranks' side: this rank's shard of every adapter in rank 0's CPU cache, and its slots."""

    def __init__(self, stacks: LoRASlotStacks, *, allow_pickle: bool):
        self.stacks = stacks
        # served_model_name=None: rank 0 has checked the adapter's base model (with the served
        # names it knows); every other check runs here too and decides as rank 0's did.
        self._options = dict(max_lora_rank=stacks.max_lora_rank, allow_pickle=allow_pickle, dtype=stacks.dtype,
                             pin_memory=stacks.device.type == "cuda")
        self._cache: dict[int, tuple[LoRARequest, Future]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-tp-lora")
        self._slot_ids: dict[int, int] = {}
        self.num_unmirrored_loads = 0   # slot writes that found no load message before them

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "load":
            request = message[1]
            self._cache[request.lora_int_id] = (request, self._loader.submit(self._load, request))
        elif kind == "drop":
            self._cache.pop(message[1], None)
        elif kind == "slot":
            self._slot_changed(message[1], message[2])
        else:
            raise ValueError(f"unknown LoRA message {kind!r}")

    def _slot_changed(self, slot: int, request: LoRARequest | None) -> None:
        if request is None:
            self.stacks.clear_slot(slot)
            self._slot_ids.pop(slot, None)
            return
        cached = self._cache.get(request.lora_int_id)
        if cached is not None and (cached[0].lora_name, cached[0].lora_path) == (request.lora_name, request.lora_path):
            adapter = cached[1].result()   # waits for the loader thread if it is still reading
        else:   # cannot happen while messages arrive in order; correct anyway, only slower
            self.num_unmirrored_loads += 1
            logger.warning("rank-0 slot write of adapter %r came without its load; loading it now",
                           request.lora_name)
            adapter = self._load(request)
        self.stacks.write_slot(slot, adapter)
        self._slot_ids[slot] = request.lora_int_id

    def _load(self, request: LoRARequest) -> LoRAAdapter:
        return load_lora_adapter(request, self.stacks.spec, **self._options)

    def state(self) -> dict:
        return {"cached": sorted(self._cache), "slots": dict(sorted(self._slot_ids.items())),
                "slot_ranks": self.stacks.slot_ranks.tolist(), "unmirrored_loads": self.num_unmirrored_loads}
