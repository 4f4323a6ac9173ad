"""Entry-point discovery and loading of plugins, once per process.

Plugins come from two entry-point groups: `loraplex.plugins` (ours) and
`vllm.general_plugins` (vLLM's: resolver packages written for vLLM, unchanged).
A name declared in both is taken from `loraplex.plugins`. Either group's entry
point may name
- a pluggy plugin: a module (or object) with `@hookimpl` functions, whose
  `register_lora_resolvers(register)` hook is called with a `register` callback; or
- a zero-argument callable that registers resolvers itself through
  `LoRAResolverRegistry.register_resolver` (the vLLM style).
A vLLM plugin loads inside vllm_compat.vllm_modules_mapped(), where its `vllm.*`
imports get loraplex's objects; with the real vllm installed it is not loaded
(it would register with vLLM's registry) and its record says so.

Each plugin is loaded in isolation: one that fails to import, to register, or
that names an unknown hook is logged with its name and error, its partial
registrations are rolled back, and the other plugins load as usual.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

import pluggy

from loraplex.plugins import hookspecs, vllm_compat
from loraplex.plugins.selection import (PLUGINS_ENV, PluginSelection, requested_plugins,
                                        select_plugins)
from loraplex.plugins.vllm_compat import VLLM_ENTRY_POINT_GROUP
from loraplex.resolvers.base import LoRAResolver, LoRAResolverRegistry

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "loraplex.plugins"
ENTRY_POINT_GROUPS = (ENTRY_POINT_GROUP, VLLM_ENTRY_POINT_GROUP)   # the first wins a name


@dataclass
class PluginRecord:
    """What happened to one discovered plugin; `loraplex plugins` prints these."""
    name: str
    target: str                      # the entry point's "module:attr"
    distribution: str | None         # the package that declares it
    selected: bool                   # whether VLLM_PLUGINS (or its absence) chose it
    skip_reason: str | None = None   # why it was not selected
    loaded: bool = False
    style: str | None = None         # "pluggy" or "callable"
    error: str | None = None
    resolvers: list[str] = field(default_factory=list)  # in registration order
    group: str = ENTRY_POINT_GROUP   # the entry-point group it was found in


class _PluginState:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.records: list[PluginRecord] | None = None
        self.selection: PluginSelection | None = None
        self.manager = new_plugin_manager()


def new_plugin_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


_state = _PluginState()


def discover_entry_points() -> tuple[dict[str, EntryPoint], list[EntryPoint]]:
    """Installed plugins by name, and the entry points that lost their name to one found
    earlier: loraplex.plugins before vllm.general_plugins, then the first package."""
    found: dict[str, EntryPoint] = {}
    shadowed: list[EntryPoint] = []
    for group in ENTRY_POINT_GROUPS:
        for ep in entry_points(group=group):
            known = found.get(ep.name)
            if known is None:
                found[ep.name] = ep
            elif known.group != group:
                shadowed.append(ep)   # e.g. vLLM's own lora_filesystem_resolver
            elif known.value != ep.value:
                logger.warning("Plugin name %r is declared twice (%s and %s); using the first",
                               ep.name, known.value, ep.value)
    return found, shadowed


def load_plugins() -> list[PluginRecord]:
    """Discover and load plugins honouring VLLM_PLUGINS; once per process.

    Returns one record per discovered plugin: loaded ones first in load order
    (the resolver chain's order), then the skipped ones. Later calls return the
    same records without loading again; reset_plugins() starts over.
    """
    with _state.lock:
        if _state.records is not None:
            return _state.records
        discovered, shadowed = discover_entry_points()
        requested = requested_plugins()
        selection = select_plugins(list(discovered), requested)
        records: list[PluginRecord] = []
        _state.records, _state.selection = records, selection
        for name in selection.to_load:
            ep = discovered[name]
            record = _record(ep, selected=True)
            records.append(record)
            if ep.group == VLLM_ENTRY_POINT_GROUP:
                _load_vllm_plugin(ep, record, records, named=requested is not None)
            else:
                _load_one(ep, record, records)
        for name, reason in selection.skipped.items():
            records.append(_record(discovered[name], selected=False, skip_reason=reason))
        for ep in shadowed:
            records.append(_record(ep, selected=False, skip_reason=(
                f"the plugin of the same name in group {ENTRY_POINT_GROUP!r} is used instead")))
        if not any(r.loaded and r.group == VLLM_ENTRY_POINT_GROUP for r in records):
            vllm_compat.drop_vllm_modules()
        logger.info("Plugins loaded (%s %s): %s", PLUGINS_ENV,
                    "unset" if requested is None else f"= {','.join(requested)!r}",
                    ", ".join(r.name for r in records if r.loaded) or "none")
        return records


def missing_plugins() -> list[str]:
    """Names VLLM_PLUGINS asked for that are not installed (after load_plugins())."""
    load_plugins()
    return list(_state.selection.missing) if _state.selection else []


def get_plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager holding every loaded pluggy-style plugin, for calling
    further hooks (`get_plugin_manager().hook.<name>(...)`)."""
    load_plugins()
    return _state.manager


def resolver_order() -> list[tuple[str, str | None]]:
    """(resolver name, plugin name or None) in chain order: plugins' resolvers in
    load order, then resolvers registered directly (outside any plugin) in
    registration order. Only names still in the registry are listed."""
    records = load_plugins()
    registered = LoRAResolverRegistry.get_supported_resolvers()
    order: list[tuple[str, str | None]] = []
    seen: set[str] = set()
    for record in records:
        for name in record.resolvers:
            if name in registered and name not in seen:
                order.append((name, record.name))
                seen.add(name)
    order.extend((name, None) for name in registered if name not in seen)
    return order


def reset_plugins() -> None:
    """Forget loaded plugins and unregister their resolvers, so the next
    load_plugins() discovers again (for tests and re-configuration)."""
    with _state.lock:
        for record in _state.records or ():
            for name in record.resolvers:
                LoRAResolverRegistry.unregister_resolver(name)
        _state.records = None
        _state.selection = None
        _state.manager = new_plugin_manager()
        vllm_compat.drop_vllm_modules()


def _record(ep: EntryPoint, **fields) -> PluginRecord:
    dist = getattr(ep, "dist", None)
    return PluginRecord(name=ep.name, target=ep.value, distribution=dist.name if dist is not None else None,
                        group=ep.group, **fields)


def _load_vllm_plugin(ep: EntryPoint, record: PluginRecord, records: list[PluginRecord], *, named: bool) -> None:
    """A plugin of vLLM's group: loaded with its vllm.* imports mapped to loraplex."""
    if vllm_compat.real_vllm_installed():
        reason = (f"not adapted: it is a vLLM plugin (group {VLLM_ENTRY_POINT_GROUP!r}) and the vllm package is "
                  f"installed here, so its imports would load vLLM and register with vLLM's registry, which "
                  f"loraplex does not read. Run loraplex in an environment without vllm, or declare the plugin "
                  f"in group {ENTRY_POINT_GROUP!r} with loraplex imports")
        if named:   # asked for by name in VLLM_PLUGINS: a failure to report
            record.error = reason
            logger.error("Plugin %r (%s) is %s", record.name, record.target, reason)
        else:
            record.selected, record.skip_reason = False, reason
            logger.warning("Plugin %r (%s) is %s", record.name, record.target, reason)
        return
    with vllm_compat.vllm_modules_mapped():
        _load_one(ep, record, records)
        if record.loaded:
            vllm_compat.import_all()   # a later, lazy `import vllm.x` in the plugin still works
    if record.error:
        record.error += (" (a vLLM plugin: loraplex provides vllm.lora.resolver, vllm.lora.request, "
                         "vllm.logger and vllm.envs to it, enough for LoRA resolver plugins; see docs/vllm.md)")


def _load_one(ep: EntryPoint, record: PluginRecord, records: list[PluginRecord]) -> None:
    before = _registry_snapshot()
    try:
        plugin = ep.load()
    except Exception as e:  # a broken plugin must not take the others down
        _fail(record, f"import of {ep.value!r} failed: {type(e).__name__}: {e}", before)
        return
    try:
        if _hookimpl_names(plugin):
            record.style = "pluggy"
            _call_pluggy_plugin(plugin, record)
        elif callable(plugin):
            record.style = "callable"
            plugin()
        else:
            raise TypeError(f"{ep.value!r} is neither a pluggy plugin (a module or object with "
                            f"@loraplex.plugins.hookimpl functions) nor a zero-argument callable")
    except Exception as e:
        _fail(record, f"{type(e).__name__}: {e}", before)
        return
    record.resolvers = _registered_since(before)
    for other in records:
        # A name registered again by a later plugin now belongs to that plugin.
        if other is not record:
            other.resolvers = [n for n in other.resolvers if n not in record.resolvers]
    record.loaded = True
    logger.info("Loaded plugin %r (%s); resolvers: %s", record.name, record.style,
                ", ".join(record.resolvers) or "none (not configured)")


def _call_pluggy_plugin(plugin: object, record: PluginRecord) -> None:
    manager = _state.manager
    unknown = [n for n in _hookimpl_names(plugin) if not _is_known_hook(manager, n)]
    if unknown:
        known = ", ".join(sorted(n for n in vars(manager.hook) if _is_known_hook(manager, n)))
        raise TypeError(f"it implements unknown hook(s) {', '.join(unknown)}; known hooks: {known}")
    manager.register(plugin, name=record.name)
    try:
        others = [p for p in manager.get_plugins() if p is not plugin]
        call_hook = manager.subset_hook_caller("register_lora_resolvers", remove_plugins=others)
        call_hook(register=_register)
    except Exception:
        manager.unregister(plugin)
        raise


def _register(name: str, resolver: LoRAResolver) -> None:
    """The `register` callback hooks receive. Attribution to the plugin being
    loaded comes from a registry snapshot, so the vLLM-style plugins that call
    LoRAResolverRegistry directly are attributed the same way."""
    LoRAResolverRegistry.register_resolver(name, resolver)


def _hookimpl_names(plugin: object) -> list[str]:
    marker = f"{hookspecs.PROJECT_NAME}_impl"
    names = []
    for attr in dir(plugin):
        try:
            value = getattr(plugin, attr)
        except Exception:
            continue
        if hasattr(value, marker) and not attr.startswith("_"):
            names.append(attr)
    return names


def _is_known_hook(manager: pluggy.PluginManager, name: str) -> bool:
    return getattr(getattr(manager.hook, name, None), "spec", None) is not None


def _registry_snapshot() -> dict[str, LoRAResolver]:
    snapshot = {}
    for name in LoRAResolverRegistry.get_supported_resolvers():
        try:
            snapshot[name] = LoRAResolverRegistry.get_resolver(name)
        except KeyError:  # unregistered by another thread meanwhile
            pass
    return snapshot


def _registered_since(before: dict[str, LoRAResolver]) -> list[str]:
    """Names registered or replaced since `before`, in registry order."""
    after = _registry_snapshot()
    return [name for name, resolver in after.items() if before.get(name) is not resolver]


def _fail(record: PluginRecord, error: str, before: dict[str, LoRAResolver]) -> None:
    for name in _registered_since(before):
        if name in before:
            # It replaced an earlier plugin's resolver before failing: put that one back.
            LoRAResolverRegistry.register_resolver(name, before[name])
        else:
            LoRAResolverRegistry.unregister_resolver(name)
    record.error = error
    logger.error("Plugin %r (%s) failed to load and is disabled: %s", record.name, record.target, error)
