"""LoRAManager: which adapters are loaded on the CPU, which sit in device slots, which are pinned.

Two LRU caches:
- CPU: up to max_cpu_loras validated adapters (LoRAAdapter), loaded by add_lora or on demand;
- device: max_loras slots of LoRASlotStacks; activate() puts a step's adapters into slots,
  evicting the least recently used slot that the step does not need.
An adapter in a slot whose CPU copy was evicted keeps working (the slot is a full copy); it
is reloaded from its path only if it needs a slot again. A pinned adapter stays in both
caches until removed. Nothing the step in progress uses is evicted from the device slots,
nor from the CPU cache before it is in its slot. When no room can be
made the error says so (AdapterCapacityError).

An adapter is identified by its id, name and path: a request whose id is loaded from another
path is refused rather than served the other weights. A new version of a name is loaded under
a new id with replace_lora(old_id, request) (the server's load_inplace): the old version's CPU
copy then leaves the LRU bound, so requests already running finish on the old weights, until
remove_lora(old_id). Every adapter in the CPU cache or a slot holds its directory
(resolvers/holds.py): a download cache never evicts what the engine may have to reload.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from loraplex.core.lora.adapter import LoRAAdapter, largest_packed_nbytes, load_lora_adapter
from loraplex.core.lora.host_buffer import HostBuffer
from loraplex.core.lora.slots import LoRASlotStacks
from loraplex.errors import AdapterCapacityError, AdapterError, AdapterInvalidError, AdapterNotFoundError
from loraplex.lora_request import LoRARequest
from loraplex.resolvers.holds import NO_HOLD, Hold, hold_directory

logger = logging.getLogger(__name__)

# Host memory reserved for adapters before they arrive, at most: a share of the host's, and
# an amount page-locked in a few seconds at start (80 MiB took 12-42 ms on H100 hosts).
RESERVED_HOST_SHARE = 0.25
RESERVED_HOST_MAX_BYTES = 16 * 2**30


class LoRAManager:
    def __init__(self, stacks: LoRASlotStacks, *, max_cpu_loras: int, served_model_name: str | None = None,
                 served_aliases: tuple[str, ...] = (), allow_pickle: bool = False,
                 cpu_cache: OrderedDict | None = None):
        """cpu_cache: an empty OrderedDict (subclass) to hold the CPU cache; tensor parallelism
        passes one that mirrors its inserts and deletes to the other ranks."""
        self.stacks = stacks
        self.max_loras = stacks.max_loras
        self.max_cpu_loras = max_cpu_loras
        # Adapters are packed for these slots when loaded (dtype; pinned memory when they are on a GPU).
        self._load_options = dict(max_lora_rank=stacks.max_lora_rank, served_model_name=served_model_name,
                                  served_aliases=served_aliases, allow_pickle=allow_pickle, dtype=stacks.dtype,
                                  pin_memory=stacks.device.type == "cuda")
        self._cpu: OrderedDict[int, LoRAAdapter] = cpu_cache if cpu_cache is not None else OrderedDict()  # LRU first
        self._slot_of: OrderedDict[int, int] = OrderedDict()        # lora_int_id -> slot, LRU first
        self._slot_request: dict[int, LoRARequest] = {}             # lora_int_id -> what its slot holds
        self._pinned: set[int] = set()
        self._retired: set[int] = set()                            # superseded versions, kept until removed
        self._holds: dict[int, Hold] = {}                          # on the directory of each id held here
        self._versions: dict[int, int] = {}                        # id -> weights_version()
        self._version_counter = itertools.count(1)
        self._step_ids: set[int] = set()                           # adapters of the latest step
        self._in_step = False                                      # between activate() and end_step()
        # Two locks, always taken in this order. step_lock is held by the runner for a whole
        # step (activate, forward, end_step): operations that write slots (pin_lora,
        # remove_lora) take it too, so they wait until the forward is done with the slots.
        # _lock guards the bookkeeping only and is never held for long, so lookups and
        # CPU-only loads from other threads do not wait for a step.
        self.step_lock = threading.RLock()
        self._lock = threading.RLock()
        # Cache counters for the server's /metrics (cpu_misses: read from disk). Every key
        # exists from the start, so readers on other threads never see the dict grow.
        self.stats: Counter[str] = Counter(dict.fromkeys(
            ("device_hits", "cpu_hits", "cpu_misses", "loads", "cpu_evictions", "device_evictions"), 0))

    def host_buffer_reservations(self) -> list[Callable[[], bool]]:
        """One reservation (host_buffer.py) per adapter the CPU cache holds, each of a buffer for
        the largest adapter the slots take, within RESERVED_HOST_SHARE of the host's memory and
        RESERVED_HOST_MAX_BYTES (beyond them adapters take fresh memory as they load): the
        engine loop runs them when it starts, so that many new adapters requested at once pack
        into memory faulted in and page-locked already (on one H100 host faulting 80 MiB in
        took 42 ms of an 89 ms load; page-locking takes 7 ms more, in the CUDA driver the step
        loop calls too)."""
        nbytes = largest_packed_nbytes(self.stacks.spec, self.stacks.max_lora_rank, self.stacks.dtype)
        host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        budget = min(int(host_bytes * RESERVED_HOST_SHARE), RESERVED_HOST_MAX_BYTES)
        count = min(self.max_cpu_loras, budget // nbytes)
        logger.info("reserving %d host buffers of %.1f MiB for adapters", count, nbytes / 2**20)
        return [functools.partial(HostBuffer.reserve, nbytes, up_to=count, register=self._load_options["pin_memory"])
                for _ in range(count)]

    # ---- the user-facing operations (LLM.add_lora, pin_lora, remove_lora, list_loras)

    def add_lora(self, request: LoRARequest) -> bool:
        """Load and validate an adapter into the CPU cache; False if it was already there.

        With request.load_inplace (vLLM's offline semantics) the files are read again even
        then, and the new weights replace the old ones under the same id (cache entry and
        device slot) once they are validated. The server swaps versions with replace_lora
        instead, so that requests already running keep the old weights."""
        if request.load_inplace:
            return self._reload(request)
        return self._add(request)

    def replace_lora(self, old_lora_int_id: int, request: LoRARequest) -> bool:
        """add_lora of a new version (its own id) of the adapter loaded as `old_lora_int_id`.
        Once the new version is loaded and valid, the old one is retired in the same step: no
        new request should use it, the requests already using it finish on its weights, and its
        CPU copy is kept outside the cache's bound (never evicted, taking no room from others)
        until remove_lora(old_lora_int_id). If the new version is unusable nothing changes."""
        return self._add(request, replaces=old_lora_int_id)

    def _add(self, request: LoRARequest, replaces: int | None = None) -> bool:
        with self._lock:
            if self._is_cached(request):
                return False
        # Held while it is read (and kept while it is cached), so no download cache evicts it.
        hold = hold_directory(request.lora_path)
        try:
            # Disk I/O and validation outside the lock: a running step is not held up by them.
            adapter = load_lora_adapter(request, self.stacks.spec, **self._load_options)
            with self._lock:
                if self._is_cached(request):
                    return False
                # Retired before room is made, so the old version is not what gets evicted.
                retire = replaces is not None and replaces not in self._retired and (
                    replaces in self._cpu or replaces in self._slot_of)
                if retire:
                    self._retired.add(replaces)
                try:
                    self._make_cpu_room(request)
                except AdapterCapacityError:
                    if retire:
                        self._retired.discard(replaces)
                    raise
                self._cpu[request.lora_int_id] = adapter
                self.stats["loads"] += 1
                self._versions[request.lora_int_id] = next(self._version_counter)
                hold = self._keep_hold(request.lora_int_id, hold)
        finally:
            hold.release()
        size = adapter.num_bytes
        logger.info("loaded LoRA adapter %r (id %d, rank %d, %s)", request.lora_name, request.lora_int_id,
                    adapter.rank, f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB")
        return True

    def remove_lora(self, lora_int_id: int) -> bool:
        """Drop an adapter from its device slot and the CPU cache (its memory is released)."""
        with self.step_lock, self._lock:
            if self._in_step and lora_int_id in self._step_ids:
                raise AdapterCapacityError(f"adapter id {lora_int_id} is used by the step now running; "
                                           f"retry once the step has finished")
            self._pinned.discard(lora_int_id)
            self._retired.discard(lora_int_id)
            self._free_slot(lora_int_id)
            removed = self._cpu.pop(lora_int_id, None) is not None
            self._drop_hold(lora_int_id)
            return removed

    def pin_lora(self, lora_int_id: int) -> bool:
        """Keep an adapter in the CPU cache and a device slot until it is removed."""
        with self.step_lock, self._lock:
            if lora_int_id not in self._cpu:
                raise AdapterNotFoundError(f"adapter id {lora_int_id} is not loaded; add_lora() it before pinning")
            if lora_int_id in self._pinned:
                return False
            if len(self._pinned) >= self.max_loras:
                raise AdapterCapacityError(
                    f"cannot pin adapter id {lora_int_id}: all {self.max_loras} device slots are pinned; "
                    f"remove a pinned adapter or start the engine with a larger max_loras")
            self._pinned.add(lora_int_id)
            if lora_int_id not in self._slot_of:
                # Takes a slot now unless that would evict an adapter of the latest step (its
                # sequences are probably still running); otherwise at the next step that needs it.
                slot = self._find_slot(needed=self._step_ids | {lora_int_id}, raise_if_none=False)
                if slot is not None:
                    self._fill_slot(slot, self._cpu[lora_int_id])
            return True

    def add_served_names(self, names: Iterable[str]) -> None:
        """Names the base model is also served as (--served-model-name): an adapter whose
        base_model_name_or_path is one of them fits the model."""
        with self._lock:
            aliases = self._load_options["served_aliases"]
            self._load_options["served_aliases"] = (*aliases, *(n for n in names if n not in aliases))

    def check_servable(self, lora_int_id: int) -> None:
        """Raise AdapterCapacityError if requests for this adapter could never get a slot."""
        with self._lock:
            if lora_int_id not in self._pinned and len(self._pinned) >= self.max_loras:
                raise AdapterCapacityError(
                    f"all {self.max_loras} device slots are pinned by other adapters (ids "
                    f"{sorted(self._pinned)}), so a request for adapter id {lora_int_id} could never run; "
                    f"remove a pinned adapter (remove_lora) or start the engine with a larger max_loras")

    def weights_version(self, lora_int_id: int) -> int | None:
        """A number that changes whenever weights are read into the cache under this id (a first
        load, a reload after eviction, an in-place reload): the prefix cache keys on it."""
        with self._lock:
            return self._versions.get(lora_int_id)

    def list_loras(self) -> set[int]:
        with self._lock:
            return set(self._cpu) | set(self._slot_of)

    def get_request(self, lora_int_id: int) -> LoRARequest | None:
        with self._lock:
            adapter = self._cpu.get(lora_int_id)
            return adapter.request if adapter else None

    def is_loaded(self, request: LoRARequest) -> bool:
        """Whether the CPU cache or a device slot holds `request` (raises AdapterInvalidError on an
        id/name clash). One only in a slot is served from there, and reloaded if it loses the slot.
        A request with load_inplace never counts as loaded: it asks for its files to be read again."""
        with self._lock:
            loaded = self._is_cached(request) or request.lora_int_id in self._slot_request
            return loaded and not request.load_inplace

    def find_by_name(self, lora_name: str) -> LoRARequest | None:
        """The request of the CPU-cached adapter called `lora_name` (marked recently used)."""
        with self._lock:
            for lora_id, adapter in reversed(self._cpu.items()):   # the newest version of a name
                if adapter.request.lora_name == lora_name and lora_id not in self._retired:
                    self._cpu.move_to_end(lora_id)
                    return adapter.request
            return next((r for i, r in self._slot_request.items()
                         if r.lora_name == lora_name and i not in self._retired), None)

    def is_pinned(self, lora_int_id: int) -> bool:
        return lora_int_id in self._pinned

    def pinned_in_slots(self) -> set[int]:
        """Pinned adapters holding a device slot (the scheduler counts them against max_loras)."""
        with self._lock:
            return {i for i in self._pinned if i in self._slot_of}

    def slot_of(self, lora_int_id: int) -> int | None:
        return self._slot_of.get(lora_int_id)

    # ---- per step (the model runner)

    def can_run_together(self, lora_int_ids: Iterable[int]) -> bool:
        """Whether a step using these adapters fits in the slots next to the pinned adapters."""
        needed = set(lora_int_ids)
        pinned_elsewhere = {i for i in self._pinned if i in self._slot_of and i not in needed}
        return len(needed) + len(pinned_elsewhere) <= self.max_loras

    def activate(self, requests: Iterable[LoRARequest]) -> dict[int, int]:
        """Put every adapter of a step into a device slot; return lora_int_id -> slot.

        The caller holds step_lock until end_step()."""
        with self.step_lock, self._lock:
            by_id = {r.lora_int_id: r for r in requests}
            if len(by_id) > self.max_loras:
                raise AdapterCapacityError(
                    f"one step needs {len(by_id)} adapters but only {self.max_loras} device slots exist; "
                    f"the scheduler must cap a step at max_loras adapters")
            # Only when a pin raced with admission (pinned from another thread after the
            # step's sequences were admitted): then a pinned slot gives way for this step and
            # is filled again when its adapter is next used.
            evict_pinned = not self.can_run_together(by_id)
            if evict_pinned:
                logger.warning("LoRA step needs %d slots next to %d pinned ones; a pinned adapter gives "
                               "up its slot for this step", len(by_id), len(self.pinned_in_slots()))
            self._step_ids = set(by_id)
            self._in_step = True
            try:
                for lora_id, request in by_id.items():
                    if lora_id in self._slot_of:
                        self.stats["device_hits"] += 1
                        self._slot_of.move_to_end(lora_id)
                        if lora_id in self._cpu:
                            self._cpu.move_to_end(lora_id)
                        continue
                    self.stats["cpu_hits" if lora_id in self._cpu else "cpu_misses"] += 1
                    try:
                        self._add(request)     # a no-op unless it was evicted: then it is reloaded from disk
                    except AdapterError as exc:
                        error = type(exc)(
                            f"LoRA adapter {request.lora_name!r} (id {lora_id}) was evicted from the CPU "
                            f"cache and could not be reloaded from {request.lora_path!r}: {exc}; restore "
                            f"its files, or load it again from a new path")
                        error.lora_request = request   # the engine fails this adapter's requests only
                        raise error from exc
                    self._fill_slot(self._find_slot(needed=self._step_ids, evict_pinned=evict_pinned),
                                    self._cpu[lora_id])
            except BaseException:
                self._in_step = False
                raise
            return {lora_id: self._slot_of[lora_id] for lora_id in by_id}

    def end_step(self) -> None:
        """The step's forward pass is done: its adapters may be evicted or removed again.

        Requests still running keep their LoRARequest, so an adapter removed or evicted
        between their steps is reloaded from its path on their next step.
        """
        with self._lock:
            self._in_step = False

    # ---- internals

    def _reload(self, request: LoRARequest) -> bool:
        """add_lora with load_inplace: the new weights take the place of those cached under the id."""
        lora_id = request.lora_int_id
        with self._lock:
            self._is_cached(request, same_path=False)   # an id/name clash is refused before any I/O
        hold = hold_directory(request.lora_path)
        try:
            adapter = load_lora_adapter(request, self.stacks.spec, **self._load_options)
            with self.step_lock, self._lock:
                if self._in_step and lora_id in self._step_ids:
                    raise AdapterCapacityError(f"adapter id {lora_id} is used by the step now running; "
                                               f"retry the in-place load once the step has finished")
                self._free_slot(lora_id)   # refilled from the new weights when next needed
                if lora_id not in self._cpu:
                    self._make_cpu_room(request)
                self._cpu[lora_id] = adapter
                self._cpu.move_to_end(lora_id)
                self.stats["loads"] += 1
                self._versions[lora_id] = next(self._version_counter)
                # The id now holds the new directory; the old directory's hold goes.
                hold, self._holds[lora_id] = self._holds.get(lora_id, NO_HOLD), hold
        finally:
            hold.release()
        logger.info("reloaded LoRA adapter %r (id %d) in place from %s", request.lora_name, lora_id,
                    request.lora_path)
        return True

    def _make_cpu_room(self, incoming: LoRARequest) -> None:
        while len(self._cpu) - len(self._retired.intersection(self._cpu)) >= self.max_cpu_loras:
            # Only a step adapter still waiting for its slot needs its CPU copy: one in a slot
            # has a full copy there. So a load from another thread while a step runs finds room.
            busy = {i for i in self._step_ids if i not in self._slot_of} if self._in_step else set()
            victim = next((i for i in self._cpu
                           if i not in self._pinned and i not in busy and i not in self._retired), None)
            if victim is None:
                raise AdapterCapacityError(
                    f"cannot load adapter {incoming.lora_name!r}: all {self.max_cpu_loras} CPU cache entries "
                    f"hold pinned adapters or adapters of the step in progress; remove a pinned adapter "
                    f"or raise max_cpu_loras (--max-cpu-loras)")
            del self._cpu[victim]
            self._drop_hold(victim)
            self.stats["cpu_evictions"] += 1
            logger.debug("evicted LoRA adapter id %d from the CPU cache", victim)

    def _find_slot(self, *, needed: set[int], raise_if_none: bool = True,
                   evict_pinned: bool = False) -> int | None:
        used = set(self._slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        for lora_id, slot in self._slot_of.items():   # least recently used first
            if lora_id not in needed and (evict_pinned or lora_id not in self._pinned):
                # No zeroing here: the caller overwrites the whole slot at once.
                del self._slot_of[lora_id], self._slot_request[lora_id]
                self._drop_hold(lora_id)
                self.stats["device_evictions"] += 1
                return slot
        if raise_if_none:
            raise AdapterCapacityError(
                f"all {self.max_loras} device slots hold pinned adapters or adapters the running step uses; "
                f"unpin an adapter or start the engine with a larger max_loras (--max-loras)")
        return None

    def _fill_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        self.stacks.write_slot(slot, adapter)
        self._slot_of[adapter.lora_int_id] = slot
        self._slot_request[adapter.lora_int_id] = adapter.request

    def _free_slot(self, lora_int_id: int) -> None:
        slot = self._slot_of.pop(lora_int_id, None)
        self._slot_request.pop(lora_int_id, None)
        if slot is not None:
            self.stacks.clear_slot(slot)

    def _keep_hold(self, lora_int_id: int, hold: Hold) -> Hold:
        """Keep `hold` as the id's hold unless it has one; return what the caller must release."""
        if lora_int_id in self._holds:
            return hold
        self._holds[lora_int_id] = hold
        return NO_HOLD

    def _drop_hold(self, lora_int_id: int) -> None:
        """Release the id's hold once neither the CPU cache nor a slot has it."""
        if lora_int_id not in self._cpu and lora_int_id not in self._slot_of:
            hold = self._holds.pop(lora_int_id, None)
            if hold is not None:
                hold.release()

    def _is_cached(self, request: LoRARequest, same_path: bool = True) -> bool:
        """True (and marked recently used) if the CPU cache holds it; raise if its id is loaded
        (in the CPU cache or a slot) for another name or from another path. One name may be
        loaded under several ids: the versions of an adapter replaced in place."""
        lora_id = request.lora_int_id
        adapter = self._cpu.get(lora_id)
        other = adapter.request if adapter is not None else self._slot_request.get(lora_id)
        if other is not None and other.lora_name != request.lora_name:
            raise AdapterInvalidError(
                f"lora_int_id {lora_id} is already used by adapter {other.lora_name!r}, "
                f"not {request.lora_name!r}; give each adapter its own id "
                f"(loraplex.lora_request.lora_id_for_name(name))")
        if same_path and other is not None and other.lora_path != request.lora_path:
            raise AdapterInvalidError(
                f"adapter {request.lora_name!r} is loaded as lora_int_id {lora_id} from "
                f"{other.lora_path!r}, not from {request.lora_path!r}; load a new version under a new "
                f"lora_int_id (or remove_lora({lora_id}) first)")
        if lora_id in self._cpu:
            self._cpu.move_to_end(request.lora_int_id)
            return True
        return False
