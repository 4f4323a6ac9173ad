"""Structural validation of a PEFT LoRA adapter directory (no model needed).

The engine's loader checks shapes against the model later; this module checks
what any resolver can check before an adapter is accepted into the cache.

Its inputs may be hostile (an adapter from a bucket anyone can write to), so
sizes, counts and nesting are bounded before anything is parsed: a JSON
document nested 100,000 deep or a header that lists a million tensors is
refused with AdapterInvalidError, never a RecursionError or a memory spike.
Messages name the adapter by `where` (default: its path) so that callers
serving downloads can name the source instead of a server-side directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from loraplex.errors import AdapterInvalidError, AdapterMismatchError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# safetensors' own limit on a header. A real adapter's is about 150 bytes per tensor.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
# A LoRA on all seven projections of an 80-layer model has 1,120 tensors.
MAX_SAFETENSORS_TENSORS = 100_000
# PEFT configs are a few KiB (tens with a per-layer rank_pattern).
MAX_ADAPTER_CONFIG_BYTES = 4 * 1024 * 1024
# A safetensors header is 3 deep ({name: {"shape": [...]}}), a PEFT config 3-4.
MAX_JSON_DEPTH = 32

_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.)*+"', re.DOTALL)   # possessive: linear time
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)


@dataclass(frozen=True)
class AdapterFiles:
    """What validate_adapter_dir found: the parsed config, the weights file and, for
    safetensors weights, the parsed header (None for pickle weights)."""
    path: Path
    config: dict
    weights_path: Path
    header: dict | None = None


def validate_adapter_dir(path: str | os.PathLike, *, allow_pickle: bool = False,
                         where: str | None = None) -> AdapterFiles:
    """Check that `path` holds a usable PEFT LoRA adapter; raise AdapterInvalidError if not.
    `where` names the adapter in messages (default: "adapter '<path>'")."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterInvalidError(f"{where} does not exist (no such directory)" if where
                                  else f"adapter directory {str(path)!r} does not exist")
    where = where or f"adapter {str(path)!r}"
    config = read_adapter_config(path, where)
    weights = path / SAFETENSORS_FILE
    header = None
    if weights.is_file():
        header = check_safetensors_file(weights, where)
    elif (path / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterInvalidError(
                f"{where} has only pickle weights ({PICKLE_FILE}); pickle can run "
                f"arbitrary code, so it is refused. Convert it to {SAFETENSORS_FILE}, or allow "
                f"it explicitly (LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS=1 for resolvers, "
                f"--allow-pickle-lora-weights for the engine)")
        weights = path / PICKLE_FILE
    else:
        raise AdapterInvalidError(f"{where} has no weights file; expected {SAFETENSORS_FILE}")
    return AdapterFiles(path=path, config=config, weights_path=weights, header=header)


def read_adapter_config(path: Path, where: str | None = None) -> dict:
    where = where or f"adapter {str(path)!r}"
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalidError(f"{where} has no {CONFIG_FILE}")
    try:
        size = config_path.stat().st_size
        if size > MAX_ADAPTER_CONFIG_BYTES:
            raise AdapterInvalidError(f"{where}: {CONFIG_FILE} is {size} bytes; a PEFT config is a few KiB "
                                      f"(the limit is {MAX_ADAPTER_CONFIG_BYTES})")
        config = parse_json(config_path.read_bytes(), f"{where}: {CONFIG_FILE}", kind="valid JSON")
    except OSError as e:
        raise AdapterInvalidError(f"{where}: {CONFIG_FILE} cannot be read ({e.strerror})") from None
    if not isinstance(config, dict):
        raise AdapterInvalidError(f"{where}: {CONFIG_FILE} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        # Another PEFT method: not a LoRA adapter at all, which resolvers treat as "not mine".
        raise AdapterMismatchError(f"{where} has peft_type {peft_type!r}; only 'LORA' adapters are supported")
    return config


def check_safetensors_file(path: Path, where: str | None = None) -> dict:
    """Parse a safetensors header and check the file is complete; return the header."""
    where = where or f"adapter {str(path.parent)!r}"
    what = f"{where}: {path.name}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterInvalidError(f"{what} is truncated (shorter than a safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
                raise AdapterInvalidError(f"{what} is not a safetensors file or is truncated "
                                          f"(header length {header_len}, file size {size})")
            raw = f.read(header_len)
    except OSError as e:
        raise AdapterInvalidError(f"{what} cannot be read ({e.strerror})") from None
    # Each tensor's entry has one "data_offsets": counting them bounds the parse's size.
    if raw.count(b'"data_offsets"') > MAX_SAFETENSORS_TENSORS:
        raise AdapterInvalidError(f"{what} lists more than {MAX_SAFETENSORS_TENSORS} tensors; "
                                  f"that is not a LoRA adapter")
    header = parse_json(raw, what, kind="a safetensors file (unreadable header)")
    if not isinstance(header, dict):
        raise AdapterInvalidError(f"{what} is not a safetensors file (its header is not an object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            raise AdapterInvalidError(f"{what}: tensor {name[:80]!r} has invalid data_offsets {offsets!r:.80} "
                                      f"(two byte offsets, start <= end, expected); the file is corrupt")
        data_end = max(data_end, offsets[1])
    if 8 + header_len + data_end > size:
        raise AdapterInvalidError(f"{what} is truncated: its header describes {8 + header_len + data_end} "
                                  f"bytes but the file has {size}")
    return header


def parse_json(raw: bytes, what: str, *, kind: str) -> object:
    """json.loads, with the nesting bounded first and every failure an AdapterInvalidError."""
    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise AdapterInvalidError(f"{what} is nested {depth} levels deep (the limit is {MAX_JSON_DEPTH}); "
                                  f"the file is corrupt or hostile")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterInvalidError(f"{what} is not {kind}: {str(e)[:200]}") from None


def json_depth(raw: bytes, chunk: int = 1 << 22) -> int:
    """How deeply the arrays and objects of a JSON text nest, without parsing it.

    Strings are blanked out first (brackets inside them do not count); then the running
    sum of +1 per '[' / '{' and -1 per ']' / '}' is taken a chunk at a time (numpy, so a
    hostile 100 MB header costs a fraction of a second and bounded memory)."""
    brackets = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    depth = deepest = 0
    for start in range(0, len(brackets), chunk):
        part = brackets[start:start + chunk]
        steps = np.isin(part, _OPEN).astype(np.int32) - np.isin(part, _CLOSE).astype(np.int32)
        running = np.cumsum(steps) + depth
        if len(running):
            deepest = max(deepest, int(running.max()))
            depth = int(running[-1])
    return deepest


def base_model_compatible(adapter_base: str | None, served_base: str | None,
                          served_aliases: tuple[str, ...] = ()) -> bool:
    """Whether an adapter trained on `adapter_base` may run on the served model.

    Forgiving on purpose: the same string, the same path after normalisation,
    the same final path component ("meta-llama/Llama-3-8B" vs "/models/Llama-3-8B"),
    or a match with any of the served model's aliases (e.g. --served-model-name).
    An empty adapter value is accepted (with a warning from the caller).
    """
    if not adapter_base or not served_base:
        return True
    candidates = {served_base, *served_aliases}

    def norm(s: str) -> str:
        return str(PurePosixPath(s.replace("\\", "/").rstrip("/")))

    def last(s: str) -> str:
        return norm(s).rsplit("/", 1)[-1].lower()

    a = norm(adapter_base)
    return any(a == norm(c) or last(adapter_base) == last(c) for c in candidates)
