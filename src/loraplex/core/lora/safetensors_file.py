"""SafetensorsFile: an adapter file's tensors located, not read, then read straight into place.

Every torch op releases the GIL and takes it back, and a thread taking it back while
another thread runs Python waits up to the interpreter's switch interval (5 ms). An
8B-shaped adapter has 448 tensors; copied one torch op at a time (a few ops each), its
load took 2.2 s instead of 0.1 s next to a thread launching GPU work (H100 host,
benchmarks/bench_cpu_lora_load.py --burst), and 29 s instead of 81 ms next to a busy
pure-Python thread on a 2-core VM. So a tensor is first only described (FileTensor: dtype,
shape, where its bytes are); those whose bytes go unchanged into their packed place are
read by one os.preadv per contiguous run of the file (IOV_MAX pieces at most), which
releases the GIL once and copies from the page cache in the kernel, on any number of
loader threads at once. The others (another dtype, a tensor-parallel shard, a rank below
the packing's) are torch views of a private mapping of the file, made on demand.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.errors import AdapterInvalidError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


@dataclass(frozen=True)
class FileTensor:
    """One tensor of a safetensors file, not read: what it holds and where its bytes are."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int     # of its first byte, from the start of the file
    nbytes: int


class SafetensorsFile:
    def __init__(self, path: Path, header: dict, where: str):
        """`header` was checked by validation (it parses within bounds, and every tensor lies
        inside the file); each tensor's dtype, shape and byte span are checked against each
        other here. `where` names the adapter in errors."""
        self.path, self.where = path, where
        with open(path, "rb") as f:
            data_start = 8 + int.from_bytes(f.read(8), "little")
        self.tensors: dict[str, FileTensor] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype_name, shape, (start, end) = info.get("dtype"), info.get("shape"), info["data_offsets"]
            dtype = _DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
            if dtype is None:
                raise AdapterInvalidError(f"adapter {where}: tensor {name!r} in {path.name} has dtype "
                                          f"{dtype_name!r}; expected floating-point weights (F32, F16 or BF16)")
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise AdapterInvalidError(f"adapter {where}: tensor {name!r} in {path.name} has an invalid shape "
                                          f"{shape!r}; the file is corrupt")
            size = math.prod(shape) * dtype.itemsize
            if type(start) is not int or type(end) is not int or start < 0 or end - start != size:
                raise AdapterInvalidError(f"adapter {where}: tensor {name!r} in {path.name} spans bytes "
                                          f"{start}..{end}, but {shape} of {dtype_name} needs {size}; "
                                          f"the file is corrupt")
            self.tensors[name] = FileTensor(name, dtype, tuple(shape), data_start + start, size)
        self._mapped: torch.Tensor | None = None

    def tensor(self, t: FileTensor) -> torch.Tensor:
        """`t` as a tensor: a view of a private (copy-on-write) mapping of the file, whose pages
        are read as it is used (a copy where the file does not align it for its dtype)."""
        if self._mapped is None:
            self._mapped = torch.from_file(str(self.path), shared=False, size=self.path.stat().st_size,
                                           dtype=torch.uint8)
        data = self._mapped[t.offset: t.offset + t.nbytes]
        if t.offset % t.dtype.itemsize:
            data = data.clone()
        return data.view(t.dtype).view(t.shape)

    def read_into(self, pieces: list[tuple[FileTensor, memoryview]]) -> None:
        """Read each tensor's bytes into its memoryview (of exactly nbytes): one os.preadv per
        run of tensors that follow each other in the file."""
        pieces = sorted(pieces, key=lambda piece: piece[0].offset)
        with open(self.path, "rb", buffering=0) as f:
            start = 0
            while start < len(pieces):
                end, position = start, pieces[start][0].offset
                while end < len(pieces) and end - start < _IOV_MAX and pieces[end][0].offset == position:
                    position += pieces[end][0].nbytes
                    end += 1
                self._read_run(f.fileno(), pieces[start][0].offset, [view for _, view in pieces[start:end]])
                start = end

    def _read_run(self, fd: int, offset: int, views: list[memoryview]) -> None:
        while views:
            done = os.preadv(fd, views, offset)
            if done == 0:
                raise AdapterInvalidError(f"adapter {self.where}: {self.path.name} ended early (changed while "
                                          f"it was read?); replace it whole, then retry")
            offset += done
            while views and done >= len(views[0]):    # a short read: go on from where it stopped
                done -= len(views[0])
                views = views[1:]
            if done:
                views = [views[0][done:], *views[1:]]
