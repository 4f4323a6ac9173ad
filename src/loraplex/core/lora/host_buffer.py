"""HostBuffer: page-locked CPU memory for packed adapters, registered with CUDA in place.

A GPU copies a slot's weights asynchronously only from page-locked (pinned) memory. torch's
pinned allocator gets it from cudaHostAlloc, which is slow for fresh memory: on the H200 host
(2026-11-28, 80 MiB) it took 55-60 ms, against 4-7 ms to page-lock ordinary memory of the
same size with cudaHostRegister. A cold adapter waits for that allocation before its first
token, so adapters are packed into anonymous memory registered here instead.

A HostBuffer is a lease on a block of such memory. The buffer's views (torch.frombuffer)
keep it alive; when the last one is freed (the adapter left the CPU cache), its block goes
back to a small pool, still faulted in and page-locked, and the next load of the same size
takes it: that load neither faults fresh pages nor registers them (on an H100 host 42 ms
and 7.7 ms of an 89 ms load). Blocks beyond the pool's room are unregistered and unmapped.
An engine also reserves blocks before any adapter arrives (`HostBuffer.reserve`, sized for
the largest adapter it accepts): a burst of first requests for new adapters then packs into
memory already faulted in and page-locked; a lease that finds no free block of its own size
takes the smallest free reserved one that holds it.

A copy queued from a buffer may still be pending on the GPU when its lease ends, so whoever
queues copies calls `record_use()` after them, and both the next lease and the unregistering
wait for that event first (torch's own pinned allocator does the same for its blocks).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import threading

import torch

logger = logging.getLogger(__name__)


# Neither MAP_POPULATE nor madvise lets the GIL go while the kernel faults the pages in
# (37 ms for 84 MiB here, every other thread of the process stopped meanwhile), so the pages
# are faulted by the writes that fill them (os.preadv and torch copies, which let it go).
# Huge pages make those faults 2 MiB at a time: populate 84 MiB 39 -> 10.5 ms on a 2-core
# VM (benchmarks/bench_lora_load_phases.py); where the kernel has none, nothing changes.
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_HUGE_PAGES = getattr(mmap, "MADV_HUGEPAGE", None)

# Free blocks kept per size: an adapter leaves the cache to make room for the next, and the
# engine loads four at a time (engine_loop.ADAPTER_LOADER_THREADS).
FREE_BLOCKS_PER_SIZE = 4


class _Block:
    """Anonymous memory, page-locked at most once however many adapters it holds in turn."""

    def __init__(self, nbytes: int):
        self.memory = mmap.mmap(-1, nbytes, flags=_FLAGS)
        self.nbytes = nbytes
        self.registered_address = 0
        self.last_use = None      # torch.cuda.Event recorded after the latest copy from it
        self.written = False      # leased before: its memory may hold an earlier adapter's bytes
        self.reserved = False     # kept by the pool for good (HostBuffer.reserve)
        if _HUGE_PAGES is not None:
            try:
                self.memory.madvise(_HUGE_PAGES)
            except OSError:          # a kernel without transparent huge pages: 4 KiB pages
                pass

    def register(self, address: int) -> None:
        if self.registered_address:
            return
        status = torch.cuda.cudart().cudaHostRegister(address, self.nbytes, 0)
        if int(status) != 0:
            # Still correct, only slower: copies from pageable memory are synchronous.
            logger.warning("cudaHostRegister of %d bytes failed (%s); adapter weights stay in pageable "
                           "memory and slot writes wait for their copies", self.nbytes, status)
            return
        self.registered_address = address

    def wait(self) -> None:
        """Until no queued copy reads this memory."""
        if self.last_use is not None:
            self.last_use.synchronize()
            self.last_use = None

    def release(self) -> None:
        """Unregister; the memory is unmapped once nothing refers to it."""
        if self.registered_address:
            self.wait()              # a queued copy must not read unregistered, unmapped memory
            torch.cuda.cudart().cudaHostUnregister(self.registered_address)
            self.registered_address = 0


class _Pool:
    def __init__(self) -> None:
        self._free: dict[int, list[_Block]] = {}
        self._reserved: dict[int, int] = {}  # size -> blocks reserved: kept free beyond FREE_BLOCKS_PER_SIZE
        self._lock = threading.RLock()       # RLock: a lease may end (and give back) inside take()

    def take(self, nbytes: int) -> _Block:
        """A free block of `nbytes`, else the smallest free reserved block that holds it, else a
        new one."""
        with self._lock:
            free = self._free.get(nbytes)
            if not free:
                sizes = sorted(size for size in self._reserved if size > nbytes and self._free.get(size))
                free = self._free[sizes[0]] if sizes else None
            block = free.pop() if free else None
        if block is None:
            return _Block(nbytes)
        block.wait()
        return block

    def give_back(self, block: _Block) -> None:
        with self._lock:
            free = self._free.setdefault(block.nbytes, [])
            if len(free) < max(FREE_BLOCKS_PER_SIZE, self._reserved.get(block.nbytes, 0)):
                free.append(block)
                return
        block.release()

    def reserve(self, nbytes: int, up_to: int) -> bool:
        """Count one more reserved block of `nbytes`, unless `up_to` are already."""
        with self._lock:
            if self._reserved.get(nbytes, 0) >= up_to:
                return False
            self._reserved[nbytes] = self._reserved.get(nbytes, 0) + 1
            return True

    def add_free(self, block: _Block) -> None:
        with self._lock:
            self._free.setdefault(block.nbytes, []).append(block)

    def num_free(self, nbytes: int) -> int:
        with self._lock:
            return len(self._free.get(nbytes, ()))


_POOL = _Pool()
_LEASE_TYPES: dict[int, type] = {}           # one ctypes array type per size, made on first use


class HostBuffer:
    """A lease on `nbytes` of anonymous memory (`HostBuffer.lease`): a ctypes array over the
    block, so that torch.frombuffer views keep the lease alive and its end is seen."""

    __slots__ = ()

    @staticmethod
    def lease(nbytes: int, *, zeroed: bool = True) -> HostBuffer:
        """`nbytes` of memory, zero if `zeroed` (a caller that writes every byte passes False:
        a recycled block then keeps its old contents until overwritten)."""
        nbytes = max(nbytes, 1)
        block = _POOL.take(nbytes)
        if nbytes not in _LEASE_TYPES:
            _LEASE_TYPES[nbytes] = type(f"HostBuffer{nbytes}", (HostBuffer, ctypes.Array),
                                        {"_type_": ctypes.c_char, "_length_": nbytes})
        buffer = _LEASE_TYPES[nbytes].from_buffer(block.memory)   # the block's first nbytes
        buffer._block = block
        if block.written and zeroed:
            torch.frombuffer(buffer, dtype=torch.uint8).zero_()     # lets the GIL go
        block.written = True
        return buffer

    @staticmethod
    def reserve(nbytes: int, *, up_to: int, register: bool) -> bool:
        """Add a block of `nbytes` to the pool for good, faulted in (zeroed by torch, which lets
        the GIL go) and page-locked for CUDA if `register`, unless `up_to` blocks of that size
        were reserved already (so engines started one after another in a process share them)."""
        if not _POOL.reserve(nbytes, up_to):
            return False
        try:
            block = _Block(nbytes)
            torch.frombuffer(block.memory, dtype=torch.uint8).zero_()
        except (OSError, RuntimeError) as e:   # no memory to spare: loads take fresh memory, as before
            logger.warning("could not reserve %d bytes of host memory for adapters (%s); adapters are "
                           "loaded into fresh memory instead", nbytes, e)
            return False
        block.reserved = True
        if register:
            block.register(ctypes.addressof(ctypes.c_char.from_buffer(block.memory)))
        _POOL.add_free(block)
        return True

    @property
    def registered_address(self) -> int:
        return self._block.registered_address

    @property
    def reserved(self) -> bool:
        """Whether the lease is on a block reserved ahead of loads (HostBuffer.reserve)."""
        return self._block.reserved

    @property
    def last_use(self):
        return self._block.last_use

    def view_as_tensor(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """[numel] tensor of `dtype` over the buffer's start; it keeps the buffer alive."""
        return torch.frombuffer(self, dtype=dtype, count=numel)

    def record_use(self) -> None:
        """Call after queueing copies from this buffer on the current CUDA stream."""
        if self._block.registered_address:
            event = torch.cuda.Event()
            event.record()
            self._block.last_use = event

    def register(self) -> None:
        """Page-lock the buffer for CUDA, once written (a recycled block already is): 7.7 ms for
        80 MiB of present pages on an H100 host, 31 ms when it must fault them in; torch's
        binding lets the GIL go."""
        self._block.register(ctypes.addressof(self))

    def __del__(self) -> None:
        if sys.is_finalizing():
            return   # at interpreter exit CUDA may be gone already; the process releases everything
        _POOL.give_back(self._block)
