"""Structural validation of a PEFT LoRA adapter directory (no model needed).

The engine's loader checks shapes against the model later; this module checks
what any resolver can check before an adapter is accepted into the cache.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from loraplex.errors import AdapterInvalidError, AdapterMismatchError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# Enough for any real adapter header; guards against a hostile length field.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class AdapterFiles:
    """What validate_adapter_dir found: the parsed config and the weights file."""
    path: Path
    config: dict
    weights_path: Path


def validate_adapter_dir(path: str | os.PathLike, *, allow_pickle: bool = False) -> AdapterFiles:
    """Check that `path` holds a usable PEFT LoRA adapter; raise AdapterInvalidError if not."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterInvalidError(f"adapter directory {str(path)!r} does not exist")
    config = read_adapter_config(path)
    weights = path / SAFETENSORS_FILE
    if weights.is_file():
        check_safetensors_file(weights)
    elif (path / PICKLE_FILE).is_file():
        if not allow_pickle:
            raise AdapterInvalidError(
                f"adapter {str(path)!r} has only pickle weights ({PICKLE_FILE}); pickle can run "
                f"arbitrary code, so it is refused. Convert it to {SAFETENSORS_FILE}, or allow "
                f"it explicitly (LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS=1 for resolvers, "
                f"--allow-pickle-lora-weights for the engine)")
        weights = path / PICKLE_FILE
    else:
        raise AdapterInvalidError(f"adapter {str(path)!r} has no weights file; expected {SAFETENSORS_FILE}")
    return AdapterFiles(path=path, config=config, weights_path=weights)


def read_adapter_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterInvalidError(f"adapter {str(path)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterInvalidError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterInvalidError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        # Another PEFT method: not a LoRA adapter at all, which resolvers treat as "not mine".
        raise AdapterMismatchError(f"adapter {str(path)!r} has peft_type {peft_type!r}; only 'LORA' "
                                   f"adapters are supported")
    return config


def check_safetensors_file(path: Path) -> dict:
    """Parse a safetensors header and check the file is complete; return the header."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise AdapterInvalidError(f"{path} is truncated (shorter than a safetensors header)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
                raise AdapterInvalidError(f"{path} is not a safetensors file or is truncated "
                                          f"(header length {header_len}, file size {size})")
            header = json.loads(f.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterInvalidError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise AdapterInvalidError(f"{path} is not a safetensors file (header is not an object)")
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise AdapterInvalidError(f"{path}: tensor {name!r} has no valid data_offsets") from None
        data_end = max(data_end, int(end))
    if 8 + header_len + data_end > size:
        raise AdapterInvalidError(f"{path} is truncated: its header describes {8 + header_len + data_end} "
                                  f"bytes but the file has {size}")
    return header


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
