"""The text and JSON views of the plugin records that `loraplex plugins` prints."""

from __future__ import annotations

import json
from dataclasses import asdict

from loraplex.plugins.loader import ENTRY_POINT_GROUPS, PluginRecord
from loraplex.plugins.selection import PLUGINS_ENV, requested_plugins


def plugin_status(record: PluginRecord) -> str:
    if record.loaded:
        return "loaded"
    return "error" if record.error else "skipped"


def format_plugin_report(records: list[PluginRecord], chain: list[tuple[str, str | None]],
                         missing: list[str]) -> str:
    """Plugins in load order (skipped ones last) with the entry-point group each came
    from, then the resolver chain."""
    requested = requested_plugins()
    lines = [f"{PLUGINS_ENV}: " + ("unset (all plugins except opt-in ones)" if requested is None
                                   else repr(",".join(requested)))]
    if not records:
        lines.append(f"No plugins installed in entry-point groups {' or '.join(map(repr, ENTRY_POINT_GROUPS))}.")
    width = max([len(r.name) for r in records] + [6])
    for record in records:
        status = plugin_status(record)
        if record.loaded:
            detail = "resolvers: " + (", ".join(record.resolvers) or "none (not configured)")
        elif record.error:
            detail = record.error
        else:
            detail = record.skip_reason or ""
        source = record.target + (f" [{record.distribution}]" if record.distribution else "")
        lines.append(f"  {record.name:<{width}}  {status:<7}  {detail}")
        lines.append(f"  {'':<{width}}  {'':<7}  from {source}, group {record.group}")
    for name in missing:
        lines.append(f"  {name:<{width}}  missing  named in {PLUGINS_ENV} but not installed")
    lines.append("Resolver chain (tried in this order):")
    if not chain:
        lines.append("  (empty: every adapter name resolves to 'not found')")
    for position, (resolver, plugin) in enumerate(chain, 1):
        lines.append(f"  {position}. {resolver}  (plugin {plugin})" if plugin
                     else f"  {position}. {resolver}  (registered directly)")
    return "\n".join(lines)


def plugin_report_json(records: list[PluginRecord], chain: list[tuple[str, str | None]],
                       missing: list[str]) -> str:
    return json.dumps({
        "vllm_plugins": requested_plugins(),
        "plugins": [{**asdict(r), "status": plugin_status(r)} for r in records],
        "missing": missing,
        "chain": [{"resolver": resolver, "plugin": plugin} for resolver, plugin in chain],
    }, indent=2)
