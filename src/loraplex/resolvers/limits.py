"""What a remote adapter may contain: which of its files are downloaded, how many and how big.

A remote resolver lists a directory (an S3 prefix, a Hub folder) that whoever can write
there may fill with anything. The adapter cache downloads only the files serving reads:

    adapter_config.json          always (required)
    adapter_model.safetensors    the weights
    adapter_model.bin            the weights, only when pickle weights are allowed
                                 (LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS) and there is no
                                 adapter_model.safetensors

Everything else beside them (README.md, tokenizer files, training arguments, optimizer
states, checkpoints) is ignored: loraplex reads none of it (adapters that bring their own
tokenizer or embeddings are not supported), and leaving it out keeps the cache's byte count
to what is served. Ignored files do not change the adapter's fingerprint either, so a new
README at the source does not trigger a download.

Two limits, checked on the source's listing before anything is downloaded; an adapter over
either is refused with AdapterInvalidError (HTTP 400) naming the limit:

    LORAPLEX_RESOLVER_MAX_ADAPTER_FILES  entries the adapter's directory may list (256)
    LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES  size of the files downloaded (16 GiB: rank 256 on
                                         all seven projections of a 70B Llama is 13.3 GB
                                         in float32)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping

from loraplex.errors import AdapterInvalidError, ConfigError
from loraplex.resolvers.source import RemoteAdapter
from loraplex.resolvers.validation import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE

MAX_FILES_ENV = "LORAPLEX_RESOLVER_MAX_ADAPTER_FILES"
MAX_BYTES_ENV = "LORAPLEX_RESOLVER_MAX_ADAPTER_BYTES"
DEFAULT_MAX_FILES = 256
DEFAULT_MAX_BYTES = 16 * 2**30


@dataclass(frozen=True)
class AdapterLimits:
    max_files: int = DEFAULT_MAX_FILES
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for field, value in (("max_files", self.max_files), ("max_bytes", self.max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"AdapterLimits.{field} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "AdapterLimits":
        return cls(max_files=env_positive_int(env, MAX_FILES_ENV, DEFAULT_MAX_FILES),
                   max_bytes=env_positive_int(env, MAX_BYTES_ENV, DEFAULT_MAX_BYTES))

    def select(self, lora_name: str, remote: RemoteAdapter, *, allow_pickle: bool) -> RemoteAdapter:
        """`remote` reduced to the files to download; AdapterInvalidError if it breaks a limit
        or has no usable weights (said before any download)."""
        where = f"adapter {lora_name!r} at {remote.location}"
        if len(remote.files) > self.max_files:
            raise AdapterInvalidError(
                f"{where} lists {len(remote.files)} files; an adapter directory holds {CONFIG_FILE} and "
                f"its weights, and at most {self.max_files} entries are accepted ({MAX_FILES_ENV})")
        by_name = {f.name: f for f in remote.files}
        if CONFIG_FILE not in by_name:
            raise AdapterInvalidError(f"{where} has no {CONFIG_FILE}")
        if SAFETENSORS_FILE in by_name:
            weights = SAFETENSORS_FILE
        elif PICKLE_FILE in by_name:
            if not allow_pickle:
                raise AdapterInvalidError(
                    f"{where} has only pickle weights ({PICKLE_FILE}); pickle can run arbitrary code, so "
                    f"it is refused. Convert it to {SAFETENSORS_FILE}, or allow it explicitly "
                    f"(LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS=1)")
            weights = PICKLE_FILE
        else:
            raise AdapterInvalidError(f"{where} has no weights file; expected {SAFETENSORS_FILE}")
        files = (by_name[CONFIG_FILE], by_name[weights])
        total = sum(f.size for f in files)
        if total > self.max_bytes:
            raise AdapterInvalidError(
                f"{where} is {total} bytes, over the limit of {self.max_bytes} bytes per adapter "
                f"({MAX_BYTES_ENV}); raise it if the adapter is genuine")
        return dataclasses.replace(remote, files=files)


def env_positive_int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    """A positive integer variable; unset or blank: `default`. Anything else is a ConfigError."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return value
