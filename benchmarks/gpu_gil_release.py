"""Which steps of packing an adapter into page-locked memory let Python's GIL go?

    PYTHONPATH=src python3 benchmarks/gpu_gil_release.py        # needs CUDA (page-locking)

A loader thread that keeps the GIL through a long system call stops every other thread of
the engine process, the step loop included. For 80 MiB (an 8B rank-16 adapter), a thread
does each step six times while the main thread counts turns of a Python loop: about 100% of
the loop's pace beside a sleeping thread means the step let the GIL go; far less, that it
kept it. Steps: a mapping faulted in by MAP_POPULATE (HostBuffer before c858749), os.preadv
of a file into a fresh HostBuffer (faulting it), and cudaHostRegister of present pages and
of pages not yet faulted. Prints each step's median time and the loop's pace.
"""

from __future__ import annotations

import mmap
import os
import statistics
import tempfile
import threading
import time

import torch

from loraplex.core.lora.host_buffer import HostBuffer

NBYTES = 80 * 2**20


def spin_while(alive) -> float:
    """Loop turns per second until alive() is false."""
    turns, start = 0, time.perf_counter()
    while alive():
        turns += 1
    return turns / (time.perf_counter() - start)


def main() -> None:
    torch.cuda.init()
    sleeper = threading.Thread(target=time.sleep, args=(0.5,))
    sleeper.start()
    alone = spin_while(sleeper.is_alive)            # the same loop beside a thread that needs no GIL
    with tempfile.NamedTemporaryFile() as blob:
        blob.write(os.urandom(NBYTES))
        blob.flush()
        fd = os.open(blob.name, os.O_RDONLY)

        def fresh(count: int) -> list:
            return [HostBuffer.lease(NBYTES) for _ in range(count)]

        def faulted(count: int) -> list:
            buffers = fresh(count)
            for buffer in buffers:
                buffer.view_as_tensor(NBYTES, torch.uint8).fill_(1)
            return buffers

        populate = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        steps = {
            "mmap with MAP_POPULATE": (lambda count: range(count), lambda _: mmap.mmap(-1, NBYTES, flags=populate)),
            "os.preadv into a fresh HostBuffer (faults it)": (fresh, lambda b: os.preadv(fd, [b], 0)),
            "cudaHostRegister, pages present": (faulted, lambda b: b.register()),
            "cudaHostRegister, pages not faulted yet": (fresh, lambda b: b.register()),
        }
        for name, (make, step) in steps.items():
            items, times = make(6), []

            def work() -> None:
                for item in items:
                    start = time.perf_counter()
                    step(item)
                    times.append((time.perf_counter() - start) * 1e3)
            thread = threading.Thread(target=work)
            thread.start()
            pace = spin_while(thread.is_alive)
            thread.join()
            print(f"{name}: {statistics.median(times):.1f} ms each; the main thread's loop ran at "
                  f"{pace / alone:.0%} of its pace alone", flush=True)
        os.close(fd)


if __name__ == "__main__":
    main()
