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
_ONE_KIND_OF_BRACKET = bytes.maketrans(b"{}", b"[]")
_NOT_A_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")
_BRACKETS_FOR_PASSES = 64 * 1024


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
    if json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise AdapterInvalidError(f"{what} is nested more than {MAX_JSON_DEPTH} levels deep (the limit); "
                                  f"the file is corrupt or hostile")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterInvalidError(f"{what} is not {kind}: {str(e)[:200]}") from None


def json_depth(raw: bytes, limit: int) -> int:
    """How deeply the arrays and objects of a JSON text nest, without parsing it: the depth,
    or limit + 1 for any depth above the limit.

    Strings are blanked out first (brackets inside them do not count), then everything but
    the brackets is dropped, both kinds made one. Brackets of the size of a real header
    (an 8B adapter's has about 2,700) are counted by C string methods that keep the GIL:
    each pass removes the innermost pairs, so a balanced text takes as many passes as it
    has levels, limit + 1 at most. Resolvers validate on worker threads of a busy server,
    where every call that lets the GIL go waits up to 5 ms to take it back (numpy's calls
    did, a dozen times a header: 2 ms of work took 90 next to a busy thread). More brackets
    than that (a hostile or giant header) take one running sum in numpy instead: a 100 MB
    header costs a fraction of a second either way."""
    brackets = _JSON_STRING.sub(b'""', raw).translate(_ONE_KIND_OF_BRACKET, _NOT_A_BRACKET)
    if len(brackets) > _BRACKETS_FOR_PASSES:
        deepest = depth = 0
        for start in range(0, len(brackets), 1 << 22):           # bounded memory
            steps = np.frombuffer(brackets, np.uint8, count=min(1 << 22, len(brackets) - start), offset=start)
            running = np.cumsum((steps == ord("[")).astype(np.int32) * 2 - 1) + depth
            deepest, depth = max(deepest, int(running.max())), int(running[-1])
        return min(deepest, limit + 1)
    depth = 0
    while brackets and depth <= limit:
        inner = brackets.replace(b"[]", b"")
        if len(inner) == len(brackets):
            break   # unbalanced: not JSON, as the parser says next
        brackets, depth = inner, depth + 1
    return depth


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
