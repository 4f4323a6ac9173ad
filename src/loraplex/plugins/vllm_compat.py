"""vLLM resolver plugins, unchanged: the `vllm.*` modules they import, served by loraplex.

A resolver package written for vLLM declares its entry point in the group
`vllm.general_plugins` and imports `vllm.lora.resolver`, `vllm.lora.request`,
`vllm.logger` and `vllm.envs`. When the real `vllm` package is not installed,
the loader loads such plugins inside `vllm_modules_mapped()`: while it lasts, an
import hook (a finder on sys.meta_path) answers those imports with modules made
of loraplex's own objects (VLLM_MODULES), so the plugin's resolver is a loraplex
LoRAResolver registered in loraplex's registry. Any other `vllm.*` import fails
with an ImportError that says which modules are provided.

The hook exists only while plugins of that group load. The modules it created
stay in sys.modules while a plugin that loaded holds them (a plugin may import
them again later, e.g. inside resolve_lora); `drop_vllm_modules()` removes them.

When `vllm` is installed nothing is mapped: importing it would bring vLLM's own
registry, which loraplex never reads, so the loader reports such plugins as not
adapted instead of loading them (see loader.py).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

VLLM_ENTRY_POINT_GROUP = "vllm.general_plugins"
_SHIM_MARKER = "__loraplex_vllm_shim__"


# ---- what each mapped module holds -----------------------------------------------

def _fill_request(module: types.ModuleType) -> None:
    from loraplex.lora_request import LoRARequest
    module.LoRARequest = LoRARequest


def _fill_resolver(module: types.ModuleType) -> None:
    from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry
    module.LoRAResolver = LoRAResolver
    module.LoRAResolverRegistry = LoRAResolverRegistry


def _fill_logger(module: types.ModuleType) -> None:
    module.init_logger = init_logger


def _fill_envs(module: types.ModuleType) -> None:
    module.__getattr__ = _env_value
    module.__dir__ = lambda: sorted(VLLM_ENVS)
    module.is_set = _env_is_set
    module.environment_variables = dict(VLLM_ENVS)


def _fill_filesystem_resolver(module: types.ModuleType) -> None:
    from loraplex.resolvers.filesystem import FilesystemResolver
    module.FilesystemResolver = FilesystemResolver


def _fill_hf_hub_resolver(module: types.ModuleType) -> None:
    from loraplex.resolvers.hf_hub import HfHubResolver
    module.HfHubResolver = HfHubResolver


def _package(module: types.ModuleType) -> None:
    pass


# Module name -> what fills it. Packages (their children are listed too) have __path__.
VLLM_MODULES: dict[str, Callable[[types.ModuleType], None]] = {
    "vllm": _package,
    "vllm.lora": _package,
    "vllm.lora.request": _fill_request,
    "vllm.lora.resolver": _fill_resolver,
    "vllm.logger": _fill_logger,
    "vllm.envs": _fill_envs,
    "vllm.plugins": _package,
    "vllm.plugins.lora_resolvers": _package,
    "vllm.plugins.lora_resolvers.filesystem_resolver": _fill_filesystem_resolver,
    "vllm.plugins.lora_resolvers.hf_hub_resolver": _fill_hf_hub_resolver,
}
_PACKAGES = {name.rsplit(".", 1)[0] for name in VLLM_MODULES if "." in name}


# ---- vllm.logger -------------------------------------------------------------------

class _VllmLogger(logging.LoggerAdapter):
    """A logging.Logger with vLLM's *_once methods (each message logged once per process)."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logger, {})
        self._seen: set[tuple[int, str, tuple]] = set()

    def _once(self, level: int, msg: str, *args, **kwargs) -> None:
        key = (level, msg, tuple(map(repr, args)))
        if key not in self._seen:
            self._seen.add(key)
            self.log(level, msg, *args, **kwargs)

    def debug_once(self, msg: str, *args, **kwargs) -> None:
        self._once(logging.DEBUG, msg, *args, **kwargs)

    def info_once(self, msg: str, *args, **kwargs) -> None:
        self._once(logging.INFO, msg, *args, **kwargs)

    def warning_once(self, msg: str, *args, **kwargs) -> None:
        self._once(logging.WARNING, msg, *args, **kwargs)


def init_logger(name: str) -> _VllmLogger:
    return _VllmLogger(logging.getLogger(name))


# ---- vllm.envs: read when asked, as vLLM does -------------------------------------

def _user_dir(xdg: str, default: str, leaf: str) -> str:
    return os.path.expanduser(os.path.join(os.environ.get(xdg) or default, leaf))


VLLM_ENVS: dict[str, Callable[[], object]] = {
    # vLLM splits on "," and keeps whitespace; unset is None, "" is [""] (no plugin matches).
    "VLLM_PLUGINS": lambda: None if "VLLM_PLUGINS" not in os.environ else os.environ["VLLM_PLUGINS"].split(","),
    "VLLM_LORA_RESOLVER_CACHE_DIR": lambda: os.environ.get("VLLM_LORA_RESOLVER_CACHE_DIR"),
    "VLLM_LORA_RESOLVER_HF_REPO_LIST": lambda: os.environ.get("VLLM_LORA_RESOLVER_HF_REPO_LIST"),
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": lambda: os.environ.get(
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "0").strip().lower() in ("1", "true"),
    "VLLM_CACHE_ROOT": lambda: os.path.expanduser(
        os.environ.get("VLLM_CACHE_ROOT") or _user_dir("XDG_CACHE_HOME", "~/.cache", "vllm")),
    "VLLM_CONFIG_ROOT": lambda: os.path.expanduser(
        os.environ.get("VLLM_CONFIG_ROOT") or _user_dir("XDG_CONFIG_HOME", "~/.config", "vllm")),
    "VLLM_LOGGING_LEVEL": lambda: os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper(),
    "VLLM_API_KEY": lambda: os.environ.get("VLLM_API_KEY"),
}


def _env_value(name: str) -> object:
    if name in VLLM_ENVS:
        return VLLM_ENVS[name]()
    raise AttributeError(f"loraplex's vllm.envs (the stand-in vLLM resolver plugins get) has no {name!r}; "
                         f"it provides {', '.join(sorted(VLLM_ENVS))}. Read other variables from os.environ")


def _env_is_set(name: str) -> bool:
    _env_value(name)   # an unknown name raises, as in vLLM
    return name in os.environ


# ---- the import hook --------------------------------------------------------------

class _VllmFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in VLLM_MODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname in _PACKAGES)
        if fullname.startswith("vllm."):
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: vLLM is not installed, and of vLLM's modules loraplex "
                f"provides to vLLM plugins only {', '.join(sorted(n for n in VLLM_MODULES if n not in _PACKAGES))} "
                f"(enough for LoRA resolver plugins)", name=fullname)
        return None

    def create_module(self, spec):
        return None   # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        setattr(module, _SHIM_MARKER, True)
        if module.__name__ in _PACKAGES:
            module.__path__ = []
        VLLM_MODULES[module.__name__](module)


def _is_stand_in(module: types.ModuleType) -> bool:
    return vars(module).get(_SHIM_MARKER, False)


def real_vllm_installed() -> bool:
    """Whether the real vllm package can be imported (our stand-in is not counted)."""
    loaded = sys.modules.get("vllm")
    if loaded is not None and not _is_stand_in(loaded):
        return True
    for finder in sys.meta_path:
        if isinstance(finder, _VllmFinder) or not hasattr(finder, "find_spec"):
            continue
        try:
            if finder.find_spec("vllm", None) is not None:
                return True
        except Exception:  # a broken third-party finder says nothing about vllm
            continue
    return False


@contextmanager
def vllm_modules_mapped() -> Iterator[None]:
    """Answer imports of VLLM_MODULES with loraplex's objects while the block runs.
    The caller checks real_vllm_installed() first: this never shadows the real vllm."""
    finder = _VllmFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def import_all() -> None:
    """Import every stand-in module (inside vllm_modules_mapped()), so that a plugin that
    imports one lazily, after the hook is gone, still finds it in sys.modules."""
    for name in VLLM_MODULES:
        importlib.import_module(name)


def drop_vllm_modules() -> None:
    """Remove the stand-in modules from sys.modules (no plugin needs them any more)."""
    for name in [n for n in list(sys.modules) if n == "vllm" or n.startswith("vllm.")]:
        module = sys.modules.get(name)
        if module is not None and _is_stand_in(module):
            del sys.modules[name]
