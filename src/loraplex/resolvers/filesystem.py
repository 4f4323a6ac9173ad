"""The filesystem resolver (plugin `lora_filesystem_resolver`).

VLLM_LORA_RESOLVER_CACHE_DIR names a directory; the adapter `name` is the
PEFT LoRA adapter in `<dir>/<name>/` (for `org/name`, `<dir>/org/name/`).
The request points at that directory itself: nothing is copied.

- no such directory (or the cache directory itself does not exist yet): None
- a directory a remote resolver downloaded into the same directory (it holds
  the download cache's manifest): None, so the remote resolver, which keeps
  it in step with its source and may evict it, stays its only owner
- not this resolver's adapter, as in vLLM: no adapter_config.json, a PEFT method
  other than LoRA, or trained on a different base model: None, with the reason
  reported to the chain (report_skipped), which names it if no resolver finds a
  usable adapter
- a LoRA adapter for this model that is broken (bad adapter_config.json,
  missing / truncated / non-safetensors weights, pickle weights while
  LORAPLEX_ALLOW_PICKLE_LORA_WEIGHTS is off): AdapterInvalidError naming the reason.

Symbolic links inside the directory are followed, wherever they point: the
directory belongs to the operator (adapter names cannot climb out of it, see
names.py), and linking adapters in from elsewhere is a deliberate act there.
The request's lora_path is the path inside the directory, not the link's target.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loraplex.errors import AdapterMismatchError, ConfigError
from loraplex.lora_request import LoRARequest, lora_id_for_name
from loraplex.plugins.hookspecs import hookimpl
from loraplex.resolvers.base import LoRAResolver, report_skipped
from loraplex.resolvers.cache import CACHE_DIR_ENV, MANIFEST_FILE, check_cache_name
from loraplex.resolvers.env import allow_pickle_lora_weights
from loraplex.resolvers.validation import (CONFIG_FILE, base_model_compatible, read_adapter_config,
                                           validate_adapter_dir)

logger = logging.getLogger(__name__)

PLUGIN_NAME = "lora_filesystem_resolver"

# Checking an adapter (its header parsed in Python) holds the GIL. Many at once on the event
# loop's executor take turns with it and all finish late (32 first requests at once on an
# H100 host: the first resolved after 136 ms, the last after 222); here they go two at a time
# in order of arrival, so the first adapters reach the engine's loaders at once. Two, so that
# one slow stat on a network filesystem does not hold up the rest.
_CHECKERS = ThreadPoolExecutor(2, thread_name_prefix="loraplex-fs-resolver")


async def _in_turn(fn, *args):
    """fn(*args) on a _CHECKERS thread, in the caller's context (as asyncio.to_thread runs it:
    report_skipped reaches the resolver chain through a context variable)."""
    return await asyncio.get_running_loop().run_in_executor(_CHECKERS, contextvars.copy_context().run, fn, *args)


class FilesystemResolver(LoRAResolver):
    """Adapters stored as `<lora_cache_dir>/<lora_name>/` (PEFT format)."""

    def __init__(self, lora_cache_dir: str | os.PathLike, *, allow_pickle: bool | None = None) -> None:
        self.lora_cache_dir = Path(lora_cache_dir)
        if self.lora_cache_dir.exists() and not self.lora_cache_dir.is_dir():
            raise ConfigError(f"LoRA cache directory {str(self.lora_cache_dir)!r} is not a directory")
        if not self.lora_cache_dir.exists():
            # vLLM allows it, and so do we: adapters are found once it is created.
            logger.info("LoRA cache directory %s does not exist yet; adapters put there once it "
                        "does will be found", self.lora_cache_dir)
        self.allow_pickle = allow_pickle_lora_weights() if allow_pickle is None else allow_pickle

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        check_cache_name(lora_name)  # also refuses the download cache's '.loraplex*' bookkeeping
        # Stat and header reads can block on network filesystems; keep the event loop free.
        return await _in_turn(self._resolve, base_model_name, lora_name)

    def change_token(self, lora_name: str) -> tuple[int | None, ...]:
        """The mtimes of the cache directory and of each directory on the way to the
        adapter's: creating the adapter (or the cache directory) changes one of them."""
        path, token = self.lora_cache_dir, []
        for part in ("", *lora_name.strip("/").split("/")):
            path = path / part if part else path
            try:
                token.append(os.stat(path).st_mtime_ns)
            except OSError:   # missing: what lies below it is missing too
                token.append(None)
                break
        return tuple(token)

    async def _get_lora_req_from_path(self, lora_name: str, lora_path: str,
                                      base_model_name: str) -> LoRARequest | None:
        """vLLM's helper for resolvers built on this one (e.g. a resolver that downloads
        into a directory first): the request for `lora_path` if it holds a usable LoRA
        adapter for `base_model_name`, else None."""
        return await _in_turn(self._request_for_path, lora_name, Path(lora_path), base_model_name)

    def _resolve(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        adapter_dir = self.lora_cache_dir / lora_name
        if (adapter_dir / MANIFEST_FILE).exists():
            return None   # a remote resolver's download: its own to serve
        return self._request_for_path(lora_name, adapter_dir, base_model_name)

    def _request_for_path(self, lora_name: str, adapter_dir: Path, base_model_name: str) -> LoRARequest | None:
        if not adapter_dir.is_dir():
            return None
        if not (adapter_dir / CONFIG_FILE).is_file():
            report_skipped(f"{lora_name!r} is a directory without {CONFIG_FILE}, not a PEFT adapter")
            return None
        try:
            adapter_base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
            if adapter_base and not base_model_compatible(adapter_base, base_model_name):
                raise AdapterMismatchError(
                    f"adapter {lora_name!r} was trained on {adapter_base!r}, which does not match the "
                    f"served model {base_model_name!r} (neither the same path nor the same final name "
                    f"component); serve it with that base model")
        except AdapterMismatchError as e:
            report_skipped(str(e))
            return None
        # An empty base_model_name_or_path is served unchecked; the load warns (once).
        validate_adapter_dir(adapter_dir, allow_pickle=self.allow_pickle)
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_id_for_name(lora_name),
                           lora_path=str(adapter_dir), base_model_name=base_model_name)

    def __repr__(self) -> str:
        return f"FilesystemResolver({str(self.lora_cache_dir)!r})"


@hookimpl
def register_lora_resolvers(register):
    """Register the filesystem resolver when VLLM_LORA_RESOLVER_CACHE_DIR is set.

    Unset or blank: nothing is registered. Set to a missing directory: ConfigError,
    which the plugin loader reports with this plugin's name (and `loraplex
    plugins` shows and exits non-zero), since a typo there would otherwise make
    every adapter silently "not found" (vLLM refuses it at start-up too).
    """
    cache_dir = os.environ.get(CACHE_DIR_ENV, "").strip()
    if not cache_dir:
        return
    if not os.path.isdir(cache_dir) and _remote_resolver_downloads_here():
        # The same directory is the remote resolvers' download cache: create it
        # here rather than fail only because this plugin happens to load first.
        os.makedirs(cache_dir, exist_ok=True)
        logger.info("created %s=%s as the remote resolvers' download cache", CACHE_DIR_ENV, cache_dir)
    if not os.path.isdir(cache_dir):
        raise ConfigError(f"{CACHE_DIR_ENV}={cache_dir!r} does not exist or is not a directory; "
                          f"create it, fix the path, or unset {CACHE_DIR_ENV}")
    register(PLUGIN_NAME, FilesystemResolver(cache_dir))


def _remote_resolver_downloads_here() -> bool:
    """Whether a remote resolver that will load (configured and selected by
    VLLM_PLUGINS) uses VLLM_LORA_RESOLVER_CACHE_DIR as its download cache. A
    remote variable left set for a plugin that does not load must not turn a
    mistyped directory into a silently created, empty one."""
    from loraplex.plugins.selection import OPT_IN_PLUGINS, requested_plugins
    from loraplex.resolvers.hf_hub import PLUGIN_NAME as HUB_PLUGIN, REPO_LIST_ENV
    from loraplex.resolvers.remote import PLUGIN_NAME as S3_PLUGIN, URI_ENV

    requested = requested_plugins()
    for plugin, variable in ((S3_PLUGIN, URI_ENV), (HUB_PLUGIN, REPO_LIST_ENV)):
        selected = plugin not in OPT_IN_PLUGINS if requested is None else plugin in requested
        if selected and os.environ.get(variable, "").strip():
            return True
    return False
