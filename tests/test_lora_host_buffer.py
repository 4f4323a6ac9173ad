"""HostBuffer: the memory packed adapters live in, recycled between adapters of one size
(page-locking itself needs CUDA: gpu_check.py)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import torch

from loraplex.core.lora.host_buffer import FREE_BLOCKS_PER_SIZE, HostBuffer


def test_buffer_starts_zero_and_lives_as_long_as_a_view():
    buffer = HostBuffer.lease(4096)
    alive = weakref.ref(buffer)
    flat = buffer.view_as_tensor(1024, torch.float32)
    assert flat.shape == (1024,) and torch.count_nonzero(flat) == 0
    view = flat[100:200].view(10, 10)
    view.fill_(2.5)
    del buffer, flat
    gc.collect()
    assert alive() is not None and view.sum() == 250.0
    del view
    gc.collect()
    assert alive() is None


def test_unregistered_buffer_records_no_use():
    buffer = HostBuffer.lease(16)
    buffer.record_use()   # nothing to wait for: the memory was never page-locked
    assert buffer.registered_address == 0 and buffer.last_use is None


def _smaps_entry(address: int) -> dict[str, str]:
    """This process's /proc/self/smaps fields for the mapping that holds `address`."""
    entry = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:           # a mapping's first line: start-end perms ...
            if entry is not None:
                break
            start, end = (int(x, 16) for x in head.split("-"))
            entry = {} if start <= address < end else None
        elif entry is not None:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry or {}


def test_buffer_asks_for_huge_pages_where_the_kernel_has_them():
    """Faulting 80 MiB in 4 KiB pages took 39 ms, in 2 MiB pages 10.5 ms (host_buffer.py)."""
    buffer = HostBuffer.lease(8 * 2**20)
    flat = buffer.view_as_tensor(2 * 2**20, torch.float32)
    flat.fill_(1.0)                                   # fault every page in
    entry = _smaps_entry(flat.data_ptr())
    assert entry, "the buffer's mapping is not in /proc/self/smaps"
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if setting.exists() and "[never]" not in setting.read_text():
        assert entry.get("THPeligible") == "1", entry
    else:                                             # no huge pages here: plain pages, same contents
        assert entry.get("AnonHugePages", "0 kB") == "0 kB"
    assert flat.sum() == 2 * 2**20


def test_a_freed_buffer_is_recycled_zeroed_unless_the_next_writes_it_all(host_buffer_pool):
    nbytes = 3 * 4096 + 8
    first = HostBuffer.lease(nbytes).view_as_tensor(nbytes // 4, torch.float32)
    first.fill_(7.0)
    address = first.data_ptr()
    del first
    gc.collect()
    assert host_buffer_pool.num_free(nbytes) == 1               # back in the pool once its last view is gone
    again = HostBuffer.lease(nbytes).view_as_tensor(nbytes // 4, torch.float32)
    assert again.data_ptr() == address and torch.count_nonzero(again) == 0   # same memory, zeroed
    again.fill_(5.0)
    del again
    gc.collect()
    kept = HostBuffer.lease(nbytes, zeroed=False).view_as_tensor(nbytes // 4, torch.float32)
    assert kept.data_ptr() == address and bool((kept == 5.0).all())          # its writer overwrites all


def test_the_pool_keeps_a_few_blocks_per_size(host_buffer_pool):
    nbytes = 5 * 4096 + 24
    leases = [HostBuffer.lease(nbytes) for _ in range(FREE_BLOCKS_PER_SIZE + 2)]
    assert len({b.view_as_tensor(1, torch.uint8).data_ptr() for b in leases}) == len(leases)
    del leases
    gc.collect()
    assert host_buffer_pool.num_free(nbytes) == FREE_BLOCKS_PER_SIZE   # the rest were unmapped


def test_reserved_blocks_are_kept_and_take_leases_of_any_smaller_size(host_buffer_pool):
    """An engine reserves blocks for its largest adapter before any arrives (LoRAManager
    .host_buffer_reservations); an adapter of any size packs into one of them."""
    nbytes, count = 4 * 4096, FREE_BLOCKS_PER_SIZE + 1
    assert all(HostBuffer.reserve(nbytes, up_to=count, register=False) for _ in range(count))
    assert not HostBuffer.reserve(nbytes, up_to=count, register=False)   # a second engine's: none more
    assert HostBuffer.reserve(2 * 4096, up_to=1, register=False)
    assert host_buffer_pool.num_free(nbytes) == count and host_buffer_pool.num_free(2 * 4096) == 1

    small = HostBuffer.lease(4096 + 8)               # none free of its size: the smallest reserved that holds it
    assert small.reserved and host_buffer_pool.num_free(2 * 4096) == 0
    first = small.view_as_tensor(1024, torch.float32)
    assert torch.count_nonzero(first) == 0
    first.fill_(3.0)
    address = first.data_ptr()
    del small, first
    gc.collect()
    assert host_buffer_pool.num_free(2 * 4096) == 1 and host_buffer_pool.num_free(4096 + 8) == 0
    again = HostBuffer.lease(2000).view_as_tensor(500, torch.float32)
    assert again.data_ptr() == address and torch.count_nonzero(again) == 0   # the earlier lease's bytes zeroed
    del again

    assert not HostBuffer.lease(nbytes + 1).reserved  # larger than every reserved block: fresh memory
    leases = [HostBuffer.lease(nbytes) for _ in range(count + 1)]
    assert [b.reserved for b in leases] == [True] * count + [False]
    del leases
    gc.collect()
    assert host_buffer_pool.num_free(nbytes) == count   # every reserved one kept, the other unmapped


def test_a_reservation_without_memory_warns_and_loads_go_on(host_buffer_pool, monkeypatch, caplog):
    """Reserving is an optimisation: without memory to spare the engine starts anyway and
    adapters take fresh memory as they load."""
    from loraplex.core.lora import host_buffer

    def no_memory(nbytes):
        raise OSError(12, "Cannot allocate memory")

    block_type = host_buffer._Block
    monkeypatch.setattr(host_buffer, "_Block", no_memory)
    assert not HostBuffer.reserve(4096, up_to=2, register=False)
    assert host_buffer_pool.num_free(4096) == 0 and "could not reserve 4096 bytes" in caplog.text
    monkeypatch.setattr(host_buffer, "_Block", block_type)
    lease = HostBuffer.lease(4096)
    assert not lease.reserved and torch.count_nonzero(lease.view_as_tensor(1024, torch.float32)) == 0
