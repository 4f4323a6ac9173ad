"""Host-to-device copies that never wait for the device.

With overlapped scheduling the host prepares step N+1 while the device still runs step N.
A blocking host-to-device copy (torch.tensor(..., device="cuda"), .to("cuda")) waits for
the stream to drain, which would put the host back in lock step with the device. Every
value the step path sends to the device goes through device_tensor instead.
"""

from __future__ import annotations

import torch


def device_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list, numpy array or CPU tensor) as a tensor on `device`, without waiting.

    On CUDA the values go through page-locked memory: the copy is truly asynchronous, and
    torch's caching host allocator reuses that memory only once the copy has finished.
    On the CPU this is a plain conversion.
    """
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def copy_to_device(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst.copy_(src) for a CPU `src` without waiting: through page-locked memory on CUDA (a
    copy from pageable memory may wait for the stream; the caching host allocator keeps the
    page-locked copy alive until the transfer has run)."""
    if dst.device.type == "cuda" and not src.is_pinned():
        src = src.pin_memory()
    dst.copy_(src, non_blocking=True)
