"""HostBuffer: the memory packed adapters live in (page-locking itself needs CUDA: gpu_check.py)."""

from __future__ import annotations

import gc
import weakref

import torch

from loraplex.core.lora.host_buffer import HostBuffer


def test_buffer_starts_zero_and_lives_as_long_as_a_view():
    buffer = HostBuffer(4096, register=False)
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
    buffer = HostBuffer(16, register=False)
    buffer.record_use()   # nothing to wait for: the memory was never page-locked
    assert buffer.registered_address == 0 and buffer.last_use is None
