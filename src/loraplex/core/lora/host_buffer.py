"""HostBuffer: page-locked CPU memory for packed adapters, registered with CUDA in place.

A GPU copies a slot's weights asynchronously only from page-locked (pinned) memory. torch's
pinned allocator gets it from cudaHostAlloc, which is slow for fresh memory: on the H200 host
(2026-11-28, 80 MiB) it took 55-60 ms, against 4-7 ms to page-lock ordinary memory of the
same size with cudaHostRegister. A cold adapter waits for that allocation before its first
token, so adapters are packed into anonymous memory registered here instead.

The buffer's views (torch.frombuffer) keep it alive; when the last one is freed the memory
is unregistered and unmapped. A copy queued from it may still be pending on the GPU by then,
so whoever queues copies calls `record_use()` after them, and the unregistering waits for
that event first (torch's own pinned allocator does the same for its blocks).
"""

from __future__ import annotations

import logging
import mmap
import sys

import torch

logger = logging.getLogger(__name__)


# Neither MAP_POPULATE nor madvise lets the GIL go while the kernel faults the pages in
# (37 ms for 84 MiB here, every other thread of the process stopped meanwhile), so the pages
# are faulted by the writes that fill them (os.preadv and torch copies, which let it go).
# Huge pages make those faults 2 MiB at a time: populate 84 MiB 39 -> 10.5 ms on a 2-core
# VM (benchmarks/bench_lora_load_phases.py); where the kernel has none, nothing changes.
_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_HUGE_PAGES = getattr(mmap, "MADV_HUGEPAGE", None)


class HostBuffer(mmap.mmap):
    """Anonymous, zeroed memory of `nbytes`; `register()` page-locks it for CUDA once written."""

    def __new__(cls, nbytes: int):
        buffer = super().__new__(cls, -1, max(nbytes, 1), flags=_FLAGS)
        buffer.registered_address = 0
        buffer.last_use = None      # torch.cuda.Event recorded after the latest copy from it
        if _HUGE_PAGES is not None:
            try:
                buffer.madvise(_HUGE_PAGES)
            except OSError:          # a kernel without transparent huge pages: 4 KiB pages
                pass
        return buffer

    def view_as_tensor(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """[numel] tensor of `dtype` over the buffer's start; it keeps the buffer alive."""
        return torch.frombuffer(self, dtype=dtype, count=numel)

    def record_use(self) -> None:
        """Call after queueing copies from this buffer on the current CUDA stream."""
        if self.registered_address:
            event = torch.cuda.Event()
            event.record()
            self.last_use = event

    def register(self) -> None:
        """Page-lock the buffer for CUDA, once written: 7.7 ms for 80 MiB of present pages on an
        H100 host, 31 ms when it must fault them in; torch's binding lets the GIL go."""
        address = torch.frombuffer(self, dtype=torch.uint8).data_ptr()
        status = torch.cuda.cudart().cudaHostRegister(address, len(self), 0)
        if int(status) != 0:
            # Still correct, only slower: copies from pageable memory are synchronous.
            logger.warning("cudaHostRegister of %d bytes failed (%s); adapter weights stay in pageable "
                           "memory and slot writes wait for their copies", len(self), status)
            return
        self.registered_address = address

    def __del__(self) -> None:
        if not self.registered_address:
            return
        if sys.is_finalizing():
            return   # at interpreter exit CUDA may be gone already; the process releases everything
        if self.last_use is not None:
            self.last_use.synchronize()   # a queued copy must not read unregistered, unmapped memory
        torch.cuda.cudart().cudaHostUnregister(self.registered_address)
        self.registered_address = 0
