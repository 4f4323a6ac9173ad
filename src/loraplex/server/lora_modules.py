"""--lora-modules: the adapters a server loads at start-up, as vLLM's flag takes them.

Each item is `name=path` or a JSON object {"name", "path", "base_model_name",
"is_3d_lora_weight"}. `path` is a local adapter directory or, as in vLLM, a Hugging
Face Hub repo id (`org/repo`, `org/repo/sub/folder`, `org/repo@revision`), which is
downloaded through the Hub resolver's adapter cache (HF_ENDPOINT, HF_TOKEN,
VLLM_LORA_RESOLVER_CACHE_DIR apply) before the model loads. Both are checked before
the model loads, so a typo fails the start-up at once; rank and base-model checks
follow when the engine loads the adapter.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from loraplex.errors import AdapterInvalidError, AdapterNameError, ConfigError, ResolverError

_KEYS = {"name", "path", "base_model_name", "is_3d_lora_weight"}


@dataclass(frozen=True)
class LoRAModule:
    name: str
    path: str                           # as given: a directory or a Hub repo id
    base_model_name: str | None = None
    # vLLM's MoE weight-layout marker; no model loraplex serves is MoE, so it changes nothing.
    is_3d_lora_weight: bool = False


def parse_lora_module(text: str) -> LoRAModule:
    """One --lora-modules item: 'name=path' or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--lora-modules item {text!r} is not valid JSON ({e}); use "
                              f"'name=path' or '{{\"name\": ..., \"path\": ...}}'") from None
        unknown = set(spec) - _KEYS if isinstance(spec, dict) else set()
        if not isinstance(spec, dict) or unknown or not isinstance(spec.get("name"), str) \
                or not isinstance(spec.get("path"), str):
            raise ConfigError(f"--lora-modules JSON item {text!r} needs string keys 'name' and 'path' "
                              f"(and optionally 'base_model_name', 'is_3d_lora_weight'), nothing else")
        base = spec.get("base_model_name")
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"--lora-modules item {text!r}: base_model_name must be a string")
        is_3d = spec.get("is_3d_lora_weight", False)
        if not isinstance(is_3d, bool):
            raise ConfigError(f"--lora-modules item {text!r}: is_3d_lora_weight must be true or false")
        return LoRAModule(spec["name"], spec["path"], base, is_3d)
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--lora-modules item {text!r} must be 'name=path' or a JSON object "
                          f"with 'name' and 'path'")
    return LoRAModule(name, path)


def local_adapter_dirs(modules: list[LoRAModule], *, allow_pickle: bool) -> list[tuple[str, str, str | None]]:
    """(name, local directory, base_model_name) of each module: local directories are
    validated, Hub repo ids downloaded first. Raises ConfigError naming the module."""
    from loraplex.resolvers.validation import validate_adapter_dir

    resolved = []
    for module in modules:
        where = f"--lora-modules {module.name}={module.path}"
        path = module.path
        if not os.path.exists(path) and _looks_like_repo_id(path):
            path = _download_from_hub(module, where)
        try:
            validate_adapter_dir(path, allow_pickle=allow_pickle)
        except AdapterInvalidError as e:
            raise ConfigError(f"{where}: {e}; fix the path or drop the module") from None
        resolved.append((module.name, path, module.base_model_name))
    return resolved


def _looks_like_repo_id(path: str) -> bool:
    """'org/repo[/sub][@rev]': relative, two or more plain components, no local meaning."""
    from loraplex.resolvers.names import check_adapter_name

    name = path.partition("@")[0]
    if name.startswith((".", "~")) or "/" not in name:
        return False
    try:
        check_adapter_name(name)
    except AdapterNameError:
        return False
    return True


def _download_from_hub(module: LoRAModule, where: str) -> str:
    """The adapter cache's copy of the Hub adapter `module.path` (downloaded if needed)."""
    from loraplex.resolvers.hf_hub import HfHubResolver

    name, _, revision = module.path.partition("@")
    repo_id = "/".join(name.split("/")[:2])
    try:
        resolver = HfHubResolver([f"{repo_id}@{revision}" if revision else repo_id])
        # Blocking on purpose: the server has not started; the engine checks the base model.
        path = resolver.cache.get(name, resolver.source, None)
    except (ResolverError, ConfigError, AdapterInvalidError) as e:
        raise ConfigError(f"{where}: not a local directory, and downloading it from the Hugging Face Hub "
                          f"failed: {e}") from None
    if path is None:
        raise ConfigError(f"{where}: not a local directory, and the Hugging Face Hub repo {repo_id} has no "
                          f"adapter_config.json at {name!r}; fix the path or the repo id")
    return str(path)
